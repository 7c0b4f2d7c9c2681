//! Ultravox v0.5 (`model_type` `ultravox`): a Whisper encoder, a stacking SwiGLU projector and
//! a Llama language model, after fixie-ai/ultravox's `ultravox/model/` (its modeling code is
//! not in transformers).
//!
//! Audio is processed as `UltravoxProcessor` does: resampled to 16 kHz, padded to at least two
//! hops and to a whole hop, log-mel without truncation, then cut into chunks of the encoder's
//! context (`2 * max_source_positions` frames, the last one zero padded); each chunk is encoded
//! with its padding masked, projected, and cut to `ceil(frames / 16)` tokens
//! ([`config::chunk_plan`]). `<|audio|>` is replaced by that many copies of the tokenizer's
//! `eos_token`, whose embeddings the audio features then replace.

pub mod config;
pub mod encoder;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

pub use config::{chunk_plan, Chunk, UltravoxConfig};

use crate::error::{Error, Result};
use crate::media::{Audio, MediaItem, Modality};
use crate::models::common::files::{mmap_weights, read_json, weight_files};
use crate::models::common::llama::{Llama, LlamaConfig};
use crate::models::common::mel::{Fit, LogMel, MelConfig, MelExtractor};
use crate::models::{
    EncodedItem, Expansion, ExtraModel, Family, FamilyDefaults, LoadContext, Model, ModelInfo,
    ProcessorKwargs, PromptStyle,
};

/// The text placeholder for an audio item (Ultravox's `AUDIO_TOKEN`).
pub const AUDIO_PLACEHOLDER: &str = "<|audio|>";

/// Ultravox's entry in the family table.
pub const FAMILY: Family = Family {
    name: "ultravox",
    model_types: &["ultravox"],
    architectures: &["UltravoxModel"],
    aliases: &[("ultravox", "fixie-ai/ultravox-v0_5-llama-3_2-1b")],
    defaults,
    load: |ctx| Ok(Box::new(UltravoxModel::load_from(ctx)?)),
};

/// Cheap facts from `config.json`: one audio item per prompt by default (the model card's and
/// vLLM's example usage; the processor itself takes several, so `--limit-mm-per-prompt`
/// may raise it), written `<|audio|>`; the chat template comes from the model directory.
/// The hub checkpoints name their language model by `text_model_id` (no `text_config`, no
/// `language_model.*` weights): that model is then an extra model to resolve. Their template is
/// Llama 3's, which takes string content (`message['content'] | trim`).
pub fn defaults(config: &Value) -> Result<FamilyDefaults> {
    let parsed = UltravoxConfig::from_value(config, "config.json")?;
    let extra_models = match (&parsed.text, &parsed.text_model_id) {
        (None, Some(id)) => vec![ExtraModel {
            reference: id.clone(),
            key: "text_model_id",
        }],
        _ => Vec::new(),
    };
    Ok(FamilyDefaults {
        family: "ultravox",
        max_positions: parsed.text.as_ref().map(|t| t.max_position_embeddings),
        limits: BTreeMap::from([(Modality::Audio, 1)]),
        prompt: PromptStyle {
            placeholders: BTreeMap::from([(Modality::Audio, AUDIO_PLACEHOLDER.to_string())]),
            string_content: true,
            ..Default::default()
        },
        extra_models,
        ..Default::default()
    })
}

/// The id of the tokenizer's `eos_token` (tokenizer_config.json), which
/// `UltravoxProcessor` repeats in place of `<|audio|>`.
fn audio_slot_token(dir: &Path) -> Result<u32> {
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg = read_json(&cfg_path)?;
    let eos = cfg
        .get("eos_token")
        .and_then(crate::prompt::template::token_text)
        .ok_or_else(|| {
            Error::input(
                cfg_path.display().to_string(),
                "no eos_token",
                "the eos_token Ultravox puts in audio slots",
            )
        })?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| {
        Error::input(
            tok_path.display().to_string(),
            format!("cannot load the tokenizer: {e}"),
            "a Hugging Face tokenizer.json",
        )
    })?;
    tokenizer.token_to_id(eos).ok_or_else(|| {
        Error::input(
            tok_path.display().to_string(),
            format!("no id for eos_token {eos}"),
            "the eos_token in the vocabulary",
        )
    })
}

/// A loaded Ultravox checkpoint.
pub struct UltravoxModel {
    config: UltravoxConfig,
    info: ModelInfo,
    mel: MelExtractor,
    audio: encoder::AudioEncoder,
    projector: encoder::Projector,
    lm: Llama,
    slot_token: u32,
    device: Device,
    dtype: DType,
}

impl UltravoxModel {
    /// Loads a self-contained directory: `config.json` with `audio_config` and `text_config`,
    /// weights holding `audio_tower.*`, `multi_modal_projector.*` and `language_model.*`,
    /// `tokenizer.json`, `tokenizer_config.json`, and `preprocessor_config.json` (optional).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with_text_model(dir, None, device, dtype)
    }

    /// As [`UltravoxModel::load`]; `text_dir`, when given, is the language model a hub
    /// checkpoint names by `text_model_id` (a Llama directory: `config.json` and weights with
    /// `model.*` / `lm_head.*`), used when `config.json` has no `text_config`.
    pub fn load_with_text_model(
        dir: &Path,
        text_dir: Option<&Path>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut ctx = LoadContext::from_dir(dir, device, dtype)?;
        ctx.extra_dirs.extend(text_dir.map(Path::to_path_buf));
        Self::load_from(&ctx)
    }

    /// [`UltravoxModel::load_with_text_model`] with the parsed `config.json` of `ctx`; its
    /// first extra directory is the `text_model_id` language model.
    pub fn load_from(ctx: &LoadContext) -> Result<Self> {
        let (dir, device, dtype) = (ctx.dir.as_path(), &ctx.device, ctx.dtype);
        let text_dir = ctx.extra_dirs.first().map(PathBuf::as_path);
        let config = UltravoxConfig::from_value(&ctx.config, "config.json")?;
        let pre_path = dir.join("preprocessor_config.json");
        let mel_config = if pre_path.is_file() {
            MelConfig::from_preprocessor(&read_json(&pre_path)?, &pre_path.display().to_string())?
        } else {
            MelConfig::whisper(config.audio.num_mel_bins)
        };
        if mel_config.n_mels != config.audio.num_mel_bins {
            return Err(Error::input(
                pre_path.display().to_string(),
                format!("{} mel bins", mel_config.n_mels),
                format!(
                    "{} mel bins, as audio_config says",
                    config.audio.num_mel_bins
                ),
            ));
        }
        let files = weight_files(dir)?;
        let vb = mmap_weights(&files, dtype, device)?;
        let (text, lm_vb, head_vb): (LlamaConfig, VarBuilder, VarBuilder) =
            match (&config.text, text_dir) {
                (Some(text), _) => (
                    text.clone(),
                    vb.pp("language_model").pp("model"),
                    vb.pp("language_model").pp("lm_head"),
                ),
                (None, Some(text_dir)) => {
                    let path = text_dir.join("config.json");
                    let text: LlamaConfig =
                        serde_json::from_value(read_json(&path)?).map_err(|e| {
                            Error::input(
                                path.display().to_string(),
                                format!("not a Llama config: {e}"),
                                "the config.json of the text_model_id model",
                            )
                        })?;
                    let tfiles = weight_files(text_dir)?;
                    let tvb = mmap_weights(&tfiles, dtype, device)?;
                    (text, tvb.pp("model"), tvb.pp("lm_head"))
                }
                (None, None) => {
                    return Err(Error::input(
                        dir.join("config.json").display().to_string(),
                        format!(
                            "the language model is not in this directory: config.json names it by \
                             text_model_id {} and has no text_config",
                            config.text_model_id.as_deref().unwrap_or("?")
                        ),
                        "an Ultravox directory with text_config and language_model.* weights, \
                         or the text_model_id model given alongside",
                    ))
                }
            };
        let audio = encoder::AudioEncoder::load(&config.audio, vb.pp("audio_tower"))?;
        let projector =
            encoder::Projector::load(&config, text.hidden_size, vb.pp("multi_modal_projector"))?;
        let lm = Llama::load(&text, lm_vb, head_vb, text.tie_word_embeddings)?;
        Ok(Self {
            info: ModelInfo {
                hidden_size: text.hidden_size,
                vocab_size: text.vocab_size,
                max_positions: text.max_position_embeddings,
            },
            slot_token: audio_slot_token(dir)?,
            mel: MelExtractor::new(mel_config),
            config,
            audio,
            projector,
            lm,
            device: device.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &UltravoxConfig {
        &self.config
    }

    /// Log-mel features as `UltravoxProcessor` computes them for one item: 16 kHz (soxr HQ
    /// resampling otherwise, as for Whisper), at least two hops of samples, padded to a whole
    /// hop, never truncated.
    pub fn log_mel(&self, audio: &Audio) -> Result<LogMel> {
        self.mel.log_mel(audio, Fit::WholeHops)
    }

    /// The encoder passes for features of `valid_frames` real frames.
    pub fn chunks(&self, valid_frames: usize) -> Vec<Chunk> {
        chunk_plan(
            valid_frames,
            self.config.context_frames(),
            self.config.stack_factor,
        )
    }

    /// The expansion of an item whose features have `valid_frames` real frames.
    pub fn expansion(&self, valid_frames: usize) -> Expansion {
        Expansion {
            before: Vec::new(),
            slot_token: self.slot_token,
            slots: self.chunks(valid_frames).iter().map(|c| c.tokens).sum(),
            after: Vec::new(),
            slot_ids: Vec::new(),
        }
    }

    /// The encoder input of each chunk: `(1, n_mels, padded_frames)` in the model's dtype.
    pub fn chunk_features(&self, mel: &LogMel) -> Result<Vec<(Chunk, Tensor)>> {
        let full = Tensor::from_slice(&mel.data, (mel.n_mels, mel.frames), &Device::Cpu)?;
        self.chunks(mel.valid_frames)
            .into_iter()
            .map(|c| {
                let avail = mel.frames.saturating_sub(c.offset).min(c.padded_frames);
                let mut x = full.narrow(1, c.offset, avail)?;
                if avail < c.padded_frames {
                    x = x.pad_with_zeros(1, 0, c.padded_frames - avail)?;
                }
                let x = x
                    .unsqueeze(0)?
                    .to_device(&self.device)?
                    .to_dtype(self.dtype)?;
                Ok((c, x))
            })
            .collect()
    }

    /// Audio embeddings `(tokens, hidden)` from log-mel features.
    pub fn encode_mel(&self, mel: &LogMel) -> Result<Tensor> {
        let mut parts = Vec::new();
        for (chunk, x) in self.chunk_features(mel)? {
            let h = self.audio.forward(&x, chunk.frames)?;
            let p = self.projector.forward(&h)?.squeeze(0)?;
            parts.push(p.narrow(0, 0, chunk.tokens)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

impl Model for UltravoxModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn encode_with(&self, item: &MediaItem, _kwargs: &ProcessorKwargs) -> Result<EncodedItem> {
        match item {
            MediaItem::Audio(audio) => {
                let mel = self.log_mel(audio)?;
                Ok(EncodedItem::new(
                    self.expansion(mel.valid_frames),
                    self.encode_mel(&mel)?,
                ))
            }
            other => Err(Error::input(
                other.modality().name(),
                format!("Ultravox does not take {} input", other.modality()),
                "audio",
            )),
        }
    }

    crate::models::common::llama::delegate_to_llama!(lm);
}

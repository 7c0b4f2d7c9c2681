//! Whisper (speech recognition): log-mel front end, encoder, and a decoder prompted with
//! forced tokens instead of a chat template. The audio item has no placeholder: its encoder
//! output is attended to through cross-attention, set up by [`Model::prefill`].
//! Matches `WhisperForConditionalGeneration.generate` (greedy, no timestamps), including
//! the `suppress_tokens` / `begin_suppress_tokens` logits processors.
//!
//! Driving it: `prompt.ids = model.decoder_prompt(task, language)?` with no spans, `items =
//! [model.encode(&MediaItem::Audio(audio_16k))?]`, then `prefill` once and `decode` per
//! token until an id of `eos_token_ids()` or `info().max_positions` positions.
//! For a multilingual model without a language, `detect_language` on the encoder output
//! gives the token HF would pick (`language_code` turns it into `en`, `de`, ...).

pub mod config;
pub mod model;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

pub use config::{GenerationConfig, Task, WhisperConfig};

use crate::error::{Error, Result};
use crate::media::{Audio, MediaItem, Modality};
use crate::models::common::files::{mmap_weights, read_json, weight_files};
use crate::models::common::mel::{Fit, LogMel, MelConfig, MelExtractor};
use crate::models::common::whisper_encoder::{ScaleAt, WhisperEncoder};
use crate::models::kv::KvCache;
use crate::models::{
    EncodedItem, Expansion, Family, FamilyDefaults, LoadContext, Model, ModelInfo, ProcessorKwargs,
    PromptStyle, Spliced,
};

/// Whisper's entry in the family table.
pub const FAMILY: Family = Family {
    name: "whisper",
    model_types: &["whisper"],
    architectures: &["WhisperForConditionalGeneration"],
    aliases: &[("whisper", "openai/whisper-tiny.en")],
    defaults,
    load: |ctx| Ok(Box::new(WhisperModel::load_from(ctx)?)),
};

/// A loaded Whisper checkpoint.
pub struct WhisperModel {
    config: WhisperConfig,
    generation: GenerationConfig,
    info: ModelInfo,
    mel: MelExtractor,
    encoder: WhisperEncoder,
    decoder: model::Decoder,
    dtype: DType,
    /// `(vocab,)` f32: -inf at `suppress_tokens`, 0 elsewhere (None when there are none).
    suppress_mask: Option<Tensor>,
    /// The same for `suppress_tokens` plus `begin_suppress_tokens`, for the first position.
    begin_mask: Option<Tensor>,
}

/// An additive `(vocab,)` mask: -inf at `ids`, 0 elsewhere.
fn suppress_mask(ids: &[u32], vocab: usize, device: &Device) -> Result<Option<Tensor>> {
    if ids.is_empty() {
        return Ok(None);
    }
    let mut v = vec![0f32; vocab];
    for &id in ids {
        // Ids past the vocabulary are ignored, as torch's isin-based processor does.
        if let Some(x) = v.get_mut(id as usize) {
            *x = f32::NEG_INFINITY;
        }
    }
    Ok(Some(Tensor::from_vec(v, vocab, device)?))
}

/// A Whisper prompt's words: `transcribe` (the default) or `translate`, and a language code.
fn parse_prompt(text: &str) -> Result<(Task, Option<String>)> {
    let mut task = Task::Transcribe;
    let mut language: Option<String> = None;
    for word in text.split(|c: char| c.is_whitespace() || c == ',') {
        match word.to_ascii_lowercase().as_str() {
            "" | "transcribe" => {}
            "translate" => task = Task::Translate,
            w if (2..=3).contains(&w.len()) && w.chars().all(|c| c.is_ascii_lowercase()) => {
                language = Some(w.to_string())
            }
            _ => return Err(Error::input(
                "prompt",
                format!("{word:?} is not a Whisper task or language"),
                "an empty prompt, `transcribe`, `translate`, and/or a language code such as `en`",
            )),
        }
    }
    Ok((task, language))
}

/// Cheap per-family facts from `config.json`: one audio item, no chat template, no placeholder.
pub fn defaults(config: &Value) -> Result<FamilyDefaults> {
    WhisperConfig::from_value(config, "config.json")?;
    Ok(FamilyDefaults {
        family: "whisper",
        limits: BTreeMap::from([(Modality::Audio, 1)]),
        prompt: PromptStyle {
            own_prompt: true,
            check_text: Some(|text| parse_prompt(text).map(|_| ())),
            ..Default::default()
        },
        ..Default::default()
    })
}

impl WhisperModel {
    /// Loads `config.json`, `generation_config.json` (optional), `preprocessor_config.json`
    /// (optional) and the safetensors weights of `dir`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<WhisperModel> {
        Self::load_from(&LoadContext::from_dir(dir, device, dtype)?)
    }

    /// [`WhisperModel::load`] with the parsed `config.json` of `ctx`.
    pub fn load_from(ctx: &LoadContext) -> Result<WhisperModel> {
        let (dir, device, dtype) = (ctx.dir.as_path(), &ctx.device, ctx.dtype);
        let config_value = &ctx.config;
        let gen_path = dir.join("generation_config.json");
        let gen_value = if gen_path.is_file() {
            Some(read_json(&gen_path)?)
        } else {
            None
        };
        let pre_path = dir.join("preprocessor_config.json");
        let mel_config = if pre_path.is_file() {
            MelConfig::from_preprocessor(&read_json(&pre_path)?, &pre_path.display().to_string())?
        } else {
            MelConfig::whisper(
                config_value
                    .get("num_mel_bins")
                    .and_then(Value::as_u64)
                    .unwrap_or(80) as usize,
            )
        };
        Self::from_parts(
            config_value,
            gen_value.as_ref(),
            mel_config,
            &weight_files(dir)?,
            device,
            dtype,
        )
    }

    /// As [`WhisperModel::load`], from already-read configuration values.
    pub fn from_parts(
        config_value: &Value,
        generation: Option<&Value>,
        mel_config: MelConfig,
        weights: &[PathBuf],
        device: &Device,
        dtype: DType,
    ) -> Result<WhisperModel> {
        let config = WhisperConfig::from_value(config_value, "config.json")?;
        let generation =
            GenerationConfig::from_values(generation, config_value, "generation_config.json")?;
        let expected_samples = config.encoder.max_frames() * mel_config.hop_length;
        if mel_config.n_mels != config.encoder.num_mel_bins
            || mel_config.n_samples != expected_samples
        {
            return Err(Error::input(
                "preprocessor_config.json",
                format!(
                    "{} mel bins over {} samples",
                    mel_config.n_mels, mel_config.n_samples
                ),
                format!(
                    "{} mel bins over {expected_samples} samples, as config.json says",
                    config.encoder.num_mel_bins
                ),
            ));
        }
        let vb = mmap_weights(weights, dtype, device)?;
        let encoder = WhisperEncoder::load(
            &config.encoder,
            ScaleAt::Scores,
            vb.pp("model").pp("encoder"),
        )?;
        let proj_out = if !config.tie_word_embeddings && vb.contains_tensor("proj_out.weight") {
            Some(vb.pp("proj_out"))
        } else {
            None
        };
        let decoder = model::Decoder::load(&config, vb.pp("model").pp("decoder"), proj_out)?;
        let info = ModelInfo {
            hidden_size: config.encoder.d_model,
            vocab_size: config.vocab_size,
            max_positions: config.max_target_positions,
        };
        let vocab = config.vocab_size;
        let begin: Vec<u32> = generation
            .suppress_tokens
            .iter()
            .chain(&generation.begin_suppress_tokens)
            .copied()
            .collect();
        Ok(Self {
            suppress_mask: suppress_mask(&generation.suppress_tokens, vocab, device)?,
            begin_mask: suppress_mask(&begin, vocab, device)?,
            mel: MelExtractor::new(mel_config),
            config,
            generation,
            info,
            encoder,
            decoder,
            dtype,
        })
    }

    pub fn config(&self) -> &WhisperConfig {
        &self.config
    }

    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }

    /// Ids that end generation (`eos_token_id`).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.generation.eos_token_ids
    }

    /// The forced decoder prompt for `task` and `language` (see [`GenerationConfig::decoder_prompt`]).
    pub fn decoder_prompt(&self, task: Task, language: Option<&str>) -> Result<Vec<u32>> {
        self.generation.decoder_prompt(task, language)
    }

    /// Log-mel features, padded or truncated to 30 s. Audio at another rate is first
    /// resampled to the feature extractor's rate with soxr HQ, as transformers' `load_audio`
    /// (librosa) does.
    pub fn log_mel(&self, audio: &Audio) -> Result<LogMel> {
        self.mel.log_mel(audio, Fit::MaxLength)
    }

    /// Encoder output `(max_source_positions, d_model)` for `input_features`
    /// `(1, n_mels, 2 * max_source_positions)`.
    pub fn encode_features(&self, input_features: &Tensor) -> Result<Tensor> {
        // Whisper always takes the full 30 s window.
        let dims = input_features.dims();
        let frames = self.encoder.max_frames();
        if dims != [1, self.config.encoder.num_mel_bins, frames] {
            return Err(Error::input(
                "input_features",
                format!("shape {dims:?}"),
                format!("(1, {}, {frames})", self.config.encoder.num_mel_bins),
            ));
        }
        let x = self.encoder.embed(&input_features.to_dtype(self.dtype)?)?;
        let x = self.encoder.layers(&x, None)?;
        Ok(self.encoder.norm(&x)?.squeeze(0)?)
    }

    /// Fills `cache.cross` with every decoder layer's cross-attention keys and values.
    pub fn attach_encoder_output(
        &self,
        encoder_states: &Tensor,
        cache: &mut KvCache,
    ) -> Result<()> {
        let (n, d) = encoder_states.dims2()?;
        if d != self.config.encoder.d_model || n == 0 {
            return Err(Error::input(
                "encoder output",
                format!("shape ({n}, {d})"),
                format!("(positions, {})", self.config.encoder.d_model),
            ));
        }
        cache.cross = self.decoder.cross_kv(encoder_states)?;
        Ok(())
    }

    /// The language token HF's `detect_language` picks: the most likely language id after
    /// `<|startoftranscript|>`. Multilingual models only.
    pub fn detect_language(&self, encoder_states: &Tensor) -> Result<u32> {
        if self.generation.lang_to_id.is_empty() {
            return Err(Error::input(
                "language",
                "cannot be detected: the model has no lang_to_id",
                "a multilingual Whisper model",
            ));
        }
        let mut cache = self.new_cache(1)?;
        self.attach_encoder_output(encoder_states, &mut cache)?;
        let embeds = self
            .decoder
            .embed_tokens(&[self.generation.decoder_start_token_id])?;
        let logits = self
            .decoder
            .forward(&embeds, &mut cache)?
            .to_vec1::<f32>()?;
        let mut best: Option<(u32, f32)> = None;
        for &id in self.generation.lang_to_id.values() {
            let l = logits
                .get(id as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY);
            if best.is_none_or(|(bid, b)| l > b || (l == b && id < bid)) {
                best = Some((id, l));
            }
        }
        best.map(|(id, _)| id)
            .ok_or_else(|| anyhow::anyhow!("no language ids").into())
    }

    /// The language code (`en`) of a language token id, e.g. from [`WhisperModel::detect_language`].
    pub fn language_code(&self, id: u32) -> Option<&str> {
        self.generation
            .lang_to_id
            .iter()
            .find(|(_, &v)| v == id)
            .map(|(k, _)| k.trim_start_matches("<|").trim_end_matches("|>"))
    }
}

fn apply(logits: Tensor, mask: &Option<Tensor>) -> Result<Tensor> {
    Ok(match mask {
        Some(m) => (logits + m)?,
        None => logits,
    })
}

impl WhisperModel {
    /// The decoder prompt for a user's text: empty or `transcribe` (the default), `translate`,
    /// and/or a language code such as `en`; a multilingual model without a language detects
    /// it from the audio, as HF's `generate` does.
    fn prompt_for(&self, text: &str, items: &[EncodedItem]) -> Result<Vec<u32>> {
        let (task, mut language) = parse_prompt(text)?;
        let multilingual = !self.generation.lang_to_id.is_empty();
        if language.is_none() && multilingual {
            if let Some(item) = items.first() {
                let id = self.detect_language(&item.features)?;
                language = self.language_code(id).map(str::to_string);
            }
        }
        self.decoder_prompt(task, language.as_deref())
    }
}

impl Model for WhisperModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn audio_window_s(&self) -> Option<f64> {
        Some(self.mel.config().window_s())
    }

    fn own_prompt(&self, text: &str, items: &[EncodedItem]) -> Option<Result<Vec<u32>>> {
        Some(self.prompt_for(text, items))
    }

    /// Audio -> log-mel -> encoder output `(max_source_positions, d_model)`. Takes no prompt
    /// slots: the decoder reads it through cross-attention.
    fn encode_with(&self, item: &MediaItem, _kwargs: &ProcessorKwargs) -> Result<EncodedItem> {
        let MediaItem::Audio(audio) = item else {
            return Err(Error::input(
                format!("{} item", item.modality()),
                "Whisper accepts only audio",
                "one audio item",
            ));
        };
        let mel = self.log_mel(audio)?;
        let features = mel.to_tensor(self.decoder.device(), DType::F32)?;
        let expansion = Expansion {
            before: Vec::new(),
            slot_token: self.generation.decoder_start_token_id,
            slots: 0,
            after: Vec::new(),
            slot_ids: Vec::new(),
        };
        Ok(EncodedItem::new(
            expansion,
            self.encode_features(&features)?,
        ))
    }

    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        self.decoder.embed_tokens(ids)
    }

    fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        let heads = self.decoder.heads;
        let capacity = capacity.min(self.decoder.max_positions);
        Ok(KvCache::new(
            self.config.decoder_layers,
            heads,
            self.config.encoder.d_model / heads,
            capacity,
            self.dtype,
            self.decoder.device(),
        ))
    }

    /// Decoder over token embeddings; `suppress_tokens` are already -inf in the result.
    fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        apply(self.decoder.forward(embeds, cache)?, &self.suppress_mask)
    }

    /// Attaches `items[0]`'s encoder output, runs the decoder prompt (`prompt.ids`, usually
    /// [`WhisperModel::decoder_prompt`]) and returns the first generated position's logits
    /// with `suppress_tokens` and `begin_suppress_tokens` at -inf.
    fn prefill(
        &self,
        prompt: &Spliced,
        items: &[EncodedItem],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let [item] = items else {
            return Err(Error::input(
                "prompt",
                format!("{} audio items", items.len()),
                "exactly one audio item for Whisper",
            ));
        };
        if prompt.ids.is_empty() {
            return Err(Error::input(
                "prompt",
                "no decoder prompt tokens",
                "the forced tokens from decoder_prompt()",
            ));
        }
        self.attach_encoder_output(&item.features, cache)?;
        let embeds = self.embed_tokens(&prompt.ids)?;
        apply(self.decoder.forward(&embeds, cache)?, &self.begin_mask)
    }
}

/// Loads a Whisper directory (the family table's `load` wraps this in a `Box<dyn Model>`).
pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<WhisperModel> {
    WhisperModel::load(dir, device, dtype)
}

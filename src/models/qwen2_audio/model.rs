//! [`Qwen2AudioModel`], the family's [`Model`]: audio -> 16 kHz (soxr HQ) -> log-mel padded to
//! 30 s -> encoder + projector -> features spliced at the `<|AUDIO|>` slots of a Qwen2 decoder.
//! Audio tokens take ordinary positions, so the trait's default `prefill` / `decode` apply.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::config::{mel_config, Qwen2AudioConfig};
use super::encoder::AudioEncoder;
use super::output_lengths;
use crate::error::{Error, Result};
use crate::media::{Audio, MediaItem};
use crate::models::common::files::{mmap_weights, weight_files, weight_prefix};
use crate::models::common::llama::Llama;
use crate::models::common::mel::{Fit, LogMel, MelExtractor};
use crate::models::{EncodedItem, Expansion, LoadContext, Model, ModelInfo, ProcessorKwargs};

/// A loaded Qwen2-Audio checkpoint.
pub struct Qwen2AudioModel {
    config: Qwen2AudioConfig,
    info: ModelInfo,
    mel: MelExtractor,
    encoder: AudioEncoder,
    lm: Llama,
    device: Device,
}

impl Qwen2AudioModel {
    /// Loads `config.json`, the feature extractor settings and the safetensors weights of `dir`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_from(&LoadContext::from_dir(dir, device, dtype)?)
    }

    /// [`Qwen2AudioModel::load`] with the parsed `config.json` of `ctx`.
    pub fn load_from(ctx: &LoadContext) -> Result<Self> {
        let (dir, device, dtype) = (ctx.dir.as_path(), &ctx.device, ctx.dtype);
        let config = Qwen2AudioConfig::from_value(&ctx.config)?;
        let mel = mel_config(dir, &config)?;
        let files = weight_files(dir)?;
        let vb = mmap_weights(&files, dtype, device)?;
        let tower = weight_prefix(
            &vb,
            &["audio_tower", "model.audio_tower"],
            "conv1.weight",
            "audio tower",
        )?;
        let projector = weight_prefix(
            &vb,
            &["multi_modal_projector", "model.multi_modal_projector"],
            "linear.weight",
            "projector",
        )?;
        let text = weight_prefix(
            &vb,
            &[
                "language_model.model",
                "model.language_model",
                "language_model",
            ],
            "embed_tokens.weight",
            "language model",
        )?;
        let head = weight_prefix(
            &vb,
            &["language_model.lm_head", "lm_head"],
            "weight",
            "lm_head",
        )
        .unwrap_or("lm_head");
        let encoder = AudioEncoder::load(
            &config.audio,
            config.text.hidden_size,
            vb.pp(tower),
            vb.pp(projector),
        )?;
        let lm = Llama::load(
            &config.text,
            vb.pp(text),
            vb.pp(head),
            config.text.tie_word_embeddings,
        )?;
        let info = ModelInfo {
            hidden_size: config.text.hidden_size,
            vocab_size: config.text.vocab_size,
            max_positions: config.text.max_position_embeddings,
        };
        Ok(Self {
            config,
            info,
            mel: MelExtractor::new(mel),
            encoder,
            lm,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &Qwen2AudioConfig {
        &self.config
    }

    /// `input_features` as `Qwen2AudioProcessor` computes them: audio at another rate is first
    /// resampled to the extractor's rate with soxr HQ (as transformers' `load_audio` does), then
    /// padded or truncated to 30 s; `valid_frames` is the sum of `feature_attention_mask`.
    pub fn log_mel(&self, audio: &Audio) -> Result<LogMel> {
        self.mel.log_mel(audio, Fit::MaxLength)
    }

    /// How an audio with `valid_frames` feature frames appears in the prompt: its `<|AUDIO|>`
    /// repeated [`output_lengths`]`.1` times (the template already wrote the bos/eos tokens).
    pub fn expansion(&self, valid_frames: usize) -> Expansion {
        Expansion {
            before: Vec::new(),
            slot_token: self.config.audio_token_id,
            slots: output_lengths(valid_frames).1,
            after: Vec::new(),
            slot_ids: Vec::new(),
        }
    }

    /// Projected audio features `(tokens, hidden)` for `input_features` `(1, n_mels, frames)`.
    pub fn encode_features(&self, input_features: &Tensor, valid_frames: usize) -> Result<Tensor> {
        self.encoder.forward(input_features, valid_frames)
    }

    /// The features and expansion of one audio.
    pub fn encode_audio(&self, audio: &Audio) -> Result<EncodedItem> {
        let mel = self.log_mel(audio)?;
        let input_features = mel.to_tensor(&self.device, DType::F32)?;
        let features = self.encode_features(&input_features, mel.valid_frames)?;
        Ok(EncodedItem::new(self.expansion(mel.valid_frames), features))
    }
}

impl Model for Qwen2AudioModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn audio_window_s(&self) -> Option<f64> {
        Some(self.mel.config().window_s())
    }

    fn encode_with(&self, item: &MediaItem, _kwargs: &ProcessorKwargs) -> Result<EncodedItem> {
        match item {
            MediaItem::Audio(audio) => self.encode_audio(audio),
            other => Err(Error::input(
                other.modality().name(),
                format!("Qwen2-Audio does not take {} input", other.modality()),
                "audio",
            )),
        }
    }

    crate::models::common::llama::delegate_to_llama!(lm);
}

/// Loads a Qwen2-Audio directory (the family table's `load` wraps this in a `Box<dyn Model>`).
pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Qwen2AudioModel> {
    Qwen2AudioModel::load(dir, device, dtype)
}

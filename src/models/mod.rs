//! Model families. `registry` is the one table of families; each family lives in its own
//! folder and contributes cheap `defaults` (from `config.json` only) and `load`.
//! Families receive a directory whose files are all present (`registry::LoadContext`) and never
//! download.
//! Imports `media`, `prompt` types and `engine::kv`; never `cli`, `app`, `sink` or `hub` logic.

pub mod common;
pub mod llava;
pub mod qwen2_audio;
pub mod qwen2_vl;
pub mod registry;
pub mod ultravox;
pub mod whisper;

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::engine::kv::KvCache;
use crate::error::Result;
use crate::media::{MediaItem, Modality};
pub use crate::prompt::{Expansion, Span, Spliced};

/// What a family knows from `config.json` alone, used to validate a request before
/// any weights are read.
#[derive(Debug, Clone)]
pub struct FamilyDefaults {
    /// Family name as shown to users (`llava`, `qwen2_vl`, …).
    pub family: &'static str,
    /// Items allowed per prompt, per accepted modality (absent = not accepted).
    pub limits: BTreeMap<Modality, usize>,
    /// The placeholder a `--raw` prompt writes for each item of a modality.
    pub placeholders: BTreeMap<Modality, String>,
    /// Chat template used when the model directory ships none.
    pub fallback_chat_template: Option<&'static str>,
    /// Whether `embeds` input is accepted, and for which modality.
    pub embeds: Option<Modality>,
    /// Other models this one's weights partly come from, named in `config.json` (Ultravox's
    /// `text_model_id`): each an `--model`-style reference, resolved and downloaded like the
    /// model itself, whose directory the loader receives in `LoadContext::extra_dirs`.
    pub extra_models: Vec<ExtraModel>,
    /// Whether the chat template takes each message's content as one string (Llama 3's
    /// `message['content'] | trim`) rather than a list of typed parts: the user turn is then
    /// one placeholder line per media item followed by the text, as vLLM writes it.
    pub string_content: bool,
}

/// A model another one's `config.json` names for part of its weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraModel {
    /// An alias, repo id (`org/name[@revision]`) or directory, as `--model` takes.
    pub reference: String,
    /// The `config.json` key that names it, for error messages (`text_model_id`).
    pub key: &'static str,
}

/// Facts about a loaded model that the engine needs.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// Maximum positions the language model supports.
    pub max_positions: usize,
}

/// A media item encoded into the language model's hidden space.
#[derive(Debug, Clone)]
pub struct EncodedItem {
    pub expansion: Expansion,
    /// `(slots, hidden_size)` on the model's device and dtype.
    pub features: Tensor,
    /// The item's patch grid, for families whose positions follow it (M-RoPE); `None` for
    /// families whose media tokens take ordinary positions.
    pub grid: Option<ItemGrid>,
}

/// Where a media item's tokens sit in space and time, for multimodal rotary positions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ItemGrid {
    /// `(t, h, w)` in patches (before merging).
    pub grid_thw: [usize; 3],
    /// Temporal position step per temporal patch: 1 for images and Qwen2-VL video;
    /// `tokens_per_second * temporal_patch_size / fps` for Qwen2.5-VL video.
    pub time_interval: f32,
}

/// A loaded model. Object safe: the engine drives any family through it.
///
/// The engine calls [`Model::prefill`] once per sequence and [`Model::decode`] (or
/// [`Model::decode_batch`] for many sequences at once) per generated token. Decoder-only families that splice media features into token embeddings only
/// implement `forward`; families with their own position scheme (M-RoPE) or an encoder whose
/// output is attended to (Whisper) override `prefill`/`decode`.
pub trait Model: Send {
    fn info(&self) -> &ModelInfo;

    /// Preprocesses and encodes one item (or shape-checks precomputed embeds) into
    /// `(slots, hidden)` features, with the tokens that stand for it in the prompt.
    fn encode(&self, item: &MediaItem) -> Result<EncodedItem>;

    /// Encodes several items at once (items of different prompts, for batch runs); one
    /// result per item, in order. Families whose encoder can stack same-shaped inputs
    /// override it to run one encoder pass.
    fn encode_batch(&self, items: &[&MediaItem]) -> Vec<Result<EncodedItem>> {
        items.iter().map(|item| self.encode(item)).collect()
    }

    /// Token embeddings `(ids.len(), hidden)`.
    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor>;

    /// A cache sized for `capacity` positions.
    fn new_cache(&self, capacity: usize) -> Result<KvCache>;

    /// Runs the language model over `embeds` `(seq, hidden)` placed after the positions
    /// already in `cache`; returns the logits of the last position `(vocab,)` as f32.
    fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor>;

    /// Families prompted without a chat template (Whisper) build their prompt ids from the
    /// user's text and the encoded items; `None` means render the chat template.
    fn own_prompt(&self, _text: &str, _items: &[EncodedItem]) -> Option<Result<Vec<u32>>> {
        None
    }

    /// Runs the whole prompt: token embeddings with each span replaced by its item's features.
    fn prefill(
        &self,
        prompt: &Spliced,
        items: &[EncodedItem],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let embeds = splice_embeddings(self, prompt, items)?;
        self.forward(&embeds, cache)
    }

    /// One generated token.
    fn decode(&self, id: u32, cache: &mut KvCache) -> Result<Tensor> {
        let embeds = self.embed_tokens(&[id])?;
        self.forward(&embeds, cache)
    }

    /// One generated token for each of several sequences at once: `ids[i]` follows the
    /// positions in `caches[i]` (caches may hold different lengths). Returns each sequence's
    /// logits `(vocab,)` as f32, as [`Model::decode`] would. The default loops over the
    /// sequences; families override it to share each weight matmul across the batch.
    fn decode_batch(&self, ids: &[u32], caches: &mut [&mut KvCache]) -> Result<Vec<Tensor>> {
        check_batch(ids, caches)?;
        ids.iter()
            .zip(caches.iter_mut())
            .map(|(&id, cache)| self.decode(id, cache))
            .collect()
    }
}

/// One id per cache, at least one of each.
pub fn check_batch(ids: &[u32], caches: &[&mut KvCache]) -> Result<()> {
    if ids.len() != caches.len() || ids.is_empty() {
        return Err(anyhow::anyhow!(
            "decode_batch: {} ids for {} caches (expected one id per cache, at least one)",
            ids.len(),
            caches.len()
        )
        .into());
    }
    Ok(())
}

/// Input embeddings `(seq, hidden)`: token embeddings with each span replaced by its item's
/// features. The one place where slot and feature counts meet: they must agree.
pub fn splice_embeddings<M: Model + ?Sized>(
    model: &M,
    prompt: &Spliced,
    items: &[EncodedItem],
) -> Result<Tensor> {
    let ids = &prompt.ids;
    let mut pieces = Vec::with_capacity(2 * prompt.spans.len() + 1);
    let mut at = 0;
    for span in &prompt.spans {
        if span.start > at {
            pieces.push(model.embed_tokens(&ids[at..span.start])?);
        }
        let item = items
            .get(span.item)
            .ok_or_else(|| anyhow::anyhow!("no encoded item {} for its prompt span", span.item))?;
        let rows = item.features.dim(0)?;
        if rows != span.len {
            return Err(anyhow::anyhow!(
                "media item {} produced {rows} feature rows for {} prompt slots",
                span.item + 1,
                span.len
            )
            .into());
        }
        pieces.push(item.features.clone());
        at = span.start + span.len;
    }
    if at < ids.len() {
        pieces.push(model.embed_tokens(&ids[at..])?);
    }
    Ok(Tensor::cat(&pieces, 0)?)
}

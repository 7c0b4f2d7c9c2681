//! Model families. `registry` is the one table of families; each family lives in its own
//! folder and contributes cheap `defaults` (from `config.json` only) and `load`.
//! Families receive a [`ModelDir`](crate::hub::ModelDir) and never download.
//! Imports `media`, `prompt` types and `engine::kv`; never `cli`, `app`, `sink` or `hub` logic.

pub mod common;
pub mod llava;
pub mod registry;

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::engine::kv::KvCache;
use crate::error::Result;
use crate::media::{MediaItem, Modality};

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
}

/// Facts about a loaded model that the engine needs.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// Maximum positions the language model supports.
    pub max_positions: usize,
}

/// How one media item appears in the token stream: `before`, then `slots` copies of
/// `slot_token` (whose embeddings are replaced by the item's features), then `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expansion {
    pub before: Vec<u32>,
    pub slot_token: u32,
    pub slots: usize,
    pub after: Vec<u32>,
}

/// A media item encoded into the language model's hidden space.
#[derive(Debug, Clone)]
pub struct EncodedItem {
    pub expansion: Expansion,
    /// `(slots, hidden_size)` on the model's device and dtype.
    pub features: Tensor,
}

/// A loaded model. Object safe: the engine drives any family through it.
pub trait Model: Send {
    fn info(&self) -> &ModelInfo;

    /// Preprocesses and encodes one item (or shape-checks precomputed embeds) into
    /// `(slots, hidden)` features, with the tokens that stand for it in the prompt.
    fn encode(&self, item: &MediaItem) -> Result<EncodedItem>;

    /// Token embeddings `(ids.len(), hidden)`.
    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor>;

    /// A cache sized for `capacity` positions.
    fn new_cache(&self, capacity: usize) -> Result<KvCache>;

    /// Runs the language model over `embeds` `(seq, hidden)` placed after the positions
    /// already in `cache`; returns the logits of the last position `(vocab,)` as f32.
    fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor>;
}

//! Model families. `family` is the contract a family implements (its table entry, the cheap
//! defaults read from `config.json` alone, and the loaded [`Model`]); `registry` is the one
//! table of families and the only module that knows them all; each family lives in its own
//! folder and imports only the contract, `common` and the layers below (`prompt`, `media`,
//! `kernels`). Families receive a directory whose files are all present and never download.

pub mod common;
pub mod family;
pub mod kv;
pub mod llava;
pub mod llava_onevision;
pub mod minicpmv;
pub mod qwen2_audio;
pub mod qwen2_vl;
pub mod registry;
pub mod ultravox;
pub mod whisper;

pub use crate::prompt::{Expansion, PromptStyle, Span, Spliced};
pub use family::{
    check_batch, splice_embeddings, EncodedItem, ExtraModel, Family, FamilyDefaults, ItemGrid,
    LoadContext, Model, ModelInfo, ProcessorKwargs,
};

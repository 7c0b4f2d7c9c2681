//! mmllm: prompt multimodal language models from the command line.

pub mod engine;
pub mod error;
pub mod media;
pub mod models;
pub mod prompt;

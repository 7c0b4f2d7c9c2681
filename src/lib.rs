//! mmllm: prompt multimodal language models from the command line.
//!
//! Dependencies point one way: `cli -> app -> {hub, sink, engine, prompt, models}`;
//! `engine -> models -> prompt -> media`. Nothing imports `cli` or `app`.

pub mod engine;
pub mod error;
pub mod hub;
pub mod media;
pub mod models;

//! mmllm: prompt multimodal language models from the command line.
//!
//! Dependencies point one way: `cli -> app -> {hub, sink, engine, prompt, models}`;
//! `engine -> models -> prompt -> media`. Nothing imports `cli` or `app` but `main`
//! (and `app`, which reads the validated plan).

pub mod app;
pub mod cli;
pub mod engine;
pub mod error;
pub mod hub;
pub mod json;
pub mod kernels;
pub mod limits;
pub mod manifest;
pub mod media;
pub mod models;
pub mod prompt;
pub mod sink;

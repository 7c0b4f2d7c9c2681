//! Shared building blocks of model families.

pub mod clip_processor;
pub mod clip_vision;
pub mod files;
pub mod llama;
pub mod mel;
pub mod resize;
pub mod tv_resize;
pub mod whisper_encoder;

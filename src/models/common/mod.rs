//! Shared building blocks of model families.

pub mod clip_processor;
pub mod resize;

//! Shared building blocks of model families.
pub mod mel;

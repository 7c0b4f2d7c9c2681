//! Shared building blocks of model families.

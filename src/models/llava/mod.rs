//! LLaVA-1.5.

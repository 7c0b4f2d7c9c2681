//! Fuzz target `wav`: see `mmllm_fuzz::wav` (fuzz/src/checks.rs) for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| mmllm_fuzz::wav(bytes));

//! Fuzz target `embeds`: see `mmllm_fuzz::embeds` (fuzz/src/checks.rs) for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| mmllm_fuzz::embeds(bytes));

//! Fuzz target `image`: see `mmllm_fuzz::image` (fuzz/src/checks.rs) for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| mmllm_fuzz::image(bytes));

//! Fuzz target `data_url`: see `mmllm_fuzz::data_url` (fuzz/src/checks.rs) for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| mmllm_fuzz::data_url(bytes));

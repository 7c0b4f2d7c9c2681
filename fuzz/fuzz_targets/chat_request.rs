//! Fuzz target `chat_request`: see `mmllm_fuzz::chat_request` (fuzz/src/checks.rs) for what it
//! checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| mmllm_fuzz::chat_request(bytes));

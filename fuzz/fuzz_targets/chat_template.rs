//! Fuzz target `chat_template`: see `mmllm_fuzz::chat_template` (fuzz/src/checks.rs) for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| mmllm_fuzz::chat_template(bytes));

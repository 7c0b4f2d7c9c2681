//! Fuzz target `manifest_jsonl`: see `mmllm_fuzz::manifest_jsonl` (fuzz/src/checks.rs) for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| mmllm_fuzz::manifest_jsonl(bytes));

//! Fuzz target `npy`: see `mmllm_fuzz::npy` (fuzz/src/checks.rs) for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| mmllm_fuzz::npy(bytes));

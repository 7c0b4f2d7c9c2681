//! The one integration-test binary: one module per area.

mod batch;
mod batching;
mod caps;
mod cli;
mod engine_pure;
mod family_table;
mod hostile;
mod hub;
mod image;
mod knobs;
mod layering;
mod llava_e2e;
mod llava_onevision;
mod llava_parity;
mod media_av;
mod qwen2_audio;
mod qwen2_vl;
mod qwen2_vl_e2e;
mod qwen2_vl_pixels;
mod serve;
mod shard;
mod source;
mod ultravox;
mod util;
mod util_http;
mod whisper;

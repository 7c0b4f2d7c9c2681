//! Generation: KV cache, sampler, UTF-8-safe detokenizer, stop strings, the loop that
//! drives a [`Model`](crate::models::Model) for one sequence, and the continuous-batching
//! scheduler that drives many. Emits events; never imports `sink`, `hub`, `cli`.

pub mod detok;
pub mod generate;
pub mod kv;
pub mod sampler;
pub mod scheduler;
pub mod stop;

//! Generation: device choice, sampler, UTF-8-safe detokenizer, stop strings, the loop that
//! drives a [`Model`](crate::models::Model) for one sequence, and the continuous-batching
//! scheduler that drives many. Emits events; never imports `sink`, `hub`, `cli`.

pub mod detok;
pub mod device;
pub mod generate;
pub mod sampler;
pub mod scheduler;
pub mod stop;

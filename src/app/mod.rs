//! Orchestration, nothing more: `plan` validates a request's settings (from the command line
//! or a manifest job), `pipeline` resolves, decodes, loads and builds engine requests,
//! `oneshot` runs image/video/audio/embeds prompts and `batch` runs manifests, both through
//! `pipeline`; `serve` answers OpenAI-compatible HTTP requests through the same pipeline and
//! the same continuous-batching engine; `shard` picks a batch task's share of a manifest and `merge` joins the shards'
//! outputs. Only `main` imports this module.

pub mod batch;
pub mod merge;
pub mod oneshot;
pub mod pipeline;
pub mod plan;
pub mod profile;
pub mod serve;
pub mod shard;

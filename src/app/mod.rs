//! Commands: `oneshot` runs image/video/audio/embeds prompts, `batch` runs manifests; both go
//! through `pipeline`. Only `main` imports this module.

pub mod batch;
pub mod oneshot;
pub mod pipeline;
pub mod profile;

//! Commands: `oneshot` runs image/video/audio/embeds prompts. Batch and serve build the same
//! requests. Only `main` imports this module.

pub mod oneshot;

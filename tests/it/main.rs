//! The one integration-test binary: one module per area.

mod cli;
mod llava_e2e;
mod batch;

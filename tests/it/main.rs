//! The one integration-test binary: one module per area.

mod engine_pure;

//! The one integration-test binary: one module per area.

mod hub;
mod source;
mod util_http;

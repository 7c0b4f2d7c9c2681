//! The fuzz targets' checks (see `checks.rs`), a library so that every target shares them.

mod checks;
pub use checks::*;

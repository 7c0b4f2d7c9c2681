//! Reading JSON files (model configs, processor configs, safetensors indexes) with errors that
//! name the file. Bottom level: imports only `error`.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Parses a JSON file; errors name the file.
pub fn read_json(path: &Path) -> Result<Value> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::input(&shown, e.to_string(), "a readable JSON file"))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::input(&shown, format!("invalid JSON: {e}"), "a valid JSON file"))
}

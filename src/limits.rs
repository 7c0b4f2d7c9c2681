//! Cap overrides from the environment (`MMLLM_MAX_*`), shared by every layer that enforces a
//! cap. Imports only `error`.

/// A positive whole number from the environment variable `name`, if set (a cap override).
pub fn env_u64(name: &str) -> crate::error::Result<Option<u64>> {
    match std::env::var(name) {
        Ok(s) => match s.trim().parse::<u64>() {
            Ok(v) if v > 0 => Ok(Some(v)),
            _ => Err(crate::error::Error::usage(format!(
                "environment variable {name}={s:?} is invalid (expected a positive integer)"
            ))),
        },
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(crate::error::Error::usage(format!(
            "environment variable {name} is not valid UTF-8 (expected a positive integer)"
        ))),
    }
}

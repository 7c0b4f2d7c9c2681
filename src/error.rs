//! Error kinds and their exit codes. Owns the user-facing error format
//! `mmllm: error: <input>: <problem> (expected …)`; imports nothing else of the crate.

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line or bad manifest: exit 2.
    #[error("{0}")]
    Usage(String),
    /// A bad input (file, URL, tensor, prompt): exit 2. Names the input and what was expected.
    #[error("{input}: {problem} (expected {expected})")]
    Input {
        input: String,
        problem: String,
        expected: String,
    },
    /// Everything that fails after the inputs were accepted: exit 1.
    #[error(transparent)]
    Runtime(#[from] anyhow::Error),
}

impl Error {
    pub fn input(
        input: impl Into<String>,
        problem: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        Error::Input {
            input: input.into(),
            problem: problem.into(),
            expected: expected.into(),
        }
    }

    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) | Error::Input { .. } => 2,
            Error::Runtime(_) => 1,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Runtime(e.into())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Runtime(e.into())
    }
}

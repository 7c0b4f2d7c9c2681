//! Batch output: result lines in manifest order (or completion order), error lines for failed
//! jobs, and the progress bar on stderr.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

use serde_json::json;

use super::write_line;
use crate::error::{Error, Result};

/// The line a failed job gets: its id and model, and the error's kind and message.
pub fn error_line(id: &str, model: &str, e: &Error) -> String {
    let kind = match e {
        Error::Usage(_) | Error::Input { .. } => "input",
        Error::Runtime(_) => "runtime",
    };
    let message = match e {
        Error::Runtime(err) => format!("{err:#}"),
        other => other.to_string(),
    };
    json!({"id": id, "model": model, "error": {"kind": kind, "message": message}}).to_string()
}

/// Where result lines go: in the order given (jobs' manifest order), or as they finish.
pub struct Output {
    writer: Box<dyn Write>,
    /// Job indices in the order their lines must appear; `None` for completion order.
    order: Option<Vec<usize>>,
    next: usize,
    pending: BTreeMap<usize, String>,
}

impl Output {
    /// Opens `path` (appending with `append`, else truncating) or stdout; lines are written
    /// in the order of `order` (job indices), or as they finish when it is `None`.
    pub fn open(path: Option<&Path>, append: bool, order: Option<Vec<usize>>) -> Result<Self> {
        let writer: Box<dyn Write> = match path {
            Some(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(append)
                    .write(true)
                    .truncate(!append)
                    .open(path)
                    .map_err(|e| {
                        Error::input(
                            path.display().to_string(),
                            format!("cannot open for writing: {e}"),
                            "a writable path",
                        )
                    })?,
            ),
            None => Box::new(std::io::stdout()),
        };
        Ok(Self {
            writer,
            order,
            next: 0,
            pending: BTreeMap::new(),
        })
    }

    /// Job `index` finished with `line`: write it, and any buffered lines now due.
    pub fn finished(&mut self, index: usize, line: String) -> Result<()> {
        let Some(order) = &self.order else {
            return Ok(write_line(&mut self.writer, &line)?);
        };
        self.pending.insert(index, line);
        while let Some(&due) = order.get(self.next) {
            let Some(line) = self.pending.remove(&due) else {
                break;
            };
            write_line(&mut self.writer, &line)?;
            self.next += 1;
        }
        Ok(())
    }
}

/// Jobs done / total, tokens/s and ETA on stderr, only on a terminal.
pub struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    pub fn new(total: usize) -> Self {
        if !std::io::stderr().is_terminal() || total == 0 {
            return Self(None);
        }
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} jobs {msg} eta {eta}")
        {
            bar.set_style(style);
        }
        Self(Some(bar))
    }

    pub fn tick(&self, tokens: usize, started: Instant) {
        if let Some(bar) = &self.0 {
            let rate = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!("{rate:.1} tok/s"));
            bar.inc(1);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

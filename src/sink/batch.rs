//! Batch output: result lines in manifest order (or completion order), error lines for failed
//! jobs, results files read back (for `--resume` and `merge`), and the progress bar on stderr.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::ops::Range;
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
    /// Ordered output to a file: lines finished before their turn also go, at once, to this
    /// spool beside it ([`spool_path`]), so a kill loses no finished result; `--resume`
    /// takes them back. Removed once every line is in the output.
    spool: Option<(std::path::PathBuf, std::fs::File)>,
}

/// Where ordered output to `path` keeps the lines that finished before their turn.
pub fn spool_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".pending");
    std::path::PathBuf::from(name)
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
        let spool = match (path, &order) {
            (Some(path), Some(_)) => {
                let spool = spool_path(path);
                // Like the output: a fresh run must not inherit an old run's early lines.
                let file = OpenOptions::new()
                    .create(true)
                    .append(append)
                    .write(true)
                    .truncate(!append)
                    .open(&spool)
                    .map_err(|e| {
                        Error::input(
                            spool.display().to_string(),
                            format!("cannot open for writing: {e}"),
                            "a writable folder for the results",
                        )
                    })?;
                Some((spool, file))
            }
            _ => None,
        };
        Ok(Self {
            writer,
            order,
            next: 0,
            pending: BTreeMap::new(),
            spool,
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
        if let (Some(line), Some((_, spool))) = (self.pending.get(&index), &mut self.spool) {
            write_line(spool, line)?;
        }
        Ok(())
    }
}

impl Drop for Output {
    /// The spool is no longer needed once nothing waits for its turn.
    fn drop(&mut self) {
        if let Some((path, _)) = &self.spool {
            if self.pending.is_empty() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A results file read back: its complete lines (each naming its job id and whether it is an
/// error line), the complete lines that are not results, and the bytes after the last newline
/// (a line left unfinished by a kill, which every reader ignores).
#[derive(Debug)]
pub struct ResultsFile {
    pub bytes: Vec<u8>,
    pub lines: Vec<ResultLine>,
    /// 1-based numbers of complete lines that are not a JSON object with a string `id`.
    pub malformed: Vec<usize>,
    /// Length of the unfinished last line (0 when the file ends with a newline).
    pub unfinished: usize,
}

/// One complete result line of a [`ResultsFile`].
#[derive(Debug)]
pub struct ResultLine {
    pub id: String,
    /// An `{"id", "error"}` line: the job failed.
    pub error: bool,
    /// 1-based line number in the file.
    pub number: usize,
    range: Range<usize>,
}

impl ResultsFile {
    /// Reads the results file at `path`.
    pub fn read(path: &Path) -> std::io::Result<Self> {
        Ok(Self::parse(std::fs::read(path)?))
    }

    /// Splits `bytes` into result lines.
    pub fn parse(bytes: Vec<u8>) -> Self {
        #[derive(serde::Deserialize)]
        struct Head {
            id: String,
            error: Option<serde::de::IgnoredAny>,
        }
        let complete = bytes
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |end| end + 1);
        let mut lines = Vec::new();
        let mut malformed = Vec::new();
        let mut start = 0;
        for (n, line) in bytes[..complete]
            .split_inclusive(|&b| b == b'\n')
            .enumerate()
        {
            let range = start..start + line.len();
            start = range.end;
            match serde_json::from_slice::<Head>(line) {
                Ok(head) => lines.push(ResultLine {
                    id: head.id,
                    error: head.error.is_some(),
                    number: n + 1,
                    range,
                }),
                Err(_) => malformed.push(n + 1),
            }
        }
        Self {
            unfinished: bytes.len() - complete,
            bytes,
            lines,
            malformed,
        }
    }

    /// The bytes of `line`, with its newline.
    pub fn line(&self, line: &ResultLine) -> &[u8] {
        &self.bytes[line.range.clone()]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_files_split_into_results_errors_bad_and_unfinished_lines() {
        let text = "{\"id\":\"a\",\"text\":\"x\"}\n\
                    {\"id\":\"b\",\"error\":{\"kind\":\"input\",\"message\":\"m\"}}\n\
                    not json\n\
                    {\"id\":7}\n\
                    {\"id\":\"c\",\"text\":\"y\"}\n\
                    {\"id\":\"d\",\"te";
        let file = ResultsFile::parse(text.as_bytes().to_vec());
        let got: Vec<(&str, bool, usize)> = file
            .lines
            .iter()
            .map(|l| (l.id.as_str(), l.error, l.number))
            .collect();
        assert_eq!(got, [("a", false, 1), ("b", true, 2), ("c", false, 5)]);
        assert_eq!(file.malformed, [3, 4]);
        assert_eq!(file.unfinished, "{\"id\":\"d\",\"te".len());
        assert_eq!(
            file.line(&file.lines[2]),
            b"{\"id\":\"c\",\"text\":\"y\"}\n"
        );
        let empty = ResultsFile::parse(Vec::new());
        assert!(empty.lines.is_empty() && empty.unfinished == 0);
    }
}

//! `mmllm merge`: joins the outputs of sharded `mmllm batch` runs into one JSONL file.
//!
//! Every input line is copied byte for byte; one line per job id comes out:
//! - a result line wins over error lines for the same id (a job that failed, then succeeded
//!   on a later run); among several result lines the first (in input order) is kept and the
//!   others are reported as duplicates;
//! - an id with only error lines keeps its last error line, and counts as failed;
//! - a last line left unfinished by a kill is ignored, as `--resume` does, and a complete line
//!   that is not a result is reported and skipped.
//!
//! With `--manifest`, lines follow the manifest's order; jobs with no line are listed as
//! missing; lines for ids the manifest lacks are kept at the end and reported. Without it, ids
//! keep the order in which the inputs first name them. The exit status is 1 when any job is
//! missing or failed, or any line was unknown or unreadable; the merged output is written
//! either way. Inputs are never modified.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use crate::cli::MergeArgs;
use crate::error::{Error, Result};
use crate::manifest;
use crate::sink::batch::ResultsFile;

/// Ids listed in a report before "… and N more".
const SHOWN: usize = 50;

/// The line chosen for one id: (input, line index), and whether it is a result.
#[derive(Clone, Copy)]
struct Pick {
    file: usize,
    line: usize,
    result: bool,
}

pub fn run(args: &MergeArgs) -> Result<()> {
    let manifest_ids: Option<Vec<String>> = match &args.manifest {
        Some(path) => Some(manifest::load(path)?.into_iter().map(|j| j.id).collect()),
        None => None,
    };
    let mut files = Vec::with_capacity(args.inputs.len());
    for path in &args.inputs {
        let file = ResultsFile::read(path).map_err(|e| {
            Error::input(
                path.display().to_string(),
                format!("cannot read: {e}"),
                "a JSONL results file written by `mmllm batch`",
            )
        })?;
        files.push(file);
    }

    let mut problems = Vec::new();
    let mut picks: HashMap<&str, Pick> = HashMap::new();
    let mut first_seen: Vec<&str> = Vec::new();
    let mut duplicates: Vec<&str> = Vec::new();
    let mut superseded = 0usize;
    for (f, (file, path)) in files.iter().zip(&args.inputs).enumerate() {
        if file.unfinished > 0 {
            eprintln!(
                "mmllm: merge: {}: last line unfinished ({} bytes, cut by a kill?), ignored",
                path.display(),
                file.unfinished
            );
        }
        for n in &file.malformed {
            problems.push(format!(
                "{}:{n}: not a result line (expected a JSON object with a string \"id\"), skipped",
                path.display()
            ));
        }
        for (l, line) in file.lines.iter().enumerate() {
            let new = Pick {
                file: f,
                line: l,
                result: !line.error,
            };
            match picks.entry(line.id.as_str()) {
                Entry::Vacant(e) => {
                    e.insert(new);
                    first_seen.push(&line.id);
                }
                Entry::Occupied(mut e) => {
                    let old = e.get_mut();
                    match (old.result, new.result) {
                        (true, true) => duplicates.push(&line.id),
                        (true, false) => superseded += 1,
                        (false, _) => {
                            *old = new;
                            superseded += 1;
                        }
                    }
                }
            }
        }
    }

    let mut missing: Vec<&str> = Vec::new();
    let order: Vec<&str> = match &manifest_ids {
        Some(ids) => {
            let known: HashSet<&str> = ids.iter().map(String::as_str).collect();
            let mut order = Vec::with_capacity(ids.len());
            for id in ids {
                if picks.contains_key(id.as_str()) {
                    order.push(id.as_str());
                } else {
                    missing.push(id);
                }
            }
            let unknown: Vec<&str> = first_seen
                .iter()
                .copied()
                .filter(|id| !known.contains(id))
                .collect();
            if !unknown.is_empty() {
                problems.push(format!(
                    "{} id(s) not in the manifest, kept at the end: {}",
                    unknown.len(),
                    list(&unknown)
                ));
            }
            order.extend(unknown);
            order
        }
        None => first_seen,
    };

    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(Staged::create(path)?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut failed: Vec<&str> = Vec::new();
    for id in &order {
        let pick = picks[id];
        let file = &files[pick.file];
        out.write_all(file.line(&file.lines[pick.line]))?;
        if !pick.result {
            failed.push(id);
        }
    }
    out.flush()?;
    drop(out);
    if let Some(path) = &args.output {
        Staged::commit(path)?;
    }

    eprintln!(
        "mmllm: merge: {} line(s) from {} file(s){}{}{}",
        order.len(),
        files.len(),
        match duplicates.len() {
            0 => String::new(),
            n => format!("; {n} duplicate result line(s) dropped"),
        },
        match superseded {
            0 => String::new(),
            n => format!("; {n} error line(s) superseded"),
        },
        match failed.len() {
            0 => String::new(),
            n => format!("; {n} job(s) failed"),
        },
    );
    if !duplicates.is_empty() {
        eprintln!(
            "mmllm: merge: ids with more than one result (the first kept): {}",
            list(&duplicates)
        );
    }
    if !missing.is_empty() {
        problems.push(format!(
            "{} of {} job(s) have no line in the inputs (missing; rerun their shards with \
             --resume): {}",
            missing.len(),
            manifest_ids.as_ref().map_or(0, Vec::len),
            list(&missing)
        ));
    }
    if !failed.is_empty() {
        problems.push(format!(
            "{} job(s) have only error lines (failed; their error lines are in the output): {}",
            failed.len(),
            list(&failed)
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::Runtime(anyhow::anyhow!(
        "merge: {} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    )))
}

/// Ids, comma-separated, at most [`SHOWN`] of them.
fn list(ids: &[&str]) -> String {
    let mut text = ids
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > SHOWN {
        text.push_str(&format!(" … and {} more", ids.len() - SHOWN));
    }
    text
}

/// The output written beside its final path and renamed into place at the end, so it may be
/// one of the inputs and is never left half written.
struct Staged;

impl Staged {
    fn temp(path: &Path) -> std::path::PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".merge-tmp");
        name.into()
    }

    fn create(path: &Path) -> Result<std::fs::File> {
        std::fs::File::create(Self::temp(path)).map_err(|e| {
            Error::input(
                path.display().to_string(),
                format!("cannot open for writing: {e}"),
                "a writable path",
            )
        })
    }

    fn commit(path: &Path) -> Result<()> {
        Ok(std::fs::rename(Self::temp(path), path)?)
    }
}

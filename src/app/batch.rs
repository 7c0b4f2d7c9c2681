//! `mmllm batch`: a manifest of jobs run model by model (each model loaded once, its jobs
//! decoded together by the engine's continuous-batching scheduler), one JSONL
//! line per job written whole and flushed, in manifest order (or completion order with
//! `--unordered`). A failed job gets an error line and the batch goes on; `--resume` keeps the
//! finished results of an earlier run (repairing a line cut by a kill) and runs the rest. With a
//! shard (`--shard K/N` or an array task's environment, see `shard`) only that shard's jobs run,
//! after the whole manifest is validated.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::pipeline::{self, Resolved};
use super::plan::{MediaInput, Plan};
use super::shard;
use crate::cli::BatchArgs;
use crate::engine::device::DeviceChoice;
use crate::engine::generate::Request;
use crate::engine::scheduler::{self, SchedulerConfig};
use crate::error::{Error, Result};
use crate::manifest::{self, Job};
use crate::media::source::Source;
use crate::sink::batch::{error_line, spool_path, Output, Progress, ResultsFile};
use crate::sink::JsonResult;

/// `--media-root DIR`, resolved.
fn media_root(dir: &Path) -> Result<PathBuf> {
    let resolved = dir.canonicalize().map_err(|e| {
        Error::usage(format!(
            "--media-root {}: {e} (expected an existing directory)",
            dir.display()
        ))
    })?;
    if !resolved.is_dir() {
        return Err(Error::usage(format!(
            "--media-root {}: not a directory (expected a directory)",
            dir.display()
        )));
    }
    Ok(resolved)
}

/// Refuses a job whose local files (media, embeds, extra tensors, chat template) resolve
/// outside `root`, after `..` and symlinks; a directory of frames is checked file by file,
/// since each of its entries may be a link. URLs are left to the fetch rules.
fn confine(s: &manifest::Settings, root: &Path) -> Result<()> {
    let media = [&s.images, &s.videos, &s.audios, &s.embeds]
        .into_iter()
        .flatten()
        .flatten();
    let files = [&s.chat_template, &s.image_grid_thw, &s.image_sizes]
        .into_iter()
        .flatten();
    for item in media.chain(files) {
        let Ok(Source::Path(path)) = Source::parse(item) else {
            continue;
        };
        let outside = |problem: String| {
            Error::input(
                item,
                problem,
                format!("a file inside --media-root {}", root.display()),
            )
        };
        let resolved = path
            .canonicalize()
            .map_err(|e| outside(format!("cannot be resolved ({e})")))?;
        if !resolved.starts_with(root) {
            return Err(outside(format!("resolves to {}", resolved.display())));
        }
        if resolved.is_dir() {
            let entries = std::fs::read_dir(&resolved)
                .map_err(|e| outside(format!("cannot list the directory ({e})")))?;
            for entry in entries.flatten() {
                let inner = entry.path();
                if let Ok(target) = inner.canonicalize() {
                    if !target.starts_with(root) {
                        return Err(outside(format!(
                            "holds {}, which resolves to {}",
                            inner.display(),
                            target.display()
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs the manifest (or this task's shard of it); exit status 1 (as a runtime error) when
/// any job failed.
pub fn run(args: &BatchArgs) -> Result<()> {
    let started = Instant::now();
    let selected = shard::select(args.shard.as_deref(), args.shards, |name| {
        std::env::var(name).ok()
    })?;
    let output = args
        .output
        .as_deref()
        .map(|path| shard::output_path(path, selected.as_ref().map(|s| s.shard)))
        .transpose()?;
    if let Some(out) = &output {
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same(out, &args.manifest) {
            return Err(Error::usage(format!(
                "-o {}: names the manifest itself (expected another file for the results)",
                out.display()
            )));
        }
    }
    let jobs = manifest::load(&args.manifest)?;
    let device = DeviceChoice::parse(&args.device)?;
    let name = args.manifest.display().to_string();
    let root = args.media_root.as_deref().map(media_root).transpose()?;
    let fetch = crate::media::source::FetchPolicy {
        allow_private: args.allow_private_media_urls,
        ..Default::default()
    };
    let mut plans = Vec::with_capacity(jobs.len());
    let mut problems = Vec::new();
    for job in &jobs {
        // Checked before the plan reads any file (a chat template is read there).
        let confined = match &root {
            Some(root) => confine(&job.settings, root),
            None => Ok(()),
        };
        match confined.and_then(|()| Plan::from_job(job, device, args.dtype.into(), &fetch)) {
            Ok(plan) => plans.push(plan),
            Err(e) => problems.push(format!("  {name}:{}: job {:?}: {e}", job.line, job.id)),
        }
    }
    if !problems.is_empty() {
        return Err(Error::usage(format!(
            "{name}: {} job(s) with invalid settings (expected values the matching flags accept):\n{}",
            problems.len(),
            problems.join("\n")
        )));
    }

    let mine = shard::jobs_of(selected.as_ref(), &jobs, output.as_deref());
    let done: HashSet<String> = match (&output, args.resume) {
        (Some(path), true) => repair_and_read(path)?,
        (Some(path), false) => {
            // Overwriting is what -o means; say so when it throws results away.
            if let Ok(old) = ResultsFile::read(path) {
                if !old.lines.is_empty() {
                    eprintln!(
                        "mmllm: {}: replacing {} earlier result line(s) (--resume keeps them)",
                        path.display(),
                        old.lines.len()
                    );
                }
            }
            HashSet::new()
        }
        _ => HashSet::new(),
    };
    let todo: Vec<usize> = mine
        .iter()
        .copied()
        .filter(|&i| !done.contains(&jobs[i].id))
        .collect();
    if !done.is_empty() {
        eprintln!(
            "mmllm: resuming: {} of {} job(s) already have results",
            mine.len() - todo.len(),
            mine.len()
        );
    }

    // Models in order of first use; resolving reads only config.json.
    let mut models: Vec<(String, Vec<usize>)> = Vec::new();
    for &i in &todo {
        let model = jobs[i].model().to_string();
        match models.iter_mut().find(|(m, _)| *m == model) {
            Some((_, list)) => list.push(i),
            None => models.push((model, vec![i])),
        }
    }
    let mut resolved: BTreeMap<String, Result<Resolved>> = BTreeMap::new();
    for (model, _) in &models {
        resolved.insert(model.clone(), pipeline::resolve(model));
    }

    let mut no_stdin = std::io::empty();
    if args.strict {
        let mut problems = Vec::new();
        for &i in &todo {
            let check = match &resolved[jobs[i].model()] {
                Ok(r) => pipeline::prepare_media(&plans[i], r, &mut no_stdin).map(|_| ()),
                Err(e) => Err(Error::usage(e.to_string())),
            };
            if let Err(e) = check {
                problems.push(format!(
                    "  {name}:{}: job {:?}: {e}",
                    jobs[i].line, jobs[i].id
                ));
            }
        }
        if !problems.is_empty() {
            return Err(Error::usage(format!(
                "{name}: --strict: {} job(s) with bad media or models (expected every job to be runnable):\n{}",
                problems.len(),
                problems.join("\n")
            )));
        }
    }

    let order = (!args.unordered).then(|| todo.clone());
    let out = Output::open(output.as_deref(), args.resume, order)?;
    let mut tally = Tally {
        out,
        progress: Progress::new(todo.len()),
        started,
        failed: 0,
        tokens: 0,
    };
    for (model, indices) in &models {
        match &resolved[model] {
            Err(e) => {
                for &i in indices {
                    tally.finished(&jobs[i], i, Err(Error::usage(e.to_string())))?;
                }
            }
            Ok(r) => run_model(args, r, indices, &jobs, &plans, &mut tally)?,
        }
    }
    let Tally {
        progress,
        failed,
        tokens,
        ..
    } = tally;
    progress.finish();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "mmllm: batch: {} job(s) run, {failed} failed, {} skipped; {tokens} tokens in {secs:.1} s ({:.1} tokens/s)",
        todo.len(),
        mine.len() - todo.len(),
        tokens as f64 / secs.max(1e-9)
    );
    if failed > 0 {
        return Err(Error::Runtime(anyhow::anyhow!(
            "{failed} of {} job(s) failed (their lines in the output carry the errors)",
            todo.len()
        )));
    }
    Ok(())
}

/// Bytes of KV cache the sequences of one model may reserve together; with `--max-seqs`
/// this bounds how many run at once (a request larger than this still runs, alone).
const KV_BUDGET_BYTES: usize = 8 << 30;

/// Runs the jobs `indices` of one model through the scheduler. The model loads once the
/// first job's media is ready (a batch whose media all fail never loads it); later jobs'
/// media are decoded and encoded only as room frees up in the batch.
fn run_model(
    args: &BatchArgs,
    resolved: &Resolved,
    indices: &[usize],
    jobs: &[Job],
    plans: &[Plan],
    tally: &mut Tally,
) -> Result<()> {
    let mut no_stdin = std::io::empty();
    let mut todo = indices.iter().copied();
    let mut first = None;
    for i in todo.by_ref() {
        match pipeline::prepare_media(&plans[i], resolved, &mut no_stdin) {
            Ok(media) => {
                first = Some((i, media));
                break;
            }
            Err(e) => tally.finished(&jobs[i], i, Err(e))?,
        }
    }
    let Some(first) = first else {
        return Ok(());
    };
    let plan = &plans[first.0];
    let loaded = match pipeline::load(resolved, plan.device, plan.dtype) {
        Ok(loaded) => loaded,
        Err(e) => {
            let message = format!("loading {}: {e}", resolved.name);
            tally.finished(
                &jobs[first.0],
                first.0,
                Err(Error::Runtime(anyhow::anyhow!("{message}"))),
            )?;
            for i in todo {
                let result = pipeline::prepare_media(&plans[i], resolved, &mut no_stdin)
                    .and_then(|_| Err(Error::Runtime(anyhow::anyhow!("{message}"))));
                tally.finished(&jobs[i], i, result)?;
            }
            return Ok(());
        }
    };

    let per_position = loaded.model.new_cache(1)?.bytes_per_position().max(1);
    let config = SchedulerConfig {
        max_seqs: args.max_seqs.max(1),
        max_kv_positions: (KV_BUDGET_BYTES / per_position).max(1),
    };
    // Jobs are prepared a group at a time (up to --max-seqs) so that their media go through
    // the encoder together where the family can stack them; the scheduler then pulls the
    // ready requests one by one as room frees up. Media files are read and decoded on a worker
    // thread, up to a group ahead, so that decoding (a 12-MP JPEG takes tens of ms) overlaps
    // the running decode steps instead of stalling them.
    let group = config.max_seqs;
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(group);
        scope.spawn(move || {
            let mut no_stdin = std::io::empty();
            for i in todo {
                let media = pipeline::prepare_media(&plans[i], resolved, &mut no_stdin);
                // The receiver is gone when the run stopped early.
                if tx.send((i, media)).is_err() {
                    break;
                }
            }
        });
        let mut first = Some(first);
        let mut ready: VecDeque<(usize, Result<Request>)> = VecDeque::new();
        let mut requests = std::iter::from_fn(|| {
            if ready.is_empty() {
                let mut prepared: Vec<(usize, Result<Vec<MediaInput>>)> = Vec::new();
                if let Some((i, media)) = first.take() {
                    prepared.push((i, Ok(media)));
                }
                while prepared.len() < group {
                    let Ok(next) = rx.recv() else {
                        break;
                    };
                    prepared.push(next);
                }
                let ok: Vec<(&Plan, &[MediaInput])> = prepared
                    .iter()
                    .filter_map(|(i, m)| m.as_ref().ok().map(|m| (&plans[*i], m.as_slice())))
                    .collect();
                let built = pipeline::requests_batched(resolved, &loaded, &ok);
                drop(ok);
                let mut built = built.into_iter();
                for (i, media) in prepared {
                    let request = match media {
                        Ok(_) => built.next().unwrap_or_else(|| {
                            Err(Error::Runtime(anyhow::anyhow!(
                                "no request built for job {i}"
                            )))
                        }),
                        Err(e) => Err(e),
                    };
                    ready.push_back((i, request));
                }
            }
            ready.pop_front()
        });
        scheduler::run(
            loaded.model.as_ref(),
            &loaded.tokenizer,
            config,
            &mut requests,
            &mut |i, done| {
                let plan = &plans[i];
                let line = done.and_then(|done| {
                    let line = serde_json::to_string(&JsonResult::new(
                        &plan.id,
                        &plan.model,
                        &done,
                        loaded.load_s,
                    ))
                    .map_err(|e| Error::Runtime(e.into()))?;
                    Ok((line, done.token_ids.len()))
                });
                tally.finished(&jobs[i], i, line)
            },
        )?;
        Ok(())
    })
}

/// Lines written so far, failures and generated tokens.
struct Tally {
    out: Output,
    progress: Progress,
    started: Instant,
    failed: usize,
    tokens: usize,
}

impl Tally {
    /// Job `i` finished with its result line and token count, or an error.
    fn finished(&mut self, job: &Job, i: usize, result: Result<(String, usize)>) -> Result<()> {
        let line = match result {
            Ok((line, n)) => {
                self.tokens += n;
                line
            }
            Err(e) => {
                self.failed += 1;
                error_line(&job.id, job.model(), &e)
            }
        };
        self.out.finished(i, line)?;
        self.progress.tick(self.tokens, self.started);
        Ok(())
    }
}

/// Reads an earlier output for `--resume`: cuts a last line left unfinished by a kill, drops
/// error lines (those jobs run again) and repeated ids, and returns the ids that have results.
/// The file is rewritten through a temporary file and a rename, so a second kill cannot lose
/// lines.
fn repair_and_read(path: &Path) -> Result<HashSet<String>> {
    let read = |path: &Path| match ResultsFile::read(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::input(
            path.display().to_string(),
            format!("cannot read for --resume: {e}"),
            "a readable JSONL results file",
        )),
    };
    let spool = spool_path(path);
    let files = [read(path)?, read(&spool)?];
    let mut keep = Vec::new();
    let mut ids = HashSet::new();
    // The output's lines first, then those an ordered run finished early (its spool).
    for file in files.iter().flatten() {
        if !file.malformed.is_empty() {
            eprintln!(
                "mmllm: {}: --resume drops {} line(s) that are not results (lines {:?})",
                path.display(),
                file.malformed.len(),
                file.malformed
            );
        }
        for line in &file.lines {
            if !line.error && ids.insert(line.id.clone()) {
                keep.extend_from_slice(file.line(line));
            }
        }
    }
    let unchanged = matches!(&files, [Some(out), None] if out.bytes == keep);
    if !unchanged && (files[0].is_some() || !keep.is_empty()) {
        let tmp = path.with_extension("jsonl.resume-tmp");
        std::fs::write(&tmp, &keep)?;
        std::fs::rename(&tmp, path)?;
    }
    if files[1].is_some() {
        std::fs::remove_file(&spool)?;
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str) -> String {
        format!("{{\"id\":\"{id}\",\"text\":\"t\"}}")
    }

    #[test]
    fn results_finished_early_survive_a_kill_and_resume_takes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        // An old killed run's spool: a fresh run (no --resume) must not inherit it.
        std::fs::write(spool_path(&path), format!("{}\n", line("z"))).unwrap();
        let mut out = Output::open(Some(&path), false, Some(vec![0, 1, 2])).unwrap();
        out.finished(2, line("c")).unwrap();
        out.finished(1, line("b")).unwrap();
        // Killed here: job 0 never finished, nothing is in the output yet.
        std::mem::forget(out);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        let ids = repair_and_read(&path).unwrap();
        assert_eq!(ids, HashSet::from(["b".to_string(), "c".to_string()]));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{}\n{}\n", line("c"), line("b")));
        assert!(!spool_path(&path).exists());

        // A run that finishes leaves no spool behind.
        let mut out = Output::open(Some(&path), true, Some(vec![0, 1])).unwrap();
        out.finished(1, line("e")).unwrap();
        out.finished(0, line("d")).unwrap();
        drop(out);
        assert!(!spool_path(&path).exists());
        let ids = repair_and_read(&path).unwrap();
        assert_eq!(ids.len(), 4);
    }
}

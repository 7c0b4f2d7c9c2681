//! `mmllm batch --shard K/N`: which jobs of a manifest one array task runs, and where the shard
//! number comes from (`--shard`, a Slurm job array, a Kubernetes Indexed Job).
//!
//! The partition is by job id alone: a job belongs to shard `fnv1a64(id) mod N`, where
//! `fnv1a64` is 64-bit FNV-1a over the id's UTF-8 bytes. Every task computes the same split
//! without talking to the others, the split does not depend on the order of the manifest or on
//! the other jobs in it (jobs appended later leave every earlier job in its shard), and it never
//! changes between versions (the unit tests pin it).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::manifest::Job;

/// Shard `index` of `count` (0-based, `index < count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Whether the job `id` belongs to this shard.
    pub fn contains(&self, id: &str) -> bool {
        fnv1a64(id.as_bytes()) % self.count as u64 == self.index as u64
    }

    /// What `{shard}` in an output path becomes: `K-of-N`, with K zero-padded to the width of
    /// N-1 so that the files of one run sort in shard order (`03-of-12`).
    pub fn label(&self) -> String {
        let width = (self.count - 1).to_string().len();
        format!("{:0width$}-of-{}", self.index, self.count)
    }
}

/// 64-bit FNV-1a: stable across platforms, versions and runs (unlike Rust's `Hash`).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The shard a run takes and where it came from (for the log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    pub shard: Shard,
    pub source: String,
}

const EXPECTED_FLAG: &str = "K/N with whole numbers 0 <= K < N, e.g. --shard 0/4 … 3/4";

/// The shard of this run, `None` when the run is not sharded. `--shard K/N` wins; otherwise a
/// Slurm array task (see [`slurm`]), then a Kubernetes Indexed Job (`JOB_COMPLETION_INDEX` of
/// `--shards N` or `MMLLM_SHARDS=N`; the flag wins). A count with no index is an error. `env`
/// reads a variable (an empty one counts as unset).
pub fn select(
    flag: Option<&str>,
    shards: Option<usize>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Selected>> {
    if let Some(text) = flag {
        let shard = parse_flag(text)?;
        return Ok(Some(Selected {
            shard,
            source: format!("--shard {text}"),
        }));
    }
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    let count_override = match (shards, var("MMLLM_SHARDS")) {
        (Some(n), _) => Some((n, format!("--shards {n}"))),
        (None, Some(v)) => Some((
            number(
                "MMLLM_SHARDS",
                &v,
                "the number of shards, a whole number of at least 1",
            )
            .and_then(|n| at_least_one("MMLLM_SHARDS", &v, n))?,
            format!("MMLLM_SHARDS={v}"),
        )),
        (None, None) => None,
    };
    if let Some(id) = var("SLURM_ARRAY_TASK_ID") {
        return slurm(&id, &var, count_override).map(Some);
    }
    if let Some(index) = var("JOB_COMPLETION_INDEX") {
        let k = number(
            "JOB_COMPLETION_INDEX",
            &index,
            "the completion index Kubernetes sets, a whole number",
        )?;
        let Some((n, from)) = count_override else {
            return Err(Error::input(
                format!("JOB_COMPLETION_INDEX={index}"),
                "the number of shards is not given",
                "--shards N or MMLLM_SHARDS=N with the Indexed Job's `completions`, or --shard K/N",
            ));
        };
        let shard = within(k, n, &format!("JOB_COMPLETION_INDEX={index}"), &from)?;
        return Ok(Some(Selected {
            shard,
            source: format!("JOB_COMPLETION_INDEX={index} and {from}"),
        }));
    }
    if let Some((_, from)) = count_override {
        return Err(Error::input(
            from,
            "a number of shards but no shard index",
            "SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX in the environment (an array task), or \
             --shard K/N",
        ));
    }
    Ok(None)
}

/// `--shard K/N`.
fn parse_flag(text: &str) -> Result<Shard> {
    let input = format!("--shard {text}");
    let bad = |problem: &str| Error::input(&input, problem, EXPECTED_FLAG);
    let (k, n) = text
        .split_once('/')
        .ok_or_else(|| bad("not of the form K/N"))?;
    let (Ok(k), Ok(n)) = (k.trim().parse::<usize>(), n.trim().parse::<usize>()) else {
        return Err(bad("K or N is not a whole number"));
    };
    if n == 0 {
        return Err(bad("a count of 0 shards"));
    }
    if k >= n {
        return Err(bad(&format!(
            "shard {k} does not exist among {n} (they are numbered from 0)"
        )));
    }
    Ok(Shard { index: k, count: n })
}

/// A Slurm array task. Without a count of its own, the array numbers the shards: shard
/// `SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN` of `SLURM_ARRAY_TASK_COUNT` (or MIN..MAX)
/// tasks, which must be contiguous (`--array=0-15`, `1-16`). With `--shards N` or
/// `MMLLM_SHARDS=N`, the task id is the shard index (0-based) and the array may be any subset
/// of `0..N-1`, as when a few tasks are run again (`--array=3,7`).
fn slurm(
    id: &str,
    var: &dyn Fn(&str) -> Option<String>,
    count_override: Option<(usize, String)>,
) -> Result<Selected> {
    const ID: &str = "SLURM_ARRAY_TASK_ID";
    let whole = "a whole number, as Slurm sets it";
    let task = number(ID, id, whole)?;
    let read = |name: &str| -> Result<Option<(usize, String)>> {
        match var(name) {
            Some(v) => Ok(Some((number(name, &v, whole)?, v))),
            None => Ok(None),
        }
    };
    let min = read("SLURM_ARRAY_TASK_MIN")?;
    let max = read("SLURM_ARRAY_TASK_MAX")?;
    let count = read("SLURM_ARRAY_TASK_COUNT")?;

    if let Some((n, from)) = count_override {
        if let Some((m, v)) = max.filter(|(m, _)| *m >= n) {
            return Err(Error::input(
                format!("SLURM_ARRAY_TASK_MAX={v}"),
                format!("task ids go up to {m}, but {from} makes {n} shards"),
                format!(
                    "an array within 0-{} (with {from}, the task id is the shard index)",
                    n - 1
                ),
            ));
        }
        let source = format!("{ID}={id}");
        let shard = within(task, n, &source, &from)?;
        return Ok(Selected {
            shard,
            source: format!("{source}, {from}"),
        });
    }

    let first = min.as_ref().map_or(0, |(m, _)| *m);
    let mut source = format!("{ID}={id}");
    if let Some((_, v)) = &min {
        source.push_str(&format!(", SLURM_ARRAY_TASK_MIN={v}"));
    }
    let span = match &max {
        Some((m, v)) if *m >= first => Some((m - first + 1, format!("SLURM_ARRAY_TASK_MAX={v}"))),
        Some((_, v)) => {
            return Err(Error::input(
                format!("SLURM_ARRAY_TASK_MAX={v}"),
                format!("below SLURM_ARRAY_TASK_MIN={first}"),
                "the array's last task id, at least its first",
            ))
        }
        None => None,
    };
    let (n, from) = match (&count, &span) {
        (Some((c, v)), Some((s, max_text))) if c != s => {
            return Err(Error::input(
                format!("SLURM_ARRAY_TASK_COUNT={v}"),
                format!(
                    "{c} tasks, but task ids {first}..{} ({max_text}) span {s}",
                    first + s - 1
                ),
                "a contiguous array such as --array=0-7, or --shards N with task ids that are                  shard indices",
            ));
        }
        (Some((c, v)), _) => (*c, format!("SLURM_ARRAY_TASK_COUNT={v}")),
        (None, Some((s, max_text))) => (*s, max_text.clone()),
        (None, None) => {
            return Err(Error::input(
                source,
                "the number of array tasks is not set",
                "SLURM_ARRAY_TASK_COUNT or SLURM_ARRAY_TASK_MAX as Slurm sets them, --shards N, \
                 or --shard K/N",
            ))
        }
    };
    if n == 0 {
        return Err(Error::input(from, "zero array tasks", "at least 1"));
    }
    if task < first {
        return Err(Error::input(
            source,
            format!("task id {task} is below the array's first id {first}"),
            "SLURM_ARRAY_TASK_ID within SLURM_ARRAY_TASK_MIN..SLURM_ARRAY_TASK_MAX",
        ));
    }
    let shard = within(task - first, n, &source, &from)?;
    Ok(Selected {
        shard,
        source: format!("{source}, {from}"),
    })
}

/// Shard `k` of `n`, or an error naming where each came from.
fn within(k: usize, n: usize, index_from: &str, count_from: &str) -> Result<Shard> {
    if k >= n {
        return Err(Error::input(
            index_from,
            format!("shard {k} does not exist among {n} ({count_from}; numbered from 0)"),
            "an index below the number of shards",
        ));
    }
    Ok(Shard { index: k, count: n })
}

fn number(name: &str, value: &str, expected: &str) -> Result<usize> {
    value
        .trim()
        .parse()
        .map_err(|_| Error::input(format!("{name}={value}"), "not a whole number", expected))
}

fn at_least_one(name: &str, value: &str, n: usize) -> Result<usize> {
    if n == 0 {
        return Err(Error::input(
            format!("{name}={value}"),
            "zero shards",
            "the number of shards, at least 1",
        ));
    }
    Ok(n)
}

/// Indices of the jobs a run takes: every job unsharded, else the shard's, in manifest order.
/// The choice, its source and the output file are logged on stderr.
pub fn jobs_of(selected: Option<&Selected>, jobs: &[Job], output: Option<&Path>) -> Vec<usize> {
    let Some(s) = selected else {
        return (0..jobs.len()).collect();
    };
    let mine: Vec<usize> = (0..jobs.len())
        .filter(|&i| s.shard.contains(&jobs[i].id))
        .collect();
    eprintln!(
        "mmllm: shard {}/{} (from {}): {} of {} job(s){}",
        s.shard.index,
        s.shard.count,
        s.source,
        mine.len(),
        jobs.len(),
        output
            .map(|p| format!(", writing {}", p.display()))
            .unwrap_or_default()
    );
    mine
}

/// The output path with `{shard}` replaced by the shard's label; `{shard}` in a run that is
/// not sharded is an error (a task that lost its array variables must not run every job).
pub fn output_path(path: &Path, shard: Option<Shard>) -> Result<PathBuf> {
    let Some(text) = path.to_str().filter(|t| t.contains("{shard}")) else {
        return Ok(path.to_path_buf());
    };
    match shard {
        Some(shard) => Ok(PathBuf::from(text.replace("{shard}", &shard.label()))),
        None => Err(Error::input(
            format!("-o {text}"),
            "the path names {shard} but this run is not sharded",
            "--shard K/N, or SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX (with --shards N) in \
             the environment",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn pick(flag: Option<&str>, shards: Option<usize>, vars: &[(&str, &str)]) -> Shard {
        select(flag, shards, env(vars)).unwrap().unwrap().shard
    }

    /// Asserts a usage error that says each of `says`.
    fn usage(flag: Option<&str>, shards: Option<usize>, vars: &[(&str, &str)], says: &[&str]) {
        let e = select(flag, shards, env(vars)).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        let e = e.to_string();
        for part in says {
            assert!(e.contains(part), "{part:?} in {e}");
        }
    }

    #[test]
    fn the_hash_is_pinned() {
        // FNV-1a 64 reference values; a change here re-shards every existing run.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
        let owners: Vec<usize> = ["cat", "job0", "job1", "été"]
            .iter()
            .map(|id| {
                (0..7)
                    .find(|&k| Shard { index: k, count: 7 }.contains(id))
                    .unwrap()
            })
            .collect();
        assert_eq!(owners, [2, 4, 0, 1]);
    }

    #[test]
    fn every_id_is_in_exactly_one_shard() {
        for n in [1, 2, 3, 7, 16] {
            for i in 0..200 {
                let id = format!("job{i}");
                let owners = (0..n)
                    .filter(|&k| Shard { index: k, count: n }.contains(&id))
                    .count();
                assert_eq!(owners, 1, "{id} of {n}");
            }
        }
    }

    #[test]
    fn labels_sort_in_shard_order() {
        let label = |index, count| Shard { index, count }.label();
        assert_eq!(label(0, 1), "0-of-1");
        assert_eq!(label(3, 7), "3-of-7");
        assert_eq!(label(3, 12), "03-of-12");
        assert_eq!(label(9, 10), "9-of-10");
        assert_eq!(label(42, 100), "42-of-100");
        let p = output_path(
            Path::new("out/r-{shard}.jsonl"),
            Some(Shard {
                index: 2,
                count: 12,
            }),
        );
        assert_eq!(p.unwrap(), PathBuf::from("out/r-02-of-12.jsonl"));
        assert_eq!(
            output_path(Path::new("plain.jsonl"), None).unwrap(),
            PathBuf::from("plain.jsonl")
        );
        let e = output_path(Path::new("r-{shard}.jsonl"), None).unwrap_err();
        assert!(e.to_string().contains("not sharded"), "{e}");
    }

    #[test]
    fn the_flag_wins_and_bad_values_name_the_flag() {
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ];
        assert_eq!(
            pick(Some("2/3"), None, &slurm),
            Shard { index: 2, count: 3 }
        );
        assert!(select(None, None, env(&[])).unwrap().is_none());
        for (bad, says) in [
            ("3", "not of the form K/N"),
            ("a/b", "K or N is not a whole number"),
            ("-1/3", "K or N is not a whole number"),
            ("3/3", "shard 3 does not exist among 3"),
            ("0/0", "a count of 0 shards"),
        ] {
            usage(
                Some(bad),
                None,
                &[],
                &[&format!("--shard {bad}: {says}"), "(expected K/N"],
            );
        }
    }

    #[test]
    fn slurm_arrays() {
        let s = |k, n| Shard { index: k, count: n };
        let vars = [
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "6"),
            ("SLURM_ARRAY_TASK_COUNT", "7"),
        ];
        assert_eq!(pick(None, None, &vars), s(5, 7));
        // --array=1-7: ids from 1.
        let from1 = [
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "7"),
        ];
        assert_eq!(pick(None, None, &from1), s(0, 7));
        let count_only = [
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        assert_eq!(pick(None, None, &count_only), s(2, 3));
        assert_eq!(pick(None, Some(3), &count_only), s(2, 3));
        let id_only = [("SLURM_ARRAY_TASK_ID", "2")];
        assert_eq!(pick(None, Some(3), &id_only), s(2, 3));
        // Rerunning tasks 3 and 7 of 8 (--array=3,7) with MMLLM_SHARDS=8: the id is the index.
        let rerun = [
            ("SLURM_ARRAY_TASK_ID", "7"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
            ("SLURM_ARRAY_TASK_MAX", "7"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
            ("MMLLM_SHARDS", "8"),
        ];
        assert_eq!(pick(None, None, &rerun), s(7, 8));
        assert_eq!(pick(None, Some(8), &rerun[..4]), s(7, 8));
        let sel = select(None, None, env(&vars)).unwrap().unwrap();
        assert!(
            sel.source.contains("SLURM_ARRAY_TASK_ID=5"),
            "{}",
            sel.source
        );
        assert!(
            sel.source.contains("SLURM_ARRAY_TASK_COUNT=7"),
            "{}",
            sel.source
        );

        // --array=0-15:4 sets COUNT=4 with ids 0..12: not shard numbers.
        let stepped = [
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "12"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ];
        usage(
            None,
            None,
            &stepped,
            &["SLURM_ARRAY_TASK_COUNT=4: 4 tasks", "contiguous"],
        );
        usage(None, None, &id_only, &["number of array tasks is not set"]);
        usage(
            None,
            Some(7),
            &rerun[..4],
            &["SLURM_ARRAY_TASK_MAX=7: task ids go up to 7, but --shards 7"],
        );
        usage(
            None,
            Some(2),
            &count_only,
            &["shard 2 does not exist among 2 (--shards 2"],
        );
        usage(
            None,
            None,
            &[("SLURM_ARRAY_TASK_ID", "x")],
            &["SLURM_ARRAY_TASK_ID=x: not a whole number"],
        );
        usage(
            None,
            None,
            &[
                ("SLURM_ARRAY_TASK_ID", "0"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
            ],
            &["below the array's first id 1"],
        );
        usage(
            None,
            None,
            &[
                ("SLURM_ARRAY_TASK_ID", "3"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
            ],
            &["shard 3 does not exist among 3"],
        );
    }

    #[test]
    fn kubernetes_indexed_jobs() {
        let s = |k, n| Shard { index: k, count: n };
        let idx = [("JOB_COMPLETION_INDEX", "4")];
        assert_eq!(pick(None, Some(7), &idx), s(4, 7));
        let with_env = [("JOB_COMPLETION_INDEX", "4"), ("MMLLM_SHARDS", "7")];
        assert_eq!(pick(None, None, &with_env), s(4, 7));
        assert_eq!(
            pick(None, Some(5), &with_env),
            s(4, 5),
            "--shards over MMLLM_SHARDS"
        );
        let sel = select(None, None, env(&with_env)).unwrap().unwrap();
        assert_eq!(sel.source, "JOB_COMPLETION_INDEX=4 and MMLLM_SHARDS=7");

        usage(
            None,
            None,
            &idx,
            &["JOB_COMPLETION_INDEX=4: the number of shards is not given"],
        );
        usage(
            None,
            Some(4),
            &idx,
            &["shard 4 does not exist among 4 (--shards 4"],
        );
        usage(
            None,
            None,
            &[("JOB_COMPLETION_INDEX", "4"), ("MMLLM_SHARDS", "0")],
            &["MMLLM_SHARDS=0: zero shards"],
        );
        usage(
            None,
            None,
            &[("JOB_COMPLETION_INDEX", "4"), ("MMLLM_SHARDS", "many")],
            &["MMLLM_SHARDS=many: not a whole number"],
        );
        usage(
            None,
            Some(3),
            &[],
            &["--shards 3: a number of shards but no shard index"],
        );
        // Empty variables count as unset.
        assert!(select(None, None, env(&[("JOB_COMPLETION_INDEX", "")]))
            .unwrap()
            .is_none());
    }
}

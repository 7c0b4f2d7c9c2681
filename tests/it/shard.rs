//! Batch beyond one machine: `mmllm batch --shard K/N` (or the shard a Slurm array task or a
//! Kubernetes Indexed Job pod is given), `{shard}` in `-o`, `--resume` per shard after
//! `kill -9`, and `mmllm merge` putting the shards back together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use mmllm::app::shard::Shard;
use serde_json::Value;

use crate::util::{mmllm, read_jsonl, repo};

const JOBS: usize = 100;

fn id(i: usize) -> String {
    format!("job{i:03}")
}

fn all_ids() -> Vec<String> {
    (0..JOBS).map(id).collect()
}

/// The ids of shard `k` of `n`, in manifest order.
fn shard_ids(k: usize, n: usize) -> Vec<String> {
    let shard = Shard { index: k, count: n };
    all_ids()
        .into_iter()
        .filter(|i| shard.contains(i))
        .collect()
}

/// A temp dir with a manifest of 100 jobs for the tiny LLaVA: short prompts, 2 tokens each,
/// the photos on every 20th job (the rest text only, so that the whole batch takes seconds).
/// With `media: false` every job names a missing image instead: each fails at once with an
/// error line and no model loads, which is all a test of which jobs a shard takes needs.
fn workspace(media: bool) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for name in ["llava_photo_1.jpg", "llava_photo_2.jpg"] {
        std::fs::copy(repo().join("tests/data").join(name), dir.path().join(name)).unwrap();
    }
    let mut text = format!(
        "defaults:\n  model: {}\n  max_tokens: 2\njobs:\n",
        repo().join("tests/fixtures/llava-tiny").display()
    );
    for i in 0..JOBS {
        text.push_str(&format!("  - id: {}\n    prompt: Tag {i}.\n", id(i)));
        if !media {
            text.push_str("    images: [missing.jpg]\n");
        } else if i % 20 == 0 {
            text.push_str(&format!(
                "    images: [llava_photo_{}.jpg]\n",
                1 + i / 20 % 2
            ));
        }
    }
    let path = dir.path().join("jobs.yaml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// `mmllm batch MANIFEST ARGS` with the variables `env` set (and `--max-seqs 16` unless
/// `args` set it).
fn batch(manifest: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = mmllm();
    c.arg("batch")
        .arg(manifest)
        .args(args)
        .envs(env.iter().copied());
    if !args.contains(&"--max-seqs") {
        c.args(["--max-seqs", "16"]);
    }
    c
}

fn merge(inputs: &[PathBuf], args: &[&str]) -> Output {
    mmllm()
        .arg("merge")
        .args(inputs)
        .args(args)
        .output()
        .unwrap()
}

/// `mmllm merge INPUTS --manifest MANIFEST -o OUT`.
fn merge_into(inputs: &[PathBuf], manifest: &Path, out: &Path) -> Output {
    merge(
        inputs,
        &["--manifest", path_str(manifest), "-o", path_str(out)],
    )
}

fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect()
}

/// The lines without `timing`, the only field that differs from run to run.
fn untimed(mut lines: Vec<Value>) -> Vec<Value> {
    for l in &mut lines {
        l.as_object_mut().unwrap().remove("timing");
    }
    lines
}

/// Each line of the files with how often it occurs.
fn line_counts(texts: &[String]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for line in texts.iter().flat_map(|t| t.lines()) {
        *counts.entry(line).or_default() += 1;
    }
    counts
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn shards_of_1_3_and_7_merge_back_into_the_single_run() {
    let (dir, manifest) = workspace(true);
    let single = dir.path().join("single.jsonl");
    succeeded(
        &batch(&manifest, &["-o", path_str(&single)], &[])
            .output()
            .unwrap(),
    );
    let single = read_jsonl(&single);
    assert_eq!(ids(&single), all_ids());

    for n in [1usize, 3, 7] {
        let pattern = dir.path().join(format!("n{n}-{{shard}}.jsonl"));
        let shard_flags: Vec<String> = (0..n).map(|k| format!("{k}/{n}")).collect();
        // The tasks of one N run at once, as array tasks do.
        let children: Vec<_> = shard_flags
            .iter()
            .map(|flag| {
                batch(&manifest, &["--shard", flag, "-o", path_str(&pattern)], &[])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            succeeded(&child.wait_with_output().unwrap());
        }
        // `{shard}` is K-of-N; each file holds exactly its shard's jobs, in manifest order.
        let files: Vec<PathBuf> = (0..n)
            .map(|k| dir.path().join(format!("n{n}-{k}-of-{n}.jsonl")))
            .collect();
        for (k, file) in files.iter().enumerate() {
            let got = ids(&read_jsonl(file));
            assert_eq!(got, shard_ids(k, n), "shard {k}/{n}");
            assert!(!got.is_empty(), "shard {k}/{n} is empty: a poor split");
        }

        // Merged with the manifest: the single run, line for line (but for timing), and each
        // line byte for byte one of the shards' lines.
        let merged = dir.path().join(format!("merged-{n}.jsonl"));
        let out = merge_into(&files, &manifest, &merged);
        succeeded(&out);
        assert!(out.stdout.is_empty());
        assert_eq!(
            untimed(read_jsonl(&merged)),
            untimed(single.clone()),
            "N = {n}"
        );
        let shard_texts: Vec<String> = files
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect();
        let merged_text = std::fs::read_to_string(&merged).unwrap();
        assert_eq!(
            line_counts(std::slice::from_ref(&merged_text)),
            line_counts(&shard_texts)
        );

        // Without the manifest: to stdout, in input order.
        let out = merge(&files, &[]);
        succeeded(&out);
        assert_eq!(String::from_utf8(out.stdout).unwrap(), shard_texts.concat());
    }

    // A shard missing from the merge: exit 1, naming every job of that shard, and the rest
    // merged anyway.
    let files: Vec<PathBuf> = (0..7)
        .filter(|&k| k != 3)
        .map(|k| dir.path().join(format!("n7-{k}-of-7.jsonl")))
        .collect();
    let merged = dir.path().join("partial.jsonl");
    let out = merge_into(&files, &manifest, &merged);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let missing = shard_ids(3, 7);
    assert!(
        stderr.contains(&format!(
            "{} of {JOBS} job(s) have no line in the inputs (missing; rerun their shards with \
             --resume): {}",
            missing.len(),
            missing.join(", ")
        )),
        "{stderr}"
    );
    let want: Vec<String> = all_ids()
        .into_iter()
        .filter(|i| !missing.contains(i))
        .collect();
    assert_eq!(ids(&read_jsonl(&merged)), want);
}

#[test]
fn slurm_and_kubernetes_variables_pick_the_same_shards_as_the_flag() {
    let (dir, manifest) = workspace(false);
    let run = |name: &str, args: &[&str], env: &[(&str, &str)]| -> (Vec<String>, String) {
        let out_path = dir.path().join(format!("{name}-{{shard}}.jsonl"));
        let mut all = args.to_vec();
        all.extend(["-o", path_str(&out_path)]);
        let out = batch(&manifest, &all, env).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // Every job names a missing image: each gets an error line, so the run exits 1.
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{name}-"))
            })
            .collect();
        assert_eq!(files.len(), 1, "{name}: {files:?}");
        let lines = read_jsonl(&files[0]);
        assert!(lines.iter().all(|l| l["error"]["kind"] == "input"));
        let file = files[0].file_name().unwrap().to_string_lossy().into_owned();
        (ids(&lines), format!("{file}\n{stderr}"))
    };
    for k in 0..3usize {
        let want = shard_ids(k, 3);
        let label = format!("-{k}-of-3.jsonl");
        let flag = format!("{k}/3");
        let (got, log) = run(&format!("flag{k}"), &["--shard", &flag], &[]);
        assert_eq!(got, want);
        assert!(log.contains(&label) && log.contains(&format!("from --shard {flag}")));

        // `sbatch --array=1-3`: task ids from 1.
        let task = (k + 1).to_string();
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", task.as_str()),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        let (got, log) = run(&format!("slurm{k}"), &[], &slurm);
        assert_eq!(got, want, "{log}");
        assert!(log.contains(&label), "{log}");
        assert!(
            log.contains(&format!(
                "shard {k}/3 (from SLURM_ARRAY_TASK_ID={task}, SLURM_ARRAY_TASK_MIN=1, \
                 SLURM_ARRAY_TASK_COUNT=3)"
            )),
            "{log}"
        );

        let index = k.to_string();
        let kube = [("JOB_COMPLETION_INDEX", index.as_str())];
        let (got, log) = run(&format!("kubeflag{k}"), &["--shards", "3"], &kube);
        assert_eq!(got, want, "{log}");
        assert!(log.contains(&format!("from JOB_COMPLETION_INDEX={k} and --shards 3")));
        let kube_env = [
            ("JOB_COMPLETION_INDEX", index.as_str()),
            ("MMLLM_SHARDS", "3"),
        ];
        let (got, log) = run(&format!("kubeenv{k}"), &[], &kube_env);
        assert_eq!(got, want, "{log}");
        assert!(log.contains(&label), "{log}");

        // Task k run again on its own (`MMLLM_SHARDS=3 sbatch --array=k`): with a count, the
        // task id is the shard index.
        let again = [
            ("SLURM_ARRAY_TASK_ID", index.as_str()),
            ("SLURM_ARRAY_TASK_MIN", index.as_str()),
            ("SLURM_ARRAY_TASK_MAX", index.as_str()),
            ("SLURM_ARRAY_TASK_COUNT", "1"),
            ("MMLLM_SHARDS", "3"),
        ];
        let (got, log) = run(&format!("rerun{k}"), &[], &again);
        assert_eq!(got, want, "{log}");
        assert!(log.contains(&label), "{log}");

        // --shard overrides the environment.
        let other = (k + 1) % 3;
        let flag = format!("{other}/3");
        let (got, log) = run(&format!("override{k}"), &["--shard", &flag], &slurm);
        assert_eq!(got, shard_ids(other, 3), "{log}");
    }
}

#[test]
fn bad_shard_settings_are_usage_errors_before_any_work() {
    let (dir, manifest) = workspace(false);
    let out_path = dir.path().join("out-{shard}.jsonl");
    let out_str = path_str(&out_path);
    // (flags, environment, what stderr says)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (
            &["--shard", "3/3"],
            &[],
            "--shard 3/3: shard 3 does not exist among 3",
        ),
        (
            &["--shard", "two/3"],
            &[],
            "--shard two/3: K or N is not a whole number",
        ),
        (&["--shard", "1/0"], &[], "--shard 1/0: a count of 0 shards"),
        (
            &["--shards", "0"],
            &[("JOB_COMPLETION_INDEX", "0")],
            "--shards",
        ),
        (&["--shard", "1/3", "--shards", "3"], &[], "--shards"),
        (
            &[],
            &[
                ("SLURM_ARRAY_TASK_ID", "abc"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
            ],
            "SLURM_ARRAY_TASK_ID=abc: not a whole number",
        ),
        (
            &[],
            &[
                ("SLURM_ARRAY_TASK_ID", "4"),
                ("SLURM_ARRAY_TASK_MIN", "0"),
                ("SLURM_ARRAY_TASK_MAX", "12"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
            "SLURM_ARRAY_TASK_COUNT=4: 4 tasks, but task ids 0..12",
        ),
        (
            &["--shards", "4"],
            &[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_MAX", "4")],
            "SLURM_ARRAY_TASK_MAX=4: task ids go up to 4, but --shards 4 makes 4 shards",
        ),
        (
            &[],
            &[("JOB_COMPLETION_INDEX", "1")],
            "JOB_COMPLETION_INDEX=1: the number of shards is not given (expected --shards N or \
             MMLLM_SHARDS=N",
        ),
        (
            &[],
            &[("JOB_COMPLETION_INDEX", "5"), ("MMLLM_SHARDS", "5")],
            "JOB_COMPLETION_INDEX=5: shard 5 does not exist among 5 (MMLLM_SHARDS=5",
        ),
        (
            &[],
            &[("JOB_COMPLETION_INDEX", "1"), ("MMLLM_SHARDS", "lots")],
            "MMLLM_SHARDS=lots: not a whole number",
        ),
        (
            &["--shards", "3"],
            &[],
            "--shards 3: a number of shards but no shard index",
        ),
        (
            &[],
            &[],
            "the path names {shard} but this run is not sharded",
        ),
    ];
    for (args, env, says) in cases {
        let mut all = args.to_vec();
        all.extend(["-o", out_str]);
        let out = batch(&manifest, &all, env).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?} {env:?}: {stderr}");
        assert!(out.stdout.is_empty());
        let written: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                name.ends_with(".jsonl").then_some(name)
            })
            .collect();
        assert!(written.is_empty(), "{args:?}: wrote {written:?}");
    }

    // A schema error fails every shard alike, before any job runs.
    let text = std::fs::read_to_string(&manifest).unwrap() + "  - id: extra\n    promt: x\n";
    std::fs::write(&manifest, text).unwrap();
    let errors: Vec<String> = (0..3)
        .map(|k| {
            let flag = format!("{k}/3");
            let out = batch(&manifest, &["--shard", &flag], &[]).output().unwrap();
            assert_eq!(out.status.code(), Some(2));
            String::from_utf8_lossy(&out.stderr).into_owned()
        })
        .collect();
    assert!(errors[0].contains("unknown key `promt`"), "{}", errors[0]);
    assert!(errors.iter().all(|e| *e == errors[0]), "{errors:?}");
}

#[test]
fn a_shard_killed_then_resumed_merges_with_nothing_lost_or_doubled() {
    let (dir, manifest) = workspace(true);
    let pattern = dir.path().join("out-{shard}.jsonl");
    let pattern = path_str(&pattern);
    let file = |k: usize| dir.path().join(format!("out-{k}-of-3.jsonl"));
    for k in [0, 2] {
        let flag = format!("{k}/3");
        let out = batch(&manifest, &["--shard", &flag, "-o", pattern], &[])
            .output()
            .unwrap();
        succeeded(&out);
    }

    // Shard 1, one sequence at a time, killed with -9 after a few lines.
    let mut child = batch(
        &manifest,
        &["--shard", "1/3", "-o", pattern, "--max-seqs", "1"],
        &[],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = std::fs::read_to_string(file(1)).map_or(0, |t| t.lines().count());
        let exited = child.try_wait().unwrap();
        assert!(
            exited.is_none(),
            "shard 1 ended before the kill: {exited:?}"
        );
        if n >= 3 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let mine = shard_ids(1, 3);
    // As a kill can leave it: a last line cut short.
    let mut before = std::fs::read(file(1)).unwrap();
    let whole = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    before.truncate(whole);
    let finished = before.iter().filter(|&&b| b == b'\n').count();
    assert!(
        finished < mine.len(),
        "the kill came after shard 1 finished"
    );
    let mut cut = before.clone();
    cut.extend_from_slice(format!("{{\"id\":\"{}\",\"text\":\"ha", mine[finished]).as_bytes());
    std::fs::write(file(1), &cut).unwrap();

    // Merging now: the cut line is ignored and the unfinished jobs are missing.
    let files: Vec<PathBuf> = (0..3).map(file).collect();
    let out = merge(&files, &["--manifest", path_str(&manifest)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("last line unfinished"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} of {JOBS} job(s) have no line in the inputs",
            mine.len() - finished
        )),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(file(1)).unwrap(),
        cut,
        "merge never modifies its inputs"
    );

    // Resume shard 1, then merge: every job exactly once.
    let out = batch(
        &manifest,
        &["--shard", "1/3", "-o", pattern, "--resume"],
        &[],
    )
    .output()
    .unwrap();
    succeeded(&out);
    let after = std::fs::read(file(1)).unwrap();
    assert!(
        after.starts_with(&before),
        "finished lines are kept byte for byte"
    );
    assert_eq!(ids(&read_jsonl(&file(1))), mine);
    let merged = dir.path().join("all.jsonl");
    let out = merge_into(&files, &manifest, &merged);
    succeeded(&out);
    let merged = read_jsonl(&merged);
    assert_eq!(ids(&merged), all_ids());
    assert!(merged
        .iter()
        .all(|l| l.get("error").is_none() && l["usage"]["completion_tokens"] == 2));
}

/// Hand-written shard outputs: which line wins for each id, and what is reported.
#[test]
fn merge_keeps_one_line_per_id_and_reports_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("jobs.yaml");
    let jobs: String = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|id| format!("  - id: {id}\n    prompt: hi\n"))
        .collect();
    std::fs::write(&manifest, format!("defaults:\n  model: m\njobs:\n{jobs}")).unwrap();
    let ok = |id: &str, text: &str| format!("{{\"id\":\"{id}\",\"text\":\"{text}\"}}\n");
    let err = |id: &str, why: &str| {
        format!("{{\"id\":\"{id}\",\"error\":{{\"kind\":\"input\",\"message\":\"{why}\"}}}}\n")
    };
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let f1 = write(
        "f1.jsonl",
        [err("c", "first"), ok("a", "1"), err("b", "x")].concat(),
    );
    let f2 = write(
        "f2.jsonl",
        [
            ok("b", "2"),
            ok("a", "again"),
            err("c", "second"),
            ok("x", "stray"),
        ]
        .concat()
            + "{\"id\":\"d\",\"te",
    );
    let inputs = [f1.clone(), f2.clone()];

    let merged = dir.path().join("merged.jsonl");
    let out = merge_into(&inputs, &manifest, &merged);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // Manifest order; a result beats error lines; the first result wins; the last error
    // stays for a job that never succeeded; a stray id goes last.
    assert_eq!(
        std::fs::read_to_string(&merged).unwrap(),
        [
            ok("a", "1"),
            ok("b", "2"),
            err("c", "second"),
            ok("x", "stray")
        ]
        .concat()
    );
    for says in [
        "f2.jsonl: last line unfinished",
        "1 duplicate result line(s) dropped",
        "2 error line(s) superseded",
        "ids with more than one result (the first kept): a",
        "2 of 5 job(s) have no line in the inputs (missing; rerun their shards with --resume): d, e",
        "1 job(s) have only error lines (failed; their error lines are in the output): c",
        "1 id(s) not in the manifest, kept at the end: x",
    ] {
        assert!(stderr.contains(says), "{says:?} in {stderr}");
    }

    // Without the manifest: the order in which the inputs first name each id, on stdout.
    let out = merge(&inputs, &[]);
    assert_eq!(out.status.code(), Some(1), "c failed");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        [
            err("c", "second"),
            ok("a", "1"),
            ok("b", "2"),
            ok("x", "stray")
        ]
        .concat()
    );

    // Complete inputs: exit 0, and the output may be one of the inputs.
    let g = write(
        "g.jsonl",
        [ok("e", "5"), ok("d", "4"), ok("c", "3")].concat(),
    );
    let h = write("h.jsonl", [ok("b", "2"), ok("a", "1")].concat());
    let out = merge_into(&[g.clone(), h], &manifest, &g);
    succeeded(&out);
    assert_eq!(
        std::fs::read_to_string(&g).unwrap(),
        [
            ok("a", "1"),
            ok("b", "2"),
            ok("c", "3"),
            ok("d", "4"),
            ok("e", "5")
        ]
        .concat()
    );

    // A line that is not a result is named and skipped; a missing input is a usage error.
    let bad = write("bad.jsonl", ok("a", "1") + "garbage\n");
    let out = merge(&[bad], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bad.jsonl:2: not a result line"),
        "{stderr}"
    );
    assert_eq!(out.stdout, ok("a", "1").into_bytes());
    let out = merge(&[dir.path().join("nowhere.jsonl")], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("nowhere.jsonl: cannot read"), "{stderr}");
}

/// The Slurm script is valid bash, and the Kubernetes manifest is YAML whose Indexed Job runs
/// one pod per shard with the same count it gives mmllm.
#[test]
fn the_cluster_examples_are_consistent() {
    let script = repo().join("examples/slurm-array.sh");
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    succeeded(&out);
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(text.contains("#SBATCH --array=0-"), "{text}");
    assert!(text.contains("mmllm batch") && text.contains("{shard}") && text.contains("--resume"));
    assert!(text.contains("mmllm merge"));

    let text = std::fs::read_to_string(repo().join("examples/k8s-indexed-job.yaml")).unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
    let job = docs
        .iter()
        .find(|d| d["spec"]["completionMode"].as_str() == Some("Indexed"))
        .expect("an Indexed Job");
    let completions = job["spec"]["completions"].as_i64().unwrap();
    let pod = &job["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        container["resources"]["limits"]["nvidia.com/gpu"].as_i64(),
        Some(1)
    );
    let env: BTreeMap<&str, &str> = container["env"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
        .collect();
    assert_eq!(env.get("HF_HUB_OFFLINE"), Some(&"1"));
    assert_eq!(
        env.get("MMLLM_SHARDS"),
        Some(&completions.to_string().as_str())
    );
    assert!(env.contains_key("HF_HOME"));
    let args: Vec<&str> = container["args"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        args.contains(&"batch") && args.contains(&"--resume"),
        "{args:?}"
    );
    assert!(args.iter().any(|a| a.contains("{shard}")), "{args:?}");
    // A warm-up Job fills the shared cache without HF_HUB_OFFLINE.
    assert!(docs.iter().any(|d| {
        d["kind"].as_str() == Some("Job") && d["spec"]["completionMode"].is_badvalue()
    }));
}

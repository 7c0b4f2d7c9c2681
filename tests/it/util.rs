//! Helpers shared by the integration tests: the repository root, the built `mmllm` binary, and
//! reading the committed fixtures (JSON, safetensors, WAV) and comparing against them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::{DType, Device, Tensor};
use mmllm::error::Error;
use mmllm::media::Audio;
use mmllm::models::kv::KvCache;
use mmllm::models::Model;
use serde_json::Value;

/// The repository root: `CARGO_MANIFEST_DIR` at run time when set (so a test binary built
/// elsewhere can run in a copy of the repository), else the one the tests were built from.
pub fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Variables from which `mmllm batch` takes its shard: cleared for every test run, so tests run
/// inside a Slurm array or a Kubernetes Indexed Job behave as anywhere else.
pub const SHARD_VARS: &[&str] = &[
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "SLURM_ARRAY_TASK_COUNT",
    "JOB_COMPLETION_INDEX",
    "MMLLM_SHARDS",
];

/// The built `mmllm` binary, offline (`HF_HUB_OFFLINE=1`: nothing is ever downloaded), with
/// stdin closed and no shard variables; callers override these where a test needs to.
pub fn mmllm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mmllm"));
    c.env("HF_HUB_OFFLINE", "1").stdin(Stdio::null());
    for var in SHARD_VARS {
        c.env_remove(var);
    }
    c
}

/// [`mmllm`] with `args`, run to completion.
pub fn run_mmllm(args: &[&str]) -> Output {
    mmllm().args(args).output().unwrap()
}

/// Exit 0 and exactly one line on stdout: that line, parsed as JSON.
pub fn json_line(out: &Output) -> Value {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line per prompt: {text}");
    serde_json::from_str(lines[0]).unwrap()
}

/// The (input, problem, expected) of an input error, or a panic naming what came instead.
pub fn input_error(r: Result<impl std::fmt::Debug, Error>) -> (String, String, String) {
    match r {
        Err(Error::Input {
            input,
            problem,
            expected,
        }) => (input, problem, expected),
        other => panic!("expected an input error, got {other:?}"),
    }
}

/// The lines of a JSONL file, parsed; panics naming the file.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

/// A JSON file, parsed; panics naming the file.
pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The tensors of a safetensors file, on the CPU; panics naming the file.
pub fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Token ids from a JSON array of integers (`token_ids` of an output line, `greedy_ids` of a
/// reference).
pub fn token_ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array of ids: {v}"))
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

/// Token ids from an integer tensor (`input_ids`, `greedy_ids` of a reference).
pub fn tensor_ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| u32::try_from(v).unwrap())
        .collect()
}

/// 16-bit PCM mono WAV as f32 (x / 32768, as soundfile reads it).
pub fn read_wav(path: &Path) -> Audio {
    let mut reader = hound::WavReader::open(path).unwrap();
    let spec = reader.spec();
    assert_eq!((spec.channels, spec.bits_per_sample), (1, 16), "{path:?}");
    let samples = reader
        .samples::<i16>()
        .map(|s| f32::from(s.unwrap()) / 32768.0)
        .collect();
    Audio {
        samples,
        sample_rate: spec.sample_rate,
    }
}

/// The values of a tensor (any device and float dtype) as a flat f32 vector.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `max |a - b|`.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `max |a - b| / max |b|`.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    max_abs_diff(a, b) / scale
}

/// [`rel_err`] over all the values of two tensors of the same size.
pub fn tensor_rel_err(a: &Tensor, b: &Tensor) -> f32 {
    rel_err(&flat(a), &flat(b))
}

/// The index of the largest value (the first one on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The parity bar for logits: relative to the largest reference logit (f32, CPU).
pub const LOGITS_RTOL: f32 = 1e-4;

/// Greedy decoding after a prefill: checks the first-step logits (`want["logits"]`), every
/// step's (`want["step_logits"]`), both within [`LOGITS_RTOL`], and the ids (`meta["greedy_ids"]`).
pub fn check_generation(
    model: &dyn Model,
    first: Tensor,
    cache: &mut KvCache,
    want: &HashMap<String, Tensor>,
    meta: &Value,
    what: &str,
) {
    let err = tensor_rel_err(&first, &want["logits"]);
    eprintln!("{what}: first-step logits rel err {err:.3e}");
    assert!(
        err <= LOGITS_RTOL,
        "{what}: first-step logits rel err {err}"
    );
    let want_ids = token_ids(&meta["greedy_ids"]);
    let step_logits = &want["step_logits"];
    let mut ids = Vec::new();
    let mut logits = first;
    let mut worst = 0f32;
    for step in 0..want_ids.len() {
        worst = worst.max(tensor_rel_err(&logits, &step_logits.get(step).unwrap()));
        let id = argmax(&logits.to_vec1::<f32>().unwrap());
        ids.push(id);
        if step + 1 < want_ids.len() {
            logits = model.decode(id, cache).unwrap();
        }
    }
    eprintln!("{what}: worst per-step logits rel err {worst:.3e}");
    assert_eq!(ids, want_ids, "{what}: greedy ids");
    assert!(
        worst <= LOGITS_RTOL,
        "{what}: per-step logits rel err {worst}"
    );
}

/// A little-endian float32 `.npy` file (format 1.0) of `shape` holding `values`.
pub fn npy_f32(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape = match dims.as_slice() {
        [one] => format!("({one},)"),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // The magic, version and length take 10 bytes; the header ends in a newline at a multiple of 64.
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes
}

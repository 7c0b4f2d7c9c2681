//! The files of a model directory that every family reads the same way: JSON configs and
//! the safetensors weights (one file, or the shards of an index), memory-mapped.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde_json::Value;

use crate::error::{Error, Result};
pub use crate::json::read_json;

/// [`read_json`] for a file that may be absent.
pub fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// The safetensors `files` memory-mapped as one weight tree, each tensor converted to `dtype`
/// on `device` when it is read.
pub fn mmap_weights<P: AsRef<Path>>(
    files: &[P],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    // SAFETY: candle requires that a mapped file is not modified while the mapping lives (a
    // file truncated or rewritten under it would change or fault the tensors read from it).
    // These are a model's weight files, which mmllm maps read-only and never writes, and
    // which nothing else is expected to rewrite while a model loads from them, as with every
    // mmap-based safetensors loader.
    unsafe { MmapedSafetensors::multi(files) }
        .and_then(|st| var_builder(st, dtype, device))
        .map_err(|e| bad_weight_file(files).unwrap_or_else(|| e.into()))
}

/// The mapped files' tensors as a `VarBuilder`. On CUDA every tensor is uploaded at once
/// through pinned buffers (several times the speed of candle's per-tensor copies from the
/// mapping); elsewhere they are read on demand.
fn var_builder(
    st: MmapedSafetensors,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<VarBuilder<'static>> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        let tensors = crate::kernels::upload_safetensors(&st, dtype, device)?;
        return Ok(VarBuilder::from_tensors(tensors, dtype, device));
    }
    Ok(VarBuilder::from_backend(
        Box::new(Mapped(st)),
        dtype,
        device.clone(),
    ))
}

/// The mapped weight files as a `VarBuilder` backend. candle copies a bf16 tensor out of the
/// mapping and then converts it on one thread; a 2B-parameter checkpoint wanted in f32 on the
/// CPU took most of its load time in that, so here bf16 becomes f32 straight from the
/// mapping, in parallel chunks. Everything else is candle's own path.
struct Mapped(MmapedSafetensors);

impl SimpleBackend for Mapped {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let view = self.0.get(name)?;
        if dev.is_cpu() && dtype == DType::F32 && DType::try_from(view.dtype())? == DType::BF16 {
            let data = crate::kernels::cpu::bf16_bytes_to_f32(view.data());
            return Tensor::from_vec(data, view.shape(), dev);
        }
        self.0.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.get(name).is_ok()
    }
}

/// The first of `files` whose safetensors header or length is wrong, as an input error naming
/// it (candle's own message names no file the way ours do).
fn bad_weight_file<P: AsRef<Path>>(files: &[P]) -> Option<Error> {
    files.iter().find_map(|file| {
        let file = file.as_ref();
        // SAFETY: as above; the mapping is dropped at once.
        let err = unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }.err()?;
        let problem = match err {
            candle_core::Error::WithPath { inner, .. } => inner.to_string(),
            other => other.to_string(),
        };
        Some(Error::input(
            file.display().to_string(),
            format!("not a complete safetensors file ({problem})"),
            "the model's weights as published (download the file again; it may be truncated)",
        ))
    })
}

/// The safetensors files of a model directory: the shards named by
/// `model.safetensors.index.json`, else `model.safetensors`, else every `*.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let json = read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                Error::input(
                    index.display().to_string(),
                    "no weight_map object",
                    "a safetensors index with a weight_map",
                )
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(Value::as_str)
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            return Err(Error::input(
                missing.display().to_string(),
                "shard named by model.safetensors.index.json is missing",
                "every shard of the index in the model directory",
            ));
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| {
            Error::input(
                dir.display().to_string(),
                e.to_string(),
                "a readable model directory",
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::input(
            dir.display().to_string(),
            "no *.safetensors weights",
            "model.safetensors or a sharded model.safetensors.index.json",
        ));
    }
    Ok(files)
}

/// The first of `candidates` under which `probe` exists: checkpoints saved by transformers 4
/// (`language_model.model.`, `vision_tower.`) and 5 (`model.language_model.`, …) name their
/// parts differently. `part` names the part in the error when none holds it.
pub fn weight_prefix(
    vb: &VarBuilder,
    candidates: &[&'static str],
    probe: &str,
    part: &str,
) -> Result<&'static str> {
    candidates
        .iter()
        .copied()
        .find(|p| vb.contains_tensor(&format!("{p}.{probe}")))
        .ok_or_else(|| {
            Error::input(
                "model weights",
                format!("no {part} tensor {probe:?} under any known prefix"),
                format!("one of {candidates:?}"),
            )
        })
}

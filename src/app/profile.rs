//! `mmllm profile-preprocess` (hidden; run by bench/cpu.py) times decoding one image and one
//! image processor on it, and can dump the pixel values for comparison with transformers.
//!
//! `mmllm profile-decode` (hidden; run by bench/gpu.py): where the time of one decode step
//! goes. Prefills `--context` text tokens, then times single-token steps three ways: the wall
//! time of a step including the argmax crossing to the host (what generation sees), the host
//! time to enqueue a step while the GPU is held busy, and the GPU time the queued step takes
//! when it runs back to back. Host ≈ wall means the step is launch-bound; GPU ≈ wall means
//! the GPU is the limit. With `--image` it also times encoding that image (preprocessing and
//! vision tower), and it times the prefill of the context: the parts of TTFT, each also split
//! into host enqueue and GPU time as a step is (host time includes CPU preprocessing). Every
//! time is taken after a warm-up run. Prints one JSON line on stdout.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use crate::cli::{DTypeArg, ProcessorArg};
use crate::engine::device::DeviceChoice;
use crate::error::{Error, Result};
use crate::kernels;
use crate::media::fetch::FetchPolicy;
use crate::media::image::{decode_image, ImageLimits};
use crate::media::source::Source;
use crate::media::{Modality, RgbImage};
use crate::models::common::clip_processor::ClipProcessorConfig;
use crate::models::qwen2_vl::config::ProcessorConfig;
use crate::models::qwen2_vl::preprocessor::preprocess_image;

use super::pipeline;

const WARMUP_STEPS: usize = 8;

/// The bytes of the image file at `path`, refused above `limits.max_bytes` before they are
/// read (as the real commands read a media path).
fn read_image(path: &Path, limits: &ImageLimits) -> Result<Vec<u8>> {
    Source::Path(PathBuf::from(path)).read_with_timeout(
        Modality::Image,
        limits.max_bytes,
        Duration::ZERO,
        &FetchPolicy::permissive(),
        &mut std::io::empty(),
    )
}

/// Seconds `f` takes, waiting for the GPU work it queued (by reading back a sum of the tensor
/// it returns); the best of three runs after one warm-up.
fn timed(f: &mut dyn FnMut() -> Result<Tensor>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for run in 0..4 {
        let start = Instant::now();
        f()?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if run > 0 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    Ok(best)
}

pub fn run(
    model: &str,
    device: &str,
    dtype: DTypeArg,
    context: usize,
    steps: usize,
    image: Option<&Path>,
) -> Result<()> {
    if context == 0 || steps == 0 {
        return Err(Error::usage(
            "--context and --steps: expected positive numbers".to_string(),
        ));
    }
    let device = DeviceChoice::parse(device)?;
    // The image is read and decoded before the weights load, so a bad one fails first.
    let item = match image {
        Some(path) => {
            let limits = ImageLimits::from_env()?;
            let bytes = read_image(path, &limits)?;
            let name = path.display().to_string();
            Some(crate::media::MediaItem::Image(decode_image(
                &bytes, &name, &limits,
            )?))
        }
        None => None,
    };
    let resolved = pipeline::resolve(model)?;
    let loaded = pipeline::load(&resolved, device, dtype.into())?;
    let m = loaded.model.as_ref();
    let vocab = m.info().vocab_size as u32;
    let ids: Vec<u32> = (0..context as u32).map(|i| i % vocab.max(1)).collect();
    let logits_device = m.embed_tokens(&[1])?.device().clone();
    // (synchronised seconds, host enqueue seconds, GPU seconds) of one run of `f`.
    let parts = |f: &mut dyn FnMut() -> Result<Tensor>| -> Result<[Option<f64>; 3]> {
        let synced = timed(f)?;
        if !logits_device.is_cuda() {
            return Ok([Some(synced), None, None]);
        }
        let (host, gpu) = kernels::profile_step(&logits_device, &mut || f().map(|_| ()))?;
        Ok([Some(synced), Some(host), Some(gpu)])
    };
    let encode = match &item {
        Some(item) => parts(&mut || Ok(m.encode(item)?.features))?,
        None => [None; 3],
    };
    let prefill = parts(&mut || {
        let mut cache = m.new_cache(context)?;
        m.forward(&m.embed_tokens(&ids)?, &mut cache)
    })?;
    let mut cache = m.new_cache(context + WARMUP_STEPS + 2 * steps)?;
    let mut id = kernels::argmax(&m.forward(&m.embed_tokens(&ids)?, &mut cache)?)?;
    for _ in 0..WARMUP_STEPS {
        id = kernels::argmax(&m.decode(id, &mut cache)?)?;
    }
    let start = Instant::now();
    for _ in 0..steps {
        id = kernels::argmax(&m.decode(id, &mut cache)?)?;
    }
    let step_s = start.elapsed().as_secs_f64() / steps as f64;
    let (mut host, mut gpu) = (Vec::new(), Vec::new());
    // Without a GPU there is no enqueue/run split: those fields stay null.
    let profiled_steps = if logits_device.is_cuda() { steps } else { 0 };
    for _ in 0..profiled_steps {
        let mut logits = None;
        let (h, g) = kernels::profile_step(&logits_device, &mut || {
            logits = Some(m.decode(id, &mut cache)?);
            Ok::<(), Error>(())
        })?;
        host.push(h);
        gpu.push(g);
        if let Some(l) = logits {
            id = kernels::argmax(&l)?;
        }
    }
    let ms = |s: Option<f64>| s.map(|s| s * 1e3);
    let median_ms = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).map(|s| s * 1e3)
    };
    let fused = logits_device.is_cuda() && kernels::DecodeOptions::from_env().fused;
    let line = serde_json::json!({
        "model": model,
        "fused_decode": fused,
        "context": context,
        "steps": steps,
        "encode_image_ms": ms(encode[0]),
        "encode_image_host_ms": ms(encode[1]),
        "encode_image_gpu_ms": ms(encode[2]),
        "prefill_ms": ms(prefill[0]),
        "prefill_host_ms": ms(prefill[1]),
        "prefill_gpu_ms": ms(prefill[2]),
        "step_ms": step_s * 1e3,
        "tokens_per_s": 1.0 / step_s,
        "host_enqueue_ms": median_ms(&mut host),
        "gpu_busy_ms": median_ms(&mut gpu),
        "load_ms": loaded.load_s * 1e3,
    });
    println!("{line}");
    Ok(())
}

/// One image processor: pixel values and their shape.
type Processor = dyn Fn(&RgbImage) -> Result<(Vec<f32>, Vec<usize>)>;

/// `mmllm profile-preprocess`: decode `image` and run one image processor on it, `runs` timed
/// times each after an untimed run; prints the best times as one JSON line.
pub fn preprocess(
    image: &Path,
    processor: ProcessorArg,
    config: Option<&Path>,
    runs: u32,
    dump: Option<&Path>,
) -> Result<()> {
    let name = image.display().to_string();
    let config_text = match config {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
            Error::input(
                path.display().to_string(),
                e.to_string(),
                "a readable JSON file",
            )
        })?),
        None => None,
    };
    let config_name = config.map_or(String::new(), |p| p.display().to_string());
    let bad_config = |e: &dyn std::fmt::Display| {
        Error::input(&config_name, e.to_string(), "a preprocessor_config.json")
    };
    // Parsed before the image is read, so a bad config fails first.
    let run: Box<Processor> = match processor {
        ProcessorArg::Clip => {
            let cfg = match &config_text {
                Some(text) => ClipProcessorConfig::from_json(text).map_err(|e| bad_config(&e))?,
                None => ClipProcessorConfig::default(),
            };
            Box::new(move |img| {
                let pv = cfg.preprocess(img)?;
                let shape = vec![1, 3, pv.height as usize, pv.width as usize];
                Ok((pv.data, shape))
            })
        }
        ProcessorArg::Qwen2Vl => {
            let mut cfg = ProcessorConfig::image_default();
            if let Some(text) = &config_text {
                let v: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| bad_config(&e))?;
                cfg = cfg.apply(&v, &config_name)?;
            }
            Box::new(move |img| {
                let p = preprocess_image(img, &cfg)?;
                let shape = vec![p.num_patches(), p.patch_dim];
                Ok((p.pixel_values, shape))
            })
        }
    };
    let limits = ImageLimits::from_env()?;
    let bytes = read_image(image, &limits)?;
    let (mut decode_s, mut pre_s, mut total_s) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    let mut last = None;
    for i in 0..=runs {
        let start = Instant::now();
        let img = decode_image(&bytes, &name, &limits)?;
        let decoded = Instant::now();
        let out = run(&img)?;
        let end = Instant::now();
        if i > 0 {
            decode_s = decode_s.min((decoded - start).as_secs_f64());
            pre_s = pre_s.min((end - decoded).as_secs_f64());
            total_s = total_s.min((end - start).as_secs_f64());
        }
        last = Some((img.dimensions(), out));
    }
    let Some(((width, height), (data, shape))) = last else {
        return Err(Error::usage("--runs: expected a positive number"));
    };
    if let Some(path) = dump {
        write_npy(path, &data, &shape)?;
    }
    let line = serde_json::json!({
        "image": name,
        "width": width,
        "height": height,
        "processor": match processor {
            ProcessorArg::Clip => "clip",
            ProcessorArg::Qwen2Vl => "qwen2-vl",
        },
        "runs": runs,
        "threads": rayon::current_num_threads(),
        "shape": shape,
        "decode_ms": decode_s * 1e3,
        "preprocess_ms": pre_s * 1e3,
        "total_ms": total_s * 1e3,
    });
    println!("{line}");
    Ok(())
}

/// A little-endian f32 .npy file (format 1.0) of `data` in C order.
fn write_npy(path: &Path, data: &[f32], shape: &[usize]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    // Magic (6) + version (2) + length (2) + header + newline, padded to 64 bytes.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, out)
        .map_err(|e| Error::input(path.display().to_string(), e.to_string(), "a writable path"))
}

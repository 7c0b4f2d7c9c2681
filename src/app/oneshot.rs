//! One prompt from the command line (`image`, `video`, `audio`, `embeds`): plan, resolve the
//! model, check limits, decode media, then load, render, encode, generate and print.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use candle_core::{DType, Device};
use serde_json::json;
use tokenizers::Tokenizer;

use crate::cli::plan::{DeviceChoice, InputKind, MediaInput, Plan};
use crate::cli::{Command, DTypeArg, OutputFormat};
use crate::engine::generate::{generate, Event, Request};
use crate::error::{Error, Result};
use crate::hub::{self, HubOptions, ModelDir};
use crate::media::{self, MediaItem, Modality};
use crate::models::registry::{self, LoadContext};
use crate::models::{FamilyDefaults, Model};
use crate::prompt::template::{ChatTemplate, ContentPart, Message, TemplateFiles};
use crate::prompt::{self, Expansion};
use crate::sink::{self, JsonResult, TextSink};

/// Runs a prompting command end to end.
pub fn run(cmd: &Command) -> Result<()> {
    let mut stdin = std::io::stdin().lock();
    let plan = Plan::from_command(cmd, &mut stdin)?;
    let dir = hub::resolve(&plan.model, &HubOptions::from_env()?)?;
    let config = dir.config()?;
    let family = registry::family_for(&config, &plan.model)?;
    let defaults = (family.defaults)(&config)?;
    let frames = match plan.frames {
        media::video::FrameSampling::NumFrames(n) => Some(n),
        _ => None,
    };
    plan.check_against(&defaults, &plan.item_counts(frames))?;
    let media = decode_media(&plan, &mut stdin)?;
    // Frame counts of `--as-images` are only known now (e.g. with --fps).
    plan.check_against(&defaults, &counts_of(&media))?;

    if plan.dry_run {
        let out = dry_run_report(&plan, &dir, family.name, &defaults, &media);
        let mut stdout = std::io::stdout().lock();
        sink::write_json_line(&mut stdout, &out)?;
        return Ok(());
    }

    let load_start = Instant::now();
    let tokenizer = load_tokenizer(&dir)?;
    let text = render_prompt(&plan, &dir, &defaults, &media)?;
    let (device, dtype) = device_and_dtype(plan.device, plan.dtype)?;
    // Resolving the weight files downloads any that are missing before the loader maps them.
    dir.weight_files()?;
    let spinner = sink::spinner("loading model");
    let model = (family.load)(&LoadContext {
        dir: &dir.root,
        config: &config,
        device: &device,
        dtype,
    })?;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let load_s = load_start.elapsed().as_secs_f64();

    let request = build_request(&plan, &tokenizer, &text, &defaults, model.as_ref(), &media, &dir)?;
    let mut stdout = std::io::stdout().lock();
    match plan.output {
        OutputFormat::Text => {
            let mut text_sink = TextSink::new(&mut stdout);
            let mut on_event = |e: Event| text_sink.event(&e).map_err(Error::from);
            generate(model.as_ref(), &tokenizer, &request, &mut on_event)?;
            text_sink.finish()?;
        }
        OutputFormat::Jsonl => {
            let done = generate(model.as_ref(), &tokenizer, &request, &mut |_| Ok(()))?;
            let line = JsonResult::new(&plan.id, &plan.model, &done, load_s);
            sink::write_json_line(&mut stdout, &line)?;
        }
    }
    stdout.flush()?;
    Ok(())
}

/// Reads and decodes every media argument; video frames become images with `--as-images`.
fn decode_media(plan: &Plan, stdin: &mut dyn std::io::Read) -> Result<Vec<MediaInput>> {
    let opts = media::LoadOptions {
        images: media::image::ImageLimits::from_env()?,
        frames: plan.frames.clone(),
        npy_sample_rate: plan.sample_rate,
    };
    let mut out = Vec::new();
    for arg in &plan.media {
        let (modality, embeds) = match arg.kind {
            InputKind::Media(m) => (m, false),
            InputKind::Embeds(m) => (m, true),
        };
        let input = arg.source.display();
        let mut item = media::load(&arg.source, modality, embeds, &opts, stdin)?;
        if let MediaItem::Embeds(e) = &mut item {
            for (name, source) in &plan.extra_tensors {
                let extra = media::load(source, modality, true, &opts, stdin)?;
                if let MediaItem::Embeds(x) = extra {
                    let tensor = x.tensors.into_values().next().ok_or_else(|| {
                        Error::input(source.display(), "holds no tensor", format!("a {name} tensor"))
                    })?;
                    e.tensors.insert(name.clone(), tensor);
                }
            }
        }
        match item {
            MediaItem::Video(v) if plan.as_images => {
                for (frame, t) in v.frames.into_iter().zip(v.timestamps) {
                    out.push(MediaInput {
                        input: format!("{input}@{t:.3}s"),
                        item: MediaItem::Image(frame),
                    });
                }
            }
            item => out.push(MediaInput { input, item }),
        }
    }
    Ok(out)
}

fn counts_of(media: &[MediaInput]) -> BTreeMap<Modality, usize> {
    let mut counts = BTreeMap::new();
    for m in media {
        *counts.entry(m.item.modality()).or_insert(0) += 1;
    }
    counts
}

fn dry_run_report(
    plan: &Plan,
    dir: &ModelDir,
    family: &str,
    defaults: &FamilyDefaults,
    media: &[MediaInput],
) -> serde_json::Value {
    let items: Vec<serde_json::Value> = media
        .iter()
        .map(|m| match &m.item {
            MediaItem::Image(img) => json!({"input": m.input, "kind": "image",
                "width": img.width(), "height": img.height()}),
            MediaItem::Video(v) => json!({"input": m.input, "kind": "video",
                "frames": v.frames.len(), "timestamps": v.timestamps,
                "width": v.frames.first().map(|f| f.width()),
                "height": v.frames.first().map(|f| f.height())}),
            MediaItem::Audio(a) => json!({"input": m.input, "kind": "audio",
                "samples": a.samples.len(), "sample_rate": a.sample_rate,
                "seconds": a.samples.len() as f64 / f64::from(a.sample_rate.max(1))}),
            MediaItem::Embeds(e) => json!({"input": m.input, "kind": "embeds",
                "modality": e.modality.name(),
                "tensors": e.tensors.iter().map(|(k, t)| (k.clone(), json!(t.dims()))).collect::<serde_json::Map<_, _>>()}),
        })
        .collect();
    let limits: serde_json::Map<String, serde_json::Value> = defaults
        .limits
        .iter()
        .map(|(m, n)| (m.to_string(), json!(plan.limits.get(m).copied().unwrap_or(*n))))
        .collect();
    json!({
        "id": plan.id,
        "model": plan.model,
        "model_dir": dir.root.display().to_string(),
        "family": family,
        "prompt": plan.prompt,
        "raw": plan.raw,
        "media": items,
        "limits": limits,
        "max_tokens": plan.gen.max_tokens,
    })
}

fn load_tokenizer(dir: &ModelDir) -> Result<Tokenizer> {
    let path = dir.file("tokenizer.json")?;
    Tokenizer::from_file(&path).map_err(|e| {
        Error::input(
            path.display().to_string(),
            format!("cannot load the tokenizer: {e}"),
            "a Hugging Face tokenizer.json",
        )
    })
}

fn read_optional(dir: &ModelDir, name: &str) -> Result<Option<String>> {
    match dir.optional_file(name)? {
        Some(path) => Ok(Some(std::fs::read_to_string(&path).map_err(|e| {
            Error::input(path.display().to_string(), format!("cannot read: {e}"), "a UTF-8 text file")
        })?)),
        None => Ok(None),
    }
}

fn tokenizer_config(dir: &ModelDir) -> Result<Option<serde_json::Value>> {
    read_optional(dir, "tokenizer_config.json")?
        .map(|text| {
            serde_json::from_str(&text).map_err(|e| {
                Error::input("tokenizer_config.json", format!("not valid JSON: {e}"), "a JSON object")
            })
        })
        .transpose()
}

/// The prompt text: verbatim with `--raw`, else the chat template applied to a user turn
/// holding one content part per media item (in order) and the text.
fn render_prompt(
    plan: &Plan,
    dir: &ModelDir,
    defaults: &FamilyDefaults,
    media: &[MediaInput],
) -> Result<String> {
    if plan.raw {
        return Ok(plan.prompt.clone());
    }
    let files = TemplateFiles {
        override_file: plan.chat_template.clone(),
        jinja: read_optional(dir, "chat_template.jinja")?,
        json: read_optional(dir, "chat_template.json")?,
        tokenizer_config: tokenizer_config(dir)?,
    };
    let template = ChatTemplate::select(&files, defaults.fallback_chat_template)?.ok_or_else(|| {
        Error::input(
            &plan.model,
            "the model ships no chat template",
            "a chat template: pass --chat-template FILE, or --raw with the model's placeholders",
        )
    })?;
    let mut messages = Vec::new();
    if let Some(system) = &plan.system {
        messages.push(Message {
            role: "system".into(),
            content: vec![ContentPart::Text { text: system.clone() }],
        });
    }
    let mut content: Vec<ContentPart> = media
        .iter()
        .map(|m| ContentPart::media(m.item.modality()))
        .collect();
    content.push(ContentPart::Text { text: plan.prompt.clone() });
    messages.push(Message { role: "user".into(), content });
    let text = template.render(&messages, true)?;
    Ok(text)
}

/// Tokenizes the prompt as Hugging Face processors do (special tokens added unless the
/// rendered text already starts with the BOS token), encodes the media and splices them in.
fn build_request(
    plan: &Plan,
    tokenizer: &Tokenizer,
    text: &str,
    defaults: &FamilyDefaults,
    model: &dyn Model,
    media: &[MediaInput],
    dir: &ModelDir,
) -> Result<Request> {
    let tok_config = tokenizer_config(dir)?;
    let bos = tok_config
        .as_ref()
        .and_then(|c| c.get("bos_token"))
        .and_then(|v| v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str())))
        .map(str::to_string);
    let add_special = plan.raw || !bos.as_deref().is_some_and(|b| !b.is_empty() && text.starts_with(b));
    let encoding = tokenizer
        .encode(text, add_special)
        .map_err(|e| Error::Runtime(anyhow::anyhow!("tokenizing the prompt: {e}")))?;
    let mut placeholders = Vec::new();
    for (m, p) in &defaults.placeholders {
        let id = tokenizer.token_to_id(p).ok_or_else(|| {
            Error::Runtime(anyhow::anyhow!("the tokenizer has no {p} token for {m} items"))
        })?;
        placeholders.push((*m, id));
    }
    let mut items = Vec::with_capacity(media.len());
    let mut expansions: Vec<(Modality, Expansion)> = Vec::with_capacity(media.len());
    for m in media {
        let encoded = model.encode(&m.item).map_err(|e| match e {
            Error::Input { problem, expected, .. } => Error::input(&m.input, problem, expected),
            other => other,
        })?;
        expansions.push((m.item.modality(), encoded.expansion.clone()));
        items.push(encoded);
    }
    let what = if plan.raw { "--raw prompt" } else { "rendered prompt" };
    let spliced = prompt::splice(encoding.get_ids(), &placeholders, &expansions, what)?;
    Ok(Request {
        prompt: spliced,
        items,
        sampling: plan.gen.sampling.clone(),
        max_tokens: plan.gen.max_tokens,
        stop: plan.gen.stop.clone(),
        eos: if plan.gen.ignore_eos {
            Vec::new()
        } else {
            eos_ids(dir, tokenizer, tok_config.as_ref())?
        },
        logprobs: plan.gen.logprobs,
    })
}

/// EOS ids: generation_config.json, else config.json (top level or text_config), else the
/// tokenizer's `eos_token`.
fn eos_ids(dir: &ModelDir, tokenizer: &Tokenizer, tok_config: Option<&serde_json::Value>) -> Result<Vec<u32>> {
    fn ids(v: Option<&serde_json::Value>) -> Option<Vec<u32>> {
        let v = v?;
        if let Some(n) = v.as_u64() {
            return Some(vec![n as u32]);
        }
        let list: Vec<u32> = v.as_array()?.iter().filter_map(|x| x.as_u64()).map(|n| n as u32).collect();
        (!list.is_empty()).then_some(list)
    }
    if let Some(text) = read_optional(dir, "generation_config.json")? {
        let gen: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::input("generation_config.json", format!("not valid JSON: {e}"), "a JSON object")
        })?;
        if let Some(list) = ids(gen.get("eos_token_id")) {
            return Ok(list);
        }
    }
    let config = dir.config()?;
    if let Some(list) = ids(config.get("eos_token_id"))
        .or_else(|| ids(config.get("text_config").and_then(|t| t.get("eos_token_id"))))
    {
        return Ok(list);
    }
    Ok(tok_config
        .and_then(|c| c.get("eos_token"))
        .and_then(|v| v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str())))
        .and_then(|t| tokenizer.token_to_id(t))
        .into_iter()
        .collect())
}

/// `--device`/`--dtype` to candle's; `auto` is CUDA when built with it and present.
pub fn device_and_dtype(device: DeviceChoice, dtype: DTypeArg) -> Result<(Device, DType)> {
    let device = match device {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda(n) => Device::new_cuda(n).map_err(|e| {
            Error::usage(format!(
                "--device cuda:{n}: not available ({e}) (expected a CUDA device and a binary built with --features cuda)"
            ))
        })?,
        DeviceChoice::Auto => Device::cuda_if_available(0).unwrap_or(Device::Cpu),
    };
    let dtype = match dtype {
        DTypeArg::Auto if device.is_cuda() => DType::BF16,
        DTypeArg::Auto | DTypeArg::F32 => DType::F32,
        DTypeArg::Bf16 => DType::BF16,
        DTypeArg::F16 => DType::F16,
    };
    Ok((device, dtype))
}

//! The steps every request goes through, shared by one-shot commands and batch: resolve the
//! model, check limits and decode media (before weights), load, then render the prompt, encode
//! the media and splice them into a request for the engine.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;

use crate::cli::plan::{DeviceChoice, InputKind, MediaInput, Plan};
use crate::cli::DTypeArg;
use crate::engine::generate::Request;
use crate::error::{Error, Result};
use crate::hub::{self, HubOptions, ModelDir};
use crate::media::{self, MediaItem, Modality};
use crate::models::registry::{self, Family, LoadContext};
use crate::models::{EncodedItem, FamilyDefaults, Model};
use crate::prompt::template::{
    self, ChatTemplate, ContentPart, Message, TemplateFiles, TextMessage,
};
use crate::prompt::{self, Expansion, Spliced};
use crate::sink;

/// A model resolved to its directory and family, with its cheap defaults: enough to
/// validate requests before any weights are read.
pub struct Resolved {
    pub name: String,
    pub dir: ModelDir,
    pub config: serde_json::Value,
    pub family: &'static Family,
    pub defaults: FamilyDefaults,
}

/// Resolves `--model` (alias, repo id or directory) and reads its `config.json`.
pub fn resolve(model: &str) -> Result<Resolved> {
    let dir = hub::resolve(model, hub::DEFAULT_ALIASES, &HubOptions::from_env()?)?;
    let config = dir.config()?;
    let family = registry::family_for(&config, model)?;
    let defaults = (family.defaults)(&config)?;
    Ok(Resolved {
        name: model.to_string(),
        dir,
        config,
        family,
        defaults,
    })
}

/// Checks the plan's media against the model's limits, then reads and decodes it (frame
/// counts of `--as-images` are checked again once known).
pub fn prepare_media(
    plan: &Plan,
    resolved: &Resolved,
    stdin: &mut dyn std::io::Read,
) -> Result<Vec<MediaInput>> {
    let frames = match plan.frames {
        media::video::FrameSampling::NumFrames(n) => Some(n),
        _ => None,
    };
    plan.check_against(&resolved.defaults, &plan.item_counts(frames))?;
    let media = decode_media(plan, stdin)?;
    plan.check_against(&resolved.defaults, &counts_of(&media))?;
    Ok(media)
}

/// A model with its weights and tokenizer loaded.
pub struct Loaded {
    pub model: Box<dyn Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub tokenizer_config: Option<serde_json::Value>,
    pub eos: Vec<u32>,
    pub load_s: f64,
}

/// Loads the tokenizer and the weights (downloading missing files first).
pub fn load(resolved: &Resolved, device: DeviceChoice, dtype: DTypeArg) -> Result<Loaded> {
    let start = Instant::now();
    let dir = &resolved.dir;
    let extra_dirs = resolve_extra_models(resolved)?;
    let tokenizer = Arc::new(load_tokenizer(dir)?);
    let tokenizer_config = tokenizer_config(dir)?;
    let eos = eos_ids(dir, &tokenizer, tokenizer_config.as_ref())?;
    let (device, dtype) = device_and_dtype(device, dtype)?;
    // Resolving the weight files downloads any that are missing before the loader maps them.
    dir.weight_files()?;
    let spinner = sink::spinner("loading model");
    let model = (resolved.family.load)(&LoadContext {
        dir: &dir.root,
        extra_dirs: &extra_dirs,
        config: &resolved.config,
        device: &device,
        dtype,
    })?;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    Ok(Loaded {
        model,
        tokenizer,
        tokenizer_config,
        eos,
        load_s: start.elapsed().as_secs_f64(),
    })
}

/// Resolves each model `config.json` names for part of the weights (as `--model` is resolved:
/// same cache and offline rules) and brings its `config.json` and weights on disk. Errors say
/// which model named it.
fn resolve_extra_models(resolved: &Resolved) -> Result<Vec<std::path::PathBuf>> {
    let opts = HubOptions::from_env()?;
    resolved
        .defaults
        .extra_models
        .iter()
        .map(|extra| {
            let named_by = || {
                format!(
                    " (named by {} in the config.json of {})",
                    extra.key,
                    resolved.dir.display()
                )
            };
            let extra = hub::resolve(&extra.reference, hub::DEFAULT_ALIASES, &opts)
                .and_then(|d| {
                    d.config()?;
                    d.weight_files()?;
                    Ok(d)
                })
                .map_err(|e| match e {
                    Error::Input {
                        input,
                        problem,
                        expected,
                    } => Error::Input {
                        input,
                        problem: problem + &named_by(),
                        expected,
                    },
                    other => other,
                })?;
            Ok(extra.root)
        })
        .collect()
}

/// The engine request for `plan`: the prompt rendered and tokenized, media encoded and
/// spliced in.
pub fn request(
    plan: &Plan,
    resolved: &Resolved,
    loaded: &Loaded,
    media: &[MediaInput],
) -> Result<Request> {
    let started = Instant::now();
    let items = encode_media(loaded, media)?;
    request_with_items(plan, resolved, loaded, media, items, started)
}

/// Encodes the media of several requests together (one encoder pass where the family can
/// stack them) and builds each request; one result per `(plan, media)`, in order.
pub fn requests_batched(
    resolved: &Resolved,
    loaded: &Loaded,
    batch: &[(&Plan, &[MediaInput])],
) -> Vec<Result<Request>> {
    let started = Instant::now();
    let all: Vec<&MediaInput> = batch.iter().flat_map(|(_, m)| m.iter()).collect();
    let items: Vec<&MediaItem> = all.iter().map(|m| &m.item).collect();
    let mut encoded = loaded
        .model
        .encode_batch(&items)
        .into_iter()
        .zip(&all)
        .map(|(r, m)| r.map_err(|e| renamed(e, m)));
    batch
        .iter()
        .map(|(plan, media)| {
            let items: Vec<Result<EncodedItem>> = encoded.by_ref().take(media.len()).collect();
            let items = items.into_iter().collect::<Result<Vec<_>>>()?;
            request_with_items(plan, resolved, loaded, media, items, started)
        })
        .collect()
}

/// Builds the request once its media are encoded.
fn request_with_items(
    plan: &Plan,
    resolved: &Resolved,
    loaded: &Loaded,
    media: &[MediaInput],
    items: Vec<EncodedItem>,
    started: Instant,
) -> Result<Request> {
    let prompt = match loaded.model.own_prompt(&plan.prompt, &items) {
        Some(ids) => Spliced {
            ids: ids?,
            spans: Vec::new(),
        },
        None => {
            let text = render_prompt(plan, &resolved.dir, &resolved.defaults, media)?;
            tokenize_and_splice(plan, &text, &resolved.defaults, loaded, media, &items)?
        }
    };
    Ok(Request {
        prompt,
        items,
        sampling: plan.gen.sampling.clone(),
        max_tokens: plan.gen.max_tokens,
        stop: plan.gen.stop.clone(),
        eos: if plan.gen.ignore_eos {
            Vec::new()
        } else {
            loaded.eos.clone()
        },
        logprobs: plan.gen.logprobs,
        started,
    })
}

/// Encodes every media item; a model's input errors are renamed after the item.
fn encode_media(loaded: &Loaded, media: &[MediaInput]) -> Result<Vec<EncodedItem>> {
    media
        .iter()
        .map(|m| loaded.model.encode(&m.item).map_err(|e| renamed(e, m)))
        .collect()
}

/// A model's input error, named after the media argument it came from.
fn renamed(e: Error, m: &MediaInput) -> Error {
    match e {
        Error::Input {
            problem, expected, ..
        } => Error::input(&m.input, problem, expected),
        other => other,
    }
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
                        Error::input(
                            source.display(),
                            "holds no tensor",
                            format!("a {name} tensor"),
                        )
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
            Error::input(
                path.display().to_string(),
                format!("cannot read: {e}"),
                "a UTF-8 text file",
            )
        })?)),
        None => Ok(None),
    }
}

fn tokenizer_config(dir: &ModelDir) -> Result<Option<serde_json::Value>> {
    read_optional(dir, "tokenizer_config.json")?
        .map(|text| {
            serde_json::from_str(&text).map_err(|e| {
                Error::input(
                    "tokenizer_config.json",
                    format!("not valid JSON: {e}"),
                    "a JSON object",
                )
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
    let template =
        ChatTemplate::select(&files, defaults.fallback_chat_template)?.ok_or_else(|| {
            Error::input(
            &plan.model,
            "the model ships no chat template",
            "a chat template: pass --chat-template FILE, or --raw with the model's placeholders",
        )
        })?;
    if defaults.string_content {
        return render_string_content(plan, &template, defaults, media);
    }
    let mut messages = Vec::new();
    if let Some(system) = &plan.system {
        messages.push(Message {
            role: "system".into(),
            content: vec![ContentPart::Text {
                text: system.clone(),
            }],
        });
    }
    let mut content: Vec<ContentPart> = media
        .iter()
        .map(|m| ContentPart::media(m.item.modality()))
        .collect();
    content.push(ContentPart::Text {
        text: plan.prompt.clone(),
    });
    messages.push(Message {
        role: "user".into(),
        content,
    });
    let text = template.render(&messages, true)?;
    Ok(text)
}

/// The user turn for a template that takes string content: one placeholder per media item,
/// each on its own line, then the text, as vLLM's `_get_full_multimodal_text_prompt` joins
/// them (`"\n".join(placeholders + [text])`).
fn render_string_content(
    plan: &Plan,
    template: &ChatTemplate,
    defaults: &FamilyDefaults,
    media: &[MediaInput],
) -> Result<String> {
    let mut messages = Vec::new();
    if let Some(system) = &plan.system {
        messages.push(TextMessage {
            role: "system".into(),
            content: system.clone(),
        });
    }
    let mut lines = Vec::with_capacity(media.len() + 1);
    for m in media {
        let modality = m.item.modality();
        let placeholder = defaults.placeholders.get(&modality).ok_or_else(|| {
            Error::input(
                &m.input,
                format!("this model has no placeholder for {modality} items"),
                "media of a modality the model accepts",
            )
        })?;
        lines.push(placeholder.as_str());
    }
    lines.push(&plan.prompt);
    messages.push(TextMessage {
        role: "user".into(),
        content: lines.join("\n"),
    });
    template.render_text(&messages, true)
}

/// Tokenizes the rendered prompt as Hugging Face processors do (special tokens added unless
/// the text already starts with the BOS token) and expands each placeholder to its item.
fn tokenize_and_splice(
    plan: &Plan,
    text: &str,
    defaults: &FamilyDefaults,
    loaded: &Loaded,
    media: &[MediaInput],
    items: &[EncodedItem],
) -> Result<Spliced> {
    let tokenizer = &loaded.tokenizer;
    let bos = loaded
        .tokenizer_config
        .as_ref()
        .and_then(|c| c.get("bos_token"))
        .and_then(template::token_text);
    let starts_with_bos = bos.is_some_and(|b| !b.is_empty() && text.starts_with(b));
    let encoding = tokenizer
        .encode(text, plan.raw || !starts_with_bos)
        .map_err(|e| Error::Runtime(anyhow::anyhow!("tokenizing the prompt: {e}")))?;
    let mut placeholders = Vec::new();
    for (m, p) in &defaults.placeholders {
        let id = tokenizer.token_to_id(p).ok_or_else(|| {
            Error::Runtime(anyhow::anyhow!(
                "the tokenizer has no {p} token for {m} items"
            ))
        })?;
        placeholders.push((*m, id));
    }
    let expansions: Vec<(Modality, Expansion)> = media
        .iter()
        .zip(items)
        .map(|(m, e)| (m.item.modality(), e.expansion.clone()))
        .collect();
    let what = if plan.raw {
        "--raw prompt"
    } else {
        "rendered prompt"
    };
    prompt::splice(encoding.get_ids(), &placeholders, &expansions, what)
}

/// EOS ids: generation_config.json, else config.json (top level or text_config), else the
/// tokenizer's `eos_token`.
fn eos_ids(
    dir: &ModelDir,
    tokenizer: &Tokenizer,
    tok_config: Option<&serde_json::Value>,
) -> Result<Vec<u32>> {
    fn ids(v: Option<&serde_json::Value>) -> Option<Vec<u32>> {
        let v = v?;
        if let Some(n) = v.as_u64() {
            return Some(vec![n as u32]);
        }
        let list: Vec<u32> = v
            .as_array()?
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|n| n as u32)
            .collect();
        (!list.is_empty()).then_some(list)
    }
    if let Some(text) = read_optional(dir, "generation_config.json")? {
        let gen: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::input(
                "generation_config.json",
                format!("not valid JSON: {e}"),
                "a JSON object",
            )
        })?;
        if let Some(list) = ids(gen.get("eos_token_id")) {
            return Ok(list);
        }
    }
    let config = dir.config()?;
    if let Some(list) = ids(config.get("eos_token_id")).or_else(|| {
        ids(config
            .get("text_config")
            .and_then(|t| t.get("eos_token_id")))
    }) {
        return Ok(list);
    }
    Ok(tok_config
        .and_then(|c| c.get("eos_token"))
        .and_then(template::token_text)
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
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // SAFETY: candle runs everything on this device's one stream, where frees and copies
        // are stream-ordered, so the per-tensor events cudarc records for multi-stream use
        // (a few microseconds of host time per kernel argument) guard nothing here.
        unsafe { d.disable_event_tracking() };
    }
    let dtype = match dtype {
        DTypeArg::Auto if device.is_cuda() => DType::BF16,
        DTypeArg::Auto | DTypeArg::F32 => DType::F32,
        DTypeArg::Bf16 => DType::BF16,
        DTypeArg::F16 => DType::F16,
    };
    Ok((device, dtype))
}

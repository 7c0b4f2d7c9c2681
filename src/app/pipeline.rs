//! The steps every request goes through, shared by one-shot commands and batch: resolve the
//! model, check limits and decode media (before weights), load, then render the prompt, encode
//! the media and splice them into a request for the engine.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;

use super::plan::{InputKind, MediaInput, Plan};
use crate::engine::device::{self, DTypeChoice, DeviceChoice};
use crate::engine::generate::Request;
use crate::error::{Error, Result};
use crate::hub::{self, HubOptions, ModelDir};
use crate::media::{self, MediaItem, Modality};
use crate::models::registry;
use crate::models::{EncodedItem, Family, FamilyDefaults, LoadContext, Model, ProcessorKwargs};
use crate::prompt::build::{AssetFiles, PromptAssets, PromptInput, PromptItem};
use crate::prompt::template::TemplateFiles;
use crate::prompt::Spliced;
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
    let dir = hub::resolve(model, &registry::aliases(), &HubOptions::from_env()?)?;
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
    if let Some(hidden) = resolved.defaults.embeds_hidden {
        for m in &media {
            check_embeds_shape(m, resolved.defaults.embeds_tokens, hidden)?;
        }
    }
    Ok(media)
}

/// Refuses embeddings that are not `(tokens, hidden)` / `(1, tokens, hidden)` with the
/// family's row count (when it fixes one) and the model's hidden size, naming the expected
/// shape; the family checks the rest (grids, dtype) once loaded.
fn check_embeds_shape(m: &MediaInput, tokens: Option<usize>, hidden: usize) -> Result<()> {
    let MediaItem::Embeds(e) = &m.item else {
        return Ok(());
    };
    let name = format!("{}_embeds", e.modality.name());
    let Some(t) = e.tensors.get(&name) else {
        return Ok(());
    };
    let rows = tokens.map_or("tokens".to_string(), |n| n.to_string());
    match t.dims() {
        [n, h] | [1, n, h] if *h == hidden && tokens.is_none_or(|want| want == *n) => Ok(()),
        dims => Err(Error::input(
            &m.input,
            format!("{name} has shape {dims:?}"),
            format!("({rows}, {hidden}) or (1, {rows}, {hidden}), {hidden} being the model's hidden size"),
        )),
    }
}

/// For `--dry-run`: refuses a prompt whose text alone (system prompt included, media and
/// template not counted) takes more tokens than the model has positions. Reads the tokenizer
/// when it is on disk (a dry run downloads nothing), never the weights.
pub fn check_text_length(plan: &Plan, resolved: &Resolved) -> Result<()> {
    let Some(max) = resolved.defaults.max_positions else {
        return Ok(());
    };
    if !resolved.dir.root.join("tokenizer.json").is_file() {
        return Ok(());
    }
    let tokenizer = load_tokenizer(&resolved.dir)?;
    let mut tokens = 0;
    for text in [Some(&plan.prompt), plan.system.as_ref()]
        .into_iter()
        .flatten()
    {
        tokens += tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| Error::Runtime(anyhow::anyhow!("tokenizing the prompt: {e}")))?
            .len();
    }
    if tokens >= max {
        return Err(Error::input(
            "prompt",
            format!("the text alone is {tokens} tokens"),
            format!("fewer than the model's {max} positions"),
        ));
    }
    Ok(())
}

/// A model with its weights, tokenizer and prompting facts loaded.
pub struct Loaded {
    pub model: Box<dyn Model>,
    pub tokenizer: Arc<Tokenizer>,
    /// Chat template, BOS/EOS and placeholders, read once here.
    pub prompt: PromptAssets,
    pub load_s: f64,
}

/// Loads the tokenizer, the prompting files and the weights (downloading missing files first).
pub fn load(resolved: &Resolved, device: DeviceChoice, dtype: DTypeChoice) -> Result<Loaded> {
    let start = Instant::now();
    let dir = &resolved.dir;
    let extra_dirs = resolve_extra_models(resolved)?;
    let tokenizer = Arc::new(load_tokenizer(dir)?);
    let files = AssetFiles {
        templates: TemplateFiles {
            override_file: None,
            jinja: read_optional(dir, "chat_template.jinja")?,
            json: read_optional(dir, "chat_template.json")?,
            tokenizer_config: read_optional_json(dir, "tokenizer_config.json")?,
        },
        generation_config: read_optional_json(dir, "generation_config.json")?,
    };
    let prompt = PromptAssets::new(
        files,
        &resolved.config,
        resolved.defaults.prompt.clone(),
        &tokenizer,
    )?;
    let (device, dtype) = device::select(device, dtype)?;
    // Resolving the weight files downloads any that are missing before the loader maps them.
    dir.weight_files()?;
    let spinner = sink::spinner("loading model");
    let model = (resolved.family.load)(&LoadContext {
        dir: dir.root.clone(),
        extra_dirs,
        config: resolved.config.clone(),
        device,
        dtype,
    })?;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    Ok(Loaded {
        model,
        tokenizer,
        prompt,
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
            let extra = hub::resolve(&extra.reference, &registry::aliases(), &opts)
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
    warn_cut_audio(resolved, loaded, media);
    let items = encode_media(loaded, media, &plan.kwargs)?;
    request_with_items(plan, resolved, loaded, media, items, started)
}

/// Says on stderr when an audio item is longer than the model reads (the rest is dropped, as
/// the reference processor drops it).
fn warn_cut_audio(resolved: &Resolved, loaded: &Loaded, media: &[MediaInput]) {
    let Some(window) = loaded.model.audio_window_s() else {
        return;
    };
    for m in media {
        if let MediaItem::Audio(a) = &m.item {
            let seconds = a.samples.len() as f64 / f64::from(a.sample_rate.max(1));
            if seconds > window {
                eprintln!(
                    "mmllm: warning: {}: {seconds:.1} s of audio, but {} reads only the first \
                     {window} s; the rest is ignored",
                    m.input, resolved.defaults.family
                );
            }
        }
    }
}

/// Encodes the media of several requests together (one encoder pass where the family can
/// stack them) and builds each request; one result per `(plan, media)`, in order.
pub fn requests_batched(
    resolved: &Resolved,
    loaded: &Loaded,
    batch: &[(&Plan, &[MediaInput])],
) -> Vec<Result<Request>> {
    let started = Instant::now();
    for (_, media) in batch {
        warn_cut_audio(resolved, loaded, media);
    }
    let kwargs: Vec<Vec<ProcessorKwargs>> = batch
        .iter()
        .map(|(plan, media)| plan.kwargs.for_items(media.iter().map(|m| &m.item)))
        .collect();
    let all: Vec<(&MediaInput, &ProcessorKwargs)> = batch
        .iter()
        .zip(&kwargs)
        .flat_map(|((_, media), kwargs)| media.iter().zip(kwargs))
        .collect();
    let items: Vec<(&MediaItem, &ProcessorKwargs)> =
        all.iter().map(|(m, kwargs)| (&m.item, *kwargs)).collect();
    let mut encoded = loaded
        .model
        .encode_batch(&items)
        .into_iter()
        .zip(&all)
        .map(|(r, (m, _))| r.map_err(|e| renamed(e, m)));
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
            let input = PromptInput {
                model: &resolved.name,
                text: &plan.prompt,
                system: plan.system.as_deref(),
                raw: plan.raw,
                chat_template: plan.chat_template.as_ref(),
                turns: plan.turns.as_deref(),
            };
            let prompt_items: Vec<PromptItem> = media
                .iter()
                .zip(&items)
                .map(|(m, e)| PromptItem {
                    input: &m.input,
                    modality: m.item.modality(),
                    expansion: &e.expansion,
                })
                .collect();
            loaded
                .prompt
                .build(&loaded.tokenizer, &input, &prompt_items)?
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
            loaded.prompt.eos().to_vec()
        },
        logprobs: plan.gen.logprobs,
        started,
    })
}

/// Encodes every media item; a model's input errors are renamed after the item.
fn encode_media(
    loaded: &Loaded,
    media: &[MediaInput],
    kwargs: &ProcessorKwargs,
) -> Result<Vec<EncodedItem>> {
    let kwargs = kwargs.for_items(media.iter().map(|m| &m.item));
    media
        .iter()
        .zip(&kwargs)
        .map(|(m, kwargs)| {
            loaded
                .model
                .encode_with(&m.item, kwargs)
                .map_err(|e| renamed(e, m))
        })
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
        fetch: plan.fetch.clone(),
    };
    let mut out = Vec::new();
    for arg in &plan.media {
        let (modality, embeds) = match arg.kind {
            InputKind::Media(m) => (m, false),
            InputKind::Embeds(m) => (m, true),
        };
        let input = arg.source.display();
        let mut item = media::load(&arg.source, modality, embeds, &opts, stdin)?;
        if let MediaItem::Embeds(mut e) = item {
            for (name, source) in &plan.extra_tensors {
                let bytes = source.read(modality, media::MAX_EMBEDS_BYTES, &plan.fetch, stdin)?;
                e = media::embeds::merge_embeds(e, name, &bytes, &source.display())?;
            }
            item = MediaItem::Embeds(e);
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

fn read_optional_json(dir: &ModelDir, name: &str) -> Result<Option<serde_json::Value>> {
    read_optional(dir, name)?
        .map(|text| {
            serde_json::from_str(&text)
                .map_err(|e| Error::input(name, format!("not valid JSON: {e}"), "a JSON object"))
        })
        .transpose()
}

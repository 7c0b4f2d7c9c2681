//! Second stage of argument handling: the one settings struct (filled from the command line's
//! flags, or a merged manifest job) becomes a validated [`Plan`]. Defaults live here, once.
//! Every usage and input error (exit 2) is raised here or in [`Plan::check_against`], before
//! weights load.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use crate::cli::{Command, OutputFormat};
use crate::engine::device::{DTypeChoice, DeviceChoice};
use crate::engine::sampler::SamplingParams;
use crate::error::{Error, Result};
use crate::manifest::{Job, Settings};
use crate::media::source::{FetchPolicy, Source};
use crate::media::video::FrameSampling;
use crate::media::{MediaItem, Modality};
use crate::models::{FamilyDefaults, ProcessorKwargs};

/// Tokens generated when neither a flag nor the manifest says.
pub const DEFAULT_MAX_TOKENS: usize = 256;
/// Temperature when unset: greedy decoding.
pub const DEFAULT_TEMPERATURE: f64 = 0.0;
/// Sampling seed when unset.
pub const DEFAULT_SEED: u64 = 0;
/// Prompt text refused before tokenizing (far beyond any context we run: tokenizing it
/// would cost seconds and gigabytes before the length check).
pub const DEFAULT_MAX_PROMPT_BYTES: u64 = 4 << 20;

/// What kind of input a media argument is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Media(Modality),
    /// Precomputed embeddings standing for items of this modality.
    Embeds(Modality),
}

/// A media argument, parsed but not yet read.
#[derive(Debug, Clone)]
pub struct MediaArg {
    pub source: Source,
    pub kind: InputKind,
}

/// A decoded media item with the name errors use for it.
#[derive(Debug, Clone)]
pub struct MediaInput {
    pub input: String,
    pub item: MediaItem,
}

/// Generation settings of one prompt.
#[derive(Debug, Clone)]
pub struct GenSettings {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
}

/// A validated one-shot request.
#[derive(Debug, Clone)]
pub struct Plan {
    pub model: String,
    pub id: String,
    pub prompt: String,
    pub system: Option<String>,
    /// A conversation (from the server's `messages`) rendered instead of `system` + `prompt`;
    /// `prompt` then holds the last user text (for families that build their own prompt).
    pub turns: Option<Vec<crate::prompt::build::Turn>>,
    pub raw: bool,
    /// `--chat-template FILE`: (path, contents).
    pub chat_template: Option<(String, String)>,
    pub media: Vec<MediaArg>,
    /// Extra tensors for embeds (`image_grid_thw`, `image_sizes`) from separate files.
    pub extra_tensors: Vec<(String, Source)>,
    pub limits: BTreeMap<Modality, usize>,
    pub frames: FrameSampling,
    pub as_images: bool,
    pub sample_rate: Option<u32>,
    /// Processor settings (`--min-pixels`, `--max-pixels`).
    pub kwargs: ProcessorKwargs,
    pub gen: GenSettings,
    pub output: OutputFormat,
    pub device: DeviceChoice,
    pub dtype: DTypeChoice,
    pub dry_run: bool,
    /// What media URLs may reach.
    pub fetch: FetchPolicy,
}

/// What one invocation sets beside its [`Settings`].
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub id: String,
    pub output: OutputFormat,
    pub device: DeviceChoice,
    pub dtype: DTypeChoice,
    pub dry_run: bool,
    pub fetch: FetchPolicy,
}

impl Plan {
    /// Validates one prompt's settings (a command line's or a merged manifest job's). With
    /// `stdin`, `-` may stand for the prompt or one media item (read from it); without, `-`
    /// is refused as a media item.
    pub fn from_settings(
        s: &Settings,
        run: RunOptions,
        mut stdin: Option<&mut dyn Read>,
    ) -> Result<Plan> {
        let embeds_modality = match s.modality.as_deref() {
            None | Some("image") => Modality::Image,
            Some("video") => Modality::Video,
            Some("audio") => Modality::Audio,
            Some(other) => {
                return Err(Error::usage(format!(
                    "modality {other:?} (expected image, video or audio)"
                )))
            }
        };
        let mut media = Vec::new();
        for (list, kind) in [
            (&s.images, InputKind::Media(Modality::Image)),
            (&s.videos, InputKind::Media(Modality::Video)),
            (&s.audios, InputKind::Media(Modality::Audio)),
            (&s.embeds, InputKind::Embeds(embeds_modality)),
        ] {
            for item in list.iter().flatten() {
                if item == "-" && stdin.is_none() {
                    return Err(Error::usage(
                        "`-` (standard input) cannot be used in a manifest (expected a path or URL)",
                    ));
                }
                media.push(MediaArg {
                    source: Source::parse(item)?,
                    kind,
                });
            }
        }
        let prompt = s.prompt.clone().ok_or_else(|| {
            Error::usage(
                "no prompt given (expected the prompt text as the last argument, or -p TEXT)",
            )
        })?;
        let stdin_uses = media
            .iter()
            .filter(|a| matches!(a.source, Source::Stdin))
            .count()
            + usize::from(prompt == "-" && stdin.is_some());
        if stdin_uses > 1 {
            return Err(Error::usage(
                "-: standard input is used more than once (expected `-` for at most one media item or the prompt)",
            ));
        }
        let max_prompt =
            crate::media::env_u64("MMLLM_MAX_PROMPT_BYTES")?.unwrap_or(DEFAULT_MAX_PROMPT_BYTES);
        let prompt = match stdin.as_mut() {
            Some(input) if prompt == "-" => {
                let mut text = String::new();
                input
                    .take(max_prompt + 1)
                    .read_to_string(&mut text)
                    .map_err(|e| {
                        Error::input(
                            "<stdin>",
                            format!("cannot read the prompt: {e}"),
                            "UTF-8 text",
                        )
                    })?;
                text.trim_end_matches(['\n', '\r']).to_string()
            }
            _ => prompt,
        };
        if prompt.len() as u64 > max_prompt {
            return Err(Error::input(
                "prompt",
                format!("longer than {max_prompt} bytes"),
                "a shorter prompt (or a larger MMLLM_MAX_PROMPT_BYTES)",
            ));
        }
        let mut extra_tensors = Vec::new();
        for (name, file) in [
            ("image_grid_thw", &s.image_grid_thw),
            ("image_sizes", &s.image_sizes),
        ] {
            if let Some(f) = file {
                if s.embeds.is_none() {
                    return Err(Error::usage(format!(
                        "{name}: given without embeddings (expected it only with embeds input)"
                    )));
                }
                extra_tensors.push((name.to_string(), Source::parse(f)?));
            }
        }
        let chat_template = match &s.chat_template {
            Some(path) => Some((path.clone(), read_template(Path::new(path))?)),
            None => None,
        };
        let limits = match &s.limit_mm_per_prompt {
            Some(spec) => parse_limits(spec)?,
            None => BTreeMap::new(),
        };
        let frames = frame_sampling(s.num_frames.map(|n| n as usize), s.fps)?;
        for (name, n) in [("min", s.min_pixels), ("max", s.max_pixels)] {
            if n == Some(0) {
                return Err(Error::usage(format!(
                    "--{name}-pixels: 0 (expected a positive number of pixels)"
                )));
            }
        }
        if s.max_slice_nums == Some(0) {
            return Err(Error::usage(
                "--max-slice-nums: 0 (expected a positive number of slices)",
            ));
        }
        if let Some(n) = s.num_crops.filter(|n| !(1..=MAX_NUM_CROPS).contains(n)) {
            return Err(Error::usage(format!(
                "--num-crops: {n} (expected 1 to {MAX_NUM_CROPS} crops per image)"
            )));
        }
        let sample_rate = match s.sample_rate.map(u32::try_from) {
            Some(Ok(0)) | Some(Err(_)) => {
                return Err(Error::usage(format!(
                    "--sample-rate: {} Hz (expected a positive rate such as 16000)",
                    s.sample_rate.unwrap_or_default()
                )))
            }
            Some(Ok(rate)) => Some(rate),
            None => None,
        };
        Ok(Plan {
            model: s.model.clone().unwrap_or_default(),
            id: run.id,
            prompt,
            system: s.system.clone(),
            turns: None,
            raw: s.raw.unwrap_or(false),
            chat_template,
            media,
            extra_tensors,
            limits,
            frames,
            as_images: s.as_images.unwrap_or(false),
            sample_rate,
            kwargs: ProcessorKwargs {
                min_pixels: s.min_pixels,
                max_pixels: s.max_pixels,
                max_slice_nums: s.max_slice_nums,
                num_crops: s.num_crops,
                ..Default::default()
            },
            gen: gen_settings(s)?,
            output: run.output,
            device: run.device,
            dtype: run.dtype,
            dry_run: run.dry_run,
            fetch: run.fetch,
        })
    }

    /// Builds the plan of a prompting command; reads the prompt (or one media item) from
    /// `stdin` where the command line says `-`.
    pub fn from_command(cmd: &Command, stdin: &mut dyn Read) -> Result<Plan> {
        let (settings, gen) = cmd
            .settings()
            .ok_or_else(|| Error::usage("not a prompting command"))?;
        let exact = cmd.exact_media_paths().map_err(Error::usage)?;
        let run = RunOptions {
            id: gen.id.clone(),
            output: gen.output,
            device: DeviceChoice::parse(&gen.device)?,
            dtype: gen.dtype.into(),
            dry_run: gen.dry_run,
            fetch: FetchPolicy {
                allow_private: gen.allow_private_media_urls,
                ..FetchPolicy::default()
            },
        };
        let mut plan = Self::from_settings(&settings, run, Some(stdin))?;
        // One command fills one media list, so positional index k is the plan's item k.
        for (k, path) in exact {
            if let Some(arg) = plan.media.get_mut(k) {
                arg.source = Source::Path(path);
            }
        }
        Ok(plan)
    }

    /// Builds the plan of one batch job (its settings already merged with the defaults).
    pub fn from_job(
        job: &Job,
        device: DeviceChoice,
        dtype: DTypeChoice,
        fetch: &FetchPolicy,
    ) -> Result<Plan> {
        let run = RunOptions {
            id: job.id.clone(),
            output: OutputFormat::Jsonl,
            device,
            dtype,
            dry_run: false,
            fetch: fetch.clone(),
        };
        Self::from_settings(&job.settings, run, None)
    }

    /// How many items of each modality the prompt will hold (video frames sent as images count
    /// as images; `frames` is the number sampled per video when known).
    pub fn item_counts(&self, frames: Option<usize>) -> BTreeMap<Modality, usize> {
        let mut counts = BTreeMap::new();
        for arg in &self.media {
            let (modality, n) = match arg.kind {
                InputKind::Media(Modality::Video) if self.as_images => {
                    (Modality::Image, frames.unwrap_or(1))
                }
                InputKind::Media(m) | InputKind::Embeds(m) => (m, 1),
            };
            *counts.entry(modality).or_insert(0) += n;
        }
        counts
    }

    /// Checks the media counts against the model's limits (overridden by
    /// `--limit-mm-per-prompt`) and, for `--raw`, against the prompt's placeholders.
    pub fn check_against(
        &self,
        defaults: &FamilyDefaults,
        counts: &BTreeMap<Modality, usize>,
    ) -> Result<()> {
        let accepted: Vec<String> = defaults.limits.keys().map(|m| m.to_string()).collect();
        let accepted = if accepted.is_empty() {
            "text only".to_string()
        } else {
            accepted.join(", ")
        };
        for m in self.limits.keys() {
            if !defaults.limits.contains_key(m) {
                return Err(Error::usage(format!(
                    "--limit-mm-per-prompt: model {} ({}) does not accept {m} input (expected {accepted})",
                    self.model, defaults.family
                )));
            }
        }
        if defaults.prompt.own_prompt {
            let given = [
                ("--system", self.system.is_some()),
                ("--chat-template", self.chat_template.is_some()),
                ("--raw", self.raw),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
                return Err(Error::usage(format!(
                    "{flag}: model {} ({}) builds its own prompt from the text, with no chat \
                     template (expected only the prompt text)",
                    self.model, defaults.family
                )));
            }
            if let Some(check) = defaults.prompt.check_text {
                check(&self.prompt)?;
            }
        }
        for name in self.kwargs.given() {
            if !defaults.processor_kwargs.contains(&name) {
                return Err(Error::usage(format!(
                    "--{} ({name}): model {} ({}) has no such processor setting (expected {})",
                    name.replace('_', "-"),
                    self.model,
                    defaults.family,
                    one_of(
                        defaults.processor_kwargs,
                        "no processor settings for this model"
                    )
                )));
            }
        }
        for (name, _) in &self.extra_tensors {
            if !defaults.embeds_tensors.contains(&name.as_str()) {
                return Err(Error::usage(format!(
                    "--{} ({name}): model {} ({}) does not take it with embeddings (expected {})",
                    name.replace('_', "-"),
                    self.model,
                    defaults.family,
                    one_of(defaults.embeds_tensors, "embeddings alone")
                )));
            }
        }
        let embeds_modality = self.media.iter().find_map(|a| match a.kind {
            InputKind::Embeds(m) => Some(m),
            _ => None,
        });
        if let Some(m) = embeds_modality {
            if defaults.embeds != Some(m) {
                return Err(Error::usage(format!(
                    "model {} ({}) does not accept {m} embeddings (expected {})",
                    self.model,
                    defaults.family,
                    defaults
                        .embeds
                        .map(|e| format!("{e} embeddings"))
                        .unwrap_or_else(|| "raw media, no embeddings".into())
                )));
            }
        }
        for (m, &n) in counts {
            let Some(&default_limit) = defaults.limits.get(m) else {
                return Err(Error::usage(format!(
                    "model {} ({}) does not accept {m} input (expected {accepted})",
                    self.model, defaults.family
                )));
            };
            let limit = self.limits.get(m).copied().unwrap_or(default_limit);
            if n > limit {
                return Err(Error::usage(format!(
                    "{n} {m} items given but at most {limit} per prompt allowed (expected at most \
                     {limit}; raise it with --limit-mm-per-prompt {m}={n})"
                )));
            }
        }
        if let Some(tags) = &defaults.prompt.numbered_tags {
            let items = counts.get(&tags.modality).copied().unwrap_or(0);
            if self.raw {
                tags.check(&self.prompt, items, "--raw prompt")?;
            } else if let Some((range, _)) = tags.find(&self.prompt).first() {
                // The processor would take it for a tag, on top of those mmllm writes.
                return Err(Error::input(
                    "prompt",
                    format!("tag {} in a templated prompt", &self.prompt[range.clone()]),
                    "no tags (mmllm writes them), or --raw with the whole prompt",
                ));
            }
        }
        if self.raw {
            for (m, placeholder) in &defaults.prompt.placeholders {
                let found = crate::prompt::count_placeholders(&self.prompt, placeholder);
                let want = counts.get(m).copied().unwrap_or(0);
                if found != want {
                    return Err(Error::input(
                        "--raw prompt",
                        format!("{found} {placeholder} placeholder(s) for {want} {m} item(s)"),
                        format!("exactly one {placeholder} per {m} item"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Most `--num-crops`: each crop is a 336x336 float tensor and 144 prompt tokens.
const MAX_NUM_CROPS: u64 = 64;

/// Chat templates are a few kilobytes; a larger file is a mistake (or `/dev/zero`).
const MAX_TEMPLATE_BYTES: u64 = 1 << 20;

fn read_template(path: &Path) -> Result<String> {
    let bad = |problem: String| {
        Error::input(
            path.display().to_string(),
            problem,
            format!(
                "a readable UTF-8 Jinja template file of at most {} KiB",
                MAX_TEMPLATE_BYTES >> 10
            ),
        )
    };
    let file = std::fs::File::open(path)
        .map_err(|e| bad(format!("cannot read the chat template: {e}")))?;
    let mut text = String::new();
    file.take(MAX_TEMPLATE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad(format!("cannot read the chat template: {e}")))?;
    if text.len() as u64 > MAX_TEMPLATE_BYTES {
        return Err(bad("the chat template is too large".into()));
    }
    Ok(text)
}

/// `a, b or c` for error messages, or `none` when the list is empty.
fn one_of(names: &[&str], none: &str) -> String {
    match names {
        [] => none.to_string(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// `image=2,video=1,audio=1`.
pub fn parse_limits(spec: &str) -> Result<BTreeMap<Modality, usize>> {
    let bad = |part: &str, why: &str| {
        Error::usage(format!(
            "--limit-mm-per-prompt: {part:?} {why} (expected MODALITY=N pairs separated by commas, \
             MODALITY one of image, video, audio)"
        ))
    };
    let mut out = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, n) = part.split_once('=').ok_or_else(|| bad(part, "has no ="))?;
        let modality = match name.trim() {
            "image" => Modality::Image,
            "video" => Modality::Video,
            "audio" => Modality::Audio,
            _ => return Err(bad(part, "names an unknown modality")),
        };
        let n: usize = n
            .trim()
            .parse()
            .map_err(|_| bad(part, "is not a whole number"))?;
        if out.insert(modality, n).is_some() {
            return Err(bad(part, "repeats a modality"));
        }
    }
    if out.is_empty() {
        return Err(bad(spec, "is empty"));
    }
    Ok(out)
}

fn frame_sampling(num_frames: Option<usize>, fps: Option<f64>) -> Result<FrameSampling> {
    match (num_frames, fps) {
        (Some(0), _) => Err(Error::usage("--num-frames: 0 (expected at least 1 frame)")),
        (Some(n), _) => Ok(FrameSampling::NumFrames(n)),
        (None, Some(f)) if !(f.is_finite() && f > 0.0) => Err(Error::usage(format!(
            "--fps: {f} (expected a positive number of frames per second)"
        ))),
        (None, Some(f)) => Ok(FrameSampling::Fps(f)),
        (None, None) => Ok(FrameSampling::Default),
    }
}

/// Generation settings with the defaults filled in, checked.
pub(crate) fn gen_settings(s: &Settings) -> Result<GenSettings> {
    let sampling = SamplingParams {
        temperature: s.temperature.unwrap_or(DEFAULT_TEMPERATURE),
        top_p: s.top_p,
        top_k: s.top_k.map(|k| k as usize),
        repetition_penalty: s.repetition_penalty.map(|p| p as f32),
        seed: s.seed.unwrap_or(DEFAULT_SEED),
    };
    sampling.validate()?;
    let max_tokens = s.max_tokens.map_or(DEFAULT_MAX_TOKENS, |n| n as usize);
    if max_tokens == 0 {
        return Err(Error::usage("--max-tokens: 0 (expected at least 1)"));
    }
    let stop = s.stop.clone().unwrap_or_default();
    if stop.iter().any(|s| s.is_empty()) {
        return Err(Error::usage("--stop: empty string (expected some text)"));
    }
    let logprobs = s.logprobs.map(|n| n as usize);
    if logprobs == Some(0) || logprobs.is_some_and(|n| n > 20) {
        return Err(Error::usage(
            "--logprobs: out of range (expected 1 to 20 alternatives)",
        ));
    }
    Ok(GenSettings {
        sampling,
        max_tokens,
        stop,
        logprobs,
        ignore_eos: s.ignore_eos.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_and_reject_garbage() {
        let l = parse_limits("image=2, video=1").unwrap();
        assert_eq!(l[&Modality::Image], 2);
        assert_eq!(l[&Modality::Video], 1);
        for bad in ["image", "picture=1", "image=x", "image=1,image=2", ""] {
            let err = parse_limits(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
        }
    }
}

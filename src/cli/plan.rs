//! Second stage of argument handling: clap's structs become a validated [`Plan`]. Every usage
//! and input error (exit 2) is raised here or in the checks below, before weights load.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use super::{Command, DTypeArg, FrameArgs, GenArgs, ModalityArg, OutputFormat, PromptArgs};
use crate::engine::sampler::SamplingParams;
use crate::error::{Error, Result};
use crate::manifest::Job;
use crate::media::source::Source;
use crate::media::video::FrameSampling;
use crate::media::{MediaItem, Modality};
use crate::models::FamilyDefaults;

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

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
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
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
    pub gen: GenSettings,
    pub output: OutputFormat,
    pub device: DeviceChoice,
    pub dtype: DTypeArg,
    pub dry_run: bool,
}

impl Plan {
    /// Builds the plan of a prompting command; reads the prompt from `stdin` if it is `-`.
    pub fn from_command(cmd: &Command, stdin: &mut dyn Read) -> Result<Plan> {
        let (prompt, gen, kind, frames, as_images) = match cmd {
            Command::Image(a) => (
                &a.prompt,
                &a.gen,
                InputKind::Media(Modality::Image),
                None,
                false,
            ),
            Command::Video(a) => (
                &a.prompt,
                &a.gen,
                InputKind::Media(Modality::Video),
                Some(&a.sampling),
                a.as_images,
            ),
            Command::Audio(a) => (
                &a.prompt,
                &a.gen,
                InputKind::Media(Modality::Audio),
                None,
                false,
            ),
            Command::Embeds(a) => (
                &a.prompt,
                &a.gen,
                InputKind::Embeds(modality_of(a.modality)),
                None,
                false,
            ),
            Command::Batch(_) | Command::GenerateDocs { .. } | Command::ProfileDecode { .. } => {
                return Err(Error::usage("not a prompting command"))
            }
        };
        let (media_args, prompt_text) = split_positionals(prompt)?;
        let stdin_uses = media_args.iter().filter(|a| a.as_str() == "-").count()
            + usize::from(prompt_text == "-");
        if stdin_uses > 1 {
            return Err(Error::usage(
                "-: standard input is used more than once (expected `-` for at most one media item or the prompt)",
            ));
        }
        let prompt_text = if prompt_text == "-" {
            let mut s = String::new();
            stdin.read_to_string(&mut s).map_err(|e| {
                Error::input(
                    "<stdin>",
                    format!("cannot read the prompt: {e}"),
                    "UTF-8 text",
                )
            })?;
            s.trim_end_matches(['\n', '\r']).to_string()
        } else {
            prompt_text
        };
        let media = media_args
            .iter()
            .map(|a| {
                Ok(MediaArg {
                    source: Source::parse(a)?,
                    kind,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut extra_tensors = Vec::new();
        if let Command::Embeds(a) = cmd {
            for (name, file) in [
                ("image_grid_thw", &a.image_grid_thw),
                ("image_sizes", &a.image_sizes),
            ] {
                if let Some(f) = file {
                    extra_tensors.push((name.to_string(), Source::parse(f)?));
                }
            }
        }
        let chat_template = match &prompt.chat_template {
            Some(path) => Some((path.display().to_string(), read_template(path)?)),
            None => None,
        };
        let limits = match &prompt.limit_mm_per_prompt {
            Some(spec) => parse_limits(spec)?,
            None => BTreeMap::new(),
        };
        let frames = frame_sampling(frames.cloned().unwrap_or_default())?;
        let (sample_rate, min_pixels, max_pixels) = match cmd {
            Command::Audio(a) => (a.sample_rate, None, None),
            Command::Image(a) => (None, a.vision.min_pixels, a.vision.max_pixels),
            Command::Video(a) => (None, a.vision.min_pixels, a.vision.max_pixels),
            _ => (None, None, None),
        };
        if sample_rate == Some(0) {
            return Err(Error::usage(
                "--sample-rate: 0 Hz (expected a positive rate such as 16000)",
            ));
        }
        Ok(Plan {
            model: gen.model.clone(),
            id: gen.id.clone(),
            prompt: prompt_text,
            system: prompt.system.clone(),
            raw: prompt.raw,
            chat_template,
            media,
            extra_tensors,
            limits,
            frames,
            as_images,
            sample_rate,
            min_pixels,
            max_pixels,
            gen: gen_settings(gen)?,
            output: gen.output,
            device: parse_device(&gen.device)?,
            dtype: gen.dtype,
            dry_run: gen.dry_run,
        })
    }

    /// Builds the plan of one batch job (its settings already merged with the defaults).
    pub fn from_job(job: &Job, device: DeviceChoice, dtype: DTypeArg) -> Result<Plan> {
        let s = &job.settings;
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
                if item == "-" {
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
        let chat_template = match &s.chat_template {
            Some(path) => Some((path.clone(), read_template(Path::new(path))?)),
            None => None,
        };
        let limits = match &s.limit_mm_per_prompt {
            Some(spec) => parse_limits(spec)?,
            None => BTreeMap::new(),
        };
        let frames = frame_sampling(FrameArgs {
            num_frames: s.num_frames.map(|n| n as usize),
            fps: s.fps,
        })?;
        if s.sample_rate == Some(0) {
            return Err(Error::usage("sample_rate: 0 Hz (expected a positive rate)"));
        }
        let defaults = GenArgs::default_for(job.model());
        let gen = GenArgs {
            max_tokens: s.max_tokens.map_or(defaults.max_tokens, |n| n as usize),
            temperature: s.temperature.unwrap_or(defaults.temperature),
            top_p: s.top_p,
            top_k: s.top_k.map(|k| k as usize),
            repetition_penalty: s.repetition_penalty.map(|p| p as f32),
            seed: s.seed.unwrap_or(defaults.seed),
            stop: s.stop.clone().unwrap_or_default(),
            logprobs: s.logprobs.map(|n| n as usize),
            ignore_eos: s.ignore_eos.unwrap_or(false),
            ..defaults
        };
        Ok(Plan {
            model: job.model().to_string(),
            id: job.id.clone(),
            prompt: s.prompt.clone().unwrap_or_default(),
            system: s.system.clone(),
            raw: s.raw.unwrap_or(false),
            chat_template,
            media,
            extra_tensors: Vec::new(),
            limits,
            frames,
            as_images: s.as_images.unwrap_or(false),
            sample_rate: s.sample_rate.map(|r| r as u32),
            min_pixels: s.min_pixels,
            max_pixels: s.max_pixels,
            gen: gen_settings(&gen)?,
            output: OutputFormat::Jsonl,
            device,
            dtype,
            dry_run: false,
        })
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
        if self.raw {
            for (m, placeholder) in &defaults.placeholders {
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

fn read_template(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        Error::input(
            path.display().to_string(),
            format!("cannot read the chat template: {e}"),
            "a readable Jinja template file",
        )
    })
}

fn modality_of(m: ModalityArg) -> Modality {
    match m {
        ModalityArg::Image => Modality::Image,
        ModalityArg::Video => Modality::Video,
        ModalityArg::Audio => Modality::Audio,
    }
}

/// Media arguments and the prompt: with `-p` every positional is media; otherwise the last one
/// is the prompt, unless it names media (an existing path or a URL), in which case the prompt
/// is empty (`mmllm audio --model whisper speech.wav`).
fn split_positionals(args: &PromptArgs) -> Result<(Vec<String>, String)> {
    if let Some(p) = &args.prompt {
        return Ok((args.inputs.clone(), p.clone()));
    }
    let mut media = args.inputs.clone();
    let last = media.pop().ok_or_else(|| {
        Error::usage("no prompt given (expected the prompt text as the last argument, or -p TEXT)")
    })?;
    let names_media = ["http://", "https://", "data:"]
        .iter()
        .any(|p| last.starts_with(p))
        || (last != "-" && std::path::Path::new(&last).exists());
    if names_media {
        media.push(last);
        return Ok((media, String::new()));
    }
    Ok((media, last))
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

fn frame_sampling(args: FrameArgs) -> Result<FrameSampling> {
    match (args.num_frames, args.fps) {
        (Some(0), _) => Err(Error::usage("--num-frames: 0 (expected at least 1 frame)")),
        (Some(n), _) => Ok(FrameSampling::NumFrames(n)),
        (None, Some(f)) if !(f.is_finite() && f > 0.0) => Err(Error::usage(format!(
            "--fps: {f} (expected a positive number of frames per second)"
        ))),
        (None, Some(f)) => Ok(FrameSampling::Fps(f)),
        (None, None) => Ok(FrameSampling::Default),
    }
}

fn gen_settings(g: &GenArgs) -> Result<GenSettings> {
    let sampling = SamplingParams {
        temperature: g.temperature,
        top_p: g.top_p,
        top_k: g.top_k,
        repetition_penalty: g.repetition_penalty,
        seed: g.seed,
    };
    sampling.validate()?;
    if g.max_tokens == 0 {
        return Err(Error::usage("--max-tokens: 0 (expected at least 1)"));
    }
    if g.stop.iter().any(|s| s.is_empty()) {
        return Err(Error::usage("--stop: empty string (expected some text)"));
    }
    if g.logprobs == Some(0) || g.logprobs.is_some_and(|n| n > 20) {
        return Err(Error::usage(
            "--logprobs: out of range (expected 1 to 20 alternatives)",
        ));
    }
    Ok(GenSettings {
        sampling,
        max_tokens: g.max_tokens,
        stop: g.stop.clone(),
        logprobs: g.logprobs,
        ignore_eos: g.ignore_eos,
    })
}

/// `auto`, `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> Result<DeviceChoice> {
    let bad = || {
        Error::usage(format!(
            "--device: {s:?} (expected auto, cpu, cuda or cuda:N)"
        ))
    };
    match s {
        "auto" => Ok(DeviceChoice::Auto),
        "cpu" => Ok(DeviceChoice::Cpu),
        "cuda" => Ok(DeviceChoice::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceChoice::Cuda)
            .ok_or_else(bad),
    }
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

    #[test]
    fn devices() {
        assert_eq!(parse_device("cuda:1").unwrap(), DeviceChoice::Cuda(1));
        assert_eq!(parse_device("cuda").unwrap(), DeviceChoice::Cuda(0));
        assert_eq!(parse_device("cpu").unwrap(), DeviceChoice::Cpu);
        assert!(parse_device("gpu").is_err());
        assert!(parse_device("cuda:x").is_err());
    }
}

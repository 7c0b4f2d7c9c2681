//! The one clap definition of the command line. It feeds `--help`, the man pages and the
//! shell completions, and turns a prompting command's flags into the one settings struct a
//! manifest job also fills (`manifest::Settings`); `app::plan` validates both alike.
//! Nothing imports this module except `app` and `main`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::engine::device::DTypeChoice;
use crate::manifest::Settings;

/// Prompt multimodal language models: images, video, audio and precomputed embeddings in,
/// generated text out.
#[derive(Debug, Parser)]
#[command(
    name = "mmllm",
    version,
    about,
    long_about = "Prompt multimodal language models: images, video, audio and precomputed \
embeddings in; generated text out, streamed to stdout or written as JSONL. Inference runs \
in-process on candle (CPU, or CUDA when built with --features cuda).\n\n\
stdout carries only results; logs, progress and stats go to stderr.\n\
Exit codes: 0 success, 1 runtime failure, 2 usage or input error, 130 interrupted.",
    after_help = "Examples:\n  mmllm image --model llava photo.jpg \"What is in this image?\"\n  \
mmllm video --model qwen2-vl --as-images --num-frames 4 clip.mp4 \"Describe these frames\"\n  \
mmllm audio --model ultravox speech.wav \"What is said?\"\n  \
mmllm image --model llava \"$FILE\" -p \"$PROMPT\"   (in scripts: -p, so no prompt is read as media)\n  \
mmllm embeds --model llava image_embeds.safetensors \"What is in this image?\"\n  \
mmllm batch jobs.yaml -o results.jsonl\n  \
mmllm batch jobs.yaml --shard 2/8 -o 'out-{shard}.jsonl'\n  \
mmllm merge out-*.jsonl --manifest jobs.yaml -o results.jsonl\n  \
mmllm serve --model qwen2-vl --port 8000"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Prompt a model with one or more images.
    Image(ImageArgs),
    /// Prompt a model with a video file or a directory of frames.
    Video(VideoArgs),
    /// Prompt a model with audio (WAV, mp3, flac, ogg, m4a, .npy).
    Audio(AudioArgs),
    /// Prompt a model with precomputed embeddings instead of raw media.
    Embeds(EmbedsArgs),
    /// Run a YAML (or JSONL) manifest of jobs, writing one JSONL result per job.
    Batch(BatchArgs),
    /// Join the outputs of sharded batch runs into one JSONL file, in manifest order.
    Merge(MergeArgs),
    /// Serve the model over HTTP with the OpenAI Chat Completions API (POST
    /// /v1/chat/completions, GET /v1/models, /health, /metrics); concurrent requests share one
    /// continuous batch. SIGTERM stops new requests and lets in-flight ones finish.
    Serve(ServeArgs),
    /// Time single-token decode steps of a model (for bench/gpu.py): step wall time, host
    /// time to enqueue a step and GPU time to run it. Prints a JSON line.
    #[command(hide = true)]
    ProfileDecode {
        #[arg(long)]
        model: String,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, value_enum, default_value = "auto")]
        dtype: DTypeArg,
        /// Prompt length (token ids 1..) prefilled before the timed steps.
        #[arg(long, default_value_t = 128)]
        context: usize,
        /// Decode steps timed (after 8 untimed ones).
        #[arg(long, default_value_t = 64)]
        steps: usize,
        /// Also time encoding this image (preprocessing and vision tower).
        #[arg(long)]
        image: Option<PathBuf>,
    },
    /// Time decoding an image file and one image processor on it (for bench/cpu.py): the best
    /// of `--runs` runs of each. Prints a JSON line; `--dump` writes the pixel values as .npy.
    #[command(hide = true)]
    ProfilePreprocess {
        /// The image file.
        image: PathBuf,
        /// Which processor: transformers' slow `CLIPImageProcessor` or `Qwen2VLImageProcessor`.
        #[arg(long, value_enum)]
        processor: ProcessorArg,
        /// A `preprocessor_config.json` (default: the processor's transformers defaults).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Timed runs of decode and of preprocessing (after one untimed run).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
        runs: u32,
        /// Write the `pixel_values` (f32, the processor's output shape) to this .npy file.
        #[arg(long, value_name = "FILE")]
        dump: Option<PathBuf>,
    },
    /// Write the man pages and shell completions (for packagers).
    #[command(hide = true)]
    GenerateDocs {
        /// Directory under which `man/` and `completions/` are written.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
}

/// The image processors `profile-preprocess` can time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProcessorArg {
    Clip,
    #[value(name = "qwen2-vl")]
    Qwen2Vl,
}

/// Media items followed by the prompt text.
#[derive(Debug, Args, Clone)]
pub struct PromptArgs {
    /// Media items (path, http(s):// URL, data: URL, or - for stdin), then the prompt text
    /// last (unless -p is given). A prompt of - is read from stdin.
    #[arg(value_name = "MEDIA... PROMPT")]
    pub inputs: Vec<OsString>,

    /// The prompt text (then every positional argument is a media item); - reads stdin.
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,

    /// System prompt, added as a system turn of the chat template.
    #[arg(long)]
    pub system: Option<String>,

    /// Send the prompt verbatim, without the chat template; it must contain one placeholder
    /// (e.g. <image>) per media item.
    #[arg(long)]
    pub raw: bool,

    /// Jinja chat template file overriding the model's.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,

    /// Maximum media items per prompt, e.g. image=2,video=1,audio=1 (default: the model's).
    #[arg(long, value_name = "MODALITY=N,...")]
    pub limit_mm_per_prompt: Option<String>,
}

/// Model choice, generation and output flags shared by every prompting command.
#[derive(Debug, Args, Clone)]
pub struct GenArgs {
    /// Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory.
    #[arg(short, long, env = "MMLLM_MODEL")]
    pub model: String,

    /// Output format: text streams tokens to stdout; jsonl prints one JSON object per prompt.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// Maximum number of tokens to generate [default: 256].
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<u64>,

    /// Sampling temperature; 0 is greedy decoding [default: 0].
    #[arg(long, value_name = "T")]
    pub temperature: Option<f64>,

    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f64>,

    /// Keep only the K most likely tokens when sampling.
    #[arg(long, value_name = "K")]
    pub top_k: Option<u64>,

    /// Penalise tokens already in the prompt or output (1.0 = off), as Hugging Face does.
    #[arg(long)]
    pub repetition_penalty: Option<f64>,

    /// Random seed for sampling [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,

    /// Stop generating when this text appears (repeatable); it is not printed.
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,

    /// Also report the N most likely tokens and their log-probabilities at each step (jsonl).
    #[arg(long, value_name = "N")]
    pub logprobs: Option<u64>,

    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Weights dtype: auto (bf16 on CUDA, f32 on CPU), bf16, f16 or f32.
    #[arg(long, value_enum, default_value_t = DTypeArg::Auto)]
    pub dtype: DTypeArg,

    /// Keep generating past the end-of-sequence token (for benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,

    /// Id reported in jsonl output.
    #[arg(long, default_value = "0")]
    pub id: String,

    /// Decode the inputs and print the validated plan as JSON without loading weights.
    #[arg(long)]
    pub dry_run: bool,

    /// Allow media URLs on loopback, private, link-local and cloud-metadata addresses (refused
    /// by default, as a server must).
    #[arg(long)]
    pub allow_private_media_urls: bool,
}

#[derive(Debug, Args, Clone)]
pub struct ImageArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub gen: GenArgs,
    #[command(flatten)]
    pub vision: VisionArgs,
}

/// Resolution bounds for models that resize by pixel budget (Qwen2-VL, Qwen2.5-VL), as their
/// Hugging Face processors' `min_pixels` / `max_pixels`; refused for other models.
#[derive(Debug, Args, Clone, Default)]
pub struct VisionArgs {
    /// Minimum pixels per image or video frame after resizing (models that resize by pixel
    /// budget, e.g. Qwen2-VL; default: the model's processor config).
    #[arg(long, value_name = "N")]
    pub min_pixels: Option<u64>,
    /// Maximum pixels per image or video frame after resizing (models that resize by pixel
    /// budget, e.g. Qwen2-VL; default: the model's processor config).
    #[arg(long, value_name = "N")]
    pub max_pixels: Option<u64>,
    /// The most slices one high-resolution image is cut into (MiniCPM-V's processor kwarg
    /// `max_slice_nums`; default: the model's processor config).
    #[arg(long, value_name = "N")]
    pub max_slice_nums: Option<u64>,
    /// Most 336-pixel crops an image is tiled into (models that tile images into a grid of
    /// crops, e.g. Phi-3-vision; default: the model's processor config).
    #[arg(long, value_name = "N")]
    pub num_crops: Option<u64>,
}

#[derive(Debug, Args, Clone)]
pub struct VideoArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub gen: GenArgs,
    #[command(flatten)]
    pub vision: VisionArgs,
    #[command(flatten)]
    pub sampling: FrameArgs,
    /// Send the sampled frames as a multi-image prompt (counted against the image limit).
    #[arg(long)]
    pub as_images: bool,
}

#[derive(Debug, Args, Clone, Default)]
pub struct FrameArgs {
    /// Sample N frames uniformly over the whole video.
    #[arg(long, value_name = "N", conflicts_with = "fps")]
    pub num_frames: Option<u64>,
    /// Sample frames at F frames per second.
    #[arg(long, value_name = "F")]
    pub fps: Option<f64>,
}

#[derive(Debug, Args, Clone)]
pub struct AudioArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub gen: GenArgs,
    /// Sample rate of .npy inputs (raw float arrays carry none).
    #[arg(long, value_name = "HZ")]
    pub sample_rate: Option<u64>,
}

#[derive(Debug, Args, Clone)]
pub struct EmbedsArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub gen: GenArgs,
    /// Which modality the embeddings stand for.
    #[arg(long, value_enum, default_value_t = ModalityArg::Image)]
    pub modality: ModalityArg,
    /// image_grid_thw tensor (num_items, 3) for Qwen2-VL, when not in the embeds file.
    #[arg(long, value_name = "FILE")]
    pub image_grid_thw: Option<String>,
    /// image_sizes tensor for MiniCPM-V, when not in the embeds file.
    #[arg(long, value_name = "FILE")]
    pub image_sizes: Option<String>,
}

#[derive(Debug, Args, Clone)]
pub struct BatchArgs {
    /// The manifest: YAML (defaults + jobs) or JSONL (one job per line).
    pub manifest: PathBuf,
    /// Write results here (JSONL) instead of stdout; {shard} in the path becomes the shard,
    /// K-of-N with K zero-padded (out-{shard}.jsonl: out-03-of-12.jsonl).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Run only shard K of N (0-based): the jobs whose id hashes to K (FNV-1a 64 of the id,
    /// mod N). The whole manifest is still validated. Overrides the environment.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<String>,
    /// Number of shards when the shard index comes from the environment: Kubernetes'
    /// JOB_COMPLETION_INDEX, or a Slurm task whose SLURM_ARRAY_TASK_ID is then the index itself
    /// (to rerun some tasks: --array=3,7). Also MMLLM_SHARDS=N. Without --shard or --shards,
    /// a Slurm array task takes shard ID-MIN of SLURM_ARRAY_TASK_COUNT.
    #[arg(long, value_name = "N", value_parser = at_least_one, conflicts_with = "shard")]
    pub shards: Option<usize>,
    /// Check every job's media before running any, and fail listing all problems.
    #[arg(long)]
    pub strict: bool,
    /// Confine the manifest's local files (media, embeds, extra tensors, chat templates) to
    /// DIR: each path is resolved (`..` and symlinks followed) and must lie inside it. For
    /// manifests from an untrusted source; model folders and URLs are not affected.
    #[arg(long, value_name = "DIR")]
    pub media_root: Option<PathBuf>,
    /// Skip jobs whose id already has a result in the output file, and append.
    #[arg(long, requires = "output")]
    pub resume: bool,
    /// Write results in completion order instead of manifest order.
    #[arg(long)]
    pub unordered: bool,
    /// Most sequences of one model generated at once (continuous batching).
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = at_least_one)]
    pub max_seqs: usize,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Weights dtype: auto (bf16 on CUDA, f32 on CPU), bf16, f16 or f32.
    #[arg(long, value_enum, default_value_t = DTypeArg::Auto)]
    pub dtype: DTypeArg,
    /// Allow media URLs on loopback, private, link-local and cloud-metadata addresses.
    #[arg(long)]
    pub allow_private_media_urls: bool,
}

#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Model: an alias (llava, qwen2-vl, ...), a Hugging Face repo id, or a local directory.
    /// Requests must name it as their `model`.
    #[arg(short, long, env = "MMLLM_MODEL")]
    pub model: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 requests.
    #[arg(long, env = "MMLLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Serve file:// media URLs below this directory (after resolving .. and links); without
    /// it file:// URLs are refused.
    #[arg(long, value_name = "DIR")]
    pub allowed_local_media_path: Option<PathBuf>,
    /// Fetch media URLs only from these hosts (comma-separated, exact host names).
    #[arg(long, value_name = "HOST,...")]
    pub allowed_media_domains: Option<String>,
    /// Allow media URLs on loopback, private, link-local and cloud-metadata addresses.
    #[arg(long)]
    pub allow_private_media_urls: bool,
    /// Maximum media items per prompt, e.g. image=2,video=1,audio=1 (default: the model's).
    #[arg(long, value_name = "MODALITY=N,...")]
    pub limit_mm_per_prompt: Option<String>,
    /// Most sequences generated at once (continuous batching).
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = at_least_one)]
    pub max_seqs: usize,
    /// Requests queued beyond --max-seqs before new ones get 429 with Retry-After.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = at_least_one)]
    pub max_waiting: usize,
    /// Largest request body in bytes (base64 media included); larger ones get 413.
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20)]
    pub max_request_bytes: usize,
    /// Seconds in-flight requests may take to finish after SIGTERM.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub shutdown_grace: f64,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Weights dtype: auto (bf16 on CUDA, f32 on CPU), bf16, f16 or f32.
    #[arg(long, value_enum, default_value_t = DTypeArg::Auto)]
    pub dtype: DTypeArg,
}

#[derive(Debug, Args, Clone)]
pub struct MergeArgs {
    /// Results files of `mmllm batch` runs (e.g. out-*.jsonl), read in this order.
    #[arg(required = true, value_name = "FILE")]
    pub inputs: Vec<PathBuf>,
    /// Write the merged JSONL here instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// The manifest the runs came from: lines follow its order, and jobs with no result
    /// (missing, or only error lines) are listed with exit status 1. Without it, ids keep the
    /// order in which the inputs first name them.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Jsonl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    Auto,
    Bf16,
    F16,
    F32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModalityArg {
    Image,
    Video,
    Audio,
}

impl From<DTypeArg> for DTypeChoice {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::Auto => DTypeChoice::Auto,
            DTypeArg::Bf16 => DTypeChoice::Bf16,
            DTypeArg::F16 => DTypeChoice::F16,
            DTypeArg::F32 => DTypeChoice::F32,
        }
    }
}

impl Command {
    /// A prompting command's flags as the settings a manifest job would give, with the
    /// positional media under their modality's key; `None` for other commands.
    pub fn settings(&self) -> Option<(Settings, &GenArgs)> {
        let (prompt, gen) = match self {
            Command::Image(a) => (&a.prompt, &a.gen),
            Command::Video(a) => (&a.prompt, &a.gen),
            Command::Audio(a) => (&a.prompt, &a.gen),
            Command::Embeds(a) => (&a.prompt, &a.gen),
            _ => return None,
        };
        let (media, text) = split_positionals(prompt);
        let mut s = Settings {
            model: Some(gen.model.clone()),
            prompt: text,
            system: prompt.system.clone(),
            raw: Some(prompt.raw),
            chat_template: prompt
                .chat_template
                .as_ref()
                .map(|p| p.display().to_string()),
            limit_mm_per_prompt: prompt.limit_mm_per_prompt.clone(),
            max_tokens: gen.max_tokens,
            temperature: gen.temperature,
            top_p: gen.top_p,
            top_k: gen.top_k,
            repetition_penalty: gen.repetition_penalty,
            seed: gen.seed,
            stop: Some(gen.stop.clone()),
            logprobs: gen.logprobs,
            ignore_eos: Some(gen.ignore_eos),
            ..Settings::default()
        };
        let vision = |s: &mut Settings, v: &VisionArgs| {
            s.min_pixels = v.min_pixels;
            s.max_pixels = v.max_pixels;
            s.max_slice_nums = v.max_slice_nums;
            s.num_crops = v.num_crops;
        };
        match self {
            Command::Image(a) => {
                s.images = Some(media);
                vision(&mut s, &a.vision);
            }
            Command::Video(a) => {
                s.videos = Some(media);
                vision(&mut s, &a.vision);
                s.num_frames = a.sampling.num_frames;
                s.fps = a.sampling.fps;
                s.as_images = Some(a.as_images);
            }
            Command::Audio(a) => {
                s.audios = Some(media);
                s.sample_rate = a.sample_rate;
            }
            Command::Embeds(a) => {
                s.embeds = Some(media);
                s.modality = Some(a.modality.name().to_string());
                s.image_grid_thw = a.image_grid_thw.clone();
                s.image_sizes = a.image_sizes.clone();
            }
            _ => {}
        }
        Some((s, gen))
    }
}

impl ModalityArg {
    pub fn name(self) -> &'static str {
        match self {
            ModalityArg::Image => "image",
            ModalityArg::Video => "video",
            ModalityArg::Audio => "audio",
        }
    }
}

impl Command {
    /// Positional media whose names are not valid UTF-8, by their index among the media: the
    /// settings hold them under a lossy name, and they are read from these exact paths. A
    /// prompt that is not valid UTF-8 is an error.
    pub fn exact_media_paths(&self) -> Result<Vec<(usize, PathBuf)>, String> {
        let prompt = match self {
            Command::Image(a) => &a.prompt,
            Command::Video(a) => &a.prompt,
            Command::Audio(a) => &a.prompt,
            Command::Embeds(a) => &a.prompt,
            _ => return Ok(Vec::new()),
        };
        let (media, text) = split_os(prompt);
        if let Some(text) = text {
            if text.to_str().is_none() {
                return Err(format!(
                    "the prompt {:?} is not valid UTF-8 (expected UTF-8 text)",
                    text.to_string_lossy()
                ));
            }
        }
        Ok(media
            .into_iter()
            .enumerate()
            .filter(|(_, m)| m.to_str().is_none())
            .map(|(i, m)| (i, PathBuf::from(m)))
            .collect())
    }
}

/// Media arguments and the prompt: with `-p` every positional is media; otherwise the last one
/// is the prompt, unless it names media (an existing path or a URL), in which case the prompt
/// is empty (`mmllm audio --model whisper speech.wav`). No positional and no `-p`: no prompt.
/// Names that are not valid UTF-8 come out lossy (see [`Command::exact_media_paths`]).
fn split_positionals(args: &PromptArgs) -> (Vec<String>, Option<String>) {
    let (media, text) = split_os(args);
    let lossy = |s: OsString| s.to_string_lossy().into_owned();
    (media.into_iter().map(lossy).collect(), text.map(lossy))
}

fn split_os(args: &PromptArgs) -> (Vec<OsString>, Option<OsString>) {
    if let Some(p) = &args.prompt {
        return (args.inputs.clone(), Some(p.into()));
    }
    let mut media = args.inputs.clone();
    let Some(last) = media.pop() else {
        return (media, None);
    };
    let text = last.to_string_lossy();
    let names_media = ["http://", "https://", "data:"]
        .iter()
        .any(|p| text.starts_with(p))
        || (last != "-" && std::path::Path::new(&last).exists());
    if names_media {
        media.push(last);
        return (media, Some(OsString::new()));
    }
    (media, Some(last))
}

/// Writes `man/*.1` (one page per subcommand) and `completions/*` under `out_dir`.
pub fn generate_docs(out_dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let man_dir = out_dir.join("man");
    let comp_dir = out_dir.join("completions");
    std::fs::create_dir_all(&man_dir)?;
    std::fs::create_dir_all(&comp_dir)?;
    for (name, page) in man_pages(&cmd) {
        std::fs::write(man_dir.join(name), page)?;
    }
    for (name, text) in completions(&cmd) {
        std::fs::write(comp_dir.join(name), text)?;
    }
    Ok(())
}

/// Man pages as (file name, contents): the top command and each visible subcommand.
pub fn man_pages(cmd: &clap::Command) -> Vec<(String, Vec<u8>)> {
    let mut pages = Vec::new();
    let mut render = |c: clap::Command, name: String| {
        let mut buf = Vec::new();
        // Rendering into a Vec cannot fail.
        let _ = clap_mangen::Man::new(c).render(&mut buf);
        pages.push((format!("{name}.1"), buf));
    };
    render(cmd.clone(), "mmllm".into());
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("mmllm-{}", sub.get_name());
        render(sub.clone().name(name.clone()), name);
    }
    pages
}

/// Shell completions as (file name, contents).
pub fn completions(cmd: &clap::Command) -> Vec<(String, Vec<u8>)> {
    use clap_complete::Shell;
    [
        (Shell::Bash, "mmllm.bash"),
        (Shell::Zsh, "_mmllm"),
        (Shell::Fish, "mmllm.fish"),
        (Shell::PowerShell, "_mmllm.ps1"),
    ]
    .into_iter()
    .map(|(shell, file)| {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "mmllm", &mut buf);
        (file.to_string(), buf)
    })
    .collect()
}

/// A count of 1 or more.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a whole number of at least 1")),
    }
}

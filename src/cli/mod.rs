//! The one clap definition of the command line. It feeds `--help`, the man pages and the
//! shell completions. `plan` turns parsed arguments into a validated [`plan::Plan`].
//! Nothing else in the crate imports this module except `app` and `main`.

pub mod plan;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
mmllm embeds --model llava image_embeds.safetensors \"What is in this image?\"\n  \
mmllm batch jobs.yaml -o results.jsonl"
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
    /// Write the man pages and shell completions (for packagers).
    #[command(hide = true)]
    GenerateDocs {
        /// Directory under which `man/` and `completions/` are written.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
}

/// Media items followed by the prompt text.
#[derive(Debug, Args, Clone)]
pub struct PromptArgs {
    /// Media items (path, http(s):// URL, data: URL, or - for stdin), then the prompt text
    /// last (unless -p is given). A prompt of - is read from stdin.
    #[arg(value_name = "MEDIA... PROMPT")]
    pub inputs: Vec<String>,

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

    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,

    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,

    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f64>,

    /// Keep only the K most likely tokens when sampling.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,

    /// Penalise tokens already in the prompt or output (1.0 = off), as Hugging Face does.
    #[arg(long)]
    pub repetition_penalty: Option<f32>,

    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Stop generating when this text appears (repeatable); it is not printed.
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,

    /// Also report the N most likely tokens and their log-probabilities at each step (jsonl).
    #[arg(long, value_name = "N")]
    pub logprobs: Option<usize>,

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
}

impl GenArgs {
    /// The flags' defaults for `model`, as if nothing else were given (batch jobs start here).
    pub fn default_for(model: &str) -> GenArgs {
        // Parsing a minimal command line keeps these defaults identical to the flags'.
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            gen: GenArgs,
        }
        let mut gen = Only::parse_from(["mmllm", "--model", "m"]).gen;
        gen.model = model.to_string();
        gen
    }
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

/// Resolution bounds for models with dynamic resolution (Qwen2-VL family).
#[derive(Debug, Args, Clone, Default)]
pub struct VisionArgs {
    /// Minimum pixels per image after resizing (dynamic-resolution models).
    #[arg(long)]
    pub min_pixels: Option<u64>,
    /// Maximum pixels per image after resizing (dynamic-resolution models).
    #[arg(long)]
    pub max_pixels: Option<u64>,
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
    pub num_frames: Option<usize>,
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
    pub sample_rate: Option<u32>,
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
    /// Write results here (JSONL) instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Check every job's media before running any, and fail listing all problems.
    #[arg(long)]
    pub strict: bool,
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

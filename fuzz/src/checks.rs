//! What each fuzz target does with one input, shared by the targets in `fuzz/fuzz_targets/`
//! and by the regression test `tests/it/fuzz_regressions.rs`, which replays the inputs in
//! `tests/data/fuzz/<target>/` through the same checks. Each check calls the function the CLI
//! calls, with the CLI's limits, and panics where the code under test misbehaves: a panic,
//! an error that is not an input error (exit 2), or a broken invariant.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mmllm::app::pipeline::{self, Loaded};
use mmllm::engine::device::{DTypeChoice, DeviceChoice};
use mmllm::error::Result;
use mmllm::media::fetch::FetchPolicy;
use mmllm::media::{self, embeds, source::Source, MediaItem, Modality, MAX_AUDIO_BYTES};
use mmllm::models::family::ProcessorKwargs;
use mmllm::prompt::build::{PromptInput, PromptItem};
use mmllm::prompt::Expansion;

/// What a target does with one input.
pub type Check = fn(&[u8]);

/// The targets, by name (the binaries in `fuzz/Cargo.toml`, the folders of the corpora).
pub const TARGETS: [(&str, Check); 9] = [
    ("image", image),
    ("wav", wav),
    ("npy", npy),
    ("embeds", embeds),
    ("manifest_yaml", manifest_yaml),
    ("manifest_jsonl", manifest_jsonl),
    ("data_url", data_url),
    ("chat_template", chat_template),
    ("chat_request", chat_request),
];

/// A `POST /v1/chat/completions` body through the function the server calls: it parses, or
/// it is refused with a 4xx (never a 5xx, never a panic).
pub fn chat_request(bytes: &[u8]) {
    if let Err(e) = mmllm::app::serve::openai::parse_chat_request(bytes) {
        assert!(
            (400..500).contains(&e.status),
            "{}: {}",
            e.status,
            e.message
        );
    }
}

/// A user's bad input must end in an input error (exit 2), never in anything else.
fn input_error<T>(result: Result<T>, what: &str) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            assert_eq!(e.exit_code(), 2, "{what}: not an input error: {e}");
            None
        }
    }
}

/// Image decode + EXIF orientation + alpha, for every format we accept (JPEG, PNG, WebP, GIF,
/// BMP), with the CLI's default limits: what `media::load` does with an image's bytes.
pub fn image(bytes: &[u8]) {
    let limits = media::image::ImageLimits::default();
    let probed = media::image::probe_image(bytes, "fuzz", &limits);
    if let Some(img) = input_error(media::image::decode_image(bytes, "fuzz", &limits), "image") {
        // The probe (header + EXIF) must agree with the decode on the upright size.
        let (w, h) = probed.expect("the probe refused an image that decodes");
        assert_eq!(
            (img.width(), img.height()),
            (w, h),
            "probe and decode disagree"
        );
    }
}

/// WAV through hound: `decode_audio`'s native path. Bytes hound cannot read go to ffmpeg
/// there, which this leaves out (spawning it per input would be all the fuzzer did).
pub fn wav(bytes: &[u8]) {
    // The CLI decodes at the file's own rate (`None`); the model resamples later.
    if let Some(result) = media::audio::decode_wav_audio(bytes, "fuzz.wav", None) {
        if let Some(audio) = input_error(result, "wav") {
            assert!(!audio.samples.is_empty() && audio.sample_rate > 0);
        }
    }
}

/// `.npy` arrays, both ways a user hands one in: audio with `--sample-rate`
/// (`audio_from_npy`) and embeddings (`load_embeds`, which sniffs the NumPy magic).
pub fn npy(bytes: &[u8]) {
    input_error(
        media::audio::audio_from_npy(bytes, "fuzz.npy", 16_000, None),
        "npy audio",
    );
    input_error(
        embeds::load_embeds(bytes, "fuzz.npy", Modality::Image),
        "npy embeds",
    );
}

/// Embeddings files (safetensors, `.pt` zip + pickle subset, `.npy`) as `--image-embeds` /
/// `--audio-embeds` read them: `load_embeds`, then `merge_embeds` of a second file
/// (`--image-grid-thw FILE`), the calls `media::load` and the pipeline make.
pub fn embeds(bytes: &[u8]) {
    let modality = match bytes.first() {
        Some(b) if b & 1 == 1 => Modality::Audio,
        _ => Modality::Image,
    };
    if let Some(e) = input_error(embeds::load_embeds(bytes, "fuzz", modality), "embeds") {
        input_error(
            embeds::merge_embeds(e, "image_grid_thw", bytes, "fuzz"),
            "merge_embeds",
        );
    }
}

/// The YAML batch manifest: `manifest::parse`, as `manifest::load` calls it for a `.yaml`
/// file (after its byte cap, which fuzz inputs stay far below).
pub fn manifest_yaml(bytes: &[u8]) {
    // `load` reads the file as UTF-8 text and refuses anything else first.
    if let Ok(text) = std::str::from_utf8(bytes) {
        let parsed = mmllm::manifest::parse(text, "fuzz.yaml", Path::new("base"), false);
        input_error(parsed, "yaml manifest");
    }
}

/// The JSONL batch manifest (one job per line), as `manifest::load` parses a `.jsonl` file.
pub fn manifest_jsonl(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let parsed = mmllm::manifest::parse(text, "fuzz.jsonl", Path::new("base"), true);
        input_error(parsed, "jsonl manifest");
    }
}

/// Media arguments: `Source::parse` classifies them and decodes `data:` URLs at parse time;
/// a data URL's bytes are then read under the modality's byte cap, as `media::load` does.
/// Input: `data:` is put in front unless the input starts with `!` (then taken as is).
pub fn data_url(bytes: &[u8]) {
    let Ok(arg) = std::str::from_utf8(bytes) else {
        return;
    };
    let arg = match arg.strip_prefix('!') {
        Some(rest) => rest.to_string(),
        None => format!("data:{arg}"),
    };
    if let Some(source @ Source::DataUrl { .. }) = input_error(Source::parse(&arg), "data url") {
        assert!(source.display().starts_with("data:"));
        let mut no_stdin = std::io::empty();
        // The default policy: what the CLI applies without --allow-private-media-urls.
        let policy = FetchPolicy::default();
        let read = source.read(Modality::Audio, MAX_AUDIO_BYTES, &policy, &mut no_stdin);
        if let Some(b) = input_error(read, "data url read") {
            assert!(b.len() as u64 <= MAX_AUDIO_BYTES);
        }
    }
}

/// The tiny fixtures whose real tokenizer, chat template and processors `chat_template` uses.
const FIXTURES: [&str; 6] = [
    "llava-tiny",
    "llava-onevision-tiny",
    "qwen2-vl-tiny",
    "qwen2_5-vl-tiny",
    "qwen2-audio-tiny",
    "ultravox-tiny",
];

struct Fixture {
    name: &'static str,
    loaded: Loaded,
    /// One real encoded item's expansion per modality the model accepts.
    expansions: BTreeMap<Modality, Expansion>,
    /// The placeholder token id of each modality.
    placeholder_ids: Vec<u32>,
}

/// The repository root (this file is compiled from `fuzz/` and from the main crate's tests).
fn repo_root() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    if dir.join("tests/fixtures").is_dir() {
        dir.to_path_buf()
    } else {
        dir.join("..")
    }
}

fn sample_item(modality: Modality) -> MediaItem {
    let read = |rel: &str| std::fs::read(repo_root().join(rel)).expect("fixture media");
    let image = || {
        let bytes = read("tests/data/image/gray.jpg");
        media::image::decode_image(&bytes, "gray.jpg", &Default::default()).expect("gray.jpg")
    };
    match modality {
        Modality::Image => MediaItem::Image(image()),
        Modality::Video => MediaItem::Video(media::Video {
            frames: vec![image(), image()],
            timestamps: vec![0.0, 1.0],
            source_fps: 1.0,
            duration: 2.0,
        }),
        Modality::Audio => {
            let bytes = read("tests/data/audio/speech_mono.wav");
            let audio = media::audio::decode_audio(&bytes, "speech_mono.wav", Some(16_000));
            MediaItem::Audio(audio.expect("speech_mono.wav"))
        }
    }
}

fn load_fixture(name: &'static str) -> Fixture {
    let dir = repo_root().join("tests/fixtures").join(name);
    let resolved = pipeline::resolve(&dir.to_string_lossy()).expect("fixture config");
    let loaded = pipeline::load(&resolved, DeviceChoice::Cpu, DTypeChoice::F32).expect("fixture");
    let mut expansions = BTreeMap::new();
    let mut placeholder_ids = Vec::new();
    for (&modality, text) in &resolved.defaults.prompt.placeholders {
        let id = loaded
            .tokenizer
            .token_to_id(text)
            .expect("placeholder token");
        placeholder_ids.push(id);
        let item = sample_item(modality);
        let kwargs = ProcessorKwargs::default().for_prompt([&item]);
        let encoded = loaded.model.encode_with(&item, &kwargs).expect("encode");
        expansions.insert(modality, encoded.expansion);
    }
    Fixture {
        name,
        loaded,
        expansions,
        placeholder_ids,
    }
}

/// The fixtures, loaded once per thread (a model is `Send`, not `Sync`; libFuzzer runs one
/// thread) and kept for the life of the process.
fn fixtures() -> &'static [Fixture] {
    thread_local! {
        static LOADED: &'static [Fixture] =
            Vec::leak(FIXTURES.into_iter().map(load_fixture).collect());
    }
    LOADED.with(|f| *f)
}

/// Chat-template rendering + tokenizing + placeholder splicing with user text, through
/// `PromptAssets::build` (what the CLI calls) with the real tokenizers, templates and
/// processors of the tiny fixtures in `tests/fixtures/*-tiny/`.
///
/// Invariant: placeholder strings typed as text (`<image>`, `<|image_pad|>`, …) are treated
/// as text or refused, never spliced in as media positions: on success there is one span per
/// item over exactly its item's slots, and every placeholder token in the ids is one that the
/// items' expansions put there.
///
/// Input: byte 0 picks the fixture, byte 1 the flags (1 `--raw`, 2 `--system`, 4
/// `--chat-template`), bytes 2-3 the number of items per modality (2 bits each, then bit 2 of
/// byte 3 reverses their order); the rest is UTF-8 text, split at NULs into the prompt, the
/// system prompt and the template file.
pub fn chat_template(bytes: &[u8]) {
    let [pick, flags, counts_a, counts_b, rest @ ..] = bytes else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let fixture = &fixtures()[*pick as usize % FIXTURES.len()];
    let raw = flags & 1 != 0;
    let mut parts = text.split('\0');
    let prompt = parts.next().unwrap_or("");
    let system = (flags & 2 != 0).then(|| parts.next().unwrap_or(""));
    let template =
        (flags & 4 != 0).then(|| ("fuzz.jinja".to_string(), parts.next().unwrap_or("").into()));

    let counts = [counts_a & 3, (counts_a >> 2) & 3, counts_b & 3];
    let mut order: Vec<Modality> = Vec::new();
    for (i, m) in fixture.expansions.keys().enumerate() {
        order.extend(std::iter::repeat_n(*m, counts[i % 3] as usize));
    }
    if counts_b & 4 != 0 {
        order.reverse();
    }
    let items: Vec<PromptItem> = order
        .iter()
        .map(|m| PromptItem {
            input: "item",
            modality: *m,
            expansion: &fixture.expansions[m],
        })
        .collect();
    let input = PromptInput {
        model: fixture.name,
        text: prompt,
        system,
        raw,
        chat_template: template.as_ref(),
        turns: None,
    };
    let built = fixture
        .loaded
        .prompt
        .build(&fixture.loaded.tokenizer, &input, &items);
    let Some(spliced) = input_error(built, fixture.name) else {
        return;
    };

    // One span per item (in token order, which `--raw` may make differ from the items' order
    // across modalities), over exactly that item's slot tokens.
    let mut seen: Vec<usize> = spliced.spans.iter().map(|s| s.item).collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..items.len()).collect::<Vec<_>>(),
        "{}",
        fixture.name
    );
    for span in &spliced.spans {
        let exp = items[span.item].expansion;
        assert_eq!(span.len, exp.slots, "{}", fixture.name);
        let slots = &spliced.ids[span.start..span.start + span.len];
        assert!(
            slots.iter().all(|&t| t == exp.slot_token),
            "{}",
            fixture.name
        );
    }
    // Every placeholder token in the ids was put there by an item's expansion. (A slot token
    // that is no placeholder, Ultravox's EOS, is ordinary text elsewhere: the spans place it.)
    for &token in &fixture.placeholder_ids {
        let count = |v: &[u32]| v.iter().filter(|&&t| t == token).count();
        let found = count(&spliced.ids);
        let implied: usize = items
            .iter()
            .map(|item| {
                let e = item.expansion;
                let slots = if e.slot_token == token { e.slots } else { 0 };
                count(&e.before) + slots + count(&e.after)
            })
            .sum();
        assert_eq!(
            found, implied,
            "{}: token {token} is in the ids {found} times but the media imply {implied} \
             (raw={raw}, prompt={prompt:?})",
            fixture.name
        );
    }
}

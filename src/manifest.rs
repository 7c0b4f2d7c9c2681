//! Batch manifests (SPEC §6): YAML with `defaults` and `jobs`, or JSONL with one job per line.
//! The schema is strict: unknown keys, wrong types, duplicate ids and missing fields are all
//! reported at once, each with its line and column, before any model loads.
//!
//! YAML is read through yaml-rust2's event parser (this is the only module that knows it),
//! because positions are needed for every error, not only the first one.

use std::path::{Path, PathBuf};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::error::{Error, Result};

/// Declares [`Settings`] once: each key with its type and the reader that checks it. The struct,
/// the list of keys, the key-to-field match and the merge over `defaults` all come from here, so
/// a new setting is one line (and the code that uses it).
macro_rules! settings {
    ($($(#[$doc:meta])* $key:ident: $ty:ty = $read:ident,)*) => {
        /// Settings a job may set, each also allowed under `defaults`. The command line fills
        /// the same struct from its flags, so both go through one validation.
        #[derive(Debug, Clone, Default, PartialEq)]
        pub struct Settings {
            $($(#[$doc])* pub $key: Option<$ty>,)*
        }

        /// Every key of [`Settings`], in declaration order.
        pub const KEYS: &[&str] = &[$(stringify!($key)),*];

        impl Settings {
            /// Reads `key` from `f` into its field; false for an unknown key.
            fn read(&mut self, key: &str, f: &mut Field) -> bool {
                match key {
                    $(stringify!($key) => self.$key = f.$read(),)*
                    _ => return false,
                }
                true
            }

            /// Bytes of text these settings hold (what merging them into a job copies).
            fn text_bytes(&self) -> usize {
                0 $(+ self.$key.as_ref().map_or(0, TextBytes::text_bytes))*
            }

            /// These settings, each falling back to `defaults` where unset.
            pub fn or(&self, defaults: &Settings) -> Settings {
                Settings {
                    $($key: self.$key.clone().or_else(|| defaults.$key.clone()),)*
                }
            }
        }
    };
}

settings! {
    model: String = string,
    prompt: String = string,
    system: String = string,
    raw: bool = boolean,
    images: Vec<String> = strings,
    videos: Vec<String> = strings,
    audios: Vec<String> = strings,
    embeds: Vec<String> = strings,
    /// Modality the `embeds` stand for (`image` unless set).
    modality: String = string,
    /// `image_grid_thw` tensor file for `embeds` (Qwen2-VL), when not in the embeds file.
    image_grid_thw: String = string,
    /// `image_sizes` tensor file for `embeds` (MiniCPM-V), when not in the embeds file.
    image_sizes: String = string,
    max_tokens: u64 = uint,
    temperature: f64 = float,
    top_p: f64 = float,
    top_k: u64 = uint,
    repetition_penalty: f64 = float,
    seed: u64 = uint,
    stop: Vec<String> = strings,
    logprobs: u64 = uint,
    /// Keep generating past EOS (benchmarks).
    ignore_eos: bool = boolean,
    num_frames: u64 = uint,
    fps: f64 = float,
    as_images: bool = boolean,
    sample_rate: u64 = uint,
    min_pixels: u64 = uint,
    max_pixels: u64 = uint,
    /// MiniCPM-V's `max_slice_nums`: the most slices one image is cut into.
    max_slice_nums: u64 = uint,
    /// `image=2,video=1` or a mapping `{image: 2}`, normalised to the string form.
    limit_mm_per_prompt: String = limits,
    chat_template: String = string,
}

/// One job with the defaults applied and media paths resolved against the manifest's folder.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    /// Line of the job in the manifest (1-based).
    pub line: usize,
    pub settings: Settings,
}

impl Job {
    pub fn model(&self) -> &str {
        self.settings.model.as_deref().unwrap_or_default()
    }
}

/// Text a value holds, for the expansion cap.
trait TextBytes {
    fn text_bytes(&self) -> usize;
}

impl TextBytes for String {
    fn text_bytes(&self) -> usize {
        self.len()
    }
}

impl TextBytes for Vec<String> {
    fn text_bytes(&self) -> usize {
        self.iter().map(String::len).sum()
    }
}

macro_rules! no_text {
    ($($t:ty),*) => { $(impl TextBytes for $t { fn text_bytes(&self) -> usize { 0 } })* };
}
no_text!(u64, f64, bool);

/// Largest manifest file read.
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;
/// Most jobs in one manifest: `MMLLM_MAX_JOBS`, else a million (about a gigabyte validated).
pub const DEFAULT_MAX_JOBS: usize = 1_000_000;
/// Most bytes of job settings a manifest may expand to once `defaults` are copied into every
/// job (a large `defaults` text times many jobs would otherwise take gigabytes).
pub const MAX_EXPANDED_BYTES: usize = 1 << 30;

/// Reads and validates the manifest at `path` (YAML, or JSONL when it ends in `.jsonl`).
pub fn load(path: &Path) -> Result<Vec<Job>> {
    let unreadable = |e: std::io::Error| {
        Error::input(
            path.display().to_string(),
            format!("cannot read the manifest: {e}"),
            "a readable YAML or JSONL file",
        )
    };
    let size = std::fs::metadata(path).map_err(unreadable)?.len();
    if size > MAX_MANIFEST_BYTES {
        return Err(Error::input(
            path.display().to_string(),
            format!("the manifest is {size} bytes"),
            format!("a manifest of at most {MAX_MANIFEST_BYTES} bytes (split it)"),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(unreadable)?;
    let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let name = path.display().to_string();
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    parse(&text, &name, &base, jsonl)
}

/// Parses manifest `text`; `name` prefixes error positions, `base` resolves relative paths.
pub fn parse(text: &str, name: &str, base: &Path, jsonl: bool) -> Result<Vec<Job>> {
    let max_jobs =
        crate::limits::env_u64("MMLLM_MAX_JOBS")?.map_or(DEFAULT_MAX_JOBS, |n| n as usize);
    let too_many = |n: usize| {
        Error::input(
            name,
            format!("the manifest holds {n} jobs"),
            format!("at most {max_jobs} jobs per manifest (split it, or raise MMLLM_MAX_JOBS)"),
        )
    };
    let mut problems = Problems::default();
    let (defaults, jobs) = if jsonl {
        // Counted before any line is parsed: each job costs about a kilobyte once validated.
        let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
        if lines > max_jobs {
            return Err(too_many(lines));
        }
        (Settings::default(), jsonl_jobs(text, &mut problems))
    } else {
        yaml_jobs(text, &mut problems)
    };
    if jobs.len() > max_jobs {
        return Err(too_many(jobs.len()));
    }
    let expanded: usize = jobs
        .iter()
        .map(|(job, _)| job.settings.text_bytes() + defaults.text_bytes())
        .sum();
    if expanded > MAX_EXPANDED_BYTES {
        return Err(Error::input(
            name,
            format!(
                "{} jobs with `defaults` copied into each would hold {expanded} bytes of settings",
                jobs.len()
            ),
            format!(
                "at most {MAX_EXPANDED_BYTES} bytes: move long text out of `defaults`, or split \
                 the manifest"
            ),
        ));
    }
    let mut out: Vec<Job> = Vec::new();
    // First line of each id, for duplicate errors in linear time.
    let mut first_line: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (job, at) in jobs {
        let settings = merge(&defaults, &job.settings, base);
        if settings.model.is_none() {
            problems.add(
                at,
                format!(
                    "job {:?} names no model (set `model` in the job or in defaults)",
                    job.id
                ),
            );
        }
        if settings.prompt.is_none() {
            problems.add(at, format!("job {:?} has no prompt", job.id));
        }
        match first_line.get(&job.id) {
            Some(first) => problems.add(
                at,
                format!("duplicate job id {:?} (first used on line {first})", job.id),
            ),
            None => {
                first_line.insert(job.id.clone(), job.line);
            }
        }
        out.push(Job { settings, ..job });
    }
    if out.is_empty() && problems.list.is_empty() {
        problems.add(Pos { line: 1, col: 1 }, "the manifest has no jobs".into());
    }
    problems.into_result(name)?;
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    line: usize,
    col: usize,
}

#[derive(Debug, Default)]
struct Problems {
    list: Vec<(Pos, String)>,
}

impl Problems {
    fn add(&mut self, at: Pos, msg: String) {
        self.list.push((at, msg));
    }

    fn into_result(mut self, name: &str) -> Result<()> {
        if self.list.is_empty() {
            return Ok(());
        }
        self.list.sort_by_key(|(p, _)| (p.line, p.col));
        let lines: Vec<String> = self
            .list
            .iter()
            .map(|(p, m)| format!("  {name}:{}:{}: {m}", p.line, p.col))
            .collect();
        Err(Error::usage(format!(
            "{name}: {} problem(s) in the manifest (expected `defaults` and a list of `jobs` as \
             in `mmllm batch --help`):\n{}",
            self.list.len(),
            lines.join("\n")
        )))
    }
}

/// A YAML (or JSON) value with the position where it starts.
#[derive(Debug, Clone)]
struct Node {
    at: Pos,
    value: Value,
}

#[derive(Debug, Clone)]
enum Value {
    /// A scalar and whether it was plain (unquoted), which decides its type as in YAML 1.2.
    Scalar(String, bool),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Scalar(s, true) if is_null(s) => "null",
            Value::Scalar(..) => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

fn is_null(s: &str) -> bool {
    matches!(s, "" | "~" | "null" | "Null" | "NULL")
}

/// Builds a tree of [`Node`]s from yaml-rust2's marked events.
#[derive(Default)]
struct TreeBuilder {
    stack: Vec<(Node, Option<Node>)>,
    docs: Vec<Node>,
}

impl TreeBuilder {
    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some((parent, pending_key)) => match &mut parent.value {
                Value::Seq(items) => items.push(node),
                Value::Map(entries) => match pending_key.take() {
                    None => *pending_key = Some(node),
                    Some(key) => entries.push((key, node)),
                },
                Value::Scalar(..) => {}
            },
        }
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let at = Pos {
            line: mark.line(),
            col: mark.col() + 1,
        };
        match ev {
            Event::Scalar(s, style, _, _) => self.push_value(Node {
                at,
                value: Value::Scalar(s, style == TScalarStyle::Plain),
            }),
            Event::SequenceStart(..) => self.stack.push((
                Node {
                    at,
                    value: Value::Seq(Vec::new()),
                },
                None,
            )),
            Event::MappingStart(..) => self.stack.push((
                Node {
                    at,
                    value: Value::Map(Vec::new()),
                },
                None,
            )),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((node, _)) = self.stack.pop() {
                    self.push_value(node);
                }
            }
            // Aliases are not part of the manifest format; they read as null.
            Event::Alias(_) => self.push_value(Node {
                at,
                value: Value::Scalar(String::new(), true),
            }),
            _ => {}
        }
    }
}

type JobAt = (Job, Pos);

fn yaml_jobs(text: &str, problems: &mut Problems) -> (Settings, Vec<JobAt>) {
    let mut builder = TreeBuilder::default();
    if let Err(e) = Parser::new_from_str(text).load(&mut builder, false) {
        let m = e.marker();
        problems.add(
            Pos {
                line: m.line(),
                col: m.col() + 1,
            },
            format!("not valid YAML: {}", e.info()),
        );
        return (Settings::default(), Vec::new());
    }
    let Some(root) = builder.docs.into_iter().next() else {
        problems.add(Pos { line: 1, col: 1 }, "the manifest is empty".into());
        return (Settings::default(), Vec::new());
    };
    let Value::Map(entries) = root.value else {
        problems.add(
            root.at,
            format!(
                "the manifest is {} (expected a mapping with `defaults` and `jobs`)",
                root.value.kind()
            ),
        );
        return (Settings::default(), Vec::new());
    };
    let mut defaults = Settings::default();
    let mut jobs = Vec::new();
    let mut saw_jobs = false;
    for (key, value) in entries {
        match scalar_key(&key).as_deref() {
            Some("defaults") => match &value.value {
                Value::Map(map) => defaults = settings(map, "defaults", problems).0,
                other => problems.add(
                    value.at,
                    format!("`defaults` is {} (expected a mapping)", other.kind()),
                ),
            },
            Some("jobs") => {
                saw_jobs = true;
                match value.value {
                    Value::Seq(items) => {
                        for (i, item) in items.into_iter().enumerate() {
                            if let Some(job) = job(item, i, problems) {
                                jobs.push(job);
                            }
                        }
                    }
                    other => problems.add(
                        value.at,
                        format!("`jobs` is {} (expected a list of jobs)", other.kind()),
                    ),
                }
            }
            _ => problems.add(
                key.at,
                format!(
                    "unknown top-level key {} (expected `defaults` or `jobs`)",
                    describe(&key)
                ),
            ),
        }
    }
    if !saw_jobs {
        problems.add(root.at, "no `jobs` list".into());
    }
    (defaults, jobs)
}

fn jsonl_jobs(text: &str, problems: &mut Problems) -> Vec<JobAt> {
    let mut jobs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = Pos {
            line: i + 1,
            col: 1,
        };
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => {
                if let Some(job) = job(json_node(&v, at), jobs.len(), problems) {
                    jobs.push(job);
                }
            }
            Err(e) => problems.add(
                Pos {
                    line: i + 1,
                    col: e.column(),
                },
                format!("not valid JSON: {e}"),
            ),
        }
    }
    jobs
}

/// JSON values as nodes; every node of a line gets the line's position.
fn json_node(v: &serde_json::Value, at: Pos) -> Node {
    use serde_json::Value as J;
    let value = match v {
        J::Null => Value::Scalar("null".into(), true),
        J::Bool(b) => Value::Scalar(b.to_string(), true),
        J::Number(n) => Value::Scalar(n.to_string(), true),
        J::String(s) => Value::Scalar(s.clone(), false),
        J::Array(items) => Value::Seq(items.iter().map(|x| json_node(x, at)).collect()),
        J::Object(map) => Value::Map(
            map.iter()
                .map(|(k, x)| {
                    (
                        Node {
                            at,
                            value: Value::Scalar(k.clone(), false),
                        },
                        json_node(x, at),
                    )
                })
                .collect(),
        ),
    };
    Node { at, value }
}

fn job(node: Node, index: usize, problems: &mut Problems) -> Option<JobAt> {
    let Value::Map(entries) = node.value else {
        problems.add(
            node.at,
            format!(
                "job {} is {} (expected a mapping with id and prompt)",
                index + 1,
                node.value.kind()
            ),
        );
        return None;
    };
    // A block mapping's own mark is past its first key; the first key is where the job starts.
    let at = entries.first().map_or(node.at, |(k, _)| k.at);
    let (settings, id) = settings(&entries, &format!("job {}", index + 1), problems);
    let id = match id {
        Some(id) => id,
        None => {
            problems.add(at, format!("job {} has no `id`", index + 1));
            return None;
        }
    };
    Some((
        Job {
            id,
            line: at.line,
            settings,
        },
        at,
    ))
}

fn scalar_key(node: &Node) -> Option<String> {
    match &node.value {
        Value::Scalar(s, _) => Some(s.clone()),
        _ => None,
    }
}

fn describe(node: &Node) -> String {
    match &node.value {
        Value::Scalar(s, _) => format!("`{s}`"),
        other => other.kind().to_string(),
    }
}

/// Reads the settings of a job or of `defaults`; returns them and the `id` when `what` is a
/// job (ids are refused in defaults).
fn settings(
    entries: &[(Node, Node)],
    what: &str,
    problems: &mut Problems,
) -> (Settings, Option<String>) {
    let mut s = Settings::default();
    let mut id = None;
    let mut seen: Vec<String> = Vec::new();
    for (key, value) in entries {
        let Some(k) = scalar_key(key) else {
            problems.add(
                key.at,
                format!("{what}: a key is {} (expected a name)", key.value.kind()),
            );
            continue;
        };
        if seen.contains(&k) {
            problems.add(key.at, format!("{what}: key `{k}` appears twice"));
            continue;
        }
        seen.push(k.clone());
        let mut f = Field {
            name: &k,
            node: value,
            what,
            problems: &mut *problems,
        };
        if k == "id" && what != "defaults" {
            id = f.id();
        } else if !s.read(&k, &mut f) {
            let allowed = if what == "defaults" {
                KEYS.join(", ")
            } else {
                format!("id, {}", KEYS.join(", "))
            };
            problems.add(
                key.at,
                format!("{what}: unknown key `{k}` (expected one of {allowed})"),
            );
        }
    }
    (s, id)
}

/// One key's value being type-checked; wrong types are recorded, not fatal.
struct Field<'a> {
    name: &'a str,
    node: &'a Node,
    what: &'a str,
    problems: &'a mut Problems,
}

impl Field<'_> {
    fn wrong(&mut self, expected: &str) {
        let got = match &self.node.value {
            Value::Scalar(s, _) => format!("{s:?}"),
            other => other.kind().to_string(),
        };
        self.problems.add(
            self.node.at,
            format!(
                "{}: `{}` is {got} (expected {expected})",
                self.what, self.name
            ),
        );
    }

    fn scalar(&self) -> Option<(&str, bool)> {
        match &self.node.value {
            Value::Scalar(s, plain) => Some((s, *plain)),
            _ => None,
        }
    }

    fn id(&mut self) -> Option<String> {
        match self.scalar() {
            Some((s, plain)) if !(s.is_empty() || plain && is_null(s)) => Some(s.to_string()),
            _ => {
                self.wrong("a non-empty id");
                None
            }
        }
    }

    fn string(&mut self) -> Option<String> {
        match self.scalar() {
            Some((s, false)) => Some(s.to_string()),
            Some((s, true))
                if !is_null(s) && parse_bool(s).is_none() && s.parse::<f64>().is_err() =>
            {
                Some(s.to_string())
            }
            _ => {
                self.wrong("text");
                None
            }
        }
    }

    fn strings(&mut self) -> Option<Vec<String>> {
        if let Some((s, plain)) = self.scalar() {
            if !(plain && is_null(s)) {
                return Some(vec![s.to_string()]);
            }
        }
        let Value::Seq(items) = &self.node.value else {
            self.wrong("a list of text");
            return None;
        };
        let mut out = Vec::new();
        for item in items {
            match &item.value {
                Value::Scalar(s, plain) if !(*plain && is_null(s)) => out.push(s.clone()),
                _ => {
                    let at = item.at;
                    self.problems.add(
                        at,
                        format!(
                            "{}: an item of `{}` is {} (expected text)",
                            self.what,
                            self.name,
                            item.value.kind()
                        ),
                    );
                    return None;
                }
            }
        }
        Some(out)
    }

    fn boolean(&mut self) -> Option<bool> {
        match self
            .scalar()
            .filter(|(_, plain)| *plain)
            .and_then(|(s, _)| parse_bool(s))
        {
            Some(b) => Some(b),
            None => {
                self.wrong("true or false");
                None
            }
        }
    }

    fn uint(&mut self) -> Option<u64> {
        match self
            .scalar()
            .filter(|(_, plain)| *plain)
            .and_then(|(s, _)| s.parse().ok())
        {
            Some(n) => Some(n),
            None => {
                self.wrong("a whole number");
                None
            }
        }
    }

    fn float(&mut self) -> Option<f64> {
        let parsed = self
            .scalar()
            .filter(|(_, plain)| *plain)
            .and_then(|(s, _)| s.parse::<f64>().ok())
            .filter(|x| x.is_finite());
        match parsed {
            Some(x) => Some(x),
            None => {
                self.wrong("a number");
                None
            }
        }
    }

    /// `image=2,video=1`, or a mapping `{image: 2, video: 1}`.
    fn limits(&mut self) -> Option<String> {
        match &self.node.value {
            Value::Scalar(s, _) => Some(s.clone()),
            Value::Map(entries) => {
                let mut parts = Vec::new();
                for (k, v) in entries {
                    match (&k.value, &v.value) {
                        (Value::Scalar(k, _), Value::Scalar(v, true))
                            if v.parse::<u64>().is_ok() =>
                        {
                            parts.push(format!("{k}={v}"))
                        }
                        _ => {
                            self.wrong("a mapping of modality to a whole number");
                            return None;
                        }
                    }
                }
                Some(parts.join(","))
            }
            Value::Seq(_) => {
                self.wrong("`image=2,video=1` or a mapping");
                None
            }
        }
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

/// The job's settings over the defaults; relative local media paths resolved against `base`.
fn merge(defaults: &Settings, job: &Settings, base: &Path) -> Settings {
    let mut s = job.or(defaults);
    for list in [&mut s.images, &mut s.videos, &mut s.audios, &mut s.embeds]
        .into_iter()
        .flatten()
    {
        for item in list.iter_mut() {
            *item = resolve(item, base);
        }
    }
    for file in [
        &mut s.chat_template,
        &mut s.image_grid_thw,
        &mut s.image_sizes,
    ]
    .into_iter()
    .flatten()
    {
        *file = resolve(file, base);
    }
    // A model that is a folder beside the manifest (`./m`, `../m`, or a folder holding
    // config.json) resolves like media; aliases and repo ids stay as they are.
    if let Some(m) = &mut s.model {
        let local = base.join(m.as_str());
        if m.starts_with("./") || m.starts_with("../") || local.join("config.json").is_file() {
            *m = local.display().to_string();
        }
    }
    s
}

/// A relative local path against the manifest's folder; URLs, `data:` and `-` unchanged.
fn resolve(item: &str, base: &Path) -> String {
    let is_url =
        item.starts_with("http://") || item.starts_with("https://") || item.starts_with("data:");
    if is_url || item == "-" || Path::new(item).is_absolute() {
        return item.to_string();
    }
    PathBuf::from(base).join(item).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
defaults:
  model: qwen2-vl
  max_tokens: 64
  temperature: 0
jobs:
  - id: cat
    prompt: \"What is in this image?\"
    images: [cat.jpg]
  - id: pair
    prompt: Compare the two images.
    images: [a.png, https://example.org/b.png]
  - id: clip
    prompt: Describe the video.
    videos: [clip.mp4]
    num_frames: 8
  - id: speech
    model: ultravox
    prompt: What is said?
    audios: [speech.wav]
";

    #[test]
    fn parses_the_spec_example() {
        let jobs = parse(GOOD, "jobs.yaml", Path::new("/data"), false).unwrap();
        assert_eq!(jobs.len(), 4);
        assert_eq!(jobs[0].id, "cat");
        assert_eq!(jobs[0].line, 6);
        assert_eq!(jobs[0].model(), "qwen2-vl");
        assert_eq!(jobs[0].settings.max_tokens, Some(64));
        assert_eq!(
            jobs[0].settings.images.as_deref(),
            Some(&["/data/cat.jpg".to_string()][..])
        );
        assert_eq!(
            jobs[1].settings.images.as_ref().unwrap()[1],
            "https://example.org/b.png"
        );
        assert_eq!(jobs[2].settings.num_frames, Some(8));
        assert_eq!(jobs[3].model(), "ultravox");
        assert_eq!(jobs[3].settings.temperature, Some(0.0));
    }

    #[test]
    fn reports_every_problem_with_line_and_column() {
        let text = "\
defaults:
  model: llava
  colour: red
jobs:
  - id: a
    prompt: hi
    imgs: [x.jpg]
  - id: a
    prompt: again
  - prompt: no id
  - id: b
    prompt: typed
    max_tokens: many
    temperature: [1]
  - id: c
";
        let err = parse(text, "m.yaml", Path::new("."), false).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        for want in [
            "m.yaml:3:3: defaults: unknown key `colour`",
            "m.yaml:7:5: job 1: unknown key `imgs`",
            "m.yaml:8:5: duplicate job id \"a\" (first used on line 5)",
            "m.yaml:10:5: job 3 has no `id`",
            "m.yaml:13:17: job 4: `max_tokens` is \"many\" (expected a whole number)",
            "m.yaml:14:18: job 4: `temperature` is a list (expected a number)",
            "m.yaml:15:5: job \"c\" has no prompt",
            "7 problem(s)",
        ] {
            assert!(msg.contains(want), "missing {want:?} in:\n{msg}");
        }
    }

    #[test]
    fn yaml_syntax_errors_have_positions() {
        let err = parse("jobs:\n  - id: [a\n", "m.yaml", Path::new("."), false).unwrap_err();
        assert!(err.to_string().contains("m.yaml:3:"), "{err}");
    }

    #[test]
    fn jsonl_manifests_name_the_line() {
        let text = "{\"id\": \"a\", \"model\": \"llava\", \"prompt\": \"hi\", \"images\": [\"x.jpg\"]}\n\n{\"id\": \"b\", \"prompt\": 3, \"model\": \"llava\"}\n{oops\n";
        let err = parse(text, "m.jsonl", Path::new("/d"), true).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("m.jsonl:3:1: job 2: `prompt` is \"3\" (expected text)"),
            "{msg}"
        );
        assert!(msg.contains("m.jsonl:4:"), "{msg}");
        let ok = parse(
            text.lines().next().unwrap(),
            "m.jsonl",
            Path::new("/d"),
            true,
        )
        .unwrap();
        assert_eq!(ok[0].settings.images.as_ref().unwrap()[0], "/d/x.jpg");
    }

    #[test]
    fn limits_accept_a_mapping_or_the_flag_syntax() {
        let text = "jobs:\n  - id: a\n    model: m\n    prompt: p\n    limit_mm_per_prompt: {image: 2, video: 1}\n  - id: b\n    model: m\n    prompt: p\n    limit_mm_per_prompt: image=3\n";
        let jobs = parse(text, "m.yaml", Path::new("."), false).unwrap();
        assert_eq!(
            jobs[0].settings.limit_mm_per_prompt.as_deref(),
            Some("image=2,video=1")
        );
        assert_eq!(
            jobs[1].settings.limit_mm_per_prompt.as_deref(),
            Some("image=3")
        );
    }
}

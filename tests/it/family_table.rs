//! The family table: every `--model` alias names a family that resolves and loads, and the
//! table claims each fixture's `model_type` for the right family.

use std::path::Path;

use mmllm::models::registry::{aliases, family_for, FAMILIES};

use crate::util::{json_line, repo};

/// For each alias: the tiny fixture standing in for its checkpoint, the command and the media
/// to prompt it with. A new alias without a line here fails `every_alias_loads_its_family`.
const STAND_INS: &[(&str, &str, &str, &str)] = &[
    ("llava", "llava-tiny", "image", "llava_photo_1.jpg"),
    (
        "llava-onevision",
        "llava-onevision-tiny",
        "image",
        "qwen_china_517x333.jpg",
    ),
    (
        "qwen2-vl",
        "qwen2-vl-tiny",
        "image",
        "qwen_china_517x333.jpg",
    ),
    (
        "qwen2.5-vl",
        "qwen2_5-vl-tiny",
        "image",
        "qwen_china_517x333.jpg",
    ),
    ("qwen2-audio", "qwen2-audio-tiny", "audio", "speech_16k.wav"),
    ("whisper", "whisper-tiny-random", "audio", "speech_16k.wav"),
    ("ultravox", "ultravox-tiny", "audio", "speech_16k.wav"),
    (
        "minicpm-v",
        "minicpmv-tiny",
        "image",
        "qwen_china_517x333.jpg",
    ),
];

/// Lays `fixture`'s files out as huggingface_hub caches `repo_id` (refs, blobs, snapshot links).
fn cache_repo(cache: &Path, repo_id: &str, fixture: &Path) {
    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    let root = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = root.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::write(root.join("refs/main"), COMMIT).unwrap();
    for entry in std::fs::read_dir(fixture).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let blob = format!("blob-{name}");
        std::fs::copy(&path, root.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(&name)).unwrap();
    }
}

#[test]
fn every_alias_loads_its_family() {
    let cache = tempfile::tempdir().unwrap();
    for (alias, repo_id) in aliases() {
        let Some(&(_, fixture, command, media)) = STAND_INS.iter().find(|s| s.0 == alias) else {
            panic!("alias {alias} ({repo_id}) has no stand-in fixture in STAND_INS");
        };
        let fixture = repo().join("tests/fixtures").join(fixture);
        cache_repo(cache.path(), repo_id, &fixture);
        let out = crate::util::mmllm()
            .args([
                command,
                "--model",
                alias,
                "--output",
                "jsonl",
                "--max-tokens",
                "1",
            ])
            .arg(repo().join("tests/data").join(media))
            // Whisper reads its prompt as task and language words: give audio none.
            .arg(if command == "audio" { "" } else { "Hi" })
            .env("HF_HUB_CACHE", cache.path())
            .output()
            .unwrap();
        let line = json_line(&out);
        assert_eq!(line["model"], alias);
        assert_eq!(line["usage"]["completion_tokens"], 1, "{alias}");
        // The alias's family is the one whose table line lists it.
        let config = crate::util::read_json(&fixture.join("config.json"));
        let family = family_for(&config, alias).unwrap();
        assert!(
            family
                .aliases
                .iter()
                .any(|(a, r)| *a == alias && *r == repo_id),
            "{alias} resolves to family {} which does not list it",
            family.name
        );
    }
}

#[test]
fn aliases_are_unique_and_families_claim_distinct_types() {
    let all = aliases();
    for (i, (a, _)) in all.iter().enumerate() {
        assert!(
            !all[..i].iter().any(|(b, _)| b.eq_ignore_ascii_case(a)),
            "alias {a} twice"
        );
    }
    let mut types: Vec<&str> = FAMILIES
        .iter()
        .flat_map(|f| f.model_types.iter().copied())
        .collect();
    let n = types.len();
    types.sort();
    types.dedup();
    assert_eq!(types.len(), n, "a model_type claimed by two families");
}

#[test]
fn unknown_model_types_are_refused_naming_the_supported_ones() {
    let config = serde_json::json!({"model_type": "phi3_v", "architectures": ["Phi3VForCausalLM"]});
    let err = match family_for(&config, "some/model") {
        Err(e) => e.to_string(),
        Ok(f) => panic!("phi3_v claimed by {}", f.name),
    };
    assert!(err.contains("phi3_v") && err.contains("llava"), "{err}");
}

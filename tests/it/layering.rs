//! Dependencies point one way (ARCHITECTURE.md): each module imports only the modules below
//! it. Checked by scanning `crate::` paths in the code (comments ignored).

use std::path::{Path, PathBuf};

/// Module (top-level folder or file under src/) and the crate modules it must not use.
const FORBIDDEN: &[(&str, &[&str])] = &[
    (
        "media",
        &[
            "models", "engine", "prompt", "cli", "app", "sink", "hub", "manifest",
        ],
    ),
    ("prompt", &["models", "engine", "cli", "app", "sink", "hub"]),
    ("models", &["cli", "app", "sink", "hub", "manifest"]),
    ("engine", &["cli", "app", "sink", "hub", "manifest"]),
    ("sink", &["cli", "app", "hub", "models", "media"]),
    ("hub", &["cli", "app", "engine", "models", "prompt", "sink"]),
    (
        "manifest",
        &["cli", "app", "engine", "models", "sink", "hub"],
    ),
    (
        "kernels",
        &[
            "cli", "app", "engine", "models", "media", "prompt", "sink", "hub", "manifest",
        ],
    ),
    (
        "error",
        &[
            "cli", "app", "engine", "models", "media", "prompt", "sink", "hub", "json",
        ],
    ),
    (
        "json",
        &[
            "cli", "app", "engine", "models", "media", "prompt", "sink", "hub", "manifest",
            "kernels",
        ],
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn modules_only_import_downwards() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    for (module, forbidden) in FORBIDDEN {
        let mut files = Vec::new();
        let dir = src.join(module);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        } else {
            files.push(src.join(format!("{module}.rs")));
        }
        assert!(!files.is_empty(), "no sources for {module}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for bad in *forbidden {
                    if code.contains(&format!("crate::{bad}::"))
                        || code.contains(&format!("crate::{bad};"))
                    {
                        violations.push(format!(
                            "{}:{}: {module} uses {bad}",
                            file.display(),
                            n + 1
                        ));
                    }
                }
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

//! Dependencies point one way (ARCHITECTURE.md, docs/adding-a-family.md):
//!
//! main → app → {cli, sink} → engine → models → prompt → media → {hub, manifest, kernels}
//! → {json, limits} → error
//!
//! A module may use only modules on lower levels (never one on its own level), and inside each
//! folder the submodules' uses form no cycle. Checked by scanning `crate::` and `super::` paths
//! in the code (comments ignored).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules from the highest level to the lowest.
const LEVELS: &[&[&str]] = &[
    &["app"],
    &["cli", "sink"],
    &["engine"],
    &["models"],
    &["prompt"],
    &["media"],
    &["hub", "manifest", "kernels"],
    &["json", "limits"],
    &["error"],
];

/// Uses the levels allow but the design does not: families never download (they receive a
/// directory) and the engine never fetches.
const FORBIDDEN: &[(&str, &str)] = &[("models", "hub"), ("engine", "hub")];

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

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

/// The module path of a file under src/: `models/llava/mod.rs` → `[models, llava]`.
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    parts
}

/// Every module path a file's code names: `crate::a::b::…` and `super::…` resolved to
/// absolute paths, with the line each is on. Only path segments that are identifiers count.
fn uses(file: &Path) -> Vec<(usize, Vec<String>)> {
    let module = module_of(file);
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for (start, _) in code
            .match_indices("crate::")
            .chain(code.match_indices("super::"))
        {
            let before = code[..start].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            // The identifiers of the path, up to the first segment that is not one whole.
            let mut path: Vec<String> = Vec::new();
            for seg in code[start..].split("::") {
                let ident: String = seg
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if ident.is_empty() {
                    break;
                }
                let whole = ident.len() == seg.len();
                path.push(ident);
                if !whole {
                    break;
                }
            }
            let mut abs: Vec<String> = Vec::new();
            let mut rest = path.as_slice();
            if rest.first().is_some_and(|s| s == "crate") {
                rest = &rest[1..];
            } else {
                // `super` names the parent of the file's module (`a/b.rs` and `a/b/mod.rs`
                // are both module `a::b`, whose parent is `a`).
                abs = module.clone();
                while rest.first().is_some_and(|s| s == "super") {
                    abs.pop();
                    rest = &rest[1..];
                }
            }
            abs.extend(rest.iter().cloned());
            if !abs.is_empty() {
                out.push((n + 1, abs));
            }
        }
    }
    out
}

fn level_of(module: &str) -> Option<usize> {
    LEVELS.iter().position(|level| level.contains(&module))
}

fn all_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files
}

#[test]
fn every_module_is_on_a_level() {
    let mut missing = BTreeSet::new();
    for file in all_files() {
        if let Some(top) = module_of(&file).first() {
            if level_of(top).is_none() {
                missing.insert(top.clone());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "modules with no level in LEVELS: {missing:?}"
    );
}

#[test]
fn modules_only_import_downwards() {
    let mut violations = Vec::new();
    for file in all_files() {
        let Some(from) = module_of(&file).first().cloned() else {
            continue; // lib.rs and main.rs sit above everything.
        };
        let Some(from_level) = level_of(&from) else {
            continue;
        };
        for (line, path) in uses(&file) {
            let to = &path[0];
            if *to == from {
                continue;
            }
            let bad = match level_of(to) {
                Some(to_level) => to_level <= from_level,
                None => false, // not a crate module (e.g. a local item)
            } || FORBIDDEN.contains(&(from.as_str(), to.as_str()));
            if bad {
                violations.push(format!("{}:{line}: {from} uses {to}", file.display()));
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// Within every folder, the graph "child module A uses child module B" has no cycle; `mod.rs`
/// itself counts as a node (what other children reach through `crate::folder::Item`).
#[test]
fn no_cycles_inside_a_folder() {
    let files = all_files();
    let mut folders: BTreeSet<Vec<String>> = BTreeSet::new();
    for file in &files {
        let m = module_of(file);
        for i in 0..m.len() {
            folders.insert(m[..i].to_vec());
        }
    }
    let mut cycles = Vec::new();
    for folder in folders {
        let dir = src().join(folder.join("/"));
        if !dir.is_dir() {
            continue;
        }
        let children: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir() || p.extension().is_some_and(|e| e == "rs"))
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .filter(|n| n != "mod" && n != "lib" && n != "main")
            .collect();
        // Node for a path inside the folder: its child, or "" (the folder's own mod.rs).
        let node_of = |path: &[String]| -> Option<String> {
            if path.len() <= folder.len() || path[..folder.len()] != folder[..] {
                return (path == folder.as_slice()).then(String::new);
            }
            let child = &path[folder.len()];
            Some(if children.contains(child) {
                child.clone()
            } else {
                String::new()
            })
        };
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in &files {
            let m = module_of(file);
            let Some(from) = node_of(&m) else { continue };
            for (_, path) in uses(file) {
                if let Some(to) = node_of(&path) {
                    if to != from {
                        edges.entry(from.clone()).or_default().insert(to);
                    }
                }
            }
        }
        if let Some(cycle) = find_cycle(&edges) {
            let name = if folder.is_empty() {
                "src".to_string()
            } else {
                folder.join("/")
            };
            let shown: Vec<String> = cycle
                .iter()
                .map(|n| {
                    if n.is_empty() {
                        "mod".into()
                    } else {
                        n.clone()
                    }
                })
                .collect();
            cycles.push(format!("{name}: {}", shown.join(" → ")));
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

/// One cycle of the graph, as the nodes along it (first repeated at the end), if any.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let at = stack.iter().position(|n| n == next).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, edges, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if !state.contains_key(node.as_str()) {
            if let Some(c) = visit(node, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph = |pairs: &[(&str, &str)]| {
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in pairs {
            edges
                .entry(a.to_string())
                .or_default()
                .insert(b.to_string());
        }
        edges
    };
    assert!(find_cycle(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])).is_none());
    let cycle = find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])).unwrap();
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4);
}

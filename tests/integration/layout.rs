//! The shape of the workspace: what depends on what. A circle between modules means
//! neither can be understood (or moved) without the other; valvula-ctl reaching into
//! the daemon meant every change of the daemon could break the tool.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use valvula_tests::repo_root;

/// Every `src` directory of the workspace's crates.
fn source_dirs() -> Vec<PathBuf> {
    let root = repo_root();
    let mut dirs = Vec::new();
    for group in ["crates", "modules"] {
        for e in std::fs::read_dir(root.join(group)).unwrap().flatten() {
            if e.path().join("src").is_dir() {
                dirs.push(e.path().join("src"));
            }
        }
    }
    for one in ["valvulad", "valvula-ctl", "valvula-bench", "tests"] {
        dirs.push(root.join(one).join("src"));
    }
    dirs.sort();
    dirs
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`server/connections.rs` is `server`).
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// The top-level modules a file's code names through `crate::`, comments and unit
/// tests left out (a test may reach anywhere).
fn named_modules(text: &str) -> BTreeSet<String> {
    named_after(text, "crate::")
}

/// The names a file's code reaches through `prefix` (`crate::`, `super::`), comments and
/// unit tests left out.
fn named_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find(prefix) {
            rest = &rest[i + prefix.len()..];
            if let Some(list) = rest.strip_prefix('{') {
                let end = list.find('}').unwrap_or(list.len());
                for item in list[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    out.insert(name);
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                out.insert(name);
            }
        }
    }
    out
}

/// A circle in `graph`, if there is one, as the modules along it.
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut circle = path[i..].to_vec();
            circle.push(m.to_owned());
            return Some(circle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_owned());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(c) = visit(m, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_module_imports_another_in_a_circle() {
    let dirs = source_dirs();
    assert!(dirs.len() >= 12, "found only {dirs:?}");
    let mut circles = Vec::new();
    for src in &dirs {
        let mut files = Vec::new();
        rust_files(src, &mut files);
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for f in &files {
            let from = top_module(src, f);
            graph.entry(from.clone()).or_default();
            let text = std::fs::read_to_string(f).unwrap();
            for to in named_modules(&text) {
                if to != from {
                    graph.entry(from.clone()).or_default().insert(to);
                }
            }
        }
        // Only the crate's own modules: `crate::Foo` may name an item of the root.
        let modules: BTreeSet<String> = graph.keys().cloned().collect();
        for deps in graph.values_mut() {
            deps.retain(|d| modules.contains(d) && d != "lib" && d != "main");
        }
        if let Some(c) = find_circle(&graph) {
            circles.push(format!("{}: {}", src.display(), c.join(" -> ")));
        }
    }
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

/// Inside a module directory (`server/`, `host/`), the files name each other through
/// `super::`: no circles there either.
#[test]
fn no_submodules_import_each_other_in_a_circle() {
    let mut circles = Vec::new();
    let mut checked = 0;
    for src in source_dirs() {
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let mut dirs: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
        for f in files {
            let dir = f.parent().unwrap().to_owned();
            if dir != src {
                dirs.entry(dir).or_default().push(f);
            }
        }
        for (dir, files) in dirs {
            let stem = |f: &Path| f.file_stem().unwrap().to_string_lossy().into_owned();
            let siblings: BTreeSet<String> = files.iter().map(|f| stem(f)).collect();
            let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for f in &files {
                let from = stem(f);
                if from == "mod" {
                    continue;
                }
                let text = std::fs::read_to_string(f).unwrap();
                let to: BTreeSet<String> = named_after(&text, "super::")
                    .into_iter()
                    .filter(|n| siblings.contains(n) && *n != from && n != "mod")
                    .collect();
                graph.insert(from, to);
            }
            checked += 1;
            if let Some(c) = find_circle(&graph) {
                circles.push(format!("{}: {}", dir.display(), c.join(" -> ")));
            }
        }
    }
    assert!(checked >= 3, "only {checked} module directories found");
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

/// The check finds a circle when there is one (so its silence above means something).
#[test]
fn the_circle_check_sees_a_circle() {
    let mut g = BTreeMap::new();
    g.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    g.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    g.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        find_circle(&g),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let names = named_modules(
        "use crate::{cli, session::Io};\n// crate::comment\nlet x = crate::store::open();\n",
    );
    assert_eq!(
        names,
        BTreeSet::from(["cli".into(), "session".into(), "store".into()]),
        "names read from code"
    );
}

/// valvula-ctl works on the configuration and the database through their crates and
/// on the daemon through its admin socket; it never links the daemon.
#[test]
fn valvula_ctl_does_not_depend_on_the_daemon() {
    let manifest = std::fs::read_to_string(repo_root().join("valvula-ctl/Cargo.toml")).unwrap();
    let t: toml::Table = manifest.parse().unwrap();
    let deps = t["dependencies"].as_table().unwrap();
    assert!(
        !deps.contains_key("valvulad"),
        "valvula-ctl depends on valvulad: {:?}",
        deps.keys().collect::<Vec<_>>()
    );
    for needed in ["valvula-config", "valvula-store"] {
        assert!(deps.contains_key(needed), "valvula-ctl lacks {needed}");
    }
}

/// `unsafe` lives at the boundaries only: the ABI mirror and the SDK's trampolines,
/// the daemon's module host (raw pointers from modules, the crash handler), and the
/// descriptors a worker inherits from its master. Anywhere else it needs a reason
/// good enough to add the file here.
#[test]
fn unsafe_only_at_the_boundaries() {
    const ALLOWED: [&str; 11] = [
        "crates/valvula-abi/src/lib.rs",
        "crates/valvula-module/src/asynchronous.rs",
        "crates/valvula-module/src/host.rs",
        "crates/valvula-module/src/request.rs",
        "crates/valvula-module/src/storage.rs",
        "crates/valvula-module/src/trampolines.rs",
        "valvulad/src/host/api.rs",
        "valvulad/src/host/crash.rs",
        "valvulad/src/host/load.rs",
        "valvulad/src/host/storage.rs",
        "valvulad/src/supervisor/fd.rs",
    ];
    let root = repo_root();
    let mut found = Vec::new();
    for dir in source_dirs() {
        let mut files = Vec::new();
        rust_files(&dir, &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let code = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            if ["unsafe {", "unsafe fn", "unsafe extern", "unsafe impl"]
                .iter()
                .any(|u| code.contains(u))
            {
                let rel = f.strip_prefix(&root).unwrap().display().to_string();
                if !ALLOWED.contains(&rel.as_str()) {
                    found.push(rel);
                }
            }
        }
    }
    assert!(found.is_empty(), "unsafe outside the boundaries: {found:?}");
}

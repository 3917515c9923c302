//! The crates' modules refer to each other one way: no two top-level modules reach
//! each other, through `crate::` paths or through the names `lib.rs` re-exports. Read
//! from the sources, so that a change that closes a cycle fails the suite.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A file's code without its test module (from `#[cfg(test)]` on), its comments and
/// its string literals' contents (good enough for the sources of this workspace).
fn code_of(text: &str) -> String {
    let text = match text.find("\n#[cfg(test)]") {
        Some(at) => &text[..at],
        None => text,
    };
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("/*") {
        out.push_str(&rest[..at]);
        rest = rest[at..]
            .find("*/")
            .map_or("", |end| &rest[at + end + 2..]);
    }
    out.push_str(rest);
    out.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn idents_after(code: &str, marker: &str) -> Vec<String> {
    code.match_indices(marker)
        .filter(|(at, _)| {
            // a whole word: not `other_crate::`
            !code[..*at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
        .map(|(at, _)| &code[at + marker.len()..])
        .flat_map(|rest| {
            if let Some(group) = rest.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(0)];
                group
                    .split(',')
                    .filter_map(|item| ident(item.trim_start()))
                    .collect()
            } else {
                ident(rest).into_iter().collect::<Vec<_>>()
            }
        })
        .collect()
}

fn ident(s: &str) -> Option<String> {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    (end > 0).then(|| s[..end].to_owned())
}

/// Names a file defines publicly (`pub struct Name`, `pub(crate) fn name`, ...).
fn defined(code: &str) -> Vec<String> {
    const KINDS: [&str; 8] = [
        "struct ", "enum ", "trait ", "fn ", "type ", "const ", "static ", "union ",
    ];
    code.lines()
        .filter_map(|l| {
            let l = l.trim_start().strip_prefix("pub")?;
            let l = match l.strip_prefix('(') {
                Some(rest) => &rest[rest.find(')')? + 1..],
                None => l,
            };
            let l = l.trim_start();
            let l = l.strip_prefix("async ").unwrap_or(l);
            KINDS.iter().find_map(|k| l.strip_prefix(k)).and_then(ident)
        })
        .collect()
}

/// The Rust files under `src`.
fn rust_files(src: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// The module graph of a crate's `src`: top-level module to the modules it refers to.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let files = rust_files(src);
    let top = |path: &Path| -> Option<String> {
        let rel = path.strip_prefix(src).ok()?;
        let first = rel.components().next()?.as_os_str().to_str()?;
        let name = first.strip_suffix(".rs").unwrap_or(first);
        (!matches!(name, "lib" | "main" | "bin")).then(|| name.to_owned())
    };
    let mut refs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for path in &files {
        let Some(module) = top(path) else { continue };
        let code = code_of(&std::fs::read_to_string(path).unwrap());
        refs.entry(module.clone())
            .or_default()
            .extend(idents_after(&code, "crate::"));
        for name in defined(&code) {
            owner.entry(name).or_insert_with(|| module.clone());
        }
    }
    let modules: BTreeSet<String> = refs.keys().cloned().collect();
    refs.iter()
        .map(|(m, names)| {
            let to = names
                .iter()
                .filter_map(|n| match modules.contains(n) {
                    true => Some(n.clone()),
                    false => owner.get(n).cloned(),
                })
                .filter(|to| to != m)
                .collect();
            (m.clone(), to)
        })
        .collect()
}

/// The pairs of modules that reach each other.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<(String, String)> {
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(m) = todo.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reached: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reach(m))).collect();
    let mut pairs = Vec::new();
    for (a, from_a) in &reached {
        for b in from_a {
            if *a < b && reached.get(b).is_some_and(|r| r.contains(*a)) {
                pairs.push(((*a).clone(), b.clone()));
            }
        }
    }
    pairs
}

#[test]
fn no_module_cycles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for krate in ["cache-runtime", "cache-redis", "cache-macros"] {
        let g = graph(&root.join(krate).join("src"));
        assert!(g.len() > 3, "{krate}: read {} modules", g.len());
        let found = cycles(&g);
        assert!(
            found.is_empty(),
            "{krate}: these modules reach each other: {found:?}; the graph: {g:#?}"
        );
        let found = uses_of_lib_items(&root.join(krate).join("src"));
        assert!(
            found.is_empty(),
            "{krate}: uses of what lib.rs defines: {found:?}"
        );
    }
}

/// Items defined in `lib.rs` itself that other modules of the crate use: `lib.rs`
/// refers to every module, so each such use closes a cycle through it.
fn uses_of_lib_items(src: &Path) -> Vec<String> {
    let lib = code_of(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    let own = defined(&lib);
    let mut found = Vec::new();
    for path in rust_files(src) {
        if path.ends_with("lib.rs") {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&path).unwrap());
        for name in idents_after(&code, "crate::") {
            if own.contains(&name) {
                found.push(format!("{}: crate::{name}", path.display()));
            }
        }
    }
    found
}

#[test]
fn the_check_finds_a_cycle() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    g.entry("d".into()).or_default().insert("a".into());
    assert_eq!(cycles(&g).len(), 3);
    let code = code_of("use crate::{key::Key, deps};\n// crate::bus\nfn f() { crate::service::x(); other_crate::memory::y(); }\n#[cfg(test)]\nmod tests { use crate::flight; }");
    let mut found = idents_after(&code, "crate::");
    found.sort();
    assert_eq!(found, ["deps", "key", "service"]);
    assert_eq!(
        defined("pub(crate) struct Inner;\npub async fn go() {}\n    pub const N: u8 = 1;"),
        ["Inner", "go", "N"]
    );
}

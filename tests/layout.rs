//! The source tree keeps its shape: no file holds more than 700 lines
//! before its tests, and no module depends on another that depends back on
//! it (top-level modules and their children, through `crate::` and
//! `super::` paths; tests and comments left out).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const MAX_LINES_BEFORE_TESTS: usize = 700;

fn source_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            source_files(&path, files);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            files.push(path);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The file's code before its unit tests (`#[cfg(test)] mod tests {`), and
/// nothing of a file that holds tests alone.
fn code(path: &Path) -> String {
    let name = path
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or_default();
    if matches!(name, "tests.rs" | "testing.rs") {
        return String::new();
    }
    let text = fs::read_to_string(path).expect("a readable source file");
    let mut code = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "#[cfg(test)]" && lines.peek().is_some_and(|next| next.starts_with("mod tests {")) {
            break;
        }
        code.push(line);
    }
    code.join("\n")
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are `["a", "b"]`.
fn module_of(path: &Path) -> Vec<String> {
    let relative = path.strip_prefix(src()).expect("under src");
    let mut parts: Vec<String> = relative
        .with_extension("")
        .components()
        .map(|part| part.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|last| last == "mod" || last == "lib") {
        parts.pop();
    }
    parts
}

/// The `a::b::c` paths after `prefix` in `code`, comments left out.
fn paths_after<'a>(code: &'a str, prefix: &str) -> Vec<Vec<&'a str>> {
    let mut paths = Vec::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or_default();
        let mut rest = line;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().last();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(|ch| ch.is_alphanumeric() || ch == '_') {
                continue;
            }
            let path: Vec<&str> = rest
                .split("::")
                .map_while(|segment| {
                    let name: &str = segment
                        .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                        .next()
                        .unwrap_or_default();
                    (!name.is_empty()
                        && name
                            .chars()
                            .all(|ch| ch.is_ascii_lowercase() || ch == '_' || ch.is_ascii_digit()))
                    .then_some(name)
                })
                .collect();
            paths.push(path);
        }
    }
    paths
}

/// Which modules each module refers to.
fn dependencies() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut files = Vec::new();
    source_files(&src(), &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|path| module_of(path)).collect();
    let known = |path: Vec<String>| {
        (1..=path.len())
            .rev()
            .map(|length| path[..length].to_vec())
            .find(|prefix| modules.contains(prefix))
    };
    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for path in &files {
        let me = module_of(path);
        let code = code(path);
        let mut targets = Vec::new();
        for path in paths_after(&code, "crate::") {
            targets.push(
                path.iter()
                    .map(|segment| (*segment).to_owned())
                    .collect::<Vec<_>>(),
            );
        }
        let parent = me[..me.len().saturating_sub(1)].to_vec();
        for path in paths_after(&code, "super::") {
            let mut target = parent.clone();
            target.extend(path.iter().map(|segment| (*segment).to_owned()));
            targets.push(target);
        }
        for target in targets.into_iter().filter_map(known) {
            if target != me {
                graph.entry(me.clone()).or_default().insert(target);
            }
        }
    }
    graph
}

/// Cycles between modules taken `depth` path segments deep; a module and
/// its own parent or child are one.
fn cycles(depth: usize) -> Vec<BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, targets) in dependencies() {
        for to in targets {
            let (a, b) = (&from[..from.len().min(depth)], &to[..to.len().min(depth)]);
            let nested = a.starts_with(b) || b.starts_with(a);
            if !nested {
                graph.entry(a.join("::")).or_default().insert(b.join("::"));
            }
        }
    }
    // Modules that reach each other are in one cycle.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(module) = todo.pop() {
            for next in graph.get(&module).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let mut found: Vec<BTreeSet<String>> = Vec::new();
    for module in graph.keys() {
        let from_here = reach(module);
        if !from_here.contains(module) {
            continue;
        }
        let cycle: BTreeSet<String> = from_here
            .into_iter()
            .filter(|other| reach(other).contains(module))
            .collect();
        if !found.contains(&cycle) {
            found.push(cycle);
        }
    }
    found
}

#[test]
fn no_file_holds_more_than_700_lines_before_its_tests() {
    let mut files = Vec::new();
    source_files(&src(), &mut files);
    let long: Vec<(String, usize)> = files
        .iter()
        .map(|path| (path.display().to_string(), code(path).lines().count()))
        .filter(|(_, lines)| *lines > MAX_LINES_BEFORE_TESTS)
        .collect();
    assert!(
        long.is_empty(),
        "over {MAX_LINES_BEFORE_TESTS} lines before the tests: {long:?}"
    );
}

#[test]
fn no_modules_depend_on_each_other_in_a_circle() {
    let graph = dependencies();
    assert!(
        graph
            .get(&vec!["proxy".to_owned()])
            .is_some_and(|targets| targets.contains(&vec!["admission".to_owned()])),
        "the graph is read: the request path uses admission"
    );
    for depth in [1, 2] {
        let found = cycles(depth);
        assert!(
            found.is_empty(),
            "modules {depth} deep that depend on each other: {found:?}"
        );
    }
}

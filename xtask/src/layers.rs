//! `cargo xtask layers`: the collector crate's module graph, from its `crate::` and `super::`
//! paths, checked against the layers `collector/src/lib.rs` describes. Fails on an import
//! cycle among top-level modules, on an import of a higher layer, and on a sink importing a
//! sibling sink, printing each offending edge with the file that makes it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};

/// Top-level modules by layer, bottom first. A module may import its own layer or lower ones.
const LAYERS: &[&[&str]] = &[
    &["model", "config", "util"],
    &["matching"],
    &["host"],
    &["kernel"],
    &["sources"],
    &["registry"],
    &["sinks"],
    &["api"],
    &["runtime"],
    &["cli"],
];

/// Folders whose sub-modules must not import one another.
const SIBLINGS_APART: &[&str] = &["sinks", "sources"];

/// An import of module `to` by module `from` (paths from the crate root), made in `file`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    from: Vec<String>,
    to: Vec<String>,
    file: PathBuf,
}

pub(crate) fn layers(src: Option<&Path>) -> anyhow::Result<()> {
    let src = src.map_or_else(
        || crate::toolchain::workspace_root().join("collector/src"),
        Path::to_path_buf,
    );
    let edges = edges(&src)?;
    let graph = top_level_graph(&edges);
    println!(
        "module graph of {} (top-level modules, A -> B: A imports B):",
        src.display()
    );
    for (from, tos) in &graph {
        let tos: Vec<&str> = tos.iter().map(String::as_str).collect();
        println!(
            "  {from} -> {}",
            if tos.is_empty() {
                "(nothing)".to_owned()
            } else {
                tos.join(", ")
            }
        );
    }
    let mut problems = Vec::new();
    for cycle in cycles(&graph) {
        problems.push(format!("import cycle: {}", cycle.join(" -> ")));
    }
    let layer_of = |m: &str| LAYERS.iter().position(|layer| layer.contains(&m));
    for edge in &edges {
        let (from, to) = (&edge.from[0], &edge.to[0]);
        if from == to {
            if SIBLINGS_APART.contains(&from.as_str())
                && edge.from.len() > 1
                && edge.to.len() > 1
                && edge.from[1] != edge.to[1]
            {
                problems.push(format!(
                    "{} imports its sibling {} ({})",
                    edge.from[..2].join("::"),
                    edge.to[..2].join("::"),
                    edge.file.display()
                ));
            }
            continue;
        }
        match (layer_of(from), layer_of(to)) {
            (Some(a), Some(b)) if b > a => problems.push(format!(
                "{from} (layer {a}) imports {to} (layer {b}), a higher layer ({})",
                edge.file.display()
            )),
            (None, _) | (_, None) => problems.push(format!(
                "{from} -> {to}: a module outside the layers of xtask/src/layers.rs ({})",
                edge.file.display()
            )),
            _ => {}
        }
    }
    problems.sort();
    problems.dedup();
    if problems.is_empty() {
        println!("layers: no cycle, no upward import, no sibling import");
        return Ok(());
    }
    for problem in &problems {
        println!("  {problem}");
    }
    bail!("{} layering problems in {}", problems.len(), src.display())
}

/// Module path of a source file: `kernel/loader.rs` is `kernel::loader`, `kernel/mod.rs` is
/// `kernel`; `lib.rs` and `main.rs` are the root (empty).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    match last.as_str() {
        "mod.rs" | "lib.rs" | "main.rs" => {}
        name => parts.push(name.trim_end_matches(".rs").to_owned()),
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// Every import between modules of the crate.
fn edges(src: &Path) -> anyhow::Result<Vec<Edge>> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    files.sort();
    let mut edges = Vec::new();
    for file in files {
        let module = module_of(src, &file);
        if module.is_empty() {
            continue;
        }
        let text = fs::read_to_string(&file)?;
        let code = strip_comments(&text);
        // An inline `mod tests` (at the end, by convention) is one level down: its `super` is
        // the file's own module.
        let (main, tests) = code.split_at(code.find("\nmod tests {").unwrap_or(code.len()));
        let mut test_module = module.clone();
        test_module.push("tests".to_owned());
        let found = paths(main, &module)
            .into_iter()
            .chain(paths(tests, &test_module));
        for target in found {
            if target.is_empty() {
                continue;
            }
            edges.push(Edge {
                from: module.clone(),
                to: target,
                file: file.strip_prefix(src).unwrap_or(&file).to_path_buf(),
            });
        }
    }
    edges.sort();
    edges.dedup();
    Ok(edges)
}

/// The text without `//` comments (doc comments name modules in prose).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The modules a file of module `module` names through `crate::` or `super::` paths, resolved
/// from the crate root (as far as the first two segments: enough for layers and siblings).
fn paths(code: &str, module: &[String]) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < code.len() {
        let rest = &code[i..];
        let starts_word = i == 0 || !is_ident(bytes[i - 1] as char) && bytes[i - 1] != b':';
        let (base, skip) = if starts_word && rest.starts_with("crate::") {
            (Vec::new(), "crate::".len())
        } else if starts_word && rest.starts_with("super::") {
            // `super::` from `a::b::c` (a file) is `a::b`; chained, one more level each.
            let mut base = module.to_vec();
            let mut skip = 0;
            while code[i + skip..].starts_with("super::") {
                base.pop();
                skip += "super::".len();
            }
            (base, skip)
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        i += skip;
        for tail in segments(&code[i..]) {
            let mut path = base.clone();
            path.extend(tail.into_iter().take_while(|s| !s.is_empty()));
            path.truncate(2);
            found.push(path);
        }
    }
    found
}

/// The first two segments of each path starting at `text`: `a::b`, or each item of a group
/// `{a::b, c}`.
fn segments(text: &str) -> Vec<Vec<String>> {
    let ident = |s: &str| -> String { s.chars().take_while(|c| is_ident(*c)).collect() };
    if let Some(group) = text.strip_prefix('{') {
        let mut depth = 0;
        let mut items = Vec::new();
        let mut start = 0;
        for (at, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    items.push(&group[start..at]);
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(&group[start..at]);
                    start = at + 1;
                }
                _ => {}
            }
        }
        return items
            .into_iter()
            .map(str::trim)
            .filter(|item| !item.is_empty() && *item != "self")
            .flat_map(|item| {
                let first = ident(item);
                match item[first.len()..].strip_prefix("::") {
                    Some(rest) if rest.starts_with('{') => segments(rest)
                        .into_iter()
                        .map(|mut tail| {
                            tail.insert(0, first.clone());
                            tail
                        })
                        .collect(),
                    Some(rest) => vec![vec![first, ident(rest)]],
                    None => vec![vec![first]],
                }
            })
            .collect();
    }
    let first = ident(text);
    let second = text[first.len()..]
        .strip_prefix("::")
        .map(ident)
        .filter(|s| !s.is_empty());
    let mut path = vec![first];
    path.extend(second);
    vec![path]
}

/// Top-level module -> the top-level modules it imports.
fn top_level_graph(edges: &[Edge]) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for edge in edges {
        let entry = graph.entry(edge.from[0].clone()).or_default();
        if edge.to[0] != edge.from[0] {
            entry.insert(edge.to[0].clone());
            graph.entry(edge.to[0].clone()).or_default();
        }
    }
    graph
}

/// The strongly connected components of more than one module (Tarjan), each as a cycle
/// `a -> b -> ... -> a` when one is found inside it, else as its member list.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        components: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in &s.graph[v] {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[w].min(s.low[v]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.index[w].min(s.low[v]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.components.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        components: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.components
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> Vec<String> {
        s.split("::").map(str::to_owned).collect()
    }

    #[test]
    fn paths_of_uses_and_inline_names() {
        let code = "use crate::{model::{a, b::C}, kernel::x as y, config};\n\
                    fn f(_: crate::host::proc::Pid) { super::sibling::g(); super::super::top::h() }";
        let module = path("sinks::events::store");
        let mut found = paths(code, &module);
        found.sort();
        found.dedup();
        assert_eq!(
            found,
            [
                path("config"),
                path("host::proc"),
                path("kernel::x"),
                path("model::a"),
                path("model::b"),
                path("sinks::events"),
                path("sinks::top"),
            ]
        );
    }

    #[test]
    fn a_cycle_is_found() {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
            graph.entry(a.into()).or_default().insert(b.into());
            graph.entry(b.into()).or_default();
        }
        assert_eq!(cycles(&graph), [vec!["a", "b", "c"]]);
    }

    #[test]
    fn module_paths() {
        let src = Path::new("/s");
        assert_eq!(module_of(src, Path::new("/s/kernel/mod.rs")), ["kernel"]);
        assert_eq!(
            module_of(src, Path::new("/s/kernel/loader.rs")),
            ["kernel", "loader"]
        );
        assert_eq!(module_of(src, Path::new("/s/lib.rs")), [] as [String; 0]);
    }
}

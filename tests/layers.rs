//! The crate's modules form layers that read one way: a module uses only modules of lower layers
//! (or of its own layer), and no set of modules depends on itself in a cycle.
//!
//! The check reads every file under `src/` (test code excepted: `tests.rs` files and
//! `#[cfg(test)]` items), blanks out comments and string literals, and collects each top-level
//! module's references to the others: `crate::x`, the groups of `use crate::{x, y::z}`, and
//! `super::super::x` forms that climb to the crate root. Any reference to a higher layer fails
//! the test naming the file and line, unless it is one of the [`KNOWN_UPWARD`] edges still being
//! removed; any cycle fails it too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may use the modules of any earlier layer and the others of
/// its own. `src/lib.rs` and `docs/design.md` describe the same order.
const LAYERS: &[&[&str]] = &[
    // The vocabulary and small leaf utilities: they use nothing in the crate.
    &["vocab", "hash", "duration", "net", "readiness", "yaml"],
    // The module configuration.
    &["config", "telemetry"],
    // What lazyload knows of the cluster.
    &["index"],
    // Decisions only.
    &["model"],
    // The kube I/O: the run-time cluster state, the watchers that fill it and every API write.
    &["cluster"],
    // Learning, the controllers, and the file sink: they decide with the model and write through
    // the kube I/O or files.
    &["learn", "als", "reconcile", "manifests", "inputs"],
    // The admin endpoint and the relay.
    &["admin", "xds"],
    // The metric catalog and the commands.
    &[
        "metrics",
        "serve",
        "generate",
        "report",
        "explain",
        "fake_istiod",
        "demo",
        "testing",
    ],
];

/// Upward references that exist today and are being removed (issue 13): each names the module
/// that reaches up, the module it reaches and why it is still there. The test fails when one of
/// them is gone, so that this list only shrinks.
const KNOWN_UPWARD: &[(&str, &str, &str)] = &[];

/// One reference from a module to another: where it is written.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Site {
    file: PathBuf,
    line: usize,
}

#[test]
fn modules_depend_only_downwards_and_without_cycles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let edges = crate_edges(&root.join("src"));
    let rank = ranks();

    let mut failures = Vec::new();
    let present: BTreeSet<&str> = edges.keys().map(String::as_str).collect();
    for module in &present {
        if !rank.contains_key(module) {
            failures.push(format!(
                "module `{module}` is not placed in tests/layers.rs LAYERS (nor in src/lib.rs's list)"
            ));
        }
    }
    for module in rank.keys() {
        if !present.contains(module) {
            failures.push(format!(
                "LAYERS names `{module}`, which is not a module of the crate"
            ));
        }
    }

    let mut known_seen = BTreeSet::new();
    for (from, targets) in &edges {
        for (to, sites) in targets {
            let (Some(&f), Some(&t)) = (rank.get(from.as_str()), rank.get(to.as_str())) else {
                continue;
            };
            if t <= f {
                continue;
            }
            if let Some(known) = KNOWN_UPWARD.iter().find(|(a, b, _)| a == from && b == to) {
                known_seen.insert((known.0, known.1));
                continue;
            }
            for site in sites {
                failures.push(format!(
                    "{}:{}: `{from}` (layer {f}) uses `{to}` (layer {t}), a higher layer",
                    site.file.display(),
                    site.line
                ));
            }
        }
    }
    for (from, to, why) in KNOWN_UPWARD {
        if !known_seen.contains(&(*from, *to)) {
            failures.push(format!(
                "`{from}` no longer uses `{to}` ({why}): remove the pair from KNOWN_UPWARD"
            ));
        }
    }
    if let Some(cycle) = find_cycle(&edges) {
        failures.push(format!("module cycle: {}", cycle.join(" -> ")));
    }
    assert!(failures.is_empty(), "layer violations:\n{}", failures.join("\n"));
}

#[test]
fn lib_rs_lists_every_module_once_in_layer_order() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let listed: Vec<&str> = lib
        .lines()
        .filter_map(|l| {
            // A module that exists only under a feature is listed unlinked: "- `testing` (...)".
            let item = l.strip_prefix("//! - ")?;
            let item = item.strip_prefix('[').unwrap_or(item).strip_prefix('`')?;
            item.split_once('`').map(|(m, _)| m)
        })
        .collect();
    let declared: BTreeSet<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';'))
        .collect();
    assert_eq!(
        listed.iter().copied().collect::<BTreeSet<_>>(),
        declared,
        "listed vs declared"
    );
    assert_eq!(listed.len(), declared.len(), "a module listed twice: {listed:?}");
    let rank = ranks();
    let ranks: Vec<usize> = listed
        .iter()
        .map(|m| rank.get(m).copied().unwrap_or(usize::MAX))
        .collect();
    assert!(
        ranks.is_sorted(),
        "src/lib.rs lists modules out of layer order: {:?}",
        listed.iter().zip(&ranks).collect::<Vec<_>>()
    );
}

#[test]
fn the_scanner_sees_every_form_of_reference_and_nothing_in_comments_or_strings() {
    let text = r##"
use crate::alpha::A;
use crate::{beta, gamma::G};
use crate::{
    delta::{D1, D2},
    epsilon,
};
// crate::comment_line
/* crate::block_comment */
/// [`crate::doc_link`]
fn f() {
    let s = "crate::in_string";
    let r = r#"crate::in_raw_string"#;
    let c = '"';
    let l: &'static str = "";
    super::super::zeta::z();
    super::sibling::s();
}
#[cfg(test)]
mod tests {
    use crate::test_only;
}
"##;
    let refs = references(text, 2);
    let names: BTreeSet<&str> = refs.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        ["alpha", "beta", "delta", "epsilon", "gamma", "zeta"].into(),
        "{refs:?}"
    );
    assert!(refs.contains(&("zeta".to_string(), 16)), "{refs:?}");
}

#[test]
fn a_cycle_is_found_and_named() {
    let edge = |a: &str, b: &str| (a.to_string(), BTreeMap::from([(b.to_string(), vec![])]));
    let acyclic: Edges = [edge("a", "b"), edge("b", "c")].into_iter().collect();
    assert_eq!(find_cycle(&acyclic), None);
    let cyclic: Edges = [edge("a", "b"), edge("b", "c"), edge("c", "a")]
        .into_iter()
        .collect();
    assert_eq!(
        find_cycle(&cyclic),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}

/// Module -> module it uses -> where.
type Edges = BTreeMap<String, BTreeMap<String, Vec<Site>>>;

fn ranks() -> BTreeMap<&'static str, usize> {
    LAYERS
        .iter()
        .enumerate()
        .flat_map(|(rank, modules)| modules.iter().map(move |m| (*m, rank)))
        .collect()
}

/// Every top-level module's references to the other top-level modules.
fn crate_edges(src: &Path) -> Edges {
    let mut edges = Edges::new();
    for file in rust_files(src) {
        let relative = file.strip_prefix(src).unwrap();
        let parts: Vec<String> = relative
            .with_extension("")
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        // lib.rs declares the modules; main.rs is the binary, which uses the library from outside.
        if parts == ["lib"] || parts == ["main"] || parts.iter().any(|p| p == "tests") {
            continue;
        }
        let module = parts[0].clone();
        let text = std::fs::read_to_string(&file).unwrap();
        let entry = edges.entry(module.clone()).or_default();
        for (target, line) in references(&text, parts.len()) {
            if target != module {
                entry.entry(target).or_default().push(Site {
                    file: Path::new("src").join(relative),
                    line,
                });
            }
        }
    }
    edges
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The top-level modules `text` refers to, with 1-based lines, for a file `depth` modules below
/// the crate root (`src/a.rs` is 1, `src/a/b.rs` is 2).
fn references(text: &str, depth: usize) -> Vec<(String, usize)> {
    let code = without_test_items(&blank_comments_and_strings(text));
    let bytes = code.as_bytes();
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let mut found = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let starts_word = at == 0 || !is_ident(bytes[at - 1]);
        if starts_word && code[at..].starts_with("crate::") {
            let after = at + "crate::".len();
            if code[after..].starts_with('{') {
                for name in group_heads(&code[after..]) {
                    found.push((name, line_of(at)));
                }
            } else if let Some(name) = ident(&code[after..]) {
                found.push((name, line_of(at)));
            }
            at = after;
        } else if starts_word && code[at..].starts_with("super::") {
            let mut rest = at;
            let mut climbs = 0;
            while code[rest..].starts_with("super::") {
                climbs += 1;
                rest += "super::".len();
            }
            if climbs == depth
                && let Some(name) = ident(&code[rest..])
            {
                found.push((name, line_of(at)));
            }
            at = rest;
        } else {
            at += 1;
        }
    }
    found
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The identifier `s` starts with, if any.
fn ident(s: &str) -> Option<String> {
    let len = s.bytes().take_while(|b| is_ident(*b)).count();
    (len > 0).then(|| s[..len].to_string())
}

/// The first segment of each item of the `{...}` group `s` starts with.
fn group_heads(s: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect_head = false;
    for (i, c) in s.char_indices() {
        match c {
            '{' => {
                depth += 1;
                expect_head = depth == 1;
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => expect_head = true,
            c if expect_head && !c.is_whitespace() => {
                expect_head = false;
                heads.extend(ident(&s[i..]));
            }
            _ => {}
        }
    }
    heads
}

/// `text` with comments and the contents of string and char literals replaced by spaces
/// (newlines kept, so lines still count).
fn blank_comments_and_strings(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_'))
            && matches!(next, Some('"') | Some('#'))
            && raw_string_hashes(&chars[i + 1..]).is_some()
        {
            let hashes = raw_string_hashes(&chars[i + 1..]).unwrap();
            let close: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            out.push('r');
            i += 2 + hashes;
            while i < chars.len() && !chars[i..].starts_with(&close) {
                out.push(blank(chars[i]));
                i += 1;
            }
            i += close.len();
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                let skip = if chars[i] == '\\' { 2 } else { 1 };
                for _ in 0..skip {
                    if let Some(&c) = chars.get(i) {
                        out.push(blank(c));
                    }
                    i += 1;
                }
            }
            i += 1;
        } else if c == '\'' && next == Some('\\') {
            // An escaped char literal: blank up to its closing quote.
            out.push(' ');
            i += 2;
            while i < chars.len() && chars[i] != '\'' {
                out.push(' ');
                i += 1;
            }
            i += 1;
        } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
            out.push_str("   ");
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// For `"` or `#...#"` (what follows an `r`): how many `#` open the raw string.
fn raw_string_hashes(after_r: &[char]) -> Option<usize> {
    let hashes = after_r.iter().take_while(|c| **c == '#').count();
    (after_r.get(hashes) == Some(&'"')).then_some(hashes)
}

/// `code` with every `#[cfg(test)]` item blanked (a `mod x;` line or a braced item).
fn without_test_items(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        let end = match (item.find(';'), item.find('{')) {
            (Some(semi), Some(open)) if semi < open => semi + 1,
            (Some(semi), None) => semi + 1,
            (_, Some(open)) => open + matching_brace(&item[open..]),
            (None, None) => item.len(),
        };
        out.extend(item[..end].chars().map(|c| if c == '\n' { '\n' } else { ' ' }));
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// The length of the braced block `s` starts with.
fn matching_brace(s: &str) -> usize {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    s.len()
}

/// A cycle in `edges`, as the modules along it (the first repeated at the end), if any.
fn find_cycle(edges: &Edges) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &Edges,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flat_map(BTreeMap::keys) {
            if let Some(cycle) = visit(next, edges, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|start| visit(start, edges, &mut done, &mut Vec::new()))
}

//! The floors of the house (docs/architecture.md) as a check: every import of `src/` points to
//! its own floor or below, no two source files import each other round a cycle, every top-level
//! module has a floor, and the wire names of closed sets are spelled in one place only.
//!
//! Imports are read from the source text: `crate::…`, `super::…`, `self::…` and child-module
//! paths, `use` groups included, outside comments, string literals and `#[cfg(test)]` modules
//! (tests may reach anywhere; `*_tests.rs` files hold such modules).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Every `.rs` file under `src/`, by its path relative to `src/`.
fn sources() -> BTreeMap<String, String> {
    fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, base, out);
            } else if path.extension().is_some_and(|e| e == "rs")
                && !path.to_string_lossy().ends_with("_tests.rs")
            {
                // `*_tests.rs` files are unit tests kept apart (`#[cfg(test)] #[path]`).
                let rel = path
                    .strip_prefix(base)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.insert(rel, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    let src = root().join("src");
    walk(&src, &src, &mut out);
    out
}

/// The module path of a file: `worker/mod.rs` -> [worker], `worker/gpu.rs` -> [worker, gpu].
fn module_of(file: &str) -> Vec<String> {
    let mut parts: Vec<String> = file
        .trim_end_matches(".rs")
        .split('/')
        .map(String::from)
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The code of a file without comments, string and char literals, and `#[cfg(test)]` items.
fn code_of(text: &str) -> String {
    let (code, _) = blank(text);
    let mut out = String::with_capacity(code.len());
    let mut at = 0;
    for r in item_ranges(&code, "#[cfg(test)]") {
        out.push_str(&code[at..r.start]);
        at = r.end;
    }
    out.push_str(&code[at..]);
    out
}

/// The text with comments and the contents of string and char literals replaced by spaces (so
/// that byte offsets still match the text), and the byte ranges of the string literals'
/// contents.
fn blank(text: &str) -> (String, Vec<std::ops::Range<usize>>) {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let mut strings = Vec::new();
    let space = |out: &mut Vec<u8>, from: usize, to: usize| {
        for x in &mut out[from..to.min(b.len())] {
            if *x != b'\n' {
                *x = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            let start = i;
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            space(&mut out, start, i);
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let start = i;
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            space(&mut out, start, i);
        } else if c == b'r' && matches!(b.get(i + 1), Some(b'"' | b'#')) && !ident_byte(b, i) {
            // A raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                i += 1;
                continue;
            }
            let start = j + 1;
            j = start;
            while j < b.len()
                && !(b[j] == b'"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&b'#')))
            {
                j += 1;
            }
            strings.push(start..j);
            space(&mut out, start, j);
            i = j + 1 + hashes;
        } else if c == b'"' {
            let start = i + 1;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            strings.push(start..i.min(b.len()));
            space(&mut out, start, i);
            i += 1;
        } else if c == b'\'' && is_char_literal(b, i) {
            let start = i + 1;
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            space(&mut out, start, i);
            i += 1;
        } else {
            i += 1;
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), strings)
}

fn ident_byte(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// `'x'`, `'\n'`, `'\u{..}'` — not a lifetime such as `'a`.
fn is_char_literal(b: &[u8], i: usize) -> bool {
    match b.get(i + 1) {
        Some(b'\\') => true,
        Some(_) => {
            // One (possibly multi-byte) character, then a quote.
            let mut j = i + 2;
            while j < b.len() && (b[j] & 0xC0) == 0x80 {
                j += 1;
            }
            b.get(j) == Some(&b'\'')
        }
        None => false,
    }
}

/// The byte ranges of the items that start with `marker` in blanked code: up to the end of the
/// first `{ … }` block after it, or to its `;` when that comes first.
fn item_ranges(code: &str, marker: &str) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find(marker).map(|k| from + k) {
        let after = &code[at..];
        let brace = after.find('{');
        let semi = after.find(';');
        let len = match (brace, semi) {
            (Some(b), Some(s)) if s < b => s + 1,
            (Some(b), _) => {
                let mut depth = 0;
                let mut end = after.len();
                for (k, ch) in after[b..].char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, Some(s)) => s + 1,
            (None, None) => after.len(),
        };
        out.push(at..at + len);
        from = at + len;
    }
    out
}

/// The child modules a file declares (`mod x;` / `pub mod x;`).
fn declared_children(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let t = line.trim();
        let t = t
            .strip_prefix("pub(crate) ")
            .or_else(|| t.strip_prefix("pub "))
            .unwrap_or(t);
        if let Some(rest) = t.strip_prefix("mod ") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if rest[name.len()..].trim_start().starts_with(';') {
                out.insert(name);
            }
        }
    }
    out
}

/// The paths a file names: each as module segments from the crate root (unresolved).
fn named_paths(file: &str, code: &str) -> Vec<Vec<String>> {
    let me = module_of(file);
    let is_mod_file = file.ends_with("mod.rs") || file == "lib.rs" || file == "main.rs";
    // The module a `super::` starts from: a mod.rs file is its module; another file's parent is
    // the module around it.
    let parent: Vec<String> = if is_mod_file {
        me[..me.len().saturating_sub(1)].to_vec()
    } else {
        me[..me.len() - 1].to_vec()
    };
    let children = declared_children(code);
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let tokens = tokenize(code);
    let mut k = 0;
    while k < tokens.len() {
        let (start, ref tok) = tokens[k];
        // `a::x` and `v.x::<T>()` are not paths that start at `x`.
        let before = code[..start].trim_end();
        let preceded_by_path = before.ends_with("::") || before.ends_with('.');
        // A path goes on with `::` (`pub(super)` and `pub(crate)` are not paths).
        let continues = code[start + tok.len()..].trim_start().starts_with("::");
        let base: Option<Vec<String>> = match tok.as_str() {
            "crate" if !preceded_by_path && continues => Some(vec![]),
            "super" if !preceded_by_path && continues => Some(parent.clone()),
            "self" if !preceded_by_path && continues => Some(me.clone()),
            name if !preceded_by_path && children.contains(name) => {
                // A child module named without `self::` (only counts when followed by `::`).
                if code[start + name.len()..].starts_with("::") {
                    let mut m = me.clone();
                    m.push(name.to_string());
                    out.push(m.clone());
                    Some(m)
                } else {
                    None
                }
            }
            _ => None,
        };
        let Some(base) = base else {
            k += 1;
            continue;
        };
        let mut pos = start + tok.len();
        let (paths, end) = parse_path_tail(code, pos, base);
        out.extend(paths);
        pos = end;
        while k < tokens.len() && tokens[k].0 < pos {
            k += 1;
        }
        let _ = bytes;
    }
    out
}

/// Identifiers with their byte offsets.
fn tokenize(code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut start = 0;
    for (i, ch) in code.char_indices() {
        if ch.is_alphanumeric() || ch == '_' {
            if cur.is_empty() {
                start = i;
            }
            cur.push(ch);
        } else if !cur.is_empty() {
            out.push((start, std::mem::take(&mut cur)));
        }
    }
    if !cur.is_empty() {
        out.push((start, cur));
    }
    out
}

/// Reads `::a::b`, `::{a, b::c, d::{e}}` after a path start; returns every full path it names
/// and where the path ends.
fn parse_path_tail(code: &str, mut pos: usize, base: Vec<String>) -> (Vec<Vec<String>>, usize) {
    let mut path = base;
    let mut out = Vec::new();
    loop {
        let rest = &code[pos..];
        let trimmed = rest.trim_start();
        if !trimmed.starts_with("::") {
            out.push(path.clone());
            return (out, pos);
        }
        pos += rest.len() - trimmed.len() + 2;
        let rest = &code[pos..];
        let trimmed = rest.trim_start();
        pos += rest.len() - trimmed.len();
        if trimmed.starts_with('{') {
            // A group: split at top-level commas.
            let mut depth = 0;
            let mut end = pos;
            for (i, ch) in code[pos..].char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = pos + i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let inner = &code[pos + 1..end];
            let mut item_start = 0;
            let mut d = 0;
            let mut items = Vec::new();
            for (i, ch) in inner.char_indices() {
                match ch {
                    '{' => d += 1,
                    '}' => d -= 1,
                    ',' if d == 0 => {
                        items.push(&inner[item_start..i]);
                        item_start = i + 1;
                    }
                    _ => {}
                }
            }
            items.push(&inner[item_start..]);
            for item in items {
                let item = item.trim();
                if item.is_empty() || item == "self" || item == "*" {
                    out.push(path.clone());
                    continue;
                }
                let name: String = item
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                let mut p = path.clone();
                p.push(name.clone());
                let tail_at = item.find(&name).unwrap_or(0) + name.len();
                // Recurse on `name::…` inside the group by re-parsing the item's text.
                let (sub, _) = parse_path_tail(item, tail_at, p);
                out.extend(sub);
            }
            return (out, end + 1);
        }
        let name: String = trimmed
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            out.push(path.clone());
            return (out, pos);
        }
        path.push(name.clone());
        pos += name.len();
    }
}

/// The file a module path lands in: the longest prefix that is a module file.
fn resolve(path: &[String], modules: &BTreeMap<Vec<String>, String>) -> Option<String> {
    (0..=path.len())
        .rev()
        .find_map(|n| modules.get(&path[..n].to_vec()).cloned())
}

/// The floors of docs/architecture.md: module -> floor number.
fn floors() -> BTreeMap<String, u32> {
    let text = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 {
            continue;
        }
        let Ok(floor) = cells[1].parse::<u32>() else {
            continue;
        };
        for m in cells[2].split(',') {
            let m = m.trim().trim_matches('`');
            if !m.is_empty() {
                out.insert(m.to_string(), floor);
            }
        }
    }
    out
}

/// File -> the files it imports.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let files = sources();
    let modules: BTreeMap<Vec<String>, String> =
        files.keys().map(|f| (module_of(f), f.clone())).collect();
    let mut graph = BTreeMap::new();
    for (file, text) in &files {
        let code = code_of(text);
        let mut targets = BTreeSet::new();
        for path in named_paths(file, &code) {
            if let Some(target) = resolve(&path, &modules) {
                if target != *file {
                    targets.insert(target);
                }
            }
        }
        graph.insert(file.clone(), targets);
    }
    graph
}

fn top_module(file: &str) -> Option<String> {
    let m = module_of(file);
    m.first().cloned()
}

#[test]
fn the_reader_sees_through_comments_strings_and_groups() {
    let code = code_of(
        "use crate::a::{b, c::{d, e}}; // crate::z\nlet s = \"crate::y\";\n#[cfg(test)]\nmod tests { use crate::w; }\npub(super) fn f() { super::q::r(); }",
    );
    let paths: BTreeSet<String> = named_paths("x/y.rs", &code)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    let want: BTreeSet<String> = ["a::b", "a::c::d", "a::c::e", "x::q::r"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(paths, want);
}

#[test]
fn a_method_call_is_not_a_child_module() {
    let code = code_of("mod parse;\nfn f() { t.parse::<u8>(); parse::go(); }");
    let paths: BTreeSet<String> = named_paths("m.rs", &code)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    let want: BTreeSet<String> = ["m::parse", "m::parse::go"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(paths, want);
}

#[test]
fn every_top_level_module_has_a_floor() {
    let floors = floors();
    assert!(floors.len() >= 10, "docs/architecture.md lists {floors:?}");
    let mut missing = BTreeSet::new();
    for file in sources().keys() {
        if let Some(top) = top_module(file) {
            if !floors.contains_key(&top) {
                missing.insert(top);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "modules without a floor in docs/architecture.md: {missing:?}"
    );
}

#[test]
fn imports_point_to_the_same_floor_or_below() {
    let floors = floors();
    let mut upward = Vec::new();
    for (file, targets) in import_graph() {
        let Some(from) = top_module(&file) else {
            continue;
        };
        for target in targets {
            let Some(to) = top_module(&target) else {
                continue;
            };
            let (Some(a), Some(b)) = (floors.get(&from), floors.get(&to)) else {
                continue;
            };
            if b > a {
                upward.push(format!("{file} (floor {a}) imports {target} (floor {b})"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports running up:\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_two_source_files_import_each_other_round_a_cycle() {
    let graph = import_graph();
    // Depth-first search for a back edge; reports one cycle.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark: BTreeMap<&str, Mark> = graph.keys().map(|k| (k.as_str(), Mark::New)).collect();
    fn visit<'a>(
        v: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        mark: &mut BTreeMap<&'a str, Mark>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        mark.insert(v, Mark::Open);
        stack.push(v);
        for w in graph.get(v).into_iter().flatten() {
            match mark.get(w.as_str()).copied().unwrap_or(Mark::Done) {
                Mark::Open => {
                    let at = stack.iter().position(|x| *x == w).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        stack[at..].iter().map(|s| s.to_string()).collect();
                    cycle.push(w.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(w, graph, mark, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        mark.insert(v, Mark::Done);
        None
    }
    for v in graph.keys() {
        if mark[v.as_str()] == Mark::New {
            let mut stack = Vec::new();
            if let Some(cycle) = visit(v, &graph, &mut mark, &mut stack) {
                panic!("import cycle: {}", cycle.join(" -> "));
            }
        }
    }
}

/// The wire spellings clients see of the closed sets: job states and statuses, modes,
/// schedulers, prompt schedules, stop-step maps, region masks, output formats.
fn wire_names() -> BTreeSet<&'static str> {
    use r2f::generate::JobMode;
    use r2f::image::ImageFormat;
    use r2f::job::{JobState, Outcome};
    use r2f::r2f::regions::RegionMask;
    use r2f::r2f::{PromptSchedule, StopStepMapName};
    use r2f::schedulers::discrete::Scheduler;
    // Canonical names only: some aliases (`sd3`, `sdxl` for the stop-step maps) are also the
    // names of other things (model families).
    let mut out = BTreeSet::new();
    out.extend(JobState::ALL.iter().map(|v| v.name()));
    out.extend(Outcome::ALL.iter().map(|v| v.name()));
    out.extend(JobMode::ALL.iter().map(|v| v.name()));
    out.extend(Scheduler::ALL.iter().map(|v| v.name()));
    out.extend(PromptSchedule::ALL.iter().map(|v| v.name()));
    out.extend(StopStepMapName::ALL.iter().map(|v| v.name()));
    out.extend(RegionMask::ALL.iter().map(|v| v.name()));
    out.extend(ImageFormat::ALL.iter().map(|v| v.name()));
    out
}

#[test]
fn wire_names_are_spelled_only_where_their_set_is_defined() {
    let names = wire_names();
    assert!(names.contains("succeeded") && names.contains("dpm++2m-karras"));
    let files = sources();
    // Where each name is defined: the files whose `named_enum!` blocks spell it.
    let mut defined: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut uses = Vec::new();
    for (file, text) in &files {
        let (code, strings) = blank(text);
        let enums = item_ranges(&code, "named_enum! {");
        let tests = item_ranges(&code, "#[cfg(test)]");
        for r in strings {
            let lit = &text[r.clone()];
            // A JSON key (`"r2f": …` in a json! literal) is a field's name, not a value.
            let after = text[r.end + 1..].trim_start();
            let is_key = after.starts_with(':') && !after.starts_with("::");
            if !names.contains(lit) || is_key {
                continue;
            }
            if enums.iter().any(|e| e.contains(&r.start)) {
                defined
                    .entry(lit.to_string())
                    .or_default()
                    .insert(file.clone());
            } else if !tests.iter().any(|t| t.contains(&r.start)) {
                let line = text[..r.start].lines().count();
                uses.push((lit.to_string(), file.clone(), line));
            }
        }
    }
    let stray: Vec<String> = uses
        .into_iter()
        .filter(|(lit, file, _)| !defined.get(lit).is_some_and(|f| f.contains(file)))
        .map(|(lit, file, line)| format!("src/{file}:{line}: \"{lit}\""))
        .collect();
    assert!(
        stray.is_empty(),
        "wire names spelled outside their named_enum! (use the enum):\n{}",
        stray.join("\n")
    );
    for name in ["succeeded", "r2fplus", "euler", "webp"] {
        assert!(
            defined.contains_key(name),
            "{name} is defined nowhere: {defined:?}"
        );
    }
}

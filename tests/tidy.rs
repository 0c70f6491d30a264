//! What ARCHITECTURE.md claims about the code, checked on the source itself (as rust-analyzer's
//! own tidy test does): every file opens with a `//!` paragraph saying what it is for; HTTP
//! clients (`reqwest`) only in `src/azure/`, AMQP (`lapin`) only in `src/bus/amqp/`, `anyhow` only
//! where processes are wired together (`src/cli/`, `src/main.rs`) and at the emulator's start-up;
//! the emulator imports nothing of the rest of the crate (a client bug cannot hide behind the
//! same mistake in it); and no function grows past 100 lines — the ones that are longer today are
//! listed below with their length, may only shrink, and leave the list when they are split.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Functions over [`MAX_FUNCTION_LINES`] today, by `file::name`, with the most lines each may
/// have until it is split.
const LONG_FUNCTIONS: &[(&str, usize)] = &[
    ("src/emulator/batch/pools.rs::add_pool", 235),
    ("src/telemetry/metrics.rs::new", 136),
    ("src/cli/run.rs::run", 126),
    ("src/emulator/aad.rs::token", 128),
    ("src/cli/plan_view.rs::render", 119),
    ("src/cli/worker.rs::run", 111),
    ("src/model/trigger.rs::cloud_event", 109),
    ("src/emulator/arm/gallery.rs::plan_version", 108),
    ("src/emulator/world.rs::check", 107),
    ("src/emulator/faults.rs::parse_rule", 102),
];
const MAX_FUNCTION_LINES: usize = 100;

/// Which files may name a crate: the crate's path prefix and the directories (or files) allowed.
const BOUNDARIES: &[(&str, &[&str])] = &[
    ("reqwest::", &["src/azure/"]),
    ("lapin::", &["src/bus/amqp/"]),
    (
        "anyhow::",
        &[
            "src/cli/",
            "src/main.rs",
            "src/emulator/mod.rs",
            "src/emulator/server.rs",
            "src/emulator/state.rs",
            "src/emulator/tls.rs",
        ],
    ),
];

fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = Vec::new();
    walk(&root.join("src"), &mut paths);
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("a UTF-8 source file");
            let relative = path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
            (relative, text)
        })
        .collect()
}

/// The code of a line, without a `//` comment or string contents that merely mention a name.
fn code_of(line: &str) -> &str {
    let line = line.trim_start();
    if line.starts_with("//") { "" } else { line }
}

#[test]
fn every_file_opens_with_what_it_is_for() {
    let missing: Vec<String> = sources()
        .into_iter()
        .filter(|(_, text)| !text.trim_start().starts_with("//!"))
        .map(|(path, _)| path)
        .collect();
    assert!(missing.is_empty(), "files without a `//!` paragraph first: {missing:?}");
}

#[test]
fn http_amqp_and_anyhow_stay_inside_their_layers() {
    let mut crossings = Vec::new();
    for (path, text) in sources() {
        for (crate_path, allowed) in BOUNDARIES {
            if allowed.iter().any(|a| path.starts_with(a)) {
                continue;
            }
            let name = crate_path.trim_end_matches("::");
            for (n, line) in text.lines().enumerate() {
                let code = code_of(line);
                if code.contains(crate_path) || code.starts_with(&format!("use {name}")) {
                    crossings.push(format!("{path}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        crossings.is_empty(),
        "used outside their layer:\n{}",
        crossings.join("\n")
    );
}

#[test]
fn the_emulator_imports_nothing_of_the_client_side() {
    let mut imports = Vec::new();
    for (path, text) in sources().into_iter().filter(|(p, _)| p.starts_with("src/emulator/")) {
        for (n, line) in text.lines().enumerate() {
            let code = code_of(line);
            let mut rest = code;
            while let Some(at) = rest.find("crate::") {
                let after = &rest[at + "crate::".len()..];
                if !after.starts_with("emulator") {
                    imports.push(format!("{path}:{}: {}", n + 1, line.trim()));
                    break;
                }
                rest = after;
            }
        }
    }
    assert!(
        imports.is_empty(),
        "the emulator reaches outside src/emulator:\n{}",
        imports.join("\n")
    );
}

/// Every `fn` of a rustfmt-formatted file and its length in lines (signature to closing brace).
fn function_lengths(text: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let signature = trimmed
            .trim_start_matches("pub ")
            .trim_start_matches("pub(crate) ")
            .trim_start_matches("pub(super) ")
            .trim_start_matches("const ")
            .trim_start_matches("async ");
        let Some(after) = signature.strip_prefix("fn ") else {
            continue;
        };
        let name: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let closing = format!("{indent}}}");
        if let Some(end) = lines[i + 1..].iter().position(|l| *l == closing) {
            found.push((name, end + 2));
        }
    }
    found
}

#[test]
fn no_function_grows_past_a_hundred_lines() {
    let allowed: BTreeMap<&str, usize> = LONG_FUNCTIONS.iter().copied().collect();
    let mut too_long = Vec::new();
    let mut seen = Vec::new();
    for (path, text) in sources() {
        for (name, length) in function_lengths(&text) {
            let key = format!("{path}::{name}");
            match allowed.get(key.as_str()) {
                Some(&limit) => {
                    seen.push(key.clone());
                    if length > limit {
                        too_long.push(format!("{key}: {length} lines, more than its {limit}"));
                    }
                    if length <= MAX_FUNCTION_LINES {
                        too_long.push(format!("{key}: {length} lines now: take it off LONG_FUNCTIONS"));
                    }
                }
                None if length > MAX_FUNCTION_LINES => {
                    too_long.push(format!("{key}: {length} lines (at most {MAX_FUNCTION_LINES})"));
                }
                None => {}
            }
        }
    }
    let gone: Vec<&&str> = allowed.keys().filter(|k| !seen.iter().any(|s| s == **k)).collect();
    assert!(too_long.is_empty(), "split these:\n{}", too_long.join("\n"));
    assert!(
        gone.is_empty(),
        "split or renamed: take them off LONG_FUNCTIONS: {gone:?}"
    );
}

#[test]
fn the_checks_catch_what_they_are_for() {
    let long_body = "    x();\n".repeat(120);
    let text = format!("//! a file\nfn short() {{\n}}\n\nfn long() {{\n{long_body}}}\n");
    let lengths = function_lengths(&text);
    assert_eq!(lengths, vec![("short".to_string(), 2), ("long".to_string(), 122)]);
    assert_eq!(code_of("    // uses reqwest::Client"), "");
    assert_eq!(
        code_of("    let c = reqwest::Client::new();"),
        "let c = reqwest::Client::new();"
    );
}

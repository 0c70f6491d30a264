//! What ARCHITECTURE.md claims about the code, checked on the source itself (as rust-analyzer's
//! own tidy test does): every file opens with a `//!` paragraph saying what it is for; HTTP
//! clients (`reqwest`) only in `src/azure/`, AMQP (`lapin`) only in `src/bus/amqp/`, `anyhow` only
//! where processes are wired together (`src/cli/`, `src/main.rs`) and at the emulator's start-up;
//! the emulator imports nothing of the rest of the crate (a client bug cannot hide behind the
//! same mistake in it); no function grows past 100 lines — the ones that are longer today are
//! listed below with their length, may only shrink, and leave the list when they are split; and no
//! `unwrap()`/`expect()` outside tests but the ones listed in `ALLOWED_PANICS`, each with why it
//! cannot be reached by input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Functions over [`MAX_FUNCTION_LINES`], by `file::name`, with the most lines each may have
/// until it is split. None today: keep it so.
const LONG_FUNCTIONS: &[(&str, usize)] = &[];
const MAX_FUNCTION_LINES: usize = 100;

/// The `unwrap()`/`expect()` calls allowed outside tests, per file, and why input cannot reach
/// them. A file may have fewer (then lower its count), never more.
const ALLOWED_PANICS: &[(&str, usize, &str)] = &[
    (
        "src/azure/client.rs",
        1,
        "the resource manager URL was validated when the settings loaded",
    ),
    ("src/azure/http.rs", 1, "a serde_json::Value always serializes"),
    (
        "src/bus/amqp/connection.rs",
        1,
        "the link was stored just before it is read",
    ),
    (
        "src/bus/amqp/consumer.rs",
        2,
        "a delivery's acker is taken once; settling twice is a runtime bug",
    ),
    (
        "src/cli/run.rs",
        3,
        "a constant progress template; a lock only this process's handlers take",
    ),
    (
        "src/cli/session.rs",
        1,
        "the client settings were checked when the config loaded",
    ),
    (
        "src/cli/watch.rs",
        1,
        "the reader is opened before the loop that takes it",
    ),
    (
        "src/emulator/arm/compute.rs",
        1,
        "one source, counted by the validation before it",
    ),
    (
        "src/emulator/arm/gallery.rs",
        5,
        "the emulator's own state: parents exist, bodies are objects it built",
    ),
    (
        "src/emulator/arm/resources.rs",
        6,
        "the emulator's own state: ids it parsed, operations it made",
    ),
    (
        "src/emulator/auth.rs",
        3,
        "HMAC takes any key length; claims are its own struct",
    ),
    (
        "src/emulator/batch/pools.rs",
        1,
        "pool bodies are objects the emulator built",
    ),
    (
        "src/emulator/http.rs",
        3,
        "status codes from its own constants; a Value serializes",
    ),
    (
        "src/emulator/mod.rs",
        2,
        "a constant address; the scratch dir made when no state dir is given",
    ),
    (
        "src/emulator/server.rs",
        1,
        "a response built from a status and headers it checked",
    ),
    (
        "src/emulator/world.rs",
        1,
        "the built-in world, parsed by a test on every build",
    ),
    (
        "src/ledger/record.rs",
        1,
        "records are plain structs; serde_json cannot fail on them",
    ),
    (
        "src/model/envelope.rs",
        1,
        "envelopes are plain structs; serde_json cannot fail on them",
    ),
    (
        "src/model/ids.rs",
        3,
        "ids are made only by parse and new, which require every part",
    ),
    (
        "src/model/trigger.rs",
        1,
        "triggers are plain structs; serde_json cannot fail on them",
    ),
    (
        "src/telemetry/metrics.rs",
        9,
        "constant metric definitions: a bad one fails every test at start-up",
    ),
];

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

/// Files compiled only for tests: `#[cfg(test)] mod name;` makes `name.rs` one.
fn test_only_files(sources: &[(String, String)]) -> Vec<String> {
    let mut files = Vec::new();
    for (path, text) in sources {
        let dir = match path.strip_suffix("mod.rs").or_else(|| path.strip_suffix("lib.rs")) {
            Some(dir) => dir.to_string(),
            None => format!("{}/", path.trim_end_matches(".rs")),
        };
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for pair in lines.windows(2) {
            let module = pair[1].trim_start_matches("pub(crate) ").trim_start_matches("pub ");
            if pair[0] == "#[cfg(test)]"
                && let Some(name) = module.strip_prefix("mod ").and_then(|m| m.strip_suffix(';'))
            {
                files.push(format!("{dir}{name}.rs"));
            }
        }
    }
    files
}

/// The `unwrap()`/`expect()` calls of a file's non-test code (before its `#[cfg(test)]` module),
/// as `line: code`.
fn panics_outside_tests(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .windows(2)
        .position(|pair| {
            pair[0].trim() == "#[cfg(test)]"
                && pair[1]
                    .trim_start()
                    .trim_start_matches("pub(crate) ")
                    .starts_with("mod ")
                && pair[1].ends_with('{')
        })
        .unwrap_or(lines.len());
    lines[..end]
        .iter()
        .enumerate()
        .filter(|(_, line)| {
            let code = code_of(line);
            code.contains(".unwrap()") || code.contains(".expect(")
        })
        .map(|(n, line)| format!("{}: {}", n + 1, line.trim()))
        .collect()
}

#[test]
fn no_unwrap_or_expect_outside_tests_but_the_listed() {
    let sources = sources();
    let test_only = test_only_files(&sources);
    let allowed: BTreeMap<&str, usize> = ALLOWED_PANICS.iter().map(|(path, n, _)| (*path, *n)).collect();
    let mut wrong = Vec::new();
    for (path, text) in sources.iter().filter(|(path, _)| !test_only.contains(path)) {
        let found = panics_outside_tests(text);
        let limit = allowed.get(path.as_str()).copied().unwrap_or(0);
        if found.len() > limit {
            wrong.push(format!(
                "{path}: {} unwrap/expect, {limit} allowed (return an error naming the input):\n  {}",
                found.len(),
                found.join("\n  ")
            ));
        } else if found.len() < limit {
            wrong.push(format!(
                "{path}: {} unwrap/expect now: lower ALLOWED_PANICS to it",
                found.len()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_checks_catch_what_they_are_for() {
    let with_tests =
        "//! a file\nfn f() { x.unwrap(); }\n// y.unwrap()\n#[cfg(test)]\nmod tests {\n    fn t() { z.unwrap(); }\n}\n";
    assert_eq!(
        panics_outside_tests(with_tests),
        vec!["2: fn f() { x.unwrap(); }".to_string()]
    );
    let parents = vec![
        (
            "src/stages/mod.rs".to_string(),
            "#[cfg(test)]\nmod decisions;\nmod common;\n".to_string(),
        ),
        (
            "src/lib.rs".to_string(),
            "#[cfg(test)]\npub(crate) mod testkit;\n".to_string(),
        ),
        ("src/a.rs".to_string(), "#[cfg(test)]\nmod b;\n".to_string()),
    ];
    assert_eq!(
        test_only_files(&parents),
        vec!["src/stages/decisions.rs", "src/testkit.rs", "src/a/b.rs"]
    );
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

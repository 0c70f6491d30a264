//! The hostile-input corpus (`tests/hostile/corpus.toml`) against real processes: every spec,
//! settings file and command line through the built `sigrun` binary under a 512 MiB data limit
//! (exit 2, naming what is wrong, no secret, no raw control byte, no panic); every trigger and
//! stage message published straight to the real broker while two `sigrun worker` processes run
//! (each parked with its reason, bounded; the workers neither die nor reconnect, stay ready and
//! stay small); every raw request to the emulator over HTTPS (its status and Azure's error code).
//! Then a normal nightly run through the same workers and emulator must succeed. The figures are
//! printed.

#[path = "it/helpers.rs"]
mod helpers;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use reqwest::Method;
use serde::Deserialize;
use sigrun::bus::amqp::{AmqpBus, ParkedMessage};
use sigrun::events::RunResult;
use sigrun::model::text::MAX_REASON_BYTES;
use support::process::NIGHTLY;
use support::{Process, Setup};
use uuid::Uuid;

const CORPUS: &str = "tests/hostile/corpus.toml";
/// The data segment limit (RLIMIT_DATA, which bounds malloc's heap and mmaps) every command runs
/// under: a read that is not bounded, or a number turned into an allocation, aborts instead.
const DATA_LIMIT: &str = "--data=536870912";
/// The most a worker may have held in memory (VmHWM) after the whole corpus.
const WORKER_PEAK_LIMIT_KIB: u64 = 300 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Corpus {
    spec: Vec<SpecCase>,
    settings: Vec<SettingsCase>,
    cli: Vec<CliCase>,
    trigger: Vec<TriggerCase>,
    message: Vec<MessageCase>,
    emulator: Vec<EmulatorCase>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecCase {
    case: String,
    #[serde(default)]
    edit: Vec<[String; 2]>,
    #[serde(default)]
    append: String,
    make: Option<String>,
    expect: Vec<String>,
    #[serde(default)]
    never: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsCase {
    case: String,
    text: Option<String>,
    #[serde(default)]
    env: Vec<[String; 2]>,
    expect: Vec<String>,
    #[serde(default)]
    never: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CliCase {
    case: String,
    args: Vec<String>,
    exit: i32,
    expect: Vec<String>,
    #[serde(default)]
    never: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerCase {
    case: String,
    body: Option<String>,
    #[serde(default)]
    spec_edit: Vec<[String; 2]>,
    content_type: Option<String>,
    expect: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageCase {
    case: String,
    routing_key: String,
    body: String,
    expect: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmulatorCase {
    case: String,
    api: String,
    method: String,
    path: String,
    body: Option<String>,
    /// Sent instead of the bearer token.
    authorization: Option<String>,
    status: u16,
    code: Option<String>,
}

fn corpus() -> Corpus {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(CORPUS);
    let text = std::fs::read_to_string(&path).expect("the corpus is in the repository");
    toml::from_str(&text).unwrap_or_else(|e| panic!("{CORPUS}: {e}"))
}

/// `text` with every `@repeat(TEXT,N)@` written out.
fn expand(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("@repeat(") {
        let end = start + rest[start..].find(")@").expect("`@repeat(` is closed by `)@`");
        let (unit, times) = rest[start + "@repeat(".len()..end]
            .rsplit_once(',')
            .expect("@repeat(TEXT,N)@");
        out.push_str(&rest[..start]);
        out.push_str(&unit.repeat(times.trim().parse().expect("N is a count")));
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

/// The nightly spec with `edits` made, each of which must match.
fn edited_nightly(edits: &[[String; 2]], case: &str) -> String {
    let mut text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(NIGHTLY)).expect("the spec");
    for [from, to] in edits {
        assert!(text.contains(from.as_str()), "{case}: `{from}` is not in {NIGHTLY}");
        text = text.replacen(from.as_str(), &expand(to), 1);
    }
    text
}

/// What a command printed and how it ended.
struct Ran {
    command: String,
    code: Option<i32>,
    output: String,
}

/// Runs the built binary with `args` (from the repository root) under the data limit.
async fn sigrun(args: Vec<String>, env: Vec<[String; 2]>) -> Ran {
    let mut command = tokio::process::Command::new("prlimit");
    command
        .arg(DATA_LIMIT)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_sigrun"))
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("SIGRUN_LOG")
        .env_remove("SIGRUN__AMQP__URL")
        .env_remove("SIGRUN__AMQP__PREFIX")
        .kill_on_drop(true);
    for [key, value] in &env {
        command.env(key, value);
    }
    let shown = format!("sigrun {}", args.join(" "))
        .chars()
        .take(300)
        .collect::<String>();
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap_or_else(|_| panic!("{shown} did not end within 60 s"))
        .expect("prlimit (util-linux) runs the binary");
    Ran {
        command: shown,
        code: output.status.code(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// What is wrong with `ran` against what its case expects (empty: nothing).
fn judge(case: &str, ran: &Ran, exit: i32, expect: &[String], never: &[String]) -> Vec<String> {
    let mut wrong = Vec::new();
    let shown: String = ran.output.chars().take(2000).collect();
    if ran.code != Some(exit) {
        wrong.push(format!(
            "{case}: exit {:?}, not {exit}\n  {}\n  {shown}",
            ran.code, ran.command
        ));
    }
    for text in expect {
        if !ran.output.contains(text.as_str()) {
            wrong.push(format!("{case}: `{text}` not said\n  {}\n  {shown}", ran.command));
        }
    }
    for text in never.iter().map(String::as_str).chain(["panicked", "RUST_BACKTRACE"]) {
        if ran.output.contains(text) {
            wrong.push(format!("{case}: `{}` printed\n  {}", text.escape_debug(), ran.command));
        }
    }
    wrong
}

/// Writes the file a `make` case needs; returns the path to validate.
fn make_spec(dir: &Path, make: &str) -> PathBuf {
    let nightly = edited_nightly(&[], make);
    let path = dir.join(format!("{make}.toml"));
    match make {
        "pools-101" => {
            let account = "/subscriptions/22222222-2222-4222-8222-222222222222/resourceGroups/rg-batch/providers/Microsoft.Batch/batchAccounts/sigruneus";
            let extra: String = (0..99)
                .map(|i| {
                    format!(
                        "\n[[pools]]\ntarget = \"extra{i}\"\naccount = \"{account}\"\nvm_size = \"Standard_F8s_v2\"\ndedicated_nodes = 1\n"
                    )
                })
                .collect();
            std::fs::write(&path, nightly + &extra).unwrap();
        }
        "regions-51" => {
            let regions: Vec<String> = (0..51).map(|i| format!("{{ name = \"region{i}\" }}")).collect();
            let from = nightly.find("regions = [").unwrap();
            let to = from + nightly[from..].find(']').unwrap() + 1;
            let text = format!(
                "{}regions = [{}]{}",
                &nightly[..from],
                regions.join(", "),
                &nightly[to..]
            );
            std::fs::write(&path, text).unwrap();
        }
        "huge" => {
            let padding = format!("\n# {}\n", "x".repeat(50 * 1024 * 1024));
            std::fs::write(&path, nightly + &padding).unwrap();
        }
        "dev-zero" => std::os::unix::fs::symlink("/dev/zero", &path).unwrap(),
        "directory" => std::fs::create_dir(&path).unwrap(),
        "missing" => return dir.join("no-such-spec.toml"),
        "binary" => {
            let path = dir.join("binary.toml");
            let bytes: Vec<u8> = (0..4096u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            std::fs::write(&path, bytes).unwrap();
            return path;
        }
        other => panic!("no `make = \"{other}\"` in hostile.rs"),
    }
    path
}

/// Every spec, settings and command-line case; each ends with exit 2 (or its `exit`) naming what
/// is wrong, and nothing is declared on the broker for an unused prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn specs_settings_and_command_lines_are_refused_naming_what_is_wrong() {
    let corpus = corpus();
    let dir = tempfile::tempdir().unwrap();
    let unused_prefix = format!("sigrun-hostile-unused-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let unused = dir.path().join("unused.toml");
    std::fs::write(
        &unused,
        format!(
            "[amqp]\nurl = \"{}\"\nprefix = \"{unused_prefix}\"\n",
            support::amqp_url()
        ),
    )
    .unwrap();

    let mut runs = Vec::new();
    for (i, case) in corpus.spec.iter().enumerate() {
        let path = match &case.make {
            Some(make) => make_spec(dir.path(), make),
            None => {
                let text = edited_nightly(&case.edit, &case.case) + &expand(&case.append);
                let path = dir.path().join(format!("spec-{i}.toml"));
                std::fs::write(&path, text).unwrap();
                path
            }
        };
        let mut expect = case.expect.clone();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        expect.push(name);
        let args = vec!["validate".to_string(), path.display().to_string()];
        runs.push((case.case.clone(), args, Vec::new(), 2, expect, case.never.clone()));
    }
    for (i, case) in corpus.settings.iter().enumerate() {
        let mut args = vec!["validate".to_string(), NIGHTLY.to_string()];
        if let Some(text) = &case.text {
            let path = dir.path().join(format!("settings-{i}.toml"));
            std::fs::write(&path, expand(text)).unwrap();
            args.extend(["--config".to_string(), path.display().to_string()]);
        }
        runs.push((
            case.case.clone(),
            args,
            case.env.clone(),
            2,
            case.expect.clone(),
            case.never.clone(),
        ));
    }
    for case in &corpus.cli {
        let args = case
            .args
            .iter()
            .map(|a| a.replace("{unused}", &unused.display().to_string()))
            .collect();
        runs.push((
            case.case.clone(),
            args,
            Vec::new(),
            case.exit,
            case.expect.clone(),
            case.never.clone(),
        ));
    }

    let total = runs.len();
    let judged: Vec<Vec<String>> = futures_util::stream::iter(runs)
        .map(|(case, args, env, exit, expect, never)| async move {
            let ran = sigrun(args, env).await;
            judge(&case, &ran, exit, &expect, &never)
        })
        .buffer_unordered(2)
        .collect()
        .await;
    let wrong: Vec<String> = judged.into_iter().flatten().collect();
    assert!(
        wrong.is_empty(),
        "{} of {total} cases went wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    let settings = sigrun::config::Settings::load(Some(&unused)).unwrap();
    assert!(
        !AmqpBus::topology_exists(&settings.amqp).await.unwrap(),
        "nothing was declared for the unused prefix `{unused_prefix}`"
    );
    eprintln!(
        "hostile corpus: {} specs, {} settings, {} command lines: each refused as expected",
        corpus.spec.len(),
        corpus.settings.len(),
        corpus.cli.len()
    );
}

/// A trigger or stage message of the corpus, as it goes onto the broker.
struct Published {
    case: String,
    routing_key: String,
    body: Vec<u8>,
    content_type: Option<String>,
    expect: Vec<String>,
}

fn published(corpus: &Corpus) -> Vec<Published> {
    let mut all = Vec::new();
    for (i, case) in corpus.trigger.iter().enumerate() {
        let body = match &case.body {
            Some(body) => expand(body),
            None => serde_json::json!({
                "v": 1,
                "pipeline": "nightly-ubuntu",
                "version": format!("2026.1201.{}", 100 + i),
                "spec": edited_nightly(&case.spec_edit, &case.case),
            })
            .to_string(),
        };
        all.push(Published {
            case: case.case.clone(),
            routing_key: "trigger".into(),
            body: body.into_bytes(),
            content_type: case.content_type.clone().or(Some("application/json".into())),
            expect: case.expect.clone(),
        });
    }
    for case in &corpus.message {
        all.push(Published {
            case: case.case.clone(),
            routing_key: case.routing_key.clone(),
            body: expand(&case.body).into_bytes(),
            content_type: None,
            expect: case.expect.clone(),
        });
    }
    let mut bodies = std::collections::BTreeSet::new();
    for p in &all {
        assert!(
            bodies.insert(p.body.clone()),
            "{}: its body is another case's too",
            p.case
        );
    }
    all
}

async fn publish_all(setup: &Setup, all: &[Published]) {
    let connection = Connection::connect(&support::amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("{}", support::broker_down_help(e)));
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let work = sigrun::bus::amqp::topology::Names::new(&setup.prefix).work();
    for p in all {
        let mut properties = BasicProperties::default().with_delivery_mode(2);
        if let Some(content_type) = &p.content_type {
            properties = properties.with_content_type(content_type.as_str().into());
        }
        let confirm = channel
            .basic_publish(
                work.as_str().into(),
                p.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &p.body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "{}: the broker took it", p.case);
    }
    let _ = connection.close(200, "done".into()).await;
}

/// Waits (bounded) until `count` messages are parked; returns them.
async fn parked(bus: &AmqpBus, count: usize, workers: &[Process]) -> Vec<ParkedMessage> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let browser = bus.browse_parked(1000).await.expect("browse the parking queue");
        let messages = browser.messages().to_vec();
        browser.close().await;
        if messages.len() >= count {
            return messages;
        }
        if tokio::time::Instant::now() > deadline {
            let logs: String = workers.iter().map(Process::report).collect();
            panic!("{count} parked messages expected, {} there{logs}", messages.len());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Why a parked message is parked, whoever parked it.
fn reason(message: &ParkedMessage) -> String {
    if let Some(runtime) = &message.runtime {
        return runtime.error.clone();
    }
    if let Some(death) = message.deaths.first() {
        return format!("dead-lettered: {} on {}", death.reason, death.queue);
    }
    format!("unroutable: no queue is bound to routing key `{}`", message.routing_key)
}

/// Peak resident memory of a running process, in KiB.
fn peak_rss_kib(process: &Process) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", process.child.id())).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Every trigger and stage message of the corpus parked with its reason by real workers; every
/// raw emulator request answered as Azure would; the workers alive, connected once, ready and
/// small; then a normal run succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_messages_and_raw_requests_are_parked_or_refused_and_the_system_goes_on() {
    let corpus = corpus();
    let setup = support::setup("").await;
    let (bus, settings) = support::test_bus(&setup.config).await;
    let mut workers = vec![
        setup.worker("worker-a", &["--all-stages"]),
        setup.worker("worker-b", &["--all-stages"]),
    ];
    let mut addresses = Vec::new();
    for worker in &mut workers {
        addresses.push(worker.metrics_addr().await);
    }

    let all = published(&corpus);
    publish_all(&setup, &all).await;
    let parked = parked(&bus, all.len(), &workers).await;
    let by_body: BTreeMap<&[u8], &ParkedMessage> = parked.iter().map(|m| (m.body.as_slice(), m)).collect();
    let mut wrong = Vec::new();
    for p in &all {
        let Some(message) = by_body.get(p.body.as_slice()) else {
            wrong.push(format!("{}: not parked", p.case));
            continue;
        };
        let why = reason(message);
        for text in &p.expect {
            if !why.contains(text.as_str()) {
                wrong.push(format!("{}: `{text}` not in the reason: {why:.300}", p.case));
            }
        }
        if why.len() > MAX_REASON_BYTES || why.chars().any(char::is_control) {
            wrong.push(format!("{}: reason unbounded or raw: {} bytes", p.case, why.len()));
        }
    }
    assert_eq!(parked.len(), all.len(), "one parked message per case, no more");

    // Listed for an operator, none of it writes to the terminal.
    let config = setup.config.display().to_string();
    let mut list = Process::start(&setup.dir, "dlq-list", &["dlq", "list", "--config", &config], &[]);
    assert_eq!(list.wait(Duration::from_secs(60)).await, Some(0), "{}", list.report());
    let table = std::fs::read(&list.stdout).unwrap();
    assert!(
        !table.iter().any(|b| *b == 0x1b || *b == 0x07 || *b == b'\r'),
        "dlq list printed raw control bytes"
    );

    wrong.extend(raw_requests(&setup, &corpus.emulator).await);
    assert!(wrong.is_empty(), "{} wrong:\n{}", wrong.len(), wrong.join("\n"));

    // The system goes on: alive, never reconnected, ready, small; a normal run succeeds.
    for (worker, addr) in workers.iter_mut().zip(&addresses) {
        assert!(
            worker.child.try_wait().unwrap().is_none(),
            "a worker died{}",
            worker.report()
        );
        let log = worker.stderr_text();
        assert_eq!(
            log.matches("reconnecting").count(),
            0,
            "no reconnect storm{}",
            worker.report()
        );
        let ready = support::probe(*addr, "/readyz").await.expect("/readyz answers");
        assert_eq!(ready.status, 200, "ready: {}", ready.body);
    }
    let run = setup.submit().await;
    let (result, history) = support::wait_for_run(&bus, run, &workers).await;
    assert_eq!(result, RunResult::Succeeded, "{history:#?}");
    let peaks: Vec<u64> = workers.iter().map(peak_rss_kib).collect();
    assert!(
        peaks.iter().all(|&kib| kib > 0 && kib < WORKER_PEAK_LIMIT_KIB),
        "worker peak RSS {peaks:?} KiB (limit {WORKER_PEAK_LIMIT_KIB})"
    );
    for worker in &mut workers {
        worker.stop().await;
    }
    eprintln!(
        "hostile corpus: {} triggers and {} stage messages parked with their reasons, {} raw emulator \
         requests refused; afterwards a nightly run succeeded; worker peak RSS {:?} MiB",
        corpus.trigger.len(),
        corpus.message.len(),
        corpus.emulator.len(),
        peaks.iter().map(|k| k / 1024).collect::<Vec<_>>()
    );
    support::delete_topology(bus, &settings).await;
}

/// Sends each raw request; returns what was answered otherwise than expected.
async fn raw_requests(setup: &Setup, cases: &[EmulatorCase]) -> Vec<String> {
    let emu = &setup.emu;
    let arm_token = emu.arm_token().await;
    let batch_token = emu.batch_token().await;
    let mut wrong = Vec::new();
    for case in cases {
        let (base, token) = match case.api.as_str() {
            "arm" => (emu.base().to_string(), Some(&arm_token)),
            "batch" => (emu.batch_url("sigrunweu"), Some(&batch_token)),
            "control" => (emu.base().to_string(), None),
            other => panic!("{}: api `{other}`", case.case),
        };
        let method = Method::from_bytes(case.method.as_bytes()).expect("a method");
        let mut request = emu.client.request(method, format!("{base}{}", case.path));
        match (&case.authorization, token) {
            (Some(authorization), _) => request = request.header("authorization", authorization),
            (None, Some(token)) => request = request.bearer_auth(token),
            (None, None) => {}
        }
        if let Some(body) = &case.body {
            request = request.header("content-type", "application/json").body(expand(body));
        }
        let reply = match request.send().await {
            Ok(reply) => reply,
            Err(error) => {
                wrong.push(format!("{}: no answer ({error})", case.case));
                continue;
            }
        };
        let status = reply.status().as_u16();
        let text = reply.text().await.unwrap_or_default();
        let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let code = body["error"]["code"]
            .as_str()
            .or(body["code"].as_str())
            .unwrap_or_default()
            .to_string();
        if status != case.status {
            wrong.push(format!(
                "{}: HTTP {status}, not {}: {text:.300}",
                case.case, case.status
            ));
        }
        if let Some(expected) = &case.code
            && code != *expected
        {
            wrong.push(format!("{}: code `{code}`, not `{expected}`: {text:.300}", case.case));
        }
    }
    wrong
}

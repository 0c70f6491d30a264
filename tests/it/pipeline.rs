//! End to end: the `sigrun` binary's `run` and `validate`, as a user runs them. Each test runs the
//! real binary (ripgrep style: a small runner captures stdout and stderr and prints both when an
//! assertion fails). Apart from the first test, which takes the README's path (no settings: the
//! built-in emulator), the binary is pointed at an emulator started in the test process, so the test
//! can read what the run did on the Azure side: the state (ARM and Batch reads with the pipeline's
//! own identity) and the emulator's request log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sigrun::emulator::EmulatorOptions;

use crate::helpers::{
    self, BATCH_API, COMPUTE_API, DISK_API, GALLERY_API, PIPELINE_APP, SUB_IMAGING, TENANT, TestEmulator,
};

const NIGHTLY: &str = "pipelines/nightly-ubuntu.toml";
const WINDOWS: &str = "pipelines/windows-nightly.toml";
const ROLLOUT: &str = "pipelines/rollout-ubuntu.toml";

/// Emulated seconds per real second for the emulators started here: a nightly run (about an hour
/// of Azure time) takes about 6 s.
const SCALE: f64 = 600.0;

/// No run here should come near this; a hung one is killed and its output shown.
const RUN_LIMIT: Duration = Duration::from_secs(90);

const GALLERY: &str = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg-gallery/providers/Microsoft.Compute/galleries/sigrun_images";
const NIGHTLY_DEFINITION: &str = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg-gallery/providers/Microsoft.Compute/galleries/sigrun_images/images/ubuntu-2204-batch";
const SEA_ACCOUNT: &str = "/subscriptions/22222222-2222-4222-8222-222222222222/resourceGroups/rg-batch/providers/Microsoft.Batch/batchAccounts/sigrunsea";

// ---------------------------------------------------------------------------------------------
// The runner

/// One finished `sigrun` invocation.
struct Run {
    command: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    wall: Duration,
}

impl Run {
    /// Everything about the run, for a failure message.
    fn report(&self) -> String {
        format!(
            "\n=== {}\n=== exit {:?} after {:.2} s\n=== stdout\n{}\n=== stderr\n{}\n===",
            self.command,
            self.code,
            self.wall.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }

    /// Asserts `ok`, printing the run's output when it does not hold.
    #[track_caller]
    fn check(&self, ok: bool, what: impl std::fmt::Display) {
        if !ok {
            panic!("{what}{}", self.report());
        }
    }

    #[track_caller]
    fn code(&self, expected: i32) -> &Run {
        self.check(
            self.code == Some(expected),
            format_args!("expected exit code {expected}"),
        );
        self
    }

    #[track_caller]
    fn stdout_has(&self, text: &str) -> &Run {
        self.check(
            self.stdout.contains(text),
            format_args!("stdout should contain {text:?}"),
        );
        self
    }

    #[track_caller]
    fn stderr_has(&self, text: &str) -> &Run {
        self.check(
            self.stderr.contains(text),
            format_args!("stderr should contain {text:?}"),
        );
        self
    }

    /// The run id from the first progress line (`run <uuid>: ...`).
    #[track_caller]
    fn run_id(&self) -> String {
        let id = self
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix("run ")?.split(':').next())
            .map(str::to_string);
        self.check(id.is_some(), "stderr should start the run with `run <id>:`");
        id.unwrap_or_default()
    }

    /// The version from the summary's first line (`Run of <pipeline> version <v>: ...`).
    #[track_caller]
    fn version(&self) -> String {
        let v = self.stdout.lines().find_map(|l| {
            let rest = l.strip_prefix("Run of ")?;
            Some(rest.split(" version ").nth(1)?.split(':').next()?.to_string())
        });
        self.check(
            v.is_some(),
            "stdout should have the summary line `Run of ... version ...:`",
        );
        v.unwrap_or_default()
    }
}

/// Runs `sigrun ARGS` from the repository root (so `pipelines/...` reads as in the README).
fn run_blocking(args: Vec<String>) -> Run {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_dir = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (out_dir.path().join("stdout"), out_dir.path().join("stderr"));
    let command = format!("sigrun {}", args.join(" "));
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sigrun"))
        .args(&args)
        .current_dir(root)
        .env_remove("SIGRUN_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("sigrun starts");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for sigrun") {
            break Some(status);
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let run = Run {
        command,
        code: status.and_then(|s| s.code()),
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        wall: started.elapsed(),
    };
    run.check(
        status.is_some(),
        format_args!("sigrun did not end within {RUN_LIMIT:?}"),
    );
    run
}

/// Runs `sigrun` without blocking the test's runtime, which serves the emulator meanwhile.
async fn sigrun(args: &[&str]) -> Run {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || run_blocking(args))
        .await
        .expect("runner thread")
}

// ---------------------------------------------------------------------------------------------
// An emulator for the binary to talk to

struct Azure {
    emu: TestEmulator,
    dir: tempfile::TempDir,
    /// `--config` pointing the binary at `emu`.
    config: String,
}

async fn azure(seed: u64, faults: &str) -> Azure {
    azure_with(EmulatorOptions {
        time_scale: SCALE,
        seed,
        faults: faults.to_string(),
        ..Default::default()
    })
    .await
}

async fn azure_with(options: EmulatorOptions) -> Azure {
    let emu = helpers::start(options).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let info = emu.emulator.info();
    let text = format!(
        r#"[azure]
mode = "azure"
time_scale = {scale:?}

[azure.client]
credential = {{ kind = "client_secret", tenant_id = "{TENANT}", client_id = "{client}", client_secret = "{secret}" }}
cloud = {{ authority_host = "{base}", resource_manager = "{base}" }}
extra_ca_cert = "{ca}"
"#,
        scale = info.time_scale,
        client = PIPELINE_APP.0,
        secret = PIPELINE_APP.1,
        base = info.base_url,
        ca = info.ca_cert.as_deref().expect("the emulator serves TLS"),
    );
    let config = dir.path().join("sigrun.toml");
    std::fs::write(&config, text).expect("write config");
    Azure {
        config: config.display().to_string(),
        emu,
        dir,
    }
}

impl Azure {
    /// `sigrun run PIPELINE --config ... EXTRA...`
    async fn run(&self, pipeline: &str, extra: &[&str]) -> Run {
        let mut args = vec!["run", pipeline, "--config", &self.config];
        args.extend_from_slice(extra);
        sigrun(&args).await
    }

    async fn validate(&self, pipeline: &str, extra: &[&str]) -> Run {
        let mut args = vec!["validate", pipeline, "--config", &self.config];
        args.extend_from_slice(extra);
        sigrun(&args).await
    }

    /// Writes `text` as a pipeline file in the test's directory.
    fn pipeline(&self, name: &str, text: &str) -> String {
        let path: PathBuf = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write pipeline");
        path.display().to_string()
    }

    /// The request log after `since` (a `seq`), ARM and Batch only.
    async fn log_since(&self, since: u64) -> Vec<Value> {
        self.emu
            .requests()
            .await
            .into_iter()
            .filter(|e| e["seq"].as_u64().unwrap_or(0) > since)
            .filter(|e| matches!(e["api"].as_str(), Some("arm" | "batch")))
            .collect()
    }

    /// The highest `seq` logged so far.
    async fn mark(&self) -> u64 {
        self.emu
            .requests()
            .await
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .max()
            .unwrap_or(0)
    }

    async fn state(&self) -> Value {
        let url = format!("{}/state", self.emu.emulator.info().control_url);
        self.emu.call(reqwest::Method::GET, &url, None, None).await.body
    }

    /// An ARM resource by id (`None` when it does not exist).
    async fn arm(&self, id: &str, expand: bool) -> Option<Value> {
        let api = if id.contains("/snapshots/") {
            DISK_API
        } else if id.contains("/galleries/") {
            GALLERY_API
        } else {
            COMPUTE_API
        };
        let expand = if expand { "&$expand=ReplicationStatus" } else { "" };
        let token = self.emu.arm_token().await;
        let reply = self.emu.get(&format!("{id}?api-version={api}{expand}"), &token).await;
        match reply.status.as_u16() {
            200 => Some(reply.body),
            404 => None,
            status => panic!("GET {id}: {status} {:?}", reply.body),
        }
    }

    /// A Batch pool (`None` when it does not exist).
    async fn pool(&self, account: &str, id: &str) -> Option<Value> {
        let token = self.emu.batch_token().await;
        let url = format!("{}/pools/{id}?api-version={BATCH_API}", self.emu.batch_url(account));
        let reply = self.emu.get(&url, &token).await;
        match reply.status.as_u16() {
            200 => Some(reply.body),
            404 => None,
            status => panic!("GET pool {id}: {status} {:?}", reply.body),
        }
    }

    async fn pools(&self, account: &str) -> Vec<Value> {
        let token = self.emu.batch_token().await;
        let url = format!("{}/pools?api-version={BATCH_API}", self.emu.batch_url(account));
        let reply = self.emu.get(&url, &token).await;
        assert_eq!(reply.status, 200, "list pools: {:?}", reply.body);
        reply.body["value"].as_array().cloned().unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// Reading answers

fn version_id(version: &str) -> String {
    format!("{NIGHTLY_DEFINITION}/versions/{version}")
}

fn image_id(pipeline: &str, version: &str) -> String {
    helpers::compute_id(
        SUB_IMAGING,
        "rg-imaging",
        &format!("images/{pipeline}-{}", version.replace('.', "-")),
    )
}

/// `West Europe` → `westeurope`.
fn region(name: &str) -> String {
    name.chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase()
}

/// A version's target regions: region → replicas.
fn replicas(version: &Value) -> BTreeMap<String, u64> {
    version["properties"]["publishingProfile"]["targetRegions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            (
                region(t["name"].as_str().unwrap_or_default()),
                t["regionalReplicaCount"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// A version's replication: region → state.
fn replication(version: &Value) -> BTreeMap<String, String> {
    version["properties"]["replicationStatus"]["summary"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                region(s["region"].as_str().unwrap_or_default()),
                s["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// An ISO 8601 duration as Batch writes it (`PT30M`, `PT1800S`) in seconds.
fn iso_secs(text: &str) -> u64 {
    let rest = text
        .strip_prefix("PT")
        .unwrap_or_else(|| panic!("not an ISO duration: {text}"));
    let (mut total, mut number) = (0u64, String::new());
    for c in rest.chars() {
        match c {
            '0'..='9' => number.push(c),
            'H' | 'M' | 'S' => {
                let n: u64 = number.parse().unwrap_or_else(|_| panic!("bad duration {text}"));
                total += n * match c {
                    'H' => 3600,
                    'M' => 60,
                    _ => 1,
                };
                number.clear();
            }
            _ => panic!("unexpected `{c}` in duration {text}"),
        }
    }
    total
}

/// A pool's metadata as a map.
fn metadata(pool: &Value) -> BTreeMap<String, String> {
    pool["metadata"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_string(),
                m["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn is_write(entry: &Value) -> bool {
    !matches!(entry["method"].as_str(), Some("GET" | "HEAD"))
}

fn method_path(entry: &Value) -> String {
    format!(
        "#{} {} {} -> {}",
        entry["seq"],
        entry["method"].as_str().unwrap_or_default(),
        entry["path"].as_str().unwrap_or_default(),
        entry["status"]
    )
}

/// Requests that created something (PUT answered 201/202, POST to a pool collection answered
/// 201), counted per path.
fn creations(log: &[Value]) -> BTreeMap<String, u32> {
    let mut created = BTreeMap::new();
    for e in log {
        let path = e["path"].as_str().unwrap_or_default();
        let status = e["status"].as_u64().unwrap_or(0);
        let creates = match e["method"].as_str() {
            Some("PUT") => status == 201 || status == 202,
            Some("POST") => path.ends_with("/pools") && status == 201,
            _ => false,
        };
        if creates {
            *created.entry(path.to_ascii_lowercase()).or_insert(0) += 1;
        }
    }
    created
}

fn nightly_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(NIGHTLY)).expect("read the nightly pipeline")
}

/// Replaces `from` (which must occur) in a pipeline text.
#[track_caller]
fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the pipeline no longer contains {from:?}");
    text.replacen(from, to, 1)
}

/// The nightly pipeline plus a pool in southeastasia (account sigrunsea).
fn nightly_with_sea_pool() -> String {
    format!(
        "{}\n[[pools]]\ntarget = \"asia\"\naccount = \"{SEA_ACCOUNT}\"\nvm_size = \"Standard_D4s_v5\"\ndedicated_nodes = 10\nnode_agent_sku_id = \"batch.node.ubuntu 22.04\"\n",
        nightly_text()
    )
}

// ---------------------------------------------------------------------------------------------
// 1. The README's command

#[test]
fn readme_run_with_the_built_in_emulator_succeeds_and_summarises() {
    let run = run_blocking(vec!["run".into(), NIGHTLY.into()]);
    run.code(0);
    run.check(
        run.wall < Duration::from_secs(30),
        "the nightly run on the built-in emulator should take under 30 s of wall time",
    );
    let version = run.version();
    run.stdout_has(&format!("Run of nightly-ubuntu version {version}: succeeded"));
    let dashed = version.replace('.', "-");
    let created: Vec<&str> = run
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("Resources created:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(str::trim)
        .collect();
    let expected = [
        format!("/snapshots/nightly-ubuntu-{dashed}-os"),
        format!("/snapshots/nightly-ubuntu-{dashed}-lun0"),
        format!("/snapshots/nightly-ubuntu-{dashed}-lun1"),
        format!("/images/nightly-ubuntu-{dashed}"),
        "/galleries/sigrun_images".to_string(),
        "/galleries/sigrun_images/images/ubuntu-2204-batch".to_string(),
        format!("/galleries/sigrun_images/images/ubuntu-2204-batch/versions/{version}"),
        format!("/batch/sigrunweu/pools/nightly-ubuntu-render-{dashed}"),
        format!("/batch/sigruneus/pools/nightly-ubuntu-sim-{dashed}"),
    ];
    for suffix in &expected {
        run.check(
            created.iter().filter(|l| l.ends_with(suffix.as_str())).count() == 1,
            format_args!("`Resources created` should list …{suffix} once"),
        );
    }
    run.check(created.len() == expected.len(), "exactly these resources are created");

    for stage in [
        "snapshot",
        "image-create",
        "gallery-publish",
        "replicate",
        "pool-create",
        "verify",
        "total",
    ] {
        run.check(
            run.stdout.lines().any(|l| {
                let l = l.trim_start();
                l.starts_with(&format!("{stage} ")) && l.contains(" s wall")
            }),
            format_args!("the summary should give the wall time of {stage}"),
        );
    }
    // `Azure calls (N):` then `  n  METHOD kind` lines that add up to N.
    let total: Option<u64> = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Azure calls (")?.strip_suffix("):")?.parse().ok());
    run.check(total.is_some_and(|n| n > 0), "the summary should count the Azure calls");
    let calls: BTreeMap<String, u64> = run
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("Azure calls ("))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| {
            let (n, kind) = l.trim().split_once(char::is_whitespace)?;
            Some((kind.trim().to_string(), n.parse().ok()?))
        })
        .collect();
    run.check(
        calls.values().sum::<u64>() == total.unwrap_or(0),
        "the calls by kind add up to the total",
    );
    for (kind, n) in [
        ("PUT snapshots", 3),
        ("PUT images", 1),
        ("PUT galleries", 1),
        ("PUT galleries/images", 1),
        ("PUT galleries/images/versions", 1),
        ("POST pools", 2),
    ] {
        run.check(
            calls.get(kind) == Some(&n),
            format_args!("the summary should count {n} × {kind}"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. What the nightly run leaves in Azure

#[tokio::test]
async fn nightly_run_publishes_replicates_creates_pools_and_promotes() {
    let az = azure(11, "").await;
    let run = az.run(NIGHTLY, &[]).await;
    run.code(0).stdout_has(": succeeded");
    let version = run.version();
    let run_id = run.run_id();
    let dashed = version.replace('.', "-");
    let vid = version_id(&version);

    // The version: Succeeded, replicated everywhere with the planned replica counts, promoted.
    let v = az.arm(&vid, true).await.expect("the version exists");
    run.check(
        v["properties"]["provisioningState"] == "Succeeded",
        format_args!("version state: {}", v["properties"]),
    );
    let expected: BTreeMap<String, u64> = [("westeurope", 4), ("eastus", 1), ("southeastasia", 1)]
        .into_iter()
        .map(|(r, n)| (r.to_string(), n))
        .collect();
    run.check(
        replicas(&v) == expected,
        format_args!(
            "replicas: westeurope 4 (2000 nodes / 600), eastus 1, southeastasia 1; got {:?}",
            replicas(&v)
        ),
    );
    run.check(
        replication(&v).values().all(|s| s == "Completed") && replication(&v).len() == 3,
        format_args!("replication: {:?}", replication(&v)),
    );
    let profile = &v["properties"]["publishingProfile"];
    run.check(
        profile["excludeFromLatest"] == false,
        format_args!("gated promotion should have flipped excludeFromLatest: {profile}"),
    );
    run.check(
        v["properties"]["storageProfile"]["source"]["id"]
            .as_str()
            .is_some_and(|s| s.eq_ignore_ascii_case(&image_id("nightly-ubuntu", &version))),
        format_args!(
            "the version is made from the run's image: {}",
            v["properties"]["storageProfile"]
        ),
    );
    // Promotion came after a pool verified, and once.
    let verified = run.stderr.find(" verified").unwrap_or(usize::MAX);
    let promoted = run.stderr.find("promoted ").unwrap_or(0);
    run.check(verified < promoted, "the version is promoted after a pool verifies");
    let log = az.log_since(0).await;
    let patches: Vec<&Value> = log
        .iter()
        .filter(|e| e["method"] == "PATCH" && e["status"] == 200)
        .filter(|e| e["path"].as_str().is_some_and(|p| p.eq_ignore_ascii_case(&vid)))
        .collect();
    run.check(patches.len() == 1, format_args!("one promotion PATCH: {patches:?}"));

    // Pools: from the gallery image, with the planned SKU, resize timeout, nodes and metadata.
    for (account, target, nodes, low, timeout) in [
        ("sigrunweu", "render", 2000, 0, 1800),
        ("sigruneus", "sim", 150, 50, 1200),
    ] {
        let pools = az.pools(account).await;
        run.check(pools.len() == 1, format_args!("one pool in {account}: {pools:?}"));
        let id = format!("nightly-ubuntu-{target}-{dashed}");
        let pool = az.pool(account, &id).await;
        run.check(pool.is_some(), format_args!("pool {id} exists"));
        let pool = pool.unwrap_or_default();
        let vm = &pool["virtualMachineConfiguration"];
        run.check(
            vm["imageReference"]["virtualMachineImageId"]
                .as_str()
                .is_some_and(|i| i.eq_ignore_ascii_case(&vid)),
            format_args!("{id} is built from the version: {vm}"),
        );
        run.check(
            vm["nodeAgentSKUId"] == "batch.node.ubuntu 22.04",
            format_args!("{id} SKU: {vm}"),
        );
        run.check(
            iso_secs(pool["resizeTimeout"].as_str().unwrap_or("PT0S")) == timeout,
            format_args!("{id} resizeTimeout {} should be {timeout} s", pool["resizeTimeout"]),
        );
        run.check(
            pool["targetDedicatedNodes"] == nodes && pool["targetLowPriorityNodes"] == low,
            format_args!("{id} nodes: {pool}"),
        );
        run.check(
            pool["allocationState"] == "steady",
            format_args!("{id} allocation: {pool}"),
        );
        let meta = metadata(&pool);
        for (key, value) in [
            ("sigrun-pipeline", "nightly-ubuntu"),
            ("sigrun-target", target),
            ("sigrun-version", version.as_str()),
            ("sigrun-run", run_id.as_str()),
        ] {
            run.check(
                meta.get(key).map(String::as_str) == Some(value),
                format_args!("{id} metadata {key} should be {value}: {meta:?}"),
            );
        }
        if target == "render" {
            run.check(
                meta.get("team").map(String::as_str) == Some("render"),
                "the spec's own metadata is kept",
            );
        }
    }

    // Every ARM resource the run created carries sigrun's tags.
    let state = az.state().await;
    let ids: Vec<String> = state["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect();
    run.check(
        ids.len() == 3,
        format_args!("a gallery, a definition and a version (the snapshots and the image cleaned up): {ids:?}"),
    );
    let deleted: Vec<&str> = run
        .stdout
        .lines()
        .skip_while(|l| *l != "Resources deleted:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(str::trim)
        .collect();
    run.check(
        deleted.len() == 4
            && deleted.iter().filter(|d| d.starts_with("snapshot /")).count() == 3
            && deleted
                .iter()
                .any(|d| *d == format!("image {}", image_id("nightly-ubuntu", &version))),
        format_args!("the summary lists the 3 snapshots and the image deleted: {deleted:?}"),
    );
    for id in &ids {
        let resource = az.arm(id, false).await.unwrap_or_default();
        let tags = &resource["tags"];
        run.check(
            tags["sigrun-pipeline"] == "nightly-ubuntu"
                && tags["sigrun-run"] == run_id.as_str()
                && tags["sigrun-version"] == version.as_str(),
            format_args!("{id} tags: {tags}"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. The same run twice

#[tokio::test]
async fn the_same_version_twice_creates_nothing_twice_and_changes_nothing() {
    let az = azure(12, "").await;
    let first = az.run(NIGHTLY, &["--version", "2026.1126.3"]).await;
    first.code(0);
    let vid = version_id("2026.1126.3");
    let before = az.arm(&vid, false).await.expect("the version exists");
    let mark = az.mark().await;

    let second = az.run(NIGHTLY, &["--version", "2026.1126.3"]).await;
    second.code(0).stdout_has(": succeeded");
    second.check(
        first.run_id() == second.run_id(),
        "the same pipeline and version is the same run",
    );

    let log = az.log_since(0).await;
    for (path, n) in creations(&log) {
        second.check(n == 1, format_args!("{path} was created {n} times"));
    }
    let again: Vec<String> = creations(&az.log_since(mark).await).into_keys().collect();
    second.check(again.is_empty(), format_args!("the second run created {again:?}"));
    // Its summary lists nothing as created: ARM answered every PUT with 200.
    let listed = second
        .stdout
        .split("Resources created:")
        .nth(1)
        .and_then(|rest| rest.split("Stages").next())
        .unwrap_or_default()
        .trim()
        .to_string();
    second.check(
        listed.is_empty(),
        format_args!("the second run's summary lists as created: {listed}"),
    );
    for account in ["sigrunweu", "sigruneus"] {
        let pools = az.pools(account).await;
        second.check(pools.len() == 1, format_args!("one pool in {account}: {pools:?}"));
    }

    // The published version is left as the first run left it: the same end of life, and still
    // promoted (never taken out of "latest" again, so there is nothing to promote).
    let after = az.arm(&vid, false).await.expect("the version exists");
    let (p0, p1) = (
        &before["properties"]["publishingProfile"],
        &after["properties"]["publishingProfile"],
    );
    second.check(
        p0["excludeFromLatest"] == false,
        format_args!("first run promoted: {p0}"),
    );
    second.check(
        p1["excludeFromLatest"] == false && p1["endOfLifeDate"] == p0["endOfLifeDate"],
        format_args!("the second run changed the version: before {p0}, after {p1}"),
    );
    let patches: Vec<String> = az
        .log_since(mark)
        .await
        .iter()
        .filter(|e| e["method"] == "PATCH" && e["path"].as_str().is_some_and(|p| p.eq_ignore_ascii_case(&vid)))
        .map(method_path)
        .collect();
    second.check(
        patches.is_empty() && !second.stderr.contains("promoted "),
        format_args!("the second run found the version promoted already: {patches:?}"),
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Throttling, server errors and lost answers

#[tokio::test]
async fn nightly_run_survives_faults_and_honours_retry_after() {
    let az = azure(4242, "429:p=0.08,retry_after=0.2;500:p=0.04;503:p=0.04;reset:p=0.04").await;
    let run = az.run(NIGHTLY, &["--version", "2026.1126.4"]).await;
    run.code(0).stdout_has(": succeeded");
    // The test's own reads below go without faults.
    az.emu.set_faults("").await;

    let log = az.log_since(0).await;
    let count = |fault: &str| log.iter().filter(|e| e["fault"] == fault).count();
    let (throttled, errors, resets) = (count("429"), count("500") + count("503"), count("reset"));
    run.check(
        throttled >= 2 && errors >= 1 && resets >= 1,
        format_args!(
            "the plan should have fired: {throttled} × 429, {errors} × 5xx, {resets} × reset of {} requests",
            log.len()
        ),
    );
    // After a 429, the same path is asked again no sooner than Retry-After: from when the 429
    // was sent to when the next request of the path arrived (one that arrived before it was on
    // its way before the client could read the 429).
    for (i, e) in log.iter().enumerate().filter(|(_, e)| e["status"] == 429) {
        let wait = e["retry_after_ms"].as_f64().unwrap_or(0.0);
        run.check(wait > 0.0, format_args!("a 429 carries Retry-After: {e}"));
        let answered = e["elapsed_ms"].as_f64().unwrap_or(0.0);
        let Some(next) = log[i + 1..]
            .iter()
            .find(|n| n["path"] == e["path"] && n["received_ms"].as_f64().unwrap_or(0.0) >= answered)
        else {
            continue;
        };
        let gap = next["received_ms"].as_f64().unwrap_or(0.0) - answered;
        run.check(
            gap >= wait,
            format_args!(
                "{} came {gap:.1} ms after {} (Retry-After {wait} ms)",
                method_path(next),
                method_path(e)
            ),
        );
    }
    // Lost answers and retries did not create anything twice.
    for (path, n) in creations(&log) {
        run.check(n == 1, format_args!("{path} was created {n} times"));
    }
    for account in ["sigrunweu", "sigruneus"] {
        let pools = az.pools(account).await;
        run.check(pools.len() == 1, format_args!("one pool in {account}: {pools:?}"));
    }
}

/// A snapshot whose PUT took effect but whose answer was lost (the connection cut after the
/// work), on the step's first try (no read before it): the client sends it again and Azure
/// answers 200, not 201, so the step cannot say it made it. It is still this run's snapshot: the
/// clean-up finds it by its tags and deletes it with the others.
#[tokio::test]
async fn a_snapshot_whose_answer_was_lost_is_still_cleaned_up() {
    let az = azure(7, "reset:api=arm,method=PUT,path=/snapshots/,at=1").await;
    let run = az.run(NIGHTLY, &["--version", "2026.1126.8"]).await;
    run.code(0).stdout_has(": succeeded");
    az.emu.set_faults("").await;

    let log = az.log_since(0).await;
    let snapshot_puts: Vec<&Value> = log
        .iter()
        .filter(|e| e["method"] == "PUT" && e["path"].as_str().is_some_and(|p| p.contains("/snapshots/")))
        .collect();
    let lost = snapshot_puts.iter().filter(|e| e["fault"] == "reset").count();
    run.check(
        lost == 1,
        format_args!("one snapshot PUT lost its answer: {snapshot_puts:?}"),
    );
    run.check(
        snapshot_puts.len() == 4,
        format_args!("three snapshots, one of them sent twice: {snapshot_puts:?}"),
    );
    let state = az.state().await;
    let left: Vec<&str> = state["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str())
        .filter(|id| id.contains("/snapshots/"))
        .collect();
    run.check(left.is_empty(), format_args!("every snapshot is deleted: {left:?}"));
    let deleted = run
        .stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("snapshot /"))
        .count();
    run.check(deleted == 3, "the summary lists the 3 snapshots deleted");
}

// ---------------------------------------------------------------------------------------------
// 5. A region that cannot replicate

#[tokio::test]
async fn a_failed_region_fails_its_pool_and_the_others_verify() {
    let az = azure(13, "replication-fail:region=southeastasia").await;
    let spec = az.pipeline("nightly-sea.toml", &nightly_with_sea_pool());
    let run = az.run(&spec, &["--version", "2026.1126.5"]).await;
    run.check(run.code.is_some_and(|c| c != 0), "a partly failed run exits non-zero");
    run.code(1);
    run.stdout_has("partly succeeded (1 failed)")
        .stderr_has("southeastasia/asia failed: not created: replication to southeastasia failed")
        .stderr_has("removing and adding the region back");
    for target in ["render", "sim"] {
        run.stderr_has(&format!("pool nightly-ubuntu-{target}-2026-1126-5 verified"));
    }
    for (account, target) in [("sigrunweu", "render"), ("sigruneus", "sim")] {
        let pool = az.pool(account, &format!("nightly-ubuntu-{target}-2026-1126-5")).await;
        run.check(
            pool.as_ref().is_some_and(|p| p["allocationState"] == "steady"),
            format_args!("the {target} pool exists and is steady: {pool:?}"),
        );
    }
    run.check(az.pools("sigrunsea").await.is_empty(), "no pool in southeastasia");
    let log = az.log_since(0).await;
    run.check(
        !log.iter()
            .any(|e| is_write(e) && e["path"].as_str().is_some_and(|p| p.starts_with("/batch/sigrunsea"))),
        "nothing was asked of the southeastasia account",
    );
    let v = az
        .arm(&version_id("2026.1126.5"), true)
        .await
        .expect("the version exists");
    run.check(
        replication(&v).get("southeastasia").map(String::as_str) == Some("Failed"),
        format_args!("replication: {:?}", replication(&v)),
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Rolling out an existing version; publishing from an existing image

#[tokio::test]
async fn rollout_of_an_existing_version_and_publish_from_an_existing_image() {
    let az = azure(14, "").await;
    // Its image stays (intermediates kept): a later version is published from it below.
    let keeping = az.pipeline(
        "nightly-keep.toml",
        &edit(
            &nightly_text(),
            "intermediates = \"delete\"",
            "intermediates = \"keep\"",
        ),
    );
    az.run(&keeping, &["--version", "2026.1126.6"]).await.code(0);
    let vid = version_id("2026.1126.6");

    let mark = az.mark().await;
    let rollout = az.run(ROLLOUT, &["--image-version-id", &vid]).await;
    rollout
        .code(0)
        .stdout_has("Run of rollout-ubuntu version 2026.1126.6: succeeded");
    let log = az.log_since(mark).await;
    let arm_writes: Vec<String> = log
        .iter()
        .filter(|e| e["api"] == "arm" && is_write(e))
        .map(method_path)
        .collect();
    rollout.check(
        arm_writes.is_empty(),
        format_args!("a rollout writes nothing to ARM (no snapshot, image or version): {arm_writes:?}"),
    );
    let canary = az.pool("sigrunweu", "rollout-ubuntu-render-canary-2026-1126-6").await;
    rollout.check(
        canary.as_ref().is_some_and(|p| {
            p["virtualMachineConfiguration"]["imageReference"]["virtualMachineImageId"]
                .as_str()
                .is_some_and(|i| i.eq_ignore_ascii_case(&vid))
                && p["targetDedicatedNodes"] == 20
                && p["allocationState"] == "steady"
        }),
        format_args!("the canary pool runs the version: {canary:?}"),
    );

    // Publish 2026.1126.7 from 2026.1126.6's image, on a copy of the nightly spec.
    let copy = az.pipeline("nightly-copy.toml", &nightly_text());
    let image = image_id("nightly-ubuntu", "2026.1126.6");
    let mark = az.mark().await;
    let publish = az
        .run(
            &copy,
            &[
                "--from",
                "gallery-publish",
                "--image-id",
                &image,
                "--version",
                "2026.1126.7",
            ],
        )
        .await;
    publish.code(0).stdout_has("version 2026.1126.7: succeeded");
    let log = az.log_since(mark).await;
    let built: Vec<String> = log
        .iter()
        .filter(|e| e["method"] == "PUT")
        .filter(|e| {
            e["path"]
                .as_str()
                .is_some_and(|p| p.contains("/snapshots/") || p.contains("/images/nightly-ubuntu"))
        })
        .map(method_path)
        .collect();
    publish.check(built.is_empty(), format_args!("no snapshot or image PUT: {built:?}"));
    let new = version_id("2026.1126.7");
    let created = creations(&log);
    publish.check(
        created.get(&new.to_ascii_lowercase()) == Some(&1),
        format_args!("the new version is created: {created:?}"),
    );
    let v = az.arm(&new, false).await.expect("the new version exists");
    publish.check(
        v["properties"]["storageProfile"]["source"]["id"]
            .as_str()
            .is_some_and(|s| s.eq_ignore_ascii_case(&image)),
        format_args!(
            "2026.1126.7 is made from the existing image: {}",
            v["properties"]["storageProfile"]
        ),
    );
    publish.check(
        az.pool("sigrunweu", "nightly-ubuntu-render-2026-1126-7")
            .await
            .is_some(),
        "the new version's pool is created",
    );
}

// ---------------------------------------------------------------------------------------------
// 7. What happens to the previous version's pools

/// A pool sigrun did not make, in the render pool's account, on the same image.
async fn foreign_pool(az: &Azure, image: &str) {
    let token = az.emu.batch_token().await;
    let url = format!("{}/pools?api-version={BATCH_API}", az.emu.batch_url("sigrunweu"));
    let reply = az
        .emu
        .post(&url, &token, &helpers::gallery_pool_body("hand-made", image, 3, None))
        .await;
    assert_eq!(reply.status, 201, "add the hand-made pool: {:?}", reply.body);
}

#[tokio::test]
async fn scale_to_zero_retires_only_sigruns_previous_pools() {
    let az = azure(15, "").await;
    az.run(NIGHTLY, &["--version", "2026.1126.1"]).await.code(0);
    foreign_pool(&az, &version_id("2026.1126.1")).await;
    let mark = az.mark().await;

    let run = az.run(NIGHTLY, &["--version", "2026.1126.2"]).await;
    run.code(0).stdout_has(": succeeded");
    let log = az.log_since(mark).await;
    for (account, target) in [("sigrunweu", "render"), ("sigruneus", "sim")] {
        let old = format!("nightly-ubuntu-{target}-2026-1126-1");
        run.stderr_has(&format!("previous pool {old} scaled to zero"));
        let resize = format!("/batch/{account}/pools/{old}/resize");
        run.check(
            log.iter()
                .any(|e| e["method"] == "POST" && e["path"] == resize.as_str() && e["status"] == 202),
            format_args!("POST {resize} in the log"),
        );
        let pool = az.pool(account, &old).await.unwrap_or_default();
        run.check(
            pool["targetDedicatedNodes"] == 0 && pool["targetLowPriorityNodes"] == 0,
            format_args!("{old} is scaled to zero: {pool}"),
        );
        let new = az.pool(account, &format!("nightly-ubuntu-{target}-2026-1126-2")).await;
        run.check(new.is_some(), "the new pool exists");
    }
    let touched: Vec<String> = log
        .iter()
        .filter(|e| is_write(e) && e["path"].as_str().is_some_and(|p| p.contains("hand-made")))
        .map(method_path)
        .collect();
    run.check(
        touched.is_empty(),
        format_args!("the hand-made pool is not touched: {touched:?}"),
    );
    let hand = az.pool("sigrunweu", "hand-made").await.unwrap_or_default();
    run.check(
        hand["state"] == "active" && hand["targetDedicatedNodes"] == 3,
        format_args!("the hand-made pool keeps its nodes: {hand}"),
    );
}

#[tokio::test]
async fn delete_removes_the_previous_pool_only() {
    let az = azure(16, "").await;
    let text = edit(
        &nightly_text(),
        "previous_pool = \"scale_to_zero\"",
        "previous_pool = \"delete\"",
    );
    let spec = az.pipeline("nightly-delete.toml", &text);
    az.run(&spec, &["--version", "2026.1126.1"]).await.code(0);
    foreign_pool(&az, &version_id("2026.1126.1")).await;
    let mark = az.mark().await;

    let run = az.run(&spec, &["--version", "2026.1126.2"]).await;
    run.code(0).stdout_has(": succeeded");
    let log = az.log_since(mark).await;
    for (account, target) in [("sigrunweu", "render"), ("sigruneus", "sim")] {
        let old = format!("nightly-ubuntu-{target}-2026-1126-1");
        run.stderr_has(&format!("previous pool {old} deleted"));
        let path = format!("/batch/{account}/pools/{old}");
        run.check(
            log.iter()
                .any(|e| e["method"] == "DELETE" && e["path"] == path.as_str() && e["status"] == 202),
            format_args!("DELETE {path} in the log"),
        );
        let pool = az.pool(account, &old).await;
        run.check(
            pool.as_ref().is_none_or(|p| p["state"] == "deleting"),
            format_args!("{old} is deleted: {pool:?}"),
        );
        let new = az.pool(account, &format!("nightly-ubuntu-{target}-2026-1126-2")).await;
        run.check(new.is_some_and(|p| p["state"] == "active"), "the new pool stays");
    }
    let hand = az.pool("sigrunweu", "hand-made").await.unwrap_or_default();
    run.check(
        hand["state"] == "active" && hand["targetDedicatedNodes"] == 3,
        format_args!("the hand-made pool is not touched: {hand}"),
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Bad input: exit 2, the reason named, nothing written

#[tokio::test]
async fn bad_inputs_exit_2_name_the_problem_and_write_nothing() {
    let az = azure(17, "").await;
    let nightly = nightly_text();
    let unknown = edit(
        &nightly,
        "vm_size = \"Standard_F8s_v2\"\n",
        "vm_size = \"Standard_F8s_v2\"\nnode_count = 3\n",
    );
    let unknown_line = unknown.lines().position(|l| l.starts_with("node_count")).unwrap() + 1;
    let gallery_line = nightly
        .lines()
        .position(|l| l.contains("galleries/sigrun_images"))
        .unwrap()
        + 1;
    let vm = |name: &str| {
        edit(
            &nightly,
            "virtualMachines/build-ubuntu-2204",
            &format!("virtualMachines/{name}"),
        )
    };
    let no_sea_replica = format!(
        "{}\n[[pools]]\ntarget = \"asia\"\naccount = \"{SEA_ACCOUNT}\"\nvm_size = \"Standard_D4s_v5\"\ndedicated_nodes = 10\nnode_agent_sku_id = \"batch.node.ubuntu 22.04\"\n",
        edit(&nightly, "  { name = \"southeastasia\", replicas = 1 },\n", "")
    );
    let cases: Vec<(&str, String, Vec<&str>, Vec<String>)> = vec![
        (
            "unknown-key.toml",
            unknown,
            vec![],
            vec![
                format!("unknown-key.toml:{unknown_line}:"),
                "node_count".into(),
                "unknown field".into(),
            ],
        ),
        (
            "specialized.toml",
            edit(&nightly, "os_state = \"Generalized\"", "os_state = \"Specialized\""),
            vec![],
            vec![
                "specialized.toml".into(),
                "definition.os_state".into(),
                "need a Generalized image".into(),
            ],
        ),
        (
            "windows-sku.toml",
            edit(
                &nightly,
                "node_agent_sku_id = \"auto\"",
                "node_agent_sku_id = \"batch.node.windows amd64\"",
            ),
            vec![],
            vec![
                "windows-sku.toml".into(),
                "pools[0].node_agent_sku_id".into(),
                "windows SKU but the image is Linux".into(),
            ],
        ),
        (
            "gallery-dash.toml",
            edit(&nightly, "galleries/sigrun_images", "galleries/sigrun-images"),
            vec![],
            vec![
                format!("gallery-dash.toml:{gallery_line}:"),
                "gallery.id".into(),
                "no dashes".into(),
            ],
        ),
        (
            "bad-version.toml",
            nightly.clone(),
            vec!["--version", "1.2"],
            vec![
                "bad-version.toml".into(),
                "--version".into(),
                "`1.2` must be Major.Minor.Patch".into(),
            ],
        ),
        (
            "no-sea-replica.toml",
            no_sea_replica,
            vec![],
            vec![
                "no-sea-replica.toml".into(),
                "pools[2]".into(),
                "no replica is planned there; add southeastasia to publish.regions".into(),
            ],
        ),
        (
            "extension.toml",
            vm("build-with-extension"),
            vec![],
            vec![
                "extension.toml".into(),
                "source.vm".into(),
                "VM extensions installed (CustomScript)".into(),
            ],
        ),
        (
            "unmanaged.toml",
            vm("build-unmanaged"),
            vec![],
            vec![
                "unmanaged.toml".into(),
                "source.vm".into(),
                "unmanaged (VHD) OS disk".into(),
            ],
        ),
        (
            "unsupported-base.toml",
            vm("build-unsupported-base"),
            vec![],
            vec![
                "unsupported-base.toml".into(),
                "source.vm".into(),
                "someone/custom-distro/1, which Batch does not list".into(),
            ],
        ),
    ];
    for (file, text, extra, expected) in cases {
        let spec = az.pipeline(file, &text);
        let mark = az.mark().await;
        let run = az.run(&spec, &extra).await;
        run.code(2);
        for text in &expected {
            run.stderr_has(text);
        }
        run.check(run.stdout.is_empty(), "nothing is printed on stdout");
        let writes: Vec<String> = az
            .log_since(mark)
            .await
            .iter()
            .filter(|e| is_write(e))
            .map(method_path)
            .collect();
        run.check(writes.is_empty(), format_args!("bad input writes nothing: {writes:?}"));
    }

    // `validate` prints the plan with the numbers the rules decided, and writes nothing.
    let mark = az.mark().await;
    let plan = az.validate(NIGHTLY, &[]).await;
    plan.code(0);
    let line = |needle: &[&str]| plan.stdout.lines().any(|l| needle.iter().all(|n| l.contains(n)));
    plan.check(
        line(&["westeurope", "4 replica(s)", "auto: 2000 nodes at 600 per replica"]),
        "westeurope gets 4 replicas for 2000 nodes",
    );
    plan.check(line(&["eastus", "1 replica(s)", "200 nodes"]), "eastus gets 1 replica");
    plan.check(line(&["southeastasia", "1 replica(s)"]), "southeastasia gets 1 replica");
    plan.check(
        line(&["node agent SKU batch.node.ubuntu 22.04", "resizeTimeout 30m"]),
        "the render pool: SKU and 30m resize timeout",
    );
    plan.check(
        line(&["node agent SKU batch.node.ubuntu 22.04", "resizeTimeout 20m"]),
        "the sim pool keeps its 20m",
    );
    plan.check(
        line(&["Batch account sigrunweu dedicatedCoreQuota", "+ 8000 planned of 200000"]),
        "the render pool's 2000 × 4 cores against the account's quota",
    );
    plan.check(
        !plan.stdout.contains("Warnings:"),
        "the shipped pipeline needs no warning",
    );
    let writes: Vec<String> = az
        .log_since(mark)
        .await
        .iter()
        .filter(|e| is_write(e))
        .map(method_path)
        .collect();
    plan.check(writes.is_empty(), format_args!("validate writes nothing: {writes:?}"));
}

/// The nightly pipeline asking for less than the rules allow: 1 replica for 2000 nodes, a 10 minute
/// resize timeout.
fn too_low() -> String {
    let text = edit(
        &nightly_text(),
        "{ name = \"westeurope\", replicas = \"auto\" }",
        "{ name = \"westeurope\", replicas = 1 }",
    );
    edit(&text, "resize_timeout = \"auto\"", "resize_timeout = \"10m\"")
}

#[tokio::test]
async fn values_below_the_minimums_are_raised_with_a_warning_never_used() {
    let az = azure(18, "").await;
    let spec = az.pipeline("too-low.toml", &too_low());
    let plan = az.validate(&spec, &[]).await;
    plan.code(0)
        .stdout_has("Warnings:")
        .stdout_has("pools[0].resize_timeout: resize_timeout 10m is below 15 minutes per 1000 nodes for 2000 nodes; raised to 30m")
        .stdout_has("publish.regions[0].replicas: 1 is below one replica per 600 nodes")
        .stdout_has("raised to 4");
    plan.check(
        plan.stdout.lines().any(|l| {
            l.contains("westeurope") && l.contains("4 replica(s)") && l.contains("raised from 1 for 2000 nodes")
        }),
        "the plan shows westeurope raised to 4",
    );
    plan.check(
        plan.stdout.contains("resizeTimeout 30m") && !plan.stdout.contains("resizeTimeout 10m"),
        "the plan uses 30m",
    );

    let run = az.run(&spec, &["--version", "2026.1126.8"]).await;
    run.code(0)
        .stderr_has("warning: pools[0].resize_timeout")
        .stderr_has("warning: publish.regions[0].replicas");
    let pool = az
        .pool("sigrunweu", "nightly-ubuntu-render-2026-1126-8")
        .await
        .unwrap_or_default();
    run.check(
        iso_secs(pool["resizeTimeout"].as_str().unwrap_or("PT0S")) == 1800,
        format_args!("the pool gets 30 minutes, not 10: {}", pool["resizeTimeout"]),
    );
    let v = az.arm(&version_id("2026.1126.8"), false).await.unwrap_or_default();
    run.check(
        replicas(&v).get("westeurope") == Some(&4),
        format_args!("westeurope gets 4 replicas, not 1: {:?}", replicas(&v)),
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Windows

#[tokio::test]
async fn windows_nightly_runs_to_success() {
    let az = azure(19, "").await;
    let run = az.run(WINDOWS, &["--version", "2026.1126.9"]).await;
    run.code(0)
        .stdout_has("Run of windows-nightly version 2026.1126.9: succeeded")
        .stderr_has("pool windows-nightly-win-build-2026-1126-9 verified");
    let definition = format!("{GALLERY}/images/winserver-2022-batch");
    let d = az.arm(&definition, false).await.unwrap_or_default();
    run.check(
        d["properties"]["osType"] == "Windows" && d["properties"]["osState"] == "Generalized",
        format_args!("a generalized Windows definition: {}", d["properties"]),
    );
    let vid = format!("{definition}/versions/2026.1126.9");
    let v = az.arm(&vid, true).await.unwrap_or_default();
    run.check(
        replication(&v).keys().map(String::as_str).collect::<Vec<_>>() == ["eastus", "westeurope"]
            && replication(&v).values().all(|s| s == "Completed"),
        format_args!("replicated to westeurope and eastus: {:?}", replication(&v)),
    );
    let pool = az
        .pool("sigrunweu", "windows-nightly-win-build-2026-1126-9")
        .await
        .unwrap_or_default();
    let vm = &pool["virtualMachineConfiguration"];
    run.check(
        vm["nodeAgentSKUId"] == "batch.node.windows amd64"
            && vm["imageReference"]["virtualMachineImageId"]
                .as_str()
                .is_some_and(|i| i.eq_ignore_ascii_case(&vid))
            && pool["targetDedicatedNodes"] == 40,
        format_args!("the Windows pool: {pool}"),
    );
}

// ---------------------------------------------------------------------------------------------
// 10. A fleet over many nights: clean-up, retention and quotas

mod fleet;

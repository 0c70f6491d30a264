//! The Azure CLI against `sigrun emulator`, as a user dry-running the Batch documentation's CLI way
//! would: a second client of the emulator that nobody here wrote. `az` (azure-cli 2.91.0, put in a
//! virtualenv by `scripts/test-env`) gets nothing but custom-cloud set-up — the cloud registered
//! from the emulator's start-up line (`--endpoint-resource-manager`, endpoints discovered from
//! `/metadata/endpoints`), instance discovery off, the emulator's CA trusted — then logs in with the
//! world's pipeline app and runs the chain in order, each command as a user types it: disks →
//! snapshots → image → gallery → definition → version in two regions → Batch pool from it, steady
//! with idle nodes. Then the refusals a user must see through `az`: a specialized definition, a
//! node agent SKU of the wrong OS, Shared Key auth for a gallery pool, a node count that is no
//! number. Last, the emulator stops on SIGTERM and takes its temporary TLS directory with it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const PIPELINE_APP: (&str, &str) = ("5a1b2c3d-0000-4000-8000-00000000a001", "emulator-secret-pipeline");
const IMAGING: &str = "11111111-1111-4111-8111-111111111111";
const COMPUTE: &str = "22222222-2222-4222-8222-222222222222";
const NODE_AGENT: &str = "batch.node.ubuntu 22.04";

/// The `az` of the virtualenv `scripts/test-env` makes, or `SIGRUN_AZ`.
fn az_binary() -> PathBuf {
    let path = std::env::var_os("SIGRUN_AZ").map(PathBuf::from).unwrap_or_else(|| {
        let venv = std::env::var_os("SIGRUN_AZ_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/sigrun/az-venv")
            });
        venv.join("bin/az")
    });
    assert!(
        path.is_file(),
        "the Azure CLI is not at {}: run scripts/test-env (it installs azure-cli 2.91.0 from PyPI into \
         ~/.cache/sigrun/az-venv), or point SIGRUN_AZ at an az",
        path.display()
    );
    path
}

/// `sigrun emulator` as a child process, stopped with SIGTERM when dropped.
struct EmulatorProcess {
    child: Child,
    info: Value,
}

impl EmulatorProcess {
    fn start() -> EmulatorProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sigrun"))
            .args(["emulator", "--time-scale", "600"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("sigrun emulator starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("the start-up line");
        let info = serde_json::from_str(&line).unwrap_or_else(|e| panic!("start-up line {line:?}: {e}"));
        EmulatorProcess { child, info }
    }

    fn field(&self, key: &str) -> &str {
        self.info[key]
            .as_str()
            .unwrap_or_else(|| panic!("start-up line lacks {key}"))
    }

    /// SIGTERM, then the exit status within 10 s.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        let asked = Instant::now();
        loop {
            if let Some(exit) = self.child.try_wait().expect("wait") {
                return exit;
            }
            assert!(
                asked.elapsed() < Duration::from_secs(10),
                "the emulator ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for EmulatorProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.terminate();
        }
    }
}

/// `az` with a configuration directory of its own and the emulator's CA trusted.
struct Az {
    binary: PathBuf,
    config: tempfile::TempDir,
    ca_cert: String,
}

impl Az {
    fn new(ca_cert: &str) -> Az {
        Az {
            binary: az_binary(),
            config: tempfile::tempdir().expect("a temp dir"),
            ca_cert: ca_cert.to_string(),
        }
    }

    fn output(&self, args: &[&str]) -> Output {
        Command::new(&self.binary)
            .args(args)
            .env("AZURE_CONFIG_DIR", self.config.path())
            .env("REQUESTS_CA_BUNDLE", &self.ca_cert)
            .env("AZURE_CORE_COLLECT_TELEMETRY", "false")
            .env("AZURE_CORE_NO_COLOR", "true")
            .env("AZURE_CORE_ONLY_SHOW_ERRORS", "true")
            .output()
            .expect("az runs")
    }

    /// Runs `az args --output json`, which must succeed; its output (null when it prints none).
    fn ok(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.output(&all);
        assert!(
            out.status.success(),
            "az {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        if stdout.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("az {}: {e}\n{stdout}", args.join(" ")))
    }

    /// Runs `az args`, which must fail; what it said on stderr.
    fn refused(&self, args: &[&str]) -> String {
        let out = self.output(args);
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success(),
            "az {} succeeded; expected a refusal",
            args.join(" ")
        );
        said
    }

    /// Runs `az args` until `done` holds for its output, for at most `limit`.
    fn until(&self, args: &[&str], limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let value = self.ok(args);
            if done(&value) {
                return value;
            }
            assert!(
                started.elapsed() < limit,
                "az {} not done after {limit:?}: {value}",
                args.join(" ")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn text(value: &Value, pointer: &str) -> String {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no text at {pointer} in {value}"))
        .to_string()
}

/// A command line's words (for lines whose values have no spaces).
fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// Cloud registration and login: the set-up a user does once.
fn log_in(az: &Az, emulator: &EmulatorProcess) {
    let base = emulator.field("base_url");
    az.ok(&[
        "cloud",
        "register",
        "--name",
        "sigrun-emulator",
        "--endpoint-resource-manager",
        base,
    ]);
    az.ok(&["cloud", "set", "--name", "sigrun-emulator"]);
    az.ok(&["config", "set", "core.instance_discovery=false"]);
    let tenant = emulator.field("tenant_id");
    let (app, secret) = PIPELINE_APP;
    let login = format!("login --service-principal --username {app} --password {secret} --tenant {tenant}");
    let accounts = az.ok(&words(&login));
    let ids: Vec<&str> = accounts
        .as_array()
        .expect("login lists the subscriptions")
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert!(ids.contains(&IMAGING) && ids.contains(&COMPUTE), "{accounts}");
    az.ok(&["account", "set", "--subscription", IMAGING]);
}

/// Disks → snapshots → image → gallery → generalized definition → version in two regions,
/// replicated. The version's id.
fn publish(az: &Az) -> String {
    let vm = az.ok(&["vm", "show", "-g", "rg-imaging", "-n", "build-ubuntu-2204"]);
    let os_disk = text(&vm, "/storageProfile/osDisk/managedDisk/id");
    let data_disks: Vec<String> = vm["storageProfile"]["dataDisks"]
        .as_array()
        .expect("data disks")
        .iter()
        .map(|d| text(d, "/managedDisk/id"))
        .collect();
    assert_eq!(data_disks.len(), 2, "{vm}");

    // No --location: az reads the disk and defaults to the resource group's region.
    let os_snapshot = az.ok(&words(&format!(
        "snapshot create -g rg-imaging -n az-os --source {os_disk}"
    )));
    assert_eq!(text(&os_snapshot, "/provisioningState"), "Succeeded");
    assert_eq!(text(&os_snapshot, "/location"), "westeurope");
    let mut data_snapshots = Vec::new();
    for (n, disk) in data_disks.iter().enumerate() {
        let name = format!("az-data{n}");
        let snapshot = az.ok(&words(&format!(
            "snapshot create -g rg-imaging -n {name} --source {disk}"
        )));
        assert_eq!(
            snapshot["diskSizeGB"],
            vm["storageProfile"]["dataDisks"][n]["diskSizeGB"]
        );
        data_snapshots.push(text(&snapshot, "/id"));
    }

    let image = az.ok(&words(&format!(
        "image create -g rg-imaging -n az-image --source {} --data-disk-sources {} --os-type Linux \
         --hyper-v-generation V2",
        text(&os_snapshot, "/id"),
        data_snapshots.join(" ")
    )));
    assert_eq!(text(&image, "/provisioningState"), "Succeeded");
    assert_eq!(image["storageProfile"]["dataDisks"].as_array().map(Vec::len), Some(2));

    az.ok(&["sig", "create", "-g", "rg-gallery", "-r", "azgallery"]);
    let galleries = az.ok(&["sig", "list", "-g", "rg-gallery"]);
    assert!(
        galleries
            .as_array()
            .expect("a list")
            .iter()
            .any(|g| g["name"] == "azgallery")
    );
    define(az, "ubuntu-batch", "Generalized");
    let version = az.ok(&words(&format!(
        "sig image-version create -g rg-gallery -r azgallery -i ubuntu-batch -e 1.0.0 --managed-image {} \
         --target-regions westeurope eastus --replica-count 1",
        text(&image, "/id")
    )));
    let show =
        words("sig image-version show -g rg-gallery -r azgallery -i ubuntu-batch -e 1.0.0 --expand ReplicationStatus");
    let replicated = az.until(&show, Duration::from_secs(120), |v| {
        v.pointer("/replicationStatus/aggregatedState") == Some(&Value::from("Completed"))
    });
    let regions = replicated["replicationStatus"]["summary"]
        .as_array()
        .expect("summary")
        .len();
    assert_eq!(regions, 2, "{replicated}");
    text(&version, "/id")
}

fn define(az: &Az, definition: &str, os_state: &str) {
    let created = az.ok(&words(&format!(
        "sig image-definition create -g rg-gallery -r azgallery -i {definition} --publisher sigrun \
         --offer ubuntu --sku {definition} --os-type Linux --os-state {os_state} --hyper-v-generation V2"
    )));
    assert_eq!(text(&created, "/osState"), os_state);
}

fn batch_login(az: &Az, shared_key: bool) {
    let mut args = words("batch account login -g rg-batch -n sigrunweu --subscription");
    args.push(COMPUTE);
    if shared_key {
        args.push("--shared-key-auth");
    }
    az.ok(&args);
}

fn pool_create<'a>(id: &'a str, image: &'a str, nodes: &'a str, node_agent: &'a str) -> Vec<&'a str> {
    let mut args = words("batch pool create --vm-size Standard_D2s_v3 --id");
    args.extend([
        id,
        "--target-dedicated-nodes",
        nodes,
        "--image",
        image,
        "--node-agent-sku-id",
        node_agent,
    ]);
    args
}

/// The pool from the version, steady with its two nodes idle.
fn pool_from(az: &Az, version: &str) {
    batch_login(az, false);
    let images = az.ok(&["batch", "pool", "supported-images", "list"]);
    let offered = images
        .as_array()
        .expect("a list")
        .iter()
        .any(|i| i["nodeAgentSkuId"] == NODE_AGENT);
    assert!(offered, "{NODE_AGENT} is not among the supported images");
    az.ok(&pool_create("az-pool", version, "2", NODE_AGENT));
    let pool = az.until(
        &["batch", "pool", "show", "--pool-id", "az-pool"],
        Duration::from_secs(120),
        |p| p["allocationState"] == "steady",
    );
    assert_eq!(
        pool["targetDedicatedNodes"], 2,
        "the node count az sends as \"2\" is 2: {pool}"
    );
    assert_eq!(pool["currentDedicatedNodes"], 2, "{pool}");
    assert!(pool["resizeErrors"].is_null(), "{pool}");
    az.until(
        &["batch", "node", "list", "--pool-id", "az-pool"],
        Duration::from_secs(120),
        |nodes| {
            let nodes = nodes.as_array().expect("a list");
            nodes.len() == 2 && nodes.iter().all(|n| n["state"] == "idle")
        },
    );
}

/// What Batch refuses, as `az` shows it.
fn refusals(az: &Az, version: &str) {
    let said = az.refused(&pool_create("az-windows", version, "1", "batch.node.windows amd64"));
    assert!(
        said.contains("InvalidPropertyValue") && said.contains("nodeAgentSKUId"),
        "{said}"
    );

    let said = az.refused(&pool_create("az-words", version, "two", NODE_AGENT));
    assert!(
        said.contains("InvalidPropertyValue") && said.contains("targetDedicatedNodes") && said.contains("\"two\""),
        "{said}"
    );

    // A specialized definition takes a version made from a snapshot; Batch will not boot it.
    define(az, "ubuntu-specialized", "Specialized");
    let os_snapshot =
        format!("/subscriptions/{IMAGING}/resourceGroups/rg-imaging/providers/Microsoft.Compute/snapshots/az-os");
    let specialized = az.ok(&words(&format!(
        "sig image-version create -g rg-gallery -r azgallery -i ubuntu-specialized -e 1.0.0 \
         --os-snapshot {os_snapshot} --target-regions westeurope"
    )));
    let said = az.refused(&pool_create(
        "az-specialized",
        &text(&specialized, "/id"),
        "1",
        NODE_AGENT,
    ));
    assert!(said.contains("specialized"), "{said}");

    batch_login(az, true);
    let said = az.refused(&pool_create("az-shared-key", version, "1", NODE_AGENT));
    assert!(
        said.contains("AuthenticationFailed") && said.contains("SharedKey"),
        "{said}"
    );
}

#[test]
fn the_documented_cli_way_runs_against_the_emulator_with_only_custom_cloud_set_up() {
    let mut emulator = EmulatorProcess::start();
    let az = Az::new(emulator.field("ca_cert"));
    log_in(&az, &emulator);
    let version = publish(&az);
    pool_from(&az, &version);
    refusals(&az, &version);

    let tls_dir = Path::new(emulator.field("ca_cert"))
        .parent()
        .expect("a folder")
        .to_path_buf();
    assert!(emulator.terminate().success());
    assert!(!tls_dir.exists(), "the emulator left {} behind", tls_dir.display());
}

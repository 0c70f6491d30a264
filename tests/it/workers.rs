//! Stage workers on RabbitMQ, end to end: real `sigrun worker` processes of the built binary
//! consume from the real broker at `SIGRUN_TEST_AMQP_URL` (default amqp://guest:guest@127.0.0.1:5672)
//! and call an emulator started in the test process; `sigrun submit` publishes the run; the test
//! follows the run through the events stream until `run_result` says it ended, then checks the
//! pools on the Azure side and that SIGTERM stops every worker with exit 0. Each test uses its own
//! name prefix on the broker and deletes its topology at the end. An unreachable broker fails the
//! test with how to start it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use sigrun::bus::amqp::topology::Names;
use sigrun::bus::amqp::{AmqpBus, StreamOffset};
use sigrun::config::Settings;
use sigrun::emulator::EmulatorOptions;
use sigrun::events::{self, Event, RunResult};
use sigrun::model::envelope::Stage;
use uuid::Uuid;

use crate::helpers::{self, BATCH_API, PIPELINE_APP, TENANT, TestEmulator};

pub(crate) const NIGHTLY: &str = "pipelines/nightly-ubuntu.toml";
pub(crate) const VERSION: &str = "2026.1126.3";
/// Emulated seconds per real second: the nightly run (about an hour of Azure time) takes ~10 s.
const SCALE: f64 = 400.0;
/// No run here should come near this.
pub(crate) const RUN_LIMIT: Duration = Duration::from_secs(150);

pub(crate) fn amqp_url() -> String {
    std::env::var("SIGRUN_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// An emulator, a config file pointing the binary at it (azure mode) and at the broker under a
/// prefix of the test's own.
pub(crate) struct Setup {
    pub(crate) emu: TestEmulator,
    _dir: tempfile::TempDir,
    pub(crate) dir: PathBuf,
    pub(crate) config: PathBuf,
    /// The same without `[amqp]`: the prefix then comes from `SIGRUN__AMQP__PREFIX`.
    config_without_amqp: PathBuf,
    pub(crate) prefix: String,
}

pub(crate) async fn setup() -> Setup {
    let emu = helpers::start(EmulatorOptions {
        time_scale: SCALE,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let info = emu.emulator.info();
    let prefix = format!("sigrun-test-{}", &Uuid::new_v4().simple().to_string()[..12]);
    let azure = format!(
        r#"[azure]
mode = "azure"
time_scale = {scale:?}

[azure.client]
credential = {{ kind = "client_secret", tenant_id = "{TENANT}", client_id = "{client}", client_secret = "{secret}" }}
cloud = {{ authority_host = "{base}", resource_manager = "{base}" }}
extra_ca_cert = "{ca}"

[runtime]
shutdown_grace_ms = 5000
"#,
        scale = info.time_scale,
        client = PIPELINE_APP.0,
        secret = PIPELINE_APP.1,
        base = info.base_url,
        ca = info.ca_cert.as_deref().expect("the emulator serves TLS"),
    );
    let amqp = format!("\n[amqp]\nurl = \"{}\"\nprefix = \"{prefix}\"\n", amqp_url());
    let config = dir.path().join("sigrun.toml");
    std::fs::write(&config, format!("{azure}{amqp}")).expect("write config");
    let config_without_amqp = dir.path().join("sigrun-env.toml");
    std::fs::write(&config_without_amqp, &azure).expect("write config");
    Setup {
        emu,
        dir: dir.path().to_path_buf(),
        _dir: dir,
        config,
        config_without_amqp,
        prefix,
    }
}

/// A `sigrun` process started from the repository root, its output in files.
pub(crate) struct Process {
    command: String,
    child: Child,
    pub(crate) stdout: PathBuf,
    pub(crate) stderr: PathBuf,
}

impl Process {
    pub(crate) fn start(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
        let (stdout, stderr) = (dir.join(format!("{name}.out")), dir.join(format!("{name}.err")));
        let mut command = Command::new(env!("CARGO_BIN_EXE_sigrun"));
        command
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("SIGRUN_LOG")
            .env_remove("SIGRUN__AMQP__URL")
            .env_remove("SIGRUN__AMQP__PREFIX")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("sigrun starts");
        Process {
            command: format!("sigrun {}", args.join(" ")),
            child,
            stdout,
            stderr,
        }
    }

    pub(crate) fn report(&self) -> String {
        format!(
            "\n=== {}\n=== stdout\n{}\n=== stderr\n{}\n===",
            self.command,
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Waits (bounded, without blocking the runtime that serves the emulator) for the exit code.
    pub(crate) async fn wait(&mut self, limit: Duration) -> Option<i32> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for sigrun") {
                return status.code();
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{} did not end within {limit:?}{}", self.command, self.report());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} {}", self.child.id());
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A bus on the test's prefix (for reading events and deleting the topology at the end).
pub(crate) async fn test_bus(config: &Path) -> (AmqpBus, Settings) {
    let settings = Settings::load(Some(config)).expect("the test config loads");
    let url = settings.amqp.redacted_url();
    match AmqpBus::connect(settings.amqp.clone(), settings.delay_tiers()).await {
        Ok(bus) => (bus, settings),
        Err(error) => panic!(
            "RabbitMQ is not reachable at {url} ({error}). Start it with `rabbitmq-server -detached` \
             (or point SIGRUN_TEST_AMQP_URL at a broker)"
        ),
    }
}

/// Follows the events stream from the start until the run has ended (bounded).
async fn wait_for_run(bus: &AmqpBus, run_id: Uuid, workers: &[Process]) -> (RunResult, Vec<Event>) {
    let mut reader = bus
        .read_events(StreamOffset::First)
        .await
        .expect("read the events stream");
    let mut history = Vec::new();
    let deadline = tokio::time::Instant::now() + RUN_LIMIT;
    loop {
        let next = tokio::time::timeout_at(deadline, reader.next()).await;
        let streamed = match next {
            Ok(Some(Ok(streamed))) => streamed,
            Ok(other) => panic!("the events stream ended: {:?}", other.map(|r| r.map(|_| ()))),
            Err(_) => {
                let logs: String = workers.iter().map(Process::report).collect();
                panic!("run {run_id} did not end within {RUN_LIMIT:?}; events: {history:#?}{logs}");
            }
        };
        if streamed.event.run_id != run_id {
            continue;
        }
        history.push(streamed.event);
        let result = events::run_result(&history);
        if result != RunResult::Running {
            reader.close().await;
            return (result, history);
        }
    }
}

/// Submits the nightly run to workers started with `worker_args`, waits for it, checks the pools
/// and the workers' clean exit on SIGTERM.
async fn nightly_run_on_workers(worker_args: &[&[&str]]) {
    let setup = setup().await;
    let (bus, settings) = test_bus(&setup.config).await;
    let config = setup.config.display().to_string();

    let mut workers: Vec<Process> = worker_args
        .iter()
        .enumerate()
        .map(|(i, extra)| {
            let mut args = vec!["worker", "--config", config.as_str()];
            args.extend_from_slice(extra);
            Process::start(&setup.dir, &format!("worker{i}"), &args, &[])
        })
        .collect();

    // The prefix from the environment this time (SIGRUN__AMQP__PREFIX over a file without [amqp]).
    let env_config = setup.config_without_amqp.display().to_string();
    let url = amqp_url();
    let mut submit = Process::start(
        &setup.dir,
        "submit",
        &["submit", NIGHTLY, "--version", VERSION, "--config", &env_config],
        &[
            ("SIGRUN__AMQP__PREFIX", setup.prefix.as_str()),
            ("SIGRUN__AMQP__URL", url.as_str()),
        ],
    );
    let code = submit.wait(Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "submit should exit 0{}", submit.report());
    let stdout = std::fs::read_to_string(&submit.stdout).unwrap_or_default();
    let run_id = Uuid::parse_str(stdout.trim())
        .unwrap_or_else(|_| panic!("submit should print the run id alone on stdout{}", submit.report()));

    let began = Instant::now();
    let (result, history) = wait_for_run(&bus, run_id, &workers).await;
    let logs: String = workers.iter().map(Process::report).collect();
    assert_eq!(result, RunResult::Succeeded, "events: {history:#?}{logs}");
    eprintln!(
        "run {run_id} succeeded on {} worker process(es) in {:.1} s ({} events)",
        workers.len(),
        began.elapsed().as_secs_f64(),
        history.len()
    );

    let token = setup.emu.batch_token().await;
    let dashed = VERSION.replace('.', "-");
    for (account, target) in [("sigrunweu", "render"), ("sigruneus", "sim")] {
        let url = format!(
            "{}/pools/nightly-ubuntu-{target}-{dashed}?api-version={BATCH_API}",
            setup.emu.batch_url(account)
        );
        let reply = setup.emu.get(&url, &token).await;
        assert_eq!(reply.status, 200, "pool {target} in {account}: {:?}", reply.body);
    }

    for worker in &workers {
        worker.signal("TERM");
    }
    for worker in &mut workers {
        let code = worker.wait(Duration::from_secs(20)).await;
        assert_eq!(code, Some(0), "a worker exits 0 on SIGTERM{}", worker.report());
        let stderr = std::fs::read_to_string(&worker.stderr).unwrap_or_default();
        assert!(stderr.contains("sigrun worker: stopped"), "{}", worker.report());
    }

    bus.close().await;
    AmqpBus::delete_topology(&settings.amqp, &settings.delay_tiers())
        .await
        .expect("delete the test topology");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_for_all_stages_completes_a_nightly_run() {
    nightly_run_on_workers(&[&["--all-stages"]]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_workers_one_per_stage_complete_a_nightly_run() {
    let stages = [
        "snapshot",
        "image-create",
        "gallery-publish",
        "replicate",
        "pool-create",
        "verify",
    ];
    let args: Vec<[&str; 2]> = stages.iter().map(|s| ["--stage", *s]).collect();
    let args: Vec<&[&str]> = args.iter().map(|a| a.as_slice()).collect();
    nightly_run_on_workers(&args).await;
}

#[tokio::test]
async fn workers_and_submit_refuse_emulator_mode_and_bad_input() {
    let dir = tempfile::tempdir().expect("temp dir");
    // No settings: the built-in emulator, which a worker must not start.
    let mut worker = Process::start(dir.path(), "worker", &["worker", "--all-stages"], &[]);
    assert_eq!(
        worker.wait(Duration::from_secs(30)).await,
        Some(2),
        "{}",
        worker.report()
    );
    let stderr = std::fs::read_to_string(&worker.stderr).unwrap_or_default();
    assert!(stderr.contains("azure.mode = \"azure\""), "{}", worker.report());

    let mut submit = Process::start(dir.path(), "submit", &["submit", NIGHTLY], &[]);
    assert_eq!(
        submit.wait(Duration::from_secs(30)).await,
        Some(2),
        "{}",
        submit.report()
    );

    let mut neither = Process::start(dir.path(), "neither", &["worker"], &[]);
    assert_eq!(
        neither.wait(Duration::from_secs(30)).await,
        Some(2),
        "{}",
        neither.report()
    );

    // A spec that does not exist: exit 2 before anything reaches the broker.
    let setup = setup().await;
    let config = setup.config.display().to_string();
    let mut missing = Process::start(
        &setup.dir,
        "missing",
        &["submit", "pipelines/no-such.toml", "--config", &config],
        &[],
    );
    assert_eq!(
        missing.wait(Duration::from_secs(30)).await,
        Some(2),
        "{}",
        missing.report()
    );
    let stdout = std::fs::read_to_string(&missing.stdout).unwrap_or_default();
    assert!(stdout.is_empty(), "no run id for bad input{}", missing.report());

    // A plan that passes but a start the run cannot take: exit 2 after planning, still before the
    // broker (not even the topology of the test's prefix is declared).
    let mut from_verify = Process::start(
        &setup.dir,
        "from-verify",
        &[
            "submit",
            NIGHTLY,
            "--version",
            VERSION,
            "--from",
            "verify",
            "--config",
            &config,
        ],
        &[],
    );
    assert_eq!(
        from_verify.wait(Duration::from_secs(60)).await,
        Some(2),
        "{}",
        from_verify.report()
    );
    let stderr = std::fs::read_to_string(&from_verify.stderr).unwrap_or_default();
    assert!(stderr.contains("--from verify"), "{}", from_verify.report());

    let connection = match Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
        Ok(connection) => connection,
        Err(error) => panic!("RabbitMQ is not reachable ({error}). Start it with `rabbitmq-server -detached`"),
    };
    let names = Names::new(&setup.prefix);
    let queues = [names.events(), names.stage_queue(Stage::Snapshot)];
    let exists = |queue: String| {
        let connection = &connection;
        async move {
            let channel = connection.create_channel().await.expect("channel");
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
                .is_ok()
        }
    };
    for queue in &queues {
        assert!(
            !exists(queue.clone()).await,
            "{queue} should not exist: nothing was published"
        );
    }
    // The check itself: once a bus of the prefix has declared the topology, the queues are there.
    let (bus, settings) = test_bus(&setup.config).await;
    for queue in &queues {
        assert!(exists(queue.clone()).await, "{queue} exists once declared");
    }
    bus.close().await;
    AmqpBus::delete_topology(&settings.amqp, &settings.delay_tiers())
        .await
        .expect("delete the test topology");
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_mid_run_exits_0_and_a_new_one_finishes_the_run() {
    let setup = setup().await;
    let (bus, settings) = test_bus(&setup.config).await;
    let config = setup.config.display().to_string();
    let worker_args = ["worker", "--all-stages", "--config", config.as_str()];
    let mut first = Process::start(&setup.dir, "first", &worker_args, &[]);
    let mut submit = Process::start(
        &setup.dir,
        "submit",
        &["submit", NIGHTLY, "--version", VERSION, "--config", &config],
        &[],
    );
    assert_eq!(
        submit.wait(Duration::from_secs(60)).await,
        Some(0),
        "{}",
        submit.report()
    );
    let stdout = std::fs::read_to_string(&submit.stdout).unwrap_or_default();
    let run_id = Uuid::parse_str(stdout.trim()).expect("submit prints the run id");

    // Stop the worker once the run is under way (its first resource created, the run not ended).
    let mut reader = bus
        .read_events(StreamOffset::First)
        .await
        .expect("read the events stream");
    let deadline = tokio::time::Instant::now() + RUN_LIMIT;
    loop {
        let streamed = tokio::time::timeout_at(deadline, reader.next())
            .await
            .unwrap_or_else(|_| panic!("the run never got under way{}", first.report()))
            .expect("the stream is open")
            .expect("an event");
        if streamed.event.run_id == run_id
            && matches!(streamed.event.kind, sigrun::events::EventKind::ResourceCreated { .. })
        {
            break;
        }
    }
    reader.close().await;
    first.signal("TERM");
    assert_eq!(first.wait(Duration::from_secs(20)).await, Some(0), "{}", first.report());
    let stderr = std::fs::read_to_string(&first.stderr).unwrap_or_default();
    let stopped = stderr.lines().find(|l| l.starts_with("sigrun worker: stopped"));
    assert!(stopped.is_some(), "{}", first.report());
    eprintln!("first worker, SIGTERM mid-run: {}", stopped.unwrap_or_default());

    let second = Process::start(&setup.dir, "second", &worker_args, &[]);
    let (result, history) = wait_for_run(&bus, run_id, std::slice::from_ref(&second)).await;
    assert_eq!(
        result,
        RunResult::Succeeded,
        "events: {history:#?}{}{}",
        first.report(),
        second.report()
    );
    second.signal("TERM");
    let mut second = second;
    assert_eq!(
        second.wait(Duration::from_secs(20)).await,
        Some(0),
        "{}",
        second.report()
    );

    bus.close().await;
    AmqpBus::delete_topology(&settings.amqp, &settings.delay_tiers())
        .await
        .expect("delete the test topology");
}

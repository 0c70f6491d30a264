//! Stage workers on RabbitMQ, end to end: real `sigrun worker` processes of the built binary
//! consume from the real broker at `SIGRUN_TEST_AMQP_URL` (default amqp://guest:guest@127.0.0.1:5672)
//! and call an emulator started in the test process; `sigrun submit` — or the test itself, with
//! lapin, as an event producer would — publishes triggers; the test follows the runs through the
//! events stream until `run_result` says they ended, then checks the Azure side, the parked
//! triggers and that SIGTERM stops every worker with exit 0. Each test uses its own name prefix on
//! the broker and deletes its topology at the end. An unreachable broker fails the test with how
//! to start it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::collections::{HashMap, HashSet};

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::json;
use sigrun::bus::amqp::topology::Names;
use sigrun::bus::amqp::{AmqpBus, StreamOffset, headers};
use sigrun::config::Settings;
use sigrun::emulator::EmulatorOptions;
use sigrun::events::{self, Event, EventKind, RunResult};
use sigrun::model::envelope::{Branch, Stage};
use sigrun::model::trigger::{MAX_TRIGGER_BYTES, run_id};
use uuid::Uuid;

use crate::broker;
use crate::helpers::{self, BATCH_API, PIPELINE_APP, TENANT, TestEmulator};
use crate::process::{NIGHTLY, Process, submit_run};

pub(crate) const VERSION: &str = "2026.1126.3";
/// Emulated seconds per real second: the nightly run (about an hour of Azure time) takes ~10 s.
const SCALE: f64 = 400.0;
/// The scale of the hundred small runs: a run lasts about 19 s, well over the 7–12 s admitting
/// all hundred takes on this 2-core machine (measured; it was 150 and about 9.5 s a run, too close).
const TINY_SCALE: f64 = 75.0;
/// No run here should come near this.
pub(crate) const RUN_LIMIT: Duration = Duration::from_secs(150);

pub(crate) fn amqp_url() -> String {
    std::env::var("SIGRUN_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// An emulator, a config file pointing the binary at it (azure mode) and at the broker under a
/// prefix of the test's own, and a pipelines directory of the test's own (`[pipelines] dir`).
pub(crate) struct Setup {
    pub(crate) emu: TestEmulator,
    _dir: tempfile::TempDir,
    pub(crate) dir: PathBuf,
    pub(crate) config: PathBuf,
    /// The same without `[amqp]`: the prefix then comes from `SIGRUN__AMQP__PREFIX`.
    config_without_amqp: PathBuf,
    pub(crate) pipelines: PathBuf,
    pub(crate) prefix: String,
}

impl Setup {
    /// `sigrun submit` of the nightly pipeline at [`VERSION`]; returns the run id it prints.
    pub(crate) async fn submit(&self) -> Uuid {
        submit_run(&self.dir, &self.config, VERSION, &[]).await
    }
}

pub(crate) async fn setup() -> Setup {
    setup_scaled(SCALE).await
}

pub(crate) async fn setup_scaled(time_scale: f64) -> Setup {
    setup_with(time_scale, "").await
}

/// `client` is added to `[azure.client]` (e.g. its `retry` policy).
pub(crate) async fn setup_with(time_scale: f64, client: &str) -> Setup {
    let emu = helpers::start(EmulatorOptions {
        time_scale,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let pipelines = dir.path().join("pipelines");
    std::fs::create_dir(&pipelines).expect("pipelines dir");
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
{client_extra}

[runtime]
shutdown_grace_ms = 5000

[pipelines]
dir = "{pipelines}"
"#,
        pipelines = pipelines.display(),
        client_extra = client,
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
        pipelines,
        prefix,
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
    let url = amqp_url();
    let env = [
        ("SIGRUN__AMQP__PREFIX", setup.prefix.as_str()),
        ("SIGRUN__AMQP__URL", url.as_str()),
    ];
    let run_id = submit_run(&setup.dir, &setup.config_without_amqp, VERSION, &env).await;

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
        let stderr = worker.stderr_text();
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
    let stderr = worker.stderr_text();
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
    let stdout = missing.stdout_text();
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
    let stderr = from_verify.stderr_text();
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
    let run_id = setup.submit().await;

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
    let stderr = first.stderr_text();
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

/// A small pipeline: the Ubuntu build VM into one region and one pool of two nodes, kept as it is
/// by later runs. Triggers give each run its own version.
const TINY: &str = r#"
name = "tiny"
description = "one region, one small pool"

[source]
vm = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg-imaging/providers/Microsoft.Compute/virtualMachines/build-ubuntu-2204"

[image]
resource_group = "rg-imaging"
region = "westeurope"

[gallery]
id = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg-gallery/providers/Microsoft.Compute/galleries/tiny_images"
create_if_missing = true

[definition]
name = "tiny-batch"
os_type = "Linux"
publisher = "contoso"
offer = "tiny"
sku = "1"
hyper_v_generation = "V2"

[version]
scheme = "explicit"
value = "1.0.0"

[publish]
storage_account_type = "Standard_LRS"
regions = [{ name = "westeurope", replicas = 1 }]

[[pools]]
target = "small"
account = "/subscriptions/22222222-2222-4222-8222-222222222222/resourceGroups/rg-batch/providers/Microsoft.Batch/batchAccounts/sigrunweu"
vm_size = "Standard_D2s_v5"
dedicated_nodes = 2
node_agent_sku_id = "auto"

[rollout]
previous_pool = "keep"
"#;

/// Publishes triggers the way any producer would: plain lapin, persistent, with a confirm.
struct Producer {
    connection: Connection,
    channel: Channel,
    exchange: String,
}

impl Producer {
    async fn connect(prefix: &str) -> Producer {
        let connection = match Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
            Ok(connection) => connection,
            Err(error) => panic!("RabbitMQ is not reachable ({error}). Start it with `rabbitmq-server -detached`"),
        };
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Producer {
            connection,
            channel,
            exchange: format!("{prefix}.work"),
        }
    }

    async fn publish(&self, body: &[u8], content_type: &str, message_id: &str) {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(content_type.into())
            .with_message_id(message_id.into());
        let confirmation = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                "trigger".into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirmation.is_ack(), "the broker refused trigger {message_id}");
    }

    async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

fn plain_trigger(version: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"v": 1, "pipeline": "tiny", "version": version})).unwrap()
}

fn cloud_event(id: &str, version: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "specversion": "1.0",
        "type": "io.sigrun.trigger.v1",
        "source": "/ci/image-build",
        "id": id,
        "time": "2026-11-27T02:00:00Z",
        "datacontenttype": "application/json",
        "data": {"v": 1, "pipeline": "tiny", "version": version},
    }))
    .unwrap()
}

/// Follows the events stream from the start until every run of `runs` has ended (bounded by
/// `limit`); returns each run's history and the most runs that were in flight (started, not
/// ended) at once.
async fn follow_runs(
    bus: &AmqpBus,
    runs: &[Uuid],
    limit: Duration,
    workers: &[Process],
) -> (HashMap<Uuid, Vec<Event>>, usize) {
    let mut reader = bus
        .read_events(StreamOffset::First)
        .await
        .expect("read the events stream");
    let mut histories: HashMap<Uuid, Vec<Event>> = runs.iter().map(|r| (*r, Vec::new())).collect();
    let mut ended: HashSet<Uuid> = HashSet::new();
    let (mut in_flight, mut peak) = (0usize, 0usize);
    let deadline = tokio::time::Instant::now() + limit;
    while ended.len() < runs.len() {
        let streamed = match tokio::time::timeout_at(deadline, reader.next()).await {
            Ok(Some(Ok(streamed))) => streamed,
            Ok(other) => panic!("the events stream ended: {:?}", other.map(|r| r.map(|_| ()))),
            Err(_) => {
                let logs: String = workers.iter().map(Process::report).collect();
                let running: Vec<&Uuid> = runs.iter().filter(|r| !ended.contains(r)).collect();
                panic!(
                    "{} of {} runs did not end within {limit:?} (e.g. {:?}); {} ended{logs}",
                    running.len(),
                    runs.len(),
                    running.first(),
                    ended.len()
                );
            }
        };
        let run = streamed.event.run_id;
        let Some(history) = histories.get_mut(&run) else {
            continue;
        };
        if matches!(streamed.event.kind, EventKind::RunStarted { .. }) {
            in_flight += 1;
            peak = peak.max(in_flight);
        }
        history.push(streamed.event);
        if !ended.contains(&run) && events::run_result(history) != RunResult::Running {
            if history.iter().any(|e| matches!(e.kind, EventKind::RunStarted { .. })) {
                in_flight -= 1;
            }
            ended.insert(run);
        }
    }
    reader.close().await;
    (histories, peak)
}

/// Everything in the parking queue, taken off it: (body, properties).
async fn take_parked(prefix: &str) -> Vec<(Vec<u8>, BasicProperties)> {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let mut parked = Vec::new();
    while let Some(message) = channel
        .basic_get(format!("{prefix}.parked").as_str().into(), BasicGetOptions::default())
        .await
        .expect("basic.get")
    {
        message
            .delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        parked.push((message.delivery.data.clone(), message.delivery.properties.clone()));
    }
    let _ = connection.close(200, "done".into()).await;
    parked
}

fn header_text(properties: &BasicProperties, name: &str) -> String {
    match properties.headers().as_ref().and_then(|h| h.inner().get(name)) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {name}: {other:?}"),
    }
}

fn header_number(properties: &BasicProperties, name: &str) -> i64 {
    match properties.headers().as_ref().and_then(|h| h.inner().get(name)) {
        Some(AMQPValue::LongLongInt(n)) => *n,
        other => panic!("header {name}: {other:?}"),
    }
}

/// Waits (bounded) until `found` holds for some event of the stream read from the start.
async fn wait_for_event(bus: &AmqpBus, what: &str, found: impl Fn(&Event) -> bool, workers: &[Process]) -> Event {
    let mut reader = bus
        .read_events(StreamOffset::First)
        .await
        .expect("read the events stream");
    let deadline = tokio::time::Instant::now() + RUN_LIMIT;
    loop {
        match tokio::time::timeout_at(deadline, reader.next()).await {
            Ok(Some(Ok(streamed))) if found(&streamed.event) => {
                reader.close().await;
                return streamed.event;
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the events stream ended while waiting for {what}"),
            Err(_) => {
                let logs: String = workers.iter().map(Process::report).collect();
                panic!("waited {RUN_LIMIT:?} for {what} in vain{logs}");
            }
        }
    }
}

/// Every event of `run` published so far.
async fn history_now(bus: &AmqpBus, run: Uuid) -> Vec<Event> {
    let mut reader = bus
        .read_events(StreamOffset::First)
        .await
        .expect("read the events stream");
    let read = reader.read_to_end(bus).await.expect("read to the end");
    reader.close().await;
    read.into_iter()
        .filter_map(Result::ok)
        .map(|s| s.event)
        .filter(|e| e.run_id == run)
        .collect()
}

/// What is left of the runs on the prefix's queues (each stage's and each delay tier's) once no
/// worker consumes them: (queue, messages) of each that is not empty. Waits (bounded) until the
/// broker lists no consumer of any of them, for only then has it put back what they held.
async fn work_left(settings: &Settings) -> Vec<(String, u32)> {
    let names = Names::new(&settings.amqp.prefix);
    let mut queues: Vec<String> = Stage::ALL.iter().map(|stage| names.stage_queue(*stage)).collect();
    queues.extend(settings.delay_tiers().into_iter().map(|tier| names.tier(tier)));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let consumed: Vec<String> = broker::consumers()
            .await
            .into_iter()
            .map(|(queue, _)| queue)
            .filter(|queue| queues.contains(queue))
            .collect();
        if consumed.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "consumed with every worker stopped: {consumed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A get, not a passive declare: the queue answers a get or the get fails, while a passive
    // declare reads 0 messages when the queue is slow to answer.
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let mut left = Vec::new();
    for queue in queues {
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap_or_else(|e| panic!("basic.get from {queue}: {e}"));
        if let Some(message) = got {
            left.push((queue, message.message_count + 1));
        }
    }
    // Closing the connection puts back what was got.
    let _ = connection.close(200, "done".into()).await;
    left
}

async fn stop_workers(workers: &mut [Process]) {
    for worker in workers.iter() {
        worker.signal("TERM");
    }
    for worker in workers.iter_mut() {
        let code = worker.wait(Duration::from_secs(20)).await;
        assert_eq!(code, Some(0), "a worker exits 0 on SIGTERM{}", worker.report());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloudevents_trigger_and_a_plain_trigger_both_start_runs_and_a_duplicate_does_not_start_two() {
    let setup = setup().await;
    std::fs::write(setup.pipelines.join("tiny.toml"), TINY).expect("write the pipeline");
    let (bus, settings) = test_bus(&setup.config).await;
    let config = setup.config.display().to_string();
    let mut workers = vec![Process::start(
        &setup.dir,
        "worker",
        &["worker", "--all-stages", "--config", &config],
        &[],
    )];
    let producer = Producer::connect(&setup.prefix).await;
    let (by_event, by_plain) = (run_id("tiny", "1.0.1"), run_id("tiny", "1.0.2"));

    producer
        .publish(&cloud_event("ce-1", "1.0.1"), "application/cloudevents+json", "ce-1")
        .await;
    producer
        .publish(&plain_trigger("1.0.2"), "application/json", "plain-1")
        .await;
    // The same run again at once (while the first is being admitted or has just started).
    producer
        .publish(&plain_trigger("1.0.2"), "application/json", "plain-2")
        .await;
    // Triggers that can never start anything: parked at once, with the reason.
    let oversized = vec![b' '; MAX_TRIGGER_BYTES + 1];
    let bad: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("bad-json", b"{\"v\": 1, \"pipeline\":".to_vec(), "application/json", "not JSON"),
        ("bad-size", oversized, "application/json", "over the limit"),
        (
            "bad-field",
            serde_json::to_vec(&json!({"v": 1, "pipeline": "tiny", "colour": "red"})).unwrap(),
            "application/json",
            "trigger field `colour`: unknown field",
        ),
        (
            "bad-type",
            serde_json::to_vec(&json!({"specversion": "1.0", "type": "com.example.build", "source": "/x", "id": "1", "data": {"v": 1, "pipeline": "tiny"}})).unwrap(),
            "application/cloudevents+json",
            "CloudEvents attribute `type`",
        ),
        (
            "bad-pipeline",
            serde_json::to_vec(&json!({"v": 1, "pipeline": "nope"})).unwrap(),
            "application/json",
            "no pipeline named `nope`",
        ),
    ];
    for (id, body, content_type, _) in &bad {
        producer.publish(body, content_type, id).await;
    }
    // A spec of its own that breaks a rule (a build VM with an extension): its run is rejected.
    let broken = TINY.replace("build-ubuntu-2204\"", "build-with-extension\"");
    let rejected_body =
        serde_json::to_vec(&json!({"v": 1, "pipeline": "tiny", "version": "1.0.9", "spec": broken})).unwrap();
    producer.publish(&rejected_body, "application/json", "rejected-1").await;
    let rejected = run_id("tiny", "1.0.9");

    let began = Instant::now();
    let (histories, _) = follow_runs(&bus, &[by_event, by_plain, rejected], RUN_LIMIT, &workers).await;
    eprintln!(
        "two tiny runs and a rejected one ended in {:.1} s",
        began.elapsed().as_secs_f64()
    );
    for run in [by_event, by_plain] {
        let history = &histories[&run];
        assert_eq!(events::run_result(history), RunResult::Succeeded, "{history:#?}");
    }
    let rejection = &histories[&rejected];
    match events::run_result(rejection) {
        RunResult::Failed { reason } => assert!(reason.contains("extension"), "{reason}"),
        other => panic!("{other:?}: {rejection:#?}"),
    }

    // Once more for the CloudEvents run, now that it has ended (its version exists in Azure, so
    // planning it again would be refused: the admitter must know it as a duplicate first).
    producer
        .publish(&cloud_event("ce-2", "1.0.1"), "application/cloudevents+json", "ce-2")
        .await;
    let duplicate = wait_for_event(
        &bus,
        "the late duplicate",
        |e| e.run_id == by_event && matches!(&e.kind, EventKind::DuplicateTrigger { message_id } if message_id.as_deref() == Some("ce-2")),
        &workers,
    )
    .await;
    assert_eq!((duplicate.stage, &duplicate.branch), (Stage::Snapshot, &Branch::Trunk));

    for (run, duplicates) in [(by_event, vec!["ce-2"]), (by_plain, vec!["plain-2"])] {
        let history = history_now(&bus, run).await;
        let started = history
            .iter()
            .filter(|e| matches!(e.kind, EventKind::RunStarted { .. }))
            .count();
        assert_eq!(started, 1, "one run, started once: {history:#?}");
        let seen: Vec<&str> = history
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::DuplicateTrigger { message_id } => message_id.as_deref(),
                _ => None,
            })
            .collect();
        assert_eq!(seen, duplicates, "{history:#?}");
        assert_eq!(events::run_result(&history), RunResult::Succeeded);
    }

    // The refused triggers are in the parking queue with their reasons, each delivered once.
    let parked = take_parked(&setup.prefix).await;
    let mut expected: Vec<(&str, &str)> = bad.iter().map(|(id, _, _, reason)| (*id, *reason)).collect();
    expected.push(("rejected-1", "extension"));
    assert_eq!(
        parked.len(),
        expected.len(),
        "parked: {:?}",
        parked.iter().map(|(_, p)| p.message_id().clone()).collect::<Vec<_>>()
    );
    for (id, reason) in expected {
        let (body, properties) = parked
            .iter()
            .find(|(_, p)| p.message_id().as_ref().map(|m| m.as_str()) == Some(id))
            .unwrap_or_else(|| panic!("{id} is not parked"));
        let error = header_text(properties, headers::ERROR);
        assert!(error.contains(reason), "{id}: {error}");
        assert_eq!(
            header_number(properties, headers::ATTEMPTS),
            1,
            "{id}: parked at its first delivery"
        );
        if id == "bad-size" {
            assert_eq!(body.len(), MAX_TRIGGER_BYTES + 1, "parked as received");
        }
        if id == "bad-type" {
            assert_eq!(
                properties.content_type().as_ref().map(|c| c.as_str()),
                Some("application/cloudevents+json")
            );
        }
    }
    let rejection_events: Vec<&Event> = rejection
        .iter()
        .filter(|e| matches!(e.kind, EventKind::TriggerRejected { .. }))
        .collect();
    assert_eq!(rejection_events.len(), 1, "{rejection:#?}");

    stop_workers(&mut workers).await;
    producer.close().await;
    bus.close().await;
    AmqpBus::delete_topology(&settings.amqp, &settings.delay_tiers())
        .await
        .expect("delete the test topology");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_azure_cannot_plan_just_now_is_put_off_and_admitted_later() {
    // No retries inside the client, so Batch's 503s reach the admitter.
    let setup = setup_with(SCALE, "retry = { max_attempts = 1 }").await;
    std::fs::write(setup.pipelines.join("tiny.toml"), TINY).expect("write the pipeline");
    setup
        .emu
        .set_faults("503:p=1,api=batch,path=supportedimages,times=2")
        .await;
    let (bus, settings) = test_bus(&setup.config).await;
    let config = setup.config.display().to_string();
    let mut workers = vec![Process::start(
        &setup.dir,
        "worker",
        &["worker", "--all-stages", "--config", &config],
        &[],
    )];
    let producer = Producer::connect(&setup.prefix).await;
    producer
        .publish(&plain_trigger("3.0.0"), "application/json", "later-1")
        .await;
    let run = run_id("tiny", "3.0.0");
    let (histories, _) = follow_runs(&bus, &[run], RUN_LIMIT, &workers).await;
    let history = &histories[&run];
    assert_eq!(events::run_result(history), RunResult::Succeeded, "{history:#?}");
    assert!(
        !history
            .iter()
            .any(|e| matches!(e.kind, EventKind::TriggerRejected { .. })),
        "{history:#?}"
    );
    stop_workers(&mut workers).await;
    let stderr = workers[0].stderr_text();
    assert_eq!(
        stderr.matches("trigger put off").count(),
        2,
        "each 503 put the trigger off once{}",
        workers[0].report()
    );
    assert!(take_parked(&setup.prefix).await.is_empty(), "nothing parked");

    producer.close().await;
    bus.close().await;
    AmqpBus::delete_topology(&settings.amqp, &settings.delay_tiers())
        .await
        .expect("delete the test topology");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_stops_at_its_next_step_and_its_history_names_what_it_created() {
    let setup = setup().await;
    let (bus, settings) = test_bus(&setup.config).await;
    let config = setup.config.display().to_string();
    let mut workers = vec![Process::start(
        &setup.dir,
        "worker",
        &["worker", "--all-stages", "--config", &config],
        &[],
    )];
    let run = setup.submit().await;

    // Replicating: the trunk waits on the replication between looks.
    wait_for_event(
        &bus,
        "replication under way",
        |e| e.run_id == run && e.stage == Stage::Replicate && matches!(e.kind, EventKind::Waiting { .. }),
        &workers,
    )
    .await;
    let run_text = run.to_string();
    let mut cancel = Process::start(&setup.dir, "cancel", &["cancel", &run_text, "--config", &config], &[]);
    assert_eq!(
        cancel.wait(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        cancel.report()
    );
    let stderr = cancel.stderr_text();
    assert!(stderr.contains("cancel requested"), "{}", cancel.report());

    // The trunk's stop: the snapshots' clean-up branch may stop at its own next step before it.
    let stopped = wait_for_event(
        &bus,
        "the trunk stopping",
        |e| e.run_id == run && e.kind == EventKind::Cancelled && e.branch == Branch::Trunk,
        &workers,
    )
    .await;
    assert_eq!((stopped.stage, &stopped.branch), (Stage::Replicate, &Branch::Trunk));
    // The worker stops, and once the broker has seen it go, whatever it held (a delivery in hand,
    // a delayed message its relay kept) is back on its queue. Every stage and delay queue empty
    // then means nothing of the run is left to take a step: the history and Azure below are
    // final. Had the stop not held, the trunk's next message would be left, or its steps in the
    // history.
    stop_workers(&mut workers).await;
    let left = work_left(&settings).await;
    assert!(left.is_empty(), "nothing is left to run after the stop: {left:?}");
    let history = history_now(&bus, run).await;
    let at = history
        .iter()
        .position(|e| e.kind == EventKind::Cancelled)
        .expect("the stop is in the history");
    let after: Vec<&Event> = history[at..]
        .iter()
        .filter(|e| e.kind != EventKind::Cancelled)
        .collect();
    assert!(after.is_empty(), "nothing runs after the stop: {after:#?}");
    assert!(
        !history
            .iter()
            .any(|e| e.stage >= Stage::PoolCreate || matches!(e.kind, EventKind::PoolCreated { .. })),
        "{history:#?}"
    );
    match events::run_result(&history) {
        RunResult::Cancelled { created } => {
            for kind in ["/snapshots/", "/images/", "/versions/"] {
                assert!(created.iter().any(|id| id.contains(kind)), "no {kind} in {created:#?}");
            }
        }
        other => panic!("{other:?}: {history:#?}"),
    }
    let token = setup.emu.batch_token().await;
    for (account, target) in [("sigrunweu", "render"), ("sigruneus", "sim")] {
        let url = format!(
            "{}/pools/nightly-ubuntu-{target}-{}?api-version={BATCH_API}",
            setup.emu.batch_url(account),
            VERSION.replace('.', "-")
        );
        assert_eq!(
            setup.emu.get(&url, &token).await.status,
            404,
            "pool {target} was not created"
        );
    }

    // Cancelling it again changes nothing; an unknown or malformed run id is bad input.
    let mut again = Process::start(&setup.dir, "again", &["cancel", &run_text, "--config", &config], &[]);
    assert_eq!(again.wait(Duration::from_secs(30)).await, Some(0), "{}", again.report());
    assert!(again.stderr_text().contains("already ended"));
    let unknown = Uuid::new_v4().to_string();
    for (name, id) in [("unknown", unknown.as_str()), ("malformed", "not-a-run")] {
        let mut cancel = Process::start(&setup.dir, name, &["cancel", id, "--config", &config], &[]);
        assert_eq!(
            cancel.wait(Duration::from_secs(30)).await,
            Some(2),
            "{}",
            cancel.report()
        );
    }
    let requests = history_now(&bus, run)
        .await
        .iter()
        .filter(|e| e.kind == EventKind::CancelRequested)
        .count();
    assert_eq!(requests, 1);

    bus.close().await;
    AmqpBus::delete_topology(&settings.amqp, &settings.delay_tiers())
        .await
        .expect("delete the test topology");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_runs_complete() {
    const RUNS: usize = 100;
    // Slow enough that a run lasts longer than admitting all of them takes (7–12 s here), so all
    // are in flight at once; fast enough for about 35 s of wall time.
    let setup = setup_scaled(TINY_SCALE).await;
    std::fs::write(setup.pipelines.join("tiny.toml"), TINY).expect("write the pipeline");
    let (bus, settings) = test_bus(&setup.config).await;
    let config = setup.config.display().to_string();
    let mut workers: Vec<Process> = (0..2)
        .map(|i| {
            Process::start(
                &setup.dir,
                &format!("worker{i}"),
                &["worker", "--all-stages", "--config", &config],
                &[],
            )
        })
        .collect();
    let producer = Producer::connect(&setup.prefix).await;
    let versions: Vec<String> = (0..RUNS).map(|i| format!("2.0.{i}")).collect();
    let began = Instant::now();
    for (i, version) in versions.iter().enumerate() {
        producer
            .publish(&plain_trigger(version), "application/json", &format!("t-{i}"))
            .await;
    }
    let runs: Vec<Uuid> = versions.iter().map(|v| run_id("tiny", v)).collect();
    let (histories, peak) = follow_runs(&bus, &runs, RUN_LIMIT, &workers).await;
    let wall = began.elapsed();
    let results: Vec<RunResult> = runs.iter().map(|r| events::run_result(&histories[r])).collect();
    let failed: Vec<&RunResult> = results.iter().filter(|r| **r != RunResult::Succeeded).collect();
    assert!(
        failed.is_empty(),
        "{} of {RUNS} runs did not succeed: {:?}",
        failed.len(),
        failed.first()
    );
    let events: usize = histories.values().map(Vec::len).sum();
    let started_at = |h: &Vec<Event>| {
        h.iter()
            .find(|e| matches!(e.kind, EventKind::RunStarted { .. }))
            .map(|e| e.at)
            .expect("started")
    };
    let first_start = histories.values().map(started_at).min().expect("runs");
    let last_start = histories.values().map(started_at).max().expect("runs");
    let shortest = histories
        .values()
        .map(|h| h.last().expect("events").at - started_at(h))
        .min()
        .expect("runs");
    eprintln!(
        "{RUNS} runs on {} workers: {:.1} s wall, all admitted within {:.1} s, shortest run {:.1} s, at \
         most {peak} in flight at once, {events} events",
        workers.len(),
        wall.as_secs_f64(),
        (last_start - first_start).as_seconds_f64(),
        shortest.as_seconds_f64(),
    );
    assert_eq!(peak, RUNS, "every run was in flight at once");
    // A sample of the pools on the Azure side.
    let token = setup.emu.batch_token().await;
    for version in [&versions[0], &versions[RUNS / 2], &versions[RUNS - 1]] {
        let url = format!(
            "{}/pools/tiny-small-{}?api-version={BATCH_API}",
            setup.emu.batch_url("sigrunweu"),
            version.replace('.', "-")
        );
        assert_eq!(setup.emu.get(&url, &token).await.status, 200, "pool of {version}");
    }

    stop_workers(&mut workers).await;
    producer.close().await;
    bus.close().await;
    AmqpBus::delete_topology(&settings.amqp, &settings.delay_tiers())
        .await
        .expect("delete the test topology");
}

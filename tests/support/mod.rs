//! What the worker-process test binaries share (`telemetry`, `recovery`, `broker_restart`): an
//! emulator plus a config that points real `sigrun` processes at it and at the broker under a
//! prefix of the test's own, the processes themselves ([`process`], shared with `tests/it/`:
//! output in files, bounded waits, signals, the metrics address they print, and `submit_run`),
//! plain HTTP probes of their endpoints, following a run through the events stream (reopening
//! the stream when the broker connection drops), and the broker as `rabbitmqctl` shows it
//! ([`broker`], shared with `tests/it/` too).
//! Each binary includes it with `mod support;` next to `#[path = "it/helpers.rs"] mod helpers;`.
//! [`rabbit`] starts private RabbitMQ nodes for the tests that stop or kill a broker.

#![allow(dead_code)]

pub mod broker;
pub mod process;
pub mod rabbit;
pub mod relay;

pub use process::{Process, run_id_printed, submit_run, try_submit};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sigrun::bus::BusError;
use sigrun::bus::amqp::{AmqpBus, StreamOffset};
use sigrun::config::Settings;
use sigrun::emulator::EmulatorOptions;
use sigrun::events::{self, Event, RunResult};
use uuid::Uuid;

use crate::helpers::{self, PIPELINE_APP, TENANT, TestEmulator};

pub const VERSION: &str = "2026.1126.3";
/// Emulated seconds per real second: the nightly run (about an hour of Azure time) takes ~10 s.
pub const SCALE: f64 = 400.0;
/// No run here should come near this.
pub const RUN_LIMIT: Duration = Duration::from_secs(180);

pub fn amqp_url() -> String {
    std::env::var("SIGRUN_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn broker_down_help(error: impl std::fmt::Display) -> String {
    format!(
        "RabbitMQ is not reachable at {} ({error}). Start it with `rabbitmq-server -detached` (or point \
         SIGRUN_TEST_AMQP_URL at a broker)",
        amqp_url()
    )
}

/// An emulator and a config file pointing the binary at it (azure mode) and at the broker under a
/// prefix of the test's own.
pub struct Setup {
    pub emu: TestEmulator,
    _dir: tempfile::TempDir,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub prefix: String,
}

/// Starts an emulator with `faults` (empty: none) and writes the config for the shared broker.
pub async fn setup(faults: &str) -> Setup {
    setup_on(faults, &amqp_url()).await
}

/// As [`setup`], for the broker at `url` (a private node of the test's own).
pub async fn setup_on(faults: &str, url: &str) -> Setup {
    setup_scaled_on(faults, url, SCALE).await
}

/// As [`setup_on`], with the emulator at `time_scale` emulated seconds per real second.
pub async fn setup_scaled_on(faults: &str, url: &str, time_scale: f64) -> Setup {
    let emu = helpers::start(EmulatorOptions {
        time_scale,
        faults: faults.to_string(),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let prefix = format!("sigrun-test-{}", &Uuid::new_v4().simple().to_string()[..12]);
    let mut setup = Setup {
        emu,
        dir: dir.path().to_path_buf(),
        _dir: dir,
        config: PathBuf::new(),
        prefix,
    };
    setup.config = setup.write_config("sigrun.toml", url, PIPELINE_APP.1);
    setup
}

impl Setup {
    /// Writes a config like the default one, with another broker URL or client secret.
    pub fn write_config(&self, name: &str, amqp_url: &str, client_secret: &str) -> PathBuf {
        let info = self.emu.emulator.info();
        let text = format!(
            r#"[azure]
mode = "azure"
time_scale = {scale:?}

[azure.client]
credential = {{ kind = "client_secret", tenant_id = "{TENANT}", client_id = "{client}", client_secret = "{client_secret}" }}
cloud = {{ authority_host = "{base}", resource_manager = "{base}" }}
extra_ca_cert = "{ca}"

[runtime]
shutdown_grace_ms = 5000

[amqp]
url = "{amqp_url}"
prefix = "{prefix}"
"#,
            scale = info.time_scale,
            client = PIPELINE_APP.0,
            base = info.base_url,
            ca = info.ca_cert.as_deref().expect("the emulator serves TLS"),
            prefix = self.prefix,
        );
        let path = self.dir.join(name);
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// A worker process on this setup's config with `args` after `worker --config FILE`, serving
    /// its endpoints on a free port.
    pub fn worker(&self, name: &str, args: &[&str]) -> Process {
        self.worker_with_config(name, &self.config, args)
    }

    pub fn worker_with_config(&self, name: &str, config: &Path, args: &[&str]) -> Process {
        let config = config.display().to_string();
        let mut all = vec!["worker", "--config", config.as_str(), "--metrics-listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        Process::start(&self.dir, name, &all, &[])
    }

    /// `sigrun submit` of the nightly pipeline; returns the run id it prints.
    pub async fn submit(&self) -> Uuid {
        self.submit_version(VERSION).await
    }

    /// `sigrun submit` of the nightly pipeline at `version`; returns the run id it prints.
    pub async fn submit_version(&self, version: &str) -> Uuid {
        submit_run(&self.dir, &self.config, version, &[]).await
    }

    /// `sigrun submit` of the nightly pipeline at `version`, up to `tries` times while it exits 1
    /// (Azure unreadable just now: an injected fault outlasting the client's retries), as a
    /// producer would; returns the run id it prints.
    pub async fn submit_version_retrying(&self, version: &str, tries: usize) -> Uuid {
        for _ in 1..tries {
            let (code, submit) = try_submit(&self.dir, &self.config, version, &[]).await;
            if code == Some(0) {
                return run_id_printed(&submit);
            }
            assert_eq!(code, Some(1), "submit fails only on Azure{}", submit.report());
        }
        self.submit_version(version).await
    }
}

/// One HTTP answer: status, content type, body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// `GET http://{addr}{path}` with a short timeout; `None` when nothing answered.
pub async fn probe(addr: SocketAddr, path: &str) -> Option<Answer> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(8))
        .build()
        .expect("client");
    let reply = client.get(format!("http://{addr}{path}")).send().await.ok()?;
    let status = reply.status().as_u16();
    let content_type = reply
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = reply.text().await.ok()?;
    Some(Answer {
        status,
        content_type,
        body,
    })
}

/// Polls `path` until it answers `status`; returns the time it took. Panics after `limit`.
pub async fn wait_for_status(addr: SocketAddr, path: &str, status: u16, limit: Duration, what: &str) -> Duration {
    let began = Instant::now();
    let mut last = None;
    while began.elapsed() < limit {
        let answer = probe(addr, path).await;
        if answer.as_ref().is_some_and(|a| a.status == status) {
            return began.elapsed();
        }
        last = answer;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: {path} did not answer {status} within {limit:?}; last answer: {last:?}");
}

/// The value of one sample (`name{labels}` exactly as rendered, or a bare name) in a scrape.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// A bus on the config's prefix (reading events, deleting the topology at the end).
pub async fn test_bus(config: &Path) -> (AmqpBus, Settings) {
    let settings = Settings::load(Some(config)).expect("the test config loads");
    match AmqpBus::connect(settings.amqp.clone(), settings.delay_tiers()).await {
        Ok(bus) => (bus, settings),
        Err(error) => panic!("{}", broker_down_help(error)),
    }
}

/// Closes the bus and deletes the test's topology.
pub async fn delete_topology(bus: AmqpBus, settings: &Settings) {
    bus.close().await;
    AmqpBus::delete_topology(&settings.amqp, &settings.delay_tiers())
        .await
        .expect("delete the test topology");
}

/// Follows the events stream from the start until the run has ended (bounded by [`RUN_LIMIT`]).
/// When the stream breaks (the broker connection dropped), it is opened again once the bus has
/// reconnected and read from the start again.
pub async fn wait_for_run(bus: &AmqpBus, run_id: Uuid, workers: &[Process]) -> (RunResult, Vec<Event>) {
    let deadline = tokio::time::Instant::now() + RUN_LIMIT;
    let logs = || workers.iter().map(Process::report).collect::<String>();
    let mut history = Vec::new();
    loop {
        let opened = tokio::time::timeout_at(deadline, bus.read_events(StreamOffset::First)).await;
        let mut reader = match opened {
            Err(_) => panic!(
                "run {run_id} did not end within {RUN_LIMIT:?}; events: {history:#?}{}",
                logs()
            ),
            Ok(Err(_)) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok(Ok(reader)) => reader,
        };
        history.clear();
        loop {
            let next = tokio::time::timeout_at(deadline, reader.next()).await;
            let streamed = match next {
                Err(_) => panic!(
                    "run {run_id} did not end within {RUN_LIMIT:?}; events: {history:#?}{}",
                    logs()
                ),
                Ok(Some(Ok(streamed))) => streamed,
                Ok(Some(Err(BusError::Malformed(error)))) => panic!("an event does not parse: {error}"),
                // The connection dropped: read again from the start on the next one.
                Ok(Some(Err(_)) | None) => break,
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
}

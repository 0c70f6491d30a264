//! Stage worker processes for the benches that run sigrun as it is deployed (`amqp_waiting`,
//! `concurrent`): a `sigrun worker` per stage with its output in a file, its metrics read over
//! HTTP; the broker's own process; and the events stream read by a task of its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sigrun::bus::amqp::{AmqpBus, StreamOffset};
use sigrun::emulator::Emulator;
use sigrun::events::Event;
use sigrun::model::envelope::Stage;
use tokio::sync::mpsc;

/// The events stream from its start, read by a task of its own (a reader's `next` must not be
/// cancelled half-way: it acks what it took) and handed over through a channel.
pub async fn follow_events(bus: &AmqpBus) -> mpsc::UnboundedReceiver<Event> {
    let mut reader = bus
        .read_events(StreamOffset::First)
        .await
        .expect("read the events stream");
    let (events, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(item) = reader.next().await {
            let streamed = match item {
                Ok(streamed) => streamed,
                // The bench tears the broker connection down at its end: the reading ends too.
                Err(sigrun::bus::BusError::Connection(_)) => break,
                Err(error) => panic!("an event in the stream does not parse: {error}"),
            };
            if events.send(streamed.event).is_err() {
                break;
            }
        }
        reader.close().await;
    });
    received
}

/// A `sigrun worker` process for one stage (or all six), its output in files.
pub struct Worker {
    /// `None`: all six stages.
    pub stage: Option<Stage>,
    child: Child,
    stderr: PathBuf,
}

/// The command a worker runs as: the built binary, or under the profiler
/// `SIGRUN_BENCH_WORKER_WRAPPER` names for workers of `SIGRUN_BENCH_WRAP_STAGE` (`all`: every one),
/// e.g. `heaptrack -o /tmp/ht-%s` (`%s`: the stage).
fn worker_command(name: &str) -> Command {
    let binary = env!("CARGO_BIN_EXE_sigrun");
    let wrapper = std::env::var("SIGRUN_BENCH_WORKER_WRAPPER").unwrap_or_default();
    let wrapped = std::env::var("SIGRUN_BENCH_WRAP_STAGE").is_ok_and(|s| s == name || s == "all");
    let mut words = wrapper.split_whitespace().map(|w| w.replace("%s", name));
    match words.next().filter(|_| wrapped) {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(words).arg(binary);
            command
        }
        None => Command::new(binary),
    }
}

/// `SIGRUN_BENCH_WORKERS`, the layout of sigrun's workers: `one` (the default: one `sigrun worker
/// --all-stages`, as `deploy/` runs them at rest) or `all:N` (N of them, as KEDA scales them out):
/// `Some(N)`; `six` (a process per stage): `None`.
pub fn layout() -> Option<usize> {
    let text = std::env::var("SIGRUN_BENCH_WORKERS").unwrap_or_else(|_| "one".to_string());
    match text.as_str() {
        "six" => None,
        "one" => Some(1),
        _ => match text.strip_prefix("all:").and_then(|n| n.parse().ok()) {
            Some(n) if n > 0 => Some(n),
            _ => panic!("SIGRUN_BENCH_WORKERS is `one`, `all:N` (N > 0) or `six`, not `{text}`"),
        },
    }
}

/// A `layout()` in words, for a bench's header.
pub fn describe_layout(replicas: Option<usize>) -> String {
    match replicas {
        Some(n) => format!("{n} process(es) of all six stages"),
        None => "one process per stage".to_string(),
    }
}

impl Worker {
    /// The workers of a `layout()`, each consuming once started: `replicas` all-stages ones, or
    /// one for each stage (`None`).
    pub async fn start_layout(replicas: Option<usize>, config: &Path, dir: &Path) -> Vec<Worker> {
        let mut workers: Vec<Worker> = match replicas {
            Some(replicas) => (0..replicas)
                .map(|replica| Worker::start_replica(None, replica, config, dir))
                .collect(),
            None => Stage::ALL
                .iter()
                .map(|stage| Worker::start(Some(*stage), config, dir))
                .collect(),
        };
        for worker in &mut workers {
            worker.wait_consuming().await;
        }
        workers
    }

    /// Whether it consumes `stage`.
    pub fn consumes(&self, stage: Stage) -> bool {
        self.stage.is_none_or(|own| own == stage)
    }

    /// A worker of `stage`, or of all six for `None`.
    pub fn start(stage: Option<Stage>, config: &Path, dir: &Path) -> Worker {
        Worker::start_replica(stage, 0, config, dir)
    }

    /// The same, for one of several workers of the same stages (`replica` names its log file).
    pub fn start_replica(stage: Option<Stage>, replica: usize, config: &Path, dir: &Path) -> Worker {
        let consumes = match stage {
            Some(stage) => vec!["--stage", stage.as_str()],
            None => vec!["--all-stages"],
        };
        let name = stage.map_or("all", Stage::as_str);
        let stderr = dir.join(format!("worker-{name}-{replica}.err"));
        let child = worker_command(name)
            .arg("worker")
            .args(consumes)
            .args(["--metrics-listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .current_dir(super::root())
            .env_remove("SIGRUN_LOG")
            .env_remove("SIGRUN__AMQP__URL")
            .env_remove("SIGRUN__AMQP__PREFIX")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("sigrun worker starts");
        Worker { stage, child, stderr }
    }

    /// Its stage's name, or `all`.
    pub fn name(&self) -> &'static str {
        self.stage.map_or("all", Stage::as_str)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its messages of `stage` handled so far, by outcome (`sigrun_messages_handled_total`).
    pub async fn handled(&self, stage: Stage) -> BTreeMap<String, f64> {
        let stage = stage.as_str();
        self.handled_by_stage()
            .await
            .into_iter()
            .filter(|((s, _), _)| s == stage)
            .map(|((_, outcome), n)| (outcome, n))
            .collect()
    }

    /// Its messages handled so far, by stage and outcome (`sigrun_messages_handled_total`).
    pub async fn handled_by_stage(&self) -> BTreeMap<(String, String), f64> {
        let output = self.output();
        let Some(address) = output
            .lines()
            .find_map(|l| l.split("metrics on http://").nth(1))
            .and_then(|rest| rest.split('/').next())
        else {
            panic!("worker {} names no metrics address:\n{output}", self.name());
        };
        let text = reqwest::get(format!("http://{address}/metrics"))
            .await
            .and_then(|answer| answer.error_for_status())
            .expect("the worker's metrics")
            .text()
            .await
            .expect("metrics text");
        let label = |line: &str, name: &str| {
            let value = line.split(&format!("{name}=\"")).nth(1)?.split('"').next()?;
            Some(value.to_string())
        };
        text.lines()
            .filter(|l| l.starts_with("sigrun_messages_handled_total{"))
            .filter_map(|l| {
                let value = l.rsplit(' ').next()?.parse().ok()?;
                Some(((label(l, "stage")?, label(l, "outcome")?), value))
            })
            .collect()
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Until it says it consumes its stage.
    pub async fn wait_consuming(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.output().contains("sigrun worker: consuming") {
            self.check_alive();
            assert!(
                Instant::now() < deadline,
                "worker {} did not start consuming:\n{}",
                self.name(),
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn check_alive(&mut self) {
        if let Some(status) = self.child.try_wait().expect("look at the worker") {
            panic!("worker {} exited ({status}):\n{}", self.name(), self.output());
        }
    }

    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "SIGTERM to worker {}", self.name());
    }

    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the worker") {
                return status.code();
            }
            if Instant::now() > deadline {
                eprintln!(
                    "worker {} did not stop within {limit:?}:\n{}",
                    self.name(),
                    self.output()
                );
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The broker's Erlang VM: `SIGRUN_BENCH_BROKER_PID` when set (a private node's), else the
/// `beam.smp` here that boots `rabbit` (`rabbitmqctl` runs one of its own), if readable.
pub fn broker_pid() -> Option<u32> {
    if let Ok(pid) = std::env::var("SIGRUN_BENCH_BROKER_PID") {
        return Some(pid.parse().expect("SIGRUN_BENCH_BROKER_PID is a process id"));
    }
    let output = Command::new("pgrep").args(["-x", "beam.smp"]).output().ok()?;
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmdline| String::from_utf8_lossy(&cmdline).contains("rabbit\0boot"))
                .unwrap_or(false)
                && std::fs::metadata(format!("/proc/{pid}/stat")).is_ok()
        })
}

/// A config for workers and `sigrun submit`: azure mode against `emulator` at `time_scale` (as
/// `tests/it/workers.rs` writes it), the broker under `prefix`, and `extra` TOML appended.
pub fn write_config(emulator: &Emulator, dir: &Path, prefix: &str, time_scale: f64, extra: &str) -> PathBuf {
    let info = emulator.info();
    let text = format!(
        r#"[azure]
mode = "azure"
time_scale = {time_scale:?}

[azure.client]
credential = {{ kind = "client_secret", tenant_id = "{tenant}", client_id = "{client}", client_secret = "{secret}" }}
cloud = {{ authority_host = "{base}", resource_manager = "{base}" }}
extra_ca_cert = "{ca}"

[runtime]
shutdown_grace_ms = 5000

[amqp]
url = "{url}"
prefix = "{prefix}"
event_max_age = "1h"

{extra}"#,
        tenant = super::TENANT,
        client = super::CLIENT_ID,
        secret = super::CLIENT_SECRET,
        base = info.base_url,
        ca = info.ca_cert.as_deref().expect("the emulator serves TLS"),
        url = super::amqp_url(),
    );
    let path = dir.join("sigrun.toml");
    std::fs::write(&path, text).expect("write the workers' config");
    path
}

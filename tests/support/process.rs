//! A `sigrun` process of the built binary, as every test binary that runs real processes starts it:
//! from the repository root, its output in files, with bounded waits, signals and the metrics
//! address it prints; and [`submit_run`], the one way a test submits a run and learns its id.
//! Shared by `tests/it/` (`#[path]`-included from `it/main.rs`) and, through
//! `support`, by the worker-process binaries.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

/// The pipeline the tests submit, relative to the repository root.
pub const NIGHTLY: &str = "pipelines/nightly-ubuntu.toml";

/// A `sigrun` process started from the repository root, its output in files.
pub struct Process {
    pub command: String,
    pub child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Process {
    /// Starts `sigrun ARGS` with `env` set; its output goes to `{dir}/{name}.out` and `.err`. The
    /// variables that would point it elsewhere (log filter, broker, prefix, metrics address) are
    /// removed from what it inherits.
    pub fn start(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
        let (stdout, stderr) = (dir.join(format!("{name}.out")), dir.join(format!("{name}.err")));
        let mut command = Command::new(env!("CARGO_BIN_EXE_sigrun"));
        command
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("SIGRUN_LOG")
            .env_remove("SIGRUN__AMQP__URL")
            .env_remove("SIGRUN__AMQP__PREFIX")
            .env_remove("SIGRUN__TELEMETRY__LISTEN")
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

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The command line and both outputs, for failure messages.
    pub fn report(&self) -> String {
        format!(
            "\n=== {}\n=== stdout\n{}\n=== stderr\n{}\n===",
            self.command,
            self.stdout_text(),
            self.stderr_text()
        )
    }

    /// Waits (bounded, without blocking the runtime that serves the emulator) for the exit code.
    pub async fn wait(&mut self, limit: Duration) -> Option<i32> {
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

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} {}", self.child.id());
    }

    /// The address of the metrics server, from the line the process prints when it listens.
    pub async fn metrics_addr(&mut self) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let stderr = self.stderr_text();
            let found = stderr.lines().find_map(|line| {
                let rest = line.split_once("metrics on http://")?.1;
                rest.split_once("/metrics")?.0.parse::<SocketAddr>().ok()
            });
            if let Some(addr) = found {
                return addr;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before serving metrics{}",
                    self.command,
                    self.report()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} never said where its metrics are{}",
                self.command,
                self.report()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then exit 0 within 20 s.
    pub async fn stop(&mut self) {
        self.signal("TERM");
        let code = self.wait(Duration::from_secs(20)).await;
        assert_eq!(code, Some(0), "a worker exits 0 on SIGTERM{}", self.report());
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

/// `sigrun submit` of the nightly pipeline at `version` with `config` (and `env` set), to its end:
/// the exit code and the process. Each submit has output files of its own, so several (even of
/// one version) may run at once.
pub async fn try_submit(dir: &Path, config: &Path, version: &str, env: &[(&str, &str)]) -> (Option<i32>, Process) {
    let config = config.display().to_string();
    let name = format!("submit-{version}-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let args = ["submit", NIGHTLY, "--version", version, "--config", &config];
    let mut submit = Process::start(dir, &name, &args, env);
    (submit.wait(Duration::from_secs(60)).await, submit)
}

/// As [`try_submit`], which must exit 0; returns the run id it printed.
pub async fn submit_run(dir: &Path, config: &Path, version: &str, env: &[(&str, &str)]) -> Uuid {
    let (code, submit) = try_submit(dir, config, version, env).await;
    assert_eq!(code, Some(0), "submit should exit 0{}", submit.report());
    run_id_printed(&submit)
}

/// `sigrun submit SPEC --config CONFIG` (the version the spec's scheme resolves), which must exit
/// 0; returns the run id it printed.
pub async fn submit_spec(dir: &Path, spec: &str, config: &str) -> Uuid {
    let mut submit = Process::start(dir, "submit", &["submit", spec, "--config", config], &[]);
    assert_eq!(
        submit.wait(Duration::from_secs(60)).await,
        Some(0),
        "{}",
        submit.report()
    );
    run_id_printed(&submit)
}

/// The run id a successful submit printed, alone on stdout.
pub fn run_id_printed(submit: &Process) -> Uuid {
    Uuid::parse_str(submit.stdout_text().trim())
        .unwrap_or_else(|_| panic!("submit should print the run id alone on stdout{}", submit.report()))
}

//! Private RabbitMQ nodes for the tests that stop, kill or restart a broker: each runs from a
//! temporary directory of its own, on ports of its own, with a cookie of its own (so no command
//! here can reach the shared broker at 127.0.0.1:5672), started and driven by
//! `tests/support/rabbit-node.sh` (the Debian packages' scripts with every path and port set).
//! Dropping a node kills it and removes its directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// One private node.
pub struct RabbitNode {
    pub name: String,
    pub amqp_port: u16,
    dir: PathBuf,
    _temp: tempfile::TempDir,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/rabbit-node.sh")
}

/// A port nothing listens on now (the kernel's choice, released at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Runs the script; panics with its output when it fails.
fn run(args: &[&str]) -> String {
    try_run(args).unwrap_or_else(|failed| panic!("{failed}"))
}

/// Runs the script: its output, or what failed with it.
fn try_run(args: &[&str]) -> Result<String, String> {
    let output = Command::new(script())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("rabbit-node.sh cannot run ({e}); it needs bash and rabbitmq-server"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!("rabbit-node.sh {} failed: {text}", args.join(" ")))
    }
}

impl RabbitNode {
    /// Starts a node `{name}@localhost` and waits until it accepts AMQP connections.
    /// Starts a node named `name`. One that does not boot (seen once in many CI runs: the VM gone
    /// before it wrote a log line, a port taken between its pick and its bind, say) is tried once
    /// more, on fresh ports in a fresh directory; the first failure is printed either way.
    pub fn start(name: &str) -> RabbitNode {
        match RabbitNode::try_start(name) {
            Ok(node) => node,
            Err(first) => {
                eprintln!("private RabbitMQ {name} did not start; once more on other ports. {first}");
                RabbitNode::try_start(name).unwrap_or_else(|second| panic!("{second}\n(the first try: {first})"))
            }
        }
    }

    fn try_start(name: &str) -> Result<RabbitNode, String> {
        let temp = tempfile::Builder::new()
            .prefix("sigrun-rabbit-")
            .tempdir()
            .expect("a temp dir");
        let dir = temp.path().join("node");
        let (amqp, dist) = (free_port(), free_port());
        let full = format!("{name}@localhost");
        let began = Instant::now();
        try_run(&[
            "start",
            &full,
            &amqp.to_string(),
            &dist.to_string(),
            dir.to_str().expect("a UTF-8 path"),
        ])?;
        eprintln!("private RabbitMQ {full} on {amqp} up in {:?}", began.elapsed());
        Ok(RabbitNode {
            name: full,
            amqp_port: amqp,
            dir,
            _temp: temp,
        })
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    fn dir(&self) -> &str {
        self.dir.to_str().expect("a UTF-8 path")
    }

    /// Stops the node cleanly (returns once it has exited).
    pub fn stop(&self) {
        run(&["stop", self.dir()]);
    }

    /// Kills the node's VM with SIGKILL.
    pub fn kill(&self) {
        run(&["kill", self.dir()]);
    }

    /// Starts the node again on its data (durable queues and messages come back).
    pub fn start_again(&self) -> Duration {
        let began = Instant::now();
        run(&["start", self.dir()]);
        began.elapsed()
    }

    /// `rabbitmqctl close_all_connections` on this node.
    pub fn close_all_connections(&self, why: &str) {
        run(&["close-conns", self.dir(), why]);
    }

    /// Joins the cluster `seed` belongs to (resets this node first).
    pub fn join(&self, seed: &RabbitNode) {
        run(&["cluster-join", self.dir(), seed.dir()]);
    }

    /// `rabbitmqctl -n NODE ARGS` against this node.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut all = vec!["ctl", self.dir()];
        all.extend_from_slice(args);
        run(&all)
    }

    /// What each queue holds and where its leader is, as this node sees it (for a stalled test's
    /// report; never panics).
    pub fn queue_report(&self) -> String {
        let output = Command::new(script())
            .args(["ctl", self.dir(), "list_queues", "name", "type", "messages_ready"])
            .args(["messages_unacknowledged", "messages", "leader", "online"])
            .output();
        match output {
            Ok(o) => format!(
                "{}: {}{}",
                self.name,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("{}: rabbitmqctl did not run: {e}", self.name),
        }
    }

    /// Whether the node's VM runs.
    pub fn running(&self) -> bool {
        Command::new(script())
            .args(["running", self.dir()])
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        let _ = Command::new(script()).args(["destroy", self.dir()]).output();
    }
}

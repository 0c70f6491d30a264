//! The shared broker as `rabbitmqctl` shows it: the consumers of its queues, read from each
//! queue's own state (so they change as soon as a consumer comes or goes), and unacknowledged
//! deliveries, from the queues' statistics. Shared by `tests/it/` (`#[path]`-included from
//! `it/main.rs`) and, through `support`, by the worker-process binaries.

#![allow(dead_code)]

use std::process::Command;

/// Runs `rabbitmqctl ARGS` and returns its stdout; panics with its stderr when it fails.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("rabbitmqctl cannot run ({e}); it comes with the rabbitmq-server package"));
    assert!(
        output.status.success(),
        "rabbitmqctl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Unacknowledged deliveries of a queue (0 when the queue is not listed), as the broker's
/// statistics say (refreshed every 5 s). Runs `rabbitmqctl` off the async runtime.
pub async fn unacked(queue: &str) -> u64 {
    let queue = queue.to_string();
    tokio::task::spawn_blocking(move || {
        rabbitmqctl(&[
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_unacknowledged",
        ])
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next()? == queue).then(|| fields.next()?.parse().ok()).flatten()
        })
        .unwrap_or(0)
    })
    .await
    .expect("rabbitmqctl list_queues")
}

/// Every consumer of the broker's queues as (queue, active): whether it is the one a
/// single-active-consumer queue delivers to (the others wait their turn). A quorum queue unlists a
/// consumer whose channel closed in the same step that puts back what it held. Runs `rabbitmqctl`
/// off the async runtime.
pub async fn consumers() -> Vec<(String, bool)> {
    tokio::task::spawn_blocking(|| {
        rabbitmqctl(&["list_consumers", "-q", "--no-table-headers", "queue_name", "active"])
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                Some((fields.next()?.to_string(), fields.next()? == "true"))
            })
            .collect()
    })
    .await
    .expect("rabbitmqctl list_consumers")
}

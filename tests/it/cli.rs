//! The `sigrun` binary itself: its help, the emulator's start-up line and clean exit on SIGTERM
//! (its temporary TLS directory gone, a state dir kept), a run stopped by a signal, and the errors
//! it gives for bad input.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sigrun() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sigrun"))
}

#[test]
fn help_lists_the_subcommands() {
    let out = sigrun().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("emulator"), "{text}");
}

/// The binary allocates with jemalloc configured as `src/main.rs` says: its statistics, printed at
/// exit on request, show the one arena, the thread caches on and the decay times (a renamed
/// configuration symbol would leave jemalloc's defaults, and a lost `#[global_allocator]` would
/// print nothing).
#[test]
fn the_binary_allocates_with_jemalloc_and_its_settings() {
    let out = sigrun()
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stats = String::from_utf8_lossy(&out.stderr);
    let options = [
        "opt.narenas: 1",
        "opt.tcache: true",
        "opt.dirty_decay_ms: 1000",
        "opt.muzzy_decay_ms: 0",
    ];
    for option in options {
        assert!(
            stats.contains(option),
            "{option} missing from jemalloc's statistics:\n{stats}"
        );
    }
}

#[tokio::test]
async fn emulator_prints_one_json_line_serves_and_exits_zero_on_sigterm() {
    let mut child = sigrun()
        .args([
            "emulator",
            "--listen",
            "127.0.0.1:0",
            "--time-scale",
            "3600",
            "--seed",
            "7",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let info = start_up_line(&mut child);
    for key in [
        "base_url",
        "ca_cert",
        "tenant_id",
        "subscription_ids",
        "batch_accounts",
        "control_url",
    ] {
        assert!(info.get(key).is_some(), "start-up line lacks {key}: {info}");
    }
    let base = info["base_url"].as_str().unwrap();
    assert!(base.starts_with("https://127.0.0.1:"));
    assert!(info["batch_accounts"]["sigrunweu"].as_str().unwrap().starts_with(base));

    let pem = std::fs::read(info["ca_cert"].as_str().unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).unwrap())
        .build()
        .unwrap();
    let clock: serde_json::Value = client
        .get(format!("{}/clock", info["control_url"].as_str().unwrap()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(clock["time_scale"], 3600.0);

    let exit = stop(&mut child, "-TERM");
    assert!(exit.success(), "exit status {exit:?}");
    let tls_dir = Path::new(info["ca_cert"].as_str().unwrap()).parent().unwrap();
    assert!(
        !tls_dir.exists(),
        "the emulator left its temporary TLS directory (private key included) at {}",
        tls_dir.display()
    );
}

/// Stops `child` with `signal` and waits (at most 10 s) for its exit status.
fn stop(child: &mut std::process::Child, signal: &str) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            return exit;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no exit 10 s after {signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first line `child` prints, as JSON.
fn start_up_line(child: &mut std::process::Child) -> serde_json::Value {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("start-up line {line:?} is not JSON: {e}"))
}

#[test]
fn an_emulator_with_a_state_dir_keeps_its_tls_identity_there_after_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = sigrun()
        .args(["emulator", "--state-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let info = start_up_line(&mut child);
    let ca = PathBuf::from(info["ca_cert"].as_str().unwrap());
    assert!(ca.starts_with(dir.path()), "{}", ca.display());
    assert!(stop(&mut child, "-INT").success());
    assert!(ca.exists(), "the state dir lost its CA certificate");
}

/// A harness that stops the emulator the moment it says it is up must still get a proper stop:
/// the handlers are in place before the start-up line is written.
#[test]
fn a_signal_the_moment_the_start_up_line_appears_still_stops_it_cleanly() {
    for signal in ["-TERM", "-INT", "-TERM", "-INT", "-TERM"] {
        let mut child = sigrun()
            .arg("emulator")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let info = start_up_line(&mut child);
        let exit = stop(&mut child, signal);
        assert!(exit.success(), "{signal} right after start-up: {exit:?}");
        let tls_dir = PathBuf::from(info["ca_cert"].as_str().unwrap());
        let tls_dir = tls_dir.parent().unwrap();
        assert!(!tls_dir.exists(), "{signal} left {}", tls_dir.display());
    }
}

#[test]
fn a_run_stopped_by_sigterm_exits_130_and_leaves_nothing_in_the_temp_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/nightly-ubuntu.toml");
    let mut child = sigrun()
        .arg("run")
        .arg(&pipeline)
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The run announces itself once its emulator is up and the plan is made.
    // Read stderr to its end on a thread of its own: a closed pipe would fail the run's next line.
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (announced, announcement) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in stderr.lines().map_while(Result::ok) {
            if line.starts_with("run ") {
                let _ = announced.send(());
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    announcement
        .recv_timeout(Duration::from_secs(60))
        .expect("the run announced itself within a minute");
    let exit = stop(&mut child, "-TERM");
    let said = reader.join().unwrap();
    assert_eq!(exit.code(), Some(130), "{exit:?}: {said}");
    assert!(said.contains("interrupted"), "{said}");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left in the temp folder: {left:?}");
}

#[test]
fn bad_fault_spec_and_bad_world_are_named() {
    let out = sigrun().args(["emulator", "--faults", "429:p=7"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("429:p=7") && err.contains("between 0 and 1"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let world = dir.path().join("world.toml");
    std::fs::write(&world, "[[tenants]]\nid = \"t\"\ncolour = \"blue\"\n").unwrap();
    let out = sigrun().args(["emulator", "--world"]).arg(&world).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("world.toml") && err.contains("colour"), "{err}");
}

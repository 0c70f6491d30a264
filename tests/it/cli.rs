//! The `sigrun` binary itself: its help, the emulator's start-up line and clean exit on SIGTERM,
//! and the errors it gives for bad input.

use std::io::{BufRead, BufReader};
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
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&line).expect("start-up line is JSON");
    for key in [
        "base_url",
        "ca_cert",
        "tenant_id",
        "subscription_ids",
        "batch_accounts",
        "control_url",
    ] {
        assert!(info.get(key).is_some(), "start-up line lacks {key}: {line}");
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

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "emulator did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "exit status {exit:?}");
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

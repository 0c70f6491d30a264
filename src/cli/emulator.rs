//! `sigrun emulator`: starts the Azure emulator, prints one JSON line saying where it is, and serves
//! until SIGINT or SIGTERM.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::signals::StopSignals;
use crate::emulator::{Emulator, EmulatorOptions, World};

#[derive(Debug, Args)]
pub struct EmulatorArgs {
    /// Address to listen on; port 0 picks a free port (read it from the start-up line).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// World file (TOML) seeding tenants, subscriptions, identities, VMs and Batch accounts.
    #[arg(long, value_name = "FILE")]
    pub world: Option<PathBuf>,
    /// Emulated seconds per real second (3600 = an hour per second).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Seed for durations and injected faults.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fault plan, e.g. `429:p=0.1,retry_after=2;reset:p=0.05;replication-fail:region=eastus`.
    #[arg(long, default_value = "")]
    pub faults: String,
    /// Keep state (and the TLS identity) here so it survives a restart.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Serve plain HTTP instead of HTTPS (Azure SDK credentials refuse a non-https authority).
    #[arg(long)]
    pub plain_http: bool,
    /// Serve every request: no ARM request budget (token buckets of 250 reads, 200 writes and 200
    /// deletes, refilled 25, 10 and 10 a second of emulated time, per subscription and principal).
    #[arg(long)]
    pub unlimited_requests: bool,
}

pub async fn run(args: EmulatorArgs) -> anyhow::Result<()> {
    let mut stop = StopSignals::install()?;
    let world = match &args.world {
        Some(path) => World::load(path)?,
        None => World::default_world(),
    };
    let emulator = Emulator::start(EmulatorOptions {
        listen: args.listen,
        world,
        time_scale: args.time_scale,
        seed: args.seed,
        faults: args.faults,
        state_dir: args.state_dir,
        plain_http: args.plain_http,
        budgets: (!args.unlimited_requests).then(crate::emulator::budget::Limits::arm),
    })
    .await?;
    let line = serde_json::to_string(emulator.info())?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").context("writing the start-up line")?;
        out.flush()?;
    }
    stop.wait().await;
    tracing::info!("emulator stopping");
    emulator.shutdown().await;
    Ok(())
}

//! The command line: argument parsing with clap and one module per subcommand. This is the only
//! layer that wires the library's parts together and the only one that uses `anyhow`.

mod emulator;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "sigrun",
    version,
    about = "Custom VM images into Azure Batch pools, as a staged, queue-driven pipeline"
)]
pub struct Cli {
    /// Log filter (tracing's env-filter syntax), e.g. `info` or `sigrun=debug`.
    #[arg(long, global = true, env = "SIGRUN_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the Azure emulator (AAD, ARM compute and galleries, Batch) until SIGINT/SIGTERM.
    Emulator(emulator::EmulatorArgs),
}

/// Runs a parsed command line to completion.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Emulator(args) => emulator::run(args).await,
    }
}

/// Logs go to stderr so stdout stays machine-readable.
pub fn init_logging(filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

//! The command line: argument parsing with clap and one module per subcommand. This is the only
//! layer that wires the library's parts together and the only one that uses `anyhow`.
//!
//! Exit codes: 0 success, 1 a run that failed (or partly failed), 2 bad input (a spec, a setting
//! or a rule the pipeline would break) — in which case nothing was created.

mod cancel;
mod dev;
mod dlq;
mod emulator;
mod endpoints;
mod history;
mod logging;
mod plan_view;
mod prune;
mod run;
mod session;
mod signals;
mod status;
mod submit;
mod ui;
mod validate;
mod watch;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use logging::{LogFormat, init_logging};

#[derive(Debug, Parser)]
#[command(
    name = "sigrun",
    version,
    about = "Custom VM images into Azure Batch pools, as a staged, queue-driven pipeline"
)]
pub struct Cli {
    /// Log filter (tracing's env-filter syntax), e.g. `warn` or `sigrun=debug`.
    #[arg(long, global = true, env = "SIGRUN_LOG", default_value = "warn")]
    pub log: String,
    /// Log lines as text for people (`human`) or one JSON object per line (`json`), with the
    /// fields of the spans they were logged in (a run's `run_id`, `pipeline`, `stage`, `trace_id`)
    /// at the top level. Logs go to stderr.
    #[arg(long, global = true, env = "SIGRUN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a whole pipeline in this process: all six stages on an in-process bus (by default
    /// against the built-in Azure emulator).
    Run(run::RunArgs),
    /// Parse a pipeline and run every preflight check, creating nothing; print the plan.
    Validate(validate::ValidateArgs),
    /// Serve the Azure emulator (AAD, ARM compute and galleries, Batch) until SIGINT/SIGTERM.
    Emulator(emulator::EmulatorArgs),
    /// Consume stage queues on RabbitMQ and run those stages until SIGINT/SIGTERM.
    Worker(worker::WorkerArgs),
    /// Plan a pipeline and publish a trigger for its run to the workers on RabbitMQ; print the
    /// run id.
    Submit(submit::SubmitArgs),
    /// Recent runs from the events stream, or one run's timeline and result.
    Status(status::StatusArgs),
    /// Follow run events live until SIGINT/SIGTERM.
    Watch(watch::WatchArgs),
    /// Parked messages: list them with why, or replay them onto their stage's queue.
    Dlq(dlq::DlqArgs),
    /// Ask the workers to stop a run: each of its branches stops at its next step.
    Cancel(cancel::CancelArgs),
    /// Serve the web page for runs: recent runs (live), each run's timeline, resources and events.
    Ui(ui::UiArgs),
    /// A local stack in one command: the emulator, workers of every stage on the local broker
    /// (a private prefix), and the config file that joins them; prints a ready `submit` line.
    Dev(dev::DevArgs),
    /// Apply the pipeline's retention now: delete its old versions and the pools retired past
    /// their grace (`--dry-run`: print what would go).
    Prune(prune::PruneArgs),
}

/// An error that means "the input is wrong" (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct InputError(anyhow::Error);

pub fn input_error(err: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(InputError(err.into()))
}

/// Runs a parsed command line to completion.
/// The async runtime a command runs on. A stage worker and `submit` get one thread: they wait on
/// the broker and on Azure and compute little, and on one thread no task is handed between
/// threads, which cost more than the work itself (at 100 concurrent pipelines, measured by
/// `benches/concurrent.rs`: with jemalloc's thread caches, a worker's CPU down by a fifth, a
/// submit's by an eighth). Workers scale out as processes (`deploy/`: replicas per stage).
/// The other commands keep a thread per core: `run` (six stages and the emulator in one
/// process), the emulator, the web page, `dev`, and the operator's commands as they were.
pub fn runtime_for(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match command {
        Command::Worker(_) | Command::Submit(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(args).await,
        Command::Validate(args) => validate::run(args).await,
        Command::Emulator(args) => emulator::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Worker(args) => worker::run(args).await,
        Command::Submit(args) => submit::run(args).await,
        Command::Status(args) => status::run(args).await,
        Command::Watch(args) => watch::run(args).await,
        Command::Dlq(args) => dlq::run(args).await,
        Command::Cancel(args) => cancel::run(args).await,
        Command::Prune(args) => prune::run(args).await,
        Command::Dev(args) => dev::run(args).await,
        Command::Ui(args) => ui::run(args).await,
    }
}

/// The exit code for an error: 2 for bad input, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    if err.downcast_ref::<InputError>().is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use tokio::runtime::RuntimeFlavor;

    use super::{Cli, runtime_for};

    fn flavor(args: &[&str]) -> RuntimeFlavor {
        let cli = Cli::try_parse_from(args).expect("the arguments parse");
        runtime_for(&cli.command).expect("a runtime").handle().runtime_flavor()
    }

    #[test]
    fn workers_and_submits_run_on_one_thread_and_the_rest_on_a_thread_per_core() {
        assert_eq!(
            flavor(&["sigrun", "worker", "--all-stages"]),
            RuntimeFlavor::CurrentThread
        );
        assert_eq!(
            flavor(&["sigrun", "worker", "--stage", "replicate"]),
            RuntimeFlavor::CurrentThread
        );
        assert_eq!(flavor(&["sigrun", "submit", "p.toml"]), RuntimeFlavor::CurrentThread);
        assert_eq!(
            flavor(&["sigrun", "run", "pipelines/nightly-ubuntu.toml"]),
            RuntimeFlavor::MultiThread
        );
        assert_eq!(flavor(&["sigrun", "emulator"]), RuntimeFlavor::MultiThread);
    }
}

//! The `sigrun` binary: parses the command line, starts logging, runs the command and turns its
//! result into an exit code. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = sigrun::cli::Cli::parse();
    sigrun::cli::init_logging(&cli.log, cli.log_format);
    match sigrun::cli::run(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("sigrun: {err:#}");
            sigrun::cli::exit_code(&err)
        }
    }
}

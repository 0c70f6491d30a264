//! The `sigrun` binary: parses the command line, starts logging, runs the command and turns its
//! result into an exit code. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = sigrun::cli::Cli::parse();
    if let Err(error) = sigrun::cli::init_logging(&cli.log, cli.log_format) {
        eprintln!("sigrun: {error}");
        return ExitCode::from(2);
    }
    match sigrun::cli::run(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("sigrun: {err:#}");
            sigrun::cli::exit_code(&err)
        }
    }
}

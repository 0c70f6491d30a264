//! The `sigrun` binary: parses the command line, starts logging, runs the command and turns its
//! result into an exit code. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use sigrun::model::text::for_terminal;

/// jemalloc with one arena and no per-thread caches (a worker's few threads share the arena: less
/// memory than an arena or a cache per thread, and no slower for them), freed pages handed back
/// within a second.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Read by jemalloc before `main`; `_RJEM_MALLOC_CONF` in the environment overrides it.
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &[u8; 60] = b"narenas:1,tcache:false,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[tokio::main]
async fn main() -> ExitCode {
    let cli = sigrun::cli::Cli::parse();
    if let Err(error) = sigrun::cli::init_logging(&cli.log, cli.log_format) {
        eprintln!("sigrun: {}", for_terminal(&error.to_string()));
        return ExitCode::from(2);
    }
    match sigrun::cli::run(cli).await {
        Ok(code) => code,
        Err(err) => {
            // Errors quote input (a spec's values, an argument): escapes are shown, not obeyed.
            eprintln!("sigrun: {}", for_terminal(&format!("{err:#}")));
            sigrun::cli::exit_code(&err)
        }
    }
}

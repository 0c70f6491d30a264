//! The `sigrun` binary: parses the command line, starts logging, runs the command and turns its
//! result into an exit code. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use sigrun::model::text::for_terminal;

/// jemalloc with one arena (a worker's few threads share it: less memory than an arena per
/// thread) and its threads' caches on, freed pages handed back within a second. A worker runs on
/// one runtime thread (`cli::runtime_for`), so it has two or three caches: they cost `replicate`
/// 1.4 MiB of peak RSS with 10,000 runs waiting (30.9 against 29.5 MiB), and without them every
/// allocation took the arena's lock, a tenth of a worker's CPU at 100 concurrent pipelines.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Read by jemalloc before `main`; `_RJEM_MALLOC_CONF` in the environment overrides it.
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &[u8; 59] = b"narenas:1,tcache:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    let cli = sigrun::cli::Cli::parse();
    if let Err(error) = sigrun::cli::init_logging(&cli.log, cli.log_format) {
        eprintln!("sigrun: {}", for_terminal(&error.to_string()));
        return ExitCode::from(2);
    }
    let runtime = match sigrun::cli::runtime_for(&cli.command) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sigrun: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match sigrun::cli::run(cli).await {
            Ok(code) => code,
            Err(err) => {
                // Errors quote input (a spec's values, an argument): escapes are shown, not obeyed.
                eprintln!("sigrun: {}", for_terminal(&format!("{err:#}")));
                sigrun::cli::exit_code(&err)
            }
        }
    })
}

//! `sigrun dev`: a whole local stack in one command, for trying sigrun out and for developing it:
//! the Azure emulator (in this process), `--workers` worker processes of every stage on the local
//! RabbitMQ broker under a private prefix, the web page (`sigrun ui`'s, in this process, its fleet
//! page reading the emulator), and the config file that `submit`, `status`, `watch`, `dlq`,
//! `cancel` and further workers need to join them. It prints where everything is and a ready
//! `sigrun submit` line, then runs until SIGINT or SIGTERM, when it stops the page, the workers
//! (SIGTERM: they finish what they hold), the emulator, and removes its prefix's queues.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::input_error;
use crate::bus::amqp::{AmqpBus, AmqpSettings};
use crate::config::{Mode, Settings};
use crate::emulator::EmulatorInfo;
use crate::ui::fleet::FleetSource;

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the config file and the workers' logs go.
    #[arg(long, default_value = ".sigrun-dev")]
    pub dir: PathBuf,
    /// Worker processes, each consuming every stage.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub workers: u8,
    /// Settings overlaid on the defaults: `[amqp] url` (the broker), `[emulator]` (time scale,
    /// seed, faults, world, identity), `[pipelines] dir`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where to serve the web page (port 0: any free port, printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub ui_listen: std::net::SocketAddr,
    /// Allow the page's actions (cancel, replay) to callers sending `Authorization: Bearer
    /// TOKEN`; read-only without it.
    #[arg(long, env = "SIGRUN_UI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

pub async fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    let mut stop = super::signals::StopSignals::install()?;
    let token = super::ui::checked_token(args.token.as_deref())?;
    let settings = Settings::load(args.config.as_deref()).map_err(input_error)?;
    if settings.azure.mode != Mode::Emulator {
        return Err(input_error(anyhow::anyhow!(
            "`sigrun dev` runs on the built-in emulator: leave [azure] mode = \"emulator\""
        )));
    }
    let amqp = AmqpSettings {
        prefix: format!("sigrun-dev-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        ..settings.amqp.clone()
    };
    let tiers = settings.delay_tiers();
    let bus = AmqpBus::connect(amqp.clone(), tiers.clone()).await.map_err(|e| {
        input_error(anyhow::anyhow!(
            "`sigrun dev` needs RabbitMQ at {}: {e}. Start it with `rabbitmq-server -detached` (or \
             `scripts/test-env`), or point [amqp] url at one",
            amqp.redacted_url()
        ))
    })?;
    bus.close().await;
    let emulator = super::session::start_emulator(&settings.emulator).await?;
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let config = dir.join("sigrun.toml");
    std::fs::write(&config, config_text(&settings, &amqp, emulator.info())?)
        .with_context(|| format!("writing {}", config.display()))?;
    // The page first: a port in use (another `sigrun ui` on 8080) stops everything before any
    // worker starts, and leaves no queues behind.
    let page = match serve_page(&config, &amqp, &tiers, args.ui_listen, token).await {
        Ok(page) => page,
        Err(error) => {
            emulator.shutdown().await;
            remove_queues(&amqp, &tiers).await;
            return Err(error);
        }
    };
    let mut workers = Vec::new();
    for n in 1..=args.workers {
        workers.push(spawn_worker(&dir, &config, n)?);
    }
    println!(
        "{}",
        banner(emulator.info(), &config, &dir, &amqp, args.workers, &page.url())
    );
    stop.wait().await;
    eprintln!("sigrun dev: stopping");
    page.stop().await;
    stop_workers(workers).await;
    emulator.shutdown().await;
    remove_queues(&amqp, &tiers).await;
    Ok(ExitCode::SUCCESS)
}

async fn remove_queues(amqp: &AmqpSettings, tiers: &[Duration]) {
    if let Err(e) = AmqpBus::delete_topology(amqp, tiers).await {
        eprintln!("sigrun dev: the queues under {} stay: {e}", amqp.prefix);
    }
}

/// The web page over the stack's prefix, its fleet page reading the emulator as the workers do
/// (through the config they were given).
async fn serve_page(
    config: &Path,
    amqp: &AmqpSettings,
    tiers: &[Duration],
    listen: std::net::SocketAddr,
    token: Option<String>,
) -> anyhow::Result<super::ui::Served> {
    let joined = Settings::load(Some(config)).map_err(input_error)?;
    let session = super::session::Session::from_settings(joined.clone()).await?;
    let azure: std::sync::Arc<dyn crate::azure::AzureApi> = session.azure;
    let fleet = std::sync::Arc::new(FleetSource::new(azure, joined.pipelines.dir.clone()));
    let bus = AmqpBus::connect(amqp.clone(), tiers.to_vec()).await?;
    super::ui::serve(std::sync::Arc::new(bus), listen, token, Some(fleet), None).await
}

/// The settings a process joining the stack reads: the emulator as Azure (its identity, its CA),
/// its clock, the broker and the stack's prefix, the pipelines.
fn config_text(settings: &Settings, amqp: &AmqpSettings, info: &EmulatorInfo) -> anyhow::Result<String> {
    use toml::{Table, Value};
    let table = |pairs: Vec<(&str, Value)>| -> Value {
        Value::Table(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<Table>())
    };
    let text = |s: &str| Value::String(s.to_string());
    let e = &settings.emulator;
    let pipelines = std::path::absolute(&settings.pipelines.dir)?;
    let client = table(vec![
        (
            "credential",
            table(vec![
                ("kind", text("client_secret")),
                ("tenant_id", text(&e.tenant_id)),
                ("client_id", text(&e.client_id)),
                ("client_secret", text(e.client_secret.expose())),
            ]),
        ),
        (
            "cloud",
            table(vec![
                ("authority_host", text(&info.base_url)),
                ("resource_manager", text(&info.base_url)),
            ]),
        ),
        ("extra_ca_cert", text(info.ca_cert.as_deref().unwrap_or_default())),
    ]);
    let config = table(vec![
        (
            "azure",
            table(vec![
                ("mode", text("azure")),
                ("time_scale", Value::Float(e.time_scale)),
                ("client", client),
            ]),
        ),
        (
            "amqp",
            table(vec![("url", text(&amqp.url)), ("prefix", text(&amqp.prefix))]),
        ),
        (
            "pipelines",
            table(vec![("dir", text(&pipelines.display().to_string()))]),
        ),
    ]);
    let mut out = String::from("# Written by `sigrun dev`: join its stack with `--config` this file.\n");
    out.push_str(&toml::to_string(&config)?);
    Ok(out)
}

fn spawn_worker(dir: &Path, config: &Path, n: u8) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join(format!("worker-{n}.log")))?;
    Command::new(std::env::current_exe()?)
        .arg("worker")
        .arg("--all-stages")
        .arg("--config")
        .arg(config)
        .arg("--metrics-listen")
        .arg("127.0.0.1:0")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting a worker")
}

/// Where everything is, and what to type next.
fn banner(info: &EmulatorInfo, config: &Path, dir: &Path, amqp: &AmqpSettings, workers: u8, page: &str) -> String {
    let config = config.display();
    let mut out = String::new();
    let _ = writeln!(out, "sigrun dev is up:");
    let _ = writeln!(out, "  emulator   {} (control: {})", info.base_url, info.control_url);
    let _ = writeln!(out, "  broker     {} (prefix {})", amqp.redacted_url(), amqp.prefix);
    let _ = writeln!(
        out,
        "  workers    {workers}, every stage (logs: {}/worker-*.log)",
        dir.display()
    );
    let _ = writeln!(out, "  config     {config}");
    let _ = writeln!(out, "  web page   {page}");
    let _ = writeln!(out, "Next:");
    let _ = writeln!(out, "  sigrun submit pipelines/nightly-ubuntu.toml --config {config}");
    let _ = writeln!(out, "  sigrun watch --config {config}");
    let _ = write!(out, "Stop with Ctrl-C.");
    out
}

/// SIGTERM to each worker (they finish what they hold within their shutdown grace), then waits
/// for them, killing one that is still there after 30 s.
async fn stop_workers(workers: Vec<Child>) {
    for worker in &workers {
        let _ = Command::new("kill").arg("-TERM").arg(worker.id().to_string()).status();
    }
    for mut worker in workers {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while matches!(worker.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if matches!(worker.try_wait(), Ok(None)) {
            let _ = worker.kill();
            let _ = worker.wait();
        }
    }
}

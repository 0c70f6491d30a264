//! `sigrun status [RUN]`: what the events stream says about runs. Without RUN, a table of the
//! recent runs (id, pipeline, version, start, state, last event); with RUN (a full id or a prefix
//! only one run has), that run's timeline and result. Reads the stream from its oldest event up to
//! the moment of the call (a marker tells where "now" is), so it sees every event confirmed before
//! it started. `--json` prints the same for machines. Exit codes: 0 shown, 2 bad input (an unknown
//! or ambiguous run, bad settings, a prefix nothing ran on), 1 the broker cannot be reached.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use super::history::{self, RunHistory};
use super::run::describe;
use crate::events::{EventKind, run_result};
use crate::model::text;

#[derive(Debug, Args)]
#[command(
    after_help = "Runs are read from the events stream, which keeps events for [amqp] event_max_age \
                        (default 7 days): older runs are gone from it."
)]
pub struct StatusArgs {
    /// Show this run's timeline: its id, or a prefix of it that only this run has.
    pub run: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Without RUN: show at most this many runs, the most recently started first.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Settings file overlaid on the defaults (`[amqp]`).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let (bus, settings) = history::connect(args.config.as_deref(), "status").await?;
    let read = history::read_all(&bus).await;
    bus.close().await;
    let url = settings.amqp.redacted_url();
    let events = read.map_err(|e| anyhow::anyhow!("reading the events stream at {url}: {e}"))?;
    let runs = history::group_by_run(events);
    match &args.run {
        Some(wanted) => {
            let run = history::find_run(&runs, wanted)?;
            if args.json {
                print_run_json(run);
            } else {
                print_timeline(run);
            }
        }
        None => {
            let mut recent: Vec<&RunHistory> = runs.iter().collect();
            recent.sort_by_key(|r| std::cmp::Reverse(r.first().at));
            recent.truncate(args.limit);
            if args.json {
                print_runs_json(&recent);
            } else if recent.is_empty() {
                println!(
                    "no runs in the events stream of prefix `{}` (events are kept for {})",
                    settings.amqp.prefix, settings.amqp.event_max_age
                );
            } else {
                print_runs(&recent);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_runs(runs: &[&RunHistory]) {
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|run| {
            let first = run.first();
            let last = run.last();
            vec![
                run.run_id.to_string(),
                first.pipeline.clone(),
                first.version.clone(),
                history::time_seconds(first.at),
                history::state(&run_result(&run.events)).to_string(),
                format!("{} {}: {}", last.stage, last.branch.label(), describe(last)),
            ]
        })
        .collect();
    history::print_table(&["RUN", "PIPELINE", "VERSION", "STARTED", "STATE", "LAST EVENT"], &rows);
}

fn print_timeline(run: &RunHistory) {
    let first = run.first();
    let result = run_result(&run.events);
    println!("run       {}", run.run_id);
    println!(
        "pipeline  {} {}",
        text::bounded(&first.pipeline),
        text::bounded(&first.version)
    );
    println!("started   {}", history::time_millis(first.at));
    if !run
        .events
        .iter()
        .any(|e| matches!(e.kind, EventKind::RunStarted { .. }))
    {
        println!("note      its run_started event is not in the stream (past the retention?): the history is partial");
    }
    println!();
    let rows: Vec<Vec<String>> = run
        .events
        .iter()
        .map(|event| {
            let since = (event.at - first.at).as_seconds_f64();
            vec![
                history::time_millis(event.at),
                format!("+{since:.1}s"),
                event.stage.to_string(),
                event.branch.label(),
                describe(event),
            ]
        })
        .collect();
    history::print_table(&["TIME", "ELAPSED", "STAGE", "BRANCH", "WHAT"], &rows);
    println!();
    println!("result: {}", text::bounded(&history::result_line(&result)));
}

fn print_runs_json(runs: &[&RunHistory]) {
    let list: Vec<_> = runs
        .iter()
        .map(|run| {
            let first = run.first();
            let last = run.last();
            json!({
                "run_id": run.run_id,
                "pipeline": first.pipeline,
                "version": first.version,
                "started": history::rfc3339(first.at),
                "last_event": last,
                "events": run.events.len(),
                "result": history::result_json(&run_result(&run.events)),
            })
        })
        .collect();
    println!("{}", serde_json::Value::Array(list));
}

fn print_run_json(run: &RunHistory) {
    let first = run.first();
    let out = json!({
        "run_id": run.run_id,
        "pipeline": first.pipeline,
        "version": first.version,
        "started": history::rfc3339(first.at),
        "result": history::result_json(&run_result(&run.events)),
        "events": run.events,
    });
    println!("{out}");
}

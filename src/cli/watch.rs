//! `sigrun watch`: follows the events stream live and prints one line per event (or one JSON
//! object per line with `--json`), optionally only one run's or one pipeline's, until SIGINT or
//! SIGTERM (exit 0). Starts at the events published from now on, or at the oldest one kept with
//! `--from-start`. A stream reader does not survive a lost connection: the bus reconnects by
//! itself and the watch opens a new reader just after the last offset it saw, so nothing is
//! skipped or shown twice. To know its offset before the first event comes, it publishes a marker
//! into the stream when it starts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::history;
use super::run::describe;
use crate::bus::BusError;
use crate::bus::amqp::{AmqpBus, EventReader, StreamOffset, StreamedEvent};
use crate::model::text;

#[derive(Debug, Args)]
#[command(
    after_help = "The events stream keeps events for [amqp] event_max_age (default 7 days): \
                        --from-start begins at the oldest event still kept."
)]
pub struct WatchArgs {
    /// Only this run's events: its id or a prefix of it.
    #[arg(long, value_parser = parse_run_prefix)]
    pub run: Option<String>,
    /// Only this pipeline's events (the spec's `name`).
    #[arg(long)]
    pub pipeline: Option<String>,
    /// Begin at the oldest event the stream still keeps instead of at new ones.
    #[arg(long)]
    pub from_start: bool,
    /// One JSON object per line (the event, with its stream offset).
    #[arg(long)]
    pub json: bool,
    /// Settings file overlaid on the defaults (`[amqp]`).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// A run id or a prefix of one: hex digits and hyphens.
fn parse_run_prefix(text: &str) -> Result<String, String> {
    let text = text.trim().to_ascii_lowercase();
    if text.is_empty() || text.len() > 36 || !text.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(format!(
            "`{text}` is not a run id or a prefix of one (hex digits and hyphens)"
        ));
    }
    Ok(text)
}

/// The longest wait between two attempts to reopen the stream.
const REOPEN_MAX: Duration = Duration::from_secs(5);

pub async fn run(args: WatchArgs) -> anyhow::Result<ExitCode> {
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (bus, settings) = history::connect(args.config.as_deref(), "watch").await?;
    let url = settings.amqp.redacted_url();
    let start = if args.from_start {
        StreamOffset::First
    } else {
        StreamOffset::Next
    };
    let opened = async {
        let reader = bus.read_events(start.clone()).await?;
        if !args.from_start {
            // Comes back to this reader at once: from then on it knows its offset.
            bus.publish_marker().await?;
        }
        Ok::<_, BusError>(reader)
    }
    .await;
    let reader = match opened {
        Ok(reader) => reader,
        Err(error) => {
            bus.close().await;
            return Err(anyhow::anyhow!("the events stream at {url}: {error}"));
        }
    };
    eprintln!(
        "sigrun watch: following the events of prefix `{}` on {url}{} (Ctrl-C to stop)",
        settings.amqp.prefix,
        if args.from_start { " from the oldest kept" } else { "" }
    );
    let mut reader = Some(reader);
    while let Some(current) = reader.as_mut() {
        let item = tokio::select! {
            _ = term.recv() => break,
            _ = interrupt.recv() => break,
            item = current.next() => item,
        };
        let lost = match item {
            Some(Ok(streamed)) => {
                show(&args, &streamed);
                continue;
            }
            Some(Err(BusError::Malformed(what))) => {
                eprintln!("warning: {what}");
                continue;
            }
            Some(Err(error)) => error.to_string(),
            None => "the reader's channel closed".to_string(),
        };
        let old = reader.take().expect("a reader is open");
        reader = reopen(&bus, old, &start, &lost, &mut term, &mut interrupt).await;
    }
    if let Some(reader) = reader {
        reader.close().await;
    }
    bus.close().await;
    Ok(ExitCode::SUCCESS)
}

/// Opens a reader just after `old`'s last offset (where it began, if it saw nothing), waiting as
/// long as it takes for the bus to reconnect. `None` when a signal came first.
async fn reopen(
    bus: &AmqpBus,
    mut old: EventReader,
    start: &StreamOffset,
    why: &str,
    term: &mut Signal,
    interrupt: &mut Signal,
) -> Option<EventReader> {
    let from = match old.position() {
        Some(offset) => StreamOffset::At(offset + 1),
        None => start.clone(),
    };
    // Commits are judged on as the old reader judged them (it read from the first, if it judges).
    let book = old.take_book();
    old.close().await;
    let place = match &from {
        StreamOffset::At(offset) => format!("offset {offset}"),
        StreamOffset::First => "the oldest event".into(),
        _ => "new events".into(),
    };
    eprintln!("sigrun watch: lost the events stream ({why}); reopening at {place}");
    let mut delay = Duration::from_millis(100);
    loop {
        let opened = tokio::select! {
            _ = term.recv() => return None,
            _ = interrupt.recv() => return None,
            opened = bus.read_events(from.clone()) => opened,
        };
        match opened {
            Ok(reader) => return Some(reader.with_book(book)),
            Err(error) => eprintln!("sigrun watch: reopening failed ({error}); trying again"),
        }
        tokio::select! {
            _ = term.recv() => return None,
            _ = interrupt.recv() => return None,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(REOPEN_MAX);
    }
}

fn show(args: &WatchArgs, streamed: &StreamedEvent) {
    let event = &streamed.event;
    if let Some(run) = &args.run
        && !history::run_matches(&event.run_id, run)
    {
        return;
    }
    if let Some(pipeline) = &args.pipeline
        && event.pipeline != *pipeline
    {
        return;
    }
    if args.json {
        println!("{}", json!({"offset": streamed.offset, "event": event}));
    } else {
        let run = event.run_id.simple().to_string();
        let line = format!(
            "{}  {}  {} {}  {}  {}  {}",
            history::time_millis(event.at),
            &run[..8],
            event.pipeline,
            event.version,
            event.stage,
            event.branch.label(),
            describe(event)
        );
        // Events are other processes' words: printed bounded, escapes shown and not obeyed.
        println!("{}", text::bounded(&line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_filter_is_a_run_id_or_a_prefix_of_one() {
        assert_eq!(parse_run_prefix("3F2A-").unwrap(), "3f2a-");
        assert_eq!(
            parse_run_prefix("b939eff5-803b-5051-bff2-9c03bfc1db2e").unwrap(),
            "b939eff5-803b-5051-bff2-9c03bfc1db2e"
        );
        assert!(parse_run_prefix("nightly").unwrap_err().contains("not a run id"));
        assert!(parse_run_prefix("").is_err());
    }
}

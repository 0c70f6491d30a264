//! `sigrun dlq list` and `sigrun dlq replay [ID…]`: the parking queue for operators.
//!
//! `list` shows every parked message — id, run, stage, branch, attempts, first and last seen, and
//! why: the runtime's `x-sigrun-*` headers (a branch that gave up, a message that does not decode),
//! the broker's `x-death` (a delivery limit reached), or neither (nothing was bound to its routing
//! key) — and removes nothing: the messages are taken unacked and go back when it closes.
//!
//! `replay` puts chosen messages (all without IDs, or with `--all`) back on their stage's work
//! queue with the attempt count reset and no hold, each publish confirmed; records `Replayed` in
//! the run's history first, so the run's result follows what happens after the replay; then takes
//! the parked copy out. What is not chosen, and what cannot be replayed (not a v1 envelope: it is
//! reported with the reason), stays parked. Exit codes: 0 everything chosen was replayed (or
//! nothing is parked), 1 something could not be replayed or the broker failed, 2 bad input
//! (unknown or ambiguous ID, bad settings) with nothing replayed.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::history;
use super::input_error;
use crate::bus::Bus;
use crate::bus::amqp::{AmqpBus, ParkedBrowser, ParkedMessage};
use crate::events::{Event, EventKind};
use crate::ledger::record::{Commit, Record, Successor};
use crate::model::envelope::{Envelope, EnvelopeError, MAX_ENVELOPE_BYTES};

#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Show the parked messages and why they were parked (nothing is removed).
    List(ListArgs),
    /// Put parked messages back on their stage's queue (attempts reset) and out of parking.
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Look at no more than this many parked messages (the oldest).
    #[arg(long, default_value_t = 10_000)]
    pub limit: usize,
    /// Settings file overlaid on the defaults (`[amqp]`).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// IDs as `dlq list` shows them (or a prefix only one ID has). None: every parked message.
    pub ids: Vec<String>,
    /// Replay every parked message (the same as giving no ID).
    #[arg(long, conflicts_with = "ids")]
    pub all: bool,
    /// Look at no more than this many parked messages (the oldest).
    #[arg(long, default_value_t = 10_000)]
    pub limit: usize,
    /// Settings file overlaid on the defaults (`[amqp]`).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub async fn run(args: DlqArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        DlqCommand::List(args) => list(args).await,
        DlqCommand::Replay(args) => replay(args).await,
    }
}

async fn open(config: Option<&std::path::Path>, limit: usize) -> anyhow::Result<(AmqpBus, ParkedBrowser, String)> {
    let (bus, settings) = history::connect(config, "dlq").await?;
    let url = settings.amqp.redacted_url();
    match bus.browse_parked(limit).await {
        Ok(browser) => Ok((bus, browser, settings.amqp.prefix)),
        Err(error) => {
            bus.close().await;
            Err(anyhow!("reading the parking queue at {url}: {error}"))
        }
    }
}

async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let (bus, browser, prefix) = open(args.config.as_deref(), args.limit).await?;
    let parked: Vec<Parked> = browser.messages().iter().map(Parked::of).collect();
    if args.json {
        let list: Vec<Value> = parked.iter().map(Parked::json).collect();
        println!("{}", Value::Array(list));
    } else if parked.is_empty() {
        println!("nothing is parked (prefix `{prefix}`)");
    } else {
        let rows: Vec<Vec<String>> = parked.iter().map(Parked::row).collect();
        history::print_table(
            &[
                "ID",
                "RUN",
                "STAGE",
                "BRANCH",
                "ATTEMPTS",
                "FIRST SEEN",
                "LAST SEEN",
                "REPLAY",
                "WHY",
            ],
            &rows,
        );
    }
    if browser.left() > 0 {
        eprintln!(
            "{} more parked message(s) not shown (--limit {})",
            browser.left(),
            args.limit
        );
    }
    browser.close().await;
    bus.close().await;
    Ok(ExitCode::SUCCESS)
}

async fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let (bus, mut browser, prefix) = open(args.config.as_deref(), args.limit).await?;
    let chosen = match choose(browser.messages(), &args.ids) {
        Ok(chosen) => chosen,
        Err(error) => {
            browser.close().await;
            bus.close().await;
            return Err(error);
        }
    };
    if browser.messages().is_empty() {
        println!("nothing is parked (prefix `{prefix}`)");
    }
    let mut not_replayed = 0;
    let mut failure = None;
    for index in chosen {
        let message = browser.messages()[index].clone();
        let parked = Parked::of(&message);
        let envelope = match parked.envelope {
            Ok(envelope) => envelope,
            Err(why) => {
                not_replayed += 1;
                eprintln!("not replayed {}: {why}; it stays parked", message.id);
                continue;
            }
        };
        match replay_one(&bus, &mut browser, index, envelope, &parked.error).await {
            Ok(line) => println!("replayed {}: {line}", message.id),
            Err(error) => {
                not_replayed += 1;
                eprintln!("not replayed {}: {error}; it stays parked", message.id);
                // The broker is failing: the rest would fail the same way.
                failure = Some(error);
                break;
            }
        }
    }
    browser.close().await;
    bus.close().await;
    if let Some(error) = failure {
        return Err(error.context("replaying parked messages"));
    }
    Ok(if not_replayed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The run's history first (so the branch is reopened before anything of the replay can end it
/// again), then the message, then the parked copy out. The history gets one ledger commit: the
/// `Replayed` event, and the replayed message's fresh token made live (the parked copy's own was
/// spent when it was parked, so without a new one the workers would drop it as stale). A failure
/// leaves the copy parked; the next replay gives it another token, and a copy sent by the failed
/// one is then stale.
async fn replay_one(
    bus: &AmqpBus,
    browser: &mut ParkedBrowser,
    index: usize,
    mut envelope: Envelope,
    parked_for: &str,
) -> anyhow::Result<String> {
    envelope.attempt = 0;
    envelope.not_before = None;
    let replay = Uuid::new_v4();
    envelope.token = Uuid::new_v4();
    envelope.made_by = replay;
    let event = Event {
        run_id: envelope.run_id,
        pipeline: envelope.pipeline.clone(),
        version: envelope.version.clone(),
        stage: envelope.stage,
        branch: envelope.branch.clone(),
        at: OffsetDateTime::now_utc(),
        kind: EventKind::Replayed {
            message_id: envelope.message_id,
            error: parked_for.to_string(),
        },
    };
    let commit = Commit {
        run_id: envelope.run_id,
        pipeline: envelope.pipeline.clone(),
        claim: replay,
        consumed: None,
        successors: vec![Successor {
            message_id: envelope.message_id,
            token: envelope.token,
            stage: envelope.stage,
            branch: envelope.branch.clone(),
        }],
        events: vec![event],
    };
    bus.publish_record(&Record::Commit(commit)).await?;
    bus.publish(envelope.stage, &envelope.encode()).await?;
    browser.remove(index).await?;
    Ok(format!(
        "run {} {} {} {} back on {}",
        envelope.run_id,
        envelope.pipeline,
        envelope.version,
        envelope.branch.label(),
        envelope.stage
    ))
}

/// The indices of the messages `ids` name (every message when there are none). Each ID must name
/// parked messages of exactly one ID (several copies of one message are all chosen).
fn choose(messages: &[ParkedMessage], ids: &[String]) -> anyhow::Result<Vec<usize>> {
    if ids.is_empty() {
        return Ok((0..messages.len()).collect());
    }
    let mut chosen = Vec::new();
    for wanted in ids {
        let exact: Vec<usize> = (0..messages.len()).filter(|&i| messages[i].id == *wanted).collect();
        let matching = if exact.is_empty() {
            (0..messages.len())
                .filter(|&i| messages[i].id.starts_with(wanted.as_str()))
                .collect()
        } else {
            exact
        };
        let mut distinct: Vec<&str> = matching.iter().map(|&i| messages[i].id.as_str()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        match distinct.len() {
            0 => {
                return Err(input_error(anyhow!(
                    "no parked message `{wanted}` ({} parked; `sigrun dlq list` shows them)",
                    messages.len()
                )));
            }
            1 => chosen.extend(matching),
            _ => {
                return Err(input_error(anyhow!(
                    "`{wanted}` names several parked messages: {}",
                    distinct.join(", ")
                )));
            }
        }
    }
    chosen.sort_unstable();
    chosen.dedup();
    Ok(chosen)
}

/// A parked message read for people: its run (from the envelope, or what of it can be read), its
/// stage, and why it is parked.
struct Parked<'a> {
    message: &'a ParkedMessage,
    envelope: Result<Envelope, EnvelopeError>,
    run: RunFields,
    stage: Option<String>,
    /// `runtime`, `broker` or `unroutable`.
    origin: &'static str,
    error: String,
    attempts: Option<u32>,
    first_seen: Option<OffsetDateTime>,
    last_seen: Option<OffsetDateTime>,
}

/// Whatever of a run's fields a body has, each on its own (a broken envelope may keep some).
#[derive(Default)]
struct RunFields {
    run_id: Option<String>,
    pipeline: Option<String>,
    version: Option<String>,
    branch: Option<String>,
    stage: Option<String>,
}

impl RunFields {
    fn of(envelope: &Result<Envelope, EnvelopeError>, body: &[u8]) -> RunFields {
        if let Ok(envelope) = envelope {
            return RunFields {
                run_id: Some(envelope.run_id.to_string()),
                pipeline: Some(envelope.pipeline.clone()),
                version: Some(envelope.version.clone()),
                branch: Some(envelope.branch.label()),
                stage: Some(envelope.stage.to_string()),
            };
        }
        if body.len() > MAX_ENVELOPE_BYTES {
            return RunFields::default();
        }
        let Ok(value) = serde_json::from_slice::<Value>(body) else {
            return RunFields::default();
        };
        let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_string);
        RunFields {
            run_id: text("run_id"),
            pipeline: text("pipeline"),
            version: text("version"),
            branch: value
                .get("branch")
                .and_then(|b| serde_json::from_value::<crate::model::envelope::Branch>(b.clone()).ok())
                .map(|b| b.label()),
            stage: text("stage"),
        }
    }
}

impl<'a> Parked<'a> {
    fn of(message: &'a ParkedMessage) -> Parked<'a> {
        let envelope = Envelope::decode(&message.body);
        let run = RunFields::of(&envelope, &message.body);
        let death = message.deaths.first();
        let death_stage = death.and_then(|d| {
            d.routing_keys
                .first()
                .cloned()
                .or_else(|| d.queue.rsplit_once(".stage.").map(|(_, stage)| stage.to_string()))
        });
        let routed_stage = crate::model::envelope::Stage::parse(&message.routing_key).map(|s| s.to_string());
        let stage = message
            .runtime
            .as_ref()
            .and_then(|r| r.stage.clone())
            .or_else(|| run.stage.clone())
            .or(death_stage)
            .or(routed_stage);
        let parse = |text: &Option<String>| text.as_deref().and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok());
        let (origin, error, attempts, first_seen, last_seen) = match (&message.runtime, death) {
            (Some(runtime), _) => (
                "runtime",
                runtime.error.clone(),
                runtime.attempts,
                parse(&runtime.first_seen),
                parse(&runtime.last_seen),
            ),
            (None, Some(death)) => (
                "broker",
                format!(
                    "dead-lettered by the broker: {} on {} ({} time(s))",
                    death.reason, death.queue, death.count
                ),
                None,
                message.deaths.iter().filter_map(|d| d.time).min(),
                message.deaths.iter().filter_map(|d| d.time).max(),
            ),
            (None, None) => (
                "unroutable",
                format!(
                    "no queue is bound to routing key `{}` on the work exchange",
                    message.routing_key
                ),
                None,
                None,
                None,
            ),
        };
        Parked {
            message,
            envelope,
            run,
            stage,
            origin,
            error,
            attempts,
            first_seen,
            last_seen,
        }
    }

    fn not_replayable(&self) -> Option<String> {
        self.envelope.as_ref().err().map(ToString::to_string)
    }

    fn row(&self) -> Vec<String> {
        let dash = || "-".to_string();
        vec![
            self.message.id.clone(),
            self.run
                .run_id
                .as_deref()
                .map(|id| id.chars().take(8).collect())
                .unwrap_or_else(dash),
            self.stage.clone().unwrap_or_else(dash),
            self.run.branch.clone().unwrap_or_else(dash),
            self.attempts.map(|a| a.to_string()).unwrap_or_else(dash),
            self.first_seen.map(history::time_seconds).unwrap_or_else(dash),
            self.last_seen.map(history::time_seconds).unwrap_or_else(dash),
            if self.envelope.is_ok() { "yes" } else { "no" }.to_string(),
            self.error.clone(),
        ]
    }

    fn json(&self) -> Value {
        json!({
            "id": self.message.id,
            "run_id": self.run.run_id,
            "pipeline": self.run.pipeline,
            "version": self.run.version,
            "stage": self.stage,
            "branch": self.run.branch,
            "origin": self.origin,
            "error": self.error,
            "attempts": self.attempts,
            "first_seen": self.first_seen.map(history::rfc3339),
            "last_seen": self.last_seen.map(history::rfc3339),
            "routing_key": self.message.routing_key,
            "bytes": self.message.body.len(),
            "returns": self.message.returns,
            "replayable": self.envelope.is_ok(),
            "not_replayable_because": self.not_replayable(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked(id: &str) -> ParkedMessage {
        ParkedMessage {
            id: id.into(),
            body: b"not json".to_vec(),
            routing_key: "snapshot".into(),
            runtime: None,
            deaths: Vec::new(),
            returns: 0,
        }
    }

    #[test]
    fn ids_choose_exactly_or_by_a_unique_prefix() {
        let messages = [parked("ab12"), parked("ab34"), parked("cd56"), parked("ab12")];
        assert_eq!(choose(&messages, &[]).unwrap(), vec![0, 1, 2, 3], "none: all");
        assert_eq!(
            choose(&messages, &["ab12".into()]).unwrap(),
            vec![0, 3],
            "every copy of the message"
        );
        assert_eq!(choose(&messages, &["cd".into(), "ab3".into()]).unwrap(), vec![1, 2]);
        let ambiguous = choose(&messages, &["ab".into()]).unwrap_err();
        assert!(ambiguous.to_string().contains("several"), "{ambiguous}");
        let unknown = choose(&messages, &["zz".into()]).unwrap_err();
        assert!(unknown.to_string().contains("no parked message `zz`"), "{unknown}");
        assert_eq!(super::super::exit_code(&unknown), ExitCode::from(2));
    }

    #[test]
    fn an_unroutable_message_says_so_and_is_not_replayable() {
        let message = parked("x");
        let parked = Parked::of(&message);
        assert_eq!(parked.origin, "unroutable");
        assert_eq!(parked.stage.as_deref(), Some("snapshot"));
        assert!(parked.error.contains("routing key `snapshot`"), "{}", parked.error);
        assert!(parked.not_replayable().unwrap().contains("not JSON"));
    }
}

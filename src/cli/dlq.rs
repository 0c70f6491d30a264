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

use super::history;
use super::input_error;
use crate::bus::amqp::{AmqpBus, ParkedBrowser, ParkedMessage};
use crate::dlq::Parked;

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
        match crate::dlq::replay(&bus, &mut browser, index, envelope, &parked.error)
            .await
            .map_err(anyhow::Error::from)
        {
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

/// A parked message as `list` shows it: a row of the table, or JSON.
trait Shown {
    fn row(&self) -> Vec<String>;
    fn json(&self) -> Value;
}

impl Shown for Parked<'_> {
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

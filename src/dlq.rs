//! The parking queue for people: a parked message read for an operator (its run, stage, branch,
//! why it is parked and since when, whether it can go back), and putting one back on its stage's
//! queue. Shared by `sigrun dlq` and the web page's replay action, so both replay by one rule.

use std::sync::Arc;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::bus::Bus;
use crate::bus::amqp::{AmqpBus, ParkedBrowser, ParkedMessage};
use crate::events::{Event, EventKind};
use crate::ledger::record::{Commit, Record, Successor};
use crate::model::envelope::{Envelope, EnvelopeError, MAX_ENVELOPE_BYTES};

/// A parked message read for people: its run (from the envelope, or what of it can be read), its
/// stage, and why it is parked.
pub struct Parked<'a> {
    pub message: &'a ParkedMessage,
    pub envelope: Result<Envelope, EnvelopeError>,
    pub run: RunFields,
    pub stage: Option<String>,
    /// `runtime`, `broker` or `unroutable`.
    pub origin: &'static str,
    pub error: String,
    pub attempts: Option<u32>,
    pub first_seen: Option<OffsetDateTime>,
    pub last_seen: Option<OffsetDateTime>,
}

/// Whatever of a run's fields a body has, each on its own (a broken envelope may keep some).
#[derive(Default)]
pub struct RunFields {
    pub run_id: Option<String>,
    pub pipeline: Option<String>,
    pub version: Option<String>,
    pub branch: Option<String>,
    pub stage: Option<String>,
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
    pub fn of(message: &'a ParkedMessage) -> Parked<'a> {
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

    pub fn not_replayable(&self) -> Option<String> {
        self.envelope.as_ref().err().map(ToString::to_string)
    }
}

/// A parked message made ready to go back: its attempts reset, no hold, the planner's reading of
/// Azure forgotten, a fresh token made by a new claim; and the history commit that makes that
/// token live and records `Replayed` (the parked copy's own token was spent when it was parked,
/// so without a new one the workers would drop it as stale). Publishing them is [`replay`]'s.
pub fn revived(mut envelope: Envelope, parked_for: &str) -> (Envelope, Record) {
    envelope.attempt = 0;
    envelope.not_before = None;
    // What the planner saw may be long out of date (and the run may have gone on without this
    // copy): the revived branch reads Azure again instead.
    Arc::make_mut(&mut envelope.plan).seen = Default::default();
    let replay = Uuid::new_v4();
    envelope.token = Uuid::new_v4();
    envelope.made_by = replay;
    // Made by the replay, which consumes nothing: the state a committing-first maker consumed is
    // spent, and naming it would make the revived copy stale before its commit is read.
    envelope.made_from = Uuid::nil();
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
        kept: None,
        run_id: envelope.run_id,
        pipeline: envelope.pipeline.clone(),
        claim: replay,
        consumed: None,
        successors: vec![Successor::of(&envelope)],
        events: vec![event],
    };
    (envelope, Record::Commit(commit))
}

/// The run's history first (so the branch is reopened before anything of the replay can end it
/// again), then the message, then the parked copy out. A failure leaves the copy parked; the next
/// replay gives it another token, and a copy sent by the failed one is then stale.
pub async fn replay(
    bus: &AmqpBus,
    browser: &mut ParkedBrowser,
    index: usize,
    envelope: Envelope,
    parked_for: &str,
) -> Result<String, crate::bus::BusError> {
    let (envelope, commit) = revived(envelope, parked_for);
    bus.publish_record(&commit).await?;
    bus.publish(envelope.stage, &envelope.encode(), Some(&envelope.traceparent))
        .await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::envelope::Stage;
    use crate::model::plan::{Presence, Seen};
    use crate::runtime::testkit;

    /// A replayed copy starts afresh: no failed tries, a new state made by the replay's commit,
    /// and no trust in what the planner read of Azure (it may be days old).
    #[test]
    fn a_revived_message_forgets_its_tries_its_hold_and_the_planners_reading() {
        let mut parked = testkit::envelope(Stage::GalleryPublish);
        parked.attempt = 3;
        // Parked by a step that committed first.
        parked.made_from = Uuid::new_v4();
        std::sync::Arc::make_mut(&mut parked.plan).seen = Seen {
            definition: Presence::Present,
            version: Presence::Absent,
        };
        let (revived, record) = revived(parked.clone(), "gave up after 3 attempts");
        assert_eq!(revived.attempt, 0);
        assert_eq!(revived.plan.seen, Seen::default());
        assert_ne!(revived.token, parked.token);
        let Record::Commit(commit) = record else {
            panic!("a replay is recorded by a commit: {record:?}")
        };
        assert_eq!(commit.claim, revived.made_by);
        assert!(revived.made_from.is_nil(), "a replay consumed nothing");
        assert!(commit.consumed.is_none());
        assert_eq!(commit.successors[0].token, revived.token);
    }
}

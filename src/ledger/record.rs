//! What the history stream holds: run events, and the ledger's own records that make each step of a
//! run happen once however many copies of its message exist — a [`Claim`] on the state a message
//! carries, the [`Commit`] that records what the step did (its events and the messages it sent on),
//! a [`Release`] of a claim given up, and the markers readers publish to find the end.
//!
//! A message's *slot* is its deterministic id (one per run, stage and branch, see
//! [`crate::model::envelope::message_id`]); its *token* names the state a copy carries and is new
//! after every step that records something. The first claim on a token in stream order holds it;
//! the holder's commit consumes the token and makes its successors' tokens live. A step may also
//! commit without a claim: then the first commit read that consumes a token counts.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::events::Event;
use crate::model::envelope::{Branch, Envelope, Stage};

/// A claim on the step of one message state: "I am about to carry out what state `token` of slot
/// `message_id` leads to". The first claim read for a token holds it; a later one holds it only
/// when it names the holder in `supersedes` after the holder released it or timed out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    pub run_id: Uuid,
    pub pipeline: String,
    /// The slot: a stage message's id, or the run id for its admission.
    pub message_id: Uuid,
    pub token: Uuid,
    /// This claim's own id.
    pub claim: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supersedes: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// A message state made live by a commit: the copy of slot `message_id` carrying `token`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Successor {
    pub message_id: Uuid,
    pub token: Uuid,
    pub stage: Stage,
    pub branch: Branch,
}

impl Successor {
    /// The state `message` carries, as a commit lists it.
    pub fn of(message: &Envelope) -> Successor {
        Successor {
            message_id: message.message_id,
            token: message.token,
            stage: message.stage,
            branch: message.branch.clone(),
        }
    }
}

/// The slot and token a commit consumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consumed {
    pub message_id: Uuid,
    pub token: Uuid,
}

/// What a step did, recorded at once: the token it consumed (none for a replay, which only adds),
/// the messages it made live, and its events. Published after those messages, so a reader that
/// sees the commit knows they exist; one record, so a step's history is all there or not at all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Commit {
    pub run_id: Uuid,
    pub pipeline: String,
    /// The claim that held the consumed token; for a step that committed without claiming first
    /// (`Fencing::CommitFirst`), the step's own id, which its messages name as their maker.
    pub claim: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumed: Option<Consumed>,
    #[serde(default)]
    pub successors: Vec<Successor>,
    #[serde(default)]
    pub events: Vec<Event>,
    /// The successor this step did not publish but kept with its delivery (a wait due later,
    /// `runtime.keep_waits`): whoever the broker hands that delivery to next carries it on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<Kept>,
}

/// A successor kept with the delivery that made it, unpublished: a wait then costs the broker no
/// message of its own. The delivery the broker holds unacked for it carries `carrier` (an older
/// state of the same branch, spent); should that delivery come back (its worker died, its
/// connection dropped), the ledger finds this commit by the carrier's token and the successor is
/// carried on from here, exactly as it was kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kept {
    /// The token of the message whose delivery holds the successor.
    pub carrier: Uuid,
    /// The successor's token (it is among the commit's successors).
    pub token: Uuid,
    /// The successor as it would have been published (its JSON, not parsed by readers that only
    /// fold the history).
    pub message: Box<serde_json::value::RawValue>,
}

impl Kept {
    /// The successor `message` kept with the delivery of the copy carrying `carrier`.
    pub fn new(carrier: Uuid, message: &Envelope) -> Result<Kept, serde_json::Error> {
        Ok(Kept {
            carrier,
            token: message.token,
            message: serde_json::value::to_raw_value(message)?,
        })
    }

    /// The successor, decoded.
    pub fn message(&self) -> Result<Envelope, String> {
        Envelope::decode(self.message.get().as_bytes()).map_err(|e| e.to_string())
    }
}

impl PartialEq for Kept {
    fn eq(&self, other: &Kept) -> bool {
        self.carrier == other.carrier && self.token == other.token && self.message.get() == other.message.get()
    }
}

/// A claim given up before its commit (its holder could not finish): the next claim may hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub run_id: Uuid,
    pub pipeline: String,
    pub claim: Uuid,
}

/// One item of the history stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Event(Event),
    Claim(Claim),
    Commit(Commit),
    Release(Release),
    /// Published by a reader to find the end of what was published before it.
    Marker(Uuid),
}

/// Routing keys of the ledger's records on the events exchange. An event's key has three parts
/// (`pipeline.stage.kind`), a marker's is `marker`: none of them can be taken for another.
pub mod keys {
    pub const CLAIM: &str = "ledger.claim";
    pub const COMMIT: &str = "ledger.commit";
    pub const RELEASE: &str = "ledger.release";
    pub const MARKER: &str = "marker";
}

#[derive(Serialize, Deserialize)]
struct MarkerBody {
    marker: Uuid,
}

impl Record {
    /// The routing key it is published with.
    pub fn routing_key(&self) -> String {
        match self {
            Record::Event(event) => event.routing_key(),
            Record::Claim(_) => keys::CLAIM.to_string(),
            Record::Commit(_) => keys::COMMIT.to_string(),
            Record::Release(_) => keys::RELEASE.to_string(),
            Record::Marker(_) => keys::MARKER.to_string(),
        }
    }

    /// The body it is published with (JSON).
    pub fn encode(&self) -> Vec<u8> {
        let encoded = match self {
            Record::Event(event) => serde_json::to_vec(event),
            Record::Claim(claim) => serde_json::to_vec(claim),
            Record::Commit(commit) => serde_json::to_vec(commit),
            Record::Release(release) => serde_json::to_vec(release),
            Record::Marker(marker) => serde_json::to_vec(&MarkerBody { marker: *marker }),
        };
        encoded.expect("records serialize")
    }

    /// Reads a record back from its routing key and body.
    pub fn decode(routing_key: &str, body: &[u8]) -> Result<Record, String> {
        let parsed = match routing_key {
            keys::CLAIM => serde_json::from_slice(body).map(Record::Claim),
            keys::COMMIT => serde_json::from_slice(body).map(Record::Commit),
            keys::RELEASE => serde_json::from_slice(body).map(Record::Release),
            keys::MARKER => serde_json::from_slice::<MarkerBody>(body).map(|m| Record::Marker(m.marker)),
            _ => serde_json::from_slice(body).map(Record::Event),
        };
        parsed.map_err(|e| format!("`{routing_key}` record does not parse: {e}"))
    }

    /// The run events it carries: an event's own, a commit's, none for the others.
    pub fn events(&self) -> &[Event] {
        match self {
            Record::Event(event) => std::slice::from_ref(event),
            Record::Commit(commit) => &commit.events,
            _ => &[],
        }
    }

    /// The run it is about, if any.
    pub fn run_id(&self) -> Option<Uuid> {
        match self {
            Record::Event(event) => Some(event.run_id),
            Record::Claim(claim) => Some(claim.run_id),
            Record::Commit(commit) => Some(commit.run_id),
            Record::Release(release) => Some(release.run_id),
            Record::Marker(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventKind;

    fn event() -> Event {
        Event {
            run_id: Uuid::new_v4(),
            pipeline: "nightly".into(),
            version: "2026.1202.0".into(),
            stage: Stage::Snapshot,
            branch: Branch::Trunk,
            at: OffsetDateTime::UNIX_EPOCH,
            kind: EventKind::Waiting {
                what: "snapshots".into(),
            },
        }
    }

    #[test]
    fn every_record_reads_back_as_itself_from_its_key_and_body() {
        let run_id = Uuid::new_v4();
        let kept = crate::runtime::testkit::envelope(Stage::Replicate);
        let records = [
            Record::Event(event()),
            Record::Claim(Claim {
                run_id,
                pipeline: "nightly".into(),
                message_id: Uuid::new_v4(),
                token: Uuid::new_v4(),
                claim: Uuid::new_v4(),
                supersedes: Some(Uuid::new_v4()),
                at: OffsetDateTime::UNIX_EPOCH,
            }),
            Record::Commit(Commit {
                kept: None,
                run_id,
                pipeline: "nightly".into(),
                claim: Uuid::new_v4(),
                consumed: Some(Consumed {
                    message_id: Uuid::new_v4(),
                    token: Uuid::new_v4(),
                }),
                successors: vec![Successor {
                    message_id: Uuid::new_v4(),
                    token: Uuid::new_v4(),
                    stage: Stage::PoolCreate,
                    branch: Branch::Pool {
                        region: "eastus".into(),
                        target: "render".into(),
                    },
                }],
                events: vec![event(), event()],
            }),
            Record::Commit(Commit {
                kept: Some(Kept::new(Uuid::new_v4(), &kept).unwrap()),
                run_id,
                pipeline: "nightly".into(),
                claim: Uuid::new_v4(),
                consumed: None,
                successors: vec![Successor::of(&kept)],
                events: Vec::new(),
            }),
            Record::Release(Release {
                run_id,
                pipeline: "nightly".into(),
                claim: Uuid::new_v4(),
            }),
            Record::Marker(Uuid::new_v4()),
        ];
        for record in records {
            let back = Record::decode(&record.routing_key(), &record.encode()).unwrap();
            assert_eq!(back, record);
        }
        // What a commit keeps is the successor itself.
        let commit = Record::Commit(Commit {
            kept: Some(Kept::new(Uuid::new_v4(), &kept).unwrap()),
            run_id,
            pipeline: "nightly".into(),
            claim: Uuid::new_v4(),
            consumed: None,
            successors: Vec::new(),
            events: Vec::new(),
        });
        let Record::Commit(back) = Record::decode(keys::COMMIT, &commit.encode()).unwrap() else {
            panic!("a commit reads back as a commit");
        };
        let back = back.kept.unwrap().message().unwrap();
        assert_eq!(back.encode(), kept.encode());
        let error = Record::decode(keys::COMMIT, b"{\"run_id\": 3}").unwrap_err();
        assert!(error.contains("ledger.commit"), "{error}");
    }

    #[test]
    fn a_commit_carries_its_events_and_a_claim_none() {
        let commit = Record::Commit(Commit {
            kept: None,
            run_id: Uuid::nil(),
            pipeline: "p".into(),
            claim: Uuid::nil(),
            consumed: None,
            successors: Vec::new(),
            events: vec![event(), event()],
        });
        assert_eq!(commit.events().len(), 2);
        assert_eq!(Record::Event(event()).events().len(), 1);
        assert!(Record::Marker(Uuid::nil()).events().is_empty());
    }
}

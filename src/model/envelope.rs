//! The message envelope, version 1: everything a run's step needs travels in it, so workers keep no
//! state and any worker can take any message. Documented as JSON Schema in
//! `schemas/envelope-v1.schema.json`; a message of another version, or one that does not parse, is
//! parked with the reason, never dropped.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use super::ids::{BatchAccountId, GalleryImageVersionId, ImageId, SnapshotId};
use super::plan::Plan;
use super::spec::PipelineSpec;

pub const ENVELOPE_VERSION: u32 = 1;
/// Larger messages are refused (and parked): a run's state is a few kilobytes.
pub const MAX_ENVELOPE_BYTES: usize = 1024 * 1024;

/// The six stages, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    Snapshot,
    ImageCreate,
    GalleryPublish,
    Replicate,
    PoolCreate,
    Verify,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Snapshot,
        Stage::ImageCreate,
        Stage::GalleryPublish,
        Stage::Replicate,
        Stage::PoolCreate,
        Stage::Verify,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Snapshot => "snapshot",
            Stage::ImageCreate => "image-create",
            Stage::GalleryPublish => "gallery-publish",
            Stage::Replicate => "replicate",
            Stage::PoolCreate => "pool-create",
            Stage::Verify => "verify",
        }
    }

    pub fn parse(text: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which part of the run tree a message is: the trunk (before fan-out), one region, or one pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Branch {
    Trunk,
    Pool { region: String, target: String },
}

impl Branch {
    pub fn label(&self) -> String {
        match self {
            Branch::Trunk => "trunk".to_string(),
            Branch::Pool { region, target } => format!("{region}/{target}"),
        }
    }
}

/// An Azure operation the message is waiting on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InFlight {
    /// What is awaited, e.g. `snapshot`, `image`, `replication`, `allocation`.
    pub what: String,
    /// `Azure-AsyncOperation` URL when Azure gave one.
    #[serde(default)]
    pub status_url: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub started: OffsetDateTime,
    /// Do not look before this (Retry-After, or the delay chosen).
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// Looks taken so far.
    #[serde(default)]
    pub polls: u32,
}

/// What the run has produced so far (resource ids), plus facts later stages need.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifacts {
    #[serde(default)]
    pub snapshots: Vec<SnapshotArtifact>,
    #[serde(default)]
    pub image: Option<ImageId>,
    #[serde(default)]
    pub image_version: Option<GalleryImageVersionId>,
    /// Regions whose replica completed (pools there were started).
    #[serde(default)]
    pub regions_completed: Vec<String>,
    /// Regions whose replication failed for good, with the reason.
    #[serde(default)]
    pub regions_failed: BTreeMap<String, String>,
    /// Times a failed region was removed and added back.
    #[serde(default)]
    pub region_retries: BTreeMap<String, u32>,
    #[serde(default)]
    pub pool: Option<PoolArtifact>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotArtifact {
    /// `None` for the OS disk.
    pub lun: Option<u32>,
    pub id: SnapshotId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolArtifact {
    pub account: BatchAccountId,
    pub account_url: String,
    pub pool_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Always [`ENVELOPE_VERSION`].
    pub v: u32,
    pub message_id: Uuid,
    pub run_id: Uuid,
    pub pipeline: String,
    /// The image version this run publishes or rolls out.
    pub version: String,
    pub stage: Stage,
    pub branch: Branch,
    /// The pipeline as written.
    pub spec: PipelineSpec,
    /// What the planner resolved (replicas, timeouts, SKUs, names).
    pub plan: Plan,
    #[serde(default)]
    pub artifacts: Artifacts,
    #[serde(default)]
    pub operation: Option<InFlight>,
    /// Do not hand the message to its stage before this, when no operation is in flight to carry
    /// the time (a retry after a failed call, a wait without an operation). Set by the runtime.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub not_before: Option<OffsetDateTime>,
    /// Consecutive failed attempts at the current step (the runtime resets it when a step succeeds).
    #[serde(default)]
    pub attempt: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub run_started: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub stage_started: OffsetDateTime,
    /// W3C trace context of the run.
    pub traceparent: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EnvelopeError {
    #[error("message of {0} bytes is over the limit of {MAX_ENVELOPE_BYTES}")]
    TooLarge(usize),
    #[error("message is not JSON: {0}")]
    NotJson(String),
    #[error("message has envelope version {0}; this build reads version {ENVELOPE_VERSION}")]
    WrongVersion(u64),
    #[error("message does not match envelope v1: {0}")]
    Schema(String),
}

impl Envelope {
    /// Decodes a message, refusing what is oversized, not JSON, of another version or malformed.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge(bytes.len()));
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
        match value.get("v").and_then(|v| v.as_u64()) {
            Some(v) if v == ENVELOPE_VERSION as u64 => {}
            Some(v) => return Err(EnvelopeError::WrongVersion(v)),
            None => return Err(EnvelopeError::Schema("missing `v`".into())),
        }
        serde_json::from_value(value).map_err(|e| EnvelopeError::Schema(e.to_string()))
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("envelopes serialize")
    }

    /// The same run moved to `stage` as a new message (new id, attempts and operation reset).
    pub fn next(&self, stage: Stage, now: OffsetDateTime) -> Envelope {
        let mut next = self.clone();
        next.message_id = Uuid::new_v4();
        next.stage = stage;
        next.operation = None;
        next.not_before = None;
        next.attempt = 0;
        next.stage_started = now;
        next
    }

    /// A child branch of this run for one pool.
    pub fn for_pool(&self, stage: Stage, region: &str, target: &str, now: OffsetDateTime) -> Envelope {
        let mut child = self.next(stage, now);
        child.branch = Branch::Pool {
            region: region.to_string(),
            target: target.to_string(),
        };
        child
    }

    /// When the message may next be looked at: the later of its own hold and its operation's.
    pub fn due(&self) -> Option<OffsetDateTime> {
        let op = self.operation.as_ref().map(|op| op.not_before);
        match (self.not_before, op) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Holds the message until at least `at`: on its operation when one is in flight (the time to
    /// look at it next), on the envelope otherwise. Never moves an existing hold earlier.
    pub fn hold_until(&mut self, at: OffsetDateTime) {
        match &mut self.operation {
            Some(op) => op.not_before = op.not_before.max(at),
            None => self.not_before = Some(self.not_before.map_or(at, |t| t.max(at))),
        }
    }

    /// A stable key for deduplicating a step's effects: the run, the stage and the branch.
    pub fn step_key(&self) -> String {
        format!("{}:{}:{}", self.run_id, self.stage, self.branch.label())
    }
}

/// A W3C `traceparent` for a new run.
pub fn new_traceparent() -> String {
    let trace = Uuid::new_v4().simple().to_string();
    let span = &Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace}-{span}-01")
}

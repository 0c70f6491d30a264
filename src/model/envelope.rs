//! The message envelope, version 2: everything a run's step needs travels in it, so workers keep no
//! state and any worker can take any message. Documented as JSON Schema in
//! `schemas/envelope-v2.schema.json`; a message of another version, or one that does not parse, is
//! parked with the reason, never dropped (version 1 carried each pool's Batch body as JSON: its
//! messages are parked as another version by this build, and this build's by one of version 1).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use super::ids::{BatchAccountId, GalleryImageVersionId, ImageId, SnapshotId};
use super::plan::Plan;
use super::spec::PipelineSpec;

pub const ENVELOPE_VERSION: u32 = 2;
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
    Pool {
        region: String,
        target: String,
    },
    /// Deleting intermediates the run no longer needs, beside the trunk.
    CleanUp {
        what: Intermediate,
    },
}

impl Branch {
    pub fn label(&self) -> String {
        match self {
            Branch::Trunk => "trunk".to_string(),
            Branch::Pool { region, target } => format!("{region}/{target}"),
            Branch::CleanUp { what } => format!("clean-up/{}", what.as_str()),
        }
    }
}

/// What a clean-up branch deletes: the snapshots once the image exists, the image once the
/// version exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Intermediate {
    Snapshots,
    Image,
}

impl Intermediate {
    pub fn as_str(self) -> &'static str {
        match self {
            Intermediate::Snapshots => "snapshots",
            Intermediate::Image => "image",
        }
    }
}

/// What a waiting message waits on. Its wire name is also the `what` label of the operation
/// metrics and of the run's `Waiting` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The build VM's disks being copied (`snapshot`).
    Snapshots,
    /// The managed image being made (`image-create`).
    Image,
    /// The gallery being created (`gallery-publish`).
    Gallery,
    /// The image definition being created (`gallery-publish`).
    Definition,
    /// `Microsoft.Batch` being registered in the gallery's subscription (`gallery-publish`).
    Registration,
    /// The image version replicating to its regions (`replicate`).
    Replication,
    /// The pool allocating its nodes (`verify`).
    Allocation,
    /// The pool's nodes starting until enough are idle (`verify`).
    Nodes,
    /// Older versions' pools being retired (verify's rollout).
    Retire,
    /// Intermediates being deleted (a clean-up branch).
    Delete,
    /// Room under the Batch account's pool quota, a retired pool being deleted (`pool-create`).
    #[serde(rename = "pool_quota")]
    PoolQuota,
}

impl Phase {
    pub const ALL: [Phase; 11] = [
        Phase::Snapshots,
        Phase::Image,
        Phase::Gallery,
        Phase::Definition,
        Phase::Registration,
        Phase::Replication,
        Phase::Allocation,
        Phase::Nodes,
        Phase::Retire,
        Phase::Delete,
        Phase::PoolQuota,
    ];

    /// Its wire name (the serde one): a metric label and the `Waiting` event's text.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Snapshots => "snapshots",
            Phase::Image => "image",
            Phase::Gallery => "gallery",
            Phase::Definition => "definition",
            Phase::Registration => "registration",
            Phase::Replication => "replication",
            Phase::Allocation => "allocation",
            Phase::Nodes => "nodes",
            Phase::Delete => "delete",
            Phase::PoolQuota => "pool_quota",
            Phase::Retire => "retire",
        }
    }
}

/// An Azure operation the message is waiting on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InFlight {
    pub what: Phase,
    /// `Azure-AsyncOperation` URLs of the operations still awaited, when Azure gave them.
    #[serde(default)]
    pub status_urls: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub started: OffsetDateTime,
    /// Do not look before this (Retry-After, or the delay chosen).
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// Looks taken so far.
    #[serde(default)]
    pub polls: u32,
    /// Progress seen per item (e.g. per region), to estimate when it completes.
    #[serde(default)]
    pub progress: BTreeMap<String, Progress>,
}

/// One progress reading: percent done at a time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub percent: u8,
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
    /// Regions removed after a failure, to be added back once the version settles.
    #[serde(default)]
    pub regions_to_readd: Vec<String>,
    #[serde(default)]
    pub pool: Option<PoolArtifact>,
    /// Resources this run recorded as created (their `ResourceCreated` went out) among those a
    /// later step acts on: the gallery and the definition (what a repeat adopts only once), the
    /// image version (verify promotes it without reading it first), and the snapshots until the
    /// trunk hands them to their clean-up (deleted without reading their tags first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recorded: Vec<String>,
    /// Looks in a row at a side effect that failed: retiring previous pools (verify's rollout
    /// phase) or deleting intermediates (a clean-up branch).
    #[serde(default, skip_serializing_if = "is_zero")]
    #[serde(rename = "retire_failures")]
    pub side_effect_failures: u32,
    /// Resources a clean-up branch asked Azure to delete and has not yet seen gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleting: Vec<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
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
    /// The pipeline as written; shared, not copied, by the messages made from one another.
    pub spec: Arc<PipelineSpec>,
    /// What the planner resolved (replicas, timeouts, SKUs, names); shared as `spec` is.
    pub plan: Arc<Plan>,
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
    /// W3C trace context of the run: its trace id stays for the whole run; the parent span id is
    /// the span (admission or handled delivery) that sent this message.
    pub traceparent: String,
    /// The state this copy carries, for the ledger: new at every step that records something (a
    /// wait that records nothing keeps it). Nil in a message from before the ledger (not fenced).
    #[serde(default, skip_serializing_if = "Uuid::is_nil")]
    pub token: Uuid,
    /// The step that sent this state on: its claim, or its commit's id when it committed first
    /// (nil: none, or from before the ledger).
    #[serde(default, skip_serializing_if = "Uuid::is_nil")]
    pub made_by: Uuid,
    /// The state the step that sent this one on consumed, when that step committed without
    /// claiming first (nil otherwise): once another step has spent that state, this copy is an
    /// orphan (the ledger's `Fencing::CommitFirst`).
    #[serde(default, skip_serializing_if = "Uuid::is_nil")]
    pub made_from: Uuid,
    /// The claim that admitted the run (nil: from before the ledger). What the run makes is tagged
    /// with it, so a repeated step tells what this admission made from what an earlier run of the
    /// same version made.
    #[serde(default, skip_serializing_if = "Uuid::is_nil")]
    pub admission: Uuid,
}

/// The namespace of message ids (UUID v5).
const MESSAGE_NAMESPACE: Uuid = Uuid::from_u128(0x6d1c_1c5e_2a47_4f0e_9b1a_5d3e_7c2f_0a11);

/// The id of run `run_id`'s message at `stage` on `branch`: one id per step of a run, whichever
/// copy or retry carries it, so "one message per step" can be checked and duplicates recognised.
pub fn message_id(run_id: Uuid, stage: Stage, branch: &Branch) -> Uuid {
    Uuid::new_v5(
        &MESSAGE_NAMESPACE,
        format!("{run_id}:{stage}:{}", branch.label()).as_bytes(),
    )
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EnvelopeError {
    #[error("message of {0} bytes is over the limit of {MAX_ENVELOPE_BYTES}")]
    TooLarge(usize),
    #[error("message is not JSON: {0}")]
    NotJson(String),
    #[error("message has envelope version {0}; this build reads version {ENVELOPE_VERSION}")]
    WrongVersion(u64),
    #[error("message does not match envelope v{ENVELOPE_VERSION}: {0}")]
    Schema(String),
}

/// Only the version of a message; everything else is skipped.
#[derive(Deserialize)]
struct VersionProbe {
    #[serde(default)]
    v: Option<serde_json::Value>,
}

impl Envelope {
    /// Decodes a message, refusing what is oversized, not JSON, of another version or malformed.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge(bytes.len()));
        }
        // The version first, skipping the rest (another version must be refused as that, not as a
        // mismatch), then the envelope straight from the bytes: building a `serde_json::Value` of
        // the whole message on the way made decoding twice as slow, and every look at a waiting
        // run decodes its message.
        let probe: VersionProbe = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => EnvelopeError::Schema(e.to_string()),
            // serde reads a struct from an array too, and then fails on what follows: JSON that is
            // not an object is a wrong shape, not broken JSON.
            _ if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok() => {
                EnvelopeError::Schema("an envelope is a JSON object".into())
            }
            _ => EnvelopeError::NotJson(e.to_string()),
        })?;
        // serde also reads a struct from an array (`[1]` has "version" 1): only an object is one.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(EnvelopeError::Schema("an envelope is a JSON object".into()));
        }
        match probe.v.as_ref().and_then(serde_json::Value::as_u64) {
            Some(v) if v == ENVELOPE_VERSION as u64 => {}
            Some(v) => return Err(EnvelopeError::WrongVersion(v)),
            None => return Err(EnvelopeError::Schema("missing `v`".into())),
        }
        serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Schema(e.to_string()))
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("envelopes serialize")
    }

    /// The same run moved to `stage` as the message of that step (its id, attempts and operation
    /// reset).
    pub fn next(&self, stage: Stage, now: OffsetDateTime) -> Envelope {
        let mut next = self.clone();
        next.message_id = message_id(self.run_id, stage, &self.branch);
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
        child.message_id = message_id(self.run_id, stage, &child.branch);
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
    super::trace::TraceParent::new().to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::ids::{GalleryId, GalleryImageId};
    use crate::model::spec::PipelineSpec;

    const SPEC: &str = r#"
name = "rollout-test"
[gallery]
id = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg/providers/Microsoft.Compute/galleries/g"
[definition]
name = "d"
os_type = "Linux"
publisher = "p"
offer = "o"
sku = "s"
[version]
scheme = "existing"
value = "1.0.0"
[[pools]]
target = "t"
account = "/subscriptions/22222222-2222-4222-8222-222222222222/resourceGroups/rg/providers/Microsoft.Batch/batchAccounts/a"
vm_size = "Standard_D2s_v5"
dedicated_nodes = 2
node_agent_sku_id = "batch.node.ubuntu 22.04"
"#;

    /// A small valid envelope for tests.
    pub fn sample() -> Envelope {
        let spec = PipelineSpec::parse(SPEC, "sample.toml").expect("sample spec");
        let gallery = GalleryId::parse(&spec.gallery.id.to_string()).unwrap();
        let definition =
            GalleryImageId::new(gallery.subscription(), gallery.resource_group(), &[gallery.name(), "d"]).unwrap();
        let now = OffsetDateTime::now_utc();
        Envelope {
            v: ENVELOPE_VERSION,
            message_id: Uuid::new_v4(),
            run_id: Uuid::new_v4(),
            pipeline: spec.name.clone(),
            version: "1.0.0".into(),
            stage: Stage::PoolCreate,
            branch: Branch::Pool {
                region: "westeurope".into(),
                target: "t".into(),
            },
            plan: Arc::new(Plan {
                version: "1.0.0".into(),
                build: None,
                gallery,
                gallery_region: "westeurope".into(),
                create_gallery: false,
                version_id: definition.version("1.0.0").unwrap(),
                definition,
                regions: Vec::new(),
                pools: Vec::new(),
                publish_excluded: false,
                final_excluded: false,
                end_of_life: None,
                register_batch_in: Vec::new(),
                quota_use: Vec::new(),
                seen: Default::default(),
                warnings: Vec::new(),
            }),
            spec: Arc::new(spec),
            artifacts: Artifacts::default(),
            operation: Some(InFlight {
                what: Phase::Allocation,
                status_urls: vec!["https://management.azure.com/x".into()],
                started: now,
                not_before: now,
                polls: 1,
                progress: BTreeMap::from([("eastus".to_string(), Progress { at: now, percent: 40 })]),
            }),
            attempt: 0,
            not_before: Some(now),
            run_started: now,
            stage_started: now,
            traceparent: new_traceparent(),
            token: Uuid::new_v4(),
            made_by: Uuid::new_v4(),
            made_from: Uuid::new_v4(),
            admission: Uuid::new_v4(),
        }
    }

    #[test]
    fn round_trips_and_refuses_what_it_cannot_read() {
        let envelope = sample();
        assert_eq!(Envelope::decode(&envelope.encode()).unwrap(), envelope);
        assert!(matches!(Envelope::decode(b"not json"), Err(EnvelopeError::NotJson(_))));
        assert_eq!(Envelope::decode(br#"{"v":1}"#), Err(EnvelopeError::WrongVersion(1)));
        assert_eq!(Envelope::decode(br#"{"v":3}"#), Err(EnvelopeError::WrongVersion(3)));
        assert!(matches!(Envelope::decode(br#"{"v":2}"#), Err(EnvelopeError::Schema(_))));
        assert!(matches!(
            Envelope::decode(br#"{"v":"1"}"#),
            Err(EnvelopeError::Schema(_))
        ));
        assert!(matches!(Envelope::decode(br#""v""#), Err(EnvelopeError::Schema(_))));
        assert!(matches!(Envelope::decode(br#"{"v":1"#), Err(EnvelopeError::NotJson(_))));
        for not_an_object in [&b"[1,2,3]"[..], b"[1]", b"42", b"null"] {
            assert!(
                matches!(Envelope::decode(not_an_object), Err(EnvelopeError::Schema(_))),
                "{}",
                String::from_utf8_lossy(not_an_object)
            );
        }
        let mut extra: serde_json::Value = serde_json::from_slice(&envelope.encode()).unwrap();
        extra["surprise"] = serde_json::json!(1);
        assert!(matches!(
            Envelope::decode(extra.to_string().as_bytes()),
            Err(EnvelopeError::Schema(_))
        ));
        let big = vec![b' '; MAX_ENVELOPE_BYTES + 1];
        assert_eq!(
            Envelope::decode(&big),
            Err(EnvelopeError::TooLarge(MAX_ENVELOPE_BYTES + 1))
        );
    }

    #[test]
    fn a_phases_label_is_its_wire_name() {
        for phase in Phase::ALL {
            assert_eq!(serde_json::to_value(phase).unwrap(), phase.as_str(), "{phase:?}");
        }
    }

    #[test]
    fn the_json_schema_describes_the_envelope() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../schemas/envelope-v2.schema.json")).unwrap();
        let encoded: serde_json::Value = serde_json::from_slice(&sample().encode()).unwrap();
        let properties = schema["properties"].as_object().unwrap();
        for key in encoded.as_object().unwrap().keys() {
            assert!(properties.contains_key(key), "schema lacks `{key}`");
        }
        for key in properties.keys() {
            assert!(encoded.get(key).is_some(), "schema has `{key}`, the envelope does not");
        }
        for required in schema["required"].as_array().unwrap() {
            assert!(
                encoded.get(required.as_str().unwrap()).is_some(),
                "required {required} missing"
            );
        }
        for nested in ["artifacts", "operation"] {
            let declared = schema["properties"][nested]["properties"].as_object().unwrap();
            for key in encoded[nested].as_object().unwrap().keys() {
                assert!(declared.contains_key(key), "schema lacks `{nested}.{key}`");
            }
        }
        let traceparent = encoded["traceparent"].as_str().unwrap();
        assert_eq!(traceparent.len(), 55);
        assert_eq!(encoded["stage"], "pool-create");
        assert_eq!(encoded["branch"]["kind"], "pool");
    }
}

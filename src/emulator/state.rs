//! Everything the emulated Azure holds after start: ARM resources the clients created, their
//! operations, provider registrations and Batch pools. Lifecycles are stored as timelines fixed when
//! an operation starts (durations and injected failures are drawn then), and every read derives the
//! current state from the emulated clock, so nothing runs in the background.
//!
//! With a state directory the whole structure is written after each change (write then rename) and
//! read back at start, so a restarted emulator continues where it stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::{Duration, OffsetDateTime};

use super::clock::EmuTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Snapshot,
    Image,
    Gallery,
    GalleryImage,
    GalleryImageVersion,
}

impl Kind {
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::Snapshot => "Microsoft.Compute/snapshots",
            Kind::Image => "Microsoft.Compute/images",
            Kind::Gallery => "Microsoft.Compute/galleries",
            Kind::GalleryImage => "Microsoft.Compute/galleries/images",
            Kind::GalleryImageVersion => "Microsoft.Compute/galleries/images/versions",
        }
    }

    /// Which operation-status family the resource's LROs report through.
    pub fn flavor(self) -> OpFlavor {
        match self {
            Kind::Snapshot => OpFlavor::Disk,
            Kind::Image => OpFlavor::Compute,
            _ => OpFlavor::Caps,
        }
    }
}

/// ARM error as stored with a failed operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
}

/// One operation's span on the emulated clock and how it ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timeline {
    pub op_id: String,
    pub started: EmuTime,
    pub ends: EmuTime,
    pub creating: bool,
    pub failure: Option<ErrorInfo>,
}

impl Timeline {
    pub fn running(&self, now: EmuTime) -> bool {
        now < self.ends
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionReplication {
    pub region: String,
    pub replicas: u32,
    pub storage_account_type: String,
    pub starts: EmuTime,
    pub ends: EmuTime,
    /// If set, replication stops at this progress (percent) and the region reads Failed.
    pub fails_at: Option<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationState {
    Unknown,
    Replicating(u8),
    Completed,
    Failed(u8),
}

impl RegionReplication {
    pub fn state(&self, now: EmuTime) -> ReplicationState {
        if now < self.starts {
            return ReplicationState::Unknown;
        }
        let span = (self.ends - self.starts).as_seconds_f64().max(1.0);
        let progress = (((now - self.starts).as_seconds_f64() / span) * 100.0).clamp(0.0, 100.0) as u8;
        match self.fails_at {
            Some(at) if progress >= at => ReplicationState::Failed(at),
            _ if now >= self.ends => ReplicationState::Completed,
            _ => ReplicationState::Replicating(progress.min(99)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resource {
    /// The id as the creator spelled it (ARM keeps the first spelling).
    pub id: String,
    pub kind: Kind,
    pub subscription: String,
    pub location: String,
    /// What the client sent (tags, sku, properties), normalized; read-only fields are added on reads.
    pub body: Value,
    /// Read-only facts fixed at creation (unique ids, sizes, the source's OS type...).
    pub facts: Value,
    pub created: EmuTime,
    pub current: Timeline,
    pub deleting: Option<Timeline>,
    #[serde(default)]
    pub replication: Vec<RegionReplication>,
}

impl Resource {
    /// ARM's `provisioningState` at `now`.
    pub fn provisioning_state(&self, now: EmuTime) -> &'static str {
        if let Some(deleting) = &self.deleting
            && deleting.running(now)
        {
            return "Deleting";
        }
        if self.current.running(now) {
            return match (self.kind, self.current.creating) {
                (Kind::Snapshot, _) => "Updating",
                (_, true) => "Creating",
                (_, false) => "Updating",
            };
        }
        if self.current.failure.is_some() {
            "Failed"
        } else {
            "Succeeded"
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpFlavor {
    /// `.../locations/{l}/operations/{id}` (images, VMs)
    Compute,
    /// `.../locations/{l}/DiskOperations/{id}` (snapshots, disks)
    Disk,
    /// `.../locations/{l}/capsOperations/{id}` (galleries)
    Caps,
}

impl OpFlavor {
    pub fn segment(self) -> &'static str {
        match self {
            OpFlavor::Compute => "operations",
            OpFlavor::Disk => "DiskOperations",
            OpFlavor::Caps => "capsOperations",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpKind {
    Put,
    Patch,
    Delete,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Operation {
    pub id: String,
    pub subscription: String,
    pub location: String,
    pub flavor: OpFlavor,
    pub kind: OpKind,
    pub resource_id: String,
    pub api_version: String,
    pub started: EmuTime,
    pub ends: EmuTime,
    pub failure: Option<ErrorInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProviderRegistration {
    /// When registration was asked for; `None` when registered in the world file.
    pub requested: Option<EmuTime>,
    pub registered_at: EmuTime,
}

/// A node of a Batch pool, fixed when the allocation that brought it starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub dedicated: bool,
    pub allocated: EmuTime,
    /// Seconds from allocation to `starting`, to `waitingforstarttask`/`idle`, and the start task's run.
    pub boot_secs: u32,
    pub agent_secs: u32,
    pub start_task_secs: u32,
    pub start_task_fails: bool,
    pub removed: Option<EmuTime>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResizeErrorInfo {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Allocation {
    pub started: EmuTime,
    pub ends: EmuTime,
    pub target_dedicated: u32,
    pub target_low_priority: u32,
    pub resize_timeout_secs: i64,
    pub error: Option<ResizeErrorInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pool {
    pub account: String,
    pub id: String,
    /// The add-pool body as sent (plus later PATCHes).
    pub body: Value,
    pub created: EmuTime,
    pub last_modified: EmuTime,
    pub etag_counter: u64,
    pub allocation: Allocation,
    pub nodes: Vec<Node>,
    pub deleting: Option<EmuTime>,
    pub wait_for_start_task: bool,
    pub has_start_task: bool,
    pub uses_gallery_image: bool,
}

/// A pool is gone once its deletion has run for this long.
pub const POOL_DELETE: Duration = Duration::minutes(2);

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub resources: BTreeMap<String, Resource>,
    pub operations: BTreeMap<String, Operation>,
    /// subscription (lower case) → namespace (lower case) → registration
    pub providers: BTreeMap<String, BTreeMap<String, ProviderRegistration>>,
    /// `account/pool` (lower case) → pool
    pub pools: BTreeMap<String, Pool>,
    pub next_serial: u64,
    /// When [`State::purge`] next has something to drop. It runs before every request, and a
    /// fleet's state holds thousands of entries: a walk over all of them per request was the
    /// emulator's largest single cost in the fleet bench, under the lock every request takes.
    #[serde(skip)]
    purge_due: PurgeDue,
}

/// When a deletion in progress next ends.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum PurgeDue {
    /// Not worked out yet (a new or loaded state): the next purge looks.
    #[default]
    Unknown,
    /// No deletion is in progress.
    Never,
    /// The earliest end of a deletion in progress.
    At(EmuTime),
}

impl State {
    pub fn key(id: &str) -> String {
        id.trim_end_matches('/').to_ascii_lowercase()
    }

    pub fn pool_key(account: &str, pool: &str) -> String {
        format!("{}/{}", account.to_ascii_lowercase(), pool.to_ascii_lowercase())
    }

    pub fn serial(&mut self) -> u64 {
        self.next_serial += 1;
        self.next_serial
    }

    /// Drops resources and pools whose deletion has finished (a walk over the whole state only
    /// once one may have).
    pub fn purge(&mut self, now: EmuTime) {
        match self.purge_due {
            PurgeDue::Never => return,
            PurgeDue::At(due) if now < due => return,
            PurgeDue::At(_) | PurgeDue::Unknown => {}
        }
        self.resources.retain(|_, r| {
            r.deleting
                .as_ref()
                .is_none_or(|d| d.running(now) || d.failure.is_some())
        });
        self.pools
            .retain(|_, p| p.deleting.is_none_or(|started| now < started + POOL_DELETE));
        self.purge_due = self.next_deletion_end();
    }

    /// A deletion started that ends at `ends`: the purge looks again by then.
    pub fn deletion_started(&mut self, ends: EmuTime) {
        self.purge_due = match self.purge_due {
            PurgeDue::At(due) => PurgeDue::At(due.min(ends)),
            PurgeDue::Never => PurgeDue::At(ends),
            PurgeDue::Unknown => PurgeDue::Unknown,
        };
    }

    fn next_deletion_end(&self) -> PurgeDue {
        let resources = self
            .resources
            .values()
            .filter_map(|r| r.deleting.as_ref())
            .filter(|d| d.failure.is_none())
            .map(|d| d.ends);
        let pools = self
            .pools
            .values()
            .filter_map(|p| p.deleting)
            .map(|started| started + POOL_DELETE);
        resources.chain(pools).min().map_or(PurgeDue::Never, PurgeDue::At)
    }

    pub fn get(&self, id: &str) -> Option<&Resource> {
        self.resources.get(&State::key(id))
    }

    /// Resources directly under `parent` of `kind` (for list calls).
    pub fn children(&self, parent: &str, kind: Kind) -> Vec<&Resource> {
        let prefix = format!("{}/", State::key(parent));
        self.resources
            .iter()
            .filter(|(k, r)| {
                r.kind == kind && k.starts_with(&prefix) && !k[prefix.len()..].trim_start_matches('/').is_empty()
            })
            .filter(|(k, _)| k[prefix.len()..].matches('/').count() == 1)
            .map(|(_, r)| r)
            .collect()
    }
}

/// What is written to the state directory.
#[derive(Serialize, Deserialize)]
struct Saved {
    state: State,
    emulated_now: EmuTime,
    real_now: OffsetDateTime,
    token_key: String,
}

pub struct Store {
    dir: Option<PathBuf>,
}

pub struct Restored {
    pub state: State,
    /// Where the emulated clock resumes: the saved emulated time plus the downtime, scaled.
    pub emulated_now: EmuTime,
    pub token_key: Vec<u8>,
}

impl Store {
    pub fn new(dir: Option<&Path>) -> Store {
        Store {
            dir: dir.map(Path::to_path_buf),
        }
    }

    fn file(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join("state.json"))
    }

    pub fn load(&self, scale: f64) -> anyhow::Result<Option<Restored>> {
        let Some(file) = self.file() else { return Ok(None) };
        if !file.exists() {
            return Ok(None);
        }
        let text = std::fs::read(&file)?;
        let saved: Saved = serde_json::from_slice(&text)
            .map_err(|e| anyhow::anyhow!("emulator state {} is unreadable: {e}", file.display()))?;
        let downtime = (OffsetDateTime::now_utc() - saved.real_now).max(Duration::ZERO);
        use base64::Engine;
        let token_key = base64::engine::general_purpose::STANDARD.decode(saved.token_key)?;
        Ok(Some(Restored {
            state: saved.state,
            emulated_now: saved.emulated_now + Duration::seconds_f64(downtime.as_seconds_f64() * scale),
            token_key,
        }))
    }

    pub fn save(&self, state: &State, emulated_now: EmuTime, token_key: &[u8]) -> anyhow::Result<()> {
        let Some(file) = self.file() else { return Ok(()) };
        use base64::Engine;
        let saved = SavedRef {
            state,
            emulated_now,
            real_now: OffsetDateTime::now_utc(),
            token_key: base64::engine::general_purpose::STANDARD.encode(token_key),
        };
        // It holds the token-signing key: readable by its owner alone (0600), from the first byte.
        let tmp = file.with_extension("json.tmp");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            out.write_all(&serde_json::to_vec(&saved)?)?;
        }
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        std::fs::rename(&tmp, &file)?;
        Ok(())
    }
}

#[derive(Serialize)]
struct SavedRef<'a> {
    state: &'a State,
    emulated_now: EmuTime,
    real_now: OffsetDateTime,
    token_key: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_moves_through_its_states() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let mut r = RegionReplication {
            region: "eastus".into(),
            replicas: 1,
            storage_account_type: "Standard_LRS".into(),
            starts: t0 + Duration::minutes(5),
            ends: t0 + Duration::minutes(15),
            fails_at: None,
        };
        assert_eq!(r.state(t0), ReplicationState::Unknown);
        assert_eq!(r.state(t0 + Duration::minutes(10)), ReplicationState::Replicating(50));
        assert_eq!(r.state(t0 + Duration::minutes(15)), ReplicationState::Completed);
        r.fails_at = Some(40);
        assert_eq!(r.state(t0 + Duration::minutes(20)), ReplicationState::Failed(40));
    }

    fn timeline(started: EmuTime, ends: EmuTime) -> Timeline {
        Timeline {
            op_id: "op".into(),
            started,
            ends,
            creating: false,
            failure: None,
        }
    }

    fn snapshot(name: &str, t0: EmuTime) -> Resource {
        Resource {
            id: format!("/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/snapshots/{name}"),
            kind: Kind::Snapshot,
            subscription: "s".into(),
            location: "westeurope".into(),
            body: Value::Null,
            facts: Value::Null,
            created: t0,
            current: timeline(t0, t0),
            deleting: None,
            replication: Vec::new(),
        }
    }

    /// Deletes `name` from `from` to `ends`, as the delete handler does.
    fn delete(state: &mut State, name: &str, from: EmuTime, ends: EmuTime) {
        let key = State::key(&snapshot(name, from).id);
        state.resources.get_mut(&key).expect("the snapshot exists").deleting = Some(timeline(from, ends));
        state.deletion_started(ends);
    }

    #[test]
    fn a_purge_drops_each_deletion_at_its_own_end_whatever_the_order_they_started_in() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let at = |secs: i64| t0 + Duration::seconds(secs);
        let mut state = State::default();
        for name in ["a", "b", "c"] {
            let r = snapshot(name, t0);
            state.resources.insert(State::key(&r.id), r);
        }
        let left = |state: &State| state.resources.len();
        state.purge(at(0));
        assert_eq!(left(&state), 3, "nothing deleting: nothing dropped");
        delete(&mut state, "a", at(10), at(100));
        // Started later, ends sooner: the purge must not wait for the first one's end.
        delete(&mut state, "b", at(20), at(50));
        state.purge(at(49));
        assert_eq!(left(&state), 3);
        state.purge(at(50));
        assert_eq!(left(&state), 2, "b is gone at its end");
        state.purge(at(99));
        assert_eq!(left(&state), 2);
        state.purge(at(100));
        assert_eq!(left(&state), 1, "a is gone at its end");
        // A state loaded from disk knows no due time: its first purge walks it.
        let mut loaded: State = serde_json::from_value(serde_json::to_value(&state).expect("saves")).expect("loads");
        let key = State::key(&snapshot("c", t0).id);
        loaded.resources.get_mut(&key).expect("c").deleting = Some(timeline(at(100), at(110)));
        loaded.purge(at(120));
        assert_eq!(
            left(&loaded),
            0,
            "a deletion that ended while the state was saved is dropped"
        );
    }
}

//! [`RunTracker`]: run-level state folded from the run history in stream order — which runs have
//! started and ended (and how), and at which stage each unfinished branch is. Pure: the caller
//! (the ledger tailing the shared events stream, a worker's or `sigrun run`'s)
//! feeds it events and turns what it reports into metrics. Every worker reads the same stream, so
//! every worker computes the same values.
//!
//! A run is folded, not kept: of its events only those that decide its result
//! (`events::decides_result`), and the stage of each branch's latest event. A waiting run's looks,
//! retries and resources (most of its history) cost nothing here, so a worker's memory does not
//! grow with how long its runs wait. Its `RunStarted` — most of what a waiting run holds — is
//! kept once per shape (regions, pools, entry stage) and shared by every run of that shape, and a
//! finished run keeps only its id.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::events::{Event, EventKind, RunResult, run_result};
use crate::model::envelope::{Branch, Stage};

/// A run starting or ending, as an event made it so.
#[derive(Debug, Clone, PartialEq)]
pub enum RunChange {
    Started {
        pipeline: String,
    },
    Finished {
        pipeline: String,
        result: &'static str,
        at: OffsetDateTime,
    },
}

#[derive(Default)]
struct RunState {
    /// Its first `RunStarted`, shared with every run of the same shape (see [`Shapes`]).
    started_as: Option<Arc<Event>>,
    /// Its other events that decide its result, while it runs (none while it only waits).
    deciding: Vec<Event>,
    /// Each branch's stage at its latest event (a dropped stale copy's aside). Where its
    /// unfinished branches are follows from it (`positions_of`), computed when needed rather
    /// than kept for each of thousands of waiting runs.
    latest: Vec<(Branch, Stage)>,
}

impl RunState {
    /// Where its unfinished branches are now (each counted once).
    fn positions(&self) -> Vec<Stage> {
        positions_of(self.started_as.as_deref(), &self.deciding, &self.latest)
    }
}

/// `RunStarted` events without what is particular to one run (its id, pipeline name, version and
/// time, which the result and the positions never read), one per distinct shape, each shared by
/// the runs of that shape and dropped with the last of them.
#[derive(Default)]
struct Shapes {
    by_key: HashMap<String, Arc<Event>>,
}

impl Shapes {
    fn share(&mut self, started: &Event) -> Arc<Event> {
        let shape = Event {
            run_id: Uuid::nil(),
            pipeline: String::new(),
            version: String::new(),
            at: OffsetDateTime::UNIX_EPOCH,
            ..started.clone()
        };
        let key = shape_key(&shape);
        Arc::clone(self.by_key.entry(key).or_insert_with(|| Arc::new(shape)))
    }

    /// Lets go of `shape` for a run that ended: the shape goes when no run holds it any more.
    fn release(&mut self, shape: Arc<Event>) {
        let key = shape_key(&shape);
        drop(shape);
        if self.by_key.get(&key).is_some_and(|kept| Arc::strong_count(kept) == 1) {
            self.by_key.remove(&key);
        }
    }
}

/// A shape's identity: its serialized form (every field of an event serializes).
fn shape_key(shape: &Event) -> String {
    serde_json::to_string(shape).unwrap_or_default()
}

/// Runs by id, and the branches in flight at each stage over all of them.
#[derive(Default)]
pub struct RunTracker {
    runs: HashMap<Uuid, RunState>,
    /// Runs that ended: nothing after their end changes anything.
    finished: HashSet<Uuid>,
    shapes: Shapes,
    in_flight: BTreeMap<Stage, usize>,
}

/// The `result` label of a run's result.
pub fn result_label(result: &RunResult) -> Option<&'static str> {
    match result {
        RunResult::Running => None,
        // Warnings (a rollout that could not retire previous pools) have their own events.
        RunResult::Succeeded | RunResult::SucceededWithWarnings { .. } => Some("succeeded"),
        RunResult::PartlySucceeded { .. } => Some("partly_succeeded"),
        RunResult::Failed { .. } => Some("failed"),
        RunResult::Cancelled { .. } => Some("cancelled"),
    }
}

pub const RESULTS: [&str; 4] = ["succeeded", "partly_succeeded", "failed", "cancelled"];

impl RunTracker {
    /// Folds in the next event of the stream; says whether a run started or ended with it.
    pub fn apply(&mut self, event: &Event) -> Vec<RunChange> {
        let mut changes = Vec::new();
        if self.finished.contains(&event.run_id) {
            return changes;
        }
        let run = self.runs.entry(event.run_id).or_default();
        let before = run.positions();
        note_latest(&mut run.latest, event);
        // Only what decides the result is kept: another kind cannot end the run (it still moves
        // its branch, through `latest`).
        let decides = crate::events::decides_result(&event.kind);
        if matches!(event.kind, EventKind::RunStarted { .. }) && run.started_as.is_none() {
            run.started_as = Some(self.shapes.share(event));
            changes.push(RunChange::Started {
                pipeline: event.pipeline.clone(),
            });
        } else if decides {
            run.deciding.push(event.clone());
        }
        // Only a started run ends here: a failure before `RunStarted` (possible: the first step
        // runs before it is published) is judged when `RunStarted` comes.
        let result = match &run.started_as {
            Some(started) if decides => result_label(&run_result(&decisive_events(started, &run.deciding))),
            _ => None,
        };
        let now = match result {
            Some(result) => {
                changes.push(RunChange::Finished {
                    pipeline: event.pipeline.clone(),
                    result,
                    at: event.at,
                });
                self.end(event.run_id);
                Vec::new()
            }
            None => run.positions(),
        };
        self.move_positions(before, now);
        changes
    }

    /// Forgets an ended run but its id.
    fn end(&mut self, run_id: Uuid) {
        if let Some(run) = self.runs.remove(&run_id)
            && let Some(shape) = run.started_as
        {
            self.shapes.release(shape);
        }
        self.finished.insert(run_id);
    }

    /// Moves a run's branches from the stages they were at to those they are at now.
    fn move_positions(&mut self, before: Vec<Stage>, now: Vec<Stage>) {
        for stage in before {
            if let Some(count) = self.in_flight.get_mut(&stage) {
                *count = count.saturating_sub(1);
            }
        }
        for stage in now {
            *self.in_flight.entry(stage).or_default() += 1;
        }
    }

    /// Branches of unfinished runs at `stage`.
    pub fn in_flight(&self, stage: Stage) -> usize {
        self.in_flight.get(&stage).copied().unwrap_or(0)
    }

    /// Runs being followed (started or not yet), and distinct `RunStarted` shapes kept for them.
    #[cfg(test)]
    fn footprint(&self) -> (usize, usize) {
        (self.runs.len(), self.shapes.by_key.len())
    }
}

/// A run's result-deciding events in the order the result reads them: its `RunStarted` first
/// (only the first one counts, and where it stands among the others does not change the
/// result), then the rest as they came. Built only when one of them arrives.
fn decisive_events(started: &Event, deciding: &[Event]) -> Vec<Event> {
    std::iter::once(started).chain(deciding).cloned().collect()
}

/// The stage each unfinished branch of a running run is at: that of its latest event (a branch
/// moves on without an event of its own only until its next step records one). The trunk runs
/// until its replication ended for every region (or it failed); a pool branch starts when its
/// region's replica completed (at once when the run enters after replication) and ends verified,
/// failed, parked or cancelled.
pub fn branch_positions(events: &[Event]) -> Vec<Stage> {
    let mut latest: Vec<(Branch, Stage)> = Vec::new();
    for e in events {
        note_latest(&mut latest, e);
    }
    let started = events.iter().find(|e| matches!(e.kind, EventKind::RunStarted { .. }));
    let deciding: Vec<Event> = events
        .iter()
        .filter(|e| crate::events::decides_result(&e.kind))
        .cloned()
        .collect();
    positions_of(started, &deciding, &latest)
}

/// Records `event`'s stage as its branch's latest; a dropped stale copy says nothing of where its
/// branch is now. A branch only moves forward: a `Waiting` note of a copy that was overtaken
/// (published unfenced, it may come after the next stage's events) does not move it back.
fn note_latest(latest: &mut Vec<(Branch, Stage)>, event: &Event) {
    if matches!(event.kind, EventKind::DuplicateDropped { .. }) {
        return;
    }
    match latest.iter_mut().find(|(branch, _)| *branch == event.branch) {
        Some((_, stage)) => *stage = (*stage).max(event.stage),
        None => {
            // One more, not four: a waiting run has one branch, and thousands of runs wait.
            latest.reserve_exact(1);
            latest.push((event.branch.clone(), event.stage));
        }
    }
}

/// [`branch_positions`] from a run's first `RunStarted`, its result-deciding events and each
/// branch's latest stage.
fn positions_of(started: Option<&Event>, events: &[Event], latest: &[(Branch, Stage)]) -> Vec<Stage> {
    let Some((regions, pools, entry)) = started.and_then(|e| match &e.kind {
        EventKind::RunStarted { regions, pools, .. } => Some((regions, pools, e.stage)),
        _ => None,
    }) else {
        return Vec::new();
    };
    let latest = |branch: &Branch| latest.iter().find(|(b, _)| b == branch).map(|(_, stage)| *stage);
    let ends = |e: &Event| {
        matches!(
            e.kind,
            EventKind::RunFailed { .. }
                | EventKind::PoolVerified { .. }
                | EventKind::PoolFailed { .. }
                | EventKind::Parked { .. }
                | EventKind::Cancelled
        )
    };
    let region_ended = |name: &String| {
        events.iter().any(|e| match &e.kind {
            EventKind::RegionCompleted { region } | EventKind::RegionFailed { region, .. } => region == name,
            _ => false,
        })
    };
    let mut positions = Vec::new();
    if entry <= Stage::Replicate {
        let trunk_ended =
            events.iter().any(|e| e.branch == Branch::Trunk && ends(e)) || regions.iter().all(region_ended);
        if !trunk_ended {
            positions.push(latest(&Branch::Trunk).unwrap_or(entry));
        }
    }
    for pool in pools {
        let started = entry > Stage::Replicate
            || events
                .iter()
                .any(|e| matches!(&e.kind, EventKind::RegionCompleted { region } if *region == pool.region));
        if !started {
            continue;
        }
        let branch = Branch::Pool {
            region: pool.region.clone(),
            target: pool.target.clone(),
        };
        if events.iter().any(|e| e.branch == branch && ends(e)) {
            continue;
        }
        let at = latest(&branch).unwrap_or(entry.max(Stage::PoolCreate));
        positions.push(at);
    }
    positions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::PoolRef;

    fn event(run: u128, stage: Stage, branch: Branch, kind: EventKind) -> Event {
        Event {
            run_id: Uuid::from_u128(run),
            pipeline: "nightly".into(),
            version: "2026.1127.0".into(),
            stage,
            branch,
            at: OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
            kind,
        }
    }

    fn pool(region: &str, target: &str) -> Branch {
        Branch::Pool {
            region: region.into(),
            target: target.into(),
        }
    }

    fn started(run: u128) -> Event {
        event(
            run,
            Stage::Snapshot,
            Branch::Trunk,
            EventKind::RunStarted {
                rollout: false,
                regions: vec!["eastus".into(), "westus".into()],
                pools: vec![
                    PoolRef {
                        region: "eastus".into(),
                        target: "cpu".into(),
                    },
                    PoolRef {
                        region: "westus".into(),
                        target: "gpu".into(),
                    },
                ],
            },
        )
    }

    /// A `Waiting` note is published unfenced: one from a copy that was overtaken may come after
    /// the branch's next stage's events, and must not move the branch back.
    #[test]
    fn a_late_note_from_an_earlier_stage_does_not_move_a_branch_back() {
        let waiting =
            |stage: Stage, what: &str| event(1, stage, Branch::Trunk, EventKind::Waiting { what: what.into() });
        let mut tracker = RunTracker::default();
        tracker.apply(&started(1));
        tracker.apply(&waiting(Stage::ImageCreate, "image"));
        tracker.apply(&waiting(Stage::GalleryPublish, "gallery"));
        tracker.apply(&waiting(Stage::ImageCreate, "image"));
        assert_eq!(
            (
                tracker.in_flight(Stage::ImageCreate),
                tracker.in_flight(Stage::GalleryPublish)
            ),
            (0, 1)
        );
        let events = [
            started(1),
            waiting(Stage::GalleryPublish, "gallery"),
            waiting(Stage::Snapshot, "snapshots"),
        ];
        assert_eq!(branch_positions(&events), [Stage::GalleryPublish]);
    }

    #[test]
    fn follows_branches_through_the_stages_and_counts_a_run_once() {
        let mut tracker = RunTracker::default();
        let changes = tracker.apply(&started(1));
        assert_eq!(
            changes,
            vec![RunChange::Started {
                pipeline: "nightly".into()
            }]
        );
        // A RunStarted repeated by a redelivery starts nothing again.
        assert!(tracker.apply(&started(1)).is_empty());
        assert_eq!(tracker.in_flight(Stage::Snapshot), 1);
        tracker.apply(&event(
            1,
            Stage::Replicate,
            Branch::Trunk,
            EventKind::Waiting {
                what: "replication".into(),
            },
        ));
        assert_eq!(
            (tracker.in_flight(Stage::Snapshot), tracker.in_flight(Stage::Replicate)),
            (0, 1)
        );
        tracker.apply(&event(
            1,
            Stage::Replicate,
            Branch::Trunk,
            EventKind::RegionCompleted {
                region: "eastus".into(),
            },
        ));
        // The trunk still replicates westus; eastus's pool has started.
        assert_eq!(
            (
                tracker.in_flight(Stage::Replicate),
                tracker.in_flight(Stage::PoolCreate)
            ),
            (1, 1)
        );
        tracker.apply(&event(
            1,
            Stage::Replicate,
            Branch::Trunk,
            EventKind::RegionFailed {
                region: "westus".into(),
                reason: "replication failed".into(),
            },
        ));
        assert_eq!(
            (
                tracker.in_flight(Stage::Replicate),
                tracker.in_flight(Stage::PoolCreate)
            ),
            (0, 1)
        );
        tracker.apply(&event(
            1,
            Stage::Verify,
            pool("eastus", "cpu"),
            EventKind::Waiting {
                what: "allocation".into(),
            },
        ));
        assert_eq!(
            (tracker.in_flight(Stage::PoolCreate), tracker.in_flight(Stage::Verify)),
            (0, 1)
        );
        let changes = tracker.apply(&event(
            1,
            Stage::Verify,
            pool("eastus", "cpu"),
            EventKind::PoolVerified { pool_id: "p".into() },
        ));
        assert_eq!(
            changes,
            vec![RunChange::Finished {
                pipeline: "nightly".into(),
                result: "partly_succeeded",
                at: OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
            }]
        );
        assert!(Stage::ALL.iter().all(|s| tracker.in_flight(*s) == 0));
        // Events after the end change nothing.
        assert!(
            tracker
                .apply(&event(1, Stage::Verify, pool("eastus", "cpu"), EventKind::Cancelled))
                .is_empty()
        );
    }

    #[test]
    fn waiting_runs_keep_no_events_share_one_shape_and_an_ended_run_keeps_only_its_id() {
        let mut tracker = RunTracker::default();
        for run in [1, 2] {
            tracker.apply(&started(run));
            for _ in 0..100 {
                tracker.apply(&event(
                    run,
                    Stage::Replicate,
                    Branch::Trunk,
                    EventKind::Waiting {
                        what: "replication".into(),
                    },
                ));
            }
        }
        assert_eq!(tracker.footprint(), (2, 1), "two runs of one shape share it");
        let waiting = &tracker.runs[&Uuid::from_u128(1)];
        assert!(waiting.deciding.is_empty() && waiting.latest.len() == 1);
        // What each of thousands of waiting runs costs: three words of vectors and a shared shape,
        // the one branch it is on allocated for one.
        assert!(
            std::mem::size_of::<RunState>() <= 56,
            "{}",
            std::mem::size_of::<RunState>()
        );
        assert_eq!(waiting.latest.capacity(), 1);
        let mut other = started(3);
        if let EventKind::RunStarted { regions, .. } = &mut other.kind {
            regions.pop();
        }
        tracker.apply(&other);
        assert_eq!(tracker.footprint(), (3, 2), "another shape is kept apart");
        for run in [1, 2, 3] {
            let failed = EventKind::RunFailed { reason: "no".into() };
            let changes = tracker.apply(&event(run, Stage::Replicate, Branch::Trunk, failed));
            assert!(matches!(changes[..], [RunChange::Finished { result: "failed", .. }]));
        }
        assert_eq!(tracker.footprint(), (0, 0), "ended runs keep no state and no shape");
        assert_eq!(tracker.finished.len(), 3);
        assert!(Stage::ALL.iter().all(|s| tracker.in_flight(*s) == 0));
    }

    #[test]
    fn a_trunk_failure_before_run_started_ends_the_run_when_it_starts() {
        let mut tracker = RunTracker::default();
        let failed = event(
            2,
            Stage::Snapshot,
            Branch::Trunk,
            EventKind::RunFailed { reason: "no".into() },
        );
        assert!(tracker.apply(&failed).is_empty());
        let changes = tracker.apply(&started(2));
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(matches!(changes[1], RunChange::Finished { result: "failed", .. }));
        assert_eq!(tracker.in_flight(Stage::Snapshot), 0);
    }
}

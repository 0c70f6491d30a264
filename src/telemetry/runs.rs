//! [`RunTracker`]: run-level state folded from the run history in stream order — which runs have
//! started and ended (and how), and at which stage each unfinished branch is. Pure: the caller
//! (the ledger tailing the shared events stream, a worker's or `sigrun run`'s)
//! feeds it events and turns what it reports into metrics. Every worker reads the same stream, so
//! every worker computes the same values.
//!
//! A run is folded, not kept: of its events only those that decide its result
//! (`events::decides_result`), and the stage of each branch's latest event. A waiting run's looks,
//! retries and resources (most of its history) cost nothing here, so a worker's memory does not
//! grow with how long its runs wait; a finished run keeps only that it finished.

use std::collections::{BTreeMap, HashMap};

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
    pipeline: String,
    /// Its events that decide its result, while it runs; dropped once it ended.
    events: Vec<Event>,
    /// Each branch's stage at its latest event (a dropped stale copy's aside).
    latest: Vec<(Branch, Stage)>,
    started: bool,
    finished: bool,
    /// Where its unfinished branches are now (each counted once).
    positions: Vec<Stage>,
}

/// Runs by id, and the branches in flight at each stage over all of them.
#[derive(Default)]
pub struct RunTracker {
    runs: HashMap<Uuid, RunState>,
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
        let run = self.runs.entry(event.run_id).or_default();
        if run.finished {
            return changes;
        }
        if run.pipeline != event.pipeline {
            run.pipeline = event.pipeline.clone();
        }
        note_latest(&mut run.latest, event);
        // Only what decides the result is kept: another kind cannot end the run (it still moves
        // its branch, through `latest`).
        let decides = crate::events::decides_result(&event.kind);
        if decides {
            run.events.push(event.clone());
        }
        if matches!(event.kind, EventKind::RunStarted { .. }) && !run.started {
            run.started = true;
            changes.push(RunChange::Started {
                pipeline: run.pipeline.clone(),
            });
        }
        // Only a started run ends here: a failure before `RunStarted` (possible: the first step
        // runs before it is published) is judged when `RunStarted` comes.
        let result = if run.started && decides {
            result_label(&run_result(&run.events))
        } else {
            None
        };
        let positions = match result {
            Some(result) => {
                run.finished = true;
                run.events = Vec::new();
                run.latest = Vec::new();
                changes.push(RunChange::Finished {
                    pipeline: run.pipeline.clone(),
                    result,
                    at: event.at,
                });
                Vec::new()
            }
            None => positions_of(&run.events, &run.latest),
        };
        for stage in std::mem::replace(&mut run.positions, positions.clone()) {
            if let Some(count) = self.in_flight.get_mut(&stage) {
                *count = count.saturating_sub(1);
            }
        }
        for stage in positions {
            *self.in_flight.entry(stage).or_default() += 1;
        }
        changes
    }

    /// Branches of unfinished runs at `stage`.
    pub fn in_flight(&self, stage: Stage) -> usize {
        self.in_flight.get(&stage).copied().unwrap_or(0)
    }
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
    let deciding: Vec<Event> = events
        .iter()
        .filter(|e| crate::events::decides_result(&e.kind))
        .cloned()
        .collect();
    positions_of(&deciding, &latest)
}

/// Records `event`'s stage as its branch's latest; a dropped stale copy says nothing of where its
/// branch is now.
fn note_latest(latest: &mut Vec<(Branch, Stage)>, event: &Event) {
    if matches!(event.kind, EventKind::DuplicateDropped { .. }) {
        return;
    }
    match latest.iter_mut().find(|(branch, _)| *branch == event.branch) {
        Some((_, stage)) => *stage = event.stage,
        None => latest.push((event.branch.clone(), event.stage)),
    }
}

/// [`branch_positions`] from a run's result-deciding events and each branch's latest stage.
fn positions_of(events: &[Event], latest: &[(Branch, Stage)]) -> Vec<Stage> {
    let Some((regions, pools, entry)) = events.iter().find_map(|e| match &e.kind {
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

//! Run history: what happened to a run, as events published on the bus (`<pipeline>.<stage>.<event>`
//! on the events exchange). A run's result is derived from its events alone — no worker keeps state.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::model::envelope::{Branch, Stage};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// The run's tree: which regions and pools it will try.
    RunStarted {
        regions: Vec<String>,
        pools: Vec<PoolRef>,
        /// Each verified pool then retires older ones (a rollout policy other than `keep`): a
        /// branch ends with `RolloutFinished`, not at `PoolVerified`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        rollout: bool,
    },
    /// A step is waiting on Azure (an operation, replication, allocation).
    Waiting {
        what: String,
    },
    /// A transient failure; the step is retried.
    Retried {
        attempt: u32,
        error: String,
    },
    Throttled {
        retry_after_ms: Option<u64>,
    },
    ResourceCreated {
        id: String,
    },
    RegionCompleted {
        region: String,
    },
    RegionFailed {
        region: String,
        reason: String,
    },
    PoolCreated {
        pool_id: String,
    },
    PoolVerified {
        pool_id: String,
    },
    PoolFailed {
        target: String,
        reason: String,
    },
    Promoted {
        version_id: String,
    },
    PreviousPoolRetired {
        pool_id: String,
        action: String,
    },
    /// The branch's rollout policy could not retire previous pools (Azure kept failing or refused):
    /// reported, the branch still ends well (its pool verified).
    RetirementFailed {
        reason: String,
    },
    /// The branch's rollout phase ended (after its pool verified): its branch is over.
    RolloutFinished,
    /// Intermediates the run no longer needs are to be deleted (`[retention] intermediates`): a
    /// clean-up branch starts, and the run ends only once it has finished.
    CleanUpScheduled {
        what: Intermediate,
    },
    /// A resource this run deleted: an intermediate once confirmed gone; an old version or a
    /// retired pool once Azure accepted its delete.
    ResourceDeleted {
        what: DeletedKind,
        id: String,
    },
    /// A clean-up branch ended: what it was to delete is gone, or it gave up (`failed`: a warning,
    /// never a failure of the run).
    CleanUpFinished {
        what: Intermediate,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failed: Option<String>,
    },
    /// The trunk failed before fan-out: nothing after it runs.
    RunFailed {
        reason: String,
    },
    /// A message could not be processed and was parked.
    Parked {
        reason: String,
    },
    /// A branch stopped at this event's stage, taking no step, because its run was cancelled.
    Cancelled,
    /// A parked message of this branch was put back on its stage's queue (`sigrun dlq replay`):
    /// the branch's earlier failure no longer ends it.
    Replayed {
        message_id: Uuid,
        /// Why it had been parked.
        error: String,
    },
    /// `sigrun cancel` asked for the run to stop: each branch stops at its next step.
    CancelRequested,
    /// A trigger for a run that had already started: acked, nothing started again.
    DuplicateTrigger {
        /// The trigger's AMQP `message_id` (or CloudEvents `id`), when it had one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_id: Option<String>,
    },
    /// A stale copy of this step's message was dropped without a step: another copy had taken it
    /// (a redelivery after its successor went out, a publish that landed twice), or the run had
    /// finished.
    DuplicateDropped {
        message_id: Uuid,
    },
    /// A trigger for this run was refused before the run started (a rule it breaks, Azure refusing
    /// a read for good); the trigger is parked with the same reason.
    TriggerRejected {
        reason: String,
    },
}

impl EventKind {
    /// The last part of the routing key.
    /// A branch failing or giving up: what comes before a message is parked (the runtime parks a
    /// step that failed for good after recording its branch's failure).
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            EventKind::RunFailed { .. }
                | EventKind::PoolFailed { .. }
                | EventKind::Parked { .. }
                | EventKind::RetirementFailed { .. }
                | EventKind::CleanUpFinished { failed: Some(_), .. }
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            EventKind::RunStarted { .. } => "run_started",
            EventKind::Waiting { .. } => "waiting",
            EventKind::Retried { .. } => "retried",
            EventKind::Throttled { .. } => "throttled",
            EventKind::ResourceCreated { .. } => "resource_created",
            EventKind::RegionCompleted { .. } => "region_completed",
            EventKind::RegionFailed { .. } => "region_failed",
            EventKind::PoolCreated { .. } => "pool_created",
            EventKind::PoolVerified { .. } => "pool_verified",
            EventKind::PoolFailed { .. } => "pool_failed",
            EventKind::Promoted { .. } => "promoted",
            EventKind::PreviousPoolRetired { .. } => "previous_pool_retired",
            EventKind::RetirementFailed { .. } => "retirement_failed",
            EventKind::RolloutFinished => "rollout_finished",
            EventKind::CleanUpScheduled { .. } => "clean_up_scheduled",
            EventKind::ResourceDeleted { .. } => "resource_deleted",
            EventKind::CleanUpFinished { .. } => "clean_up_finished",
            EventKind::RunFailed { .. } => "run_failed",
            EventKind::Parked { .. } => "parked",
            EventKind::Cancelled => "cancelled",
            EventKind::Replayed { .. } => "replayed",
            EventKind::CancelRequested => "cancel_requested",
            EventKind::DuplicateTrigger { .. } => "duplicate_trigger",
            EventKind::TriggerRejected { .. } => "trigger_rejected",
            EventKind::DuplicateDropped { .. } => "duplicate_dropped",
        }
    }
}

pub use crate::model::envelope::Intermediate;

/// The kinds of resource sigrun deletes (the `kind` label of `sigrun_resources_deleted_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletedKind {
    Snapshot,
    Image,
    ImageVersion,
    Pool,
}

impl DeletedKind {
    pub const ALL: [DeletedKind; 4] = [
        DeletedKind::Snapshot,
        DeletedKind::Image,
        DeletedKind::ImageVersion,
        DeletedKind::Pool,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeletedKind::Snapshot => "snapshot",
            DeletedKind::Image => "image",
            DeletedKind::ImageVersion => "image_version",
            DeletedKind::Pool => "pool",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PoolRef {
    pub region: String,
    pub target: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub run_id: Uuid,
    pub pipeline: String,
    pub version: String,
    pub stage: Stage,
    pub branch: Branch,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    pub fn routing_key(&self) -> String {
        format!("{}.{}.{}", self.pipeline, self.stage, self.kind.name())
    }
}

/// How a run ended, derived from its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunResult {
    Running,
    Succeeded,
    /// Every pool verified, but something after it did not work out (retiring previous pools):
    /// what, one line each.
    SucceededWithWarnings {
        warnings: Vec<String>,
    },
    /// Some pools verified; the rest failed (named, with the reason).
    PartlySucceeded {
        failed: Vec<(PoolRef, String)>,
    },
    Failed {
        reason: String,
    },
    /// Cancelled (`sigrun cancel`): ended at the request. What the run had created, as its
    /// `ResourceCreated` and `PoolCreated` events name it (a step already under way when the
    /// request came finishes, and what it creates is listed too).
    Cancelled {
        created: Vec<String>,
    },
}

impl RunResult {
    /// Its name for people and pages (`succeeded with warnings`, `partly succeeded`, ...).
    pub fn label(&self) -> &'static str {
        match self {
            RunResult::Running => "running",
            RunResult::Succeeded => "succeeded",
            RunResult::SucceededWithWarnings { .. } => "succeeded with warnings",
            RunResult::PartlySucceeded { .. } => "partly succeeded",
            RunResult::Failed { .. } => "failed",
            RunResult::Cancelled { .. } => "cancelled",
        }
    }
}

/// Folds a run's events into its result: it has ended when every pool branch it started has ended
/// (verified or failed, or skipped because its region failed) and, for a run that replicates, every
/// region's replication has ended (completed or failed), or when the trunk failed — which may
/// happen before `RunStarted` (the first step's call fails for good) — or when it was cancelled
/// (whichever of a trunk failure and a cancel request came first decides), or when its trigger was
/// rejected and it never started. A message parked without a failure event of its own (`Parked`: it
/// could not be decoded) fails its branch too.
///
/// A branch's failure followed by a `Replayed` of the same branch does not count: the replayed
/// message carries the branch on, and what happens after the replay decides.
pub fn run_result(events: &[Event]) -> RunResult {
    let events = &standing(events);
    if let Some(ended) = ended_for_all(events) {
        return ended;
    }
    let Some((pools, regions, entry, rollout)) = events.iter().find_map(|e| match &e.kind {
        EventKind::RunStarted {
            pools,
            regions,
            rollout,
        } => Some((pools.clone(), regions.clone(), e.stage, *rollout)),
        _ => None,
    }) else {
        return never_started(events);
    };
    let mut verified = Vec::new();
    let mut failed: Vec<(PoolRef, String)> = Vec::new();
    for pool in &pools {
        match pool_end(events, pool, rollout) {
            Some(Ok(())) => verified.push(pool.clone()),
            Some(Err(reason)) => failed.push((pool.clone(), reason)),
            None => return RunResult::Running,
        }
    }
    // A region without pools still replicates: the run is not over (nor "succeeded") while it does.
    if entry <= Stage::Replicate && !regions.iter().all(|name| region_ended(events, name)) {
        return RunResult::Running;
    }
    if !clean_ups_ended(events) {
        return RunResult::Running;
    }
    verdict(verified, failed, warnings(events))
}

/// Every clean-up the trunk scheduled has finished (or given up, or was parked).
fn clean_ups_ended(events: &[Event]) -> bool {
    events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::CleanUpScheduled { what } => Some(what),
            _ => None,
        })
        .all(|what| {
            events.iter().any(|e| {
                e.branch == Branch::CleanUp { what }
                    && matches!(e.kind, EventKind::CleanUpFinished { .. } | EventKind::Parked { .. })
            })
        })
}

/// What ends the whole run at once: the trunk failing or parked, or a cancel.
fn ended_for_all(events: &[Event]) -> Option<RunResult> {
    events.iter().find_map(|e| match &e.kind {
        EventKind::RunFailed { reason } => Some(RunResult::Failed { reason: reason.clone() }),
        EventKind::Parked { reason } if e.branch == Branch::Trunk => Some(RunResult::Failed {
            reason: format!("parked: {reason}"),
        }),
        EventKind::CancelRequested => Some(RunResult::Cancelled {
            created: created(events),
        }),
        _ => None,
    })
}

/// A run without `RunStarted`: a rejected trigger ended it (a later trigger that starts it wins),
/// else it is still to start.
fn never_started(events: &[Event]) -> RunResult {
    events
        .iter()
        .rev()
        .find_map(|e| match &e.kind {
            EventKind::TriggerRejected { reason } => Some(RunResult::Failed {
                reason: format!("trigger rejected: {reason}"),
            }),
            _ => None,
        })
        .unwrap_or(RunResult::Running)
}

/// How a pool's branch ended: verified (and, when the run rolls out, its rollout finished),
/// failed, or not created because its region's replication failed; `None` while it goes on.
fn pool_end(events: &[Event], pool: &PoolRef, rollout: bool) -> Option<Result<(), String>> {
    let on_branch = |e: &&Event| matches!(&e.branch, Branch::Pool { region, target } if *region == pool.region && *target == pool.target);
    let ended = events.iter().filter(on_branch).find_map(|e| match &e.kind {
        EventKind::PoolVerified { .. } => Some(Ok(())),
        EventKind::PoolFailed { reason, .. } => Some(Err(reason.clone())),
        EventKind::Parked { reason } => Some(Err(format!("parked: {reason}"))),
        _ => None,
    });
    // A verified pool's branch goes on to retire older pools when the run rolls out.
    let rolled_out = !rollout
        || events
            .iter()
            .filter(on_branch)
            .any(|e| e.kind == EventKind::RolloutFinished);
    let ended = match ended {
        Some(Ok(())) if !rolled_out => None,
        other => other,
    };
    ended.or_else(|| {
        events.iter().find_map(|e| match &e.kind {
            EventKind::RegionFailed { region, reason } if *region == pool.region => Some(Err(format!(
                "not created: replication to {} failed: {reason}",
                pool.region
            ))),
            _ => None,
        })
    })
}

fn region_ended(events: &[Event], name: &String) -> bool {
    events.iter().any(|e| match &e.kind {
        EventKind::RegionCompleted { region } | EventKind::RegionFailed { region, .. } => region == name,
        _ => false,
    })
}

/// Side effects that kept failing (retiring previous pools, deleting intermediates): warnings on
/// a run that otherwise succeeded.
fn warnings(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::RetirementFailed { reason } => {
                Some(format!("{}: retiring previous pools: {reason}", e.branch.label()))
            }
            EventKind::CleanUpFinished {
                failed: Some(reason), ..
            } => Some(format!("{}: {reason}", e.branch.label())),
            EventKind::Parked { reason } if matches!(e.branch, Branch::CleanUp { .. }) => {
                Some(format!("{}: parked: {reason}", e.branch.label()))
            }
            _ => None,
        })
        .collect()
}

/// Every pool has ended: the run's result from which verified and which failed.
fn verdict(verified: Vec<PoolRef>, failed: Vec<(PoolRef, String)>, warnings: Vec<String>) -> RunResult {
    match (verified.is_empty(), failed.is_empty()) {
        (_, true) if warnings.is_empty() => RunResult::Succeeded,
        (_, true) => RunResult::SucceededWithWarnings { warnings },
        (false, false) => RunResult::PartlySucceeded { failed },
        (true, false) => RunResult::Failed {
            reason: failed
                .iter()
                .map(|(p, r)| format!("{}/{}: {r}", p.region, p.target))
                .collect::<Vec<_>>()
                .join("; "),
        },
    }
}

/// Whether `run_result` reads events of this kind to decide a run's result (its variant; a
/// cancelled run's list of what it created also reads `ResourceCreated`), or `Cancelled`, which
/// ends a branch for `telemetry::runs`' count of branches per stage. A fold that keeps only
/// these (`telemetry::runs`) gets the same result in far less memory than the whole history: a
/// waiting run's looks, retries and resources are most of its events.
pub fn decides_result(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::RunStarted { .. }
            | EventKind::RunFailed { .. }
            | EventKind::Parked { .. }
            | EventKind::CancelRequested
            | EventKind::Cancelled
            | EventKind::TriggerRejected { .. }
            | EventKind::PoolVerified { .. }
            | EventKind::PoolFailed { .. }
            | EventKind::RolloutFinished
            | EventKind::RegionCompleted { .. }
            | EventKind::RegionFailed { .. }
            | EventKind::CleanUpScheduled { .. }
            | EventKind::CleanUpFinished { .. }
            | EventKind::RetirementFailed { .. }
            | EventKind::Replayed { .. }
    )
}

/// The events that still count: a branch's failure (`RunFailed`, `PoolFailed`, `Parked`, a
/// clean-up that gave up) is dropped when a `Replayed` of that branch comes after it.
/// (Owned, so the rest of `run_result` reads it as it reads any run's events.)
fn standing(events: &[Event]) -> Vec<Event> {
    let mut replayed: Vec<&Branch> = Vec::new();
    let mut kept: Vec<Event> = Vec::with_capacity(events.len());
    // Backwards, so "a replay after it" is whatever was seen so far.
    for event in events.iter().rev() {
        match &event.kind {
            EventKind::Replayed { .. } => replayed.push(&event.branch),
            EventKind::RunFailed { .. }
            | EventKind::PoolFailed { .. }
            | EventKind::Parked { .. }
            | EventKind::CleanUpFinished { failed: Some(_), .. }
                if replayed.contains(&&event.branch) =>
            {
                continue;
            }
            _ => {}
        }
        kept.push(event.clone());
    }
    kept.reverse();
    kept
}

/// What a run deleted, in order, as `{kind} {id}` (a repeat reported once).
pub fn deleted(events: &[Event]) -> Vec<String> {
    let mut deleted: Vec<String> = Vec::new();
    for event in events {
        if let EventKind::ResourceDeleted { what, id } = &event.kind {
            let item = format!("{} {id}", what.as_str());
            if !deleted.contains(&item) {
                deleted.push(item);
            }
        }
    }
    deleted
}

/// What a run created, in order: resource ids, then `pool {id}` for each pool.
pub fn created(events: &[Event]) -> Vec<String> {
    let mut created: Vec<String> = Vec::new();
    for event in events {
        let item = match &event.kind {
            EventKind::ResourceCreated { id } => id.clone(),
            EventKind::PoolCreated { pool_id } => format!("pool {pool_id}"),
            _ => continue,
        };
        // A redelivered step may report the same creation twice.
        if !created.contains(&item) {
            created.push(item);
        }
    }
    created
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(region: &str, target: &str) -> PoolRef {
        PoolRef {
            region: region.into(),
            target: target.into(),
        }
    }

    fn event(branch: Branch, kind: EventKind) -> Event {
        Event {
            run_id: Uuid::nil(),
            pipeline: "nightly".into(),
            version: "2026.1126.0".into(),
            stage: Stage::Verify,
            branch,
            at: OffsetDateTime::UNIX_EPOCH,
            kind,
        }
    }

    fn on(region: &str, target: &str) -> Branch {
        Branch::Pool {
            region: region.into(),
            target: target.into(),
        }
    }

    /// A run over two regions: `render` and `sim` in westeurope, `batch` in eastus.
    fn started() -> Event {
        event(
            Branch::Trunk,
            EventKind::RunStarted {
                rollout: false,
                regions: vec!["westeurope".into(), "eastus".into()],
                pools: vec![
                    pool("westeurope", "render"),
                    pool("westeurope", "sim"),
                    pool("eastus", "batch"),
                ],
            },
        )
    }

    fn verified(region: &str, target: &str) -> Event {
        event(
            on(region, target),
            EventKind::PoolVerified {
                pool_id: format!("{target}-1"),
            },
        )
    }

    fn pool_failed(region: &str, target: &str, reason: &str) -> Event {
        event(
            on(region, target),
            EventKind::PoolFailed {
                target: target.into(),
                reason: reason.into(),
            },
        )
    }

    #[test]
    fn a_run_that_rolls_out_ends_when_every_verified_pool_finished_its_rollout() {
        let mut run_started = started();
        if let EventKind::RunStarted { rollout, .. } = &mut run_started.kind {
            *rollout = true;
        }
        let region = |name: &str| event(Branch::Trunk, EventKind::RegionCompleted { region: name.into() });
        let mut events = vec![run_started, region("westeurope"), region("eastus")];
        for (r, t) in [("westeurope", "render"), ("westeurope", "sim"), ("eastus", "batch")] {
            events.push(verified(r, t));
        }
        assert_eq!(run_result(&events), RunResult::Running, "still retiring older pools");
        events.push(event(on("westeurope", "render"), EventKind::RolloutFinished));
        events.push(event(on("westeurope", "sim"), EventKind::RolloutFinished));
        assert_eq!(run_result(&events), RunResult::Running);
        let mut warned = events.clone();
        warned.push(event(
            on("eastus", "batch"),
            EventKind::RetirementFailed {
                reason: "resize pool: HTTP 500".into(),
            },
        ));
        warned.push(event(on("eastus", "batch"), EventKind::RolloutFinished));
        assert_eq!(
            run_result(&warned),
            RunResult::SucceededWithWarnings {
                warnings: vec!["eastus/batch: retiring previous pools: resize pool: HTTP 500".into()]
            }
        );
        events.push(event(on("eastus", "batch"), EventKind::RolloutFinished));
        assert_eq!(run_result(&events), RunResult::Succeeded);
    }

    #[test]
    fn a_run_waits_for_the_clean_ups_it_scheduled_and_a_failed_one_is_a_warning() {
        use crate::model::envelope::Intermediate;
        let clean_up = |what| Branch::CleanUp { what };
        let region = |name: &str| event(Branch::Trunk, EventKind::RegionCompleted { region: name.into() });
        let mut events = vec![
            started(),
            event(
                Branch::Trunk,
                EventKind::CleanUpScheduled {
                    what: Intermediate::Snapshots,
                },
            ),
            region("westeurope"),
            region("eastus"),
            event(
                Branch::Trunk,
                EventKind::CleanUpScheduled {
                    what: Intermediate::Image,
                },
            ),
        ];
        for (r, t) in [("westeurope", "render"), ("westeurope", "sim"), ("eastus", "batch")] {
            events.push(verified(r, t));
        }
        events.push(event(
            clean_up(Intermediate::Snapshots),
            EventKind::ResourceDeleted {
                what: DeletedKind::Snapshot,
                id: "/subscriptions/s/snapshots/os".into(),
            },
        ));
        events.push(event(
            clean_up(Intermediate::Snapshots),
            EventKind::CleanUpFinished {
                what: Intermediate::Snapshots,
                failed: None,
            },
        ));
        assert_eq!(run_result(&events), RunResult::Running, "the image's clean-up goes on");
        let mut gave_up = events.clone();
        gave_up.push(event(
            clean_up(Intermediate::Image),
            EventKind::CleanUpFinished {
                what: Intermediate::Image,
                failed: Some("deleting image: HTTP 409".into()),
            },
        ));
        assert_eq!(
            run_result(&gave_up),
            RunResult::SucceededWithWarnings {
                warnings: vec!["clean-up/image: deleting image: HTTP 409".into()]
            }
        );
        events.push(event(
            clean_up(Intermediate::Image),
            EventKind::CleanUpFinished {
                what: Intermediate::Image,
                failed: None,
            },
        ));
        assert_eq!(run_result(&events), RunResult::Succeeded);
        assert_eq!(deleted(&events), ["snapshot /subscriptions/s/snapshots/os"]);
    }

    #[test]
    fn nothing_yet_is_running() {
        assert_eq!(run_result(&[]), RunResult::Running);
        assert_eq!(
            run_result(&[event(Branch::Trunk, EventKind::Throttled { retry_after_ms: None })]),
            RunResult::Running
        );
    }

    #[test]
    fn every_pool_verified_is_success() {
        let events = [started(), verified("westeurope", "render"), verified("eastus", "batch")];
        assert_eq!(run_result(&events[..2]), RunResult::Running, "a pool is still pending");
        let mut events = events.to_vec();
        events.push(verified("westeurope", "sim"));
        assert_eq!(run_result(&events), RunResult::Succeeded);
    }

    #[test]
    fn a_trunk_failure_fails_the_run_even_before_it_started() {
        let failed = event(
            Branch::Trunk,
            EventKind::RunFailed {
                reason: "PUT snapshot: HTTP 403".into(),
            },
        );
        assert_eq!(
            run_result(std::slice::from_ref(&failed)),
            RunResult::Failed {
                reason: "PUT snapshot: HTTP 403".into()
            }
        );
        assert_eq!(
            run_result(&[started(), verified("westeurope", "render"), failed]),
            RunResult::Failed {
                reason: "PUT snapshot: HTTP 403".into()
            }
        );
    }

    #[test]
    fn a_failed_region_ends_its_pools_without_them() {
        let region_failed = event(
            Branch::Trunk,
            EventKind::RegionFailed {
                region: "eastus".into(),
                reason: "ReplicationFailed".into(),
            },
        );
        let events = [
            started(),
            region_failed,
            verified("westeurope", "render"),
            verified("westeurope", "sim"),
        ];
        assert_eq!(
            run_result(&events),
            RunResult::PartlySucceeded {
                failed: vec![(
                    pool("eastus", "batch"),
                    "not created: replication to eastus failed: ReplicationFailed".into()
                )]
            }
        );
    }

    #[test]
    fn some_pools_failing_is_partial_success_and_all_failing_is_failure() {
        let events = [
            started(),
            verified("westeurope", "render"),
            pool_failed("westeurope", "sim", "AllocationFailed"),
            pool_failed("eastus", "batch", "start task failed"),
        ];
        assert_eq!(
            run_result(&events),
            RunResult::PartlySucceeded {
                failed: vec![
                    (pool("westeurope", "sim"), "AllocationFailed".into()),
                    (pool("eastus", "batch"), "start task failed".into()),
                ]
            }
        );
        let events = [
            started(),
            pool_failed("westeurope", "render", "a"),
            pool_failed("westeurope", "sim", "b"),
            pool_failed("eastus", "batch", "c"),
        ];
        assert_eq!(
            run_result(&events),
            RunResult::Failed {
                reason: "westeurope/render: a; westeurope/sim: b; eastus/batch: c".into()
            }
        );
    }

    #[test]
    fn a_run_that_replicates_ends_when_every_region_has() {
        // westeurope and eastus have pools; southeastasia only gets a replica.
        let mut start = event(
            Branch::Trunk,
            EventKind::RunStarted {
                rollout: false,
                regions: vec!["westeurope".into(), "eastus".into(), "southeastasia".into()],
                pools: vec![pool("westeurope", "render"), pool("eastus", "batch")],
            },
        );
        start.stage = Stage::Snapshot;
        let completed = |region: &str| event(Branch::Trunk, EventKind::RegionCompleted { region: region.into() });
        let mut events = vec![
            start.clone(),
            completed("westeurope"),
            completed("eastus"),
            verified("westeurope", "render"),
            verified("eastus", "batch"),
        ];
        assert_eq!(
            run_result(&events),
            RunResult::Running,
            "southeastasia still replicates"
        );
        events.push(completed("southeastasia"));
        assert_eq!(run_result(&events), RunResult::Succeeded);
        // A rollout (entering at pool-create) replicates nothing: its pools alone end it.
        start.stage = Stage::PoolCreate;
        let rollout = [start, verified("westeurope", "render"), verified("eastus", "batch")];
        assert_eq!(run_result(&rollout), RunResult::Succeeded);
    }

    #[test]
    fn a_cancelled_run_has_ended_and_lists_what_it_created() {
        let created = |id: &str| event(Branch::Trunk, EventKind::ResourceCreated { id: id.into() });
        let mut events = vec![
            started(),
            created("/subscriptions/s/snapshots/a"),
            created("/subscriptions/s/images/b"),
            created("/subscriptions/s/images/b"),
        ];
        assert_eq!(run_result(&events), RunResult::Running);
        events.push(event(Branch::Trunk, EventKind::CancelRequested));
        let expected = RunResult::Cancelled {
            created: vec![
                "/subscriptions/s/snapshots/a".into(),
                "/subscriptions/s/images/b".into(),
            ],
        };
        assert_eq!(run_result(&events), expected);
        // The branches stopping, and a step under way finishing, keep it cancelled.
        events.push(event(Branch::Trunk, EventKind::Cancelled));
        events.push(event(
            on("westeurope", "render"),
            EventKind::PoolCreated {
                pool_id: "render-1".into(),
            },
        ));
        match run_result(&events) {
            RunResult::Cancelled { created } => assert_eq!(created.last().unwrap(), "pool render-1"),
            other => panic!("{other:?}"),
        }
        // A trunk failure before the request decides instead.
        let failed = event(Branch::Trunk, EventKind::RunFailed { reason: "boom".into() });
        events.insert(1, failed);
        assert_eq!(run_result(&events), RunResult::Failed { reason: "boom".into() });
    }

    #[test]
    fn a_rejected_trigger_ends_a_run_that_never_started() {
        let rejected = event(
            Branch::Trunk,
            EventKind::TriggerRejected {
                reason: "publish.regions: no such region".into(),
            },
        );
        assert_eq!(
            run_result(std::slice::from_ref(&rejected)),
            RunResult::Failed {
                reason: "trigger rejected: publish.regions: no such region".into()
            }
        );
        // Fixed and triggered again: the run starts and its rejection no longer counts.
        let duplicate = event(Branch::Trunk, EventKind::DuplicateTrigger { message_id: None });
        let events = [rejected, started(), duplicate, verified("westeurope", "render")];
        assert_eq!(run_result(&events), RunResult::Running);
    }

    #[test]
    fn new_event_kinds_round_trip_with_their_routing_keys() {
        for (kind, name) in [
            (EventKind::CancelRequested, "cancel_requested"),
            (
                EventKind::DuplicateTrigger {
                    message_id: Some("m-1".into()),
                },
                "duplicate_trigger",
            ),
            (EventKind::TriggerRejected { reason: "r".into() }, "trigger_rejected"),
        ] {
            let e = event(Branch::Trunk, kind);
            assert_eq!(e.routing_key(), format!("nightly.verify.{name}"));
            let json = serde_json::to_string(&e).unwrap();
            assert!(json.contains(&format!("\"kind\":\"{name}\"")), "{json}");
            assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), e);
        }
    }

    #[test]
    fn a_pool_failure_counts_only_for_its_own_region() {
        // Same target name in another region: not this pool's end.
        let events = [
            started(),
            verified("westeurope", "render"),
            verified("westeurope", "sim"),
            pool_failed("westeurope", "batch", "elsewhere"),
        ];
        assert_eq!(run_result(&events), RunResult::Running);
    }

    fn replayed(branch: Branch) -> Event {
        event(
            branch,
            EventKind::Replayed {
                message_id: Uuid::nil(),
                error: "gave up after 2 attempts".into(),
            },
        )
    }

    fn trunk_failed(reason: &str) -> Event {
        event(Branch::Trunk, EventKind::RunFailed { reason: reason.into() })
    }

    #[test]
    fn a_replayed_trunk_reopens_the_run_and_what_follows_decides() {
        let mut events = vec![started(), trunk_failed("gave up after 2 attempts: HTTP 500")];
        assert!(matches!(run_result(&events), RunResult::Failed { .. }));
        events.push(replayed(Branch::Trunk));
        assert_eq!(run_result(&events), RunResult::Running, "reopened by the replay");
        events.extend([
            verified("westeurope", "render"),
            verified("westeurope", "sim"),
            verified("eastus", "batch"),
        ]);
        assert_eq!(run_result(&events), RunResult::Succeeded);
        // Failing again after the replay ends it again, with the new reason.
        let mut again = vec![
            started(),
            trunk_failed("first"),
            replayed(Branch::Trunk),
            trunk_failed("second"),
        ];
        assert_eq!(
            run_result(&again),
            RunResult::Failed {
                reason: "second".into()
            }
        );
        // ...and a second replay reopens it once more.
        again.push(replayed(Branch::Trunk));
        assert_eq!(run_result(&again), RunResult::Running);
    }

    #[test]
    fn a_replayed_pool_reopens_only_that_pool() {
        let mut events = vec![
            started(),
            pool_failed("westeurope", "sim", "gave up after 2 attempts"),
            pool_failed("eastus", "batch", "AllocationFailed"),
            verified("westeurope", "render"),
        ];
        assert!(matches!(run_result(&events), RunResult::PartlySucceeded { .. }));
        events.push(replayed(on("westeurope", "sim")));
        assert_eq!(run_result(&events), RunResult::Running, "sim runs again");
        events.push(verified("westeurope", "sim"));
        assert_eq!(
            run_result(&events),
            RunResult::PartlySucceeded {
                failed: vec![(pool("eastus", "batch"), "AllocationFailed".into())]
            },
            "batch was not replayed: its failure stands"
        );
    }

    #[test]
    fn a_replay_reopens_nothing_on_other_branches_or_before_it() {
        // A pool's replay does not reopen the trunk; a trunk replay does not reopen a pool.
        let trunk_down = [started(), trunk_failed("boom"), replayed(on("westeurope", "sim"))];
        assert!(matches!(run_result(&trunk_down), RunResult::Failed { .. }));
        let pools_done = [
            started(),
            pool_failed("westeurope", "sim", "x"),
            replayed(Branch::Trunk),
            verified("westeurope", "render"),
            verified("eastus", "batch"),
        ];
        assert!(matches!(run_result(&pools_done), RunResult::PartlySucceeded { .. }));
        // A failure after the replay is not undone by it.
        let later = [started(), replayed(Branch::Trunk), trunk_failed("after")];
        assert_eq!(run_result(&later), RunResult::Failed { reason: "after".into() });
    }

    #[test]
    fn a_parked_message_fails_its_branch_until_it_is_replayed() {
        let parked = |branch| {
            event(
                branch,
                EventKind::Parked {
                    reason: "message does not match envelope v2: plan".into(),
                },
            )
        };
        let trunk = [started(), parked(Branch::Trunk)];
        assert_eq!(
            run_result(&trunk),
            RunResult::Failed {
                reason: "parked: message does not match envelope v2: plan".into()
            }
        );
        let mut pools = vec![
            started(),
            verified("westeurope", "render"),
            verified("westeurope", "sim"),
            parked(on("eastus", "batch")),
        ];
        assert_eq!(
            run_result(&pools),
            RunResult::PartlySucceeded {
                failed: vec![(
                    pool("eastus", "batch"),
                    "parked: message does not match envelope v2: plan".into()
                )]
            }
        );
        pools.push(replayed(on("eastus", "batch")));
        assert_eq!(run_result(&pools), RunResult::Running);
        pools.push(verified("eastus", "batch"));
        assert_eq!(run_result(&pools), RunResult::Succeeded);
    }
}

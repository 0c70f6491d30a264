//! Stage 4, `replicate`: watches the version's per-region replication (`$expand=ReplicationStatus`;
//! `provisioningState` may read Succeeded while regions still replicate, so each region is judged on
//! its own). A region's pools start the moment its replica is Completed. A region that fails is
//! removed and added back (Azure's advice) up to the configured number of times, then counts as
//! failed: its pools are not created and the run's result names it. Several regions failing in one
//! look are removed together (one write), and neither a removal nor a re-add ever puts back a
//! region that waits to be re-added or that failed for good. The next look is timed from the
//! progress seen so far, at the latest end it allows. The first look at a version the run has
//! just made reads nothing: the version is at 0 % then, and that is the first reading.

use std::collections::BTreeMap;
use std::time::Duration;

use super::clean_up;
use super::common::{fail, latest_reach, target_regions, wait};
use super::{Observation, Outcome, Step, StepContext};
use crate::azure::api::RegionStatus;
use crate::azure::{AzureError, ReplicationState};
use crate::events::EventKind;
use crate::model::envelope::{Envelope, Intermediate, Phase, Progress, Stage};
use crate::model::plan::Plan;

const WHAT: Phase = Phase::Replication;

pub async fn step(mut message: Envelope, ctx: &StepContext<'_>) -> Result<Step, AzureError> {
    if just_made(&message, ctx) {
        return Ok(first_look_as_made(message, ctx));
    }
    let plan = message.plan.clone();
    let Some(version) = ctx.azure.get_version(&plan.version_id, true).await? else {
        return Ok(fail(format!("image version {} does not exist", plan.version_id)));
    };
    // A region removed after a failure goes back in once the version has settled.
    if !message.artifacts.regions_to_readd.is_empty() && !version.provisioning_state.is_changing() {
        return readd_removed(message, &plan, ctx).await;
    }
    let mut look = Look {
        progress: message
            .operation
            .as_ref()
            .map(|op| op.progress.clone())
            .unwrap_or_default(),
        ..Look::default()
    };
    for region in &plan.regions {
        let status = version.replication.iter().find(|s| s.region == region.name);
        look.region(&mut message, &plan, &region.name, status, ctx);
    }
    if look.removing {
        remove_failing(&message, &plan, ctx).await?;
    }
    let observations = replication_ratios(&plan, &version.replication, &message);
    let all_ended = plan.regions.iter().all(|r| {
        message.artifacts.regions_completed.contains(&r.name) || message.artifacts.regions_failed.contains_key(&r.name)
    });
    if all_ended {
        // Every region has its replica (or failed for good): the image is no longer needed, unless
        // no region got one (the run failed; a new try publishes from it again).
        let replicated = !message.artifacts.regions_completed.is_empty();
        let scheduled = replicated
            .then(|| clean_up::schedule(&message, Intermediate::Image, ctx))
            .flatten();
        if let Some((clean_up, scheduled)) = scheduled {
            look.emit.push(clean_up);
            look.events.push(scheduled);
        }
        let outcome = if look.emit.is_empty() {
            Outcome::Done
        } else {
            Outcome::Advance(look.emit)
        };
        return Ok(Step {
            outcome,
            events: look.events,
            observations,
        });
    }
    Ok(look.wait(message, observations, ctx))
}

/// Whether this is the first try of the first look at a version this run's gallery-publish made
/// (and recorded) as it sent this message on: Azure has had no time to replicate any of it.
fn just_made(message: &Envelope, ctx: &StepContext<'_>) -> bool {
    let version = message.plan.version_id.to_string();
    message.operation.is_none() && ctx.first_try() && message.artifacts.recorded.contains(&version)
}

/// The first look at a version just made, without a read: its source region reads 0 % (the
/// other regions have not started), taken at the moment it was made. The next look, a poll
/// later, times the rest from this reading and its own, as two reads would.
fn first_look_as_made(message: Envelope, ctx: &StepContext<'_>) -> Step {
    let plan = &message.plan;
    let source = plan.build.as_ref().map_or(&plan.gallery_region, |b| &b.region);
    let made = Progress {
        at: message.stage_started,
        percent: 0,
    };
    let look = Look {
        progress: BTreeMap::from([(source.clone(), made)]),
        unknown_pending: true,
        ..Look::default()
    };
    let observations = replication_ratios(plan, &[], &message);
    look.wait(message, observations, ctx)
}

/// Puts back every planned region except those that failed for good, and waits.
async fn readd_removed(mut message: Envelope, plan: &Plan, ctx: &StepContext<'_>) -> Result<Step, AzureError> {
    let failed: Vec<&str> = message.artifacts.regions_failed.keys().map(String::as_str).collect();
    ctx.azure
        .set_target_regions(&plan.version_id, &target_regions(plan, &failed))
        .await?;
    message.artifacts.regions_to_readd.clear();
    let delay = ctx.settings.default_poll();
    Ok(Step::new(wait(message, WHAT, Vec::new(), delay, ctx.now)))
}

/// One write for every region failing in this look: keeps only what neither waits to be re-added
/// nor failed for good.
async fn remove_failing(message: &Envelope, plan: &Plan, ctx: &StepContext<'_>) -> Result<(), AzureError> {
    let out: Vec<&str> = message
        .artifacts
        .regions_to_readd
        .iter()
        .map(String::as_str)
        .chain(message.artifacts.regions_failed.keys().map(String::as_str))
        .collect();
    ctx.azure
        .set_target_regions(&plan.version_id, &target_regions(plan, &out))
        .await
        .map(|_| ())
}

/// What one look at the version's replication found.
#[derive(Default)]
struct Look {
    events: Vec<EventKind>,
    /// The pool-create messages of regions that completed in this look.
    emit: Vec<Envelope>,
    progress: BTreeMap<String, Progress>,
    /// The soonest a replicating region should be done.
    pending_eta: Option<Duration>,
    /// A region waits that no estimate times (being re-added, or no reading yet).
    unknown_pending: bool,
    /// A region failed in this look and gets another try: the regions are written once.
    removing: bool,
}

impl Look {
    /// Judges one planned region by its replica's state.
    fn region(
        &mut self,
        message: &mut Envelope,
        plan: &Plan,
        name: &str,
        status: Option<&RegionStatus>,
        ctx: &StepContext<'_>,
    ) {
        let artifacts = &message.artifacts;
        if artifacts.regions_completed.iter().any(|r| r == name) || artifacts.regions_failed.contains_key(name) {
            return;
        }
        if artifacts.regions_to_readd.iter().any(|r| r == name) {
            self.unknown_pending = true;
            return;
        }
        match status.map(|s| &s.state) {
            Some(ReplicationState::Completed) => self.completed(message, plan, name, ctx),
            Some(ReplicationState::Failed) => {
                let details = status.map(|s| s.details.clone()).unwrap_or_default();
                self.failed(message, name, details, ctx);
            }
            Some(_) | None => match status.and_then(|s| estimate(&mut self.progress, s, ctx)) {
                Some(eta) => self.pending_eta = Some(self.pending_eta.map_or(eta, |p| p.min(eta))),
                // Not started (`Unknown`): Azure replicates to the other regions once the source
                // region is done, so such a region waits on one that replicates; it needs no look
                // of its own before that one's estimate.
                None if status.is_some_and(|s| s.state == ReplicationState::Unknown) => {}
                None => self.unknown_pending = true,
            },
        }
    }

    /// The region's replica is there: its pools start now.
    fn completed(&mut self, message: &mut Envelope, plan: &Plan, name: &str, ctx: &StepContext<'_>) {
        message.artifacts.regions_completed.push(name.to_string());
        self.events.push(EventKind::RegionCompleted {
            region: name.to_string(),
        });
        for pool in plan.pools_in(name) {
            self.emit
                .push(message.for_pool(Stage::PoolCreate, name, &pool.target, ctx.now));
        }
        self.progress.remove(name);
    }

    /// The region's replication failed: removed and added back while it has tries left, then
    /// failed for good.
    fn failed(&mut self, message: &mut Envelope, name: &str, details: String, ctx: &StepContext<'_>) {
        let artifacts = &mut message.artifacts;
        let tries = artifacts.region_retries.get(name).copied().unwrap_or(0);
        if tries < ctx.settings.region_retries {
            artifacts.region_retries.insert(name.to_string(), tries + 1);
            artifacts.regions_to_readd.push(name.to_string());
            self.removing = true;
            self.events.push(EventKind::Retried {
                attempt: tries + 1,
                error: format!("replication to {name} failed ({details}); removing and adding the region back"),
            });
            self.progress.remove(name);
            self.unknown_pending = true;
        } else {
            let reason = format!("replication failed: {details}");
            artifacts.regions_failed.insert(name.to_string(), reason.clone());
            self.events.push(EventKind::RegionFailed {
                region: name.to_string(),
                reason,
            });
        }
    }

    /// The next look, timed by the soonest estimate (or the default poll), carrying the readings
    /// and the pools of regions completed now.
    fn wait(mut self, message: Envelope, observations: Vec<Observation>, ctx: &StepContext<'_>) -> Step {
        let delay = match (self.pending_eta, self.unknown_pending) {
            (Some(eta), false) => ctx.settings.clamp(eta),
            (Some(eta), true) => ctx.settings.clamp(eta.min(ctx.settings.default_poll())),
            (None, _) => ctx.settings.default_poll(),
        };
        let first = message.operation.as_ref().is_none_or(|op| op.what != WHAT);
        let mut outcome = wait(message, WHAT, Vec::new(), delay, ctx.now);
        if let Outcome::Wait { message, emit: out, .. } = &mut outcome {
            if let Some(op) = message.operation.as_mut() {
                op.progress = self.progress;
            }
            *out = self.emit;
        }
        if first {
            self.events.insert(
                0,
                EventKind::Waiting {
                    what: WHAT.as_str().to_string(),
                },
            );
        }
        Step {
            outcome,
            events: self.events,
            observations,
        }
    }
}

/// Each planned region's replication as a ratio: 1 once Completed (now or on an earlier look),
/// else the progress Azure reports.
fn replication_ratios(plan: &Plan, statuses: &[RegionStatus], message: &Envelope) -> Vec<Observation> {
    plan.regions
        .iter()
        .map(|region| {
            let status = statuses.iter().find(|s| s.region == region.name);
            let completed = message.artifacts.regions_completed.contains(&region.name)
                || status.is_some_and(|s| s.state == ReplicationState::Completed);
            let ratio = if completed {
                1.0
            } else {
                status.map_or(0.0, |s| f64::from(s.progress.min(100)) / 100.0)
            };
            Observation::Replication {
                region: region.name.clone(),
                ratio,
            }
        })
        .collect()
}

/// When a replicating region should be done at the latest, from two progress readings (a look
/// then finds it done rather than one point short); records this reading.
fn estimate(
    progress: &mut BTreeMap<String, Progress>,
    status: &RegionStatus,
    ctx: &StepContext<'_>,
) -> Option<Duration> {
    // A region that has not started (`Unknown`) reads 0% without replicating: no reading to time from.
    if status.state != ReplicationState::Replicating {
        return None;
    }
    let now = Progress {
        at: ctx.now,
        percent: status.progress,
    };
    let before = progress.get(&status.region).copied();
    if before.is_none_or(|b| b.percent != now.percent) {
        progress.insert(status.region.clone(), now);
    }
    latest_reach(before?, now, 100.0)
}

//! Stage 4, `replicate`: watches the version's per-region replication (`$expand=ReplicationStatus`;
//! `provisioningState` may read Succeeded while regions still replicate, so each region is judged on
//! its own). A region's pools start the moment its replica is Completed. A region that fails is
//! removed and added back (Azure's advice) up to the configured number of times, then counts as
//! failed: its pools are not created and the run's result names it. Several regions failing in one
//! look are removed together (one write), and neither a removal nor a re-add ever puts back a
//! region that waits to be re-added or that failed for good. The next look is timed from the
//! progress seen so far.

use std::time::Duration;

use super::common::{fail, target_regions, wait};
use super::{Observation, Outcome, Step, StepContext};
use crate::azure::AzureError;
use crate::azure::api::RegionStatus;
use crate::events::EventKind;
use crate::model::envelope::{Envelope, Progress, Stage};

const WHAT: &str = "replication";

pub async fn step(mut message: Envelope, ctx: &StepContext<'_>) -> Result<Step, AzureError> {
    let plan = message.plan.clone();
    let Some(version) = ctx.azure.get_version(&plan.version_id, true).await? else {
        return Ok(fail(format!("image version {} does not exist", plan.version_id)));
    };
    let mut events = Vec::new();
    let mut emit = Vec::new();
    let mut progress = message
        .operation
        .as_ref()
        .map(|op| op.progress.clone())
        .unwrap_or_default();

    // A region removed after a failure goes back in once the version has settled.
    if !message.artifacts.regions_to_readd.is_empty()
        && !matches!(version.provisioning_state.as_str(), "Creating" | "Updating")
    {
        // Everything planned except what failed for good.
        let failed: Vec<&str> = message.artifacts.regions_failed.keys().map(String::as_str).collect();
        ctx.azure
            .set_target_regions(&plan.version_id, &target_regions(&plan, &failed))
            .await?;
        message.artifacts.regions_to_readd.clear();
        let delay = ctx.settings.default_poll();
        return Ok(Step {
            outcome: wait(message, WHAT, Vec::new(), delay, ctx.now),
            events,
            observations: Vec::new(),
        });
    }

    let mut pending_eta: Option<Duration> = None;
    let mut unknown_pending = false;
    // Regions failing in this look that get another try.
    let mut removing: Vec<String> = Vec::new();
    for region in &plan.regions {
        let name = region.name.as_str();
        if message.artifacts.regions_completed.iter().any(|r| r == name)
            || message.artifacts.regions_failed.contains_key(name)
        {
            continue;
        }
        if message.artifacts.regions_to_readd.iter().any(|r| r == name) {
            unknown_pending = true;
            continue;
        }
        let status = version.replication.iter().find(|s| s.region == name);
        match status.map(|s| s.state.as_str()) {
            Some("Completed") => {
                message.artifacts.regions_completed.push(name.to_string());
                events.push(EventKind::RegionCompleted {
                    region: name.to_string(),
                });
                for pool in plan.pools_in(name) {
                    emit.push(message.for_pool(Stage::PoolCreate, name, &pool.target, ctx.now));
                }
                progress.remove(name);
            }
            Some("Failed") => {
                let details = status.map(|s| s.details.clone()).unwrap_or_default();
                let tries = message.artifacts.region_retries.get(name).copied().unwrap_or(0);
                if tries < ctx.settings.region_retries {
                    // Removed below, together with any other region failing in this look; added
                    // back once the version settles.
                    message.artifacts.region_retries.insert(name.to_string(), tries + 1);
                    message.artifacts.regions_to_readd.push(name.to_string());
                    removing.push(name.to_string());
                    events.push(EventKind::Retried {
                        attempt: tries + 1,
                        error: format!("replication to {name} failed ({details}); removing and adding the region back"),
                    });
                    progress.remove(name);
                    unknown_pending = true;
                } else {
                    let reason = format!("replication failed: {details}");
                    message
                        .artifacts
                        .regions_failed
                        .insert(name.to_string(), reason.clone());
                    events.push(EventKind::RegionFailed {
                        region: name.to_string(),
                        reason,
                    });
                }
            }
            Some(_) | None => {
                let eta = status.and_then(|s| estimate(&mut progress, s, ctx));
                match eta {
                    Some(eta) => pending_eta = Some(pending_eta.map_or(eta, |p| p.min(eta))),
                    // Not started (`Unknown`): Azure replicates to the other regions once the source
                    // region is done, so such a region waits on one that replicates; it needs no
                    // look of its own before that one's estimate.
                    None if status.is_some_and(|s| s.state.eq_ignore_ascii_case("Unknown")) => {}
                    None => unknown_pending = true,
                }
            }
        }
    }

    if !removing.is_empty() {
        // One write for every failing region: keep only what neither waits to be re-added nor
        // failed for good.
        let out: Vec<&str> = message
            .artifacts
            .regions_to_readd
            .iter()
            .map(String::as_str)
            .chain(message.artifacts.regions_failed.keys().map(String::as_str))
            .collect();
        ctx.azure
            .set_target_regions(&plan.version_id, &target_regions(&plan, &out))
            .await?;
    }
    let observations = replication_ratios(&plan, &version.replication, &message);
    let all_ended = plan.regions.iter().all(|r| {
        message.artifacts.regions_completed.contains(&r.name) || message.artifacts.regions_failed.contains_key(&r.name)
    });
    if all_ended {
        let outcome = if emit.is_empty() {
            Outcome::Done
        } else {
            Outcome::Advance(emit)
        };
        return Ok(Step {
            outcome,
            events,
            observations,
        });
    }
    let delay = match (pending_eta, unknown_pending) {
        (Some(eta), false) => ctx.settings.clamp(eta),
        (Some(eta), true) => ctx.settings.clamp(eta.min(ctx.settings.default_poll())),
        (None, _) => ctx.settings.default_poll(),
    };
    let first = message.operation.as_ref().is_none_or(|op| op.what != WHAT);
    let mut outcome = wait(message, WHAT, Vec::new(), delay, ctx.now);
    if let Outcome::Wait { message, emit: out, .. } = &mut outcome {
        if let Some(op) = message.operation.as_mut() {
            op.progress = progress;
        }
        *out = emit;
    }
    if first {
        events.insert(0, EventKind::Waiting { what: WHAT.to_string() });
    }
    Ok(Step {
        outcome,
        events,
        observations,
    })
}

/// Each planned region's replication as a ratio: 1 once Completed (now or on an earlier look),
/// else the progress Azure reports.
fn replication_ratios(
    plan: &crate::model::plan::Plan,
    statuses: &[RegionStatus],
    message: &Envelope,
) -> Vec<Observation> {
    plan.regions
        .iter()
        .map(|region| {
            let status = statuses.iter().find(|s| s.region == region.name);
            let completed = message.artifacts.regions_completed.contains(&region.name)
                || status.is_some_and(|s| s.state == "Completed");
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

/// When a replicating region should be done, from two progress readings; records this reading.
fn estimate(
    progress: &mut std::collections::BTreeMap<String, Progress>,
    status: &RegionStatus,
    ctx: &StepContext<'_>,
) -> Option<Duration> {
    // A region that has not started (`Unknown`) reads 0% without replicating: no reading to time from.
    if !status.state.eq_ignore_ascii_case("Replicating") {
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
    let before = before?;
    let gained = now.percent.checked_sub(before.percent).filter(|g| *g > 0)? as f64;
    let elapsed = (now.at - before.at).as_seconds_f64();
    if elapsed <= 0.0 {
        return None;
    }
    let left = (100 - now.percent.min(100)) as f64 * elapsed / gained;
    Some(Duration::from_secs_f64(left))
}

//! Stage 6, `verify` (one message per pool): waits until the pool's allocation is `steady` without
//! resize errors and enough nodes are `idle` (and few enough in `starttaskfailed`), within the
//! spec's deadline. Then it promotes the version (flips `excludeFromLatest` when promotion is gated)
//! and hands the branch to its rollout phase (`rollout`: retiring the pools of older versions).
//!
//! Batch gives no hint when to look. The first look waits out the documented 15 minutes per 1000
//! nodes (at most `poll_max`); later looks are timed from the pace at which nodes joined the pool
//! (the slowest pace two readings allow, so a look finds what it waits for rather than coming one
//! read too early), and once the allocation is steady only the node counts are read: at the pace
//! nodes joined, then at the likely moment two readings of the idle nodes give (this look's
//! lateness is the run's).

use std::collections::BTreeMap;
use std::time::Duration;

use super::common::{fail, latest_reach, likely_reach, slowest_pace, wait_step};
use super::{FailureClass, Observation, Outcome, Step, StepContext, rollout};
use crate::azure::{AllocationState, AzureError};
use crate::events::EventKind;
use crate::model::envelope::{Branch, Envelope, Phase, PoolArtifact, Progress};

/// Progress keys: the first and the latest reading of the nodes present while the pool allocates,
/// and the first reading of idle nodes (percent of the target nodes).
const ALLOCATED_FIRST: &str = "allocated-first";
const ALLOCATED_LAST: &str = "allocated-last";
const IDLE_FIRST: &str = "idle-first";

/// The progress readings a verify look keeps between looks.
type Readings = BTreeMap<String, Progress>;

/// What this branch's pool must reach, from the plan and the spec.
struct Goal {
    target: String,
    pool: PoolArtifact,
    /// Dedicated and low-priority nodes planned.
    nodes: u32,
    /// Idle nodes needed: the spec's share of `nodes`, rounded up.
    required: f64,
}

impl Goal {
    fn of(message: &Envelope) -> Result<Goal, Step> {
        let (Branch::Pool { target, .. }, Some(pool)) = (message.branch.clone(), message.artifacts.pool.clone()) else {
            return Err(fail("verify runs on a pool branch after pool-create"));
        };
        let Some(planned) = message.plan.pools.iter().find(|p| p.target == target) else {
            return Err(fail(format!("no pool target `{target}` in the plan")));
        };
        let nodes = planned.dedicated_nodes + planned.low_priority_nodes;
        let required = (message.spec.verify.min_idle_share * nodes as f64).ceil();
        Ok(Goal {
            target,
            pool,
            nodes,
            required,
        })
    }
}

pub async fn step(message: Envelope, ctx: &StepContext<'_>) -> Result<Step, AzureError> {
    let goal = match Goal::of(&message) {
        Ok(goal) => goal,
        Err(step) => return Ok(step),
    };
    let verify = &message.spec.verify;
    if ctx.now > goal.pool.created + ctx.settings.real(verify.deadline) {
        return Ok(fail(format!(
            "pool {} did not verify within {}",
            goal.pool.pool_id,
            crate::model::spec::duration::format(verify.deadline)
        ))
        .observe(Observation::Failure(FailureClass::Timeout)));
    }
    let mut progress = message
        .operation
        .as_ref()
        .map(|op| op.progress.clone())
        .unwrap_or_default();
    // Batch gives no hint; the documented 15 minutes per 1000 nodes says when to look at the latest.
    let expected = goal.pool.created
        + ctx
            .settings
            .real(Duration::from_secs(60 + (goal.nodes as u64 * 900).div_ceil(1000)));
    let left = Duration::from_secs_f64((expected - ctx.now).max(time::Duration::ZERO).as_seconds_f64());
    let phase = message.operation.as_ref().map(|op| op.what);
    // Straight from pool-create: nothing has allocated yet, so the first look is the first wait.
    if phase.is_none() && ctx.now - goal.pool.created < ctx.settings.real(ctx.settings.poll_min) {
        let delay = ctx.settings.clamp(left.max(ctx.settings.default_poll()));
        return Ok(wait_with(message, Phase::Allocation, delay, progress, ctx));
    }
    // Once the allocation was seen steady without errors (the `nodes` wait), only nodes change.
    if phase != Some(Phase::Nodes)
        && let Some(step) = look_at_allocation(&message, &goal, &mut progress, left, ctx).await?
    {
        return Ok(step);
    }
    match look_at_nodes(&message, &goal, &mut progress, ctx).await? {
        Ok(nodes_seen) => verified(message, &goal, nodes_seen, ctx).await,
        Err(step) => Ok(step),
    }
}

/// While the pool allocates: a wait timed by the pace nodes join it; a failure when the
/// allocation ended with a resize error; nothing once it is steady.
async fn look_at_allocation(
    message: &Envelope,
    goal: &Goal,
    progress: &mut Readings,
    left: Duration,
    ctx: &StepContext<'_>,
) -> Result<Option<Step>, AzureError> {
    let pool = &goal.pool;
    let Some(info) = ctx.azure.get_pool(&pool.account_url, &pool.pool_id).await? else {
        return Ok(Some(fail(format!(
            "pool {} disappeared before it verified",
            pool.pool_id
        ))));
    };
    if info.allocation_state == AllocationState::Steady {
        return Ok(info.resize_errors.first().map(|error| {
            fail(format!(
                "pool {} allocation ended with {}: {} ({} of {} dedicated nodes)",
                pool.pool_id, error.code, error.message, info.current_dedicated, info.target_dedicated
            ))
            .observe(Observation::Failure(FailureClass::Allocation))
        }));
    }
    // Nodes join the pool as it allocates: once two looks have seen them arrive, the latest end
    // their pace allows (a look then finds the allocation over, and nodes turn idle minutes
    // later, so coming late costs no time on the way to verified).
    let mut delay = left.max(ctx.settings.default_poll());
    let present = info.current_dedicated + info.current_low_priority;
    let reading = Progress {
        at: ctx.now,
        percent: percent_of(present, goal.nodes),
    };
    if reading.percent > 0 {
        let first = *progress.entry(ALLOCATED_FIRST.to_string()).or_insert(reading);
        progress.insert(ALLOCATED_LAST.to_string(), reading);
        if let Some(eta) = latest_reach(first, reading, 100.0) {
            delay = delay.min(eta);
        }
        // Nearly allocated: nodes turn idle minutes after they join, so the next look also waits
        // for enough of them, at the pace they joined.
        if present as f64 >= goal.required
            && let Some(percent_per_sec) = slowest_pace(first, reading)
        {
            let idle = ctx
                .azure
                .node_counts(&pool.account_url, &pool.pool_id)
                .await?
                .get("idle") as f64;
            let nodes_per_sec = percent_per_sec * goal.nodes as f64 / 100.0;
            delay = delay.max(Duration::from_secs_f64((goal.required - idle).max(0.0) / nodes_per_sec));
        }
    }
    let delay = ctx.settings.clamp(delay);
    Ok(Some(wait_with(
        message.clone(),
        Phase::Allocation,
        delay,
        progress.clone(),
        ctx,
    )))
}

/// The pool's nodes by state: what was seen, when enough are idle and few enough failed their
/// start task; else the failure, or a wait timed by the pace nodes turn idle.
async fn look_at_nodes(
    message: &Envelope,
    goal: &Goal,
    progress: &mut Readings,
    ctx: &StepContext<'_>,
) -> Result<Result<Observation, Step>, AzureError> {
    let (pool, verify) = (&goal.pool, &message.spec.verify);
    let counts = ctx.azure.node_counts(&pool.account_url, &pool.pool_id).await?;
    let nodes_seen = Observation::PoolNodes {
        target: goal.target.clone(),
        by_state: counts.by_state.iter().map(|(state, n)| (state.clone(), *n)).collect(),
    };
    if counts.total == 0 && ctx.azure.get_pool(&pool.account_url, &pool.pool_id).await?.is_none() {
        return Ok(Err(fail(format!(
            "pool {} disappeared before it verified",
            pool.pool_id
        ))));
    }
    let target_nodes = goal.nodes as f64;
    let idle = counts.get("idle") as f64;
    let failed = counts.get("starttaskfailed") as f64;
    let allowed_failed = (verify.max_start_task_failed_share * target_nodes).floor();
    if failed > allowed_failed {
        return Ok(Err(fail(format!(
            "pool {}: {failed} of {target_nodes} nodes failed their start task (at most {allowed_failed} allowed)",
            pool.pool_id
        ))
        .observe(nodes_seen)
        .observe(Observation::Failure(FailureClass::StartTask))));
    }
    if idle >= goal.required {
        return Ok(Ok(nodes_seen));
    }
    let delay = until_idle(goal, idle, progress, ctx);
    Ok(Err(wait_with(
        message.clone(),
        Phase::Nodes,
        delay,
        progress.clone(),
        ctx,
    )
    .observe(nodes_seen)))
}

/// When to look again for idle nodes: by two readings of the idle nodes (the likely moment their
/// pace gives), else at the pace nodes joined (they turn idle at about that pace), else after the
/// default poll.
fn until_idle(goal: &Goal, idle: f64, progress: &mut Readings, ctx: &StepContext<'_>) -> Duration {
    let target_nodes = goal.nodes as f64;
    let reading = Progress {
        at: ctx.now,
        percent: percent_of(idle as u32, goal.nodes),
    };
    let joined = match (progress.get(ALLOCATED_FIRST), progress.get(ALLOCATED_LAST)) {
        (Some(first), Some(last)) => slowest_pace(*first, *last),
        _ => None,
    };
    let first_idle = (reading.percent > 0).then(|| *progress.entry(IDLE_FIRST.to_string()).or_insert(reading));
    // A look timed by the pace nodes joined found too few idle: two readings of the idle nodes
    // themselves time the next. This look ends the wait, so it aims at the likely moment, not
    // the latest.
    let by_idle = first_idle.and_then(|first| likely_reach(first, reading, goal.required * 100.0 / target_nodes));
    let eta = by_idle.or_else(|| {
        joined.map(|percent_per_sec| {
            Duration::from_secs_f64((goal.required - idle) * 100.0 / target_nodes / percent_per_sec)
        })
    });
    eta.map_or_else(|| ctx.settings.default_poll(), |eta| ctx.settings.clamp(eta))
}

/// The pool verified: marked so in its metadata, the version promoted when promotion is gated,
/// and the branch handed to its rollout phase.
async fn verified(
    message: Envelope,
    goal: &Goal,
    nodes_seen: Observation,
    ctx: &StepContext<'_>,
) -> Result<Step, AzureError> {
    let pool = &goal.pool;
    let planned = message.plan.pools.iter().find(|p| p.target == goal.target);
    // The pool says so itself, for runs that cannot read this run's history (another
    // `sigrun run`, a history past its retention): their rollout may retire it once it is older.
    let mut metadata = planned.map(|p| p.metadata.clone()).unwrap_or_default();
    metadata.insert("sigrun-run".into(), message.run_id.to_string());
    if !message.admission.is_nil() {
        metadata.insert(super::common::ADMISSION.into(), message.admission.to_string());
    }
    metadata.insert(rollout::VERIFIED.into(), "true".into());
    ctx.azure
        .set_pool_metadata(&pool.account_url, &pool.pool_id, &metadata)
        .await?;
    let mut events = vec![EventKind::PoolVerified {
        pool_id: pool.pool_id.clone(),
    }];
    let plan = &message.plan;
    if plan.publish_excluded && !plan.final_excluded && !already_promoted(&message, ctx).await? {
        ctx.azure.set_exclude_from_latest(&plan.version_id, false).await?;
        events.push(EventKind::Promoted {
            version_id: plan.version_id.to_string(),
        });
    }
    // The rollout policy and retention are effects of their own (their own retries; their
    // failure never fails this branch): the message goes on in the retire phase.
    let outcome = rollout::begin(message, ctx);
    Ok(Step {
        outcome,
        events,
        observations: vec![nodes_seen],
    })
}

/// Whether the run's version is latest already, asking Azure only when the run cannot say.
/// - The run's history holds another pool's `Promoted`: it is.
/// - This admission made the version (published excluded: `artifacts.recorded`) and the history
///   holds the run without a `Promoted`: it is not. Only another pool's verdict whose commit is
///   not read yet could have promoted it, and promoting it again changes nothing.
/// - Otherwise Azure is asked: the same version run again in a new history, or a history past its
///   retention, says nothing of what an earlier admission did.
async fn already_promoted(message: &Envelope, ctx: &StepContext<'_>) -> Result<bool, AzureError> {
    let made_here = message
        .artifacts
        .recorded
        .contains(&message.plan.version_id.to_string());
    match ctx.runs.version_promoted(message.run_id) {
        Some(true) => return Ok(true),
        Some(false) if made_here => return Ok(false),
        _ => {}
    }
    let version = ctx.azure.get_version(&message.plan.version_id, false).await?;
    Ok(version.is_some_and(|v| !v.exclude_from_latest))
}

/// A wait that keeps the progress readings (a new `what` would start them over).
fn wait_with(message: Envelope, what: Phase, delay: Duration, progress: Readings, ctx: &StepContext<'_>) -> Step {
    let mut step = wait_step(message, what, Vec::new(), delay, ctx.now);
    if let Outcome::Wait { message, .. } = &mut step.outcome
        && let Some(op) = message.operation.as_mut()
    {
        op.progress = progress;
    }
    step
}

fn percent_of(part: u32, whole: u32) -> u8 {
    (part as u64 * 100 / whole.max(1) as u64).min(100) as u8
}

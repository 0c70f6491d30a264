//! The control API under `/_emulator`: the request log (for counting calls and checking
//! `Retry-After`), the fault plan (read and replace at run time), the emulated clock (read and jump
//! forward), a summary of what exists and the timelines fixed for it (when each operation, region
//! replication and node became ready: what a benchmark measures a client against). Local tooling
//! only; it takes no token.

use serde_json::{Value, json};
use time::Duration;
use time::format_description::well_known::Rfc3339;

use super::Ctx;
use super::faults::FaultPlan;
use super::http::{Request, Response};

pub fn handle(ctx: &Ctx, req: &Request) -> Response {
    let s: Vec<&str> = req.segments.iter().skip(1).map(String::as_str).collect();
    match (req.method.as_str(), s.as_slice()) {
        ("GET", ["requests"]) => requests(ctx, req),
        ("DELETE", ["requests"]) => {
            ctx.log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
            Response::empty(204)
        }
        ("GET", ["faults"]) => faults(ctx),
        ("PUT", ["faults"]) => set_faults(ctx, req),
        ("GET", ["clock"]) => clock(ctx),
        ("POST", ["clock"]) => advance(ctx, req),
        ("GET", ["state"]) => state(ctx),
        ("GET", ["timelines"]) => timelines(ctx),
        _ => Response::json(
            404,
            &json!({"error": "unknown control endpoint", "endpoints": [
                "GET requests[?since=SEQ]", "DELETE requests", "GET faults", "PUT faults {\"spec\": ...}",
                "GET clock", "POST clock {\"advance_seconds\": N}", "GET state", "GET timelines"
            ]}),
        ),
    }
}

fn requests(ctx: &Ctx, req: &Request) -> Response {
    let since = req.query("since").and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    let log = ctx.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let entries: Vec<&super::log::LogEntry> = log.iter().filter(|e| e.seq > since).collect();
    Response::json(200, &json!({ "requests": entries }))
}

fn faults(ctx: &Ctx) -> Response {
    let plan = ctx.faults.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    Response::json(200, &json!({"seed": plan.seed(), "rules": plan.status()}))
}

fn set_faults(ctx: &Ctx, req: &Request) -> Response {
    let spec = match serde_json::from_slice::<Value>(&req.body) {
        Ok(v) => match v["spec"].as_str() {
            Some(s) => s.to_string(),
            None => return Response::json(400, &json!({"error": "body must be {\"spec\": \"RULE;RULE...\"}"})),
        },
        Err(_) => String::from_utf8_lossy(&req.body).into_owned(),
    };
    let mut plan = ctx.faults.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match FaultPlan::parse(&spec, plan.seed()) {
        Ok(new_plan) => {
            *plan = new_plan;
            Response::json(200, &json!({"seed": plan.seed(), "rules": plan.status()}))
        }
        Err(err) => Response::json(400, &json!({"error": err.to_string()})),
    }
}

fn clock(ctx: &Ctx) -> Response {
    Response::json(
        200,
        &json!({
            "now": ctx.clock.now().format(&Rfc3339).unwrap_or_default(),
            "time_scale": ctx.clock.scale(),
        }),
    )
}

fn advance(ctx: &Ctx, req: &Request) -> Response {
    let Some(secs) = serde_json::from_slice::<Value>(&req.body)
        .ok()
        .and_then(|v| v["advance_seconds"].as_f64())
    else {
        return Response::json(400, &json!({"error": "body must be {\"advance_seconds\": N}"}));
    };
    if !(0.0..=1e9).contains(&secs) {
        return Response::json(400, &json!({"error": "advance_seconds must be between 0 and 1e9"}));
    }
    if !ctx.clock.advance(Duration::seconds_f64(secs)) {
        return Response::json(
            400,
            &json!({"error": "the emulated clock cannot go past the year 9000"}),
        );
    }
    let st = ctx.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    ctx.save(&st);
    clock(ctx)
}

fn state(ctx: &Ctx) -> Response {
    let now = ctx.clock.now();
    let mut st = ctx.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    st.purge(now);
    let resources: Vec<Value> = st
        .resources
        .values()
        .map(|r| {
            let state = match r.kind {
                super::state::Kind::GalleryImageVersion => super::arm::version_state(r, now),
                _ => r.provisioning_state(now),
            };
            json!({"id": r.id, "type": r.kind.type_name(), "provisioningState": state})
        })
        .collect();
    let pools: Vec<Value> = st
        .pools
        .values()
        .map(|p| json!({"account": p.account, "id": p.id, "deleting": p.deleting.is_some()}))
        .collect();
    Response::json(
        200,
        &json!({"resources": resources, "pools": pools, "operations": st.operations.len()}),
    )
}

/// The timelines fixed when operations started (emulated time, RFC 3339): every ARM operation,
/// each version's per-region replication, and each pool's allocation with the moments its nodes
/// reach `idle` (or `starttaskfailed`), sorted.
fn timelines(ctx: &Ctx) -> Response {
    let at = |t: time::OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
    let st = ctx.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let operations: Vec<Value> = st
        .operations
        .values()
        .map(|op| {
            json!({"resource": op.resource_id, "kind": op.kind, "started": at(op.started), "ends": at(op.ends),
                "failed": op.failure.is_some()})
        })
        .collect();
    let replication: Vec<Value> = st
        .resources
        .values()
        .filter(|r| !r.replication.is_empty())
        .map(|r| {
            let regions: Vec<Value> = r
                .replication
                .iter()
                .map(|rep| json!({"region": rep.region, "starts": at(rep.starts), "ends": at(rep.ends), "fails_at": rep.fails_at}))
                .collect();
            json!({"resource": r.id, "location": r.location, "regions": regions})
        })
        .collect();
    let pools: Vec<Value> = st
        .pools
        .values()
        .map(|p| {
            let (mut idle, mut failed) = (Vec::new(), Vec::new());
            for node in p.nodes.iter().filter(|n| n.removed.is_none()) {
                let task = if p.wait_for_start_task { node.start_task_secs } else { 0 };
                let ready = node.allocated + Duration::seconds((node.boot_secs + node.agent_secs + task) as i64);
                if p.wait_for_start_task && node.start_task_fails {
                    failed.push(ready);
                } else {
                    idle.push(ready);
                }
            }
            idle.sort();
            failed.sort();
            let a = &p.allocation;
            json!({"account": p.account, "id": p.id, "created": at(p.created),
                "allocation": {"started": at(a.started), "ends": at(a.ends), "target_dedicated": a.target_dedicated,
                    "target_low_priority": a.target_low_priority, "error": a.error.as_ref().map(|e| e.code.clone())},
                "idle_at": idle.into_iter().map(at).collect::<Vec<_>>(),
                "start_task_failed_at": failed.into_iter().map(at).collect::<Vec<_>>()})
        })
        .collect();
    Response::json(
        200,
        &json!({"now": at(ctx.clock.now()), "time_scale": ctx.clock.scale(), "operations": operations,
            "replication": replication, "pools": pools}),
    )
}

//! ARM long-running operations: the `Azure-AsyncOperation` / `Location` URLs a PUT, PATCH or DELETE
//! answers with, and the operation-status resource behind them. Status runs InProgress until the
//! operation's timeline ends, then Succeeded or Failed with the error; the `Location` form answers
//! 202 until then and the final result after.

use serde_json::json;
use time::Duration;
use time::format_description::well_known::Rfc3339;

use super::{ArmError, Caller, Family, check_api_version, resources};
use crate::emulator::Ctx;
use crate::emulator::clock::EmuTime;
use crate::emulator::http::{Request, Response};
use crate::emulator::state::{ErrorInfo, OpFlavor, OpKind, Operation, State};

/// Bounds of the `Retry-After` an operation answers with: ARM's RPC asks for at least 10 s and at
/// most 10 minutes. Within them the emulator sends its estimate of the time left, as a resource
/// provider that knows its operation's progress may.
const MIN_POLL_HINT: Duration = Duration::seconds(10);
const MAX_POLL_HINT: Duration = Duration::minutes(10);

#[allow(clippy::too_many_arguments)]
pub fn start(
    st: &mut State,
    flavor: OpFlavor,
    kind: OpKind,
    sub: &str,
    location: &str,
    resource_id: &str,
    api_version: &str,
    started: EmuTime,
    ends: EmuTime,
    failure: Option<ErrorInfo>,
) -> Operation {
    let id = uuid::Uuid::new_v4().to_string();
    let op = Operation {
        id: id.clone(),
        subscription: sub.to_string(),
        location: location.to_string(),
        flavor,
        kind,
        resource_id: resource_id.to_string(),
        api_version: api_version.to_string(),
        started,
        ends,
        failure,
    };
    st.operations.insert(id, op.clone());
    op
}

fn status_url(ctx: &Ctx, op: &Operation, monitor: bool) -> String {
    format!(
        "{}/subscriptions/{}/providers/Microsoft.Compute/locations/{}/{}/{}?{}api-version={}",
        ctx.base_url,
        op.subscription,
        op.location,
        op.flavor.segment(),
        op.id,
        if monitor { "monitor=true&" } else { "" },
        op.api_version
    )
}

/// Adds the polling headers for `op` to an answer.
pub fn headers(ctx: &Ctx, resp: Response, op: &Operation, with_location: bool) -> Response {
    let left = (op.ends - ctx.clock.now()).clamp(MIN_POLL_HINT, MAX_POLL_HINT);
    let hint = ctx.clock.to_real(left);
    let resp = resp.with_header("azure-asyncoperation", status_url(ctx, op, false));
    let mut resp = crate::emulator::with_wait_hint(resp, hint);
    if with_location {
        resp = resp.with_header("location", status_url(ctx, op, true));
    }
    resp
}

fn timestamp(t: EmuTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
pub fn status(
    ctx: &Ctx,
    st: &mut State,
    req: &Request,
    _caller: &Caller,
    sub: &str,
    location: &str,
    op_kind: &str,
    op_id: &str,
) -> Result<Response, ArmError> {
    let family = match op_kind {
        "diskoperations" => Family::Disk,
        "capsoperations" => Family::Gallery,
        _ => Family::Compute,
    };
    let type_name = format!("locations/{op_kind}");
    check_api_version(req, family, &type_name, location)?;
    let not_found = || {
        ArmError::new(
            404,
            "OperationNotFound",
            format!("The operation '{op_id}' could not be found."),
        )
    };
    let op = st.operations.get(op_id).cloned().ok_or_else(not_found)?;
    if !op.subscription.eq_ignore_ascii_case(sub) || op.flavor.segment().to_ascii_lowercase() != op_kind {
        return Err(not_found());
    }
    let now = ctx.clock.now();
    let running = now < op.ends;
    let monitor = req.query("monitor").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if monitor {
        if running {
            return Ok(headers(ctx, Response::empty(202), &op, true));
        }
        if let Some(failure) = &op.failure {
            return Ok(super::error(400, &failure.code, &failure.message, None));
        }
        return Ok(match op.kind {
            OpKind::Delete => Response::empty(200),
            _ => match st.get(&op.resource_id) {
                Some(resource) => Response::json(200, &resources::render(ctx, st, resource, now, false)),
                None => Response::empty(204),
            },
        });
    }
    let status = if running {
        "InProgress"
    } else if op.failure.is_some() {
        "Failed"
    } else {
        "Succeeded"
    };
    let mut body = json!({
        "startTime": timestamp(op.started),
        "status": status,
        "name": op.id,
    });
    if !running {
        body["endTime"] = json!(timestamp(op.ends));
    }
    if let Some(failure) = &op.failure
        && !running
    {
        body["error"] = json!({"code": failure.code, "message": failure.message});
    }
    if op.flavor == OpFlavor::Disk
        && !running
        && op.failure.is_none()
        && op.kind != OpKind::Delete
        && let Some(resource) = st.get(&op.resource_id)
    {
        body["properties"] = json!({"output": resources::render(ctx, st, resource, now, false)});
    }
    let resp = Response::json(200, &body);
    Ok(if running { headers(ctx, resp, &op, false) } else { resp })
}

//! What the pages may do, and who may: cancel a running run (`POST /runs/{id}/cancel`, as `sigrun
//! cancel` does) and put a parked message back (`POST /parked/{id}/replay`, as `sigrun dlq
//! replay` does). Only when the server was started with a token, and only for a caller sending it
//! as `Authorization: Bearer TOKEN`: without a configured token every action is 403 (read-only),
//! with a wrong or missing one 401. The token is compared in constant time and never echoed.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Shared;
use super::parking::ReplayRefused;
use crate::events::{Event, EventKind};

/// What the page may ask of the workers: publish an event into the run history (a cancel
/// request). The command wires it to the bus.
#[async_trait::async_trait]
pub trait Actions: Send + Sync {
    async fn publish(&self, event: Event) -> Result<(), String>;
}

/// Who may act, and how: the token callers must send, and the bus behind it.
#[derive(Clone)]
pub struct ActionsAllowed {
    pub token: String,
    pub actions: Arc<dyn Actions>,
}

fn answer(status: StatusCode, text: impl Into<String>) -> Response {
    let mut text = text.into();
    text.push('\n');
    (status, text).into_response()
}

/// Why a caller may not act.
struct Refusal(StatusCode, &'static str);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        answer(self.0, self.1)
    }
}

/// The caller's right to act: `Ok` with the actions, or the refusal to send back.
fn authorized<'a>(shared: &'a Shared, headers: &HeaderMap) -> Result<&'a ActionsAllowed, Refusal> {
    let Some(allowed) = &shared.allowed else {
        return Err(Refusal(
            StatusCode::FORBIDDEN,
            "read-only: this page was started without a token",
        ));
    };
    let sent = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !sent.is_some_and(|sent| same_secret(sent, &allowed.token)) {
        return Err(Refusal(
            StatusCode::UNAUTHORIZED,
            "a valid `Authorization: Bearer TOKEN` is needed",
        ));
    }
    Ok(allowed)
}

/// Whether `sent` is the token, comparing every byte (no early exit on the first difference).
fn same_secret(sent: &str, token: &str) -> bool {
    sent.len() == token.len() && sent.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Asks the workers to stop a running run.
pub(super) async fn cancel(State(shared): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let allowed = match authorized(&shared, &headers) {
        Ok(allowed) => allowed,
        Err(refused) => return refused.into_response(),
    };
    let request = {
        let index = shared.feed.index.read().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = uuid::Uuid::parse_str(&id).ok().and_then(|id| index.run(&id)) else {
            return answer(StatusCode::NOT_FOUND, "no such run in the events stream");
        };
        if entry.summary.state != "running" {
            return answer(
                StatusCode::CONFLICT,
                format!("the run has already ended ({})", entry.summary.state),
            );
        }
        let first = &entry.events[0];
        crate::admission::trunk_event(
            first.run_id,
            &first.pipeline,
            &first.version,
            first.stage,
            EventKind::CancelRequested,
        )
    };
    match allowed.actions.publish(request).await {
        Ok(()) => answer(
            StatusCode::ACCEPTED,
            "cancel requested: each branch stops at its next step",
        ),
        Err(error) => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the cancel request was not published: {error}"),
        ),
    }
}

/// Puts a parked message back on its stage's queue, its attempts reset.
pub(super) async fn replay(State(shared): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(refused) = authorized(&shared, &headers) {
        return refused.into_response();
    }
    let Some(parked) = &shared.parked else {
        return answer(StatusCode::NOT_FOUND, "this page does not read the parking queue");
    };
    if id.is_empty() || id.len() > 200 {
        return answer(StatusCode::BAD_REQUEST, "a parked message id is 1 to 200 bytes");
    }
    match parked.replay(&id).await {
        Ok(done) => answer(StatusCode::ACCEPTED, format!("replayed: {done}")),
        Err(ReplayRefused::NotFound) => answer(StatusCode::NOT_FOUND, "nothing parked has that id (replayed already?)"),
        Err(ReplayRefused::NotReplayable(why)) => answer(
            StatusCode::CONFLICT,
            format!("it cannot go back: {why}; it stays parked"),
        ),
        Err(ReplayRefused::Failed(error)) => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not replayed: {error}; it stays parked"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn a_token_matches_only_itself() {
        assert!(same_secret("s3cret", "s3cret"));
        assert!(!same_secret("s3cre", "s3cret"));
        assert!(!same_secret("s3creT", "s3cret"));
        assert!(!same_secret("", "s3cret"));
    }
}

//! Whether a step sent Azure anything that may change it. The runtime fences a step by a claim
//! before its commit so that two copies of one message do not both write to Azure; a step that
//! only read needs no such guard (two copies may read side by side, and the first commit read
//! counts), so it commits without claiming first and costs the history one record instead of two.
//!
//! The REST client notes every request it sends with a method other than GET or HEAD
//! ([`note_sent`]), within the scope the runtime opens around a step ([`watched`]); what is never
//! sent (held back by the request budget, refused before the socket) is not noted. Requests
//! outside any scope (planning, operator commands) are noted nowhere.

use std::cell::Cell;
use std::future::Future;

use reqwest::Method;

/// What a step sent Azure (ordered: a step that wrote anything wrote).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Writes {
    /// Reads alone, or nothing.
    #[default]
    None,
    /// At least one request that may change something (PUT, PATCH, POST, DELETE), or not known.
    Sent,
}

impl Writes {
    /// Both steps' writes, as one step's.
    pub fn and(self, other: Writes) -> Writes {
        self.max(other)
    }
}

tokio::task_local! {
    static SENT: Cell<Writes>;
}

/// Runs `work`, saying whether it sent Azure a request that may change something.
pub async fn watched<F: Future>(work: F) -> (F::Output, Writes) {
    SENT.scope(Cell::new(Writes::None), async {
        let output = work.await;
        (output, SENT.with(Cell::get))
    })
    .await
}

/// Notes that a request with `method` is about to be sent (a no-op outside [`watched`]).
pub fn note_sent(method: &Method) {
    if !method.is_safe() {
        note_write();
    }
}

/// Notes a write as the REST client does for a request that may change Azure: for what stands
/// in for the client (the runtime's test handlers).
pub fn note_write() {
    let _ = SENT.try_with(|sent| sent.set(Writes::Sent));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_are_no_writes_and_anything_else_is() {
        let (_, writes) = watched(async { note_sent(&Method::GET) }).await;
        assert_eq!(writes, Writes::None);
        for method in [Method::PUT, Method::PATCH, Method::POST, Method::DELETE] {
            let (_, writes) = watched(async {
                note_sent(&Method::GET);
                note_sent(&method);
                note_sent(&Method::HEAD);
            })
            .await;
            assert_eq!(writes, Writes::Sent, "{method}");
        }
    }

    #[tokio::test]
    async fn a_scope_sees_its_own_requests_only() {
        note_sent(&Method::PUT);
        let (inner, outer) = watched(async {
            let (_, inner) = watched(async { note_sent(&Method::DELETE) }).await;
            inner
        })
        .await;
        assert_eq!((inner, outer), (Writes::Sent, Writes::None));
        assert_eq!(Writes::None.and(Writes::Sent), Writes::Sent);
        assert_eq!(Writes::None.and(Writes::None), Writes::None);
    }
}

//! The parking queue as the pages see it: each parked message in a line (its run, stage, branch,
//! why, whether it can go back), read through a [`Parking`] the command wires to the bus, and
//! held for [`FRESH`] so viewers of run pages share one look at the queue (a look takes every
//! parked message off the queue unacked for a moment: one per viewer would be a load of its own).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

/// How long one look at the parking queue serves every viewer.
pub const FRESH: Duration = Duration::from_secs(3);
/// How long a look may take before the page says the queue could not be read (a connection that
/// went silent must not hang every run page behind the cache's lock).
pub const LOOK_LIMIT: Duration = Duration::from_secs(10);
/// How long a replay may take before the page says it may not have happened.
pub const REPLAY_LIMIT: Duration = Duration::from_secs(30);

/// One parked message, for a page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParkedView {
    /// As `sigrun dlq list` shows it (what a replay names).
    pub id: String,
    /// Its run, when the body says.
    pub run_id: Option<Uuid>,
    pub stage: Option<String>,
    pub branch: Option<String>,
    pub error: String,
    pub attempts: Option<u32>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen: Option<OffsetDateTime>,
    /// Why it cannot go back, when it cannot (it does not decode as a message).
    pub not_replayable: Option<String>,
}

/// Why a replay did not happen.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplayRefused {
    /// Nothing parked has that id (replayed already, or never parked).
    NotFound,
    /// It is parked but cannot go back (the reason).
    NotReplayable(String),
    /// The broker failed; it stays parked.
    Failed(String),
}

/// The parking queue, as the command wires it.
#[async_trait::async_trait]
pub trait Parking: Send + Sync {
    /// Every parked message (up to a bound), oldest first.
    async fn parked(&self) -> Result<Vec<ParkedView>, String>;
    /// Puts message `id` back on its stage's queue as `sigrun dlq replay ID` does; what was done.
    async fn replay(&self, id: &str) -> Result<String, ReplayRefused>;
}

/// One look at the parking queue: what was parked, or why it could not be read.
pub type Look = Arc<Result<Vec<ParkedView>, String>>;

/// The last look at the parking queue, shared by the viewers.
pub struct ParkedCache {
    source: Arc<dyn Parking>,
    last: tokio::sync::Mutex<Option<(Instant, Look)>>,
}

impl ParkedCache {
    pub fn new(source: Arc<dyn Parking>) -> ParkedCache {
        ParkedCache {
            source,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The parked messages as of at most [`FRESH`] ago.
    pub async fn current(&self) -> Look {
        let mut last = self.last.lock().await;
        if let Some((at, parked)) = last.as_ref()
            && at.elapsed() < FRESH
        {
            return Arc::clone(parked);
        }
        let parked = match tokio::time::timeout(LOOK_LIMIT, self.source.parked()).await {
            Ok(parked) => parked,
            Err(_) => Err(format!("no answer from the broker within {} s", LOOK_LIMIT.as_secs())),
        };
        let parked = Arc::new(parked);
        *last = Some((Instant::now(), Arc::clone(&parked)));
        parked
    }

    /// Replays `id`; the next look reads the queue again.
    pub async fn replay(&self, id: &str) -> Result<String, ReplayRefused> {
        let mut last = self.last.lock().await;
        let replayed = match tokio::time::timeout(REPLAY_LIMIT, self.source.replay(id)).await {
            Ok(replayed) => replayed,
            Err(_) => Err(ReplayRefused::Failed(format!(
                "no answer from the broker within {} s; look again before replaying again",
                REPLAY_LIMIT.as_secs()
            ))),
        };
        *last = None;
        replayed
    }
}

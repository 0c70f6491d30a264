//! The run index: which runs have started and which were cancelled, kept by tailing the events
//! stream from its first retained event in the background. The admitter asks it whether a
//! trigger's run has started (dedup); the runtime asks it, through [`RunGate`], whether a run was
//! cancelled before each step.
//!
//! The tail lags the stream by a few milliseconds. Where that matters — before a new run is
//! admitted — [`RunIndex::catch_up`] makes it exact: it publishes a marker and waits until the
//! tail has read past it; since the stream keeps publish order, every event confirmed before the
//! marker has been read by then. The index knows only what the stream retains (`amqp.event_max_age`,
//! 7 days by default): a trigger for a run whose history has expired starts it again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::bus::BusError;
use crate::bus::amqp::{AmqpBus, StreamItem, StreamOffset};
use crate::events::EventKind;
use crate::model::envelope::Stage;
use crate::runtime::{Observer, RunGate};

/// How long to wait before opening the stream again after the reader failed.
const REOPEN_DELAY: Duration = Duration::from_millis(200);

#[derive(Default)]
struct Runs {
    /// Started runs and the stage each entered at.
    started: HashMap<Uuid, Stage>,
    cancelled: HashSet<Uuid>,
    /// Catch-ups waiting for their marker to come by.
    markers: HashMap<Uuid, oneshot::Sender<()>>,
    /// Events read so far (for logs and tests).
    events_read: u64,
}

/// The started and cancelled runs of one prefix. Dropping it stops the tail.
pub struct RunIndex {
    bus: Arc<AmqpBus>,
    runs: Arc<Mutex<Runs>>,
    tail: JoinHandle<()>,
}

impl RunIndex {
    /// Starts tailing the events stream of `bus` from its first retained event. Call
    /// [`RunIndex::catch_up`] before relying on what it says.
    pub fn start(bus: Arc<AmqpBus>) -> RunIndex {
        RunIndex::start_observed(bus, None)
    }

    /// As [`RunIndex::start`], also handing every event read, in stream order, to `observer`
    /// (the run-level metrics, which so read the same stream as the index).
    pub fn start_observed(bus: Arc<AmqpBus>, observer: Option<Arc<dyn Observer>>) -> RunIndex {
        let runs = Arc::new(Mutex::new(Runs::default()));
        let tail = tokio::spawn(tail(Arc::clone(&bus), Arc::clone(&runs), observer));
        RunIndex { bus, runs, tail }
    }

    fn lock(&self) -> MutexGuard<'_, Runs> {
        lock(&self.runs)
    }

    /// Returns once the index has read every event confirmed before the call, or fails after
    /// `limit` (or when the marker cannot be published).
    pub async fn catch_up(&self, limit: Duration) -> Result<(), BusError> {
        let marker = Uuid::new_v4();
        let (reached, wait) = oneshot::channel();
        // Waiting before publishing: the tail may read the marker before the publish returns.
        self.lock().markers.insert(marker, reached);
        let caught_up = async {
            self.bus.publish_marker_id(marker).await?;
            match tokio::time::timeout(limit, wait).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(BusError::Closed),
                Err(_) => Err(BusError::Connection(format!(
                    "the run index did not read up to its marker within {} ms",
                    limit.as_millis()
                ))),
            }
        }
        .await;
        if caught_up.is_err() {
            self.lock().markers.remove(&marker);
        }
        caught_up
    }

    /// The stage a run entered at, if it has started.
    pub fn started(&self, run_id: Uuid) -> Option<Stage> {
        self.lock().started.get(&run_id).copied()
    }

    pub fn is_cancelled(&self, run_id: Uuid) -> bool {
        self.lock().cancelled.contains(&run_id)
    }

    /// Records a run this process has just started (its `RunStarted` is confirmed), so the next
    /// trigger for it is a duplicate even before the tail reads that event.
    pub fn record_started(&self, run_id: Uuid, entry: Stage) {
        self.lock().started.insert(run_id, entry);
    }

    /// Runs known to have started.
    pub fn started_count(&self) -> usize {
        self.lock().started.len()
    }

    /// Events the tail has read.
    pub fn events_read(&self) -> u64 {
        self.lock().events_read
    }
}

impl RunGate for RunIndex {
    fn is_cancelled(&self, run_id: Uuid) -> bool {
        RunIndex::is_cancelled(self, run_id)
    }
}

impl Drop for RunIndex {
    fn drop(&mut self) {
        self.tail.abort();
    }
}

fn lock(runs: &Mutex<Runs>) -> MutexGuard<'_, Runs> {
    runs.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads the stream until aborted, opening it again (from the offset after the last event read)
/// whenever the reader ends: a reader does not survive a reconnect.
async fn tail(bus: Arc<AmqpBus>, runs: Arc<Mutex<Runs>>, observer: Option<Arc<dyn Observer>>) {
    let mut offset = StreamOffset::First;
    loop {
        let mut reader = match bus.read_events(offset.clone()).await {
            Ok(reader) => reader,
            Err(BusError::Closed) => return,
            Err(error) => {
                warn!(%error, "run index: cannot open the events stream; trying again");
                tokio::time::sleep(REOPEN_DELAY).await;
                continue;
            }
        };
        loop {
            match reader.next_item().await {
                None => break,
                Some(Ok(StreamItem::Marker(marker))) => {
                    if let Some(reached) = lock(&runs).markers.remove(&marker) {
                        let _ = reached.send(());
                    }
                }
                Some(Ok(StreamItem::Event(streamed))) => {
                    offset = StreamOffset::At(streamed.offset + 1);
                    if let Some(observer) = &observer {
                        observer.event(&streamed.event);
                    }
                    let run_id = streamed.event.run_id;
                    let mut runs = lock(&runs);
                    runs.events_read += 1;
                    match streamed.event.kind {
                        EventKind::RunStarted { .. } => {
                            runs.started.insert(run_id, streamed.event.stage);
                        }
                        EventKind::CancelRequested => {
                            runs.cancelled.insert(run_id);
                        }
                        _ => {}
                    }
                }
                // Another build's event kind, say: not ours to judge; the rest of the stream counts.
                Some(Err(BusError::Malformed(reason))) => debug!(%reason, "run index: skipped an item"),
                Some(Err(error)) => {
                    warn!(%error, "run index: the events stream failed; opening it again");
                    break;
                }
            }
        }
        reader.close().await;
        // A closed bus ends the loop at the next open.
        tokio::time::sleep(REOPEN_DELAY).await;
    }
}

//! Driving one run in this process: start it, run every stage's consumers, follow the run's events
//! until [`run_result`] says it has ended (or the time is up), then shut the consumers down
//! gracefully and hand back the run's history. [`drive`] takes how the run starts: `sigrun run`
//! starts it through admission and the ledger (`admission::local`), which commits `RunStarted`
//! with the first messages; the runtime's own tests publish their first message unfenced.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, oneshot};
use uuid::Uuid;

use super::Observer;
use super::runner::{Runtime, RuntimeReport};
use super::settings::SettingsError;
use crate::bus::BusError;
use crate::bus::memory::MemoryBus;
use crate::events::{Event, RunResult, run_result};

/// How a driven run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    pub run_id: Uuid,
    /// `Running` when the run did not end in time (see `timed_out`) or the bus shut down under it.
    pub result: RunResult,
    /// The run's events, in order.
    pub events: Vec<Event>,
    pub timed_out: bool,
    pub runtime: RuntimeReport,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("publishing the run's first message: {0}")]
    Bus(#[from] BusError),
}

/// Drives run `run_id` on `bus` with `runtime`'s consumers: `start` starts it (publishing its
/// first messages one way or another), then its events are followed until it ends or `timeout`
/// passes. `feed`, when given, is told the run's events in order (the run-level metrics; leave it
/// out when a ledger already tells the observer).
pub async fn drive(
    bus: Arc<MemoryBus>,
    runtime: Runtime,
    run_id: Uuid,
    start: impl Future<Output = Result<(), BusError>>,
    timeout: Duration,
    feed: Option<Arc<dyn Observer>>,
) -> Result<RunOutcome, RunError> {
    // The run's events go to the observer in order as they are read (the run-level metrics).
    let mut fed = Fed {
        observer: feed,
        count: 0,
    };
    // Subscribed before the run starts, so no event of the run can slip past.
    let mut updates = bus.subscribe();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = runtime.run(async {
        let _ = stopped.await;
    });
    let mut running = std::pin::pin!(running);
    let mut report = None;
    let mut failed_start = None;
    let timed_out = tokio::select! {
        ended = tokio::time::timeout(timeout, async {
            start.await?;
            watch(&bus, run_id, &mut updates, &mut fed).await;
            Ok::<(), BusError>(())
        }) => match ended {
            Ok(Ok(())) => false,
            Ok(Err(error)) => {
                failed_start = Some(error);
                false
            }
            Err(_) => true,
        },
        // The consumers only stop on their own when the bus is shut down under them.
        stopped = &mut running => {
            report = Some(stopped);
            false
        }
    };
    let _ = stop.send(());
    let report = match report {
        Some(report) => report,
        None => running.await,
    };
    if let Some(error) = failed_start {
        return Err(RunError::Bus(error));
    }
    // Read once more after the consumers stopped: in-flight deliveries may have added events.
    let events = events_of(&bus, run_id);
    fed.feed(&events);
    Ok(RunOutcome {
        run_id,
        result: run_result(&events),
        events,
        timed_out,
        runtime: report,
    })
}

/// Returns once the run's result is no longer `Running`. The broadcast only says "something
/// happened"; the bus's log is read each time, so a lagging receiver misses nothing.
async fn watch(bus: &MemoryBus, run_id: Uuid, updates: &mut broadcast::Receiver<Event>, fed: &mut Fed) {
    loop {
        let events = events_of(bus, run_id);
        fed.feed(&events);
        if run_result(&events) != RunResult::Running {
            return;
        }
        match updates.recv().await {
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            // The bus owns the sender and we hold the bus, so this does not happen; wait for the
            // timeout rather than spin.
            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// How far into the run's (append-only) event log the observer has been told.
struct Fed {
    observer: Option<Arc<dyn Observer>>,
    count: usize,
}

impl Fed {
    fn feed(&mut self, events: &[Event]) {
        if let Some(observer) = &self.observer {
            for event in events.iter().skip(self.count) {
                observer.event(event);
            }
        }
        self.count = self.count.max(events.len());
    }
}

fn events_of(bus: &MemoryBus, run_id: Uuid) -> Vec<Event> {
    bus.events().into_iter().filter(|e| e.run_id == run_id).collect()
}

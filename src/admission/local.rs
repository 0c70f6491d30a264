//! A run in this process (`sigrun run`): the in-process bus, a ledger over its history, the stages'
//! consumers fenced by that ledger, and the run started through [`super::begin`] — the same
//! admission the workers' admitter makes (claim, first messages, `RunStarted` in one commit) —
//! then followed until its result says it has ended.

use std::sync::Arc;
use std::time::Duration;

use super::{Begun, Prepared, begin};
use crate::bus::BusError;
use crate::bus::memory::MemoryBus;
use crate::ledger::{Ledger, LedgerSettings};
use crate::model::envelope::Stage;
use crate::model::trace::TraceParent;
use crate::runtime::complete::drive;
use crate::runtime::{Clock, Handler, Observer, RunError, RunOutcome, Runtime, RuntimeSettings};

/// How a local run is driven.
pub struct Local {
    pub settings: RuntimeSettings,
    pub clock: Clock,
    /// Give up after this long.
    pub timeout: Duration,
    /// Told about every handled delivery (the ledger tells it the run's events).
    pub observer: Option<Arc<dyn Observer>>,
}

/// A ledger over `bus`'s history for a local run, telling `observer` the run's events.
pub fn ledger(bus: &Arc<MemoryBus>, settings: LedgerSettings, observer: Option<Arc<dyn Observer>>) -> Arc<Ledger> {
    Arc::new(Ledger::start(bus.clone(), settings, observer))
}

/// Starts the run `prepared` describes at `entry` on `bus` and drives it to its end, fenced by
/// `ledger` (made by [`ledger`] over the same bus; the handler may ask it about other runs).
pub async fn run(
    bus: Arc<MemoryBus>,
    ledger: Arc<Ledger>,
    handler: Arc<dyn Handler>,
    prepared: &Prepared,
    entry: Stage,
    trace: &TraceParent,
    local: Local,
) -> Result<RunOutcome, RunError> {
    let mut runtime = Runtime::new(bus.clone(), handler, Stage::ALL.to_vec(), local.settings)?
        .with_clock(local.clock)
        .with_ledger(Arc::clone(&ledger));
    if let Some(observer) = &local.observer {
        runtime = runtime.with_observer(Arc::clone(observer));
    }
    let start = async {
        match begin(bus.as_ref(), &ledger, prepared, entry, trace).await? {
            Begun::Started { .. } => Ok(()),
            // Nothing else admits runs on a bus of this process's own.
            other => Err(BusError::Connection(format!(
                "the run could not be admitted on the in-process bus: {other:?}"
            ))),
        }
    };
    drive(bus.clone(), runtime, prepared.run_id(), start, local.timeout, None).await
}

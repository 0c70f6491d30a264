//! SIGINT and SIGTERM for the commands that serve until stopped (`emulator`, `dev`, `ui`) or may
//! be stopped mid-way (`run`). The handlers are installed before a command says it is up: a
//! signal sent the moment its start-up line appears must still stop it properly (the emulator's
//! temporary TLS directory, private key included, goes with a proper stop), not kill it outright.

use anyhow::Context;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// Both signals, caught from the moment this is made.
pub struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    pub fn install() -> anyhow::Result<StopSignals> {
        let catch = |kind| signal(kind).context("catching SIGINT and SIGTERM");
        Ok(StopSignals {
            interrupt: catch(SignalKind::interrupt())?,
            terminate: catch(SignalKind::terminate())?,
        })
    }

    /// Until SIGINT (Ctrl-C) or SIGTERM arrives (or has arrived since [`StopSignals::install`]).
    pub async fn wait(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

//! [`Readiness`]: what `/readyz` answers. A process is ready when the bus it consumes is connected
//! (workers), an Azure token can be had (every process that calls Azure) and none of its
//! long-lived [`Components`] (the admitter) has ended under it. The bus check reads a
//! flag; the token check asks the credential (which caches tokens) at most once per
//! [`TOKEN_CHECK_TTL`], so a probe every second costs nothing and a broken identity is not
//! hammered.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;

use tokio::sync::Mutex;
use tracing::warn;

use crate::azure::AzureError;
use crate::azure::client::AzureClient;
use crate::bus::amqp::AmqpBus;

/// How long a token check's answer is reused.
pub const TOKEN_CHECK_TTL: Duration = Duration::from_secs(10);
/// A token check that takes longer than this counts as failed.
const TOKEN_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The long-lived parts of a process that must run as long as it does. One that ends or panics
/// while the process goes on (admission would silently stop for everyone) is recorded here with
/// why; `/readyz` and `/healthz` then answer 503 naming it, so an orchestrator replaces the
/// process.
#[derive(Clone, Default)]
pub struct Components {
    down: Arc<std::sync::Mutex<Vec<(&'static str, String)>>>,
}

impl Components {
    /// Runs `work` as the component `name` until it ends. Ending before `stopping` says so — by
    /// returning or by a panic, which is caught — records the component as down. Returns what
    /// `work` returned, `None` when it panicked.
    pub async fn supervise<T>(
        &self,
        name: &'static str,
        stopping: tokio::sync::watch::Receiver<bool>,
        work: impl Future<Output = T>,
    ) -> Option<T> {
        let ended = std::panic::AssertUnwindSafe(work).catch_unwind().await;
        if !*stopping.borrow() {
            let why = match &ended {
                Ok(_) => "ended while the process runs".to_string(),
                Err(panic) => format!("panicked: {}", crate::model::text::panic_message(&**panic)),
            };
            tracing::error!(component = name, %why, "a component is down; the process is not ready");
            self.mark_down(name, why);
        }
        ended.ok()
    }

    pub fn mark_down(&self, name: &'static str, why: String) {
        self.down
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((name, why));
    }

    /// The first component down and why, if any.
    pub fn first_down(&self) -> Option<String> {
        let down = self.down.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        down.first().map(|(name, why)| format!("{name}: {why}"))
    }
}

#[derive(Default)]
pub struct Readiness {
    components: Components,
    bus: Option<Arc<AmqpBus>>,
    azure: Option<Arc<AzureClient>>,
    /// The last token check: when, and its answer.
    token: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Readiness {
    /// Always ready, until checks are added.
    pub fn new() -> Readiness {
        Readiness::default()
    }

    /// Ready only while `bus` is connected.
    pub fn with_bus(mut self, bus: Arc<AmqpBus>) -> Readiness {
        self.bus = Some(bus);
        self
    }

    /// Ready only while a Resource Manager token can be had with `azure`'s credential.
    pub fn with_azure(mut self, azure: Arc<AzureClient>) -> Readiness {
        self.azure = Some(azure);
        self
    }

    /// Not ready (nor alive) once one of `components` is down.
    pub fn with_components(mut self, components: Components) -> Readiness {
        self.components = components;
        self
    }

    /// `Ok` while every component runs, else which one is down and why (what `/healthz` answers).
    pub fn alive(&self) -> Result<(), String> {
        self.components.first_down().map_or(Ok(()), Err)
    }

    /// Whether the bus is connected; `None` without a bus to check.
    pub fn bus_connected(&self) -> Option<bool> {
        self.bus.as_ref().map(|bus| bus.is_connected())
    }

    /// `Ok` when ready, else a short reason (no secret: Azure errors never carry one).
    pub async fn check(&self) -> Result<(), String> {
        self.alive()?;
        if self.bus_connected() == Some(false) {
            return Err("bus: not connected to the broker (reconnecting)".into());
        }
        let Some(azure) = &self.azure else {
            return Ok(());
        };
        let mut last = self.token.lock().await;
        if let Some((at, answer)) = last.as_ref()
            && at.elapsed() < TOKEN_CHECK_TTL
        {
            return answer.clone();
        }
        let answer = match tokio::time::timeout(TOKEN_CHECK_TIMEOUT, azure.check_token()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                warn!(%error, "readiness: no Azure token");
                Err(short_reason(&error))
            }
            Err(_) => Err(format!("azure: no token within {} s", TOKEN_CHECK_TIMEOUT.as_secs())),
        };
        *last = Some((Instant::now(), answer.clone()));
        answer
    }
}

/// One line for `/readyz`: Entra's code when it gave one (the whole error goes to the log).
fn short_reason(error: &AzureError) -> String {
    match (&error.code, error.status) {
        (Some(code), Some(status)) => format!("azure: no token ({code}, HTTP {status})"),
        (Some(code), None) => format!("azure: no token ({code})"),
        (None, _) => {
            let first_line = error.message.lines().next().unwrap_or_default();
            let cut: String = first_line.chars().take(120).collect();
            format!("azure: no token (network: {cut})")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_component_that_panics_or_ends_early_makes_the_process_unready_and_not_alive() {
        let components = Components::default();
        let readiness = Readiness::new().with_components(components.clone());
        let (_stop, running) = tokio::sync::watch::channel(false);
        assert_eq!(
            components.supervise("steady", running.clone(), async { 3 }).await,
            Some(3)
        );
        assert!(readiness.check().await.unwrap_err().starts_with("steady: ended"));

        let components = Components::default();
        let readiness = Readiness::new().with_components(components.clone());
        let crashed = components
            .supervise("admitter", running.clone(), async { panic!("bad \u{1b}[2J state") })
            .await;
        assert_eq!(crashed, None::<()>);
        let why = readiness.check().await.unwrap_err();
        assert!(why.starts_with("admitter: panicked: bad \\u{1b}[2J state"), "{why}");
        assert_eq!(readiness.alive(), Err(why));
    }

    #[tokio::test]
    async fn a_component_ending_because_the_process_stops_is_not_down() {
        let components = Components::default();
        let (stop, stopping) = tokio::sync::watch::channel(false);
        stop.send(true).unwrap();
        assert_eq!(components.supervise("admitter", stopping, async { 1 }).await, Some(1));
        assert_eq!(Readiness::new().with_components(components).check().await, Ok(()));
    }

    #[test]
    fn token_failures_read_as_one_short_line() {
        let refused = AzureError::permanent("get token", "AADSTS7000215", "a long message\r\nTrace ID: x");
        assert_eq!(short_reason(&refused), "azure: no token (AADSTS7000215)");
        let unreachable = AzureError::network("get token", format!("connection refused{}\nmore", "!".repeat(300)));
        let reason = short_reason(&unreachable);
        assert!(
            reason.starts_with("azure: no token (network: connection refused") && reason.len() < 160,
            "{reason}"
        );
    }
}

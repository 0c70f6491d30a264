//! [`Readiness`]: what `/readyz` answers. A process is ready when the bus it consumes is connected
//! (workers) and an Azure token can be had (every process that calls Azure). The bus check reads a
//! flag; the token check asks the credential (which caches tokens) at most once per
//! [`TOKEN_CHECK_TTL`], so a probe every second costs nothing and a broken identity is not
//! hammered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tracing::warn;

use crate::azure::AzureError;
use crate::azure::client::AzureClient;
use crate::bus::amqp::AmqpBus;

/// How long a token check's answer is reused.
pub const TOKEN_CHECK_TTL: Duration = Duration::from_secs(10);
/// A token check that takes longer than this counts as failed.
const TOKEN_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Readiness {
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

    /// Whether the bus is connected; `None` without a bus to check.
    pub fn bus_connected(&self) -> Option<bool> {
        self.bus.as_ref().map(|bus| bus.is_connected())
    }

    /// `Ok` when ready, else a short reason (no secret: Azure errors never carry one).
    pub async fn check(&self) -> Result<(), String> {
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

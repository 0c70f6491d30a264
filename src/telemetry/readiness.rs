//! [`Readiness`]: what `/readyz` answers. A process is ready when the bus it consumes is connected
//! (workers) and an Azure token can be had (every process that calls Azure). The bus check reads a
//! flag; the token check asks the credential (which caches tokens) at most once per
//! [`TOKEN_CHECK_TTL`], so a probe every second costs nothing and a broken identity is not
//! hammered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

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
            Ok(Err(error)) => Err(format!("azure: no token: {error}")),
            Err(_) => Err(format!("azure: no token within {} s", TOKEN_CHECK_TIMEOUT.as_secs())),
        };
        *last = Some((Instant::now(), answer.clone()));
        answer
    }
}

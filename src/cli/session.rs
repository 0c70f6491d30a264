//! What `run`, `validate`, `worker` and `submit` share: load the settings, start the built-in
//! emulator when configured, and build the Azure client and the stage and runtime settings, scaled
//! to the emulator's clock.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::azure::client::AzureClient;
use crate::azure::config::{AzureSettings, CloudSettings, CredentialSettings};
use crate::bus::amqp::AmqpSettings;
use crate::config::{Mode, Settings};
use crate::emulator::{Emulator, EmulatorOptions, World};
use crate::runtime::RuntimeSettings;
use crate::stages::StageSettings;
use crate::telemetry::TelemetrySettings;

pub struct Session {
    pub azure: Arc<AzureClient>,
    /// The built-in emulator, when running against it.
    pub emulator: Option<Emulator>,
    pub stages: StageSettings,
    pub runtime: RuntimeSettings,
    /// Azure seconds per real second (1 against Azure).
    pub time_scale: f64,
    /// The RabbitMQ bus settings (`worker`, `submit`).
    pub amqp: AmqpSettings,
    /// Where the metrics and health endpoints listen, if anywhere (`worker`, `run`).
    pub telemetry: TelemetrySettings,
}

impl Session {
    pub async fn open(config: Option<&Path>) -> anyhow::Result<Session> {
        let settings = Settings::load(config).map_err(super::input_error)?;
        Session::from_settings(settings).await
    }

    /// Like [`Session::open`], from settings already loaded (and looked at) by the caller.
    pub async fn from_settings(settings: Settings) -> anyhow::Result<Session> {
        let mut stages = settings.stages.clone();
        let mut runtime = settings.runtime.clone();
        let (azure_settings, emulator, time_scale) = match settings.azure.mode {
            Mode::Azure => (
                settings.azure.client.clone().expect("checked on load"),
                None,
                settings.azure.time_scale,
            ),
            Mode::Emulator => {
                let e = &settings.emulator;
                let emulator = start_emulator(e).await?;
                let info = emulator.info();
                let mut azure = AzureSettings::new(CredentialSettings::ClientSecret {
                    tenant_id: e.tenant_id.clone(),
                    client_id: e.client_id.clone(),
                    client_secret: e.client_secret.clone(),
                });
                azure.cloud = CloudSettings {
                    authority_host: info.base_url.clone(),
                    resource_manager: info.base_url.clone(),
                    ..CloudSettings::default()
                };
                azure.extra_ca_cert = info.ca_cert.clone().map(Into::into);
                // Retries inside the client wait real time; keep them short against a fast clock.
                azure.retry.min_delay_ms = azure.retry.min_delay_ms.min(50);
                (azure, Some(emulator), e.time_scale)
            }
        };
        let mut azure_settings = azure_settings;
        // The budget refills per Azure second: as fast as the emulator's clock runs.
        azure_settings.pacing.time_scale = time_scale;
        if time_scale != 1.0 {
            let factor = 1.0 / time_scale;
            stages.azure_time_factor = factor;
            runtime.tiers = settings.delay_tiers();
            runtime.retry.base_delay = runtime.retry.base_delay.mul_f64(factor).max(Duration::from_millis(1));
            runtime.retry.max_delay = runtime.retry.max_delay.mul_f64(factor).max(Duration::from_millis(2));
        }
        let azure = AzureClient::new(&azure_settings).map_err(|e| super::input_error(anyhow::anyhow!(e)))?;
        Ok(Session {
            azure: Arc::new(azure),
            emulator,
            stages,
            runtime,
            time_scale,
            amqp: settings.amqp,
            telemetry: settings.telemetry,
        })
    }
}

/// The built-in emulator as `[emulator]` describes it (world, time scale, seed, faults), on a
/// free loopback port: what `sigrun run` and `sigrun dev` start.
pub async fn start_emulator(e: &crate::config::EmulatorSettings) -> anyhow::Result<Emulator> {
    let world = match &e.world {
        Some(path) => World::load(path).map_err(|err| super::input_error(anyhow::anyhow!(err)))?,
        None => World::default_world(),
    };
    Emulator::start(EmulatorOptions {
        world,
        time_scale: e.time_scale,
        seed: e.seed,
        faults: e.faults.clone(),
        ..Default::default()
    })
    .await
    .context("starting the built-in Azure emulator")
}

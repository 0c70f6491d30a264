//! Settings: the built-in defaults (`config/default.toml`), overlaid by an optional file and by
//! `SIGRUN__SECTION__KEY` environment variables, read with the `config` crate into typed sections.
//! Unknown keys and bad values are errors that name the source and the key. Secrets are
//! `Secret`s, which never print.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::azure::config::{AzureSettings, Secret};
use crate::bus::amqp::AmqpSettings;
use crate::runtime::RuntimeSettings;
use crate::runtime::settings::scaled_tiers;
use crate::stages::StageSettings;
use crate::telemetry::TelemetrySettings;

pub const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub azure: AzureSection,
    #[serde(default)]
    pub emulator: EmulatorSettings,
    #[serde(default)]
    pub stages: StageSettings,
    #[serde(default)]
    pub runtime: RuntimeSettings,
    /// The RabbitMQ bus of `worker` and `submit`.
    #[serde(default)]
    pub amqp: AmqpSettings,
    /// Where the metrics and health endpoints listen (`worker`, `run`).
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    /// Where workers find the specs of triggers that carry none.
    #[serde(default)]
    pub pipelines: PipelinesSettings,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelinesSettings {
    /// The directory of pipeline specs (`*.toml`), relative to the worker's working directory.
    pub dir: PathBuf,
}

impl Default for PipelinesSettings {
    fn default() -> Self {
        PipelinesSettings {
            dir: PathBuf::from("pipelines"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The built-in emulator, started in-process.
    Emulator,
    /// Azure itself, with `[azure.client]`.
    Azure,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureSection {
    pub mode: Mode,
    #[serde(default)]
    pub client: Option<AzureSettings>,
    /// How much faster than real time Azure runs: 1 for Azure; an external emulator's
    /// `--time-scale` when `[azure.client]` points at one. Stages and delay tiers scale by it.
    #[serde(default = "one")]
    pub time_scale: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmulatorSettings {
    pub time_scale: f64,
    pub seed: u64,
    pub faults: String,
    pub world: Option<PathBuf>,
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: Secret,
}

impl Default for EmulatorSettings {
    fn default() -> Self {
        EmulatorSettings {
            time_scale: 200.0,
            seed: 0,
            faults: String::new(),
            world: None,
            tenant_id: String::new(),
            client_id: String::new(),
            client_secret: Secret::new(""),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl Settings {
    /// Defaults, then `file` (if given), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut builder =
            config::Config::builder().add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError(format!("{}: no such file", path.display())));
            }
            let text = crate::input_file::read_bounded(path, crate::input_file::MAX_INPUT_FILE_BYTES)
                .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("SIGRUN")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        let origin = file
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "defaults and environment".into());
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        settings.check()?;
        Ok(settings)
    }

    /// Azure seconds per real second: the built-in emulator's `time_scale` in `emulator` mode,
    /// `azure.time_scale` otherwise.
    pub fn time_scale(&self) -> f64 {
        match self.azure.mode {
            Mode::Emulator => self.emulator.time_scale,
            Mode::Azure => self.azure.time_scale,
        }
    }

    /// The delay tiers a bus is built with: `runtime.tiers_ms` on Azure's clock, scaled to real
    /// time. Workers and `submit` of one environment must agree on them (the RabbitMQ bus names
    /// and declares a queue per tier).
    pub fn delay_tiers(&self) -> Vec<Duration> {
        let scale = self.time_scale();
        if scale == 1.0 {
            self.runtime.tiers.clone()
        } else {
            scaled_tiers(&self.runtime.tiers, 1.0 / scale)
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.azure.mode == Mode::Azure && self.azure.client.is_none() {
            return Err(ConfigError(
                "azure.mode = \"azure\" needs an [azure.client] section (credential, cloud)".into(),
            ));
        }
        // An emulated hour per millisecond at most: beyond that no clock arithmetic is sound.
        for (key, scale) in [
            ("azure.time_scale", self.azure.time_scale),
            ("emulator.time_scale", self.emulator.time_scale),
        ] {
            if !(0.001..=1_000_000.0).contains(&scale) {
                return Err(ConfigError(format!("{key}: {scale} is outside 0.001–1000000")));
            }
        }
        self.runtime.check().map_err(|e| ConfigError(format!("runtime: {e}")))?;
        self.amqp.check().map_err(ConfigError)?;
        self.stages.check().map_err(ConfigError)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_files_are_checked() {
        let settings = Settings::load(None).unwrap();
        assert_eq!(settings.azure.mode, Mode::Emulator);
        assert_eq!(settings.emulator.time_scale, 200.0);
        assert_eq!(settings.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(settings.amqp.prefix, "sigrun");
        assert_eq!(settings.delay_tiers()[0], Duration::from_millis(5));
        assert_eq!(settings.pipelines.dir, PathBuf::from("pipelines"));
        assert!(
            !format!("{settings:?}").contains("emulator-secret-pipeline"),
            "secrets never print"
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "[emulator]\ntime_scael = 3\n").unwrap();
        let err = Settings::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("time_scael"), "{err}");

        std::fs::write(&file, "[azure]\nmode = \"azure\"\n").unwrap();
        let err = Settings::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("azure.client"), "{err}");

        std::fs::write(
            &file,
            "[amqp]\nprefix = \"env-a\"\nurl = \"amqp://u:p@broker:5673/v\"\n",
        )
        .unwrap();
        let settings = Settings::load(Some(&file)).unwrap();
        assert_eq!(settings.amqp.prefix, "env-a");
        assert_eq!(settings.amqp.url, "amqp://u:p@broker:5673/v");
        assert!(
            !format!("{settings:?}").contains(":p@"),
            "the broker password never prints"
        );
        std::fs::write(&file, "[pipelines]\ndir = \"/etc/sigrun/pipelines\"\n").unwrap();
        let settings = Settings::load(Some(&file)).unwrap();
        assert_eq!(settings.pipelines.dir, PathBuf::from("/etc/sigrun/pipelines"));
        std::fs::write(&file, "[pipelines]\ndirectory = \"x\"\n").unwrap();
        let err = Settings::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("directory"), "{err}");
        std::fs::write(&file, "[amqp]\nprefx = \"x\"\n").unwrap();
        let err = Settings::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("prefx"), "{err}");

        let err = Settings::load(Some(&dir.path().join("missing.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");
    }
}

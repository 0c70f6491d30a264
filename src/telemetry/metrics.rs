//! [`Telemetry`]: the metrics a sigrun process exports, in a Prometheus registry it owns. The
//! runtime reports handled messages through [`Observer`]; the bus gauge is sampled when scraped.

use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::model::envelope::Stage;
use crate::runtime::{Handled, Observer};

/// The process's metrics. Share it behind an `Arc`.
pub struct Telemetry {
    registry: Registry,
    messages_handled: IntCounterVec,
    bus_connected: IntGauge,
}

impl Telemetry {
    /// A registry with `sigrun_build_info`, `sigrun_messages_handled_total` and
    /// `sigrun_bus_connected`.
    pub fn new() -> Telemetry {
        let registry = Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new("sigrun_build_info", "Always 1; the version of this sigrun build"),
            &["version"],
        )
        .expect("a valid metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let messages_handled = IntCounterVec::new(
            Opts::new(
                "sigrun_messages_handled_total",
                "Stage messages handled to the end (acked), by stage and outcome: advanced, waiting, done, \
                 failed (the stage failed the branch), retried, parked, cancelled (the run was cancelled)",
            ),
            &["stage", "outcome"],
        )
        .expect("a valid metric");
        let bus_connected = IntGauge::new(
            "sigrun_bus_connected",
            "1 while connected to the message bus (always 1 for the in-process bus of `sigrun run`)",
        )
        .expect("a valid metric");
        bus_connected.set(1);
        for metric in [
            Box::new(build_info) as Box<dyn prometheus::core::Collector>,
            Box::new(messages_handled.clone()),
            Box::new(bus_connected.clone()),
        ] {
            registry.register(metric).expect("metric names are unique");
        }
        Telemetry {
            registry,
            messages_handled,
            bus_connected,
        }
    }

    /// Where further metrics register.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn set_bus_connected(&self, connected: bool) {
        self.bus_connected.set(i64::from(connected));
    }

    /// Every metric in the Prometheus text format (`text/plain; version=0.0.4`).
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("the text encoder writes to memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new()
    }
}

impl Observer for Telemetry {
    fn handled(&self, stage: Stage, outcome: Handled) {
        self.messages_handled
            .with_label_values(&[stage.as_str(), outcome.as_str()])
            .inc();
    }
}

/// The content type of [`Telemetry::render`].
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_build_info_and_counts_outcomes_by_stage() {
        let telemetry = Telemetry::new();
        telemetry.handled(Stage::Snapshot, Handled::Advanced);
        telemetry.handled(Stage::Snapshot, Handled::Advanced);
        telemetry.handled(Stage::Verify, Handled::Parked);
        telemetry.set_bus_connected(false);
        let text = telemetry.render();
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!("sigrun_build_info{{version=\"{version}\"}} 1")),
            "{text}"
        );
        assert!(
            text.contains("sigrun_messages_handled_total{outcome=\"advanced\",stage=\"snapshot\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("sigrun_messages_handled_total{outcome=\"parked\",stage=\"verify\"} 1"),
            "{text}"
        );
        assert!(text.contains("sigrun_bus_connected 0"), "{text}");
        assert_eq!(CONTENT_TYPE, "text/plain; version=0.0.4");
        // A registry of its own: the global default registry is untouched.
        assert!(prometheus::gather().iter().all(|f| !f.name().starts_with("sigrun_")));
    }
}

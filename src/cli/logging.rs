//! Logging: `tracing` to stderr (stdout stays machine-readable), as human-readable lines or as
//! JSON lines (`--log-format json`). A JSON line is one flat object: the fields of every span it
//! was logged in (root first, inner spans overriding), then the event's own fields, then
//! `timestamp`, `level`, `target` and `span` (the span names, outermost first) — so the run's
//! `run_id`, `pipeline`, `stage` and `trace_id` are top-level keys of every line of a run, wherever
//! the line was logged from.
//!
//! The filter applies to dependencies too (`--log trace` includes hyper, reqwest, rustls, lapin,
//! azure_core): `tests/logs.rs` proves no secret reaches a line even then.

use std::fmt;
use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text for people: level, spans with their fields, target, message.
    Human,
    /// One JSON object per line, span fields flattened to the top level.
    Json,
}

/// Starts logging with `filter` (tracing's env-filter syntax) in `format`, to stderr. A filter
/// that does not parse is an error naming it (bad input: the caller exits 2), never silently
/// replaced.
pub fn init_logging(filter: &str, format: LogFormat) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| {
        format!(
            "--log / SIGRUN_LOG `{}`: {e} (e.g. `info`, `warn,sigrun=debug`)",
            crate::model::text::shorten(filter, 80)
        )
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.fmt_fields(JsonFields::new()).event_format(FlatJson).try_init(),
    };
    Ok(())
}

/// The JSON line format: see the module's documentation.
pub struct FlatJson;

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        let mut names = Vec::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                names.push(span.name());
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<JsonFields>>() else {
                    continue;
                };
                if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields) {
                    line.extend(fields);
                }
            }
        }
        event.record(&mut FieldsTo(&mut line));
        let metadata = event.metadata();
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        line.insert("timestamp".into(), Value::String(now));
        line.insert("level".into(), Value::String(metadata.level().to_string()));
        line.insert("target".into(), Value::String(metadata.target().to_string()));
        if !names.is_empty() {
            line.insert("span".into(), Value::String(names.join(":")));
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Records an event's fields into a JSON object.
struct FieldsTo<'a>(&'a mut Map<String, Value>);

impl Visit for FieldsTo<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::String(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::Bool(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), Value::String(format!("{value:?}")));
    }
}

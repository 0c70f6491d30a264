//! What `status`, `watch` and `dlq` share: connecting to the broker of the configured prefix
//! without creating it (a mistyped prefix is bad input, not a new environment), reading the events
//! stream up to now, finding a run by its id or a unique prefix of it, and printing times, runs and
//! results the same way everywhere.

use std::path::Path;

use anyhow::anyhow;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::format_description;
use uuid::Uuid;

use super::input_error;
use crate::bus::BusError;
use crate::bus::amqp::{AmqpBus, StreamOffset};
use crate::config::Settings;
use crate::events::{Event, RunResult};
use crate::model::text;

/// A bus on the configured prefix for the operator commands. Fails with exit 2 when the settings
/// are bad or the prefix has no topology on the broker (nothing ever ran there), 1 when the broker
/// cannot be reached.
pub async fn connect(config: Option<&Path>, command: &str) -> anyhow::Result<(AmqpBus, Settings)> {
    let settings = Settings::load(config).map_err(input_error)?;
    let url = settings.amqp.redacted_url();
    let prefix = settings.amqp.prefix.clone();
    let exists = AmqpBus::topology_exists(&settings.amqp)
        .await
        .map_err(|e| anyhow!("RabbitMQ at {url}: {e}"))?;
    if !exists {
        return Err(input_error(anyhow!(
            "`sigrun {command}`: no sigrun queues with prefix `{prefix}` at {url}: no worker or submit has used \
             this prefix (set [amqp] prefix or SIGRUN__AMQP__PREFIX to the workers' prefix)"
        )));
    }
    let bus = AmqpBus::connect(settings.amqp.clone(), settings.delay_tiers())
        .await
        .map_err(|e| anyhow!("RabbitMQ at {url}: {e}"))?;
    Ok((bus, settings))
}

/// Every event still in the stream, in order, up to the moment of the call. Events that do not
/// parse are counted and skipped (a warning says how many).
pub async fn read_all(bus: &AmqpBus) -> Result<Vec<Event>, BusError> {
    let mut reader = bus.read_events(StreamOffset::First).await?;
    let read = reader.read_to_end(bus).await;
    reader.close().await;
    let mut events = Vec::new();
    let mut malformed = 0;
    for item in read? {
        match item {
            Ok(streamed) => events.push(streamed.event),
            Err(error) => {
                malformed += 1;
                tracing::debug!(%error, "skipping an event that does not parse");
            }
        }
    }
    if malformed > 0 {
        eprintln!("warning: skipped {malformed} event(s) in the stream that do not parse");
    }
    Ok(events)
}

/// One run's history, in stream order.
pub struct RunHistory {
    pub run_id: Uuid,
    pub events: Vec<Event>,
}

impl RunHistory {
    pub fn first(&self) -> &Event {
        &self.events[0]
    }

    pub fn last(&self) -> &Event {
        &self.events[self.events.len() - 1]
    }
}

/// Groups events by run, in the order each run first appears.
pub fn group_by_run(events: Vec<Event>) -> Vec<RunHistory> {
    let mut runs: Vec<RunHistory> = Vec::new();
    let mut index: std::collections::HashMap<Uuid, usize> = std::collections::HashMap::new();
    for event in events {
        match index.get(&event.run_id) {
            Some(&i) => runs[i].events.push(event),
            None => {
                index.insert(event.run_id, runs.len());
                runs.push(RunHistory {
                    run_id: event.run_id,
                    events: vec![event],
                });
            }
        }
    }
    runs
}

/// The run `wanted` names: its full id or a prefix (of the hyphenated form, any case) that only one
/// run has. An unknown or ambiguous id is bad input.
pub fn find_run<'a>(runs: &'a [RunHistory], wanted: &str) -> anyhow::Result<&'a RunHistory> {
    let wanted = wanted.trim().to_ascii_lowercase();
    if wanted.is_empty() {
        return Err(input_error(anyhow!("an empty run id")));
    }
    if let Ok(id) = Uuid::parse_str(&wanted)
        && let Some(run) = runs.iter().find(|r| r.run_id == id)
    {
        return Ok(run);
    }
    let matching: Vec<&RunHistory> = runs
        .iter()
        .filter(|r| r.run_id.hyphenated().to_string().starts_with(&wanted))
        .collect();
    match matching.as_slice() {
        [run] => Ok(run),
        [] => Err(input_error(anyhow!(
            "no run `{wanted}` in the events stream ({} run(s) there; runs older than the stream's retention, \
             [amqp] event_max_age, are gone)",
            runs.len()
        ))),
        several => Err(input_error(anyhow!(
            "run id prefix `{wanted}` is ambiguous: {}",
            several
                .iter()
                .map(|r| r.run_id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Whether a run id matches a `--run` filter (full id or prefix).
pub fn run_matches(run_id: &Uuid, wanted: &str) -> bool {
    run_id
        .hyphenated()
        .to_string()
        .starts_with(&wanted.trim().to_ascii_lowercase())
}

/// `2026-11-27 02:00:01Z`.
pub fn time_seconds(at: OffsetDateTime) -> String {
    let utc = at.to_offset(time::UtcOffset::UTC);
    utc.format(format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z"))
        .unwrap_or_else(|_| utc.to_string())
}

/// `2026-11-27 02:00:01.123Z`.
pub fn time_millis(at: OffsetDateTime) -> String {
    let utc = at.to_offset(time::UtcOffset::UTC);
    utc.format(format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]Z"
    ))
    .unwrap_or_else(|_| utc.to_string())
}

pub fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.to_string())
}

/// `running`, `succeeded`, `partly succeeded`, `failed`, `cancelled`.
pub fn state(result: &RunResult) -> &'static str {
    result.label()
}

/// The state with its reasons, on one line.
pub fn result_line(result: &RunResult) -> String {
    match result {
        RunResult::PartlySucceeded { failed } => format!(
            "partly succeeded; failed: {}",
            failed
                .iter()
                .map(|(pool, reason)| format!("{}/{}: {reason}", pool.region, pool.target))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        RunResult::Failed { reason } => format!("failed: {reason}"),
        RunResult::SucceededWithWarnings { warnings } => format!("succeeded with warnings: {}", warnings.join("; ")),
        RunResult::Cancelled { created } if created.is_empty() => "cancelled; it had created nothing".to_string(),
        RunResult::Cancelled { created } => format!("cancelled; it had created: {}", created.join(", ")),
        other => state(other).to_string(),
    }
}

/// The result for `--json`: `state` (snake case), and `reason` or `failed` pools when there are.
pub fn result_json(result: &RunResult) -> Value {
    match result {
        RunResult::PartlySucceeded { failed } => json!({
            "state": "partly_succeeded",
            "failed": failed
                .iter()
                .map(|(pool, reason)| json!({"region": pool.region, "target": pool.target, "reason": reason}))
                .collect::<Vec<_>>(),
        }),
        RunResult::Failed { reason } => json!({"state": "failed", "reason": reason}),
        RunResult::SucceededWithWarnings { warnings } => json!({"state": "succeeded", "warnings": warnings}),
        RunResult::Cancelled { created } => json!({"state": "cancelled", "created": created}),
        other => json!({"state": state(other)}),
    }
}

/// Prints rows as columns two spaces apart; the last column is not padded.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    print!("{}", render_table(header, rows));
}

/// The table [`print_table`] prints. Cells come from messages and events other systems wrote:
/// each is cut to [`text::MAX_REASON_BYTES`] with its control characters made visible, so no cell
/// can move the cursor, recolour the terminal or break a row.
pub fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| text::bounded(cell)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for cells in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        let last = cells.len() - 1;
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventKind;
    use crate::model::envelope::{Branch, Stage};

    fn event(run: u128, kind: EventKind) -> Event {
        Event {
            run_id: Uuid::from_u128(run),
            pipeline: "nightly".into(),
            version: "1".into(),
            stage: Stage::Snapshot,
            branch: Branch::Trunk,
            at: OffsetDateTime::UNIX_EPOCH,
            kind,
        }
    }

    #[test]
    fn runs_group_in_order_of_first_appearance() {
        let events = vec![
            event(2, EventKind::Throttled { retry_after_ms: None }),
            event(1, EventKind::Throttled { retry_after_ms: None }),
            event(2, EventKind::Cancelled),
        ];
        let runs = group_by_run(events);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].run_id, Uuid::from_u128(2));
        assert_eq!(runs[0].events.len(), 2);
        assert_eq!(runs[0].last().kind, EventKind::Cancelled);
        assert_eq!(runs[1].run_id, Uuid::from_u128(1));
    }

    #[test]
    fn a_run_is_found_by_full_id_or_unique_prefix() {
        let a = Uuid::parse_str("3f2a0000-0000-4000-8000-000000000001").unwrap();
        let b = Uuid::parse_str("3f2b0000-0000-4000-8000-000000000002").unwrap();
        let runs = group_by_run(vec![
            event(a.as_u128(), EventKind::Throttled { retry_after_ms: None }),
            event(b.as_u128(), EventKind::Throttled { retry_after_ms: None }),
        ]);
        assert_eq!(find_run(&runs, &a.to_string()).unwrap().run_id, a);
        assert_eq!(find_run(&runs, "3F2B").unwrap().run_id, b);
        let ambiguous = find_run(&runs, "3f2").err().unwrap();
        assert!(super::super::exit_code(&ambiguous) == std::process::ExitCode::from(2));
        assert!(ambiguous.to_string().contains("ambiguous"), "{ambiguous}");
        let unknown = find_run(&runs, "ffff").err().unwrap();
        assert!(unknown.to_string().contains("no run `ffff`"), "{unknown}");
        assert!(unknown.to_string().contains("retention"), "{unknown}");
        assert!(run_matches(&a, "3f2a"));
        assert!(!run_matches(&a, "3f2b"));
    }

    #[test]
    fn table_cells_cannot_write_escape_sequences_or_break_rows() {
        let hostile = "parked\u{1b}[2J\u{1b}[31mred\r\nfake row\u{7}".to_string();
        let table = render_table(
            &["ID", "WHY"],
            &[vec!["m1".into(), hostile], vec!["m2".into(), "x".repeat(100_000)]],
        );
        assert!(
            !table.contains('\u{1b}') && !table.contains('\r') && !table.contains('\u{7}'),
            "{table:?}"
        );
        assert_eq!(table.lines().count(), 3, "a header and two rows: {table:?}");
        assert!(table.contains("\\u{1b}[2J"), "the escape shown, not obeyed: {table:?}");
        assert!(table.len() < 10_000, "a cell is bounded: {} bytes", table.len());
    }

    #[test]
    fn times_print_in_utc() {
        let at = time::macros::datetime!(2026-11-27 03:00:01.123456789 +01:00);
        assert_eq!(time_seconds(at), "2026-11-27 02:00:01Z");
        assert_eq!(time_millis(at), "2026-11-27 02:00:01.123Z");
    }
}

//! The web page's view of the run history: every run's events, folded as the events stream is
//! read, and a one-line summary per run (pipeline, version, state, start, duration, where it is)
//! kept up to date with each event, so the runs page never re-reads the stream. Pure: no IO.

use std::collections::HashMap;

use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::events::{Event, EventKind, run_result};

/// One run in a line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    pub run_id: Uuid,
    pub pipeline: String,
    pub version: String,
    /// `running`, `succeeded`, `failed`, ... (`RunResult::label`).
    pub state: &'static str,
    #[serde(with = "time::serde::rfc3339")]
    pub started: OffsetDateTime,
    /// Seconds from its first event to its latest.
    pub duration_secs: i64,
    /// The stage of its latest event.
    pub stage: String,
}

/// A run: its events in stream order, and its summary.
#[derive(Debug, Clone)]
pub struct RunEntry {
    pub events: Vec<Event>,
    pub summary: RunSummary,
}

/// Every run read so far, newest first on demand.
#[derive(Debug, Default)]
pub struct RunIndex {
    runs: HashMap<Uuid, RunEntry>,
}

/// Which runs a page lists.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub pipeline: Option<String>,
    pub state: Option<String>,
}

impl Filter {
    pub fn admits(&self, run: &RunSummary) -> bool {
        self.pipeline
            .as_ref()
            .is_none_or(|p| p.is_empty() || *p == run.pipeline)
            && self.state.as_ref().is_none_or(|s| s.is_empty() || *s == run.state)
    }
}

impl RunIndex {
    /// Folds in the next event of the stream; the run's summary after it.
    pub fn apply(&mut self, event: Event) -> RunSummary {
        let entry = self.runs.entry(event.run_id).or_insert_with(|| RunEntry {
            events: Vec::new(),
            summary: RunSummary {
                run_id: event.run_id,
                pipeline: event.pipeline.clone(),
                version: event.version.clone(),
                state: "running",
                started: event.at,
                duration_secs: 0,
                stage: event.stage.to_string(),
            },
        });
        let counts = !matches!(event.kind, EventKind::DuplicateDropped { .. });
        if counts {
            entry.summary.stage = event.stage.to_string();
            entry.summary.duration_secs = (event.at - entry.summary.started).whole_seconds().max(0);
        }
        // Only an event that can decide the result changes the run's state: a waiting run's looks
        // do not walk its whole history again.
        let decides = crate::events::decides_result(&event.kind);
        entry.events.push(event);
        if decides {
            entry.summary.state = run_result(&entry.events).label();
        }
        entry.summary.clone()
    }

    pub fn run(&self, run_id: &Uuid) -> Option<&RunEntry> {
        self.runs.get(run_id)
    }

    /// The runs `filter` admits, newest first, at most `limit`.
    pub fn recent(&self, filter: &Filter, limit: usize) -> Vec<RunSummary> {
        let mut runs: Vec<&RunSummary> = self
            .runs
            .values()
            .map(|r| &r.summary)
            .filter(|r| filter.admits(r))
            .collect();
        runs.sort_unstable_by(|a, b| b.started.cmp(&a.started).then(a.run_id.cmp(&b.run_id)));
        runs.into_iter().take(limit).cloned().collect()
    }

    /// The pipelines seen, sorted (the runs page's filter).
    pub fn pipelines(&self) -> Vec<String> {
        let mut names: Vec<String> = self.runs.values().map(|r| r.summary.pipeline.clone()).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Every run held, and whether it is still going (what retention asks of a run history).
    pub fn running(&self) -> HashMap<Uuid, bool> {
        self.runs
            .iter()
            .map(|(id, run)| (*id, run.summary.state == "running"))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.runs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::PoolRef;
    use crate::model::envelope::{Branch, Stage};

    fn event(run: u128, at: i64, stage: Stage, kind: EventKind) -> Event {
        Event {
            run_id: Uuid::from_u128(run),
            pipeline: if run.is_multiple_of(2) { "nightly" } else { "weekly" }.into(),
            version: "1.0.0".into(),
            stage,
            branch: Branch::Trunk,
            at: OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(at),
            kind,
        }
    }

    fn started(run: u128, at: i64) -> Event {
        event(
            run,
            at,
            Stage::Snapshot,
            EventKind::RunStarted {
                regions: Vec::new(),
                pools: vec![PoolRef {
                    region: "westeurope".into(),
                    target: "render".into(),
                }],
                rollout: false,
            },
        )
    }

    #[test]
    fn summaries_follow_each_event_and_list_newest_first_as_filtered() {
        let mut index = RunIndex::default();
        index.apply(started(2, 10));
        index.apply(started(3, 20));
        let failed = index.apply(event(
            2,
            70,
            Stage::ImageCreate,
            EventKind::RunFailed {
                reason: "image failed".into(),
            },
        ));
        assert_eq!(
            (failed.state, failed.duration_secs, failed.stage.as_str()),
            ("failed", 60, "image-create")
        );
        let all: Vec<u128> = index
            .recent(&Filter::default(), 10)
            .iter()
            .map(|r| r.run_id.as_u128())
            .collect();
        assert_eq!(all, [3, 2], "newest first");
        let nightly = Filter {
            pipeline: Some("nightly".into()),
            state: None,
        };
        assert_eq!(index.recent(&nightly, 10).len(), 1);
        let running = Filter {
            pipeline: None,
            state: Some("running".into()),
        };
        assert_eq!(index.recent(&running, 10)[0].run_id.as_u128(), 3);
        assert_eq!(index.pipelines(), ["nightly", "weekly"]);
        assert_eq!(index.recent(&Filter::default(), 1).len(), 1, "at most the limit");
    }
}

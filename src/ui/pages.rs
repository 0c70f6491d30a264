//! The pages as HTML, rendered on the server from the run index. Every text that comes from a
//! message, a spec or Azure goes through `escape`, so a pipeline named or described with markup
//! renders as text; the pages load only their own script and style (the server's
//! Content-Security-Policy forbids anything else).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use time::OffsetDateTime;

use super::index::{Filter, RunEntry, RunSummary};
use crate::events::{Event, EventKind, deleted, run_result};
use crate::model::envelope::{Branch, Stage};

/// `text` safe inside HTML text and double-quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · sigrun</title>\
         <link rel=\"stylesheet\" href=\"/style.css\"><script src=\"/app.js\" defer></script></head>\
         <body><nav><a href=\"/\">Runs</a></nav><main>{body}</main></body></html>\n",
        escape(title)
    )
}

fn time_text(at: OffsetDateTime) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
    at.format(&format).unwrap_or_default()
}

/// One row of the runs table (also what the live updates replace).
pub fn run_row(run: &RunSummary) -> String {
    format!(
        "<tr id=\"run-{id}\" data-state=\"{state}\"><td><a href=\"/runs/{id}\">{short}</a></td><td>{pipeline}</td>\
         <td>{version}</td><td class=\"state\">{state}</td><td>{started}</td><td>{duration} s</td><td>{stage}</td></tr>",
        id = run.run_id,
        short = &run.run_id.to_string()[..8],
        pipeline = escape(&run.pipeline),
        version = escape(&run.version),
        state = escape(run.state),
        started = time_text(run.started),
        duration = run.duration_secs,
        stage = escape(&run.stage),
    )
}

/// Recent runs, filterable by pipeline and state; the script keeps it live.
pub fn runs_page(runs: &[RunSummary], pipelines: &[String], filter: &Filter) -> String {
    let mut body = String::from("<h1>Runs</h1><form method=\"get\" class=\"filter\"><select name=\"pipeline\">");
    body.push_str("<option value=\"\">every pipeline</option>");
    for name in pipelines {
        let selected = if filter.pipeline.as_deref() == Some(name) {
            " selected"
        } else {
            ""
        };
        let _ = write!(body, "<option{selected}>{}</option>", escape(name));
    }
    body.push_str("</select><select name=\"state\"><option value=\"\">every state</option>");
    for state in [
        "running",
        "succeeded",
        "succeeded with warnings",
        "partly succeeded",
        "failed",
        "cancelled",
    ] {
        let selected = if filter.state.as_deref() == Some(state) {
            " selected"
        } else {
            ""
        };
        let _ = write!(body, "<option{selected}>{state}</option>");
    }
    body.push_str("</select><button>Filter</button></form>");
    let _ = write!(
        body,
        "<table id=\"runs\" data-pipeline=\"{}\" data-state=\"{}\"><thead><tr><th>Run</th><th>Pipeline</th>\
         <th>Version</th><th>State</th><th>Started</th><th>Duration</th><th>Stage</th></tr></thead><tbody>",
        escape(filter.pipeline.as_deref().unwrap_or_default()),
        escape(filter.state.as_deref().unwrap_or_default())
    );
    for run in runs {
        body.push_str(&run_row(run));
    }
    body.push_str("</tbody></table>");
    page("Runs", &body)
}

/// One run: its result, a timeline of its branches, what it created and deleted, its events;
/// a cancel form when the page may act and the run is still going.
pub fn run_page(run: &RunEntry, actions: bool) -> String {
    let s = &run.summary;
    let result = run_result(&run.events);
    let mut body = format!(
        "<h1>{} {}</h1><p class=\"result\" data-state=\"{}\">{}</p>",
        escape(&s.pipeline),
        escape(&s.version),
        escape(s.state),
        escape(&format!("{result:?}"))
    );
    let _ = write!(body, "<p>run {} · started {}</p>", s.run_id, time_text(s.started));
    if actions && s.state == "running" {
        let _ = write!(
            body,
            "<form id=\"cancel\" data-run=\"{}\"><input type=\"password\" name=\"token\" placeholder=\"token\" \
             autocomplete=\"off\"><button>Cancel this run</button><output></output></form>",
            s.run_id
        );
    }
    body.push_str(&timeline(&run.events));
    body.push_str(&resources(&run.events));
    body.push_str(&event_table(&run.events));
    page(&format!("{} {}", s.pipeline, s.version), &body)
}

/// Where each branch was when: a lane per branch, a bar per stage from its first event to its
/// last, retries and failures marked; drawn to scale as SVG.
fn timeline(events: &[Event]) -> String {
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return String::new();
    };
    let span = ((last.at - first.at).as_seconds_f64()).max(1.0);
    let x = |at: OffsetDateTime| 160.0 + 800.0 * ((at - first.at).as_seconds_f64() / span);
    let mut lanes: Vec<Branch> = Vec::new();
    let mut bars: BTreeMap<(usize, Stage), (OffsetDateTime, OffsetDateTime, bool)> = BTreeMap::new();
    for event in events {
        let lane = lanes.iter().position(|b| *b == event.branch).unwrap_or_else(|| {
            lanes.push(event.branch.clone());
            lanes.len() - 1
        });
        let failed = matches!(
            event.kind,
            EventKind::RunFailed { .. } | EventKind::PoolFailed { .. } | EventKind::Parked { .. }
        );
        let bar = bars.entry((lane, event.stage)).or_insert((event.at, event.at, false));
        bar.1 = event.at;
        bar.2 |= failed;
    }
    let height = 30 * lanes.len() + 10;
    let mut svg = format!(
        "<h2>Timeline</h2><svg class=\"timeline\" viewBox=\"0 0 980 {height}\" width=\"980\" height=\"{height}\">"
    );
    for (i, branch) in lanes.iter().enumerate() {
        let y = 10 + 30 * i;
        let _ = write!(
            svg,
            "<text x=\"4\" y=\"{}\" class=\"lane\">{}</text>",
            y + 15,
            escape(&branch.label())
        );
    }
    for ((lane, stage), (from, to, failed)) in &bars {
        let (x0, x1) = (x(*from), x(*to));
        let class = if *failed { "bar failed" } else { "bar" };
        let _ = write!(
            svg,
            "<rect class=\"{class}\" data-stage=\"{stage}\" data-lane=\"{}\" x=\"{x0:.1}\" y=\"{}\" width=\"{:.1}\" height=\"20\"><title>{stage}: {} – {}</title></rect>",
            escape(&lanes[*lane].label()),
            10 + 30 * lane,
            (x1 - x0).max(3.0),
            time_text(*from),
            time_text(*to)
        );
    }
    for event in events.iter().filter(|e| matches!(e.kind, EventKind::Retried { .. })) {
        let lane = lanes.iter().position(|b| *b == event.branch).unwrap_or(0);
        let _ = write!(
            svg,
            "<circle class=\"retry\" cx=\"{:.1}\" cy=\"{}\" r=\"3\"/>",
            x(event.at),
            10 + 30 * lane + 10
        );
    }
    svg.push_str("</svg>");
    svg
}

/// What the run created and deleted, each ARM resource linked to the Azure portal.
fn resources(events: &[Event]) -> String {
    let link = |id: &str| {
        if id.starts_with("/subscriptions/") {
            format!("<a href=\"https://portal.azure.com/#resource{0}\">{0}</a>", escape(id))
        } else {
            escape(id)
        }
    };
    let mut out = String::from("<h2>Resources</h2><ul class=\"created\">");
    for item in crate::events::created(events) {
        let _ = write!(out, "<li>{}</li>", link(&item));
    }
    out.push_str("</ul><ul class=\"deleted\">");
    for item in deleted(events) {
        let (kind, id) = item.split_once(' ').unwrap_or(("", &item));
        let _ = write!(out, "<li>deleted {} {}</li>", escape(kind), link(id));
    }
    out.push_str("</ul>");
    out
}

fn event_table(events: &[Event]) -> String {
    let mut out = String::from("<h2>Events</h2><table class=\"events\"><tbody>");
    for event in events {
        let detail = serde_json::to_string(&event.kind).unwrap_or_default();
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            time_text(event.at),
            event.stage,
            escape(&event.branch.label()),
            event.kind.name(),
            escape(&detail)
        );
    }
    out.push_str("</tbody></table>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_page_shows_markup_in_a_reason_as_text() {
        use crate::ui::index::RunIndex;
        use uuid::Uuid;
        let mut index = RunIndex::default();
        let event = |kind| Event {
            run_id: Uuid::from_u128(1),
            pipeline: "nightly".into(),
            version: "1.0.0".into(),
            stage: Stage::Snapshot,
            branch: Branch::Trunk,
            at: OffsetDateTime::UNIX_EPOCH,
            kind,
        };
        index.apply(event(EventKind::RunFailed {
            reason: "<script>alert(1)</script>".into(),
        }));
        let page = run_page(index.run(&Uuid::from_u128(1)).unwrap(), false);
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{page}");
        assert!(!page.contains("<script>alert"), "{page}");
    }

    #[test]
    fn markup_from_a_message_renders_as_text() {
        assert_eq!(
            escape("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }
}

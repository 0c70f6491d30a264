//! The pages as HTML, rendered on the server from the run index. Every text that comes from a
//! message, a spec or Azure goes through `escape`, so a pipeline named or described with markup
//! renders as text; the pages load only their own script and style (the server's
//! Content-Security-Policy forbids anything else).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use time::OffsetDateTime;

use super::index::{Filter, RunEntry, RunSummary};
use super::parking::ParkedView;
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

pub(super) fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · sigrun</title>\
         <link rel=\"stylesheet\" href=\"/style.css\"><script src=\"/app.js\" defer></script></head>\
         <body><nav><a href=\"/\">Runs</a> <a href=\"/fleet\">Fleet</a></nav><main>{body}</main></body></html>\n",
        escape(title)
    )
}

pub(super) fn time_text(at: OffsetDateTime) -> String {
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

/// The parked messages of run `run_id` among `all`.
pub fn of_run(all: &[ParkedView], run_id: uuid::Uuid) -> Vec<ParkedView> {
    all.iter().filter(|p| p.run_id == Some(run_id)).cloned().collect()
}

/// The run's parked messages with why; a replay button on each that can go back, when the page
/// may act.
fn parked_list(parked: Result<Vec<ParkedView>, &String>, actions: bool) -> String {
    let parked = match parked {
        Ok(parked) => parked,
        Err(error) => {
            return format!(
                "<h2>Parked</h2><p class=\"parked unreadable\">The parking queue could not be read: {}</p>",
                escape(error)
            );
        }
    };
    if parked.is_empty() {
        return "<h2>Parked</h2><p class=\"parked\">Nothing of this run is parked.</p>".into();
    }
    let mut out = String::from("<h2>Parked</h2><ul class=\"parked\">");
    for p in &parked {
        let dash = |t: &Option<String>| t.as_deref().map(escape).unwrap_or_else(|| "-".into());
        let _ = write!(
            out,
            "<li data-parked=\"{}\"><code>{}</code> {} {}: {}",
            escape(&p.id),
            escape(&p.id),
            dash(&p.stage),
            dash(&p.branch),
            escape(&p.error)
        );
        match (&p.not_replayable, actions) {
            (Some(why), _) => {
                let _ = write!(out, " <em>cannot go back: {}</em>", escape(why));
            }
            (None, true) => {
                let _ = write!(
                    out,
                    " <button class=\"replay\" data-id=\"{}\">Replay</button><output></output>",
                    escape(&p.id)
                );
            }
            (None, false) => {}
        }
        out.push_str("</li>");
    }
    out.push_str("</ul>");
    out
}

/// One run: its result, a timeline of its branches, what it created and deleted, its parked
/// messages, its events. When the page may act: a token field, a cancel button while the run is
/// going, a replay button on each parked message that can go back.
pub fn run_page(run: &RunEntry, parked: Option<Result<Vec<ParkedView>, &String>>, actions: bool) -> String {
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
    if actions {
        body.push_str(
            "<p class=\"actions\"><input type=\"password\" id=\"token\" placeholder=\"token\" autocomplete=\"off\"> \
             acts with this token</p>",
        );
    }
    if actions && s.state == "running" {
        let _ = write!(
            body,
            "<p><button id=\"cancel\" data-run=\"{}\">Cancel this run</button> <output></output></p>",
            s.run_id
        );
    }
    body.push_str(&timeline(&run.events));
    body.push_str(&resources(&run.events));
    if let Some(parked) = parked {
        body.push_str(&parked_list(parked, actions));
    }
    body.push_str(&event_table(&run.events));
    page(&format!("{} {}", s.pipeline, s.version), &body)
}

/// Where each branch was when: a lane per branch, a bar per stage from its first event to its
/// last (labelled, coloured by stage), waits and throttles ticked, retries dotted, failures red,
/// a time axis below; drawn to scale as SVG.
fn timeline(events: &[Event]) -> String {
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return String::new();
    };
    let scale = Scale {
        start: first.at,
        span: ((last.at - first.at).as_seconds_f64()).max(1.0),
    };
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
    let height = LANE * lanes.len() + 40;
    let mut svg = format!(
        "<h2>Timeline</h2><svg class=\"timeline\" viewBox=\"0 0 980 {height}\" width=\"980\" height=\"{height}\">"
    );
    for (i, branch) in lanes.iter().enumerate() {
        let _ = write!(
            svg,
            "<text x=\"4\" y=\"{}\" class=\"lane\">{}</text>",
            10 + LANE * i + 15,
            escape(&branch.label())
        );
    }
    for ((lane, stage), (from, to, failed)) in &bars {
        svg.push_str(&bar(
            &scale,
            &lanes[*lane].label(),
            *lane,
            *stage,
            (*from, *to),
            *failed,
        ));
    }
    for event in events {
        let lane = lanes.iter().position(|b| *b == event.branch).unwrap_or(0);
        svg.push_str(&mark(&scale, lane, event));
    }
    svg.push_str(&axis(&scale, height - 25));
    svg.push_str("</svg>");
    svg
}

/// Pixels per lane.
const LANE: usize = 30;

/// Seconds since the run's first event, as x.
struct Scale {
    start: OffsetDateTime,
    span: f64,
}

impl Scale {
    fn x(&self, at: OffsetDateTime) -> f64 {
        160.0 + 800.0 * ((at - self.start).as_seconds_f64() / self.span)
    }
}

fn bar(
    scale: &Scale,
    lane_label: &str,
    lane: usize,
    stage: Stage,
    (from, to): (OffsetDateTime, OffsetDateTime),
    failed: bool,
) -> String {
    let (x0, width) = (scale.x(from), (scale.x(to) - scale.x(from)).max(3.0));
    let class = if failed { "bar failed" } else { "bar" };
    let y = 10 + LANE * lane;
    let mut out = format!(
        "<rect class=\"{class} s-{stage}\" data-stage=\"{stage}\" data-lane=\"{}\" x=\"{x0:.1}\" y=\"{y}\" width=\"{width:.1}\" height=\"20\">\
         <title>{stage}: {} – {} ({:.0} s)</title></rect>",
        escape(lane_label),
        time_text(from),
        time_text(to),
        (to - from).as_seconds_f64()
    );
    // A label where it fits (about 7 px a character).
    if width >= 7.0 * stage.to_string().len() as f64 + 8.0 {
        let _ = write!(
            out,
            "<text class=\"bar-label\" x=\"{:.1}\" y=\"{}\">{stage}</text>",
            x0 + 4.0,
            y + 14
        );
    }
    out
}

/// A tick for a wait or a throttle, a dot for a retry, on the event's lane.
fn mark(scale: &Scale, lane: usize, event: &Event) -> String {
    let (x, y) = (scale.x(event.at), 10 + LANE * lane);
    match &event.kind {
        EventKind::Waiting { what } => format!(
            "<line class=\"wait\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{}\" y2=\"{}\"><title>waiting for {}</title></line>",
            y + 20,
            y + 25,
            escape(what)
        ),
        EventKind::Throttled { .. } => format!(
            "<line class=\"throttle\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{}\" y2=\"{}\"><title>throttled</title></line>",
            y - 3,
            y + 23
        ),
        EventKind::Retried { attempt, error } => format!(
            "<circle class=\"retry\" cx=\"{x:.1}\" cy=\"{}\" r=\"3\"><title>retry {attempt}: {}</title></circle>",
            y + 10,
            escape(error)
        ),
        _ => String::new(),
    }
}

/// Five ticks under the lanes: seconds since the run started.
fn axis(scale: &Scale, y: usize) -> String {
    let mut out = format!("<line class=\"axis\" x1=\"160\" x2=\"960\" y1=\"{y}\" y2=\"{y}\"/>");
    for step in 0..=4 {
        let seconds = scale.span * f64::from(step) / 4.0;
        let x = 160.0 + 200.0 * f64::from(step);
        let _ = write!(
            out,
            "<line class=\"axis\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{y}\" y2=\"{}\"/>\
             <text class=\"tick\" x=\"{x:.1}\" y=\"{}\">+{seconds:.0} s</text>",
            y + 5,
            y + 18
        );
    }
    out
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
        let page = run_page(index.run(&Uuid::from_u128(1)).unwrap(), None, false);
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

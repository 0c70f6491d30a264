//! The fleet page as HTML: per pipeline, a table of its versions (state, replicas per region, the
//! pools built from each, what retention decides), its accounts' quota headroom, and its retired
//! pools with when retention takes them. Every text from a spec or Azure goes through `escape`.

use std::fmt::Write as _;

use super::fleet::{PipelineFleet, VersionRow};
use super::pages::{escape, page, time_text};

/// Every pipeline's part; `note` says why there is none (no Azure settings, no pipelines).
pub fn fleet_page(fleet: &[PipelineFleet], note: Option<&str>) -> String {
    let mut body = String::from("<h1>Fleet</h1>");
    if let Some(note) = note {
        let _ = write!(body, "<p class=\"note\">{}</p>", escape(note));
    }
    for pipeline in fleet {
        body.push_str(&section(pipeline));
    }
    page("Fleet", &body)
}

fn section(p: &PipelineFleet) -> String {
    let mut out = format!(
        "<section class=\"pipeline\" data-pipeline=\"{0}\"><h2>{0}</h2><p class=\"description\">{1}</p>\
         <p class=\"definition\">definition {2}</p>",
        escape(&p.name),
        escape(&p.description),
        escape(&p.definition)
    );
    if let Some(why) = &p.unreadable {
        let _ = write!(
            out,
            "<p class=\"unreadable\">Azure could not be read: {}</p></section>",
            escape(why)
        );
        return out;
    }
    if let Some(at) = p.as_of {
        let _ = write!(out, "<p>as of {}</p>", time_text(at));
    }
    out.push_str(&versions(&p.versions));
    out.push_str(&quotas(p));
    out.push_str(&retired(p));
    out.push_str("</section>");
    out
}

fn versions(rows: &[VersionRow]) -> String {
    if rows.is_empty() {
        return "<p class=\"versions\">No version in the gallery yet.</p>".into();
    }
    let mut out = String::from(
        "<table class=\"versions\"><thead><tr><th>Version</th><th>State</th><th>Published</th>\
         <th>Replicas</th><th>Pools</th><th>Retention</th></tr></thead><tbody>",
    );
    for v in rows {
        let latest = if v.latest {
            " <span class=\"tag\">latest</span>"
        } else {
            ""
        };
        let regions: Vec<String> = v
            .regions
            .iter()
            .map(|(region, n)| {
                format!(
                    "<span class=\"region\" data-region=\"{0}\">{0} ×{n}</span>",
                    escape(region)
                )
            })
            .collect();
        let pools: Vec<String> = v
            .pools
            .iter()
            .map(|u| {
                let how = match (u.via_latest, u.retired) {
                    (_, true) => " (retired)",
                    (true, false) => " (via latest)",
                    (false, false) => "",
                };
                format!(
                    "<span class=\"pool\" data-pool=\"{0}\">{0} in {1}: {2} node(s){how}</span>",
                    escape(&u.pool),
                    escape(&u.account),
                    u.nodes
                )
            })
            .collect();
        let retention = match (&v.retention, v.ours) {
            (Some(verdict), _) if verdict.delete => {
                format!("<span class=\"delete\">deletes next: {}</span>", escape(&verdict.why))
            }
            (Some(verdict), _) => format!("keeps: {}", escape(&verdict.why)),
            (None, false) => "another pipeline's: never touched".into(),
            (None, true) => "retention is off".into(),
        };
        let _ = write!(
            out,
            "<tr data-version=\"{0}\"><td>{0}{latest}</td><td>{1}</td><td>{2}</td><td>{3}</td><td>{4}</td><td>{retention}</td></tr>",
            escape(&v.name),
            escape(v.state.as_str()),
            v.published.map(time_text).unwrap_or_default(),
            regions.join(" "),
            pools.join("<br>"),
        );
    }
    out.push_str("</tbody></table>");
    out
}

fn quotas(p: &PipelineFleet) -> String {
    let mut out = String::from(
        "<h3>Quota headroom</h3><table class=\"quotas\"><thead><tr><th>Account</th><th>Quota</th><th>Limit</th>\
         <th>In use</th><th>This pipeline adds</th><th>Left after</th></tr></thead><tbody>",
    );
    for q in &p.quotas {
        let short = if q.headroom_after() == 0 && q.in_use.saturating_add(q.adds) > u64::from(q.limit) {
            " class=\"short\""
        } else {
            ""
        };
        let _ = write!(
            out,
            "<tr{short}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&q.account),
            escape(&q.quota),
            q.limit,
            q.in_use,
            q.adds,
            q.headroom_after()
        );
    }
    out.push_str("</tbody></table>");
    out
}

fn retired(p: &PipelineFleet) -> String {
    if p.retired_pools.is_empty() {
        return "<h3>Retired pools</h3><p class=\"retired\">None.</p>".into();
    }
    let mut out = String::from("<h3>Retired pools</h3><ul class=\"retired\">");
    for v in &p.retired_pools {
        let doing = if v.delete { "deletes next" } else { "keeps for now" };
        let _ = write!(
            out,
            "<li>{} in {}: {doing}, {}</li>",
            escape(&v.name),
            escape(&v.account_url),
            escape(&v.why)
        );
    }
    out.push_str("</ul>");
    out
}

#!/usr/bin/env python3
"""Checks of sigrun's Grafana dashboards and Prometheus alert rules that promtool cannot do alone;
run by deploy/prometheus/check, which runs promtool on what this writes.

`checks.py rules` lints deploy/prometheus/rules/sigrun-alerts.yml: every alert has a severity
(warning or critical), a summary, a description and a runbook, reads only metrics of the metrics
contract, and is fired by at least one unit test in rules/tests/.

`checks.py dashboards OUTDIR` checks every dashboard in deploy/grafana/dashboards/: the layout
(unique panel ids, panels inside the 24-column grid and not overlapping), the data source (every
panel and query uses the `${DS_PROMETHEUS}` variable), that queries use only the documented variables
and contract metrics, and that each legend's `{{label}}` appears in its query. Grafana's variables are
then replaced by plain text (SUBSTITUTIONS, twice: "All" pipelines and one pipeline) and each query is
written into OUTDIR as
  - `<variant>-record.json`: a recording rule per query, for `promtool check rules` (PromQL syntax);
  - `<variant>-panels.json` + `<variant>-test.json`: an alert `absent(<query>)` per query and a
    `promtool test rules` file that evaluates them all over a day of synthetic series shaped like
    the contract's (a busy deployment with some of everything) and expects none to fire, i.e. every
    query returns data. A failure names the panel and query.
JSON is valid YAML, so promtool reads these files as they are. Needs PyYAML (Debian: python3-yaml)
for the rules only.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy/grafana/dashboards"
RULES = ROOT / "deploy/prometheus/rules"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

# How Grafana's variables are replaced for a plain Prometheus: the dashboard's defaults, with
# `$__rate_interval` and `$__range` at values that hold several scrapes and a day of runs.
# The "one" variant selects a single pipeline, so a panel filtering a metric that has no pipeline
# label comes back empty and fails.
SUBSTITUTIONS = {
    "all": {"pipeline": ".*", "prefix": "sigrun", "__rate_interval": "5m", "__range": "1d"},
    "one": {"pipeline": "nightly-ubuntu", "prefix": "sigrun", "__rate_interval": "5m", "__range": "1d"},
}

# The metrics contract (docs: README "Dashboard and alerts"): metric → its labels, plus the RabbitMQ
# per-object metrics and Prometheus's `up`. Histograms expand to _bucket/_sum/_count below.
CONTRACT = {
    "sigrun_build_info": {"version"},
    "sigrun_messages_handled_total": {"stage", "outcome"},
    "sigrun_handler_duration_seconds": {"stage"},
    "sigrun_stage_duration_seconds": {"pipeline", "stage"},
    "sigrun_stage_failures_total": {"pipeline", "stage", "reason"},
    "sigrun_runs_started_total": {"pipeline"},
    "sigrun_runs_finished_total": {"pipeline", "result"},
    "sigrun_runs_in_flight": {"stage"},
    "sigrun_azure_requests_total": {"api", "operation", "status_class"},
    "sigrun_azure_request_duration_seconds": {"api", "operation"},
    "sigrun_azure_throttled_total": {"api", "operation"},
    "sigrun_azure_retry_after_seconds_total": {"api"},
    "sigrun_azure_operation_duration_seconds": {"operation"},
    "sigrun_replication_progress_ratio": {"pipeline", "region"},
    "sigrun_pool_nodes": {"pipeline", "pool", "state"},
    "sigrun_last_successful_publish_timestamp_seconds": {"pipeline"},
    "sigrun_resources_deleted_total": {"pipeline", "kind"},
    "sigrun_batch_quota_headroom": {"account", "quota"},
    "sigrun_pipeline_quota_need": {"pipeline", "account", "quota"},
    "sigrun_bus_connected": set(),
    "rabbitmq_queue_messages_ready": {"vhost", "queue"},
    "rabbitmq_queue_messages_unacked": {"vhost", "queue"},
    "rabbitmq_queue_messages": {"vhost", "queue"},
    "rabbitmq_queue_consumers": {"vhost", "queue"},
}
HISTOGRAMS = {
    "sigrun_handler_duration_seconds",
    "sigrun_stage_duration_seconds",
    "sigrun_azure_request_duration_seconds",
    "sigrun_azure_operation_duration_seconds",
}
METRIC_NAMES = {m for m in CONTRACT if m not in HISTOGRAMS} | {
    f"{m}{suffix}" for m in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}
METRIC_TOKEN = re.compile(r"\b(?:sigrun|rabbitmq)_[a-zA-Z0-9_]+")
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
GRID_COLUMNS = 24


class Problems:
    """Collects every problem found, so one run reports them all."""

    def __init__(self):
        self.items = []

    def add(self, where, what):
        item = f"{where}: {what}"
        if item not in self.items:
            self.items.append(item)

    def exit_if_any(self, checked):
        if self.items:
            for item in self.items:
                print(f"  FAILED {item}", file=sys.stderr)
            sys.exit(1)
        print(f"  SUCCESS: {checked}")


def unknown_metrics(expr):
    return sorted(set(METRIC_TOKEN.findall(expr)) - METRIC_NAMES)


# Every worker exports the same value, so summing over workers multiplies it: derived from the
# shared events stream, or read by each worker's quota watch from the same Batch accounts.
# Aggregate them with max by (...) first.
GLOBAL_METRICS = {
    "sigrun_runs_started_total",
    "sigrun_runs_finished_total",
    "sigrun_runs_in_flight",
    "sigrun_last_successful_publish_timestamp_seconds",
    "sigrun_resources_deleted_total",
    "sigrun_batch_quota_headroom",
    "sigrun_pipeline_quota_need",
}


def summed_global_metrics(expr):
    """Global metrics the expression uses without a max aggregation around them."""
    if "max" in expr:
        return []
    return sorted(set(METRIC_TOKEN.findall(expr)) & GLOBAL_METRICS)


def substitute(expr, values):
    def replace(match):
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(name)
        return values[name]

    return VARIABLE.sub(replace, expr)


# ---------------------------------------------------------------------------------------- rules


def check_rules():
    import yaml  # only here: the dashboard checks need nothing outside the standard library

    problems = Problems()
    alerts_file = RULES / "sigrun-alerts.yml"
    alerts = {}
    for group in yaml.safe_load(alerts_file.read_text())["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert")
            where = f"{alerts_file.relative_to(ROOT)} {name or rule.get('record')}"
            if not name:
                problems.add(where, "recording rules belong in their own file, not with the alerts")
                continue
            if name in alerts:
                problems.add(where, "alert name used twice")
            alerts[name] = rule
            severity = rule.get("labels", {}).get("severity")
            if severity not in ("warning", "critical"):
                problems.add(where, f"severity label is {severity!r}, want warning or critical")
            for key in ("summary", "description", "runbook"):
                if not str(rule.get("annotations", {}).get(key, "")).strip():
                    problems.add(where, f"annotation {key} is missing")
            for metric in unknown_metrics(rule["expr"]):
                problems.add(where, f"metric {metric} is not in the metrics contract")
            for metric in summed_global_metrics(rule["expr"]):
                problems.add(where, f"{metric} is the same in every worker: aggregate it with max by (...)")

    fired, quiet = set(), set()
    for test_file in sorted((RULES / "tests").glob("*.yml")):
        for group in yaml.safe_load(test_file.read_text()).get("tests", []):
            for case in group.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    for name in sorted(set(alerts) - fired):
        problems.add(f"{alerts_file.relative_to(ROOT)} {name}", "no unit test in rules/tests/ fires it")
    for name in sorted((fired | quiet) - set(alerts)):
        problems.add("rules/tests", f"tests an alert {name} that sigrun-alerts.yml does not define")
    problems.exit_if_any(f"{len(alerts)} alerts, each with severity, summary, description, runbook and a "
                         f"test that fires it ({len(quiet & set(alerts))} also tested quiet)")


# ----------------------------------------------------------------------------------- dashboards


def panels_of(dashboard):
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def check_layout(name, dashboard, problems):
    if dashboard.get("id") is not None:
        problems.add(name, "id must be null for provisioning")
    for key in ("uid", "title", "schemaVersion"):
        if not dashboard.get(key):
            problems.add(name, f"{key} is missing")
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    ds = variables.get("DS_PROMETHEUS")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.add(name, "needs a data source variable DS_PROMETHEUS of type prometheus")
    for var in variables.values():
        if var.get("type") == "query" and var.get("datasource") != DATASOURCE:
            problems.add(name, f"variable {var['name']} must query {DATASOURCE}")

    ids, boxes = set(), []
    for panel in panels_of(dashboard):
        where = f"{name} panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("id") in ids:
            problems.add(where, "panel id used twice")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")):
            problems.add(where, "gridPos needs integer x, y, w, h")
            continue
        if grid["x"] < 0 or grid["w"] <= 0 or grid["h"] <= 0 or grid["x"] + grid["w"] > GRID_COLUMNS:
            problems.add(where, f"gridPos {grid} is outside the {GRID_COLUMNS}-column grid")
        for other_where, other in boxes:
            if (grid["x"] < other["x"] + other["w"] and other["x"] < grid["x"] + grid["w"]
                    and grid["y"] < other["y"] + other["h"] and other["y"] < grid["y"] + grid["h"]):
                problems.add(where, f"overlaps {other_where}")
        boxes.append((where, grid))
        if panel.get("type") == "row":
            continue
        if panel.get("datasource") != DATASOURCE:
            problems.add(where, f"datasource must be {DATASOURCE}")
        if not panel.get("targets"):
            problems.add(where, "has no query")
        refs = [t.get("refId") for t in panel.get("targets", [])]
        if len(set(refs)) != len(refs) or None in refs:
            problems.add(where, f"query refIds must be present and unique, got {refs}")
    return variables


def queries_of(name, dashboard, variables, problems):
    """(where, alert-safe name, expression) of every panel query and query variable."""
    queries = []
    for panel in panels_of(dashboard):
        for target in panel.get("targets", []):
            where = f"{name} panel {panel['id']} {panel.get('title')!r} query {target.get('refId')}"
            expr = target.get("expr", "")
            if not expr.strip():
                problems.add(where, "empty expression")
                continue
            if target.get("datasource") != DATASOURCE:
                problems.add(where, f"datasource must be {DATASOURCE}")
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                if not re.search(rf"\b{label}\b", expr):
                    problems.add(where, f"legend uses {{{{{label}}}}}, which the query does not mention")
            queries.append((where, f"panel_{panel['id']}_{target['refId']}", expr))
    for var in variables.values():
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", query)
        where = f"{name} variable {var['name']}"
        if not match:
            problems.add(where, f"expected label_values(SELECTOR, LABEL), got {query!r}")
            continue
        queries.append((where, f"variable_{var['name']}", match.group(1)))
    for where, _, expr in queries:
        for metric in unknown_metrics(expr):
            problems.add(where, f"metric {metric} is not in the metrics contract")
        for metric in summed_global_metrics(expr):
            problems.add(where, f"{metric} is the same in every worker: aggregate it with max by (...)")
    return queries


# A busy deployment over a day, one series per line: every metric of the contract with the labels it
# has, counters rising, so every panel has something to show. Times are minutes from 0; 1m scrapes.
FIXTURE_MINUTES = 25 * 60
STAGES = ["snapshot", "image-create", "gallery-publish", "replicate", "pool-create", "verify"]
# Batch account sigrunweu's quotas: (quota, what it leaves, what each pipeline's pools take of it).
QUOTAS = (("poolQuota", 12, 2), ("dedicatedCoreQuota", 6000, 8000), ("lowPriorityCoreQuota", -4, 0),
          ("dedicatedCoreQuotaPerVMFamily standardDSv5Family", 1800, 8000))
WORKER = 'job="sigrun-worker", instance="worker-0:9464"'
BROKER = 'job="rabbitmq", instance="rabbitmq:15692", vhost="/"'


def fixture_series():
    n = FIXTURE_MINUTES
    series = []

    def add(metric, labels, values):
        series.append({"series": f"{metric}{{{labels}}}", "values": values})

    def histogram(metric, labels):
        for le, per_minute in (("1", 1), ("60", 2), ("3600", 3), ("+Inf", 3)):
            add(f"{metric}_bucket", f'{labels}, le="{le}"', f"0+{per_minute}x{n}")
        add(f"{metric}_count", labels, f"0+3x{n}")
        add(f"{metric}_sum", labels, f"0+100x{n}")

    add("sigrun_build_info", f'{WORKER}, version="0.1.0"', f"1x{n}")
    add("sigrun_bus_connected", WORKER, f"1x{n}")
    add("up", WORKER, f"1x{n}")
    add("up", 'job="rabbitmq", instance="rabbitmq:15692"', f"1x{n}")
    for stage in STAGES:
        add("sigrun_runs_in_flight", f'{WORKER}, stage="{stage}"', f"1x{n}")
        add("sigrun_messages_handled_total", f'{WORKER}, stage="{stage}", outcome="advanced"', f"0+1x{n}")
        add("sigrun_messages_handled_total", f'{WORKER}, stage="{stage}", outcome="waiting"', f"0+5x{n}")
        histogram("sigrun_handler_duration_seconds", f'{WORKER}, stage="{stage}"')
        add("rabbitmq_queue_messages_ready", f'{BROKER}, queue="sigrun.stage.{stage}"', f"2x{n}")
        add("rabbitmq_queue_messages_unacked", f'{BROKER}, queue="sigrun.stage.{stage}"', f"1x{n}")
        add("rabbitmq_queue_messages", f'{BROKER}, queue="sigrun.stage.{stage}"', f"3x{n}")
        add("rabbitmq_queue_consumers", f'{BROKER}, queue="sigrun.stage.{stage}"', f"1x{n}")
    for queue, messages in (("sigrun.triggers", 1), ("sigrun.parked", 2), ("sigrun.delay.5000ms", 4),
                            ("sigrun.delay.60000ms", 7)):
        add("rabbitmq_queue_messages_ready", f'{BROKER}, queue="{queue}"', f"{messages}x{n}")
        add("rabbitmq_queue_messages_unacked", f'{BROKER}, queue="{queue}"', f"0x{n}")
        add("rabbitmq_queue_messages", f'{BROKER}, queue="{queue}"', f"{messages}x{n}")
        add("rabbitmq_queue_consumers", f'{BROKER}, queue="{queue}"', f"0x{n}")
    for pipeline in ("nightly-ubuntu", "windows-nightly"):
        p = f'{WORKER}, pipeline="{pipeline}"'
        add("sigrun_runs_started_total", p, f"0+1x{n}")
        add("sigrun_runs_finished_total", f'{p}, result="succeeded"', f"0+1x{n}")
        add("sigrun_runs_finished_total", f'{p}, result="failed"', f"0+0.1x{n}")
        add("sigrun_last_successful_publish_timestamp_seconds", p, f"3600x{n}")
        for stage in STAGES:
            histogram("sigrun_stage_duration_seconds", f'{p}, stage="{stage}"')
        add("sigrun_stage_failures_total", f'{p}, stage="replicate", reason="region_failed"', f"0+1x{n}")
        add("sigrun_stage_failures_total", f'{p}, stage="verify", reason="start_task"', f"0+0.5x{n}")
        for region, ratio in (("westeurope", "1"), ("eastus", "0.4")):
            add("sigrun_replication_progress_ratio", f'{p}, region="{region}"', f"{ratio}x{n}")
        for state, nodes in (("idle", 1900), ("running", 80), ("starttaskfailed", 15), ("unusable", 5)):
            add("sigrun_pool_nodes", f'{p}, pool="render-{pipeline}", state="{state}"', f"{nodes}x{n}")
        for kind, per_minute in (("snapshot", 0.01), ("image", 0.01), ("image_version", 0.005),
                                 ("pool", 0.005)):
            add("sigrun_resources_deleted_total", f'{p}, kind="{kind}"', f"0+{per_minute}x{n}")
        for quota, _, need in QUOTAS:
            add("sigrun_pipeline_quota_need", f'{p}, account="sigrunweu", quota="{quota}"', f"{need}x{n}")
    for quota, headroom, _ in QUOTAS:
        add("sigrun_batch_quota_headroom", f'{WORKER}, account="sigrunweu", quota="{quota}"', f"{headroom}x{n}")
    for api, operation in (("arm", "create_snapshot"), ("arm", "get_image_version"), ("batch", "get_pool"),
                           ("aad", "get_token")):
        labels = f'{WORKER}, api="{api}", operation="{operation}"'
        for status_class, per_minute in (("2xx", 10), ("4xx", 2), ("5xx", 1), ("error", 1)):
            add("sigrun_azure_requests_total", f'{labels}, status_class="{status_class}"', f"0+{per_minute}x{n}")
        add("sigrun_azure_throttled_total", labels, f"0+1x{n}")
        histogram("sigrun_azure_request_duration_seconds", labels)
    for api in ("arm", "batch", "aad"):
        add("sigrun_azure_retry_after_seconds_total", f'{WORKER}, api="{api}"', f"0+5x{n}")
    for operation in ("snapshot", "image", "image_version", "replication", "pool_allocation"):
        histogram("sigrun_azure_operation_duration_seconds", f'{WORKER}, operation="{operation}"')
    for s in series:
        metric = s["series"].split("{")[0]
        assert metric in METRIC_NAMES or metric == "up", f"fixture uses {metric}, not in the contract"
    return series


def write_variant(outdir, variant, values, queries, problems):
    records, alerts = [], []
    for where, name, expr in queries:
        try:
            plain = substitute(expr, values)
        except KeyError as unknown:
            problems.add(where, f"uses variable ${unknown.args[0]}, which has no documented substitution")
            continue
        records.append({"record": f"dashboard:{name}", "expr": plain})
        alerts.append({"alert": f"NoData_{name}", "expr": f"absent({plain})",
                       "annotations": {"query": where, "expr": plain}})
    (outdir / f"{variant}-record.json").write_text(
        json.dumps({"groups": [{"name": f"dashboard-{variant}", "rules": records}]}, indent=1))
    (outdir / f"{variant}-panels.json").write_text(
        json.dumps({"groups": [{"name": f"dashboard-{variant}-data", "interval": "1h", "rules": alerts}]},
                   indent=1))
    eval_time = f"{FIXTURE_MINUTES}m"
    test = {
        "rule_files": [f"{variant}-panels.json"],
        "evaluation_interval": "1h",
        "tests": [{
            "interval": "1m",
            "input_series": fixture_series(),
            "alert_rule_test": [{"eval_time": eval_time, "alertname": a["alert"], "exp_alerts": []}
                                for a in alerts],
        }],
    }
    (outdir / f"{variant}-test.json").write_text(json.dumps(test, indent=1))
    return len(records)


def check_dashboards(outdir):
    outdir.mkdir(parents=True, exist_ok=True)
    problems = Problems()
    all_queries, panel_count = [], 0
    files = sorted(DASHBOARDS.glob("*.json"))
    if not files:
        problems.add(str(DASHBOARDS.relative_to(ROOT)), "no dashboard found")
    for path in files:
        name = str(path.relative_to(ROOT))
        try:
            dashboard = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            problems.add(name, f"not valid JSON: {error}")
            continue
        variables = check_layout(name, dashboard, problems)
        panel_count += sum(1 for p in panels_of(dashboard) if p.get("type") != "row")
        all_queries += queries_of(name, dashboard, variables, problems)
    for variant, values in SUBSTITUTIONS.items():
        write_variant(outdir, variant, values, all_queries, problems)
    problems.exit_if_any(f"{len(files)} dashboard(s), {panel_count} panels, {len(all_queries)} queries; "
                         f"promtool files written to {outdir}")


def main(argv):
    if argv[1:2] == ["rules"]:
        check_rules()
    elif argv[1:2] == ["dashboards"] and len(argv) == 3:
        check_dashboards(Path(argv[2]))
    else:
        sys.exit("usage: checks.py rules | checks.py dashboards OUTDIR")


if __name__ == "__main__":
    main(sys.argv)

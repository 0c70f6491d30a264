#!/usr/bin/env python3
"""Checks what the compose-spec schema cannot about deploy/compose.yaml and the files it mounts:

- every bind-mounted file exists; `depends_on` and `network_mode: service:X` name real services;
- every stage consumed by exactly one worker service (`sigrun worker --all-stages` or
  `--stage S …`, with `--config F --metrics-listen 0.0.0.0:P`), distinct ports, each published and
  scraped by the Prometheus job `sigrun-worker`;
- Prometheus scrapes RabbitMQ's plugin on 15692 at /metrics and /metrics/per-object, and RabbitMQ
  enables rabbitmq_management and rabbitmq_prometheus; every `rule_files` pattern finds files through
  the Prometheus service's mounts;
- the workers' settings point at the emulator as it is started (127.0.0.1 and its --listen port, its
  --time-scale, its CA in the volume they mount) and `stop_grace_period` exceeds the drain bound;
- Grafana's data source is the stack's Prometheus and its dashboard provider reads the mounted folder.

Usage: check_compose.py deploy/compose.yaml [--self-test]. With --self-test it also breaks the stack in
one way per case and asserts each is reported (printing `N passed, M failed`).
"""

import copy
import re
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from workers import STAGES, consumed_stages



def seconds(text):
    match = re.fullmatch(r"(\d+)(ms|s|m)", str(text))
    if not match:
        return None
    value, unit = int(match[1]), match[2]
    return value / 1000 if unit == "ms" else value * (60 if unit == "m" else 1)


def flag(command, name):
    return command[command.index(name) + 1] if name in command and command.index(name) + 1 < len(command) else None


def mounts(service):
    """(source, target) of the service's volumes, short syntax."""
    out = []
    for volume in service.get("volumes") or []:
        parts = volume.split(":")
        out.append((parts[0], parts[1]))
    return out


def host_file(base, service, target):
    """The file on the host bind-mounted at (or above) `target` in the container, if any."""
    for source, mounted in mounts(service):
        if source.startswith(".") and (target == mounted or target.startswith(mounted.rstrip("/") + "/")):
            return base / source / Path(target).relative_to(mounted) if target != mounted else base / source
    return None


def check(compose, base, files):
    """Problems found in the parsed compose file; `files` maps host paths to overridden contents."""
    problems = []

    def read(path):
        # A missing file is already reported as a missing bind mount; read it as empty.
        return files[path] if path in files else (path.read_text() if path.is_file() else "")

    services = compose["services"]
    for name, service in services.items():
        for source, _ in mounts(service):
            if source.startswith(".") and not (base / source).exists():
                problems.append(f"{name}: bind mount {source} does not exist")
        for dependency in service.get("depends_on") or []:
            if dependency not in services:
                problems.append(f"{name}: depends_on unknown service {dependency}")
        network = service.get("network_mode", "")
        if network.startswith("service:") and network[len("service:"):] not in services:
            problems.append(f"{name}: network_mode names unknown service {network}")

    emulator = services.get("emulator") or {}
    emulator_command = emulator.get("command") or []
    listen = flag(emulator_command, "--listen") or ""
    scale = flag(emulator_command, "--time-scale")
    state_dir = flag(emulator_command, "--state-dir")

    prometheus_file = host_file(base, services.get("prometheus", {}), "/etc/prometheus/prometheus.yml")
    prometheus = (yaml.safe_load(read(prometheus_file)) if prometheus_file else None) or {}
    jobs = {job["job_name"]: job for job in prometheus.get("scrape_configs") or []}
    worker_targets = {t for c in jobs.get("sigrun-worker", {}).get("static_configs", []) for t in c["targets"]}

    published = set()
    for port in emulator.get("ports") or []:
        match = re.fullmatch(r"(?:[\d.]+:)?(\d+)(?:-(\d+))?:(\d+)(?:-(\d+))?", str(port))
        if match:
            low, high = int(match[3]), int(match[4] or match[3])
            published.update(range(low, high + 1))

    stages_seen, ports_seen = {}, set()
    for name, service in services.items():
        command = service.get("command") or []
        if command[:1] != ["worker"]:
            continue
        for stage in consumed_stages(command):
            stages_seen.setdefault(stage, []).append(name)
        if service.get("network_mode") != "service:emulator":
            problems.append(f"{name}: must share the emulator's network namespace (network_mode: service:emulator)")
        listen_metrics = flag(command, "--metrics-listen") or ""
        port = int(listen_metrics.rsplit(":", 1)[-1]) if listen_metrics.rsplit(":", 1)[-1].isdigit() else None
        if not listen_metrics.startswith("0.0.0.0:") or port is None:
            problems.append(f"{name}: --metrics-listen must be 0.0.0.0:PORT, got {listen_metrics!r}")
            continue
        if port in ports_seen:
            problems.append(f"{name}: metrics port {port} is taken by another worker in the shared namespace")
        ports_seen.add(port)
        if f"emulator:{port}" not in worker_targets:
            problems.append(f"{name}: Prometheus job sigrun-worker does not scrape emulator:{port}")
        if port not in published:
            problems.append(f"{name}: metrics port {port} is not published by the emulator service")
        settings_file = host_file(base, service, flag(command, "--config") or "")
        if settings_file is None:
            problems.append(f"{name}: its --config file is not bind-mounted")
            continue
        settings = tomllib.loads(read(settings_file))
        azure = settings.get("azure") or {}
        client = azure.get("client") or {}
        if azure.get("mode") != "azure":
            problems.append(f"{name}: azure.mode must be azure")
        if scale is None or float(azure.get("time_scale", 1.0)) != float(scale):
            problems.append(f"{name}: azure.time_scale {azure.get('time_scale')} differs from the emulator's --time-scale {scale}")
        for key in ("authority_host", "resource_manager"):
            url = urlsplit((client.get("cloud") or {}).get(key, ""))
            if f"{url.hostname}:{url.port}" != listen or url.scheme != "https":
                problems.append(f"{name}: azure.client.cloud.{key} must be https://{listen}")
        ca = client.get("extra_ca_cert", "")
        volume_targets = [t for s, t in mounts(service) if not s.startswith(".") and s in [
            s2 for s2, t2 in mounts(emulator) if t2 == state_dir]]
        if ca != f"{state_dir}/emulator-ca.pem" or state_dir not in volume_targets:
            problems.append(f"{name}: extra_ca_cert must be the emulator's CA in its mounted state volume ({state_dir}/emulator-ca.pem)")
        grace = (settings.get("runtime") or {}).get("shutdown_grace_ms", 30000) / 1000
        stop = seconds(service.get("stop_grace_period", "10s"))
        if stop is None or stop <= grace:
            problems.append(f"{name}: stop_grace_period {service.get('stop_grace_period')} must exceed runtime.shutdown_grace_ms")
    for stage in STAGES:
        if len(stages_seen.get(stage, [])) != 1:
            problems.append(f"stage {stage}: expected one worker service, found {stages_seen.get(stage, [])}")

    for job, path in (("rabbitmq", "/metrics/per-object"), ("rabbitmq-aggregated", "/metrics")):
        config = jobs.get(job, {})
        targets = {t for c in config.get("static_configs", []) for t in c["targets"]}
        if config.get("metrics_path", "/metrics") != path or "rabbitmq:15692" not in targets:
            problems.append(f"Prometheus job {job} must scrape rabbitmq:15692{path}")
    for pattern in prometheus.get("rule_files") or []:
        directory = host_file(base, services.get("prometheus", {}), str(Path(pattern).parent))
        if directory is None or not sorted(directory.glob(Path(pattern).name)):
            problems.append(f"Prometheus rule_files {pattern} matches no file through the prometheus service's mounts")
    plugins_file = host_file(base, services.get("rabbitmq", {}), "/etc/rabbitmq/enabled_plugins")
    plugins = read(plugins_file) if plugins_file else ""
    for plugin in ("rabbitmq_management", "rabbitmq_prometheus"):
        if plugin not in plugins:
            problems.append(f"rabbitmq: {plugin} is not enabled")

    grafana = services.get("grafana") or {}
    datasources = host_file(base, grafana, "/etc/grafana/provisioning/datasources")
    urls = []
    if datasources and datasources.is_dir():
        for file in sorted(datasources.glob("*.yaml")):
            urls += [d.get("url") for d in yaml.safe_load(read(file)).get("datasources", []) if d.get("type") == "prometheus"]
    if "http://prometheus:9090" not in urls:
        problems.append(f"grafana: no Prometheus data source at http://prometheus:9090 (found {urls})")
    providers_dir = host_file(base, grafana, "/etc/grafana/provisioning/dashboards")
    paths = []
    if providers_dir and providers_dir.is_dir():
        for file in sorted(providers_dir.glob("*.yaml")):
            paths += [p.get("options", {}).get("path") for p in yaml.safe_load(read(file)).get("providers", [])]
    dashboards = [t for s, t in mounts(grafana) if s == "./grafana/dashboards"]
    if not dashboards or dashboards[0] not in paths:
        problems.append(f"grafana: no dashboard provider reads the mounted ./grafana/dashboards ({paths})")
    return problems


def self_test(compose, base):
    settings = base / "compose/sigrun.toml"
    prometheus = base / "prometheus/prometheus.yml"

    def edit(path, old, new):
        text = path.read_text()
        assert old in text, (path, old)
        return {path: text.replace(old, new)}

    def service(name):
        return lambda c: c["services"][name]

    def split_off(compose, stage, port):
        """A second worker service, consuming `stage`, with its metrics on `port`."""
        extra = copy.deepcopy(compose["services"]["worker"])
        extra["command"] = ["worker", "--stage", stage] + extra["command"][2:-1] + [f"0.0.0.0:{port}"]
        return extra

    cases = [
        ("a stage without a worker",
         lambda c: service("worker")(c)["command"].__setitem__(1, "--stage") or service("worker")(c)["command"].insert(2, "verify") or {},
         "stage replicate"),
        ("a stage with two workers", lambda c: c["services"].update(extra=split_off(c, "replicate", 9465)) or {},
         "stage replicate: expected one worker service, found ['worker', 'extra']"),
        ("two workers on one port", lambda c: c["services"].update(extra=split_off(c, "verify", 9464)) or {},
         "port 9464 is taken"),
        ("a worker Prometheus does not scrape", lambda c: edit(prometheus, '"emulator:9464"', '"emulator:9470"'),
         "does not scrape emulator:9464"),
        ("per-object metrics not scraped", lambda c: edit(prometheus, "metrics_path: /metrics/per-object", "metrics_path: /metrics"),
         "job rabbitmq must scrape rabbitmq:15692/metrics/per-object"),
        ("time scale out of step", lambda c: edit(settings, "time_scale = 200.0", "time_scale = 100.0"), "differs from the emulator"),
        ("emulator on another port", lambda c: service("emulator")(c)["command"].__setitem__(2, "127.0.0.1:9443") or {},
         "cloud.authority_host must be https://127.0.0.1:9443"),
        ("CA outside the state volume", lambda c: edit(settings, "/var/lib/sigrun/emulator-ca.pem", "/tmp/ca.pem"),
         "extra_ca_cert must be"),
        ("short stop grace", lambda c: service("worker")(c).update(stop_grace_period="20s") or {}, "stop_grace_period 20s"),
        ("worker outside the emulator's namespace",
         lambda c: service("worker")(c).pop("network_mode") and {}, "must share the emulator's network namespace"),
        ("alert rules not mounted",
         lambda c: service("prometheus")(c)["volumes"].remove("./prometheus/rules:/etc/prometheus/rules:ro") or {},
         "rule_files /etc/prometheus/rules/*.yml matches no file"),
        ("a missing bind mount",
         lambda c: service("prometheus")(c)["volumes"].__setitem__(0, "./prometheus/nope.yml:/etc/prometheus/prometheus.yml:ro") or {},
         "bind mount ./prometheus/nope.yml does not exist"),
    ]
    passed = failed = 0
    for name, mutate, expected in cases:
        mutated = copy.deepcopy(compose)
        files = mutate(mutated) or {}
        found = check(mutated, base, files)
        if any(expected in p for p in found):
            passed += 1
        else:
            failed += 1
            print(f"FAIL {name}: expected {expected!r}, got {found}")
    print(f"{passed} passed, {failed} failed")
    return failed == 0


def main():
    path = Path(sys.argv[1])
    compose = yaml.safe_load(path.read_text())
    problems = check(compose, path.parent, {})
    for problem in problems:
        print(f"{path}: {problem}")
    print(f"{path}: {len(compose['services'])} services, {len(problems)} problem(s)", flush=True)
    ok = not problems
    if "--self-test" in sys.argv[2:]:
        ok = self_test(compose, path.parent) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

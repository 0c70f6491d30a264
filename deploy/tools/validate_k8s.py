#!/usr/bin/env python3
"""Validates rendered Kubernetes manifests (the output of `kubectl kustomize deploy/k8s/overlays/X`).

Two passes over every object:
1. Schema: Kubernetes' own kinds against the strict schemas of the `kubernetes-validate` package for
   the given Kubernetes version; KEDA ScaledObject/TriggerAuthentication and the Prometheus Operator
   PodMonitor against the CRD schemas in deploy/schemas (see its README for their source). A kind
   with no schema is an error, not a warning.
2. sigrun's deployment rules, which no schema knows: every stage consumed by exactly one worker
   Deployment (`worker --all-stages`, as shipped, or `--stage S …`) with the probes, security
   context, resources, identity and drain time the workers need; its ScaledObject triggering on
   `{amqp.prefix}.stage.{stage}` of exactly the stages it consumes; a PodDisruptionBudget and the
   PodMonitor selecting its pods; the nightly CronJob's pipeline present in the pipelines ConfigMap.

Usage: validate_k8s.py --kubernetes-version 1.32 --schemas deploy/schemas RENDERED.yaml [...]
Prints one line per problem (file, kind/name, path) and exits 1 if there is any.
"""

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

from workers import STAGES, consumed_stages

METRICS_PORT = 9464
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobject_v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_triggerauthentication_v1alpha1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitor_v1.json",
}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class Report:
    def __init__(self, source):
        self.source = source
        self.problems = []

    def add(self, obj, message):
        name = f"{obj['kind']}/{obj['metadata'].get('name', '?')}" if obj else "-"
        self.problems.append(f"{self.source}: {name}: {message}")


def check_schemas(objects, version, schema_dir, report):
    crd_validators = {}
    for key, file in CRD_SCHEMAS.items():
        schema = json.loads((schema_dir / file).read_text())
        crd_validators[key] = jsonschema.Draft202012Validator(schema)
    for obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in crd_validators:
            for error in crd_validators[key].iter_errors(obj):
                report.add(obj, f"{'.'.join(map(str, error.path)) or '(root)'}: {error.message}")
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            report.add(obj, f"{'.'.join(map(str, error.path)) or '(root)'}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            report.add(obj, f"no schema: {error.message}")


def selects(selector, labels):
    """Whether a matchLabels selector (the only form used here) selects a pod with these labels."""
    match = (selector or {}).get("matchLabels") or {}
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def settings_of(objects, report):
    """The sigrun settings file from the ConfigMap holding `sigrun.toml`, and the ConfigMaps by name."""
    config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    holders = [c for c in config_maps.values() if "sigrun.toml" in (c.get("data") or {})]
    if len(holders) != 1:
        report.add(None, f"expected one ConfigMap with sigrun.toml, found {len(holders)}")
        return None, config_maps
    try:
        return tomllib.loads(holders[0]["data"]["sigrun.toml"]), config_maps
    except tomllib.TOMLDecodeError as error:
        report.add(holders[0], f"sigrun.toml: {error}")
        return None, config_maps


def check_pod(obj, pod, report, settings, config_maps, accounts):
    """Rules every sigrun pod follows (workers and the submit job)."""
    spec = pod["spec"]
    security = spec.get("securityContext") or {}
    if security.get("runAsNonRoot") is not True:
        report.add(obj, "pod securityContext.runAsNonRoot must be true")
    if (security.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        report.add(obj, "pod securityContext.seccompProfile.type must be RuntimeDefault")
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if labels.get("azure.workload.identity/use") != "true":
        report.add(obj, 'pod label azure.workload.identity/use must be "true"')
    account = accounts.get(spec.get("serviceAccountName"))
    if account is None:
        report.add(obj, f"service account {spec.get('serviceAccountName')!r} is not in the manifests")
    elif not UUID.match((account["metadata"].get("annotations") or {}).get("azure.workload.identity/client-id", "")):
        report.add(account, "annotation azure.workload.identity/client-id must be a client id (UUID)")
    mounts_by_volume = {}
    for container in spec["containers"]:
        sc = container.get("securityContext") or {}
        where = f"container {container['name']}"
        if sc.get("allowPrivilegeEscalation") is not False:
            report.add(obj, f"{where}: allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            report.add(obj, f"{where}: readOnlyRootFilesystem must be true")
        if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
            report.add(obj, f"{where}: capabilities.drop must be [ALL]")
        if sc.get("privileged"):
            report.add(obj, f"{where}: must not be privileged")
        resources = container.get("resources") or {}
        for need in ("requests.cpu", "requests.memory", "limits.memory"):
            section, key = need.split(".")
            if key not in (resources.get(section) or {}):
                report.add(obj, f"{where}: resources.{need} is missing")
        env = {e["name"]: e for e in container.get("env") or []}
        url = env.get("SIGRUN__AMQP__URL", {}).get("valueFrom", {}).get("secretKeyRef")
        if not url:
            report.add(obj, f"{where}: SIGRUN__AMQP__URL must come from a Secret (secretKeyRef)")
        args = container.get("args") or []
        if "--config" not in args:
            report.add(obj, f"{where}: no --config")
        for mount in container.get("volumeMounts") or []:
            mounts_by_volume[mount["name"]] = mount["mountPath"]
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for name, volume in volumes.items():
        cm = (volume.get("configMap") or {}).get("name")
        if cm and cm not in config_maps:
            report.add(obj, f"volume {name}: ConfigMap {cm} is not in the manifests")
    if settings is not None:
        want = (settings.get("pipelines") or {}).get("dir")
        mounted = {path for name, path in mounts_by_volume.items()
                   if (volumes.get(name, {}).get("configMap") or {}).get("name", "").startswith("sigrun-pipelines")}
        if want not in mounted:
            report.add(obj, f"pipelines.dir {want!r} is not where the pipelines ConfigMap is mounted ({sorted(mounted)})")
    return mounts_by_volume, volumes


def check_rules(objects, report):
    settings, config_maps = settings_of(objects, report)
    by_kind = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    accounts = {o["metadata"]["name"]: o for o in by_kind.get("ServiceAccount", [])}
    secrets = {o["metadata"]["name"]: o for o in by_kind.get("Secret", [])}
    auths = {o["metadata"]["name"]: o for o in by_kind.get("TriggerAuthentication", [])}
    prefix = "sigrun"
    grace_ms = None
    if settings is not None:
        prefix = (settings.get("amqp") or {}).get("prefix", "sigrun")
        grace_ms = (settings.get("runtime") or {}).get("shutdown_grace_ms")
        if grace_ms is None:
            report.add(None, "sigrun.toml must set runtime.shutdown_grace_ms (the drain bound the pods' grace covers)")
        kind = ((settings.get("azure") or {}).get("client") or {}).get("credential", {}).get("kind")
        if kind != "workload_identity":
            report.add(None, f"sigrun.toml: azure.client.credential.kind is {kind!r}, expected workload_identity")
        if (settings.get("azure") or {}).get("mode") != "azure":
            report.add(None, 'sigrun.toml: azure.mode must be "azure"')

    workers = {}
    for deployment in by_kind.get("Deployment", []):
        pod = deployment["spec"]["template"]
        container = pod["spec"]["containers"][0]
        args = container.get("args") or []
        stages = consumed_stages(args)
        if args[:1] != ["worker"] or not stages:
            report.add(deployment, f"expected `worker --all-stages …` or `worker --stage S …`, got {args}")
            continue
        for stage in stages:
            if stage in workers:
                report.add(deployment, f"a second Deployment for stage {stage}")
            workers[stage] = deployment
        check_pod(deployment, pod, report, settings, config_maps, accounts)
        listen = args[args.index("--metrics-listen") + 1] if "--metrics-listen" in args else None
        if listen != f"0.0.0.0:{METRICS_PORT}":
            report.add(deployment, f"--metrics-listen must be 0.0.0.0:{METRICS_PORT}, got {listen}")
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
        if ports.get("metrics") != METRICS_PORT:
            report.add(deployment, f"container port `metrics` must be {METRICS_PORT}")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = (container.get(probe) or {}).get("httpGet") or {}
            if get.get("path") != path or get.get("port") not in ("metrics", METRICS_PORT):
                report.add(deployment, f"{probe} must GET {path} on the metrics port, got {get}")
        grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        if grace_ms is not None and grace * 1000 <= grace_ms:
            report.add(deployment, f"terminationGracePeriodSeconds {grace} must exceed runtime.shutdown_grace_ms {grace_ms}")
        labels = pod["metadata"]["labels"]
        if not selects(deployment["spec"].get("selector"), labels):
            report.add(deployment, "selector does not select its own pods")
        pdbs = [p for p in by_kind.get("PodDisruptionBudget", []) if selects(p["spec"].get("selector"), labels)]
        if len(pdbs) != 1:
            report.add(deployment, f"expected one PodDisruptionBudget selecting its pods, found {len(pdbs)}")
        monitors = [m for m in by_kind.get("PodMonitor", []) if selects(m["spec"].get("selector"), labels)
                    and any(e.get("port") == "metrics" and e.get("path", "/metrics") == "/metrics"
                            for e in m["spec"].get("podMetricsEndpoints", []))]
        if not monitors:
            report.add(deployment, "no PodMonitor scrapes /metrics on its `metrics` port")
        scaled = [s for s in by_kind.get("ScaledObject", [])
                  if s["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]]
        if len(scaled) != 1:
            report.add(deployment, f"expected one ScaledObject targeting it, found {len(scaled)}")
            continue
        so = scaled[0]
        low, high = so["spec"].get("minReplicaCount", 0), so["spec"].get("maxReplicaCount", 100)
        if low > high:
            report.add(so, f"minReplicaCount {low} > maxReplicaCount {high}")
        triggers = [t for t in so["spec"]["triggers"] if t["type"] == "rabbitmq"]
        queues = sorted(f"{prefix}.stage.{stage}" for stage in stages)
        if sorted(t["metadata"].get("queueName") for t in triggers) != queues:
            report.add(so, f"expected one rabbitmq trigger on each of the queues {', '.join(queues)}")
        for trigger in triggers:
            auth = auths.get((trigger.get("authenticationRef") or {}).get("name"))
            if auth is None:
                report.add(so, "the trigger's TriggerAuthentication is not in the manifests")
                continue
            refs = {r["parameter"]: r for r in auth["spec"].get("secretTargetRef", [])}
            host = refs.get("host")
            env = {e["name"]: e for e in container.get("env") or []}
            url = (env.get("SIGRUN__AMQP__URL", {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            if host is None or (host["name"], host["key"]) != (url.get("name"), url.get("key")):
                report.add(auth, "KEDA's `host` must come from the Secret key the workers' SIGRUN__AMQP__URL uses")
            elif host["name"] in secrets and host["key"] not in {**(secrets[host["name"]].get("data") or {}), **(secrets[host["name"]].get("stringData") or {})}:
                report.add(secrets[host["name"]], f"has no key {host['key']}")
    missing = [s for s in STAGES if s not in workers]
    if missing:
        report.add(None, f"no worker Deployment for stage(s) {', '.join(missing)}")

    for cron in by_kind.get("CronJob", []):
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]
        mounts, volumes = check_pod(cron, pod, report, settings, config_maps, accounts)
        container = pod["spec"]["containers"][0]
        args = container.get("args") or []
        if args[:1] != ["submit"] or len(args) < 2:
            report.add(cron, f"expected `submit PIPELINE …`, got {args}")
            continue
        path = Path(container.get("workingDir", "/")) / args[1]
        found = False
        for name, mount in mounts.items():
            cm = config_maps.get((volumes.get(name, {}).get("configMap") or {}).get("name"))
            if cm and path.parent == Path(mount) and path.name in (cm.get("data") or {}):
                found = True
        if not found:
            report.add(cron, f"{path} is not a file of a mounted ConfigMap")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", required=True)
    parser.add_argument("--schemas", type=Path, required=True)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    problems = 0
    for file in args.files:
        objects = [o for o in yaml.safe_load_all(file.read_text()) if o]
        report = Report(file)
        check_schemas(objects, args.kubernetes_version, args.schemas, report)
        check_rules(objects, report)
        for line in report.problems:
            print(line)
        problems += len(report.problems)
        kinds = sorted({o["kind"] for o in objects})
        print(f"{file}: {len(objects)} objects ({', '.join(kinds)}), {len(report.problems)} problem(s)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()

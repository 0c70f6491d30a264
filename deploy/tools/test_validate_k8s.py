#!/usr/bin/env python3
"""Proves validate_k8s.py is not vacuous: takes a rendered overlay that passes, breaks it in one way
per case (a misspelt CRD field, a wrong queue, a short grace period, …) and asserts that the validator
reports exactly that problem. Usage: test_validate_k8s.py --kubernetes-version 1.32 --schemas DIR RENDERED.yaml
Prints `N passed, M failed` and exits 1 if a case was not caught.
"""

import argparse
import copy
import sys
from pathlib import Path

import yaml

import validate_k8s


def first(objects, kind, name_part=""):
    return next(o for o in objects if o["kind"] == kind and name_part in o["metadata"]["name"])


def worker(objects):
    return first(objects, "Deployment", "sigrun-worker")["spec"]["template"]["spec"]


def args(objects):
    return worker(objects)["containers"][0]["args"]


def set_settings(objects, old, new):
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and "sigrun.toml" in (o.get("data") or {}))
    assert old in cm["data"]["sigrun.toml"], old
    cm["data"]["sigrun.toml"] = cm["data"]["sigrun.toml"].replace(old, new)


# (name, mutation, text expected in a reported problem)
CASES = [
    ("misspelt ScaledObject field",
     lambda o: first(o, "ScaledObject")["spec"].update(maxReplicas=3), "'maxReplicas' was unexpected"),
    ("ScaledObject on the wrong queue",
     lambda o: first(o, "ScaledObject")["spec"]["triggers"][3]["metadata"].update(queueName="sigrun.stage.verify"),
     "sigrun.stage.replicate"),
    ("ScaledObject missing a stage's queue",
     lambda o: first(o, "ScaledObject")["spec"]["triggers"].pop(0), "sigrun.stage.snapshot"),
    ("ScaledObject on a queue its workers do not consume",
     lambda o: args(o).__setitem__(slice(1, 2), ["--stage", "snapshot", "--stage", "image-create", "--stage", "gallery-publish",
                                                "--stage", "replicate", "--stage", "pool-create"]),
     "expected one rabbitmq trigger on each of the queues"),
    ("min above max replicas",
     lambda o: first(o, "ScaledObject")["spec"].update(minReplicaCount=20, maxReplicaCount=2), "minReplicaCount 20 > maxReplicaCount 2"),
    ("TriggerAuthentication with an unknown field",
     lambda o: first(o, "TriggerAuthentication")["spec"].update(secretRef=[]), "'secretRef' was unexpected"),
    ("PodMonitor endpoint misspelt",
     lambda o: first(o, "PodMonitor")["spec"]["podMetricsEndpoints"][0].update(intervall="15s"), "'intervall' was unexpected"),
    ("Deployment with an unknown container field",
     lambda o: worker(o)["containers"][0].update(readinesProbe={}), "'readinesProbe' was unexpected"),
    ("grace period not above the drain bound",
     lambda o: worker(o).update(terminationGracePeriodSeconds=30), "must exceed runtime.shutdown_grace_ms"),
    ("drain bound raised in the settings only",
     lambda o: set_settings(o, "shutdown_grace_ms = 30000", "shutdown_grace_ms = 90000"), "must exceed runtime.shutdown_grace_ms 90000"),
    ("prefix changed in the settings only",
     lambda o: set_settings(o, 'prefix = "sigrun"', 'prefix = "nightly"'), "queues nightly.stage."),
    ("readiness on the wrong path",
     lambda o: worker(o)["containers"][0]["readinessProbe"]["httpGet"].update(path="/healthz"), "readinessProbe must GET /readyz"),
    ("writable root filesystem",
     lambda o: worker(o)["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False), "readOnlyRootFilesystem must be true"),
    ("capabilities not dropped",
     lambda o: worker(o)["containers"][0]["securityContext"].pop("capabilities"), "capabilities.drop must be [ALL]"),
    ("no seccomp profile",
     lambda o: worker(o)["securityContext"].pop("seccompProfile"), "seccompProfile.type must be RuntimeDefault"),
    ("workload identity label missing",
     lambda o: first(o, "Deployment")["spec"]["template"]["metadata"]["labels"].pop("azure.workload.identity/use"),
     "azure.workload.identity/use"),
    ("a stage without workers",
     lambda o: args(o).__setitem__(slice(1, 2), ["--stage", "verify"]), "no worker Deployment for stage(s) snapshot"),
    ("no worker Deployment at all",
     lambda o: o.remove(first(o, "Deployment")), "no worker Deployment for stage(s) snapshot, image-create"),
    ("broker URL as a literal",
     lambda o: worker(o)["containers"][0]["env"][0].update(value="amqp://x", valueFrom=None) or worker(o)["containers"][0]["env"][0].pop("valueFrom"),
     "SIGRUN__AMQP__URL must come from a Secret"),
    ("memory limit missing",
     lambda o: worker(o)["containers"][0]["resources"].pop("limits"), "resources.limits.memory is missing"),
    ("CronJob pipeline not in the ConfigMap",
     lambda o: first(o, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"].__setitem__(1, "pipelines/nope.toml"),
     "pipelines/nope.toml is not a file of a mounted ConfigMap"),
    ("PDB selecting nothing of the workers",
     lambda o: first(o, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].update({"sigrun.io/stage": "x"}),
     "expected one PodDisruptionBudget"),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kubernetes-version", required=True)
    parser.add_argument("--schemas", type=Path, required=True)
    parser.add_argument("rendered", type=Path)
    args = parser.parse_args()
    pristine = [o for o in yaml.safe_load_all(args.rendered.read_text()) if o]

    def problems(objects):
        report = validate_k8s.Report("case")
        validate_k8s.check_schemas(objects, args.kubernetes_version, args.schemas, report)
        validate_k8s.check_rules(objects, report)
        return report.problems

    baseline = problems(copy.deepcopy(pristine))
    if baseline:
        print("the unmodified manifests should pass:\n" + "\n".join(baseline))
        sys.exit(1)
    passed = failed = 0
    for name, mutate, expected in CASES:
        objects = copy.deepcopy(pristine)
        mutate(objects)
        found = problems(objects)
        if any(expected in line for line in found):
            passed += 1
        else:
            failed += 1
            print(f"FAIL {name}: expected a problem containing {expected!r}, got {found}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

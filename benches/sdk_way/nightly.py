"""The SDK way: nightly pipelines the way the Azure and Batch documentation's Python samples run
them, for `benches/concurrent.rs` to measure beside sigrun.

One thread per pipeline, each doing its chain in order with the official SDKs (azure-identity,
azure-mgmt-compute, azure-batch), every long operation waited on with its poller's `.result()`:
snapshots of the build VM's disks, the managed image, the gallery (read, created if missing), the
image definition, the image version (its LRO ends once every target region is replicated), the
intermediates deleted, then each Batch pool created and watched as the Batch samples'
`wait_for_all_nodes_state` does (pool and node list read every 10 s, scaled to the emulator's
clock) until it is steady with its nodes idle.

Input: a JSON file written by the bench, with the identity, the endpoints and one sigrun plan per
pipeline (`Plan` as it serializes: ids as ARM id strings). Exit 0 when every pipeline succeeded;
otherwise each failure is printed and the exit code is 1.
"""

import json
import sys
import threading
import time

from azure.batch import BatchClient
from azure.batch import models as batch_models
from azure.core.exceptions import ResourceNotFoundError
from azure.identity import ClientSecretCredential
from azure.mgmt.compute import ComputeManagementClient

ARM_SCOPE = "https://management.azure.com/.default"
# The Batch samples' pause between looks at a pool's nodes, in Azure's seconds.
NODE_POLL_S = 10.0


def arm_parts(arm_id):
    """(subscription, resource group, last name) of an ARM id."""
    parts = arm_id.strip("/").split("/")
    lower = [p.lower() for p in parts]
    subscription = parts[lower.index("subscriptions") + 1]
    group = parts[lower.index("resourcegroups") + 1]
    return subscription, group, parts[-1]


class Azure:
    """The clients a pipeline thread uses: one credential, a compute client per subscription, a
    Batch client per account, all shared by every thread, as one process would."""

    def __init__(self, job):
        self.credential = ClientSecretCredential(
            job["tenant"],
            job["client_id"],
            job["client_secret"],
            authority=job["authority"],
            disable_instance_discovery=True,
        )
        self.arm = job["arm"]
        self.scale = job["time_scale"]
        self._compute = {}
        self._batch = {}
        self._lock = threading.Lock()

    def compute(self, subscription):
        with self._lock:
            if subscription not in self._compute:
                self._compute[subscription] = ComputeManagementClient(
                    self.credential,
                    subscription,
                    base_url=self.arm,
                    credential_scopes=[ARM_SCOPE],
                )
            return self._compute[subscription]

    def batch(self, url):
        with self._lock:
            if url not in self._batch:
                self._batch[url] = BatchClient(url, self.credential)
            return self._batch[url]


def build_image(azure, plan):
    """Snapshots of the build VM's disks, then the managed image from them."""
    build = plan["build"]
    snapshots = {}
    for snapshot in build["snapshots"]:
        sub, group, name = arm_parts(snapshot["id"])
        azure.compute(sub).snapshots.begin_create_or_update(
            group,
            name,
            {
                "location": build["region"],
                "creation_data": {"create_option": "Copy", "source_resource_id": snapshot["source"]},
                "incremental": False,
            },
        ).result()
        snapshots[snapshot.get("lun")] = snapshot["id"]
    sub, group, name = arm_parts(build["image"])
    data_disks = [
        {"lun": lun, "snapshot": {"id": sid}} for lun, sid in sorted((k, v) for k, v in snapshots.items() if k is not None)
    ]
    azure.compute(sub).images.begin_create_or_update(
        group,
        name,
        {
            "location": build["region"],
            "hyper_v_generation": build["hyper_v_generation"],
            "storage_profile": {
                "os_disk": {
                    "os_type": build["os_type"],
                    "os_state": "Generalized",
                    "snapshot": {"id": snapshots[None]},
                },
                "data_disks": data_disks,
            },
        },
    ).result()


def publish(azure, spec, plan):
    """The gallery (created if missing), the definition, and the version replicated everywhere."""
    sub, group, gallery = arm_parts(plan["gallery"])
    compute = azure.compute(sub)
    try:
        compute.galleries.get(group, gallery)
    except ResourceNotFoundError:
        compute.galleries.begin_create_or_update(group, gallery, {"location": plan["gallery_region"]}).result()
    definition = spec["definition"]
    _, _, name = arm_parts(plan["definition"])
    compute.gallery_images.begin_create_or_update(
        group,
        gallery,
        name,
        {
            "location": plan["gallery_region"],
            "os_type": definition["os_type"],
            "os_state": definition["os_state"],
            "hyper_v_generation": definition["hyper_v_generation"],
            "identifier": {
                "publisher": definition["publisher"],
                "offer": definition["offer"],
                "sku": definition["sku"],
            },
        },
    ).result()
    compute.gallery_image_versions.begin_create_or_update(
        group,
        gallery,
        name,
        plan["version"],
        {
            "location": plan["gallery_region"],
            "publishing_profile": {
                "target_regions": [
                    {
                        "name": region["name"],
                        "regional_replica_count": region["replicas"],
                        "storage_account_type": region["storage_account_type"],
                    }
                    for region in plan["regions"]
                ],
            },
            "storage_profile": {"source": {"id": plan["build"]["image"]}},
        },
    ).result()


def delete_intermediates(azure, plan):
    build = plan["build"]
    sub, group, name = arm_parts(build["image"])
    azure.compute(sub).images.begin_delete(group, name).result()
    for snapshot in build["snapshots"]:
        sub, group, name = arm_parts(snapshot["id"])
        azure.compute(sub).snapshots.begin_delete(group, name).result()


def create_pool(azure, plan, pool):
    start_task = None
    if pool.get("start_task"):
        task = pool["start_task"]
        start_task = batch_models.BatchStartTask(
            command_line=task["command_line"],
            wait_for_success=task.get("wait_for_success", True),
            max_task_retry_count=task.get("max_task_retry_count", 0),
        )
    azure.batch(pool["account_url"]).create_pool(
        batch_models.BatchPoolCreateOptions(
            id=pool["pool_id"],
            vm_size=pool["vm_size"],
            virtual_machine_configuration=batch_models.VirtualMachineConfiguration(
                image_reference=batch_models.BatchVmImageReference(virtual_machine_image_id=plan["version_id"]),
                node_agent_sku_id=pool["node_agent_sku_id"],
            ),
            target_dedicated_nodes=pool["dedicated_nodes"],
            target_low_priority_nodes=pool["low_priority_nodes"],
            task_slots_per_node=pool["task_slots_per_node"],
            start_task=start_task,
        )
    )


def wait_for_idle_nodes(azure, pool):
    """The Batch samples' `wait_for_all_nodes_state`: the pool and its nodes, every 10 s."""
    client = azure.batch(pool["account_url"])
    wanted = pool["dedicated_nodes"] + pool["low_priority_nodes"]
    while True:
        got = client.get_pool(pool["pool_id"])
        if got.resize_errors:
            raise RuntimeError(f"pool {pool['pool_id']}: resize errors {got.resize_errors}")
        if got.allocation_state == batch_models.AllocationState.STEADY:
            nodes = list(client.list_nodes(pool["pool_id"]))
            if len(nodes) >= wanted and all(n.state == batch_models.BatchNodeState.IDLE for n in nodes):
                return
        time.sleep(NODE_POLL_S / azure.scale)


def pipeline(azure, entry):
    spec, plan = entry["spec"], entry["plan"]
    build_image(azure, plan)
    publish(azure, spec, plan)
    delete_intermediates(azure, plan)
    for pool in plan["pools"]:
        create_pool(azure, plan, pool)
    for pool in plan["pools"]:
        wait_for_idle_nodes(azure, pool)


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        job = json.load(f)
    azure = Azure(job)
    failures = []

    def run(entry):
        try:
            pipeline(azure, entry)
        except Exception as error:  # every failure is reported; the bench fails on any
            failures.append(f"{entry['plan']['version_id']}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=run, args=(entry,)) for entry in job["pipelines"]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for failure in failures:
        print(failure, file=sys.stderr)
    print(f"{len(threads) - len(failures)} of {len(threads)} pipelines succeeded")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

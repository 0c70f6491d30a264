//! The plan: what a pipeline resolves to before anything is created — every name, the replicas per
//! region (never fewer than the pools there need), each pool's resize timeout and node agent SKU,
//! and the warnings for values that were raised. `sigrun validate` prints it; a run carries it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::envelope::SnapshotArtifact;
use super::ids::{BatchAccountId, DiskId, GalleryId, GalleryImageId, GalleryImageVersionId, ImageId, SnapshotId, VmId};
use super::spec::StartTaskSpec;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub version: String,
    /// Absent when an existing version is rolled out.
    #[serde(default)]
    pub build: Option<BuildPlan>,
    pub gallery: GalleryId,
    pub gallery_region: String,
    pub create_gallery: bool,
    pub definition: GalleryImageId,
    pub version_id: GalleryImageVersionId,
    pub regions: Vec<RegionPlan>,
    pub pools: Vec<PoolPlan>,
    /// `excludeFromLatest` at publish time (true while promotion is gated).
    pub publish_excluded: bool,
    /// `excludeFromLatest` once promoted.
    pub final_excluded: bool,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub end_of_life: Option<OffsetDateTime>,
    /// Subscriptions (other than the Batch accounts') whose Microsoft.Batch registration is needed.
    #[serde(default)]
    pub register_batch_in: Vec<String>,
    /// Each Batch account quota the plan was held to: what is in use and what the plan adds.
    #[serde(default)]
    pub quota_use: Vec<QuotaUse>,
    /// What the planner read of the image definition and of the version. A step's first try
    /// (nothing of its message's state can have reached Azure before) need not read again what
    /// no try of this run can have changed since. Unknown in plans from before it.
    #[serde(default)]
    pub seen: Seen,
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// What the planner found in Azure, for the steps that would otherwise read it again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seen {
    /// The image definition: `Present` once it was read and fits the spec.
    #[serde(default)]
    pub definition: Presence,
    /// The version: `Absent` when its name was chosen as the next nightly number, from the
    /// definition's version list.
    #[serde(default)]
    pub version: Presence,
}

/// Whether the planner found a resource ready: `Unknown` when it did not look, found it not ready,
/// or the plan is older (a step reads it then).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    #[default]
    Unknown,
    Absent,
    Present,
}

/// One quota of one Batch account as the planner found it (`poolQuota`, `dedicatedCoreQuota`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaUse {
    /// The account's name.
    pub account: String,
    /// Azure's name of the quota (`dedicatedCoreQuotaPerVMFamily standardDSv5Family` for a family).
    pub quota: String,
    pub limit: u32,
    /// What the account's other pools take now.
    pub in_use: u64,
    /// What the plan's pools take.
    pub adds: u64,
}

impl QuotaUse {
    /// What is left once the plan's pools are made (0 when over).
    pub fn headroom_after(&self) -> u64 {
        u64::from(self.limit).saturating_sub(self.in_use.saturating_add(self.adds))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildPlan {
    #[serde(default)]
    pub vm: Option<VmId>,
    pub snapshots: Vec<SnapshotPlan>,
    pub image: ImageId,
    pub region: String,
    pub os_type: String,
    pub hyper_v_generation: String,
    /// The build VM's Marketplace base image (publisher, offer, sku), when known.
    #[serde(default)]
    pub base_image: Option<(String, String, String)>,
}

impl BuildPlan {
    /// The snapshots as the run records them once made.
    pub fn snapshot_artifacts(&self) -> Vec<SnapshotArtifact> {
        self.snapshots
            .iter()
            .map(|s| SnapshotArtifact {
                lun: s.lun,
                id: s.id.clone(),
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotPlan {
    /// `None` for the OS disk.
    pub lun: Option<u32>,
    pub source: DiskId,
    pub id: SnapshotId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionPlan {
    pub name: String,
    pub replicas: u32,
    /// What the spec asked for, when it named a number.
    #[serde(default)]
    pub replicas_asked: Option<u32>,
    /// Nodes of the pools planned in this region.
    pub nodes: u32,
    pub storage_account_type: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolPlan {
    pub target: String,
    pub region: String,
    pub account: BatchAccountId,
    pub account_url: String,
    pub pool_id: String,
    pub vm_size: String,
    pub dedicated_nodes: u32,
    pub low_priority_nodes: u32,
    pub node_agent_sku_id: String,
    pub resize_timeout_secs: u64,
    pub task_slots_per_node: u32,
    #[serde(default)]
    pub start_task: Option<StartTaskSpec>,
    pub metadata: BTreeMap<String, String>,
}

impl Plan {
    pub fn pools_in(&self, region: &str) -> impl Iterator<Item = &PoolPlan> {
        self.pools.iter().filter(move |p| p.region == region)
    }
}

//! Pipeline specs (`pipelines/*.toml`): what to build from, where to publish, which pools to roll
//! out to, how to verify, promote and retire. Parsing is strict: unknown keys and bad values are
//! errors that name the file, the line and the key. Cross-field checks that need no Azure call
//! happen here too; the planner (`plan.rs`) adds the ones that read Azure.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ids::{BatchAccountId, DiskId, GalleryId, VmId, definition_name_ok, pool_id_ok, version_name_ok};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {key}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct SpecError {
    pub file: String,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Names the pipeline in resource names, tags, events and metrics.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The build VM (or its disks). Absent in a rollout-only pipeline.
    #[serde(default)]
    pub source: Option<SourceSpec>,
    #[serde(default)]
    pub image: Option<ImageSpec>,
    pub gallery: GallerySpec,
    pub definition: DefinitionSpec,
    #[serde(default)]
    pub version: VersionSpec,
    #[serde(default)]
    pub publish: PublishSpec,
    #[serde(default)]
    pub pools: Vec<PoolSpec>,
    #[serde(default)]
    pub verify: VerifySpec,
    #[serde(default)]
    pub promotion: PromotionSpec,
    #[serde(default)]
    pub rollout: RolloutSpec,
    #[serde(default)]
    pub retention: RetentionSpec,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// The prepared (generalized) build VM whose disks are snapshotted.
    #[serde(default)]
    pub vm: Option<VmId>,
    /// Or explicit disks.
    #[serde(default)]
    pub os_disk: Option<DiskId>,
    #[serde(default)]
    pub data_disks: Vec<DataDiskSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataDiskSpec {
    pub lun: u32,
    pub disk: DiskId,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Subscription of the managed image; defaults to the source's.
    #[serde(default)]
    pub subscription: Option<String>,
    pub resource_group: String,
    pub region: String,
    /// Name template: `{pipeline}`, `{version}` (dots become dashes).
    #[serde(default = "default_image_name")]
    pub name: String,
}

fn default_image_name() -> String {
    "{pipeline}-{version}".to_string()
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GallerySpec {
    pub id: GalleryId,
    #[serde(default = "yes")]
    pub create_if_missing: bool,
    /// Where the gallery is created if missing; defaults to the image's region.
    #[serde(default)]
    pub region: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum OsType {
    Linux,
    Windows,
}

impl OsType {
    pub fn as_str(self) -> &'static str {
        match self {
            OsType::Linux => "Linux",
            OsType::Windows => "Windows",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DefinitionSpec {
    pub name: String,
    pub os_type: OsType,
    /// Must be `Generalized`: Batch refuses specialized images.
    #[serde(default = "generalized")]
    pub os_state: String,
    pub publisher: String,
    pub offer: String,
    pub sku: String,
    #[serde(default = "default_generation")]
    pub hyper_v_generation: String,
}

fn generalized() -> String {
    "Generalized".to_string()
}

fn default_generation() -> String {
    "V2".to_string()
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VersionSpec {
    #[serde(default)]
    pub scheme: VersionScheme,
    /// The version for `explicit` and `existing`.
    #[serde(default)]
    pub value: Option<String>,
}

impl Default for VersionSpec {
    fn default() -> Self {
        VersionSpec {
            scheme: VersionScheme::Nightly,
            value: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionScheme {
    /// `YYYY.MMDD.N`, N unique per day.
    #[default]
    Nightly,
    /// `value` is published.
    Explicit,
    /// `value` already exists in the gallery: roll it out to the pools (no build, no publish).
    Existing,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PublishSpec {
    #[serde(default = "standard_lrs")]
    pub storage_account_type: String,
    /// The version's final `excludeFromLatest` (it is published excluded while promotion is gated).
    #[serde(default)]
    pub exclude_from_latest: bool,
    /// End of life as a duration after publishing, e.g. `90d`.
    #[serde(default, with = "opt_duration")]
    pub end_of_life: Option<Duration>,
    /// Nodes one replica serves (the Batch document's 600; later guidance says 300).
    #[serde(default = "default_nodes_per_replica")]
    pub nodes_per_replica: u32,
    #[serde(default)]
    pub regions: Vec<RegionSpec>,
}

impl Default for PublishSpec {
    fn default() -> Self {
        PublishSpec {
            storage_account_type: standard_lrs(),
            exclude_from_latest: false,
            end_of_life: None,
            nodes_per_replica: default_nodes_per_replica(),
            regions: Vec::new(),
        }
    }
}

fn standard_lrs() -> String {
    "Standard_LRS".to_string()
}

fn default_nodes_per_replica() -> u32 {
    super::rules::DEFAULT_NODES_PER_REPLICA
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSpec {
    pub name: String,
    #[serde(default)]
    pub replicas: Replicas,
    #[serde(default)]
    pub storage_account_type: Option<String>,
}

/// A replica count: `auto` (computed from the pools planned in the region) or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Replicas {
    #[default]
    #[serde(with = "auto")]
    Auto,
    Count(u32),
}

mod auto {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("auto")
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
        let text = String::deserialize(d)?;
        if text == "auto" {
            Ok(())
        } else {
            Err(serde::de::Error::custom(format!(
                "expected `auto` or a number, got `{text}`"
            )))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// The pool's role (e.g. `render-weu`); the previous version's pool of the same target is the
    /// one a rollout policy retires.
    pub target: String,
    pub account: BatchAccountId,
    /// Pool id template: `{pipeline}`, `{target}`, `{version}` (dots become dashes).
    #[serde(default = "default_pool_id")]
    pub id: String,
    pub vm_size: String,
    #[serde(default)]
    pub dedicated_nodes: u32,
    #[serde(default)]
    pub low_priority_nodes: u32,
    /// `auto` picks the SKU Batch lists for the build VM's base image.
    #[serde(default = "auto_text")]
    pub node_agent_sku_id: String,
    /// `auto` (15 minutes per 1000 nodes) or a duration such as `45m`.
    #[serde(default = "auto_text")]
    pub resize_timeout: String,
    #[serde(default)]
    pub start_task: Option<StartTaskSpec>,
    #[serde(default = "one")]
    pub task_slots_per_node: u32,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

fn default_pool_id() -> String {
    "{pipeline}-{target}-{version}".to_string()
}

fn auto_text() -> String {
    "auto".to_string()
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StartTaskSpec {
    pub command_line: String,
    #[serde(default)]
    pub elevated: bool,
    #[serde(default = "yes")]
    pub wait_for_success: bool,
    #[serde(default)]
    pub max_task_retry_count: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VerifySpec {
    /// Share of the target nodes that must be idle.
    #[serde(default = "default_idle_share")]
    pub min_idle_share: f64,
    /// Share of the target nodes allowed in `starttaskfailed`.
    #[serde(default)]
    pub max_start_task_failed_share: f64,
    /// How long after pool creation verification may take.
    #[serde(default = "default_deadline", with = "duration")]
    pub deadline: Duration,
}

impl Default for VerifySpec {
    fn default() -> Self {
        VerifySpec {
            min_idle_share: default_idle_share(),
            max_start_task_failed_share: 0.0,
            deadline: default_deadline(),
        }
    }
}

fn default_idle_share() -> f64 {
    0.95
}

fn default_deadline() -> Duration {
    Duration::from_secs(3 * 3600)
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PromotionSpec {
    /// Publish with `excludeFromLatest = true` and flip it only after a pool on it verifies.
    #[serde(default = "yes")]
    pub gated: bool,
}

impl Default for PromotionSpec {
    fn default() -> Self {
        PromotionSpec { gated: true }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    #[serde(default)]
    pub previous_pool: PreviousPool,
}

/// What a run leaves behind, and for how long (`[retention]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSpec {
    /// Whether old versions and retired pools are deleted (`keep_versions`, `pool_grace`, and a
    /// full account's oldest retired pool making room); `false` keeps them all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The run's snapshots once its managed image exists, and the image once its gallery version
    /// does: deleted (`delete`) or kept (`keep`).
    #[serde(default)]
    pub intermediates: Intermediates,
    /// The newest versions of the definition kept (besides every version a pool still uses and the
    /// one `latest` resolves to); older ones this pipeline published are deleted.
    #[serde(default = "default_keep_versions")]
    pub keep_versions: u32,
    /// How long a pool the rollout scaled to zero is kept before it is deleted.
    #[serde(default = "default_pool_grace", with = "duration")]
    pub pool_grace: Duration,
}

/// The largest `keep_versions`: a definition holds at most this many versions worth keeping apart.
pub const MAX_KEEP_VERSIONS: u32 = 1000;

impl Default for RetentionSpec {
    fn default() -> Self {
        RetentionSpec {
            enabled: true,
            intermediates: Intermediates::default(),
            keep_versions: default_keep_versions(),
            pool_grace: default_pool_grace(),
        }
    }
}

fn default_keep_versions() -> u32 {
    10
}

fn default_pool_grace() -> Duration {
    Duration::from_secs(7 * 86_400)
}

/// What becomes of a run's snapshots and managed image once what replaces them exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Intermediates {
    #[default]
    Delete,
    Keep,
}

/// What happens to the previous version's pool of the same target once the new one verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PreviousPool {
    #[default]
    Keep,
    ScaleToZero,
    Delete,
}

pub mod duration {
    //! Durations written as `90s`, `45m`, `2h`, `90d`, `1h30m`.
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// The longest duration any setting or spec takes: ten years (3650d). Longer is refused, so
    /// no date or deadline computed from one can overflow.
    pub const MAX: Duration = Duration::from_secs(3650 * 86_400);

    pub fn parse(text: &str) -> Result<Duration, String> {
        let shown = super::super::text::shorten(text, 40);
        let text = text.trim();
        if text.is_empty() {
            return Err("empty duration".into());
        }
        let mut total = 0u64;
        let mut number = String::new();
        for c in text.chars() {
            if c.is_ascii_digit() {
                number.push(c);
                continue;
            }
            let unit = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                _ => {
                    return Err(format!(
                        "`{shown}`: unknown unit `{}` (use s, m, h or d)",
                        c.escape_default()
                    ));
                }
            };
            let too_long = || format!("`{shown}` is longer than {}", format(MAX));
            let n: u64 = match number.parse() {
                Ok(n) => n,
                Err(_) if number.is_empty() => return Err(format!("`{shown}`: a number must come before `{c}`")),
                Err(_) => return Err(too_long()),
            };
            total = n
                .checked_mul(unit)
                .and_then(|part| total.checked_add(part))
                .filter(|t| *t <= MAX.as_secs())
                .ok_or_else(too_long)?;
            number.clear();
        }
        if !number.is_empty() {
            return Err(format!(
                "`{shown}`: the number {} has no unit (s, m, h or d)",
                super::super::text::shorten(&number, 20)
            ));
        }
        Ok(Duration::from_secs(total))
    }

    pub fn format(d: Duration) -> String {
        let s = d.as_secs();
        match s {
            s if s % 86_400 == 0 && s > 0 => format!("{}d", s / 86_400),
            s if s % 3600 == 0 && s > 0 => format!("{}h", s / 3600),
            s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => super::duration::parse(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

/// Fills a name template and makes the result safe for the resource kind (`.` → `-`).
pub fn render_name(template: &str, pipeline: &str, target: &str, version: &str) -> String {
    template
        .replace("{pipeline}", pipeline)
        .replace("{target}", target)
        .replace("{version}", &version.replace('.', "-"))
}

/// The most nodes (dedicated and low-priority together) one pool may plan: Batch's largest
/// pools are tens of thousands of nodes; beyond this a number is a mistake, and every sum made of
/// node counts stays far from overflowing.
pub const MAX_POOL_NODES: u32 = 100_000;

/// The longest a pool's resize or its verification may be given: 30 days.
pub const MAX_WAIT: Duration = Duration::from_secs(30 * 86_400);

/// The most pools one pipeline may plan.
pub const MAX_POOLS: usize = 100;

impl PipelineSpec {
    pub fn load(path: &Path) -> Result<PipelineSpec, SpecError> {
        let file = path.display().to_string();
        let text =
            crate::input_file::read_bounded(path, crate::input_file::MAX_INPUT_FILE_BYTES).map_err(|message| {
                SpecError {
                    file: file.clone(),
                    line: None,
                    key: "-".into(),
                    message,
                }
            })?;
        PipelineSpec::parse(&text, &file)
    }

    pub fn parse(text: &str, file: &str) -> Result<PipelineSpec, SpecError> {
        let spec: PipelineSpec = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            let (mut key, message) = split_toml_message(e.message());
            // A bad value's message (an invalid id, a wrong type) names no key; its span does.
            if key == "-"
                && let Some(found) = e.span().and_then(|s| key_at(text, s.start))
            {
                key = found;
            }
            // A document that does not parse (a duplicate key) has no tree to walk; its span is
            // the key itself.
            if key == "-"
                && let Some(found) = e.span().and_then(|s| bare_key(text.get(s)?))
            {
                key = found;
            }
            SpecError {
                file: file.to_string(),
                line,
                key,
                message,
            }
        })?;
        spec.check().map_err(|(key, message)| SpecError {
            file: file.to_string(),
            line: locate(text, &key),
            key,
            message,
        })?;
        Ok(spec)
    }

    /// Checks that need no Azure call. Returns the offending key path and why.
    fn check(&self) -> Result<(), (String, String)> {
        self.check_identity()?;
        self.check_version()?;
        self.check_source()?;
        self.check_publish()?;
        self.check_verify()?;
        self.check_retention()?;
        self.check_pools()?;
        self.check_names()
    }

    /// At least the newest version is kept; the grace is a wait like any other.
    fn check_retention(&self) -> Result<(), (String, String)> {
        let keep = self.retention.keep_versions;
        if !(1..=MAX_KEEP_VERSIONS).contains(&keep) {
            return Err((
                "retention.keep_versions".into(),
                format!("{keep} is outside 1..={MAX_KEEP_VERSIONS}"),
            ));
        }
        if self.retention.pool_grace > MAX_WAIT {
            return Err((
                "retention.pool_grace".into(),
                format!("longer than {}", duration::format(MAX_WAIT)),
            ));
        }
        Ok(())
    }

    /// The pipeline's name and its image definition: what Batch and the gallery accept.
    fn check_identity(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: String| Err((key.to_string(), message));
        if self.name.is_empty()
            || self.name.len() > 40
            || !self
                .name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        {
            return bad(
                "name",
                format!("`{}`: 1–40 lower-case letters, digits and dashes", self.name),
            );
        }
        if !super::rules::generalized(&self.definition.os_state) {
            return bad(
                "definition.os_state",
                format!(
                    "`{}`: Batch pools need a Generalized image; specialized images are refused",
                    self.definition.os_state
                ),
            );
        }
        if !definition_name_ok(&self.definition.name) {
            return bad(
                "definition.name",
                format!("`{}` is not a valid image definition name", self.definition.name),
            );
        }
        if !["V1", "V2"].contains(&self.definition.hyper_v_generation.as_str()) {
            return bad("definition.hyper_v_generation", "must be V1 or V2".into());
        }
        Ok(())
    }

    /// The version scheme and its value.
    fn check_version(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: String| Err((key.to_string(), message));
        match (self.version.scheme, &self.version.value) {
            (VersionScheme::Nightly, Some(_)) => {
                return bad(
                    "version.value",
                    "a nightly version is computed; remove `value` or use scheme = \"explicit\"".into(),
                );
            }
            (VersionScheme::Explicit | VersionScheme::Existing, None) => {
                return bad("version.value", "this scheme needs a value such as \"1.4.0\"".into());
            }
            (_, Some(v)) if !version_name_ok(v) => {
                return bad(
                    "version.value",
                    format!("`{v}` must be Major.Minor.Patch with 32-bit integer parts"),
                );
            }
            _ => {}
        }
        Ok(())
    }

    /// What the image is built from: nothing for a rollout, a VM or disks otherwise.
    fn check_source(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: String| Err((key.to_string(), message));
        let rollout_only = self.version.scheme == VersionScheme::Existing;
        match (&self.source, rollout_only) {
            (None, false) => return bad("source", "a pipeline that builds an image needs a [source]".into()),
            (Some(_), true) => return bad("source", "a rollout of an existing version takes no [source]".into()),
            (Some(source), false) => {
                if source.vm.is_some() == source.os_disk.is_some() {
                    return bad("source", "give either `vm` or `os_disk` (with `data_disks`)".into());
                }
                if source.vm.is_some() && !source.data_disks.is_empty() {
                    return bad(
                        "source.data_disks",
                        "data disks come from the VM; list them only with `os_disk`".into(),
                    );
                }
                if self.image.is_none() {
                    return bad(
                        "image",
                        "a pipeline that builds an image needs an [image] section".into(),
                    );
                }
            }
            (None, true) => {}
        }
        Ok(())
    }

    /// Target regions, replicas and storage types.
    fn check_publish(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: String| Err((key.to_string(), message));
        let rollout_only = self.version.scheme == VersionScheme::Existing;
        if !rollout_only && self.publish.regions.is_empty() {
            return bad("publish.regions", "name at least one target region".into());
        }
        check_storage_type("publish.storage_account_type", &self.publish.storage_account_type)?;
        for (i, region) in self.publish.regions.iter().enumerate() {
            if let Some(t) = &region.storage_account_type {
                check_storage_type(&format!("publish.regions[{i}].storage_account_type"), t)?;
            }
            if let Replicas::Count(n) = region.replicas
                && !(1..=super::rules::MAX_REPLICAS).contains(&n)
            {
                return bad(
                    &format!("publish.regions[{i}].replicas"),
                    format!("{n} is outside 1–100"),
                );
            }
        }
        if self.publish.nodes_per_replica == 0 {
            return bad("publish.nodes_per_replica", "must be at least 1".into());
        }
        if self.publish.regions.len() > 50 {
            return bad(
                "publish.regions",
                format!("{} regions: at most 50", self.publish.regions.len()),
            );
        }
        Ok(())
    }

    /// The shares and the deadline a pool verifies by.
    fn check_verify(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: String| Err((key.to_string(), message));
        for (key, share) in [
            ("verify.min_idle_share", self.verify.min_idle_share),
            (
                "verify.max_start_task_failed_share",
                self.verify.max_start_task_failed_share,
            ),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return bad(key, format!("{share} is not a share between 0 and 1"));
            }
        }
        if self.verify.deadline > MAX_WAIT {
            return bad("verify.deadline", format!("longer than {}", duration::format(MAX_WAIT)));
        }
        Ok(())
    }

    /// The pools: how many, targets unique, each within Batch's limits.
    fn check_pools(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: String| Err((key.to_string(), message));
        let rollout_only = self.version.scheme == VersionScheme::Existing;
        if self.pools.len() > MAX_POOLS {
            return bad("pools", format!("{} pools: at most {MAX_POOLS}", self.pools.len()));
        }
        if self.pools.is_empty() && rollout_only {
            return bad("pools", "a rollout needs at least one pool".into());
        }
        let mut targets = std::collections::HashSet::new();
        for (i, pool) in self.pools.iter().enumerate() {
            if !targets.insert(pool.target.as_str()) {
                return bad(
                    &format!("pools[{i}].target"),
                    format!("target `{}` appears twice", pool.target),
                );
            }
            self.check_pool(i, pool, rollout_only)?;
        }
        Ok(())
    }

    /// One pool: its id, node counts, task slots, resize timeout and node agent SKU.
    fn check_pool(&self, i: usize, pool: &PoolSpec, rollout_only: bool) -> Result<(), (String, String)> {
        let bad = |key: &str, message: String| Err((key.to_string(), message));
        let key = |k: &str| format!("pools[{i}].{k}");
        let sample = render_name(&pool.id, &self.name, &pool.target, "2026.1231.99");
        if !pool_id_ok(&sample) {
            return bad(
                &key("id"),
                format!("`{}` gives pool id `{sample}`: 1–64 letters, digits, `-`, `_`", pool.id),
            );
        }
        match pool.dedicated_nodes.checked_add(pool.low_priority_nodes) {
            Some(0) => return bad(&key("dedicated_nodes"), "a pool needs at least one node".into()),
            Some(n) if n <= MAX_POOL_NODES => {}
            _ => {
                return bad(
                    &key("dedicated_nodes"),
                    format!(
                        "{} dedicated and {} low-priority nodes: at most {MAX_POOL_NODES} in all",
                        pool.dedicated_nodes, pool.low_priority_nodes
                    ),
                );
            }
        }
        if pool.task_slots_per_node > 256 {
            return bad(
                &key("task_slots_per_node"),
                format!("{} is above Batch's 256", pool.task_slots_per_node),
            );
        }
        if pool.resize_timeout != "auto" {
            match duration::parse(&pool.resize_timeout) {
                Err(e) => return bad(&key("resize_timeout"), format!("`auto` or a duration: {e}")),
                Ok(d) if d > MAX_WAIT => {
                    return bad(
                        &key("resize_timeout"),
                        format!("longer than {}", duration::format(MAX_WAIT)),
                    );
                }
                Ok(_) => {}
            }
        }
        if rollout_only && pool.node_agent_sku_id == "auto" {
            return bad(
                &key("node_agent_sku_id"),
                "`auto` reads the build VM's base image; a rollout of an existing version needs the SKU spelled out"
                    .into(),
            );
        }
        if pool.task_slots_per_node == 0 {
            return bad(&key("task_slots_per_node"), "must be at least 1".into());
        }
        Ok(())
    }

    /// Every run names what it makes after its version, so no two runs make, adopt or delete the
    /// same image or pool (a name without `{version}` would have each night overwrite the last).
    fn check_names(&self) -> Result<(), (String, String)> {
        let bad = |key: String, message: String| Err((key, message));
        if let Some(image) = &self.image
            && !image.name.contains("{version}")
        {
            return bad(
                "image.name".into(),
                format!(
                    "`{}` must contain `{{version}}`: each run names its own image",
                    image.name
                ),
            );
        }
        for (i, pool) in self.pools.iter().enumerate() {
            if !pool.id.contains("{version}") {
                return bad(
                    format!("pools[{i}].id"),
                    format!("`{}` must contain `{{version}}`: each run makes its own pool", pool.id),
                );
            }
            if self.pools.len() > 1 && !pool.id.contains("{target}") {
                return bad(
                    format!("pools[{i}].id"),
                    format!(
                        "`{}` must contain `{{target}}`: the pipeline has {} pools",
                        pool.id,
                        self.pools.len()
                    ),
                );
            }
        }
        Ok(())
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// toml's messages say what went wrong; pull a key name out where it names one.
fn split_toml_message(message: &str) -> (String, String) {
    let key = message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("unknown field"))
        .unwrap_or("-")
        .to_string();
    (key, message.trim().to_string())
}

/// The key path (`gallery.id`, `pools[1].vm_size`) whose value is written at `offset`, if any.
/// `text` when it is a bare TOML key (letters, digits, `_`, `-`, dotted), as an error's span may
/// cover.
fn bare_key(text: &str) -> Option<String> {
    let text = text.trim();
    let bare = !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    bare.then(|| text.to_string())
}

fn key_at(text: &str, offset: usize) -> Option<String> {
    use toml::de::{DeTable, DeValue};
    fn walk(value: &DeValue<'_>, span: std::ops::Range<usize>, path: String, offset: usize) -> Option<String> {
        let inner = match value {
            DeValue::Table(table) => table.iter().find_map(|(k, v)| {
                let name = k.get_ref().as_ref();
                let path = if path.is_empty() {
                    name.to_string()
                } else {
                    format!("{path}.{name}")
                };
                walk(v.get_ref(), v.span(), path, offset)
            }),
            DeValue::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, item)| walk(item.get_ref(), item.span(), format!("{path}[{i}]"), offset)),
            _ => None,
        };
        inner.or_else(|| (!path.is_empty() && span.contains(&offset)).then_some(path))
    }
    let doc = DeTable::parse(text).ok()?;
    walk(
        &DeValue::Table(doc.get_ref().clone()),
        doc.span(),
        String::new(),
        offset,
    )
}

/// The line where a key path like `pools[1].resize_timeout` is written, if it is.
fn locate(text: &str, key: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let doc = DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut span = None;
    let parts: Vec<&str> = key.split('.').collect();
    for (n, part) in parts.iter().enumerate() {
        let (name, index) = match part.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (*part, None),
        };
        let (k, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name)?;
        span = Some(k.span());
        let value = match (v.get_ref(), index) {
            (DeValue::Array(items), Some(i)) => {
                let item = items.get(i)?;
                span = Some(item.span());
                item.get_ref()
            }
            (other, _) => other,
        };
        match value {
            DeValue::Table(t) => table = t,
            _ if n + 1 == parts.len() => {}
            _ => break,
        }
    }
    span.map(|s| line_of(text, s.start))
}

/// The storage types a gallery image version's replicas may use
/// (`storageAccountType`, GalleryRP 2024-03-03).
const STORAGE_ACCOUNT_TYPES: [&str; 4] = ["Standard_LRS", "Standard_ZRS", "Premium_LRS", "PremiumV2_LRS"];

fn check_storage_type(key: &str, value: &str) -> Result<(), (String, String)> {
    if STORAGE_ACCOUNT_TYPES.contains(&value) {
        return Ok(());
    }
    Err((
        key.to_string(),
        format!(
            "`{}` is not a storage account type: {}",
            crate::model::text::shorten(value, 40),
            STORAGE_ACCOUNT_TYPES.join(", ")
        ),
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small nightly spec; the runtime's tests use it too.
    pub const NIGHTLY: &str = r#"
name = "nightly-ubuntu"

[source]
vm = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg-imaging/providers/Microsoft.Compute/virtualMachines/build-ubuntu-2204"

[image]
resource_group = "rg-imaging"
region = "westeurope"

[gallery]
id = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg-gallery/providers/Microsoft.Compute/galleries/sigrun_gallery"

[definition]
name = "ubuntu-2204-batch"
os_type = "Linux"
publisher = "sigrun"
offer = "ubuntu"
sku = "2204-batch"

[publish]
end_of_life = "90d"
regions = [
  { name = "westeurope" },
  { name = "eastus", replicas = 2 },
]

[[pools]]
target = "render"
account = "/subscriptions/22222222-2222-4222-8222-222222222222/resourceGroups/rg-batch/providers/Microsoft.Batch/batchAccounts/sigrunweu"
vm_size = "Standard_D4s_v5"
dedicated_nodes = 2000
resize_timeout = "auto"
"#;

    fn parse(text: &str) -> Result<PipelineSpec, SpecError> {
        PipelineSpec::parse(text, "p.toml")
    }

    #[test]
    fn a_nightly_spec_parses_with_defaults() {
        let spec = parse(NIGHTLY).unwrap();
        assert_eq!(spec.version.scheme, VersionScheme::Nightly);
        assert_eq!(spec.publish.regions[0].replicas, Replicas::Auto);
        assert_eq!(spec.publish.regions[1].replicas, Replicas::Count(2));
        assert_eq!(spec.publish.end_of_life, Some(Duration::from_secs(90 * 86_400)));
        assert!(spec.promotion.gated);
        assert_eq!(spec.pools[0].id, "{pipeline}-{target}-{version}");
    }

    #[test]
    fn unknown_keys_name_file_line_and_key() {
        let text = NIGHTLY.replace("vm_size = ", "vm_sise = \"x\"\nvm_size = ");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.file, "p.toml");
        assert_eq!(err.key, "vm_sise");
        assert_eq!(
            err.line,
            Some(text.lines().position(|l| l.starts_with("vm_sise")).unwrap() + 1)
        );
    }

    #[test]
    fn bad_values_name_their_key_and_line() {
        let text = NIGHTLY.replace("resize_timeout = \"auto\"", "resize_timeout = \"soon\"");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "pools[0].resize_timeout");
        assert_eq!(
            err.line,
            Some(text.lines().position(|l| l.starts_with("resize_timeout")).unwrap() + 1)
        );

        let text = NIGHTLY.replace(
            "sku = \"2204-batch\"",
            "sku = \"2204-batch\"\nos_state = \"Specialized\"",
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "definition.os_state");
        assert!(err.message.contains("Generalized"));

        let text = NIGHTLY.replace("galleries/sigrun_gallery", "galleries/sigrun-gallery");
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("no dashes"), "{err}");
        assert_eq!(err.key, "gallery.id");
        assert!(err.line.is_some());

        let text = NIGHTLY.replace("replicas = 2", "replicas = 0");
        assert_eq!(parse(&text).unwrap_err().key, "publish.regions[1].replicas");

        let text = NIGHTLY.replace("[publish]", "[publish]\nstorage_account_type = \"Floppy_Disk\"");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "publish.storage_account_type");
        assert!(
            err.message.contains("Floppy_Disk") && err.message.contains("Premium_LRS"),
            "{err}"
        );
    }

    #[test]
    fn every_run_names_its_own_image_and_pools() {
        let text = NIGHTLY.replace("[[pools]]", "[[pools]]\nid = \"render-pool\"");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "pools[0].id");
        assert!(err.message.contains("{version}"), "{err}");
        let text = NIGHTLY.replace("[image]", "[image]\nname = \"golden\"");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "image.name");
        assert!(err.message.contains("{version}"), "{err}");
        let second = "\n[[pools]]\ntarget = \"sim\"\naccount = \"/subscriptions/22222222-2222-4222-8222-222222222222/resourceGroups/rg-batch/providers/Microsoft.Batch/batchAccounts/sigrunweu\"\nvm_size = \"Standard_D4s_v5\"\ndedicated_nodes = 2\nid = \"pool-{version}\"\n";
        let err = parse(&format!("{NIGHTLY}{second}")).unwrap_err();
        assert_eq!(err.key, "pools[1].id");
        assert!(err.message.contains("{target}"), "{err}");
    }

    #[test]
    fn node_counts_and_waits_are_bounded_without_wrapping() {
        let text = NIGHTLY.replace(
            "dedicated_nodes = 2000",
            "dedicated_nodes = 4294967295\nlow_priority_nodes = 2",
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key, "pools[0].dedicated_nodes");
        assert!(err.message.contains("at most 100000"), "{err}");
        let text = NIGHTLY.replace("resize_timeout = \"auto\"", "resize_timeout = \"999999999999999999d\"");
        assert_eq!(parse(&text).unwrap_err().key, "pools[0].resize_timeout");
        let text = NIGHTLY.replace("resize_timeout = \"auto\"", "resize_timeout = \"31d\"");
        assert!(parse(&text).unwrap_err().message.contains("longer than 30d"));
    }

    #[test]
    fn durations() {
        assert_eq!(duration::parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(duration::parse("3650d"), Ok(duration::MAX));
        for absurd in [
            "3651d",
            "3000000d",
            "999999999999999999d",
            "99999999999999999999999s",
            "3650d1s",
        ] {
            let err = duration::parse(absurd).unwrap_err();
            assert!(err.contains("longer than 3650d"), "{absurd}: {err}");
        }
        assert!(duration::parse("15").is_err());
        assert!(duration::parse("3y").is_err());
        assert_eq!(duration::format(Duration::from_secs(7200)), "2h");
        assert_eq!(
            render_name("{pipeline}-{target}-{version}", "n", "t", "2026.1126.0"),
            "n-t-2026-1126-0"
        );
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    #[test]
    fn the_shipped_pipelines_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                PipelineSpec::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 3, "nightly, windows and rollout pipelines ship");
    }
}

//! From a spec file to a checked plan (shared by `run`, `validate` and `submit`; the work is
//! `admission`'s), and the plan printed the way `terraform plan` prints one: what will be
//! created, with the numbers the rules decided.

use std::fmt::Write;
use std::path::Path;

use crate::admission::{self, PrepareError, RunRequest};
use crate::model::envelope::Stage;
use crate::model::plan::{BuildPlan, Plan, PoolPlan, RegionPlan};
use crate::model::spec::{PipelineSpec, duration};

pub use crate::admission::Prepared;

use super::input_error;
use super::session::Session;

/// Loads the spec at `path` and plans it (see [`admission::prepare`]). Bad input is an
/// [`input_error`] (exit 2); Azure unreadable just now is a plain error.
pub async fn prepare(path: &Path, request: &RunRequest, session: &Session) -> anyhow::Result<Prepared> {
    let spec = PipelineSpec::load(path).map_err(input_error)?;
    let origin = path.display().to_string();
    admission::prepare(spec, &origin, request, session.azure.as_ref())
        .await
        .map_err(|e| match e {
            PrepareError::Invalid(reason) => input_error(anyhow::anyhow!(reason)),
            transient @ PrepareError::Transient { .. } => anyhow::Error::new(transient),
        })
}

/// `--from STAGE` on the command line.
pub fn parse_stage(text: &str) -> Result<Stage, String> {
    Stage::parse(text).ok_or_else(|| {
        format!("unknown stage `{text}` (snapshot, image-create, gallery-publish, replicate, pool-create)")
    })
}

/// The stage the run starts at ([`admission::entry_stage`]); a start it cannot take is bad input.
pub fn entry_stage(from: Option<Stage>, prepared: &Prepared) -> anyhow::Result<Stage> {
    admission::entry_stage(from, prepared).map_err(|e| input_error(anyhow::anyhow!("--{e}")))
}

/// The plan as `terraform plan` would print it: `+` created, `~` created if missing or must exist,
/// `=` used as it is; then the rollout and the warnings.
pub fn render(spec: &PipelineSpec, plan: &Plan, path: &Path) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Plan for pipeline {} ({}), version {}",
        spec.name,
        path.display(),
        plan.version
    );
    if let Some(build) = &plan.build {
        render_build(&mut out, build);
    }
    render_gallery(&mut out, spec, plan);
    render_version(&mut out, plan);
    for region in &plan.regions {
        render_region(&mut out, spec, region);
    }
    for pool in &plan.pools {
        render_pool(&mut out, pool);
    }
    for quota in &plan.quota_use {
        let _ = writeln!(
            out,
            "  Batch account {} {}: {} in use + {} planned of {} (headroom after: {})",
            quota.account,
            quota.quota,
            quota.in_use,
            quota.adds,
            quota.limit,
            quota.headroom_after()
        );
    }
    let _ = writeln!(
        out,
        "  rollout: previous pool of each target is {}",
        match spec.rollout.previous_pool {
            crate::model::spec::PreviousPool::Keep => "kept",
            crate::model::spec::PreviousPool::ScaleToZero => "scaled to zero",
            crate::model::spec::PreviousPool::Delete => "deleted",
        }
    );
    if !plan.warnings.is_empty() {
        let _ = writeln!(out, "Warnings:");
        for warning in &plan.warnings {
            let _ = writeln!(out, "  ! {warning}");
        }
    }
    out
}

/// A snapshot per disk of the build VM, then the managed image made from them.
fn render_build(out: &mut String, build: &BuildPlan) {
    for snapshot in &build.snapshots {
        let disk = match snapshot.lun {
            None => "OS disk".to_string(),
            Some(lun) => format!("data disk LUN {lun}"),
        };
        let _ = writeln!(
            out,
            "  + snapshot    {}  ({disk} {})",
            snapshot.id,
            snapshot.source.name()
        );
    }
    let _ = writeln!(
        out,
        "  + image       {}  ({}, {}, {})",
        build.image, build.os_type, build.hyper_v_generation, build.region
    );
}

/// The gallery and image definition the version goes into, and the subscriptions in which
/// `Microsoft.Batch` gets registered.
fn render_gallery(out: &mut String, spec: &PipelineSpec, plan: &Plan) {
    let gallery = if plan.create_gallery {
        "created if missing"
    } else {
        "must exist"
    };
    let _ = writeln!(
        out,
        "  ~ gallery     {}  ({gallery}, {})",
        plan.gallery, plan.gallery_region
    );
    let _ = writeln!(
        out,
        "  ~ definition  {}  ({} {}, Generalized, created if missing)",
        plan.definition,
        spec.definition.os_type.as_str(),
        spec.definition.hyper_v_generation
    );
    for subscription in &plan.register_batch_in {
        let _ = writeln!(out, "  + register    Microsoft.Batch in subscription {subscription}");
    }
}

/// The image version: published (and when it becomes latest), or an existing one rolled out.
fn render_version(out: &mut String, plan: &Plan) {
    if plan.build.is_none() {
        let _ = writeln!(
            out,
            "  = version     {}  (exists; rolled out as it is)",
            plan.version_id
        );
        return;
    }
    let promotion = if plan.publish_excluded && !plan.final_excluded {
        "excluded from latest until a pool verifies"
    } else if plan.final_excluded {
        "excluded from latest"
    } else {
        "latest at once"
    };
    let eol = plan
        .end_of_life
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .map(|t| format!(", end of life {t}"))
        .unwrap_or_default();
    let _ = writeln!(out, "  + version     {}  ({promotion}{eol})", plan.version_id);
}

/// A replica target region and why it has that many replicas.
fn render_region(out: &mut String, spec: &PipelineSpec, region: &RegionPlan) {
    let why = match region.replicas_asked {
        None => format!(
            "auto: {} nodes at {} per replica",
            region.nodes, spec.publish.nodes_per_replica
        ),
        Some(asked) if asked < region.replicas => format!("raised from {asked} for {} nodes", region.nodes),
        Some(_) => format!("as asked; {} nodes planned", region.nodes),
    };
    let _ = writeln!(
        out,
        "      {:<16} {:>3} replica(s), {}  ({why})",
        region.name, region.replicas, region.storage_account_type
    );
}

/// A pool to create: its account, region and nodes, then the settings the rules decided.
fn render_pool(out: &mut String, pool: &PoolPlan) {
    let _ = writeln!(
        out,
        "  + pool        {} in {} ({}): {} dedicated + {} low-priority × {}",
        pool.pool_id,
        pool.account.name(),
        pool.region,
        pool.dedicated_nodes,
        pool.low_priority_nodes,
        pool.vm_size
    );
    let _ = writeln!(
        out,
        "      node agent SKU {}, resizeTimeout {} (at least 15m per 1000 nodes)",
        pool.node_agent_sku_id,
        duration::format(std::time::Duration::from_secs(pool.resize_timeout_secs))
    );
}

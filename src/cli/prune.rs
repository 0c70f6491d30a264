//! `sigrun prune PIPELINE [--dry-run]`: the pipeline's retention on demand (old versions of its
//! definition, pools retired longer than the grace, in the accounts of its pools), for a fleet
//! adopting sigrun with leftovers or one whose runs have stopped. Prints each resource judged and
//! why, like `validate` prints a plan; `--dry-run` deletes nothing. It reads no run history, so a
//! version is kept while it is still being made, not while its run may still use it: prune while
//! no run of the pipeline is under way.

use std::fmt::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::input_error;
use super::session::Session;
use crate::azure::AzureApi;
use crate::model::spec::PipelineSpec;
use crate::stages::NoHistory;
use crate::stages::retention::{self, Policy, Verdict};

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The pipeline spec (TOML).
    pub pipeline: PathBuf,
    /// Print what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Settings file overlaid on the defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub async fn run(args: PruneArgs) -> anyhow::Result<ExitCode> {
    let spec = PipelineSpec::load(&args.pipeline).map_err(input_error)?;
    let definition = crate::planner::definition_id(&spec).map_err(input_error)?;
    let session = Session::open(args.config.as_deref()).await?;
    let azure: &dyn AzureApi = session.azure.as_ref();
    let survey = retention::survey_spec(azure, &definition, &spec, time::OffsetDateTime::now_utc()).await?;
    let verdicts = retention::judge(&survey, &Policy::of(&spec, None), &NoHistory);
    print!("{}", render(&spec, &verdicts, args.dry_run));
    if args.dry_run {
        return Ok(ExitCode::SUCCESS);
    }
    let mut deleted = Vec::new();
    let applied = retention::apply(azure, &definition, &verdicts, &mut deleted).await;
    println!("Deleted {} resource(s).", deleted.len());
    applied?;
    Ok(ExitCode::SUCCESS)
}

/// Each resource judged: `-` deleted (or would be), `=` kept; with why.
fn render(spec: &PipelineSpec, verdicts: &[Verdict], dry_run: bool) -> String {
    let mut out = String::new();
    let doing = if dry_run { "would delete" } else { "deletes" };
    let deletes = verdicts.iter().filter(|v| v.delete).count();
    let _ = writeln!(
        out,
        "Retention for pipeline {} (keep {} versions, pool grace {}): {doing} {deletes} of {}",
        spec.name,
        spec.retention.keep_versions,
        crate::model::spec::duration::format(spec.retention.pool_grace),
        verdicts.len()
    );
    for verdict in verdicts {
        let mark = if verdict.delete { '-' } else { '=' };
        let what = match verdict.kind {
            crate::events::DeletedKind::Pool => format!("pool {} ({})", verdict.name, verdict.account_url),
            kind => format!("{} {}", kind.as_str().replace('_', " "), verdict.name),
        };
        let _ = writeln!(out, "  {mark} {what}: {}", verdict.why);
    }
    out
}

//! `sigrun validate PIPELINE`: parses the spec, runs every preflight check against Azure (reads
//! only) and prints the plan — names to be created, replicas per region, resize timeouts, node
//! agent SKUs — with a warning for every value raised to the documented minimum.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::plan_view;
use super::session::Session;

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The pipeline spec (TOML).
    pub pipeline: PathBuf,
    /// Validate for this version instead of the one the scheme gives.
    #[arg(long)]
    pub version: Option<String>,
    /// Roll out this existing gallery image version (ARM id) instead of building.
    #[arg(long)]
    pub image_version_id: Option<String>,
    /// Settings file overlaid on the defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub async fn run(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let session = Session::open(args.config.as_deref()).await?;
    let request = crate::admission::RunRequest {
        version: args.version.clone(),
        image_version_id: args.image_version_id.clone(),
        image_id: None,
    };
    let prepared = plan_view::prepare(&args.pipeline, &request, &session).await?;
    print!("{}", plan_view::render(&prepared.spec, &prepared.plan, &args.pipeline));
    Ok(ExitCode::SUCCESS)
}

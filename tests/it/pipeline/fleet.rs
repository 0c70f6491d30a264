//! A season of nightlies against one emulator, its clock a day on between nights (the control
//! API's `advance`): what the runs leave behind must stay bounded by the pipeline's retention, and
//! without retention the account's pool quota must stop the nightly on the night it says.

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::*;

/// Consecutive nights of the retention test (the season).
const NIGHTS: u32 = 40;
/// Fast enough for 40 runs in CI: an emulated nightly takes a few seconds.
const FLEET_SCALE: f64 = 3000.0;
const DAY: f64 = 86_400.0;
const KEEP_VERSIONS: usize = 7;
const POOL_GRACE_DAYS: i64 = 3;

/// The shipped nightly with small pools (the season is about what is left, not allocation).
fn small_nightly(retention: bool) -> String {
    let text = edit(&nightly_text(), "dedicated_nodes = 2000", "dedicated_nodes = 8");
    let text = edit(&text, "dedicated_nodes = 150", "dedicated_nodes = 4");
    let text = edit(&text, "low_priority_nodes = 50", "low_priority_nodes = 2");
    if retention {
        text
    } else {
        edit(&text, "[retention]\n", "[retention]\nenabled = false\n")
    }
}

fn version_of(night: u32) -> String {
    format!("2026.{}.0", 1000 + night)
}

async fn fleet(pool_quota: Option<u32>) -> Azure {
    let mut world = sigrun::emulator::world::World::default_world();
    if let Some(quota) = pool_quota {
        for account in &mut world.batch_accounts {
            account.pool_quota = quota;
        }
    }
    azure_with(EmulatorOptions {
        time_scale: FLEET_SCALE,
        seed: 40,
        world,
        ..Default::default()
    })
    .await
}

impl Azure {
    /// An ARM collection (a definition's versions): its items.
    async fn arm_list(&self, path: &str, api: &str) -> Vec<Value> {
        let token = self.emu.arm_token().await;
        let url = format!("{}{path}?api-version={api}", self.emu.base());
        let reply = self.emu.get(&url, &token).await;
        assert_eq!(reply.status, 200, "GET {path}: {:?}", reply.body);
        reply.body["value"].as_array().cloned().unwrap_or_default()
    }

    async fn emulated_now(&self) -> OffsetDateTime {
        let url = format!("{}/clock", self.emu.emulator.info().control_url);
        let clock = self.emu.call(reqwest::Method::GET, &url, None, None).await.body;
        let now = clock["now"]
            .as_str()
            .unwrap_or_else(|| panic!("the clock says its time: {clock}"));
        OffsetDateTime::parse(now, &Rfc3339).expect("RFC 3339")
    }
}

#[tokio::test]
async fn forty_nightlies_leave_only_what_retention_keeps() {
    let az = fleet(None).await;
    let spec = az.pipeline("nightly.toml", &small_nightly(true));
    let mut deleted_images = 0;
    for night in 1..=NIGHTS {
        az.emu.advance(DAY).await;
        let run = az.run(&spec, &["--version", &version_of(night)]).await;
        run.code(0).stdout_has(": succeeded");
        run.check(
            !run.stdout.contains("QuotaReached") && !run.stderr.contains("QuotaReached"),
            "no quota error on any night",
        );
        run.stdout_has("Resources deleted:");
        deleted_images += run
            .stdout
            .lines()
            .filter(|l| l.trim_start().starts_with("image /"))
            .count();
    }
    assert_eq!(
        deleted_images, NIGHTS as usize,
        "each night deletes its own managed image"
    );

    // No snapshot or managed image of a succeeded run is left.
    let state = az.state().await;
    let left: Vec<String> = state["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str())
        .map(str::to_ascii_lowercase)
        .filter(|id| id.contains("/snapshots/") || id.contains("/providers/microsoft.compute/images/"))
        .collect();
    assert!(left.is_empty(), "intermediates left behind: {left:?}");

    // Versions: the newest K, plus those a pool uses.
    let names = live_versions(&az).await;
    let mut pools = az.pools("sigrunweu").await;
    pools.extend(az.pools("sigruneus").await);
    let used: Vec<String> = pools
        .iter()
        .filter_map(|p| p["virtualMachineConfiguration"]["imageReference"]["virtualMachineImageId"].as_str())
        .filter_map(|id| id.rsplit('/').next().map(str::to_string))
        .collect();
    let newest: Vec<String> = (NIGHTS + 1 - KEEP_VERSIONS as u32..=NIGHTS).map(version_of).collect();
    for name in &names {
        assert!(
            newest.contains(name) || used.contains(name),
            "version {name} is neither among the newest {KEEP_VERSIONS} nor used by a pool (versions: {names:?}, used: {used:?})"
        );
    }
    assert!(
        newest.iter().all(|v| names.contains(v)),
        "the newest {KEEP_VERSIONS} stay: {names:?}"
    );

    // Pools: the newest of each target, and retired ones within the grace (retention looks once
    // a night, so one may be a night past it).
    let now = az.emulated_now().await;
    let ours: Vec<&Value> = pools.iter().filter(|p| p["state"] != "deleting").collect();
    for pool in &ours {
        let id = pool["id"].as_str().unwrap_or_default();
        if id.ends_with(&version_of(NIGHTS).replace('.', "-")) {
            continue;
        }
        assert_eq!(pool["targetDedicatedNodes"], 0, "{id} is retired: {pool}");
        let since = pool["allocationStateTransitionTime"]
            .as_str()
            .expect("a transition time");
        let since = OffsetDateTime::parse(since, &Rfc3339).expect("RFC 3339");
        assert!(
            now - since <= time::Duration::days(POOL_GRACE_DAYS + 1),
            "{id} retired at {since}, past the grace at {now}"
        );
    }
    assert!(
        ours.len() <= 2 * (POOL_GRACE_DAYS as usize + 2),
        "at most a few nights of pools per target stay: {}",
        ours.len()
    );
}

#[tokio::test]
async fn without_retention_the_pool_quota_stops_the_nightly_on_the_night_it_says() {
    const QUOTA: u32 = 4;
    let az = fleet(Some(QUOTA)).await;
    let spec = az.pipeline("nightly.toml", &small_nightly(false));
    for night in 1..=QUOTA {
        az.emu.advance(DAY).await;
        az.run(&spec, &["--version", &version_of(night)]).await.code(0);
    }
    az.emu.advance(DAY).await;
    let refused = az.run(&spec, &["--version", &version_of(QUOTA + 1)]).await;
    refused
        .code(2)
        .stderr_has(&format!("poolQuota is {QUOTA} with {QUOTA} in use (headroom 0)"));

    // With retention, the same account takes every night: retired pools make room.
    let az = fleet(Some(QUOTA)).await;
    let spec = az.pipeline("nightly.toml", &small_nightly(true));
    let mut warned = false;
    for night in 1..=QUOTA + 3 {
        az.emu.advance(DAY).await;
        let run = az.run(&spec, &["--version", &version_of(night)]).await;
        run.code(0).stdout_has(": succeeded");
        warned |= run.stderr.contains("fits this plan only after retention");
    }
    assert!(warned, "a full account's plan says it fits only after retention");
}

/// Version names of the nightly definition that are not being deleted.
async fn live_versions(az: &Azure) -> Vec<String> {
    let versions = az
        .arm_list(&format!("{NIGHTLY_DEFINITION}/versions"), GALLERY_API)
        .await;
    let mut names: Vec<String> = versions
        .iter()
        .filter(|v| v["properties"]["provisioningState"] != "Deleting")
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn prune_applies_retention_to_leftovers_and_a_dry_run_changes_nothing() {
    let az = fleet(None).await;
    let kept = az.pipeline("kept.toml", &small_nightly(false));
    for night in 1..=4 {
        az.emu.advance(DAY).await;
        az.run(&kept, &["--version", &version_of(night)]).await.code(0);
    }
    az.emu.advance(2.0 * DAY).await;
    let text = edit(&small_nightly(true), "keep_versions = 7", "keep_versions = 1");
    let pruning = az.pipeline("prune.toml", &edit(&text, "pool_grace = \"3d\"", "pool_grace = \"1d\""));
    let prune = |dry: bool| {
        let mut args = vec![
            "prune".to_string(),
            pruning.clone(),
            "--config".into(),
            az.config.clone(),
        ];
        if dry {
            args.push("--dry-run".into());
        }
        async move {
            tokio::task::spawn_blocking(move || run_blocking(args))
                .await
                .expect("runner")
        }
    };
    let before = live_versions(&az).await;
    let pools_before = az.pools("sigrunweu").await.len();

    let dry = prune(true).await;
    dry.code(0).stdout_has("would delete 6 of");
    // Nights 1-3's pools were retired two days and more ago (grace 1d): they go; night 4's is the
    // newest of its target and stays. Every version is still used by a pool, so none goes yet.
    dry.stdout_has("- pool nightly-ubuntu-render-2026-1001-0");
    dry.stdout_has("= image version 2026.1001.0: pool nightly-ubuntu-render-2026-1001-0 uses it");
    dry.check(
        !dry.stdout.contains("render-2026-1004-0"),
        "the newest pool is not retention's",
    );
    assert_eq!(live_versions(&az).await, before, "a dry run deletes no version");
    assert_eq!(
        az.pools("sigrunweu").await.len(),
        pools_before,
        "a dry run deletes no pool"
    );

    prune(false).await.code(0).stdout_has("Deleted 6 resource(s).");
    // Once Batch has let the pools go, the versions they held are old and unused.
    az.emu.advance(600.0).await;
    let second = prune(false).await;
    second.code(0).stdout_has("Deleted 3 resource(s).");
    assert_eq!(live_versions(&az).await, [version_of(4)], "the newest version stays");
}

#[tokio::test]
async fn a_run_over_a_core_quota_fails_in_preflight_in_under_a_second_creating_nothing() {
    let az = azure(42, "").await;
    let text = edit(
        &nightly_with_sea_pool(),
        "dedicated_nodes = 10\n",
        "dedicated_nodes = 20\n",
    );
    let spec = az.pipeline("nightly-sea.toml", &text);
    let mark = az.mark().await;
    let run = az.run(&spec, &["--version", "2026.1126.9"]).await;
    run.code(2).stderr_has(
        "Batch account sigrunsea cannot take this plan: it needs 80 dedicated cores, dedicatedCoreQuota is 48 with 0 in use (headroom 48)",
    );
    run.check(
        run.wall < Duration::from_secs(1),
        format_args!("refused in preflight, not after replication: {:?}", run.wall),
    );
    let writes: Vec<String> = az
        .log_since(mark)
        .await
        .iter()
        .filter(|e| is_write(e))
        .map(method_path)
        .collect();
    run.check(writes.is_empty(), format_args!("nothing was created: {writes:?}"));
}

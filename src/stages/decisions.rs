//! The stages' decisions as a table: a message and what Azure holds go in, the step's outcome and
//! the writes it asked for come out. Azure is the in-memory [`FakeAzure`], so the whole table runs
//! in milliseconds without sockets; the wire (REST, the emulator's lifecycles) is tested in
//! `tests/it/stages.rs` and `tests/it/azure_client.rs`.

use std::time::Duration;

use time::OffsetDateTime;

use super::fake_azure::{FakeAzure, World};
use super::{NoHistory, Outcome, StageSettings, Step, StepContext, Tried};
use crate::azure::api::{
    DefinitionInfo, NodeCounts, OperationStatus, PoolInfo, RegionStatus, ResizeError, VersionInfo,
};
use crate::azure::{AllocationState, PoolState, ProvisioningState, RegistrationState, ReplicationState};
use crate::events::EventKind;
use crate::model::envelope::{Branch, Envelope, InFlight, Intermediate, Phase, PoolArtifact, Progress, Stage};
use crate::model::ids::{DiskId, ImageId, SnapshotId};
use crate::model::plan::{BuildPlan, Presence, Seen, SnapshotPlan};
use crate::runtime::testkit;

/// What a case expects of the step.
#[derive(Debug)]
enum Expect {
    /// Handed on to these stages, in order.
    Advance(&'static [Stage]),
    /// Waiting on this phase.
    Wait(Phase),
    /// The branch failed, the reason containing this.
    Fail(&'static str),
    /// The branch ended.
    Done,
}

struct Case {
    name: &'static str,
    stage: Stage,
    /// Shapes the message: branch, what it waits on, artifacts, plan.
    message: fn(&mut Envelope),
    /// What Azure holds when the step looks.
    azure: fn(&mut World, &Envelope),
    expect: Expect,
    /// The writes the step must ask for, in order (`*` alone: any).
    writes: &'static [&'static str],
}

/// "Now" for every case: a day after the run started.
fn now() -> OffsetDateTime {
    OffsetDateTime::UNIX_EPOCH + Duration::from_secs(86_400)
}

fn untouched(_: &mut Envelope) {}
fn empty(_: &mut World, _: &Envelope) {}

fn sub(message: &Envelope) -> String {
    message.plan.gallery.subscription().to_string()
}

/// A build of two disks: the OS disk and one data disk.
fn with_build(message: &mut Envelope) {
    let sub = sub(message);
    let disk = |name: &str| DiskId::new(&sub, "rg-imaging", &[name]).unwrap();
    let snapshot = |name: &str| SnapshotId::new(&sub, "rg-imaging", &[name]).unwrap();
    std::sync::Arc::make_mut(&mut message.plan).build = Some(BuildPlan {
        vm: None,
        snapshots: vec![
            SnapshotPlan {
                lun: None,
                source: disk("os"),
                id: snapshot("nightly-os"),
            },
            SnapshotPlan {
                lun: Some(0),
                source: disk("data0"),
                id: snapshot("nightly-data0"),
            },
        ],
        image: ImageId::new(&sub, "rg-imaging", &["nightly"]).unwrap(),
        region: "westeurope".into(),
        os_type: "Linux".into(),
        hyper_v_generation: "V2".into(),
        base_image: None,
    });
}

fn waiting_on(message: &mut Envelope, what: Phase, status_urls: &[&str]) {
    message.operation = Some(InFlight {
        what,
        status_urls: status_urls.iter().map(|u| u.to_string()).collect(),
        started: now(),
        not_before: now(),
        polls: 0,
        progress: Default::default(),
    });
}

/// A build whose snapshots are being copied, read from the snapshots themselves.
fn copying(message: &mut Envelope) {
    with_build(message);
    waiting_on(message, Phase::Snapshots, &[]);
}

/// A build whose image is being made, read from the image itself.
fn imaging(message: &mut Envelope) {
    with_build(message);
    waiting_on(message, Phase::Image, &[]);
}

fn snapshot_ids(message: &Envelope) -> Vec<SnapshotId> {
    let build = message.plan.build.as_ref().expect("the case has a build");
    build.snapshots.iter().map(|s| s.id.clone()).collect()
}

fn run_tags(message: &Envelope) -> crate::azure::api::Tags {
    super::common::tags(message)
}

fn other_run_tags() -> crate::azure::api::Tags {
    [("sigrun-run".to_string(), uuid::Uuid::new_v4().to_string())].into()
}

fn definition(os_state: &str) -> DefinitionInfo {
    DefinitionInfo {
        provisioning_state: ProvisioningState::Succeeded,
        os_type: "Linux".into(),
        os_state: os_state.into(),
        hyper_v_generation: "V2".into(),
        publisher: "sigrun".into(),
        offer: "ubuntu".into(),
        sku: "2204-batch".into(),
        tags: Default::default(),
    }
}

/// The gallery and its definition are there and succeeded; the image is made.
fn published_up_to_the_version(world: &mut World, message: &Envelope) {
    world.resource(&message.plan.gallery, ProvisioningState::Succeeded, Default::default());
    world.definitions.insert(
        message.plan.definition.to_string().to_ascii_lowercase(),
        definition("Generalized"),
    );
}

fn at_gallery_publish(message: &mut Envelope) {
    with_build(message);
    message.artifacts.image = message.plan.build.as_ref().map(|b| b.image.clone());
}

fn version(source: &str, replication: Vec<RegionStatus>) -> VersionInfo {
    VersionInfo {
        provisioning_state: ProvisioningState::Succeeded,
        exclude_from_latest: true,
        source: Some(source.into()),
        target_regions: vec![("westeurope".into(), 1), ("eastus".into(), 2)],
        replication,
        tags: Default::default(),
        published: None,
    }
}

fn region(name: &str, state: ReplicationState, progress: u8) -> RegionStatus {
    RegionStatus {
        region: name.into(),
        state,
        progress,
        details: String::new(),
    }
}

/// The `render` pool's branch after pool-create, its pool made `age` before now.
fn render_branch(message: &mut Envelope, age: Duration) {
    message.branch = Branch::Pool {
        region: "westeurope".into(),
        target: "render".into(),
    };
    let planned = message.plan.pools.iter().find(|p| p.target == "render").unwrap();
    message.artifacts.pool = Some(PoolArtifact {
        account: planned.account.clone(),
        account_url: planned.account_url.clone(),
        pool_id: planned.pool_id.clone(),
        created: now() - age,
    });
}

fn render_pool(message: &Envelope) -> PoolInfo {
    let planned = message.plan.pools.iter().find(|p| p.target == "render").unwrap();
    PoolInfo {
        id: planned.pool_id.clone(),
        vm_size: planned.vm_size.clone(),
        state: PoolState::Active,
        allocation_state: AllocationState::Steady,
        current_dedicated: planned.dedicated_nodes,
        current_low_priority: 0,
        target_dedicated: planned.dedicated_nodes,
        target_low_priority: 0,
        resize_errors: Vec::new(),
        metadata: [("sigrun-run".to_string(), message.run_id.to_string())].into(),
        image_id: Some(message.plan.version_id.to_string()),
        created: None,
        allocation_changed: None,
    }
}

fn cases() -> Vec<Case> {
    let mut cases = snapshot_cases();
    cases.extend(snapshot_look_cases());
    cases.extend(image_and_gallery_cases());
    cases.extend(gallery_rule_cases());
    cases.extend(replicate_cases());
    cases.extend(pool_cases());
    cases.extend(clean_up_cases());
    cases
}

/// A clean-up branch of the run's snapshots (the image exists).
fn cleaning_snapshots(message: &mut Envelope) {
    with_build(message);
    message.branch = Branch::CleanUp {
        what: Intermediate::Snapshots,
    };
    message.artifacts.snapshots = message.plan.build.as_ref().unwrap().snapshot_artifacts();
}

/// ... whose deletes were asked for on an earlier look.
fn deleting_snapshots(message: &mut Envelope) {
    cleaning_snapshots(message);
    waiting_on(message, Phase::Delete, &[]);
    message.artifacts.deleting = snapshot_ids(message).iter().map(ToString::to_string).collect();
}

fn clean_up_cases() -> Vec<Case> {
    vec![
        Case {
            name: "clean-up: the run's snapshots are deleted, then waited for",
            stage: Stage::ImageCreate,
            message: cleaning_snapshots,
            azure: |world, message| {
                for id in snapshot_ids(message) {
                    world.resource(&id, ProvisioningState::Succeeded, run_tags(message));
                }
            },
            expect: Expect::Wait(Phase::Delete),
            writes: &["delete_snapshot nightly-os", "delete_snapshot nightly-data0"],
        },
        Case {
            name: "clean-up: a snapshot another run made under the name is never deleted",
            stage: Stage::ImageCreate,
            message: cleaning_snapshots,
            azure: |world, message| {
                let ids = snapshot_ids(message);
                world.resource(&ids[0], ProvisioningState::Succeeded, other_run_tags());
                world.resource(&ids[1], ProvisioningState::Succeeded, run_tags(message));
            },
            expect: Expect::Wait(Phase::Delete),
            writes: &["delete_snapshot nightly-data0"],
        },
        Case {
            name: "clean-up: a delete under way is waited for, not asked again",
            stage: Stage::ImageCreate,
            message: deleting_snapshots,
            azure: |world, message| {
                let ids = snapshot_ids(message);
                world.resource(&ids[1], ProvisioningState::Deleting, run_tags(message));
            },
            expect: Expect::Wait(Phase::Delete),
            writes: &[],
        },
        Case {
            name: "clean-up: once Azure no longer finds them, the branch ends",
            stage: Stage::ImageCreate,
            message: deleting_snapshots,
            azure: empty,
            expect: Expect::Done,
            writes: &[],
        },
        Case {
            name: "clean-up: nothing of the run's left to delete ends at once",
            stage: Stage::Replicate,
            message: |message| {
                with_build(message);
                message.branch = Branch::CleanUp {
                    what: Intermediate::Image,
                };
                message.artifacts.image = Some(message.plan.build.as_ref().unwrap().image.clone());
            },
            azure: empty,
            expect: Expect::Done,
            writes: &[],
        },
    ]
}

fn snapshot_cases() -> Vec<Case> {
    vec![
        Case {
            name: "snapshot: a rollout of an existing version has nothing to copy",
            stage: Stage::Snapshot,
            message: untouched,
            azure: empty,
            expect: Expect::Fail("nothing to snapshot"),
            writes: &[],
        },
        Case {
            name: "snapshot: every disk is copied, then waited for",
            stage: Stage::Snapshot,
            message: with_build,
            azure: empty,
            expect: Expect::Wait(Phase::Snapshots),
            writes: &["put_snapshot nightly-os", "put_snapshot nightly-data0"],
        },
        Case {
            name: "snapshot: a copy this run made already is joined, not written again",
            stage: Stage::Snapshot,
            message: with_build,
            azure: |world, message| {
                let ids = snapshot_ids(message);
                world.resource(&ids[0], ProvisioningState::Creating, run_tags(message));
            },
            expect: Expect::Wait(Phase::Snapshots),
            writes: &["put_snapshot nightly-data0"],
        },
        Case {
            name: "snapshot: another run's snapshot of the same name is written over",
            stage: Stage::Snapshot,
            message: with_build,
            azure: |world, message| {
                let ids = snapshot_ids(message);
                world.resource(&ids[0], ProvisioningState::Succeeded, other_run_tags());
            },
            expect: Expect::Wait(Phase::Snapshots),
            writes: &["put_snapshot nightly-os", "put_snapshot nightly-data0"],
        },
        Case {
            name: "snapshot: all copies succeeded → image-create",
            stage: Stage::Snapshot,
            message: copying,
            azure: |world, message| {
                for id in snapshot_ids(message) {
                    world.resource(&id, ProvisioningState::Succeeded, run_tags(message));
                }
            },
            expect: Expect::Advance(&[Stage::ImageCreate]),
            writes: &[],
        },
    ]
}

/// Snapshot's looks at copies under way.
fn snapshot_look_cases() -> Vec<Case> {
    vec![
        Case {
            name: "snapshot: one copy still running → wait",
            stage: Stage::Snapshot,
            message: copying,
            azure: |world, message| {
                let ids = snapshot_ids(message);
                world.resource(&ids[0], ProvisioningState::Succeeded, run_tags(message));
                world.resource(&ids[1], ProvisioningState::Creating, run_tags(message));
            },
            expect: Expect::Wait(Phase::Snapshots),
            writes: &[],
        },
        Case {
            name: "snapshot: a copy that reads Failed fails the branch (as a failed image does)",
            stage: Stage::Snapshot,
            message: copying,
            azure: |world, message| {
                let ids = snapshot_ids(message);
                world.resource(&ids[0], ProvisioningState::Succeeded, run_tags(message));
                world.resource(&ids[1], ProvisioningState::Failed, run_tags(message));
            },
            expect: Expect::Fail("snapshot nightly-data0 of the build VM failed"),
            writes: &[],
        },
        Case {
            name: "snapshot: a failed copy operation fails the branch with Azure's reason",
            stage: Stage::Snapshot,
            message: |m| {
                with_build(m);
                waiting_on(m, Phase::Snapshots, &["https://fake/op/1"]);
            },
            azure: |world, _| {
                world.operations.insert(
                    "https://fake/op/1".into(),
                    OperationStatus::Failed {
                        code: "DiskCopyFailed".into(),
                        message: "the source disk went away".into(),
                    },
                );
            },
            expect: Expect::Fail("the source disk went away"),
            writes: &[],
        },
    ]
}

fn image_and_gallery_cases() -> Vec<Case> {
    vec![
        Case {
            name: "image-create: the image reads Failed → the branch fails",
            stage: Stage::ImageCreate,
            message: imaging,
            azure: |world, message| {
                let image = &message.plan.build.as_ref().unwrap().image;
                world.resource(image, ProvisioningState::Failed, run_tags(message));
            },
            expect: Expect::Fail("managed image"),
            writes: &[],
        },
        Case {
            name: "image-create: the image succeeded → gallery-publish",
            stage: Stage::ImageCreate,
            message: imaging,
            azure: |world, message| {
                let image = &message.plan.build.as_ref().unwrap().image;
                world.resource(image, ProvisioningState::Succeeded, run_tags(message));
            },
            // ... and the snapshots, no longer needed, are cleaned up beside it.
            expect: Expect::Advance(&[Stage::GalleryPublish, Stage::ImageCreate]),
            writes: &[],
        },
        Case {
            name: "image-create: a pipeline that keeps its intermediates schedules no clean-up",
            stage: Stage::ImageCreate,
            message: |message| {
                imaging(message);
                std::sync::Arc::make_mut(&mut message.spec).retention.intermediates =
                    crate::model::spec::Intermediates::Keep;
            },
            azure: |world, message| {
                let image = &message.plan.build.as_ref().unwrap().image;
                world.resource(image, ProvisioningState::Succeeded, run_tags(message));
            },
            expect: Expect::Advance(&[Stage::GalleryPublish]),
            writes: &[],
        },
        Case {
            name: "gallery-publish: a missing gallery the spec may not create fails the branch",
            stage: Stage::GalleryPublish,
            message: |m| {
                at_gallery_publish(m);
                std::sync::Arc::make_mut(&mut m.plan).create_gallery = false;
            },
            azure: empty,
            expect: Expect::Fail("does not exist and the spec does not allow creating it"),
            writes: &[],
        },
        Case {
            name: "gallery-publish: a missing gallery is created, then waited for",
            stage: Stage::GalleryPublish,
            message: at_gallery_publish,
            azure: empty,
            expect: Expect::Wait(Phase::Gallery),
            writes: &["put_gallery sigrun_gallery"],
        },
    ]
}

/// gallery-publish's rules for what it finds there: the definition, the version, Batch's registration.
fn gallery_rule_cases() -> Vec<Case> {
    vec![
        Case {
            name: "gallery-publish: a Specialized definition is refused (Batch needs Generalized)",
            stage: Stage::GalleryPublish,
            message: at_gallery_publish,
            azure: |world, message| {
                published_up_to_the_version(world, message);
                world
                    .definitions
                    .values_mut()
                    .for_each(|d| d.os_state = "Specialized".into());
            },
            expect: Expect::Fail("Batch pools need a Generalized image"),
            writes: &[],
        },
        Case {
            name: "gallery-publish: a Windows definition does not take a Linux image",
            stage: Stage::GalleryPublish,
            message: at_gallery_publish,
            azure: |world, message| {
                published_up_to_the_version(world, message);
                world
                    .definitions
                    .values_mut()
                    .for_each(|d| d.os_type = "Windows".into());
            },
            expect: Expect::Fail("has osType Windows, the spec says Linux"),
            writes: &[],
        },
        Case {
            name: "gallery-publish: a version made from another source is never published over",
            stage: Stage::GalleryPublish,
            message: at_gallery_publish,
            azure: |world, message| {
                published_up_to_the_version(world, message);
                let key = message.plan.version_id.to_string().to_ascii_lowercase();
                world
                    .versions
                    .insert(key, version("/subscriptions/x/images/other", Vec::new()));
            },
            expect: Expect::Fail("a version cannot be published twice"),
            writes: &[],
        },
        Case {
            name: "gallery-publish: Microsoft.Batch is registered where a pool's account needs it",
            stage: Stage::GalleryPublish,
            message: |m| {
                at_gallery_publish(m);
                std::sync::Arc::make_mut(&mut m.plan).register_batch_in = vec![sub(m)];
            },
            azure: |world, message| {
                published_up_to_the_version(world, message);
                world.providers.insert(sub(message), RegistrationState::NotRegistered);
            },
            expect: Expect::Wait(Phase::Registration),
            writes: &["register_provider Microsoft.Batch 11111111-1111-4111-8111-111111111111"],
        },
        Case {
            name: "gallery-publish: the version is put and replicate takes over",
            stage: Stage::GalleryPublish,
            message: at_gallery_publish,
            azure: published_up_to_the_version,
            expect: Expect::Advance(&[Stage::Replicate]),
            writes: &["put_version 2026.1126.0"],
        },
    ]
}

fn replicate_cases() -> Vec<Case> {
    vec![
        Case {
            name: "replicate: a version that is gone fails the branch",
            stage: Stage::Replicate,
            message: untouched,
            azure: empty,
            expect: Expect::Fail("does not exist"),
            writes: &[],
        },
        Case {
            name: "replicate: a region still replicating is waited for",
            stage: Stage::Replicate,
            message: untouched,
            azure: |world, message| {
                let key = message.plan.version_id.to_string().to_ascii_lowercase();
                let regions = vec![
                    region("westeurope", ReplicationState::Replicating, 40),
                    region("eastus", ReplicationState::Unknown, 0),
                ];
                world.versions.insert(key, version("/x", regions));
            },
            expect: Expect::Wait(Phase::Replication),
            writes: &[],
        },
        Case {
            name: "replicate: every region replicated → a pool-create per pool, the trunk ends",
            stage: Stage::Replicate,
            message: untouched,
            azure: |world, message| {
                let key = message.plan.version_id.to_string().to_ascii_lowercase();
                let regions = vec![
                    region("westeurope", ReplicationState::Completed, 100),
                    region("eastus", ReplicationState::Completed, 100),
                ];
                world.versions.insert(key, version("/x", regions));
            },
            expect: Expect::Advance(&[Stage::PoolCreate, Stage::PoolCreate, Stage::PoolCreate]),
            writes: &[],
        },
    ]
}

fn pool_cases() -> Vec<Case> {
    vec![
        Case {
            name: "pool-create: the pool is added with the run's metadata → verify",
            stage: Stage::PoolCreate,
            message: |m| render_branch(m, Duration::ZERO),
            azure: empty,
            expect: Expect::Advance(&[Stage::Verify]),
            writes: &["add_pool nightly-ubuntu-render-2026-1126-0"],
        },
        Case {
            name: "pool-create: a pool of that id another run made is never taken over",
            stage: Stage::PoolCreate,
            message: |m| render_branch(m, Duration::ZERO),
            azure: |world, message| {
                let mut pool = render_pool(message);
                pool.metadata = other_run_tags();
                world.pools.insert(pool.id.clone(), pool);
            },
            expect: Expect::Fail("sigrun never takes over a pool it did not create"),
            writes: &["add_pool nightly-ubuntu-render-2026-1126-0"],
        },
        Case {
            name: "verify: a pool past its deadline fails the branch",
            stage: Stage::Verify,
            message: |m| render_branch(m, Duration::from_secs(30 * 86_400)),
            azure: empty,
            expect: Expect::Fail("did not verify within"),
            writes: &[],
        },
        Case {
            name: "verify: a pool that disappeared fails the branch",
            stage: Stage::Verify,
            message: |m| render_branch(m, Duration::from_secs(600)),
            azure: empty,
            expect: Expect::Fail("disappeared before it verified"),
            writes: &[],
        },
        Case {
            name: "verify: an allocation that ended with a resize error fails the branch",
            stage: Stage::Verify,
            message: |m| render_branch(m, Duration::from_secs(600)),
            azure: |world, message| {
                let mut pool = render_pool(message);
                pool.current_dedicated = 1200;
                pool.resize_errors = vec![ResizeError {
                    code: "AccountCoreQuotaReached".into(),
                    message: "the account's core quota is reached".into(),
                }];
                world.pools.insert(pool.id.clone(), pool);
            },
            expect: Expect::Fail("AccountCoreQuotaReached"),
            writes: &[],
        },
        Case {
            name: "verify: a steady pool whose nodes are still starting is waited for",
            stage: Stage::Verify,
            message: |m| render_branch(m, Duration::from_secs(600)),
            azure: |world, message| {
                let pool = render_pool(message);
                let counts = NodeCounts {
                    by_state: [("starting".to_string(), pool.current_dedicated)].into(),
                    total: pool.current_dedicated,
                };
                world.node_counts.insert(pool.id.clone(), counts);
                world.pools.insert(pool.id.clone(), pool);
            },
            expect: Expect::Wait(Phase::Nodes),
            writes: &[],
        },
    ]
}

/// What a decision test's step sees: `azure`, the test's `now`, no other runs.
fn context<'a>(azure: &'a FakeAzure, settings: &'a StageSettings) -> StepContext<'a> {
    StepContext {
        azure,
        now: now(),
        settings,
        runs: &NoHistory,
        tried: Tried::Maybe,
    }
}

/// Runs one case's step against its own fake Azure.
async fn step_of(case: &Case) -> (Step, FakeAzure) {
    run_step(case.name, case.stage, case.message, case.azure, Tried::Maybe).await
}

/// Runs one step of `stage` on the message `shape` makes, against a fake Azure holding what
/// `world` puts there, told `tried`.
async fn run_step(
    name: &str,
    stage: Stage,
    shape: fn(&mut Envelope),
    world: fn(&mut World, &Envelope),
    tried: Tried,
) -> (Step, FakeAzure) {
    let mut message = testkit::envelope(stage);
    shape(&mut message);
    let azure = FakeAzure::default();
    world(&mut azure.world(), &message);
    let settings = StageSettings::default();
    let ctx = StepContext {
        tried,
        ..context(&azure, &settings)
    };
    let step = super::step(message, &ctx)
        .await
        .unwrap_or_else(|e| panic!("{name}: the step failed on Azure: {e}"));
    (step, azure)
}

/// How `step` differs from what `case` expects, if it does.
fn mismatch(case: &Case, step: &Step, azure: &FakeAzure) -> Option<String> {
    let outcome_ok = decided_as(&case.expect, &step.outcome);
    let writes = &azure.world().writes;
    let writes_ok = case.writes == ["*"] || writes.iter().map(String::as_str).eq(case.writes.iter().copied());
    (!outcome_ok || !writes_ok).then(|| {
        format!(
            "{}\n  expected {:?} with writes {:?}\n  got {} with writes {writes:?}",
            case.name,
            case.expect,
            case.writes,
            summary(&step.outcome)
        )
    })
}

/// Whether `outcome` is what `expect` says.
fn decided_as(expect: &Expect, outcome: &Outcome) -> bool {
    match (expect, outcome) {
        (Expect::Advance(stages), Outcome::Advance(next)) => next.iter().map(|m| m.stage).eq(stages.iter().copied()),
        (Expect::Wait(phase), Outcome::Wait { message, .. }) => {
            message.operation.as_ref().map(|op| op.what) == Some(*phase)
        }
        (Expect::Fail(reason), Outcome::Fail(said)) => said.contains(reason),
        (Expect::Done, Outcome::Done) => true,
        _ => false,
    }
}

/// An outcome in the words of [`Expect`] (a whole envelope is pages long).
fn summary(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Advance(next) => format!("Advance({:?})", next.iter().map(|m| m.stage).collect::<Vec<_>>()),
        Outcome::Wait { message, delay, .. } => {
            format!("Wait({:?}, {delay:?})", message.operation.as_ref().map(|op| op.what))
        }
        Outcome::Done => "Done".into(),
        Outcome::Fail(reason) => format!("Fail({reason:?})"),
    }
}

#[tokio::test]
async fn every_stage_decides_as_its_rules_say() {
    let mut wrong = Vec::new();
    for case in cases() {
        let (step, azure) = step_of(&case).await;
        wrong.extend(mismatch(&case, &step, &azure));
    }
    assert!(
        wrong.is_empty(),
        "{} cases decided otherwise:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// A case of what a step reads before it writes, on its state's first try or after one.
struct TryCase {
    name: &'static str,
    stage: Stage,
    tried: Tried,
    message: fn(&mut Envelope),
    azure: fn(&mut World, &Envelope),
    expect: Expect,
    /// The names of the resources the step records as created.
    created: &'static [&'static str],
    reads: &'static [&'static str],
    writes: &'static [&'static str],
}

/// The image-create message the snapshot stage sends on.
fn snapshotted(message: &mut Envelope) {
    with_build(message);
    message.artifacts.snapshots = message.plan.build.as_ref().unwrap().snapshot_artifacts();
}

/// A nightly run: its version was absent when planned, its definition there and ready.
fn as_planned_nightly(message: &mut Envelope) {
    std::sync::Arc::make_mut(&mut message.plan).seen = Seen {
        definition: Presence::Present,
        version: Presence::Absent,
    };
}

/// A nightly's first message: the build, as planned.
fn nightly_build(message: &mut Envelope) {
    with_build(message);
    as_planned_nightly(message);
}

/// A nightly at gallery-publish, as planned.
fn nightly_at_gallery_publish(message: &mut Envelope) {
    at_gallery_publish(message);
    as_planned_nightly(message);
}

/// snapshot's and image-create's reads before their writes.
fn create_try_cases() -> Vec<TryCase> {
    vec![
        TryCase {
            name: "snapshot, first try of a nightly: every disk is copied without a read",
            stage: Stage::Snapshot,
            tried: Tried::Never,
            message: nightly_build,
            azure: empty,
            expect: Expect::Wait(Phase::Snapshots),
            created: &["nightly-os", "nightly-data0"],
            reads: &[],
            writes: &["put_snapshot nightly-os", "put_snapshot nightly-data0"],
        },
        TryCase {
            name: "snapshot, first try of a version named by hand: it may be published already",
            stage: Stage::Snapshot,
            tried: Tried::Never,
            message: with_build,
            azure: empty,
            expect: Expect::Wait(Phase::Snapshots),
            created: &["nightly-os", "nightly-data0"],
            reads: &["get_version 2026.1126.0"],
            writes: &["put_snapshot nightly-os", "put_snapshot nightly-data0"],
        },
        TryCase {
            name: "snapshot, after a try: the version and each snapshot are looked for first",
            stage: Stage::Snapshot,
            tried: Tried::Maybe,
            message: nightly_build,
            azure: empty,
            expect: Expect::Wait(Phase::Snapshots),
            created: &["nightly-os", "nightly-data0"],
            reads: &[
                "get_version 2026.1126.0",
                "get_snapshot nightly-os",
                "get_snapshot nightly-data0",
            ],
            writes: &["put_snapshot nightly-os", "put_snapshot nightly-data0"],
        },
        TryCase {
            name: "image-create, first try: the image is written without a read",
            stage: Stage::ImageCreate,
            tried: Tried::Never,
            message: snapshotted,
            azure: empty,
            expect: Expect::Wait(Phase::Image),
            created: &["nightly"],
            reads: &[],
            writes: &["put_image nightly"],
        },
        TryCase {
            name: "image-create, after a try: the image is looked for first",
            stage: Stage::ImageCreate,
            tried: Tried::Maybe,
            message: snapshotted,
            azure: empty,
            expect: Expect::Wait(Phase::Image),
            created: &["nightly"],
            reads: &["get_image nightly"],
            writes: &["put_image nightly"],
        },
    ]
}

/// gallery-publish's reads before its writes.
fn gallery_try_cases() -> Vec<TryCase> {
    vec![
        TryCase {
            name: "gallery-publish, first try of a nightly: the planner's reading stands",
            stage: Stage::GalleryPublish,
            tried: Tried::Never,
            message: nightly_at_gallery_publish,
            azure: published_up_to_the_version,
            expect: Expect::Advance(&[Stage::Replicate]),
            created: &["2026.1126.0"],
            reads: &[],
            writes: &["put_version 2026.1126.0"],
        },
        TryCase {
            name: "gallery-publish, first try, no definition when planned: created without a read",
            stage: Stage::GalleryPublish,
            tried: Tried::Never,
            message: |m| {
                at_gallery_publish(m);
                std::sync::Arc::make_mut(&mut m.plan).seen.definition = Presence::Absent;
            },
            azure: |world, message| {
                world.resource(&message.plan.gallery, ProvisioningState::Succeeded, Default::default());
            },
            expect: Expect::Wait(Phase::Definition),
            created: &["ubuntu-2204-batch"],
            reads: &["get_gallery sigrun_gallery"],
            writes: &["put_definition ubuntu-2204-batch"],
        },
        TryCase {
            name: "gallery-publish, first try after a look at the definition: it is read again",
            stage: Stage::GalleryPublish,
            tried: Tried::Never,
            message: |m| {
                at_gallery_publish(m);
                std::sync::Arc::make_mut(&mut m.plan).seen.definition = Presence::Absent;
                waiting_on(m, Phase::Definition, &[]);
            },
            azure: published_up_to_the_version,
            expect: Expect::Advance(&[Stage::Replicate]),
            created: &["2026.1126.0"],
            reads: &[
                "get_gallery sigrun_gallery",
                "get_definition ubuntu-2204-batch",
                "get_version 2026.1126.0",
            ],
            writes: &["put_version 2026.1126.0"],
        },
        TryCase {
            name: "gallery-publish, after a try: everything is read again",
            stage: Stage::GalleryPublish,
            tried: Tried::Maybe,
            message: nightly_at_gallery_publish,
            azure: published_up_to_the_version,
            expect: Expect::Advance(&[Stage::Replicate]),
            created: &["2026.1126.0"],
            reads: &[
                "get_gallery sigrun_gallery",
                "get_definition ubuntu-2204-batch",
                "get_version 2026.1126.0",
            ],
            writes: &["put_version 2026.1126.0"],
        },
        TryCase {
            name: "gallery-publish, first try, a definition made since the plan: read after its PUT, not recorded",
            stage: Stage::GalleryPublish,
            tried: Tried::Never,
            message: |m| {
                at_gallery_publish(m);
                std::sync::Arc::make_mut(&mut m.plan).seen.definition = Presence::Absent;
            },
            azure: |world, message| {
                published_up_to_the_version(world, message);
                world.resource(&message.plan.definition, ProvisioningState::Succeeded, other_run_tags());
            },
            expect: Expect::Advance(&[Stage::Replicate]),
            created: &["2026.1126.0"],
            reads: &[
                "get_gallery sigrun_gallery",
                "get_definition ubuntu-2204-batch",
                "get_version 2026.1126.0",
            ],
            writes: &["put_definition ubuntu-2204-batch", "put_version 2026.1126.0"],
        },
    ]
}

/// A step reads before it writes only what an earlier try, or a change since the plan, could
/// have made: on a first try it trusts the planner's reading and writes at once.
#[tokio::test]
async fn a_first_try_writes_without_reading_what_no_try_can_have_made() {
    let mut wrong = Vec::new();
    for case in create_try_cases().into_iter().chain(gallery_try_cases()) {
        let (step, azure) = run_step(case.name, case.stage, case.message, case.azure, case.tried).await;
        let world = azure.world();
        let recorded: Vec<&str> = step
            .events
            .iter()
            .filter_map(|e| match e {
                EventKind::ResourceCreated { id } => id.rsplit('/').next(),
                _ => None,
            })
            .collect();
        if !decided_as(&case.expect, &step.outcome)
            || recorded != case.created
            || world.reads != case.reads
            || world.writes != case.writes
        {
            wrong.push(format!(
                "{}\n  expected {:?} (created {:?}), reads {:?} writes {:?}\n  got {} (created {recorded:?}), reads {:?} writes {:?}",
                case.name,
                case.expect,
                case.created,
                case.reads,
                case.writes,
                summary(&step.outcome),
                world.reads,
                world.writes
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} cases read otherwise:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// The first look at a version the run has just made reads nothing: its source region's 0 % at
/// the moment it was made is the first reading, and the next look comes a poll later. After a
/// try, or at a version the run found rather than made, it reads.
#[tokio::test]
async fn replicates_first_look_at_a_version_just_made_takes_its_0_percent_as_read() {
    let settings = StageSettings::default();
    let mut message = testkit::envelope(Stage::Replicate);
    message.artifacts.recorded.push(message.plan.version_id.to_string());
    let azure = FakeAzure::default();
    let ctx = StepContext {
        tried: Tried::Never,
        ..context(&azure, &settings)
    };
    let step = super::step(message.clone(), &ctx).await.unwrap();
    assert!(azure.world().reads.is_empty(), "{:?}", azure.world().reads);
    let Outcome::Wait {
        message: next, delay, ..
    } = &step.outcome
    else {
        panic!("a wait, not {}", summary(&step.outcome))
    };
    assert_eq!(*delay, settings.default_poll());
    let op = next.operation.as_ref().expect("the look's operation");
    assert_eq!(op.what, Phase::Replication);
    let made = Progress {
        at: message.stage_started,
        percent: 0,
    };
    assert_eq!(op.progress.get("westeurope"), Some(&made), "the source region");
    assert_eq!(op.progress.len(), 1, "the other regions have not started");
    assert!(
        step.events
            .iter()
            .any(|e| matches!(e, EventKind::Waiting { what } if what == "replication")),
        "the branch is said to wait on replication: {:?}",
        step.events
    );

    for (tried, made_here) in [(Tried::Maybe, true), (Tried::Never, false)] {
        let mut message = testkit::envelope(Stage::Replicate);
        if made_here {
            message.artifacts.recorded.push(message.plan.version_id.to_string());
        }
        let azure = FakeAzure::default();
        let ctx = StepContext {
            tried,
            ..context(&azure, &settings)
        };
        let _ = super::step(message, &ctx).await.unwrap();
        assert_eq!(
            azure.world().reads,
            ["get_version 2026.1126.0"],
            "{tried:?}, made here: {made_here}"
        );
    }
}

#[tokio::test]
async fn a_clean_up_reports_each_resource_confirmed_gone_and_then_finishes() {
    use crate::events::DeletedKind;
    let case = &clean_up_cases()[3];
    let (step, _) = step_of(case).await;
    let deleted: Vec<&EventKind> = step
        .events
        .iter()
        .filter(|e| {
            matches!(
                e,
                EventKind::ResourceDeleted {
                    what: DeletedKind::Snapshot,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(deleted.len(), 2, "{:?}", step.events);
    assert_eq!(
        step.events.last(),
        Some(&EventKind::CleanUpFinished {
            what: Intermediate::Snapshots,
            failed: None
        })
    );
}

/// Snapshots this admission made are deleted at once, each exactly once, whatever order their
/// deletes end in: one confirmed gone on one look is not deleted again on the next.
#[tokio::test]
async fn a_clean_up_deletes_what_its_admission_made_once_and_confirms_each_gone() {
    use crate::events::EventKind;
    let mut message = testkit::envelope(Stage::ImageCreate);
    cleaning_snapshots(&mut message);
    let ids = snapshot_ids(&message);
    message.artifacts.recorded = ids.iter().map(ToString::to_string).collect();
    let azure = FakeAzure::default();
    let settings = StageSettings::default();
    let ctx = context(&azure, &settings);
    let mut gone = 0;
    // What each look finds: both there; the second gone and the first still deleting; both gone.
    // The first look finds them tagged as another run's: deleted all the same, so it never read
    // the tags the trunk vouched for.
    let looks = [
        (
            vec![ProvisioningState::Succeeded, ProvisioningState::Succeeded],
            other_run_tags(),
        ),
        (vec![ProvisioningState::Deleting], run_tags(&message)),
        (vec![], run_tags(&message)),
    ];
    for (there, tags) in looks {
        azure.world().resources.clear();
        for (id, state) in ids.iter().zip(there) {
            azure.world().resource(id, state, tags.clone());
        }
        let step = super::step(message.clone(), &ctx).await.expect("a look");
        gone += step
            .events
            .iter()
            .filter(|e| matches!(e, EventKind::ResourceDeleted { .. }))
            .count();
        match step.outcome {
            Outcome::Wait { message: next, .. } => message = *next,
            Outcome::Done => break,
            other => panic!("a wait or the end, got {other:?}"),
        }
    }
    assert_eq!(
        azure.world().writes,
        ["delete_snapshot nightly-os", "delete_snapshot nightly-data0"],
        "each deleted once, without a look at tags the trunk vouched for"
    );
    assert_eq!(gone, 2);
    assert!(
        message.artifacts.recorded.is_empty(),
        "{:?}",
        message.artifacts.recorded
    );
}

/// The look after the deletes comes when Azure says the slowest of them may be done, whether the
/// snapshot was deleted unread (made here) or read first: one look confirms them all; without a
/// hint, after the default poll; a hint of a day, after `poll_max`; of nothing, after `poll_min`.
#[tokio::test]
async fn a_clean_up_looks_again_when_its_slowest_delete_may_be_done() {
    let mut message = testkit::envelope(Stage::ImageCreate);
    cleaning_snapshots(&mut message);
    let ids = snapshot_ids(&message);
    message.artifacts.recorded = vec![ids[0].to_string()];
    let settings = StageSettings::default();
    for (hints, expected) in [
        (vec![24, 36], Duration::from_secs(36)),
        (vec![36, 24], Duration::from_secs(36)),
        (vec![], settings.default_poll()),
        (vec![86_400, 5], settings.poll_max),
        (vec![0, 0], settings.poll_min),
    ] {
        let azure = FakeAzure::default();
        for (id, secs) in ids.iter().zip(&hints) {
            let hint = Duration::from_secs(*secs);
            azure.world().delete_hints.insert(id.name().to_string(), hint);
        }
        for id in &ids {
            azure
                .world()
                .resource(id, ProvisioningState::Succeeded, run_tags(&message));
        }
        let step = super::step(message.clone(), &context(&azure, &settings))
            .await
            .expect("a look");
        match step.outcome {
            Outcome::Wait { delay, .. } => assert_eq!(delay, expected, "hints {hints:?}"),
            other => panic!("a wait, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_pool_is_added_as_planned_with_the_runs_metadata() {
    let case = &pool_cases()[0];
    let (_, azure) = step_of(case).await;
    let world = azure.world();
    let [added] = world.added_pools.as_slice() else {
        panic!("one pool added, got {:?}", world.added_pools);
    };
    assert_eq!(added.node_agent_sku_id, "batch.node.ubuntu 22.04");
    assert_eq!(added.resize_timeout, Duration::from_secs(900));
    assert!(added.metadata.contains_key("sigrun-run"), "{:?}", added.metadata);
    assert!(
        added.image.to_string().ends_with("/versions/2026.1126.0"),
        "{}",
        added.image
    );
}

/// A snapshot clean-up whose last four looks failed: one more counted failure ends it.
fn cleaning_after_four_failures() -> Envelope {
    let mut message = testkit::envelope(Stage::ImageCreate);
    cleaning_snapshots(&mut message);
    message.artifacts.side_effect_failures = 4;
    message
}

/// A side effect throttled by Azure (a 429 with Retry-After) waits the Retry-After out with a
/// `Throttled` event and counts no failure, so a busy subscription does not end a clean-up with
/// its intermediates left behind; an hour (Azure time) into its stage, throttles count again.
#[test]
fn a_side_effect_throttled_waits_without_counting_until_an_hour_into_its_stage() {
    use super::common::{SideEffectRetry, retry_side_effect};
    let mut message = cleaning_after_four_failures();
    let azure = FakeAzure::default();
    let settings = StageSettings::default();
    let ctx = context(&azure, &settings);
    message.stage_started = ctx.now - time::Duration::minutes(59);
    let throttled = crate::azure::AzureError {
        operation: "GET snapshot s".into(),
        status: Some(429),
        code: Some("TooManyRequests".into()),
        message: "The request is being throttled.".into(),
        request_id: None,
        retry_after: Some(Duration::from_secs(17)),
    };
    match retry_side_effect(message.clone(), Phase::Delete, &throttled, "deleting", &ctx) {
        SideEffectRetry::Again(step) => {
            assert_eq!(
                step.events.iter().map(EventKind::name).collect::<Vec<_>>(),
                ["throttled"]
            );
            match step.outcome {
                Outcome::Wait { message, delay, .. } => {
                    assert!(delay >= Duration::from_secs(17), "{delay:?}");
                    assert_eq!(message.artifacts.side_effect_failures, 4, "nothing counted");
                }
                other => panic!("{}", summary(&other)),
            }
        }
        SideEffectRetry::GiveUp => panic!("a throttle gave the clean-up up"),
    }
    message.stage_started = ctx.now - time::Duration::minutes(61);
    assert!(
        matches!(
            retry_side_effect(message, Phase::Delete, &throttled, "deleting", &ctx),
            SideEffectRetry::GiveUp
        ),
        "an hour in, the fifth throttle in a row counts and ends it"
    );
}

/// A side effect (a clean-up, the rollout) whose request the budget held back: it looks again once
/// the budget has room, with no `Retried` and no failure counted, however many times it happens
/// (five counted failures would end a clean-up with its intermediates left behind).
#[test]
fn a_side_effect_held_back_for_the_budget_is_no_failure() {
    use super::common::{SideEffectRetry, retry_side_effect};
    let message = cleaning_after_four_failures();
    let azure = FakeAzure::default();
    let settings = StageSettings::default();
    let ctx = context(&azure, &settings);
    let paced = crate::azure::AzureError::paced("DELETE snapshot s", Duration::from_secs(7));
    match retry_side_effect(message, Phase::Delete, &paced, "deleting", &ctx) {
        SideEffectRetry::Again(step) => {
            assert!(step.events.is_empty(), "no Retried: {:?}", step.events);
            match step.outcome {
                Outcome::Wait { message, delay, .. } => {
                    assert_eq!(delay, Duration::from_secs(7));
                    assert_eq!(message.artifacts.side_effect_failures, 4, "nothing counted");
                }
                other => panic!("{}", summary(&other)),
            }
        }
        SideEffectRetry::GiveUp => panic!("a paced request gave the clean-up up"),
    }
}

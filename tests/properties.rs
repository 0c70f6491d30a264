//! Property tests: every parser of outside input — pipeline specs, triggers, envelopes, settings
//! files, Azure resource ids, durations — and the planner are fed arbitrary input, and none may
//! panic: each answers with a value or a located error. The cases per property come from
//! `SIGRUN_PROPTEST_CASES` (default 10,000, what CI runs; more on demand).
//!
//! Besides wholly random text, the generators mutate valid inputs (the shipped nightly spec, a
//! real envelope, a trigger) field by field with hostile values — huge and negative numbers,
//! absurd durations, control characters, long strings — since that is where parsers break.
//! The planner runs against an in-process Azure that answers like the emulator's world (its logic
//! is under test here, not the wire).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use async_trait::async_trait;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sigrun::azure::api::*;
use sigrun::azure::{AzureApi, AzureError, RegistrationState};
use sigrun::model::envelope::Envelope;
use sigrun::model::ids::*;
use sigrun::model::spec::{PipelineSpec, duration};
use sigrun::planner::{self, PlanInputs};

fn cases() -> u32 {
    std::env::var("SIGRUN_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

fn nightly() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/nightly-ubuntu.toml"))
            .expect("the shipped nightly spec")
    })
}

/// Values a hostile or careless producer writes where a TOML value goes.
fn hostile_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        Just("4294967295".to_string()),
        Just("-1".to_string()),
        Just("1e300".to_string()),
        Just("nan".to_string()),
        "[0-9]{1,25}[smhd]".prop_map(|d| format!("\"{d}\"")),
        ".{0,40}".prop_map(|s| format!("{s:?}")),
        "[a-z]{0,10}".prop_map(|s| format!("\"{s}\"")),
        prop::collection::vec(any::<u8>(), 0..20)
            .prop_map(|b| format!("{:?}", String::from_utf8_lossy(&b).into_owned())),
        Just("\"\\u001b[31m\"".to_string()),
        (1usize..5000).prop_map(|n| format!("\"{}\"", "x".repeat(n))),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("true".to_string()),
    ]
}

/// The nightly spec with one `key = value` line's value replaced.
fn mutated_spec() -> impl Strategy<Value = String> {
    let lines: Vec<usize> = nightly()
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(" = ") && !l.trim_start().starts_with('#'))
        .map(|(i, _)| i)
        .collect();
    (prop::sample::select(lines), hostile_value(), any::<bool>()).prop_map(|(line, value, twice)| {
        let mut out: Vec<String> = nightly().lines().map(str::to_string).collect();
        let key = out[line].split(" = ").next().unwrap_or_default().to_string();
        out[line] = format!("{key} = {value}");
        if twice {
            out.insert(line + 1, format!("{key} = {value}"));
        }
        out.join("\n")
    })
}

#[test]
fn specs_parse_or_say_where_they_are_wrong() {
    let mut runner = runner();
    let strategy = prop_oneof![
        mutated_spec(),
        ".{0,400}",
        prop::collection::vec(any::<u8>(), 0..400).prop_map(|b| String::from_utf8_lossy(&b).into_owned())
    ];
    runner
        .run(&strategy, |text| {
            if let Err(error) = PipelineSpec::parse(&text, "p.toml") {
                prop_assert_eq!(&error.file, "p.toml");
                prop_assert!(!error.message.is_empty());
                prop_assert!(
                    error.to_string().len() < 20_000,
                    "an error of {} bytes",
                    error.to_string().len()
                );
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn durations_parse_within_their_bound_or_fail() {
    let mut runner = runner();
    runner
        .run(&"[0-9smhd ]{0,30}", |text| {
            if let Ok(d) = duration::parse(&text) {
                prop_assert!(d <= duration::MAX);
            }
            Ok(())
        })
        .unwrap();
}

fn trigger_json() -> impl Strategy<Value = Vec<u8>> {
    let field = prop_oneof![
        Just("pipeline"),
        Just("version"),
        Just("from"),
        Just("spec"),
        Just("image_version_id"),
        Just("v"),
        Just("specversion"),
        Just("type"),
        Just("data"),
    ];
    prop::collection::vec((field, hostile_value()), 0..6).prop_map(|fields| {
        let mut object = serde_json::Map::new();
        object.insert("v".into(), 1.into());
        object.insert("pipeline".into(), "nightly-ubuntu".into());
        for (key, value) in fields {
            let value = serde_json::from_str(&value).unwrap_or(serde_json::Value::String(value));
            object.insert(key.into(), value);
        }
        serde_json::to_vec(&object).unwrap()
    })
}

#[test]
fn triggers_parse_or_are_refused_with_a_bounded_reason() {
    let mut runner = runner();
    let strategy = (
        prop_oneof![trigger_json(), prop::collection::vec(any::<u8>(), 0..600)],
        prop::option::of(prop_oneof![
            Just("application/json".to_string()),
            Just("application/cloudevents+json".to_string()),
            ".{0,20}"
        ]),
    );
    runner
        .run(&strategy, |(body, content_type)| {
            if let Err(error) = sigrun::model::trigger::parse(&body, content_type.as_deref()) {
                prop_assert!(error.to_string().len() < 20_000);
            }
            Ok(())
        })
        .unwrap();
}

/// A first message of the nightly pipeline, as admission makes it.
fn sample_envelope() -> &'static serde_json::Value {
    static SAMPLE: OnceLock<serde_json::Value> = OnceLock::new();
    SAMPLE.get_or_init(|| {
        let tokio = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let spec = PipelineSpec::parse(nightly(), "nightly.toml").unwrap();
        let prepared = tokio
            .block_on(sigrun::admission::prepare(
                spec,
                "nightly.toml",
                &sigrun::admission::RunRequest::default(),
                &World,
            ))
            .unwrap_or_else(|e| panic!("the nightly plans: {e}"));
        let firsts = sigrun::admission::first_messages(
            &prepared,
            sigrun::model::envelope::Stage::Snapshot,
            &sigrun::model::trace::TraceParent::new(),
        );
        serde_json::from_slice(&firsts[0].encode()).unwrap()
    })
}

#[test]
fn envelopes_decode_or_are_refused() {
    let mut runner = runner();
    let keys: Vec<String> = sample_envelope().as_object().unwrap().keys().cloned().collect();
    let mutated = (prop::sample::select(keys), hostile_value()).prop_map(|(key, value)| {
        let mut envelope = sample_envelope().clone();
        envelope[&key] = serde_json::from_str(&value).unwrap_or(serde_json::Value::String(value));
        serde_json::to_vec(&envelope).unwrap()
    });
    let strategy = prop_oneof![mutated, prop::collection::vec(any::<u8>(), 0..600)];
    runner
        .run(&strategy, |body| {
            let _ = Envelope::decode(&body);
            Ok(())
        })
        .unwrap();
    assert!(
        Envelope::decode(&serde_json::to_vec(sample_envelope()).unwrap()).is_ok(),
        "the sample decodes"
    );
}

#[test]
fn settings_files_load_or_name_the_key() {
    let mut runner = runner();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sigrun.toml");
    let keys = prop::sample::select(vec![
        "runtime.consumers",
        "runtime.tiers_ms",
        "runtime.claim_timeout_ms",
        "runtime.shutdown_grace_ms",
        "runtime.retry.max_attempts",
        "runtime.retry.factor",
        "runtime.retry.base_delay_ms",
        "amqp.url",
        "amqp.prefetch",
        "amqp.prefix",
        "amqp.delivery_limit",
        "amqp.event_max_age",
        "amqp.connect_timeout_ms",
        "emulator.time_scale",
        "azure.time_scale",
        "stages.poll_min",
        "stages.poll_max",
        "stages.region_retries",
        "telemetry.listen",
        "pipelines.dir",
    ]);
    runner
        .run(&(keys, hostile_value()), |(key, value)| {
            let (section, name) = key.rsplit_once('.').unwrap();
            std::fs::write(&path, format!("[{section}]\n{name} = {value}\n")).unwrap();
            if let Err(error) = sigrun::config::Settings::load(Some(&path)) {
                prop_assert!(error.to_string().len() < 20_000);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn resource_ids_parse_or_are_refused() {
    let mut runner = runner();
    let real = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/d/versions/1.0.0";
    let strategy = prop_oneof![
        ".{0,300}",
        (0..real.len(), ".{0,10}").prop_map(move |(at, s)| {
            let at = (0..=at).rev().find(|i| real.is_char_boundary(*i)).unwrap_or(0);
            format!("{}{s}{}", &real[..at], &real[at..])
        }),
    ];
    runner
        .run(&strategy, |text| {
            let _ = VmId::parse(&text);
            let _ = DiskId::parse(&text);
            let _ = SnapshotId::parse(&text);
            let _ = ImageId::parse(&text);
            let _ = GalleryId::parse(&text);
            let _ = GalleryImageId::parse(&text);
            if let Ok(id) = GalleryImageVersionId::parse(&text) {
                // A parsed id renders back to a path that parses to itself.
                prop_assert_eq!(GalleryImageVersionId::parse(&id.to_string()).ok(), Some(id));
            }
            let _ = BatchAccountId::parse(&text);
            Ok(())
        })
        .unwrap();
}

/// Azure as the emulator's world answers the planner: the build VM, its account, Batch's images.
struct World;

const KNOWN_REGIONS: [&str; 4] = ["westeurope", "eastus", "southeastasia", "northeurope"];
const OFFERED_SIZES: [&str; 2] = ["Standard_D4s_v5", "Standard_F8s_v2"];

fn unused(what: &str) -> AzureError {
    AzureError::permanent(what, "NotInThisTest", "the planner does not call this")
}

#[async_trait]
impl AzureApi for World {
    async fn get_vm(&self, id: &VmId) -> Result<VmInfo, AzureError> {
        let disk = |name: &str| DiskId::new(id.subscription(), id.resource_group(), &[name]).unwrap();
        Ok(VmInfo {
            location: "westeurope".into(),
            os_type: "Linux".into(),
            hyper_v_generation: Some("V2".into()),
            base_image: Some((
                "canonical".into(),
                "0001-com-ubuntu-server-jammy".into(),
                "22_04-lts-gen2".into(),
            )),
            os_disk: Some(disk("os")),
            data_disks: vec![(0, Some(disk("data0"))), (1, Some(disk("data1")))],
            extensions: Vec::new(),
        })
    }
    async fn provider_state(&self, _: &str, _: &str) -> Result<RegistrationState, AzureError> {
        Ok(RegistrationState::Registered)
    }
    async fn list_locations(&self, _: &str) -> Result<Vec<String>, AzureError> {
        Ok(KNOWN_REGIONS.iter().map(|r| r.to_string()).collect())
    }
    async fn batch_vm_sizes(&self, _: &str, _: &str) -> Result<Vec<VmSize>, AzureError> {
        Ok(OFFERED_SIZES
            .iter()
            .map(|name| VmSize {
                name: name.to_string(),
                family: "standardDSv5Family".into(),
                vcpus: 4,
            })
            .collect())
    }
    async fn register_provider(&self, _: &str, _: &str) -> Result<RegistrationState, AzureError> {
        Err(unused("register_provider"))
    }
    async fn put_snapshot(&self, _: &SnapshotId, _: &SnapshotRequest) -> Result<Accepted, AzureError> {
        Err(unused("put_snapshot"))
    }
    async fn get_snapshot(&self, _: &SnapshotId) -> Result<Option<ResourceState>, AzureError> {
        Err(unused("get_snapshot"))
    }
    async fn delete_snapshot(&self, _: &SnapshotId) -> Result<Option<std::time::Duration>, AzureError> {
        Err(unused("delete_snapshot"))
    }
    async fn put_image(&self, _: &ImageId, _: &ImageRequest) -> Result<Accepted, AzureError> {
        Err(unused("put_image"))
    }
    async fn get_image(&self, _: &ImageId) -> Result<Option<ResourceState>, AzureError> {
        Err(unused("get_image"))
    }
    async fn delete_image(&self, _: &ImageId) -> Result<Option<std::time::Duration>, AzureError> {
        Err(unused("delete_image"))
    }
    async fn get_gallery(&self, _: &GalleryId) -> Result<Option<ResourceState>, AzureError> {
        Ok(None)
    }
    async fn put_gallery(&self, _: &GalleryId, _: &str, _: &Tags) -> Result<Accepted, AzureError> {
        Err(unused("put_gallery"))
    }
    async fn get_definition(&self, _: &GalleryImageId) -> Result<Option<DefinitionInfo>, AzureError> {
        Ok(None)
    }
    async fn put_definition(&self, _: &GalleryImageId, _: &DefinitionRequest) -> Result<Accepted, AzureError> {
        Err(unused("put_definition"))
    }
    async fn delete_version(&self, _: &GalleryImageVersionId) -> Result<(), AzureError> {
        Err(unused("delete_version"))
    }
    async fn list_versions(&self, _: &GalleryImageId) -> Result<Vec<ListedVersion>, AzureError> {
        let listed = |name: &str| ListedVersion {
            name: name.into(),
            info: VersionInfo {
                provisioning_state: sigrun::azure::ProvisioningState::Succeeded,
                exclude_from_latest: false,
                source: None,
                target_regions: Vec::new(),
                replication: Vec::new(),
                tags: Tags::new(),
                published: None,
            },
        };
        Ok(vec![listed("2026.1201.0"), listed("2026.1202.3")])
    }
    async fn put_version(&self, _: &GalleryImageVersionId, _: &VersionRequest) -> Result<Accepted, AzureError> {
        Err(unused("put_version"))
    }
    async fn get_version(&self, _: &GalleryImageVersionId, _: bool) -> Result<Option<VersionInfo>, AzureError> {
        Ok(None)
    }
    async fn set_exclude_from_latest(&self, _: &GalleryImageVersionId, _: bool) -> Result<Accepted, AzureError> {
        Err(unused("set_exclude_from_latest"))
    }
    async fn set_target_regions(&self, _: &GalleryImageVersionId, _: &[TargetRegion]) -> Result<Accepted, AzureError> {
        Err(unused("set_target_regions"))
    }
    async fn operation_status(&self, _: &str) -> Result<OperationStatus, AzureError> {
        Err(unused("operation_status"))
    }
    async fn get_batch_account(&self, id: &BatchAccountId) -> Result<BatchAccountInfo, AzureError> {
        Ok(BatchAccountInfo {
            id: id.clone(),
            location: if id.name().contains("eus") {
                "eastus"
            } else {
                "westeurope"
            }
            .into(),
            url: format!("https://{}.westeurope.batch.azure.com", id.name()),
            // Quotas unknown: the planner's quota check has nothing to hold the plan to.
            quotas: AccountQuotas::default(),
        })
    }
    async fn supported_images(&self, _: &BatchAccountInfo) -> Result<Vec<SupportedImage>, AzureError> {
        Ok(vec![SupportedImage {
            node_agent_sku_id: "batch.node.ubuntu 22.04".into(),
            publisher: "canonical".into(),
            offer: "0001-com-ubuntu-server-jammy".into(),
            sku: "22_04-lts-gen2".into(),
            os_type: "linux".into(),
        }])
    }
    async fn add_pool(&self, _: &str, _: &PoolRequest) -> Result<PoolCreated, AzureError> {
        Err(unused("add_pool"))
    }
    async fn get_pool(&self, _: &str, _: &str) -> Result<Option<PoolInfo>, AzureError> {
        Err(unused("get_pool"))
    }
    async fn list_pools(&self, _: &str) -> Result<Vec<PoolInfo>, AzureError> {
        Err(unused("list_pools"))
    }
    async fn node_counts(&self, _: &str, _: &str) -> Result<NodeCounts, AzureError> {
        Err(unused("node_counts"))
    }
    async fn resize_pool(&self, _: &str, _: &str, _: u32, _: u32) -> Result<(), AzureError> {
        Err(unused("resize_pool"))
    }
    async fn set_pool_metadata(&self, _: &str, _: &str, _: &BTreeMap<String, String>) -> Result<(), AzureError> {
        Err(unused("set_pool_metadata"))
    }
    async fn delete_pool(&self, _: &str, _: &str) -> Result<(), AzureError> {
        Err(unused("delete_pool"))
    }
}

#[test]
fn the_planner_plans_or_refuses_whatever_spec_parses() {
    let tokio = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut runner = runner();
    let planned = std::cell::Cell::new(0u32);
    let strategy = (mutated_spec(), prop::option::of("[0-9.]{0,14}"));
    runner
        .run(&strategy, |(text, version)| {
            let Ok(spec) = PipelineSpec::parse(&text, "p.toml") else {
                return Ok(());
            };
            let now = time::OffsetDateTime::now_utc();
            let result = tokio.block_on(async {
                let version = planner::resolve_version(&spec, version.as_deref(), &World, now.date())
                    .await?
                    .name;
                let inputs = PlanInputs {
                    version,
                    ..PlanInputs::default()
                };
                planner::plan(&spec, &inputs, &World, now).await
            });
            if let Ok(plan) = result {
                planned.set(planned.get() + 1);
                // What the Azure rules require of any plan.
                for region in &plan.regions {
                    prop_assert!(region.replicas >= 1 && region.replicas <= 100);
                    prop_assert!(KNOWN_REGIONS.contains(&region.name.as_str()), "{}", region.name);
                }
                for pool in &plan.pools {
                    prop_assert!(pool.resize_timeout_secs >= 900);
                    prop_assert!(
                        OFFERED_SIZES.iter().any(|s| s.eq_ignore_ascii_case(&pool.vm_size)),
                        "{}",
                        pool.vm_size
                    );
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!("{} of {} specs planned", planned.get(), cases());
    assert!(planned.get() > 0, "the generator also makes specs that plan");
}

/// Whatever text a message or spec carries, the page's escaping leaves no markup: no `<`, `>`,
/// or quote survives, and every entity decodes back to the text.
#[test]
fn page_text_never_carries_markup() {
    let mut runner = runner();
    let text = prop_oneof![
        ".{0,80}",
        "[<>&\"' a-z=/]{0,80}",
        Just("<script>alert(1)</script>\"'><img src=x onerror=alert(1)>&amp;".to_string()),
    ];
    runner
        .run(&text, |text| {
            let escaped = sigrun::ui::pages::escape(&text);
            prop_assert!(!escaped.contains(['<', '>', '"', '\'']), "{escaped}");
            let back = escaped
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&#39;", "'")
                .replace("&amp;", "&");
            prop_assert_eq!(back, text);
            Ok(())
        })
        .unwrap();
}

/// A run's history of any shape: a start (or none), then events of every kind on the trunk, its
/// pools' branches and its clean-ups, at any stage.
fn run_history() -> impl Strategy<Value = Vec<sigrun::events::Event>> {
    use sigrun::events::{DeletedKind, Event, EventKind, PoolRef};
    use sigrun::model::envelope::{Branch, Intermediate, Stage};
    let regions = ["westeurope", "eastus"];
    let pools: Vec<PoolRef> = regions
        .iter()
        .map(|r| PoolRef {
            region: r.to_string(),
            target: format!("t-{r}"),
        })
        .collect();
    let branch = prop_oneof![
        Just(Branch::Trunk),
        (0..2usize).prop_map(|i| Branch::Pool {
            region: ["westeurope", "eastus"][i].into(),
            target: format!("t-{}", ["westeurope", "eastus"][i]),
        }),
        Just(Branch::CleanUp {
            what: Intermediate::Snapshots
        }),
    ];
    let region = (0..2usize).prop_map(|i| ["westeurope", "eastus"][i].to_string());
    let kind = prop_oneof![
        Just(EventKind::Waiting {
            what: "replication".into()
        }),
        Just(EventKind::Retried {
            attempt: 1,
            error: "503".into()
        }),
        Just(EventKind::ResourceCreated {
            id: "/subscriptions/x".into()
        }),
        Just(EventKind::ResourceDeleted {
            what: DeletedKind::Snapshot,
            id: "/subscriptions/x".into()
        }),
        region.clone().prop_map(|region| EventKind::RegionCompleted { region }),
        region.prop_map(|region| EventKind::RegionFailed {
            region,
            reason: "r".into()
        }),
        Just(EventKind::PoolVerified { pool_id: "p".into() }),
        Just(EventKind::PoolFailed {
            target: "t".into(),
            reason: "r".into()
        }),
        Just(EventKind::RolloutFinished),
        Just(EventKind::Parked { reason: "r".into() }),
        Just(EventKind::Replayed {
            message_id: uuid::Uuid::nil(),
            error: "e".into()
        }),
        Just(EventKind::CleanUpScheduled {
            what: Intermediate::Snapshots
        }),
        Just(EventKind::CleanUpFinished {
            what: Intermediate::Snapshots,
            failed: None
        }),
        Just(EventKind::RetirementFailed { reason: "r".into() }),
        Just(EventKind::DuplicateDropped {
            message_id: uuid::Uuid::nil()
        }),
        Just(EventKind::Cancelled),
        Just(EventKind::RunFailed { reason: "r".into() }),
        Just(EventKind::CancelRequested),
        Just(EventKind::TriggerRejected { reason: "r".into() }),
        Just(EventKind::CleanUpFinished {
            what: Intermediate::Snapshots,
            failed: Some("gave up".into())
        }),
    ];
    let stage = (0..6usize).prop_map(|i| Stage::ALL[i]);
    // Where the start stands among the rest: usually first, sometimes after a failure (the first
    // step runs before `RunStarted` is published), and sometimes a second `RunStarted` of
    // another shape (one region, one pool) comes later, which must not count.
    let started = prop_oneof![
        3 => (0..6usize, any::<bool>(), prop_oneof![3 => Just(0usize), 1 => 0..40usize])
            .prop_map(move |(i, rollout, at)| Some((Stage::ALL[i], rollout, at))),
        1 => Just(None),
    ];
    let second = prop::option::weighted(0.2, (0..6usize, 0..40usize));
    let history = (started, second, prop::collection::vec((branch, stage, kind), 0..40));
    history.prop_map(move |(start, second, rest)| {
        let event = |branch, stage, kind| Event {
            run_id: uuid::Uuid::from_u128(7),
            pipeline: "nightly".into(),
            version: "1.0.0".into(),
            stage,
            branch,
            at: time::OffsetDateTime::UNIX_EPOCH,
            kind,
        };
        let mut events: Vec<Event> = rest.into_iter().map(|(b, s, k)| event(b, s, k)).collect();
        if let Some((entry, rollout, at)) = start {
            let kind = EventKind::RunStarted {
                regions: regions.iter().map(|r| r.to_string()).collect(),
                pools: pools.clone(),
                rollout,
            };
            events.insert(at.min(events.len()), event(Branch::Trunk, entry, kind));
        }
        if let Some((i, at)) = second {
            let kind = EventKind::RunStarted {
                regions: vec![regions[0].to_string()],
                pools: vec![pools[0].clone()],
                rollout: false,
            };
            events.insert(at.min(events.len()), event(Branch::Trunk, Stage::ALL[i], kind));
        }
        events
    })
}

/// The run tracker folds a run into its result-deciding events and each branch's latest stage:
/// over any history it ends the run exactly when the whole history would, with the same result,
/// and counts its branches at the same stages after every event.
#[test]
fn a_folded_run_agrees_with_its_whole_history() {
    use sigrun::events::run_result;
    use sigrun::model::envelope::Stage;
    use sigrun::telemetry::runs::{RunChange, RunTracker, result_label};
    let mut runner = TestRunner::new(Config {
        cases: cases().min(5_000),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&run_history(), |events| {
            let mut tracker = RunTracker::default();
            let mut ended = false;
            for (n, event) in events.iter().enumerate() {
                let seen = &events[..=n];
                let started = seen
                    .iter()
                    .any(|e| matches!(e.kind, sigrun::events::EventKind::RunStarted { .. }));
                let changes = tracker.apply(event);
                let finished = changes.iter().find_map(|c| match c {
                    RunChange::Finished { result, .. } => Some(*result),
                    _ => None,
                });
                if ended {
                    prop_assert!(finished.is_none(), "a run ends once");
                    continue;
                }
                let whole = if started { result_label(&run_result(seen)) } else { None };
                prop_assert_eq!(finished, whole, "after event {}", n);
                ended = finished.is_some();
                let expected = if ended { Vec::new() } else { reference_positions(seen) };
                for stage in Stage::ALL {
                    let count = expected.iter().filter(|s| **s == stage).count();
                    prop_assert_eq!(tracker.in_flight(stage), count, "{} after event {}", stage, n);
                }
            }
            Ok(())
        })
        .unwrap();
}

/// Where each branch of a running run is, read off its whole history (the tracker's oracle: how
/// `telemetry::runs` computed it before it folded runs).
fn reference_positions(events: &[sigrun::events::Event]) -> Vec<sigrun::model::envelope::Stage> {
    use sigrun::events::EventKind;
    use sigrun::model::envelope::Branch;
    use sigrun::model::envelope::Stage;
    let Some((regions, pools, entry)) = events.iter().find_map(|e| match &e.kind {
        EventKind::RunStarted { regions, pools, .. } => Some((regions, pools, e.stage)),
        _ => None,
    }) else {
        return Vec::new();
    };
    // A dropped stale copy says nothing of where its branch is now; a branch only moves forward
    // (a `Waiting` note of an overtaken copy may come after the next stage's events).
    let furthest = |branch: &Branch| {
        events
            .iter()
            .filter(|e| e.branch == *branch && !matches!(e.kind, EventKind::DuplicateDropped { .. }))
            .map(|e| e.stage)
            .max()
    };
    let ends = |e: &sigrun::events::Event| {
        matches!(
            e.kind,
            EventKind::RunFailed { .. }
                | EventKind::PoolVerified { .. }
                | EventKind::PoolFailed { .. }
                | EventKind::Parked { .. }
                | EventKind::Cancelled
        )
    };
    let region_ended = |name: &String| {
        events.iter().any(|e| match &e.kind {
            EventKind::RegionCompleted { region } | EventKind::RegionFailed { region, .. } => region == name,
            _ => false,
        })
    };
    let mut positions = Vec::new();
    if entry <= Stage::Replicate {
        let trunk_ended =
            events.iter().any(|e| e.branch == Branch::Trunk && ends(e)) || regions.iter().all(region_ended);
        if !trunk_ended {
            positions.push(furthest(&Branch::Trunk).unwrap_or(entry));
        }
    }
    for pool in pools {
        let started = entry > Stage::Replicate
            || events
                .iter()
                .any(|e| matches!(&e.kind, EventKind::RegionCompleted { region } if *region == pool.region));
        if !started {
            continue;
        }
        let branch = Branch::Pool {
            region: pool.region.clone(),
            target: pool.target.clone(),
        };
        if events.iter().any(|e| e.branch == branch && ends(e)) {
            continue;
        }
        let at = furthest(&branch).unwrap_or(entry.max(Stage::PoolCreate));
        positions.push(at);
    }
    positions
}

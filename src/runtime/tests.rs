//! Runtime tests on the in-process bus with tokio's clock paused: time moves only when every task
//! is idle, straight to the next timer, so delays and tier hops are exact and the tests take no
//! real time. Handlers are in-process fakes; the stages are not involved.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use tokio::time::Instant;

use super::testkit::{self, Script, envelope, pools, regions};
use super::*;
use crate::bus::memory::MemoryBus;
use crate::bus::{Bus, BusError, Delivery, ParkReason};
use crate::events::{EventKind, PoolRef, RunResult};
use crate::model::envelope::{Branch, Envelope, InFlight, MAX_ENVELOPE_BYTES, Phase, Stage};
use crate::stages::{Outcome, Step};

fn step(outcome: Outcome) -> Result<Step, AzureError> {
    Ok(Step::new(outcome))
}

fn advance_to(message: &Envelope, stage: Stage) -> Result<Step, AzureError> {
    step(Outcome::Advance(vec![message.next(stage, message.stage_started)]))
}

fn runtime(bus: Arc<dyn Bus>, handler: Arc<dyn Handler>, clock: Clock) -> Runtime {
    runtime_with(bus, handler, clock, testkit::settings())
}

use testkit::runtime_with;

/// Runs the consumers for `length` of (paused) time, then shuts them down.
async fn run_for(runtime: &Runtime, length: Duration) -> RuntimeReport {
    runtime.run(tokio::time::sleep(length)).await
}

fn kinds(bus: &MemoryBus) -> Vec<EventKind> {
    bus.events().into_iter().map(|e| e.kind).collect()
}

fn in_flight(what: Phase) -> InFlight {
    InFlight {
        what,
        status_urls: Vec::new(),
        started: OffsetDateTime::UNIX_EPOCH,
        not_before: OffsetDateTime::UNIX_EPOCH,
        polls: 0,
        progress: Default::default(),
    }
}

fn network_error() -> AzureError {
    AzureError::network("GET snapshot s", "connection reset")
}

fn forbidden() -> AzureError {
    AzureError {
        operation: "PUT pool p".into(),
        status: Some(403),
        code: Some("AuthorizationFailed".into()),
        message: "no role on the gallery image".into(),
        request_id: Some("req-1".into()),
        retry_after: None,
    }
}

fn on_pool(stage: Stage, region: &str, target: &str) -> Envelope {
    let trunk = envelope(Stage::Replicate);
    trunk.for_pool(stage, region, target, trunk.stage_started)
}

#[tokio::test(start_paused = true)]
async fn a_run_advances_through_the_stages_and_every_input_is_acked() {
    let bus = testkit::bus();
    let handler = Script::new(|m| match m.stage {
        Stage::Snapshot => advance_to(m, Stage::ImageCreate).map(|s| {
            s.with(EventKind::RunStarted {
                rollout: false,
                regions: regions(),
                pools: pools(),
            })
        }),
        Stage::ImageCreate => advance_to(m, Stage::GalleryPublish),
        Stage::GalleryPublish => advance_to(m, Stage::Replicate),
        Stage::Replicate => advance_to(m, Stage::PoolCreate),
        Stage::PoolCreate => advance_to(m, Stage::Verify),
        Stage::Verify => step(Outcome::Done).map(|s| s.with(EventKind::Throttled { retry_after_ms: None })),
    });
    let first = envelope(Stage::Snapshot);
    bus.publish(Stage::Snapshot, &first.encode(), None).await.unwrap();

    let report = run_for(
        &runtime(bus.clone(), handler.clone(), Clock::tokio()),
        Duration::from_secs(1),
    )
    .await;

    let stages: Vec<Stage> = handler.calls().iter().map(|c| c.message.stage).collect();
    assert_eq!(stages, Stage::ALL);
    assert!(handler.calls().iter().all(|c| c.message.run_id == first.run_id));
    let stats = bus.stats();
    assert_eq!((stats.published, stats.acked, stats.delayed), (6, 6, 0));
    assert!(stats.is_idle());
    assert_eq!((report.handled, report.abandoned), (6, 0));
    // Events carry the run and the stage and branch of the message whose step produced them.
    let events = bus.events();
    assert_eq!(events.len(), 2);
    assert!(matches!(events[0].kind, EventKind::RunStarted { .. }));
    assert_eq!(
        (events[0].run_id, events[0].stage, &events[0].branch),
        (first.run_id, Stage::Snapshot, &Branch::Trunk)
    );
    assert_eq!(
        (events[1].stage, events[1].version.as_str()),
        (Stage::Verify, testkit::VERSION)
    );
}

#[tokio::test(start_paused = true)]
async fn a_wait_comes_back_after_its_delay_and_not_before() {
    let bus = testkit::bus();
    // Looks three times, 120 ms apart; the delay falls between tiers (50, 10 ms …), and each
    // wait is still one hop: held on the 50 ms tier for all 120 ms.
    let handler = Script::new(|m| {
        let polls = m.operation.as_ref().map_or(0, |op| op.polls);
        if polls == 2 {
            return step(Outcome::Done);
        }
        let mut again = m.clone();
        let mut op = m.operation.clone().unwrap_or_else(|| in_flight(Phase::Replication));
        op.polls += 1;
        again.operation = Some(op);
        // As if this look came after three failed ones: a successful step must not carry them on.
        again.attempt = 3;
        step(Outcome::Wait {
            message: Box::new(again),
            delay: Duration::from_millis(120),
            emit: Vec::new(),
        })
        .map(|s| {
            s.with(EventKind::Waiting {
                what: "replication".into(),
            })
        })
    });
    bus.publish(Stage::Replicate, &envelope(Stage::Replicate).encode(), None)
        .await
        .unwrap();
    let start = Instant::now();
    // Every wait goes round the tiers here (none held: `held_tests` has those).
    let settings = RuntimeSettings {
        held_waits: 0,
        ..testkit::settings()
    };

    run_for(
        &runtime_with(bus.clone(), handler.clone(), Clock::tokio(), settings),
        Duration::from_secs(2),
    )
    .await;

    let calls = handler.calls();
    let at: Vec<Duration> = calls.iter().map(|c| c.at - start).collect();
    assert_eq!(
        at,
        [0, 120, 240].map(Duration::from_millis),
        "looked exactly when due, never before"
    );
    assert_eq!(
        calls[1].message.attempt, 0,
        "a successful look resets the failure count"
    );
    assert_eq!(
        bus.stats().delayed,
        2,
        "each 120 ms wait one hop, not 50, 50, 10, 10 ms"
    );
    assert_eq!(kinds(&bus).len(), 2);
    assert!(bus.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn an_early_message_is_held_back_until_its_not_before() {
    let bus = testkit::bus();
    let clock = Clock::tokio();
    let handler = Script::new(|_| step(Outcome::Done));
    // One waits on its operation, one on the envelope's own hold (a retry with no operation).
    let mut on_operation = envelope(Stage::ImageCreate);
    let mut op = in_flight(Phase::Image);
    op.not_before = clock.now() + Duration::from_millis(300);
    on_operation.operation = Some(op);
    let mut on_envelope = envelope(Stage::Verify);
    on_envelope.not_before = Some(clock.now() + Duration::from_millis(1500));
    bus.publish(Stage::ImageCreate, &on_operation.encode(), None)
        .await
        .unwrap();
    bus.publish(Stage::Verify, &on_envelope.encode(), None).await.unwrap();
    let start = Instant::now();

    run_for(&runtime(bus.clone(), handler.clone(), clock), Duration::from_secs(3)).await;

    let calls = handler.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].message.stage, Stage::ImageCreate);
    assert_eq!(calls[0].at - start, Duration::from_millis(300));
    assert_eq!(calls[1].message.stage, Stage::Verify);
    assert_eq!(calls[1].at - start, Duration::from_millis(1500));
    assert_eq!(
        calls[1].message.not_before, None,
        "a passed hold is cleared for the handler"
    );
    assert!(bus.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_wait_with_emit_fans_out_branches_at_once() {
    let bus = testkit::bus();
    let handler = Script::new(|m| match m.stage {
        Stage::Replicate if m.artifacts.regions_completed.is_empty() => {
            let mut again = m.clone();
            again.artifacts.regions_completed.push("westeurope".into());
            let now = m.stage_started;
            step(Outcome::Wait {
                message: Box::new(again),
                delay: Duration::from_millis(500),
                emit: vec![
                    m.for_pool(Stage::PoolCreate, "westeurope", "render", now),
                    m.for_pool(Stage::PoolCreate, "westeurope", "sim", now),
                ],
            })
        }
        Stage::Replicate => step(Outcome::Advance(vec![m.for_pool(
            Stage::PoolCreate,
            "eastus",
            "batch",
            m.stage_started,
        )])),
        _ => step(Outcome::Done),
    });
    bus.publish(Stage::Replicate, &envelope(Stage::Replicate).encode(), None)
        .await
        .unwrap();
    let start = Instant::now();

    run_for(
        &runtime(bus.clone(), handler.clone(), Clock::tokio()),
        Duration::from_secs(2),
    )
    .await;

    let mut pool_calls: Vec<(Branch, Duration)> = handler
        .calls()
        .into_iter()
        .filter(|c| c.message.stage == Stage::PoolCreate)
        .map(|c| (c.message.branch, c.at - start))
        .collect();
    // Two consumers may take the two branches in either order.
    pool_calls.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    let branch = |region: &str, target: &str| Branch::Pool {
        region: region.into(),
        target: target.into(),
    };
    assert_eq!(
        pool_calls,
        vec![
            (branch("westeurope", "render"), Duration::ZERO),
            (branch("westeurope", "sim"), Duration::ZERO),
            (branch("eastus", "batch"), Duration::from_millis(500)),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn transient_errors_are_retried_with_growing_delays_then_fail_the_branch() {
    let bus = testkit::bus();
    let handler = Script::new(|_| Err(network_error()));
    let first = envelope(Stage::Snapshot);
    bus.publish(Stage::Snapshot, &first.encode(), None).await.unwrap();
    let start = Instant::now();

    run_for(
        &runtime(bus.clone(), handler.clone(), Clock::tokio()),
        Duration::from_secs(30),
    )
    .await;

    let calls = handler.calls();
    let max_attempts = testkit::settings().retry.max_attempts as usize;
    assert_eq!(calls.len(), max_attempts);
    let mut previous = start;
    for (n, call) in calls.iter().enumerate() {
        assert_eq!(call.message.attempt as usize, n, "the message counts its failures");
        if n > 0 {
            // Retry n waits base·2^(n-1) plus jitter below as much again; a delay is held for
            // itself, so it comes back within a few ms of its due time (the bound below is loose).
            let floor = Duration::from_millis(100 << (n - 1));
            let gap = call.at - previous;
            assert!(
                gap >= floor && gap < floor * 2 + Duration::from_millis(10),
                "retry {n}: {gap:?}"
            );
        }
        previous = call.at;
    }
    let kinds = kinds(&bus);
    let retried: Vec<u32> = kinds
        .iter()
        .filter_map(|k| match k {
            EventKind::Retried { attempt, error } => {
                assert!(error.contains("connection reset"), "{error}");
                Some(*attempt)
            }
            _ => None,
        })
        .collect();
    assert_eq!(retried, [1, 2, 3, 4]);
    match kinds.last().unwrap() {
        EventKind::RunFailed { reason } => {
            assert!(
                reason.starts_with("gave up after 5 attempts: GET snapshot s"),
                "{reason}"
            )
        }
        other => panic!("expected RunFailed, got {other:?}"),
    }
    let parked = bus.parked();
    assert_eq!(parked.len(), 1, "the message is kept for inspection and replay");
    assert_eq!(parked[0].1.attempts, 5);
    assert_eq!(parked[0].1.message_id, Some(first.message_id.to_string()));
    assert!(bus.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_throttled_step_is_never_retried_before_retry_after() {
    let bus = testkit::bus();
    let handler = Script::new(|m| {
        if m.attempt == 0 {
            Err(AzureError {
                operation: "GET pool".into(),
                status: Some(429),
                code: Some("TooManyRequests".into()),
                message: "slow down".into(),
                request_id: None,
                retry_after: Some(Duration::from_secs(2)),
            })
        } else {
            step(Outcome::Done)
        }
    });
    bus.publish(Stage::Verify, &on_pool(Stage::Verify, "eastus", "batch").encode(), None)
        .await
        .unwrap();

    run_for(
        &runtime(bus.clone(), handler.clone(), Clock::tokio()),
        Duration::from_secs(5),
    )
    .await;

    let calls = handler.calls();
    assert_eq!(calls.len(), 2);
    let gap = calls[1].at - calls[0].at;
    assert!(
        gap >= Duration::from_secs(2) && gap < Duration::from_millis(2010),
        "{gap:?}"
    );
    assert_eq!(
        kinds(&bus),
        vec![EventKind::Throttled {
            retry_after_ms: Some(2000)
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn a_step_held_back_for_the_budget_waits_without_failing_however_often() {
    let bus = testkit::bus();
    let held = Arc::new(AtomicUsize::new(0));
    let handler = Script::new({
        let held = held.clone();
        move |_| {
            // Twice the retry budget's attempts: pacing is no failure, so none of it counts.
            if held.fetch_add(1, Ordering::SeqCst) < 10 {
                Err(AzureError::paced("GET pool", Duration::from_millis(300)))
            } else {
                step(Outcome::Done)
            }
        }
    });
    bus.publish(Stage::Verify, &on_pool(Stage::Verify, "eastus", "batch").encode(), None)
        .await
        .unwrap();

    run_for(
        &runtime(bus.clone(), handler.clone(), Clock::tokio()),
        Duration::from_secs(10),
    )
    .await;

    let calls = handler.calls();
    assert_eq!(calls.len(), 11, "ten put off, then the step");
    for pair in calls.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(300) && gap < Duration::from_millis(310),
            "{gap:?}"
        );
        assert_eq!(pair[1].message.attempt, 0, "no attempt counted");
    }
    assert!(kinds(&bus).is_empty(), "no event: {:?}", kinds(&bus));
    assert!(bus.parked().is_empty());
    assert!(bus.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_fails_a_pool_branch_at_once() {
    let bus = testkit::bus();
    let handler = Script::new(|_| Err(forbidden()));
    bus.publish(
        Stage::PoolCreate,
        &on_pool(Stage::PoolCreate, "westeurope", "render").encode(),
        None,
    )
    .await
    .unwrap();

    run_for(
        &runtime(bus.clone(), handler.clone(), Clock::tokio()),
        Duration::from_secs(5),
    )
    .await;

    assert_eq!(handler.calls().len(), 1);
    let events = bus.events();
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].kind,
        EventKind::PoolFailed {
            target: "render".into(),
            reason: forbidden().to_string()
        }
    );
    assert_eq!(
        events[0].branch,
        Branch::Pool {
            region: "westeurope".into(),
            target: "render".into()
        }
    );
    assert_eq!(bus.parked()[0].1.error, forbidden().to_string());
    let stats = bus.stats();
    assert_eq!((stats.acked, stats.delayed, stats.published), (1, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_on_the_trunk_fails_the_run() {
    let bus = testkit::bus();
    let handler = Script::new(|_| Err(forbidden()));
    bus.publish(Stage::GalleryPublish, &envelope(Stage::GalleryPublish).encode(), None)
        .await
        .unwrap();

    run_for(
        &runtime(bus.clone(), handler.clone(), Clock::tokio()),
        Duration::from_secs(5),
    )
    .await;

    assert_eq!(handler.calls().len(), 1);
    assert_eq!(
        kinds(&bus),
        vec![EventKind::RunFailed {
            reason: forbidden().to_string()
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_outcome_fails_the_branch_with_the_steps_reason() {
    let bus = testkit::bus();
    let handler = Script::new(|_| step(Outcome::Fail("3 of 4 nodes in starttaskfailed".into())));
    bus.publish(Stage::Verify, &on_pool(Stage::Verify, "eastus", "batch").encode(), None)
        .await
        .unwrap();

    run_for(
        &runtime(bus.clone(), handler.clone(), Clock::tokio()),
        Duration::from_secs(1),
    )
    .await;

    assert_eq!(
        kinds(&bus),
        vec![EventKind::PoolFailed {
            target: "batch".into(),
            reason: "3 of 4 nodes in starttaskfailed".into()
        }]
    );
    assert!(
        bus.parked().is_empty(),
        "a stage's own verdict is not an error to replay"
    );
    assert_eq!(bus.stats().acked, 1);
}

#[tokio::test(start_paused = true)]
async fn malformed_messages_are_parked_with_the_reason_and_never_handled() {
    let bus = testkit::bus();
    let handler = Script::new(|_| step(Outcome::Done));
    // A v1 message of a known run with a field missing: its run's history hears of it.
    let broken_run = envelope(Stage::Replicate);
    let mut broken = serde_json::to_value(&broken_run).unwrap();
    broken.as_object_mut().unwrap().remove("plan");
    let bodies: Vec<Vec<u8>> = vec![
        b"not json at all".to_vec(),
        br#"{"v":1,"message_id":"m-2"}"#.to_vec(),
        vec![b' '; MAX_ENVELOPE_BYTES + 1],
        serde_json::to_vec(&broken).unwrap(),
    ];
    for body in &bodies {
        bus.publish(Stage::Replicate, body, None).await.unwrap();
    }

    run_for(
        &runtime(bus.clone(), handler.clone(), Clock::tokio()),
        Duration::from_secs(1),
    )
    .await;

    assert!(handler.calls().is_empty());
    let parked = bus.parked();
    let reasons: Vec<&ParkReason> = parked.iter().map(|(_, r)| r).collect();
    assert_eq!(parked.len(), 4);
    assert!(reasons[0].error.contains("not JSON"), "{}", reasons[0].error);
    assert!(reasons[1].error.contains("envelope version 1"), "{}", reasons[1].error);
    assert_eq!(reasons[1].message_id.as_deref(), Some("m-2"));
    assert!(reasons[2].error.contains("over the limit"), "{}", reasons[2].error);
    assert!(reasons[3].error.contains("plan"), "{}", reasons[3].error);
    assert!(
        reasons
            .iter()
            .all(|r| r.stage == Some(Stage::Replicate) && r.attempts == 1)
    );
    assert_eq!(parked[2].0.len(), MAX_ENVELOPE_BYTES + 1, "parked as received");

    let events = bus.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].run_id, broken_run.run_id);
    assert!(matches!(&events[0].kind, EventKind::Parked { reason } if reason.contains("plan")));
    let stats = bus.stats();
    assert_eq!((stats.acked, stats.requeued), (4, 0));
    assert!(stats.is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_runs_branches_stop_at_their_next_step_and_others_go_on() {
    let bus = testkit::bus();
    let handler = Script::new(|m| match m.stage {
        Stage::Replicate => advance_to(m, Stage::PoolCreate),
        _ => step(Outcome::Done),
    });
    // Messages from before the ledger (no token): the cancel gate alone decides here.
    let unfenced = |mut message: Envelope| {
        message.token = uuid::Uuid::nil();
        message
    };
    let cancelled = unfenced(envelope(Stage::Replicate));
    // A pool branch of the cancelled run waiting on a delay tier stops when it comes back, too.
    let mut waiting = unfenced(on_pool(Stage::PoolCreate, "westeurope", "render"));
    waiting.run_id = cancelled.run_id;
    waiting.not_before = Some(OffsetDateTime::now_utc() + Duration::from_secs(3600));
    let other = unfenced(envelope(Stage::Replicate));
    let request = crate::events::Event {
        run_id: cancelled.run_id,
        pipeline: cancelled.pipeline.clone(),
        version: cancelled.version.clone(),
        stage: Stage::Replicate,
        branch: Branch::Trunk,
        at: OffsetDateTime::now_utc(),
        kind: EventKind::CancelRequested,
    };
    bus.publish_event(&request).await.unwrap();
    let ledger = Arc::new(crate::ledger::Ledger::start(
        bus.clone(),
        testkit::settings().ledger(),
        None,
    ));
    ledger.catch_up(Duration::from_secs(1)).await.unwrap();
    for message in [&cancelled, &waiting, &other] {
        bus.publish(message.stage, &message.encode(), None).await.unwrap();
    }
    let runtime = runtime(bus.clone(), handler.clone(), Clock::tokio()).with_ledger(ledger);

    run_for(&runtime, Duration::from_secs(1)).await;

    let handled: Vec<(uuid::Uuid, Stage)> = handler
        .calls()
        .iter()
        .map(|c| (c.message.run_id, c.message.stage))
        .collect();
    assert_eq!(
        handled,
        [(other.run_id, Stage::Replicate), (other.run_id, Stage::PoolCreate)]
    );
    let mut stopped: Vec<(Stage, String)> = bus
        .events()
        .into_iter()
        .filter(|e| e.run_id == cancelled.run_id && e.kind != EventKind::CancelRequested)
        .map(|e| {
            assert_eq!(e.kind, EventKind::Cancelled);
            (e.stage, e.branch.label())
        })
        .collect();
    stopped.sort();
    assert_eq!(
        stopped,
        [
            (Stage::Replicate, "trunk".to_string()),
            (Stage::PoolCreate, "westeurope/render".to_string())
        ]
    );
    let stats = bus.stats();
    assert_eq!((stats.acked, stats.requeued, stats.delayed), (4, 0, 0));
    assert!(stats.is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_parks_its_message_and_the_consumer_goes_on() {
    let bus = testkit::bus();
    let handler = Script::new(|m| {
        if m.stage == Stage::Snapshot {
            panic!("index out of bounds in a stage");
        }
        step(Outcome::Done)
    });
    bus.publish(Stage::Verify, &envelope(Stage::Verify).encode(), None)
        .await
        .unwrap();
    bus.publish(Stage::Snapshot, &envelope(Stage::Snapshot).encode(), None)
        .await
        .unwrap();

    // One consumer: the second call proves the panic did not take it down.
    let mut settings = testkit::settings();
    settings.consumers = 1;
    let report = run_for(
        &runtime_with(bus.clone(), handler.clone(), Clock::tokio(), settings),
        Duration::from_secs(2),
    )
    .await;

    assert_eq!(handler.calls().len(), 2, "the panic did not take the consumer down");
    match kinds(&bus).as_slice() {
        [EventKind::RunFailed { reason }] => {
            assert!(
                reason.contains("panicked (a bug in sigrun): index out of bounds"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    let parked = bus.parked();
    assert_eq!(parked.len(), 1);
    assert!(parked[0].1.error.contains("index out of bounds"), "{:?}", parked[0].1);
    // Every delivery (the two looks and the retry's tier hops) was settled by that one consumer.
    assert_eq!(report.handled, bus.stats().acked);
    assert!(bus.stats().is_idle());
}

/// Fails the first `failures` stage publishes (not events, not delays), then passes them through.
struct FlakyBus {
    inner: Arc<MemoryBus>,
    failures: AtomicUsize,
}

#[async_trait]
impl Bus for FlakyBus {
    async fn publish(&self, stage: Stage, body: &[u8], traceparent: Option<&str>) -> Result<(), BusError> {
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(BusError::NotConfirmed {
                target: stage.to_string(),
                reason: "nacked".into(),
            });
        }
        self.inner.publish(stage, body, traceparent).await
    }

    async fn publish_delayed(
        &self,
        stage: Stage,
        body: &[u8],
        delay: Duration,
        traceparent: Option<&str>,
    ) -> Result<(), BusError> {
        self.inner.publish_delayed(stage, body, delay, traceparent).await
    }

    async fn park(&self, body: &[u8], reason: &ParkReason) -> Result<(), BusError> {
        self.inner.park(body, reason).await
    }

    async fn publish_record(&self, record: &crate::ledger::record::Record) -> Result<(), BusError> {
        self.inner.publish_record(record).await
    }

    async fn open_history(
        &self,
        from: crate::bus::StreamOffset,
    ) -> Result<Box<dyn crate::bus::HistoryReader>, BusError> {
        self.inner.open_history(from).await
    }

    async fn next(&self, stages: &[Stage]) -> Option<Delivery> {
        self.inner.next(stages).await
    }
}

#[tokio::test(start_paused = true)]
async fn an_unconfirmed_publish_requeues_the_input_instead_of_acking_it() {
    let memory = testkit::bus();
    let bus = Arc::new(FlakyBus {
        inner: memory.clone(),
        failures: AtomicUsize::new(1),
    });
    let handler = Script::new(|m| match m.stage {
        Stage::Snapshot => advance_to(m, Stage::ImageCreate),
        _ => step(Outcome::Done),
    });
    let first = envelope(Stage::Snapshot);
    memory.publish(Stage::Snapshot, &first.encode(), None).await.unwrap();

    run_for(&runtime(bus, handler.clone(), Clock::tokio()), Duration::from_secs(1)).await;

    let stages: Vec<Stage> = handler.calls().iter().map(|c| c.message.stage).collect();
    assert_eq!(stages, [Stage::Snapshot, Stage::Snapshot, Stage::ImageCreate]);
    let stats = memory.stats();
    assert_eq!(stats.requeued, 1, "the first snapshot delivery went back");
    assert_eq!(
        stats.acked, 2,
        "snapshot once (after its publish was confirmed), image-create once"
    );
    assert!(stats.is_idle());
}

/// Takes `delay` (or forever) over each message, then is done.
struct Slow {
    delay: Option<Duration>,
    calls: AtomicUsize,
}

#[async_trait]
impl Handler for Slow {
    async fn handle(&self, _: Envelope, _: OffsetDateTime, _: crate::stages::Tried) -> Result<Step, AzureError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.delay {
            Some(delay) => tokio::time::sleep(delay).await,
            None => std::future::pending().await,
        }
        step(Outcome::Done)
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_in_flight_deliveries_finish_within_the_grace() {
    let bus = testkit::bus();
    let handler = Arc::new(Slow {
        delay: Some(Duration::from_secs(3)),
        calls: AtomicUsize::new(0),
    });
    bus.publish(Stage::Verify, &envelope(Stage::Verify).encode(), None)
        .await
        .unwrap();
    bus.publish(Stage::Verify, &envelope(Stage::Verify).encode(), None)
        .await
        .unwrap();
    bus.publish(Stage::Verify, &envelope(Stage::Verify).encode(), None)
        .await
        .unwrap();
    let start = Instant::now();

    // Two consumers take two messages; shutdown comes at 1 s; the third is never taken.
    let report = run_for(
        &runtime(bus.clone(), handler.clone(), Clock::tokio()),
        Duration::from_secs(1),
    )
    .await;

    assert_eq!(Instant::now() - start, Duration::from_secs(3));
    assert_eq!((report.handled, report.abandoned), (2, 0));
    assert_eq!(handler.calls.load(Ordering::SeqCst), 2);
    let stats = bus.stats();
    assert_eq!((stats.acked, stats.ready, stats.unacked), (2, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_delivery_abandoned_at_shutdown_returns_to_its_queue() {
    let bus = testkit::bus();
    let handler = Arc::new(Slow {
        delay: None,
        calls: AtomicUsize::new(0),
    });
    let first = envelope(Stage::Verify);
    bus.publish(Stage::Verify, &first.encode(), None).await.unwrap();
    let start = Instant::now();

    let report = run_for(
        &runtime(bus.clone(), handler.clone(), Clock::tokio()),
        Duration::from_secs(1),
    )
    .await;

    let grace = testkit::settings().shutdown_grace;
    assert_eq!(Instant::now() - start, Duration::from_secs(1) + grace);
    assert_eq!((report.handled, report.abandoned), (0, 1));
    let stats = bus.stats();
    assert_eq!((stats.acked, stats.requeued, stats.unacked, stats.ready), (0, 1, 0, 1));
    let again = bus.next(&[Stage::Verify]).await.unwrap();
    assert_eq!(again.delivery_count, 2);
    assert_eq!(Envelope::decode(&again.body).unwrap(), first);
}

/// A whole run in miniature: the trunk starts the run, waits once on an image, publishes, then
/// replicates region by region (starting a region's pools as it completes); each pool is created
/// and verified, or fails verification when `fails` names it.
fn pipeline(fails: &'static [&'static str], eastus_fails: bool) -> Arc<Script> {
    Script::new(move |m| {
        let now = m.stage_started;
        match m.stage {
            Stage::Snapshot => advance_to(m, Stage::ImageCreate).map(|s| {
                s.with(EventKind::RunStarted {
                    rollout: false,
                    regions: regions(),
                    pools: pools(),
                })
            }),
            Stage::ImageCreate if m.operation.is_none() => {
                let mut again = m.clone();
                again.operation = Some(in_flight(Phase::Image));
                step(Outcome::Wait {
                    message: Box::new(again),
                    delay: Duration::from_secs(3),
                    emit: Vec::new(),
                })
            }
            Stage::ImageCreate => advance_to(m, Stage::GalleryPublish),
            Stage::GalleryPublish => advance_to(m, Stage::Replicate),
            Stage::Replicate => {
                let done = &m.artifacts.regions_completed;
                let region = if done.is_empty() { "westeurope" } else { "eastus" };
                let branches: Vec<Envelope> = pools()
                    .into_iter()
                    .filter(|p: &PoolRef| p.region == region)
                    .map(|p| m.for_pool(Stage::PoolCreate, &p.region, &p.target, now))
                    .collect();
                if region == "westeurope" {
                    let mut again = m.clone();
                    again.artifacts.regions_completed.push(region.into());
                    return step(Outcome::Wait {
                        message: Box::new(again),
                        delay: Duration::from_secs(60),
                        emit: branches,
                    })
                    .map(|s| s.with(EventKind::RegionCompleted { region: region.into() }));
                }
                if eastus_fails {
                    return step(Outcome::Done).map(|s| {
                        s.with(EventKind::RegionFailed {
                            region: region.into(),
                            reason: "ReplicationFailed".into(),
                        })
                    });
                }
                step(Outcome::Advance(branches)).map(|s| s.with(EventKind::RegionCompleted { region: region.into() }))
            }
            Stage::PoolCreate => advance_to(m, Stage::Verify),
            Stage::Verify => match &m.branch {
                Branch::Pool { target, .. } if fails.contains(&target.as_str()) => {
                    step(Outcome::Fail("AllocationFailed".into()))
                }
                Branch::Pool { target, .. } => step(Outcome::Done).map(|s| {
                    s.with(EventKind::PoolVerified {
                        pool_id: format!("{target}-pool"),
                    })
                }),
                Branch::Trunk | Branch::CleanUp { .. } => step(Outcome::Fail("verify off a pool branch".into())),
            },
        }
    })
}

/// Drives the run that `first` starts on `bus` until it ends or `timeout` passes, publishing
/// `first` unfenced (the runtime's tests: their handlers emit `RunStarted`), telling `observer`
/// (the metrics), if any, about every delivery and event.
async fn run_observed(
    bus: Arc<MemoryBus>,
    handler: Arc<dyn Handler>,
    first: Envelope,
    settings: RuntimeSettings,
    clock: Clock,
    timeout: Duration,
    observer: Option<Arc<dyn Observer>>,
) -> Result<RunOutcome, RunError> {
    let run_id = first.run_id;
    let mut runtime = Runtime::new(bus.clone(), handler, Stage::ALL.to_vec(), settings)?.with_clock(clock);
    if let Some(observer) = &observer {
        runtime = runtime.with_observer(Arc::clone(observer));
    }
    let publisher = Arc::clone(&bus);
    let start = async move { publisher.publish(first.stage, &first.encode(), None).await };
    super::complete::drive(bus, runtime, run_id, start, timeout, observer).await
}

async fn drive(handler: Arc<Script>, first: Envelope) -> RunOutcome {
    run_observed(
        testkit::bus(),
        handler,
        first,
        testkit::settings(),
        Clock::tokio(),
        Duration::from_secs(3600),
        None,
    )
    .await
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_driven_run_reports_success() {
    let first = envelope(Stage::Snapshot);
    let start = Instant::now();
    let outcome = drive(pipeline(&[], false), first.clone()).await;
    assert_eq!(outcome.result, RunResult::Succeeded);
    assert!(!outcome.timed_out);
    assert_eq!(outcome.run_id, first.run_id);
    let verified = outcome
        .events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::PoolVerified { .. }))
        .count();
    assert_eq!(verified, 3);
    // The image wait (3 s) and the second region (60 s later) are the only waits.
    assert_eq!(Instant::now() - start, Duration::from_secs(63));
    assert_eq!(outcome.runtime.abandoned, 0);
}

#[tokio::test(start_paused = true)]
async fn a_driven_run_reports_partial_success() {
    let outcome = drive(pipeline(&["sim"], true), envelope(Stage::Snapshot)).await;
    match outcome.result {
        RunResult::PartlySucceeded { failed } => {
            let failed: Vec<(&str, &str)> = failed.iter().map(|(p, r)| (p.target.as_str(), r.as_str())).collect();
            assert_eq!(
                failed,
                [
                    ("sim", "AllocationFailed"),
                    ("batch", "not created: replication to eastus failed: ReplicationFailed")
                ]
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_driven_run_reports_a_failed_run() {
    // The very first call fails for good: there is no RunStarted, and the run still ends.
    let handler = Script::new(|_| Err(forbidden()));
    let outcome = drive(handler, envelope(Stage::Snapshot)).await;
    assert_eq!(
        outcome.result,
        RunResult::Failed {
            reason: forbidden().to_string()
        }
    );
    let outcome = drive(pipeline(&["render", "sim", "batch"], false), envelope(Stage::Snapshot)).await;
    assert!(matches!(outcome.result, RunResult::Failed { ref reason } if reason.contains("render: AllocationFailed")));
}

#[tokio::test(start_paused = true)]
async fn a_driven_run_gives_up_at_its_timeout() {
    let handler = Script::new(|m| {
        step(Outcome::Wait {
            message: Box::new(m.clone()),
            delay: Duration::from_secs(600),
            emit: Vec::new(),
        })
        .map(|s| {
            s.with(EventKind::RunStarted {
                rollout: false,
                regions: regions(),
                pools: pools(),
            })
        })
    });
    let start = Instant::now();
    let outcome = run_observed(
        testkit::bus(),
        handler,
        envelope(Stage::Snapshot),
        testkit::settings(),
        Clock::tokio(),
        Duration::from_secs(1700),
        None,
    )
    .await
    .unwrap();
    assert!(outcome.timed_out);
    assert_eq!(outcome.result, RunResult::Running);
    assert_eq!(Instant::now() - start, Duration::from_secs(1700));
    assert_eq!(outcome.events.len(), 3, "looked at 0, 600 and 1200 s");
}

#[tokio::test(start_paused = true)]
async fn settings_are_checked_before_anything_runs() {
    let mut settings = testkit::settings();
    settings.consumers = 0;
    let handler = Script::new(|_| step(Outcome::Done));
    let err = Runtime::new(testkit::bus(), handler, Stage::ALL.to_vec(), settings)
        .err()
        .unwrap();
    assert_eq!(err.key, "consumers");
}

#[test]
fn a_hold_sits_on_the_operation_when_there_is_one_and_never_moves_earlier() {
    let t = |s: i64| OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(s);
    let mut message = envelope(Stage::Verify);
    assert_eq!(message.due(), None);
    message.hold_until(t(10));
    message.hold_until(t(5));
    assert_eq!((message.not_before, message.due()), (Some(t(10)), Some(t(10))));

    let mut op = in_flight(Phase::Allocation);
    op.not_before = t(30);
    message.operation = Some(op);
    assert_eq!(message.due(), Some(t(30)), "the later of the two");
    message.hold_until(t(20));
    assert_eq!(message.operation.as_ref().unwrap().not_before, t(30));
    message.hold_until(t(40));
    assert_eq!(message.operation.as_ref().unwrap().not_before, t(40));
    assert_eq!(message.not_before, Some(t(10)), "the envelope's hold is left alone");

    let next = message.next(Stage::Verify, t(0));
    assert_eq!((next.due(), next.attempt), (None, 0), "a new step starts with no hold");
}

#[tokio::test(start_paused = true)]
async fn a_driven_run_feeds_its_events_to_the_metrics() {
    // What `sigrun run --metrics-listen` exports: the run-level metrics from its own event log.
    let first = envelope(Stage::Snapshot);
    let telemetry = Arc::new(crate::telemetry::Telemetry::new());
    let outcome = run_observed(
        testkit::bus(),
        pipeline(&[], false),
        first.clone(),
        testkit::settings(),
        Clock::tokio(),
        Duration::from_secs(3600),
        Some(Arc::clone(&telemetry) as Arc<dyn Observer>),
    )
    .await
    .unwrap();
    assert_eq!(outcome.result, RunResult::Succeeded);
    let text = telemetry.render();
    let pipeline = &first.pipeline;
    for series in [
        format!("sigrun_runs_started_total{{pipeline=\"{pipeline}\"}} 1"),
        format!("sigrun_runs_finished_total{{pipeline=\"{pipeline}\",result=\"succeeded\"}} 1"),
        "sigrun_runs_in_flight{stage=\"verify\"} 0".to_string(),
        format!("sigrun_stage_duration_seconds_count{{pipeline=\"{pipeline}\",stage=\"snapshot\"}} 1"),
        "sigrun_azure_operation_duration_seconds_count{operation=\"image\"} 1".to_string(),
    ] {
        assert!(text.contains(&series), "{series}:\n{text}");
    }
}

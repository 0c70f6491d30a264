//! Waits held for their next look (`runtime::held`), on the in-process bus with tokio's clock
//! paused: a look that records nothing keeps its delivery and costs the bus nothing, one that
//! records sends its message on as before, the hold is bounded in slots and in time, and a runtime
//! that stops hands its held waits on through a delay tier.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;

use super::testkit::{self, Script, envelope};
use super::*;
use crate::bus::Bus;
use crate::events::EventKind;
use crate::model::envelope::{Envelope, InFlight, Phase, Stage};
use crate::stages::{Outcome, Step};

fn runtime(bus: Arc<crate::bus::memory::MemoryBus>, handler: Arc<Script>, settings: RuntimeSettings) -> Runtime {
    testkit::runtime_with(bus, handler, Clock::tokio(), settings)
}

/// Waits on replication every `every` for `looks` looks, then is done. The first wait says that
/// it waits (a `Waiting` note); none of them records anything.
fn replication(looks: u32, every: Duration) -> Arc<Script> {
    Script::new(move |m| {
        let polls = m.operation.as_ref().map_or(0, |op| op.polls);
        if m.operation.is_some() && polls + 2 >= looks {
            return Ok(Step::new(Outcome::Done));
        }
        let first = m.operation.is_none();
        let mut again = m.clone();
        again.operation = Some(InFlight {
            what: Phase::Replication,
            status_urls: Vec::new(),
            started: m.stage_started,
            not_before: m.stage_started,
            polls: if first { 0 } else { polls + 1 },
            progress: Default::default(),
        });
        let step = Step::new(Outcome::Wait {
            message: Box::new(again),
            delay: every,
            emit: Vec::new(),
        });
        Ok(if first {
            step.with(EventKind::Waiting {
                what: "replication".into(),
            })
        } else {
            step
        })
    })
}

/// Runs a runtime of every stage with `slots` held slots a stage for two seconds.
async fn run_with_slots(
    bus: &Arc<crate::bus::memory::MemoryBus>,
    handler: &Arc<Script>,
    slots: usize,
) -> RuntimeReport {
    let settings = RuntimeSettings {
        held_waits: slots,
        ..testkit::settings()
    };
    runtime(bus.clone(), handler.clone(), settings)
        .run(tokio::time::sleep(Duration::from_secs(2)))
        .await
}

fn looked_at(handler: &Script, start: Instant) -> Vec<u64> {
    handler
        .calls()
        .iter()
        .map(|c| u64::try_from((c.at - start).as_millis()).unwrap())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_wait_that_records_nothing_is_held_here_and_costs_the_bus_nothing() {
    let bus = testkit::bus();
    let handler = replication(5, Duration::from_millis(120));
    bus.publish(Stage::Replicate, &envelope(Stage::Replicate).encode(), None)
        .await
        .unwrap();
    let start = Instant::now();
    let runtime = runtime(bus.clone(), handler.clone(), testkit::settings());
    let running = tokio::spawn(async move { runtime.run(tokio::time::sleep(Duration::from_secs(2))).await });

    // Between its looks the message is held here: one delivery unacked, nothing on a tier.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let between = bus.stats();
    assert_eq!((between.unacked, between.waiting, between.ready), (1, 0, 0));
    let report = running.await.unwrap();

    assert_eq!(
        looked_at(&handler, start),
        [0, 120, 240, 360, 480],
        "each look when due"
    );
    let stats = bus.stats();
    // One delivery for all five looks; its note published once, on the first look.
    assert_eq!((stats.delayed, stats.delivered, stats.acked), (0, 1, 1));
    assert_eq!((report.handled, report.abandoned), (5, 0), "every look counted");
    assert!(stats.is_idle());
    assert_eq!(
        bus.events().iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
        [EventKind::Waiting {
            what: "replication".into()
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn with_no_slots_every_wait_goes_round_a_delay_tier() {
    let bus = testkit::bus();
    let handler = replication(5, Duration::from_millis(120));
    bus.publish(Stage::Replicate, &envelope(Stage::Replicate).encode(), None)
        .await
        .unwrap();
    let start = Instant::now();

    run_with_slots(&bus, &handler, 0).await;

    assert_eq!(looked_at(&handler, start), [0, 120, 240, 360, 480]);
    let stats = bus.stats();
    assert_eq!((stats.delayed, stats.delivered, stats.acked), (4, 5, 5));
    assert!(stats.is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_delivery_is_held_no_longer_than_hold_max_in_all() {
    let bus = testkit::bus();
    let handler = replication(7, Duration::from_millis(120));
    bus.publish(Stage::Replicate, &envelope(Stage::Replicate).encode(), None)
        .await
        .unwrap();
    let start = Instant::now();
    let settings = RuntimeSettings {
        hold_max: Duration::from_millis(250),
        ..testkit::settings()
    };

    runtime(bus.clone(), handler.clone(), settings)
        .run(tokio::time::sleep(Duration::from_secs(2)))
        .await;

    assert_eq!(looked_at(&handler, start), [0, 120, 240, 360, 480, 600, 720]);
    // Delivery 1 is held at 0 and 120; at 240 another 120 would hold it 360 ms in all, so its
    // next state is sent on, ahead of its time, straight to its queue (not round a tier).
    // Delivery 2, taken at 240, is held until 360 and at 360; at 480 it is sent on again.
    // Delivery 3, taken at 480, is held until 600, at 600, and done at 720.
    let stats = bus.stats();
    assert_eq!((stats.delayed, stats.delivered, stats.acked), (0, 3, 3));
    assert!(stats.is_idle());
}

#[tokio::test(start_paused = true)]
async fn waits_beyond_the_slots_go_round_a_tier_and_every_run_ends() {
    let bus = testkit::bus();
    let handler = replication(4, Duration::from_millis(100));
    for _ in 0..3 {
        bus.publish(Stage::Replicate, &envelope(Stage::Replicate).encode(), None)
            .await
            .unwrap();
    }
    run_with_slots(&bus, &handler, 1).await;

    assert_eq!(handler.calls().len(), 12, "three runs, four looks each");
    let stats = bus.stats();
    // Of the nine waits, the one slot held some and the rest went round a tier.
    assert!((1..9).contains(&stats.delayed), "some held, some not: {stats:?}");
    assert!(stats.is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_held_wait_keeps_its_slot_from_look_to_look() {
    // One slot: the wait holds it at its first look and its later looks hold it again with the
    // same slot (taking a second one first would find none and go round a tier at every look).
    let bus = testkit::bus();
    let handler = replication(5, Duration::from_millis(100));
    bus.publish(Stage::Replicate, &envelope(Stage::Replicate).encode(), None)
        .await
        .unwrap();
    run_with_slots(&bus, &handler, 1).await;

    assert_eq!(handler.calls().len(), 5);
    let stats = bus.stats();
    assert_eq!(stats.delayed, 0, "held from look to look in its one slot: {stats:?}");
    assert_eq!((stats.delivered, stats.acked), (1, 1), "{stats:?}");
    assert!(stats.is_idle());
}

#[tokio::test(start_paused = true)]
async fn each_stage_a_runtime_consumes_has_slots_of_its_own() {
    // One slot per stage: a replicate wait and a verify wait are both held throughout, as each
    // would be in a worker of its stage alone. One slot shared by the process would send one of
    // them round a tier.
    let bus = testkit::bus();
    let handler = replication(4, Duration::from_millis(100));
    for stage in [Stage::Replicate, Stage::Verify] {
        bus.publish(stage, &envelope(stage).encode(), None).await.unwrap();
    }
    run_with_slots(&bus, &handler, 1).await;

    assert_eq!(handler.calls().len(), 8, "two runs, four looks each");
    let stats = bus.stats();
    assert_eq!(stats.delayed, 0, "both waits held, none round a tier: {stats:?}");
    assert!(stats.is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_runtime_that_stops_hands_its_held_waits_on_through_a_tier() {
    let bus = testkit::bus();
    let handler = replication(1000, Duration::from_secs(3));
    let first = envelope(Stage::Replicate);
    bus.publish(Stage::Replicate, &first.encode(), None).await.unwrap();
    let start = Instant::now();

    // Looks at 0 and 3 s, held each time (until 6 s after the second); stops at 4 s.
    let report = runtime(bus.clone(), handler.clone(), testkit::settings())
        .run(tokio::time::sleep(Duration::from_secs(4)))
        .await;

    assert_eq!(Instant::now() - start, Duration::from_secs(4), "no grace spent waiting");
    assert_eq!(report.abandoned, 0);
    assert_eq!(looked_at(&handler, start), [0, 3000]);
    let stats = bus.stats();
    assert_eq!((stats.delayed, stats.acked, stats.unacked, stats.waiting), (1, 1, 0, 1));
    // What waits on the tier is the held message as its last look left it: due at 6 s.
    let again = bus.next(&[Stage::Replicate]).await.unwrap();
    assert_eq!(Instant::now() - start, Duration::from_secs(6));
    let waiting = Envelope::decode(&again.body).unwrap();
    assert_eq!(waiting.message_id, first.message_id);
    assert_eq!(waiting.operation.map(|op| op.polls), Some(1));
}

#[tokio::test(start_paused = true)]
async fn a_held_wait_of_a_run_cancelled_meanwhile_stops_at_its_next_look() {
    let bus = testkit::bus();
    let handler = replication(1000, Duration::from_secs(1));
    let ledger = Arc::new(crate::ledger::Ledger::start(
        bus.clone(),
        testkit::settings().ledger(),
        None,
    ));
    ledger.catch_up(Duration::from_secs(1)).await.unwrap();
    // A message from before the ledger (no token): the cancel gate alone decides.
    let mut message = envelope(Stage::Replicate);
    message.token = uuid::Uuid::nil();
    bus.publish(Stage::Replicate, &message.encode(), None).await.unwrap();
    let runtime = runtime(bus.clone(), handler.clone(), testkit::settings()).with_ledger(ledger);
    let running = tokio::spawn(async move { runtime.run(tokio::time::sleep(Duration::from_secs(10))).await });

    // Held from its look at 1 s until 2 s; cancelled at 1.5 s.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(bus.stats().unacked, 1, "held");
    let cancel = crate::events::Event {
        run_id: message.run_id,
        pipeline: message.pipeline.clone(),
        version: message.version.clone(),
        stage: Stage::Replicate,
        branch: message.branch.clone(),
        at: OffsetDateTime::now_utc(),
        kind: EventKind::CancelRequested,
    };
    bus.publish_event(&cancel).await.unwrap();
    running.await.unwrap();

    assert_eq!(handler.calls().len(), 2, "no look once cancelled");
    let kinds: Vec<EventKind> = bus.events().into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds.last(), Some(&EventKind::Cancelled));
    assert!(bus.stats().is_idle());
}

/// Records something (a resource made, its next state carrying it), then waits `every` on it and
/// is done at the next look.
fn made_then_waits(every: Duration) -> Arc<Script> {
    Script::new(move |m| {
        if !m.artifacts.recorded.is_empty() {
            return Ok(Step::new(Outcome::Done));
        }
        let mut again = m.clone();
        again.artifacts.recorded.push("snapshot-os".into());
        let step = Step::new(Outcome::Wait {
            message: Box::new(again),
            delay: every,
            emit: Vec::new(),
        });
        Ok(step.with(EventKind::ResourceCreated {
            id: "snapshot-os".into(),
        }))
    })
}

/// Runs `handler` over one fenced run's first message for 2 s: the bus after, and when it began.
async fn fenced_run(handler: Arc<Script>, settings: RuntimeSettings) -> (Arc<crate::bus::memory::MemoryBus>, Instant) {
    let bus = testkit::bus();
    let ledger = Arc::new(crate::ledger::Ledger::start(bus.clone(), settings.ledger(), None));
    ledger.catch_up(Duration::from_secs(1)).await.unwrap();
    let (first, started) = testkit::fresh_run();
    crate::admission::begin_with(bus.as_ref(), &ledger, vec![first], started)
        .await
        .unwrap();
    let start = Instant::now();
    runtime(bus.clone(), handler, settings)
        .with_ledger(ledger)
        .run(tokio::time::sleep(Duration::from_secs(2)))
        .await;
    (bus, start)
}

#[tokio::test(start_paused = true)]
async fn a_next_state_due_later_goes_straight_to_its_queue_and_waits_there_for_its_time() {
    for fencing in [crate::ledger::Fencing::CommitFirst, crate::ledger::Fencing::ClaimFirst] {
        let handler = made_then_waits(Duration::from_millis(300));
        // Kept with its delivery instead is `keep_tests`'.
        let settings = RuntimeSettings {
            fencing,
            keep_waits: false,
            ..testkit::settings()
        };

        let (bus, start) = fenced_run(handler.clone(), settings).await;

        assert_eq!(
            looked_at(&handler, start),
            [0, 300],
            "{fencing:?}: the next look when due"
        );
        let stats = bus.stats();
        // Sent on unchanged but for its state, taken at once, held by its taker until due: one
        // publish and one delivery, nothing round a tier.
        assert_eq!((stats.delayed, stats.delivered, stats.acked), (0, 2, 2), "{fencing:?}");
        assert!(stats.is_idle(), "{fencing:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn with_no_slot_free_a_next_state_due_later_goes_round_a_tier() {
    let handler = made_then_waits(Duration::from_millis(300));
    let settings = RuntimeSettings {
        held_waits: 0,
        ..testkit::settings()
    };

    let (bus, start) = fenced_run(handler.clone(), settings).await;

    assert_eq!(looked_at(&handler, start), [0, 300]);
    let stats = bus.stats();
    assert_eq!((stats.delayed, stats.delivered, stats.acked), (1, 2, 2));
    assert!(stats.is_idle());
}

#[tokio::test(start_paused = true)]
async fn an_early_delivery_waits_where_it_was_taken_and_round_a_tier_only_without_a_slot() {
    // With a slot, one look (the one when due); without, an early one back to a tier, then it.
    for (slots, round_a_tier, looks) in [(4, 0, 1), (0, 1, 2)] {
        let bus = testkit::bus();
        let handler = Script::new(|_| Ok(Step::new(Outcome::Done)));
        // Published ahead of its time, by hand: due in 700 ms.
        let mut early = envelope(Stage::Verify);
        early.not_before = Some(Clock::tokio().now() + Duration::from_millis(700));
        bus.publish(Stage::Verify, &early.encode(), None).await.unwrap();
        let start = Instant::now();

        let report = run_with_slots(&bus, &handler, slots).await;

        assert_eq!(looked_at(&handler, start), [700], "{slots} slots: looked at when due");
        assert_eq!(report.handled, looks, "{slots} slots: looks counted");
        let stats = bus.stats();
        assert_eq!(stats.delayed, round_a_tier, "{slots} slots");
        assert!(stats.is_idle());
    }
}

#[tokio::test(start_paused = true)]
async fn a_copy_put_off_before_its_step_waits_here_not_round_a_tier() {
    let bus = testkit::bus();
    let settings = testkit::settings();
    let ledger = Arc::new(crate::ledger::Ledger::start(bus.clone(), settings.ledger(), None));
    let (first, started) = testkit::fresh_run();
    crate::admission::begin_with(bus.as_ref(), &ledger, vec![first], started)
        .await
        .unwrap();
    let first = Envelope::decode(&bus.ready(Stage::Snapshot)[0]).unwrap();
    // Another worker holds the step's claim (and has not committed): every copy is put off.
    let holder = Arc::new(crate::ledger::Ledger::start(bus.clone(), settings.ledger(), None));
    holder.catch_up(Duration::from_secs(1)).await.unwrap();
    let claimed = holder.claim(&crate::ledger::ClaimKey::of(&first)).await.unwrap();
    assert!(matches!(claimed, crate::ledger::Claimed::Won { .. }), "{claimed:?}");
    let handler = Script::new(|_| Ok(Step::new(Outcome::Done)));
    let runtime = runtime(bus.clone(), handler.clone(), settings.clone()).with_ledger(ledger);
    let window = settings.claim_timeout - Duration::from_millis(300);
    let running = tokio::spawn(async move { runtime.run(tokio::time::sleep(window)).await });

    // Put off at once and again at 1 s, each time held here with its one delivery.
    tokio::time::sleep(window - Duration::from_millis(200)).await;
    assert!(handler.calls().is_empty(), "not stepped while another claim holds it");
    let stats = bus.stats();
    assert_eq!(
        (stats.delayed, stats.delivered, stats.unacked),
        (0, 1, 1),
        "put off here, never round a tier: {stats:?}"
    );
    running.await.unwrap();
    // A runtime that stops hands what it holds on through a tier.
    assert_eq!((bus.stats().delayed, bus.stats().unacked), (1, 0));
}

//! Waits kept with their delivery (`runtime.keep_waits`): a fenced step with a successor that is a
//! wait due later, of a stage the runtime consumes, commits that successor (whole, in the commit)
//! and holds it with its own delivery instead of publishing it. What must hold: the wait costs the
//! bus no message; the run records what it would have; and a worker that dies while it keeps a
//! wait loses nothing: the delivery comes back, the next worker reads the kept successor back from
//! the history and carries it on, without stepping the spent state again.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::testkit::{self, Script, fresh_run};
use super::*;
use crate::admission::{Begun, begin_with};
use crate::bus::memory::MemoryBus;
use crate::events::EventKind;
use crate::ledger::record::{Commit, Record};
use crate::ledger::{Fencing, Ledger};
use crate::model::envelope::Stage;
use crate::stages::{Outcome, Step, Tried};

/// How long the wait each step starts lasts.
const WAIT: Duration = Duration::from_secs(20);

/// Snapshot records its snapshot and waits `WAIT` for it (its next state records it made it);
/// then it advances to image-create, which records its image and waits `WAIT` too, then is done.
fn made_then_waited_on() -> Arc<Script> {
    Script::new(|m| {
        let made = !m.artifacts.recorded.is_empty();
        match (m.stage, made) {
            (Stage::Snapshot | Stage::ImageCreate, false) => {
                let mut again = m.clone();
                again.artifacts.recorded.push(format!("{}-made", m.stage));
                let step = Step::new(Outcome::Wait {
                    message: Box::new(again),
                    delay: WAIT,
                    emit: Vec::new(),
                });
                Ok(step.with(EventKind::ResourceCreated {
                    id: format!("{}-made", m.stage),
                }))
            }
            (Stage::Snapshot, true) => {
                let mut next = m.next(Stage::ImageCreate, m.stage_started);
                next.artifacts.recorded.clear();
                Ok(Step::new(Outcome::Advance(vec![next])))
            }
            (Stage::ImageCreate, true) => Ok(Step::new(Outcome::Done)),
            (other, _) => panic!("no step of {other} in this run"),
        }
    })
}

/// A fresh bus with one run admitted on it (by a ledger fenced as `fencing` says, gone after).
async fn admitted(fencing: Fencing) -> (Arc<MemoryBus>, Uuid) {
    let bus = testkit::bus();
    let ledger = Ledger::start(bus.clone(), settings(fencing, true).ledger(), None);
    let (first, started) = fresh_run();
    let run_id = first.run_id;
    let begun = begin_with(bus.as_ref(), &ledger, vec![first], started).await;
    assert!(matches!(begun, Ok(Begun::Started { .. })), "{begun:?}");
    (bus, run_id)
}

/// Works the bus for `window` of tokio's time with a fresh ledger, as a worker would.
async fn work(bus: Arc<MemoryBus>, handler: Arc<Script>, settings: RuntimeSettings, window: Duration) {
    let ledger = Arc::new(Ledger::start(bus.clone(), settings.ledger(), None));
    ledger.catch_up(Duration::from_secs(1)).await.unwrap();
    Runtime::new(bus, handler, Stage::ALL.to_vec(), settings)
        .unwrap()
        .with_clock(Clock::tokio())
        .with_ledger(ledger)
        .run(tokio::time::sleep(window))
        .await;
}

fn settings(fencing: Fencing, keep_waits: bool) -> RuntimeSettings {
    RuntimeSettings {
        fencing,
        keep_waits,
        ..testkit::settings()
    }
}

/// The commits of the run's steps (not its admission's).
fn step_commits(bus: &MemoryBus, run_id: Uuid) -> Vec<Commit> {
    bus.records()
        .into_iter()
        .filter_map(|record| match record {
            Record::Commit(c) if c.run_id == run_id && c.consumed.as_ref().is_some_and(|x| x.token != run_id) => {
                Some(c)
            }
            _ => None,
        })
        .collect()
}

/// The run's recorded events other than its start, as (stage, kind).
fn recorded(bus: &MemoryBus, run_id: Uuid) -> Vec<(Stage, EventKind)> {
    crate::ledger::book::counted_events(&bus.records())
        .into_iter()
        .filter(|e| e.run_id == run_id && !matches!(e.kind, EventKind::RunStarted { .. }))
        .map(|e| (e.stage, e.kind))
        .collect()
}

fn made(stage: Stage) -> (Stage, EventKind) {
    (
        stage,
        EventKind::ResourceCreated {
            id: format!("{stage}-made"),
        },
    )
}

/// A tokio runtime on a paused clock, as `#[tokio::test(start_paused = true)]` makes: one per
/// worker, so dropping it is that worker dying (its tasks, and the deliveries they hold, gone).
fn worker_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_wait_due_later_is_kept_with_its_delivery_and_costs_the_bus_no_message() {
    for fencing in [Fencing::ClaimFirst, Fencing::CommitFirst] {
        let (bus, run_id) = admitted(fencing).await;
        let handler = made_then_waited_on();

        work(
            bus.clone(),
            handler.clone(),
            settings(fencing, true),
            Duration::from_secs(60),
        )
        .await;

        let stages: Vec<Stage> = handler.calls().iter().map(|c| c.message.stage).collect();
        assert_eq!(
            stages,
            [Stage::Snapshot, Stage::Snapshot, Stage::ImageCreate, Stage::ImageCreate],
            "{fencing:?}: each step once, the waits looked at when due"
        );
        let stats = bus.stats();
        assert_eq!(
            (stats.published, stats.delayed, stats.delivered, stats.acked),
            (1, 0, 1, 1),
            "{fencing:?}: only the admission's message went through the bus, delivered and acked once"
        );
        assert!(stats.is_idle(), "{fencing:?}");
        let commits = step_commits(&bus, run_id);
        let first = commits[0].consumed.as_ref().unwrap().token;
        let kept: Vec<Option<Uuid>> = commits.iter().map(|c| c.kept.as_ref().map(|k| k.carrier)).collect();
        assert_eq!(
            kept,
            [Some(first), Some(first), None],
            "{fencing:?}: both waits kept with the first message's delivery (image-create's \
             stepped on from snapshot's last look): {commits:#?}"
        );
        assert_eq!(
            recorded(&bus, run_id),
            [made(Stage::Snapshot), made(Stage::ImageCreate)],
            "{fencing:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn with_keep_waits_off_each_wait_goes_through_its_queue() {
    let (bus, run_id) = admitted(Fencing::ClaimFirst).await;
    let handler = made_then_waited_on();

    work(
        bus.clone(),
        handler.clone(),
        settings(Fencing::ClaimFirst, false),
        Duration::from_secs(60),
    )
    .await;

    assert_eq!(handler.calls().len(), 4);
    let stats = bus.stats();
    assert_eq!(
        stats.published + stats.delayed,
        3,
        "the admission's message and each wait's: {stats:?}"
    );
    assert!(step_commits(&bus, run_id).iter().all(|c| c.kept.is_none()));
    assert_eq!(
        recorded(&bus, run_id),
        [made(Stage::Snapshot), made(Stage::ImageCreate)]
    );
}

#[test]
fn a_kept_wait_whose_worker_died_is_carried_on_by_the_next_worker() {
    for fencing in [Fencing::ClaimFirst, Fencing::CommitFirst] {
        let handler = made_then_waited_on();
        // The first worker steps snapshot, keeps its wait, and dies 5 s into it.
        let (bus, run_id) = worker_runtime().block_on(async {
            let (bus, run_id) = admitted(fencing).await;
            let working = work(
                bus.clone(),
                handler.clone(),
                settings(fencing, true),
                Duration::from_secs(3600),
            );
            assert!(
                tokio::time::timeout(Duration::from_secs(5), working).await.is_err(),
                "the first worker was still at work"
            );
            (bus, run_id)
        });
        assert_eq!(handler.calls().len(), 1, "{fencing:?}: snapshot stepped, its wait kept");
        assert!(
            step_commits(&bus, run_id)[0].kept.is_some(),
            "{fencing:?}: its wait kept"
        );

        // The next worker takes the delivery back: the wait goes on from the kept state.
        worker_runtime().block_on(work(
            bus.clone(),
            handler.clone(),
            settings(fencing, true),
            Duration::from_secs(120),
        ));

        let calls = handler.calls();
        let steps: Vec<(Stage, bool, Tried)> = calls
            .iter()
            .map(|c| (c.message.stage, c.message.artifacts.recorded.is_empty(), c.tried))
            .collect();
        assert_eq!(
            steps.iter().take(2).cloned().collect::<Vec<_>>(),
            [
                (Stage::Snapshot, true, Tried::Never),
                (Stage::Snapshot, false, Tried::Maybe)
            ],
            "{fencing:?}: the spent state is not stepped again; the kept one is looked at, as a \
             state whose delivery came back"
        );
        assert_eq!(
            recorded(&bus, run_id),
            [made(Stage::Snapshot), made(Stage::ImageCreate)],
            "{fencing:?}: every step recorded once"
        );
        assert_eq!(
            calls.len(),
            4,
            "{fencing:?}: and on to the end of the branch: {steps:?}"
        );
        let stats = bus.stats();
        assert_eq!(
            (stats.published, stats.delayed),
            (1, 0),
            "{fencing:?}: nothing published for the waits, before or after: {stats:?}"
        );
        assert!(
            stats.is_idle(),
            "{fencing:?}: the delivery was acked once the run ended: {stats:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_runtime_that_stops_hands_a_kept_wait_on_as_its_own_message() {
    let (bus, run_id) = admitted(Fencing::ClaimFirst).await;
    let handler = made_then_waited_on();

    // Stops 5 s into snapshot's wait: the kept state goes on through a tier, the delivery is acked.
    work(
        bus.clone(),
        handler.clone(),
        settings(Fencing::ClaimFirst, true),
        Duration::from_secs(5),
    )
    .await;
    let stats = bus.stats();
    assert_eq!((stats.delivered, stats.acked, stats.delayed), (1, 1, 1), "{stats:?}");
    // Another worker carries the wait on from what was handed on.
    work(
        bus.clone(),
        handler.clone(),
        settings(Fencing::ClaimFirst, true),
        Duration::from_secs(120),
    )
    .await;

    assert_eq!(handler.calls().len(), 4);
    assert_eq!(
        recorded(&bus, run_id),
        [made(Stage::Snapshot), made(Stage::ImageCreate)]
    );
    assert!(bus.stats().is_idle());
}

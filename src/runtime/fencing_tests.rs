//! The runtime fenced by the ledger, on the in-process bus, under the faults an at-least-once
//! broker brings: every publish may land twice, an ack may fail after everything it caused was
//! published (the broker then hands the message out again), a holder may die between its claim
//! and its commit, and two admitters may start the same run at once. Whatever happens, each step
//! of a run is worked from one message id, recorded once, and the run ends as it would without
//! faults. Time is tokio's paused clock; the faults come from a seeded generator.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use uuid::Uuid;

use super::testkit::{self, Script, fresh_run, pools};
use super::*;
use crate::admission::{Begun, begin_with};
use crate::azure::AzureError;
use crate::bus::memory::MemoryBus;
use crate::bus::{Acker, Bus, BusError, Delivery, HistoryReader, ParkReason, StreamOffset};
use crate::events::{Event, EventKind, PoolRef, RunResult, run_result};
use crate::ledger::book::counted_events;
use crate::ledger::record::{Commit, Consumed, Record, Successor};
use crate::ledger::{ClaimKey, Claimed, Fencing, Ledger, Standing};
use crate::model::envelope::{Envelope, InFlight, Phase, Stage};
use crate::stages::{Outcome, Step, Tried};

fn step(outcome: Outcome) -> Result<Step, AzureError> {
    Ok(Step::new(outcome))
}

fn waiting_on(message: &Envelope, what: Phase, delay: Duration) -> Result<Step, AzureError> {
    let mut again = message.clone();
    again.operation = Some(InFlight {
        what,
        status_urls: Vec::new(),
        started: message.stage_started,
        not_before: message.stage_started,
        polls: 0,
        progress: Default::default(),
    });
    step(Outcome::Wait {
        message: Box::new(again),
        delay,
        emit: Vec::new(),
    })
    .map(|s| {
        s.with(EventKind::Waiting {
            what: what.as_str().into(),
        })
    })
}

/// A run in miniature with a step of every kind: a wait recorded once (the image), waits that
/// record nothing (replication before its region completes), a wait that sends pool branches on
/// and records their region (replicate), a creation that records a resource, and a branch end.
/// Every step writes to Azure.
pub(super) fn nightly() -> Arc<Script> {
    Script::new(nightly_step)
}

/// The same run as a real one reads and writes: the image's look, replication and verify only
/// read, so under claiming first they commit first (`Ledger::fencing_for`), beside steps that
/// claim.
pub(super) fn nightly_reading() -> Arc<Script> {
    Script::with_reads(nightly_step, |m| match m.stage {
        Stage::ImageCreate => m.operation.is_some(),
        Stage::Replicate | Stage::Verify => true,
        Stage::Snapshot | Stage::GalleryPublish | Stage::PoolCreate => false,
    })
}

fn nightly_step(m: &Envelope) -> Result<Step, AzureError> {
    let now = m.stage_started;
    let next = |stage| step(Outcome::Advance(vec![m.next(stage, now)]));
    match m.stage {
        Stage::Snapshot => next(Stage::ImageCreate).map(|s| {
            s.with(EventKind::ResourceCreated {
                id: format!("snapshot-{}", m.run_id),
            })
        }),
        Stage::ImageCreate if m.operation.is_none() => waiting_on(m, Phase::Image, Duration::from_secs(3)),
        Stage::ImageCreate => next(Stage::GalleryPublish),
        Stage::GalleryPublish => next(Stage::Replicate),
        Stage::Replicate => replicate(m),
        Stage::PoolCreate => next(Stage::Verify).map(|s| {
            s.with(EventKind::PoolCreated {
                pool_id: m.branch.label(),
            })
        }),
        Stage::Verify => step(Outcome::Done).map(|s| {
            s.with(EventKind::PoolVerified {
                pool_id: m.branch.label(),
            })
        }),
    }
}

/// westeurope completes on the first look, eastus on a look at least 30 s after the stage began.
fn replicate(m: &Envelope) -> Result<Step, AzureError> {
    let now = m.stage_started;
    let done = &m.artifacts.regions_completed;
    let looks = m.operation.as_ref().map_or(0, |op| op.polls);
    let region = match (done.is_empty(), looks >= 3) {
        (true, _) => "westeurope",
        (false, true) => "eastus",
        (false, false) => {
            // Nothing new: a wait that records nothing.
            let mut again = m.clone();
            if let Some(op) = again.operation.as_mut() {
                op.polls += 1;
            }
            return step(Outcome::Wait {
                message: Box::new(again),
                delay: Duration::from_secs(10),
                emit: Vec::new(),
            });
        }
    };
    let mut progressed = m.clone();
    progressed.artifacts.regions_completed.push(region.into());
    let branches: Vec<Envelope> = pools()
        .into_iter()
        .filter(|p: &PoolRef| p.region == region)
        .map(|p| progressed.for_pool(Stage::PoolCreate, &p.region, &p.target, now))
        .collect();
    let completed = EventKind::RegionCompleted { region: region.into() };
    if region == "eastus" {
        return step(Outcome::Advance(branches)).map(|s| s.with(completed));
    }
    progressed.operation = Some(InFlight {
        what: Phase::Replication,
        status_urls: Vec::new(),
        started: now,
        not_before: now,
        polls: 0,
        progress: Default::default(),
    });
    step(Outcome::Wait {
        message: Box::new(progressed),
        delay: Duration::from_secs(10),
        emit: branches,
    })
    .map(|s| s.with(completed))
}

/// The in-process bus with an at-least-once broker's faults: each stage publish (now or delayed)
/// lands twice with probability `twice`, and each ack fails with probability `ack_fails` — the
/// message goes back to its queue although everything the step caused was published. (Copies of
/// a waiting message's state look side by side until one records something, so with faults on
/// every hop their number grows with each hop: the rates are those of a bad day, not of every
/// publish failing.)
struct Unreliable {
    inner: Arc<MemoryBus>,
    rng: Mutex<ChaCha8Rng>,
    twice: f64,
    ack_fails: f64,
    /// The chance that a ledger's reader pauses before a record (see [`Lagging`]).
    lag: f64,
    doubled: AtomicU64,
    failed_acks: Arc<AtomicU64>,
}

impl Unreliable {
    fn new(seed: u64, twice: f64, ack_fails: f64) -> Arc<Unreliable> {
        Unreliable::lagging(seed, twice, ack_fails, 0.0)
    }

    /// The same, with every ledger's reader falling behind now and then (`lag`: see [`Lagging`]).
    fn lagging(seed: u64, twice: f64, ack_fails: f64, lag: f64) -> Arc<Unreliable> {
        Arc::new(Unreliable {
            inner: testkit::bus(),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            twice,
            ack_fails,
            lag,
            doubled: AtomicU64::new(0),
            failed_acks: Arc::new(AtomicU64::new(0)),
        })
    }

    fn roll(&self, p: f64) -> bool {
        self.rng.lock().unwrap().random_bool(p)
    }

    fn copies(&self) -> usize {
        if self.roll(self.twice) {
            self.doubled.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        }
    }
}

struct FailingAck {
    inner: Box<dyn Acker>,
    failed: Arc<AtomicU64>,
}

#[async_trait]
impl Acker for FailingAck {
    async fn ack(self: Box<Self>) -> Result<(), BusError> {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.inner.requeue().await?;
        Err(BusError::Connection("the channel closed before the ack".into()))
    }

    async fn requeue(self: Box<Self>) -> Result<(), BusError> {
        self.inner.requeue().await
    }
}

#[async_trait]
impl Bus for Unreliable {
    async fn publish(&self, stage: Stage, body: &[u8], traceparent: Option<&str>) -> Result<(), BusError> {
        for _ in 0..self.copies() {
            self.inner.publish(stage, body, traceparent).await?;
        }
        Ok(())
    }

    async fn publish_delayed(
        &self,
        stage: Stage,
        body: &[u8],
        delay: Duration,
        traceparent: Option<&str>,
    ) -> Result<(), BusError> {
        for _ in 0..self.copies() {
            self.inner.publish_delayed(stage, body, delay, traceparent).await?;
        }
        Ok(())
    }

    async fn park(&self, body: &[u8], reason: &ParkReason) -> Result<(), BusError> {
        self.inner.park(body, reason).await
    }

    async fn publish_record(&self, record: &Record) -> Result<(), BusError> {
        self.inner.publish_record(record).await
    }

    async fn open_history(&self, from: StreamOffset) -> Result<Box<dyn HistoryReader>, BusError> {
        let inner = self.inner.open_history(from).await?;
        let seed = self.rng.lock().unwrap().random();
        Ok(Box::new(Lagging {
            inner,
            rng: ChaCha8Rng::seed_from_u64(seed),
            lag: self.lag,
        }))
    }

    async fn next(&self, stages: &[Stage]) -> Option<Delivery> {
        let mut delivery = self.inner.next(stages).await?;
        if self.roll(self.ack_fails) {
            delivery.acker = Box::new(FailingAck {
                inner: delivery.acker,
                failed: Arc::clone(&self.failed_acks),
            });
        }
        Some(delivery)
    }
}

/// A ledger's history reader that falls behind now and then, as a worker's does while it opens
/// the stream again after a reconnect: before a record, with probability `lag`, it pauses up to
/// 300 ms. Each reader lags on its own, so workers judge a copy from different points of the
/// history, as they do on a real broker.
struct Lagging {
    inner: Box<dyn HistoryReader>,
    rng: ChaCha8Rng,
    lag: f64,
}

#[async_trait]
impl HistoryReader for Lagging {
    async fn next_record(&mut self) -> Option<Result<(u64, Record), BusError>> {
        if self.lag > 0.0 && self.rng.random_bool(self.lag) {
            tokio::time::sleep(Duration::from_millis(self.rng.random_range(1..300))).await;
        }
        self.inner.next_record().await
    }

    async fn close(self: Box<Self>) {
        self.inner.close().await;
    }
}

/// A fresh run's first message and its `RunStarted`.
fn ledger_on(bus: Arc<dyn Bus>) -> Arc<Ledger> {
    fenced_by(bus, testkit::settings().fencing)
}

fn fenced_by(bus: Arc<dyn Bus>, fencing: Fencing) -> Arc<Ledger> {
    Arc::new(Ledger::start(bus, settings_with(fencing).ledger(), None))
}

fn settings_with(fencing: Fencing) -> RuntimeSettings {
    RuntimeSettings {
        fencing,
        ..testkit::settings()
    }
}

/// A new run admitted through `ledger`: its first message (snapshot), as published.
async fn started_run(bus: &Arc<Unreliable>, ledger: &Ledger) -> Envelope {
    let (first, started) = fresh_run();
    assert!(matches!(
        begin_with(bus.as_ref(), ledger, vec![first], started).await,
        Ok(Begun::Started { .. })
    ));
    let published = bus.inner.ready(Stage::Snapshot);
    assert_eq!(published.len(), 1);
    Envelope::decode(&published[0]).unwrap()
}

/// Every stage worked by `handler` on `bus`, fenced by `ledger` (as its settings say), for
/// `window` of tokio's time, with stepping on off: each successor goes through its queue and is
/// delivered as a state of its own, as between workers of different stages (what the tests of
/// one delivery's fate look at; `step_on_tests` look at stepping on).
async fn run_hop_by_hop(bus: &Arc<Unreliable>, handler: &Arc<Script>, ledger: &Arc<Ledger>, window: Duration) {
    run_stages(bus, handler, ledger, Stage::ALL.to_vec(), window, false).await;
}

/// Every step's message id must be one per (run, branch, stage), and no event may be recorded
/// twice for a branch (retries and dropped copies aside). Returns the dropped copies.
fn assert_each_step_once(handler: &Script, events: &[Event]) -> usize {
    let mut ids: BTreeMap<(Uuid, String, Stage), BTreeSet<Uuid>> = BTreeMap::new();
    for call in handler.calls() {
        let m = &call.message;
        ids.entry((m.run_id, m.branch.label(), m.stage))
            .or_default()
            .insert(m.message_id);
    }
    for (step, seen) in &ids {
        assert_eq!(seen.len(), 1, "{step:?} was worked from {} message ids", seen.len());
    }
    let mut recorded: BTreeMap<String, usize> = BTreeMap::new();
    let mut dropped = 0;
    for event in events {
        match event.kind {
            // A note, not a record: two live copies of a waiting message may both say they wait.
            EventKind::Retried { .. } | EventKind::Waiting { .. } => continue,
            EventKind::DuplicateDropped { .. } => {
                dropped += 1;
                continue;
            }
            _ => {}
        }
        let key = format!(
            "{} {} {} {}",
            event.run_id,
            event.branch.label(),
            event.stage,
            serde_json::to_string(&event.kind).unwrap()
        );
        *recorded.entry(key).or_default() += 1;
    }
    let repeated: Vec<(&String, &usize)> = recorded.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "recorded more than once: {repeated:#?}");
    dropped
}

/// Drives `runs` (each admitted through the ledger, twice over) on `bus` until all have ended,
/// with a worker for each of `fleet` (one fencing each, every stage) and an admitter of each of
/// the first two.
async fn drive_runs(
    bus: Arc<Unreliable>,
    handler: Arc<Script>,
    runs: usize,
    held_waits: usize,
    fleet: &[Fencing],
) -> Vec<Event> {
    let tune = |settings| RuntimeSettings { held_waits, ..settings };
    drive_runs_tuned(bus, handler, runs, fleet, tune).await
}

/// [`drive_runs`], each runtime's settings as `tune` makes them from the fleet's.
async fn drive_runs_tuned(
    bus: Arc<Unreliable>,
    handler: Arc<Script>,
    runs: usize,
    fleet: &[Fencing],
    tune: impl Fn(RuntimeSettings) -> RuntimeSettings,
) -> Vec<Event> {
    let ledgers: Vec<Arc<Ledger>> = fleet.iter().map(|f| fenced_by(bus.clone(), *f)).collect();
    let running: Vec<_> = ledgers
        .iter()
        .map(|ledger| {
            let settings = tune(settings_with(ledger.settings().fencing));
            Runtime::new(bus.clone(), handler.clone(), Stage::ALL.to_vec(), settings)
                .unwrap()
                .with_clock(Clock::tokio())
                .with_ledger(Arc::clone(ledger))
                .spawn()
        })
        .collect();
    let ledger = &ledgers[0];
    let mut ids = Vec::new();
    for _ in 0..runs {
        let (first, started) = fresh_run();
        ids.push(first.run_id);
        // A duplicate trigger of each run, admitted by a second admitter of its own.
        let other = fenced_by(bus.clone(), *fleet.last().unwrap());
        let (a, b) = tokio::join!(
            begin_with(bus.as_ref(), ledger, vec![first.clone()], started.clone()),
            begin_with(bus.as_ref(), &other, vec![first.clone()], started.clone()),
        );
        let begun = [a.unwrap(), b.unwrap()];
        let started_count = begun.iter().filter(|b| matches!(b, Begun::Started { .. })).count();
        assert_eq!(started_count, 1, "one admission per run: {begun:?}");
    }
    let ended = tokio::time::timeout(Duration::from_secs(3600), async {
        loop {
            let events = counted_events(&bus.inner.records());
            let all_ended = ids.iter().all(|id| {
                let own: Vec<Event> = events.iter().filter(|e| e.run_id == *id).cloned().collect();
                run_result(&own) != RunResult::Running
            });
            if all_ended {
                return;
            }

            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // Let stale copies still on the tiers come back and be dropped.
    tokio::time::sleep(Duration::from_secs(30)).await;
    for running in running {
        running.stop().await.unwrap();
    }
    assert!(
        ended.is_ok(),
        "the runs did not end: {:#?}",
        counted_events(&bus.inner.records())
    );
    let events = counted_events(&bus.inner.records());
    for id in &ids {
        let own: Vec<Event> = events.iter().filter(|e| e.run_id == *id).cloned().collect();
        assert_eq!(run_result(&own), RunResult::Succeeded, "{own:#?}");
        let started = own
            .iter()
            .filter(|e| matches!(e.kind, EventKind::RunStarted { .. }))
            .count();
        assert_eq!(started, 1, "one RunStarted per run");
    }
    events
}

/// Each fleet the tests drive: either fencing alone, and both at once (a fleet changing over).
const FLEETS: [&[Fencing]; 3] = [
    &[Fencing::CommitFirst],
    &[Fencing::ClaimFirst],
    &[Fencing::ClaimFirst, Fencing::CommitFirst],
];

/// Seeds of the fault tests: `SIGRUN_FENCING_SEEDS` (default 6, what CI runs; more on demand).
fn seeds() -> u64 {
    std::env::var("SIGRUN_FENCING_SEEDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(6)
}

#[tokio::test(start_paused = true)]
async fn every_step_happens_once_when_publishes_land_twice_and_acks_fail() {
    // Waits held for their next look (odd seeds) or each sent round a delay tier (even seeds).
    // Held, the waits steps start are kept with their delivery, not published: with few publishes
    // left to double, each is doubled more often.
    for (seed, fleet) in (0..seeds()).zip(FLEETS.iter().cycle()) {
        let held_waits = if seed % 2 == 1 { 4 } else { 0 };
        let twice = if held_waits > 0 { 0.3 } else { 0.1 };
        let bus = Unreliable::lagging(seed, twice, 0.1, 0.05);
        // Every step writing, or (every other pair of seeds) the looks only reading.
        let handler = if seed / 2 % 2 == 1 {
            nightly_reading()
        } else {
            nightly()
        };
        let events = drive_runs(bus.clone(), handler.clone(), 8, held_waits, fleet).await;
        let dropped = assert_each_step_once(&handler, &events);
        let doubled = bus.doubled.load(Ordering::Relaxed);
        let failed = bus.failed_acks.load(Ordering::Relaxed);
        assert!(
            doubled > 2 && failed > 2,
            "seed {seed} ({fleet:?}): the faults happened ({doubled}, {failed})"
        );
        assert!(
            dropped > 0,
            "seed {seed} ({fleet:?}): stale copies were dropped with an event"
        );
        assert!(bus.inner.parked().is_empty(), "nothing parked");
    }
}

#[tokio::test(start_paused = true)]
async fn without_faults_nothing_is_dropped() {
    for (fleet, handler) in FLEETS
        .iter()
        .flat_map(|fleet| [(fleet, nightly()), (fleet, nightly_reading())])
    {
        let bus = Unreliable::new(7, 0.0, 0.0);
        let events = drive_runs(bus, handler.clone(), 2, testkit::settings().held_waits, fleet).await;
        let dropped = assert_each_step_once(&handler, &events);
        // Admissions commit first in every fleet (they send Azure nothing): two admitters may
        // both publish a first message, and the loser's is dropped. Nothing else is.
        assert!(dropped <= 2, "{fleet:?}: {dropped} dropped");
        let again: Vec<_> = handler
            .calls()
            .into_iter()
            .filter(|c| c.tried != Tried::Never)
            .collect();
        assert!(
            again.is_empty(),
            "{fleet:?}: without faults every try is a first one: {again:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn without_faults_or_a_racing_admitter_nothing_is_dropped_and_a_step_writes_one_record() {
    let bus = Unreliable::new(7, 0.0, 0.0);
    let handler = nightly();
    let ledger = ledger_on(bus.clone());
    started_run(&bus, &ledger).await;
    run_hop_by_hop(&bus, &handler, &ledger, Duration::from_secs(60)).await;
    let events = counted_events(&bus.inner.records());
    assert_eq!(run_result(&events), RunResult::Succeeded, "{events:#?}");
    assert_eq!(assert_each_step_once(&handler, &events), 0);
    let again: Vec<_> = handler
        .calls()
        .into_iter()
        .filter(|c| c.tried != Tried::Never)
        .collect();
    assert!(again.is_empty(), "without faults every try is a first one: {again:?}");
    let records = bus.inner.records();
    let claims = records.iter().filter(|r| matches!(r, Record::Claim(_))).count();
    let commits = records.iter().filter(|r| matches!(r, Record::Commit(_))).count();
    assert_eq!(claims, 0, "committing first, no step claims");
    // The admission, snapshot, the image's first look and its end, publish, replicate's region
    // and its pools, each pool's creation and verdict: every step that records something.
    assert!(commits >= 8, "{commits} commits: {records:#?}");
}

/// A step writes without first looking for an earlier try's work only on its state's first try:
/// not once its delivery came back (a worker died before its claim), nor after a failed try.
#[tokio::test(start_paused = true)]
async fn a_state_is_a_first_try_until_its_delivery_returns_or_a_try_fails() {
    let bus = Unreliable::new(4, 0.0, 0.0);
    let ledger = ledger_on(bus.clone());
    started_run(&bus, &ledger).await;
    // A worker took the snapshot message and died before its claim: the broker hands it out again.
    drop(bus.inner.next(&[Stage::Snapshot]).await.unwrap());
    let image_tries = AtomicU64::new(0);
    let handler = Script::new(move |m| match m.stage {
        Stage::Snapshot => step(Outcome::Advance(vec![m.next(Stage::ImageCreate, m.stage_started)])),
        Stage::ImageCreate if image_tries.fetch_add(1, Ordering::Relaxed) == 0 => {
            Err(AzureError::network("PUT image i", "connection reset"))
        }
        _ => step(Outcome::Fail("stop here".into())),
    });
    run_hop_by_hop(&bus, &handler, &ledger, Duration::from_secs(60)).await;

    let tries: Vec<(Stage, Tried)> = handler.calls().iter().map(|c| (c.message.stage, c.tried)).collect();
    assert_eq!(
        tries,
        [
            (Stage::Snapshot, Tried::Maybe),
            (Stage::ImageCreate, Tried::Never),
            (Stage::ImageCreate, Tried::Maybe),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_step_whose_holder_died_before_its_commit_is_taken_over_after_the_claim_timeout() {
    // The worker taking over claims first, or commits first (a fleet changing over): a state a
    // claim holds is taken over by a claim either way.
    for fencing in [Fencing::ClaimFirst, Fencing::CommitFirst] {
        holder_died_before_its_commit(fencing).await;
    }
}

async fn holder_died_before_its_commit(fencing: Fencing) {
    let bus = Unreliable::new(1, 0.0, 0.0);
    let ledger = fenced_by(bus.clone(), fencing);
    let first = started_run(&bus, &ledger).await;
    // Another worker claimed the snapshot step, sent its successor on, and died before its
    // commit; the broker then gave the snapshot message to this worker.
    let holder = fenced_by(bus.clone(), Fencing::ClaimFirst);
    holder.catch_up(Duration::from_secs(1)).await.unwrap();
    ledger.catch_up(Duration::from_secs(1)).await.unwrap();
    let dead = match holder.claim(&ClaimKey::of(&first)).await.unwrap() {
        Claimed::Won { claim, .. } => claim,
        other => panic!("{other:?}"),
    };
    let mut orphan = first.next(Stage::ImageCreate, first.stage_started);
    orphan.token = Uuid::new_v4();
    orphan.made_by = dead;
    bus.inner
        .publish(Stage::ImageCreate, &orphan.encode(), None)
        .await
        .unwrap();
    let began = tokio::time::Instant::now();

    let handler = Script::new(|m| match m.stage {
        Stage::Snapshot => step(Outcome::Advance(vec![m.next(Stage::ImageCreate, m.stage_started)])),
        _ => step(Outcome::Fail("stop here".into())),
    });
    run_hop_by_hop(&bus, &handler, &ledger, Duration::from_secs(10)).await;

    let calls = handler.calls();
    let snapshot: Vec<_> = calls.iter().filter(|c| c.message.stage == Stage::Snapshot).collect();
    assert_eq!(snapshot.len(), 1, "the snapshot step is worked once, by the taker");
    assert_eq!(
        snapshot[0].tried,
        Tried::Maybe,
        "the taker looks for what the dead holder made"
    );
    assert!(
        snapshot[0].at - began >= testkit::settings().claim_timeout,
        "not before the dead holder's claim timed out"
    );
    let image: Vec<_> = calls.iter().filter(|c| c.message.stage == Stage::ImageCreate).collect();
    assert_eq!(image.len(), 1, "the orphan is never worked: {image:?}");
    assert_ne!(image[0].message.token, orphan.token);
    assert_eq!(image[0].tried, Tried::Never, "the taker's successor is new");
    let events = counted_events(&bus.inner.records());
    let dropped: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::DuplicateDropped { .. }))
        .collect();
    assert_eq!(dropped.len(), 1, "the orphan is dropped with an event: {events:#?}");
    assert_eq!(dropped[0].stage, Stage::ImageCreate);
}

#[tokio::test(start_paused = true)]
async fn an_admission_held_by_a_dead_admitter_is_taken_over_and_a_duplicate_starts_nothing() {
    for fencing in [Fencing::ClaimFirst, Fencing::CommitFirst] {
        admitter_died_before_its_commit(fencing).await;
    }
}

async fn admitter_died_before_its_commit(fencing: Fencing) {
    let bus = Unreliable::new(2, 0.0, 0.0);
    let (first, started) = fresh_run();
    let dead = fenced_by(bus.clone(), Fencing::ClaimFirst);
    assert!(matches!(
        dead.claim(&ClaimKey::admission(first.run_id, &first.pipeline)).await,
        Ok(Claimed::Won { .. })
    ));
    let ledger = fenced_by(bus.clone(), fencing);
    // As a worker does before it admits anything.
    ledger.catch_up(Duration::from_secs(1)).await.unwrap();
    let began = tokio::time::Instant::now();
    let again = || begin_with(bus.as_ref(), &ledger, vec![first.clone()], started.clone());
    assert_eq!(again().await.unwrap(), Begun::Held, "the holder may still commit");
    tokio::time::sleep(testkit::settings().claim_timeout + Duration::from_millis(1)).await;
    assert!(matches!(again().await.unwrap(), Begun::Started { messages: 1 }));
    assert!(tokio::time::Instant::now() - began >= testkit::settings().claim_timeout);
    assert_eq!(again().await.unwrap(), Begun::AlreadyStarted);
    let started_events = bus
        .inner
        .events()
        .into_iter()
        .filter(|e| matches!(e.kind, EventKind::RunStarted { .. }))
        .count();
    assert_eq!(started_events, 1);
    assert_eq!(bus.inner.ready(Stage::Snapshot).len(), 1, "one set of first messages");
}

#[tokio::test(start_paused = true)]
async fn a_step_whose_maker_died_before_its_commit_is_stepped_again_at_once_and_its_orphan_dropped() {
    let bus = Unreliable::new(1, 0.0, 0.0);
    let ledger = fenced_by(bus.clone(), Fencing::CommitFirst);
    let first = started_run(&bus, &ledger).await;
    // Another worker took the snapshot message, stepped it, sent its successor on and died
    // before its commit: the broker hands the snapshot message out again.
    drop(bus.inner.next(&[Stage::Snapshot]).await.unwrap());
    let mut orphan = first.next(Stage::ImageCreate, first.stage_started);
    orphan.token = Uuid::new_v4();
    orphan.made_by = Uuid::new_v4();
    orphan.made_from = first.token;
    bus.inner
        .publish(Stage::ImageCreate, &orphan.encode(), None)
        .await
        .unwrap();
    let began = tokio::time::Instant::now();

    let handler = Script::new(|m| match m.stage {
        Stage::Snapshot => step(Outcome::Advance(vec![m.next(Stage::ImageCreate, m.stage_started)])),
        _ => step(Outcome::Fail("stop here".into())),
    });
    run_hop_by_hop(&bus, &handler, &ledger, Duration::from_secs(10)).await;

    let calls = handler.calls();
    let snapshot: Vec<_> = calls.iter().filter(|c| c.message.stage == Stage::Snapshot).collect();
    assert_eq!(snapshot.len(), 1, "the snapshot step is worked once more");
    assert_eq!(snapshot[0].tried, Tried::Maybe, "it looks for what the dead try made");
    assert!(
        snapshot[0].at - began < testkit::settings().claim_timeout,
        "nothing to time out: the returned delivery steps at once"
    );
    let image: Vec<_> = calls.iter().filter(|c| c.message.stage == Stage::ImageCreate).collect();
    assert_eq!(image.len(), 1, "the orphan is never worked: {image:?}");
    assert_ne!(image[0].message.token, orphan.token);
    assert_eq!(image[0].message.made_from, first.token);
    assert_eq!(image[0].tried, Tried::Never, "the new successor is untried");
    let events = counted_events(&bus.inner.records());
    let dropped: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::DuplicateDropped { .. }))
        .collect();
    assert_eq!(dropped.len(), 1, "the orphan is dropped with an event: {events:#?}");
    assert_eq!(dropped[0].stage, Stage::ImageCreate);
    let claims = bus
        .inner
        .records()
        .iter()
        .filter(|r| matches!(r, Record::Claim(_)))
        .count();
    assert_eq!(claims, 0);
}

/// Works `stages` of `bus` with `handler`, fenced by `ledger`, for `window` of tokio's time,
/// stepping on as `step_on` says.
async fn run_stages(
    bus: &Arc<Unreliable>,
    handler: &Arc<Script>,
    ledger: &Arc<Ledger>,
    stages: Vec<Stage>,
    window: Duration,
    step_on: bool,
) {
    let settings = RuntimeSettings {
        step_on,
        ..settings_with(ledger.settings().fencing)
    };
    let runtime = Runtime::new(bus.clone(), handler.clone(), stages, settings)
        .unwrap()
        .with_clock(Clock::tokio())
        .with_ledger(Arc::clone(ledger));
    runtime.run(tokio::time::sleep(window)).await;
}

/// A step that claims first names its claim as its maker and nothing it consumed. Its successors
/// are built from the copy it stepped, and that copy, sent on by a step that committed first,
/// names the state its maker consumed (spent by that maker's own commit). Carried on, it made a
/// reader that had not read the claim yet (one reopening the history after a reconnect) take the
/// successor for an orphan and drop it: the run's only message, and the run never ended (the
/// chaos test, a mixed fleet, a connection closed).
#[tokio::test(start_paused = true)]
async fn a_step_claiming_first_after_one_committing_first_sends_nothing_a_reader_behind_its_claim_drops() {
    let bus = Unreliable::new(1, 0.0, 0.0);
    let committing = fenced_by(bus.clone(), Fencing::CommitFirst);
    let claiming = fenced_by(bus.clone(), Fencing::ClaimFirst);
    let first = started_run(&bus, &committing).await;
    let handler = Script::new(|m| match m.stage {
        Stage::Snapshot => step(Outcome::Advance(vec![m.next(Stage::ImageCreate, m.stage_started)])),
        _ => step(Outcome::Advance(vec![m.next(Stage::GalleryPublish, m.stage_started)])),
    });
    let window = Duration::from_secs(5);
    run_stages(&bus, &handler, &committing, vec![Stage::Snapshot], window, true).await;
    let image = Envelope::decode(&bus.inner.ready(Stage::ImageCreate)[0]).unwrap();
    assert_eq!(
        image.made_from, first.token,
        "committed first: it names what its maker consumed"
    );
    run_stages(&bus, &handler, &claiming, vec![Stage::ImageCreate], window, true).await;

    let gallery = bus.inner.ready(Stage::GalleryPublish);
    assert_eq!(gallery.len(), 1, "the image step sent its successor on");
    let gallery = Envelope::decode(&gallery[0]).unwrap();
    assert!(
        gallery.made_from.is_nil(),
        "a step claiming first consumed nothing it names"
    );
    let records = bus.inner.records();
    let claim_at = records
        .iter()
        .position(|r| matches!(r, Record::Claim(c) if c.claim == gallery.made_by))
        .expect("the image step's claim is in the history");
    // A reader that has read everything before that claim: the successor is not known yet.
    let mut behind = crate::ledger::book::Book::default();
    for record in &records[..claim_at] {
        behind.apply(record, std::time::Instant::now());
    }
    let maker = crate::ledger::book::Maker {
        step: gallery.made_by,
        consumed: gallery.made_from,
    };
    assert_eq!(
        behind.standing(gallery.run_id, gallery.message_id, gallery.token, maker),
        Standing::Unknown,
        "put off until the claim and commit are read, not dropped"
    );
    assert_eq!(claiming.standing(&gallery), Standing::Live, "once read, it is live");
}

#[tokio::test(start_paused = true)]
async fn of_two_copies_committing_first_the_first_commit_read_counts_and_what_the_other_sent_is_stale() {
    let bus = Unreliable::new(3, 0.0, 0.0);
    let ledger = fenced_by(bus.clone(), Fencing::CommitFirst);
    let first = started_run(&bus, &ledger).await;
    ledger.catch_up(Duration::from_secs(1)).await.unwrap();
    // Two copies of the snapshot message stepped at once; each sent its successor on.
    let copies: Vec<(Envelope, Commit)> = (0..2)
        .map(|_| {
            let step = Uuid::new_v4();
            let mut next = first.next(Stage::ImageCreate, first.stage_started);
            next.token = Uuid::new_v4();
            next.made_by = step;
            next.made_from = first.token;
            let commit = Commit {
                kept: None,
                run_id: first.run_id,
                pipeline: first.pipeline.clone(),
                claim: step,
                consumed: Some(Consumed {
                    message_id: first.message_id,
                    token: first.token,
                }),
                successors: vec![Successor {
                    message_id: next.message_id,
                    token: next.token,
                    stage: next.stage,
                    branch: next.branch.clone(),
                }],
                events: Vec::new(),
            };
            (next, commit)
        })
        .collect();
    for (next, _) in &copies {
        assert_eq!(ledger.standing(next), Standing::Unknown, "not committed yet");
        assert!(ledger.maker_pending(next), "its maker may still commit");
    }
    assert!(
        ledger.commit_first(copies[0].1.clone()).await.unwrap(),
        "the first commit counts"
    );
    assert!(
        !ledger.commit_first(copies[1].1.clone()).await.unwrap(),
        "the second does not"
    );
    assert_eq!(ledger.standing(&copies[0].0), Standing::Live);
    assert_eq!(ledger.standing(&copies[1].0), Standing::Stale, "the loser's successor");
    assert!(!ledger.maker_pending(&copies[1].0));
    assert_eq!(ledger.standing(&first), Standing::Stale, "the consumed state");
    assert!(ledger.untried(&copies[0].0), "the winner's successor is a first try");
}

/// Claiming first, a step that wrote to Azure claims before its commit; one that only read (and
/// an admission) commits without a claim: one history record, not two. What a reading step sends
/// on is still a first try, and every step is recorded once.
#[tokio::test(start_paused = true)]
async fn claiming_first_a_step_that_only_read_commits_without_a_claim() {
    // Claims and the steps' commits (not the admissions': a racing admitter's counts nowhere).
    let count = |records: &[Record]| {
        let claims = records.iter().filter(|r| matches!(r, Record::Claim(_))).count();
        let commits = records
            .iter()
            .filter(|r| matches!(r, Record::Commit(c) if c.consumed.as_ref().is_some_and(|c| c.message_id != c.token)))
            .count();
        (claims, commits)
    };
    // Every hop through its queue, so each step is fenced on its own (a step taken on within a
    // reading one would make it write).
    let hop_by_hop = |settings| RuntimeSettings {
        step_on: false,
        ..settings
    };
    let writing = Unreliable::new(3, 0.0, 0.0);
    drive_runs_tuned(writing.clone(), nightly(), 1, &[Fencing::ClaimFirst], hop_by_hop).await;
    let reading_bus = Unreliable::new(3, 0.0, 0.0);
    let reading = nightly_reading();
    let events = drive_runs_tuned(
        reading_bus.clone(),
        reading.clone(),
        1,
        &[Fencing::ClaimFirst],
        hop_by_hop,
    )
    .await;
    assert_each_step_once(&reading, &events);

    let (claims, commits) = count(&writing.inner.records());
    assert_eq!(claims, commits, "every step claims");
    let records = reading_bus.inner.records();
    let (read_claims, read_commits) = count(&records);
    assert_eq!(read_commits, commits, "the same steps are recorded");
    // Replication's looks only read: none of them claimed.
    let looks: BTreeSet<Uuid> = reading
        .calls()
        .into_iter()
        .filter(|call| call.message.stage == Stage::Replicate)
        .map(|call| call.message.token)
        .collect();
    assert!(!looks.is_empty());
    let claimed_looks = records
        .iter()
        .filter(|r| matches!(r, Record::Claim(c) if looks.contains(&c.token)))
        .count();
    assert_eq!(claimed_looks, 0, "a look at replication claimed");
    assert!(
        read_claims < claims && read_claims > 0,
        "reads commit first, writes claim: {read_claims} of {claims} claims left"
    );
    let again: Vec<_> = reading
        .calls()
        .into_iter()
        .filter(|c| c.tried != Tried::Never)
        .collect();
    assert!(again.is_empty(), "every try is a first one: {again:?}");
}

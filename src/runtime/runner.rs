//! [`Runtime`]: N consumers over a set of stage queues, each handling one delivery at a time:
//! decode (park what cannot be decoded), drop a stale copy, stop a cancelled run's branch, hold
//! back what is not due yet, call the handler, carry out what the outcome calls for, and settle the
//! delivery — ack only once every publish it caused is confirmed, requeue if any was not
//! (at-least-once; handlers are idempotent). With a [`Ledger`], a step that records something is
//! claimed first and committed last, so of several copies of one message exactly one acts.
//! Stage-agnostic: it sees envelopes, outcomes and error classes, never what a stage does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument, Span, debug, error, info, info_span, warn};
use uuid::Uuid;

use super::held::{self, HeldWaits};
use super::observe::{Handled, Observer};
use super::retry::{self, Decision};
use super::settings::{RuntimeSettings, SettingsError};
use super::{Clock, Handler, StepError};
use crate::azure::AzureError;
use crate::azure::writes::{self, Writes};
use crate::bus::{Acker, Bus, BusError, Delivery, ParkReason};
use crate::events::{Event, EventKind};
use crate::ledger::book::Maker;
use crate::ledger::record::{self, Commit, Consumed, Successor};
use crate::ledger::{ClaimKey, Claimed, Fencing, Ledger, Standing};
use crate::model::envelope::{Branch, Envelope, EnvelopeError, MAX_ENVELOPE_BYTES, Phase, Stage};
use crate::model::trace::TraceParent;
use crate::stages::{FailureClass, Observation, Outcome, Step, Tried};

/// Consumes `stages` from a bus and hands each message to a handler. Cloning shares the bus and
/// the handler.
#[derive(Clone)]
pub struct Runtime {
    bus: Arc<dyn Bus>,
    handler: Arc<dyn Handler>,
    stages: Vec<Stage>,
    settings: RuntimeSettings,
    clock: Clock,
    observer: Option<Arc<dyn Observer>>,
    /// Fences each step (claim, commit) and says which runs were cancelled; `None`: nothing is
    /// fenced and nothing is ever cancelled (tests of the runtime alone).
    ledger: Option<Arc<Ledger>>,
    /// The waits held here for their next look (`runtime::held`), shared by every clone.
    held: Arc<HeldWaits>,
    /// Looks handled to the end, shared by every clone (see [`RuntimeReport::handled`]).
    looks: Arc<AtomicU64>,
}

/// When a delivery was taken from its queue, and how many times it has been delivered: a wait
/// held for its next look keeps both.
#[derive(Debug, Clone, Copy)]
struct Taken {
    at: Instant,
    delivery: u32,
    /// The queue it came from: the consumer whose prefetch window it takes, so the slot that
    /// holds it is that stage's, whatever the stage of the message it carries now.
    queue: Stage,
    /// The token of the message the broker holds for this delivery, when the message handled is
    /// a successor kept with it (`runtime.keep_waits`); nil when it is the delivery's own.
    carrier: Uuid,
    /// The successor handled was read back from the history after the delivery came back: an
    /// earlier try of it may have reached Azure.
    carried_back: bool,
}

impl Taken {
    /// The token of the message whose delivery carries `message`.
    fn carrier_of(&self, message: &Envelope) -> Uuid {
        if self.carrier.is_nil() {
            message.token
        } else {
            self.carrier
        }
    }
}

/// A committed step's successor kept with its delivery: the message, its JSON as the commit holds
/// it (what is held is encoded, and it is encoded once), and the slot it is held in.
struct KeptWait {
    next: Envelope,
    body: Box<[u8]>,
    slot: OwnedSemaphorePermit,
}

/// Where an encoded message goes: its stage's queue, or a delay tier until it is due.
struct Sending<'a> {
    stage: Stage,
    due: Option<OffsetDateTime>,
    traceparent: &'a str,
}

/// A delivery held here: its stage, when to handle it again, and its trace parent.
struct Holding {
    stage: Stage,
    until: Option<OffsetDateTime>,
    traceparent: String,
    /// Taken before it was due and not looked at yet: its look is the one when it is due (the
    /// delivery was counted as taken, so that look is not counted again), and a runtime that
    /// stops meanwhile hands it on as early.
    unlooked: bool,
}

impl Holding {
    fn of(message: &Envelope, until: Option<OffsetDateTime>) -> Holding {
        Holding {
            stage: message.stage,
            until,
            traceparent: message.traceparent.clone(),
            unlooked: false,
        }
    }

    fn not_due(message: &Envelope) -> Holding {
        Holding {
            unlooked: true,
            ..Holding::of(message, message.due())
        }
    }
}

/// How long a copy whose step another claim holds is put off before it is looked at again.
const PUT_OFF: Duration = Duration::from_secs(1);

/// A runtime started by [`Runtime::spawn`].
pub struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<RuntimeReport>,
}

impl Running {
    /// Shuts the runtime down as `run`'s shutdown future would, and waits for its report.
    pub async fn stop(self) -> Result<RuntimeReport, tokio::task::JoinError> {
        let _ = self.stop.send(());
        self.task.await
    }
}

/// What a [`Runtime::run`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuntimeReport {
    /// Looks handled to the end: every delivery taken (settled one way or another), every
    /// further look of a wait held here with its delivery, and every step taken on within a
    /// delivery's step (`runtime.step_on`) once that delivery is settled.
    pub handled: u64,
    /// Consumers still busy when the shutdown grace ran out; their deliveries went back unacked.
    pub abandoned: usize,
}

/// What the runtime publishes for one handled message.
struct Effects {
    /// What became of the message, for the observer.
    handled: Handled,
    events: Vec<EventKind>,
    /// Events of the steps taken before the one `events` come from, within this delivery's step
    /// (`Runtime::step_on`), each as its own stage and branch say; recorded before `events`.
    recorded: Vec<Event>,
    /// Each goes to its own stage: now, or on a delay tier when it is not due yet.
    messages: Vec<Envelope>,
    /// Park the input message (a branch that failed for good, kept for inspection and replay).
    park: Option<ParkReason>,
    /// What is parked instead of the delivery's body: the message of a step taken on.
    parked_body: Option<Vec<u8>>,
    /// What the observer is told besides `handled`, once the delivery is acked.
    measured: Measured,
    /// Whether the step (with every step taken on within it) may have changed Azure: a step
    /// that only read commits without claiming first (`Ledger::fencing_for`).
    writes: Writes,
}

/// A step taken on within a delivery's step (`Runtime::step_on`), for the observer once the
/// delivery is settled.
struct SteppedOn {
    message: Envelope,
    handled: Handled,
    handler_time: Duration,
    measured: Measured,
}

/// At most this many steps are taken on within one delivery's step: one per stage.
const STEP_ON_MAX: usize = Stage::ALL.len();

impl Effects {
    /// Moves `events` into `recorded` as `stepped`'s, the step they came from.
    fn record_events_of(&mut self, stepped: &Envelope, now: OffsetDateTime) {
        let events = std::mem::take(&mut self.events);
        self.recorded
            .extend(events.into_iter().map(|kind| event_of(stepped, kind, now)));
    }

    /// Whether the step records something the ledger must fence: events, a park, a branch that
    /// ends (no message goes on), another message, or a change to the run's state. A wait that only
    /// moves its own hold records nothing: its copies may look at Azure side by side until one of
    /// them records something. Its `Waiting` event, if it has one (the first look at an
    /// operation), is a note published as it is, not a record: two copies of a waiting message
    /// may both say they wait, as they may both look.
    fn records_something(&self, message: &Envelope) -> bool {
        if !self.recorded.is_empty() {
            return true;
        }
        let notes_only = self.events.iter().all(|e| matches!(e, EventKind::Waiting { .. }));
        match self.messages.as_slice() {
            [next] if notes_only && self.park.is_none() => {
                next.message_id != message.message_id
                    || next.stage != message.stage
                    || next.branch != message.branch
                    || next.artifacts != message.artifacts
                    || next.attempt != message.attempt
            }
            _ => true,
        }
    }
}

/// What a handled message measured, for the observer.
#[derive(Default)]
struct Measured {
    /// The branch left its stage (advanced or done): time since it entered it.
    stage_finished: Option<Duration>,
    failures: Vec<FailureClass>,
    /// The operation the message waited on ended: what it was and how long it took.
    operation_finished: Option<(Phase, Duration)>,
    observations: Vec<Observation>,
}

impl Runtime {
    /// A runtime over `stages` with the system clock. The settings are checked here.
    pub fn new(
        bus: Arc<dyn Bus>,
        handler: Arc<dyn Handler>,
        stages: Vec<Stage>,
        settings: RuntimeSettings,
    ) -> Result<Runtime, SettingsError> {
        settings.check()?;
        Ok(Runtime {
            bus,
            handler,
            held: Arc::new(HeldWaits::new(settings.held_waits, &stages)),
            stages,
            looks: Arc::new(AtomicU64::new(0)),
            settings,
            clock: Clock::System,
            observer: None,
            ledger: None,
        })
    }

    pub fn with_clock(mut self, clock: Clock) -> Runtime {
        self.clock = clock;
        self
    }

    /// Tells `observer` what became of each delivery (the metrics).
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Runtime {
        self.observer = Some(observer);
        self
    }

    fn observe(&self, stage: Stage, handled: Handled) {
        if let Some(observer) = &self.observer {
            observer.handled(stage, handled);
        }
    }

    /// Fences every step with `ledger` (one copy of a message acts; stale copies are dropped with
    /// a `DuplicateDropped` event) and stops the branches of cancelled runs: a delivery of such a
    /// run takes no step; its branch ends with a `Cancelled` event at the message's stage.
    pub fn with_ledger(mut self, ledger: Arc<Ledger>) -> Runtime {
        self.ledger = Some(ledger);
        self
    }

    /// [`Runtime::run`] on a task of its own, until [`Running::stop`].
    pub fn spawn(self) -> Running {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            self.run(async {
                let _ = stopped.await;
            })
            .await
        });
        Running { stop, task }
    }

    /// Runs the consumers until `shutdown` resolves (or the bus shuts down), then stops taking
    /// deliveries and gives the in-flight ones `shutdown_grace` to finish before abandoning them.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> RuntimeReport {
        let runtime = Arc::new(self.clone());
        let (stop, stopped) = watch::channel(false);
        let mut consumers = JoinSet::new();
        for consumer in 0..self.settings.consumers {
            let task = consume(Arc::clone(&runtime), stopped.clone());
            consumers.spawn(task.instrument(info_span!("consumer", consumer)));
        }
        info!(consumers = self.settings.consumers, stages = ?self.stages, "runtime started");

        let mut shutdown = std::pin::pin!(shutdown);
        let mut deadline: Option<Instant> = None;
        let mut abandoned = 0;
        loop {
            tokio::select! {
                () = &mut shutdown, if deadline.is_none() => {
                    info!("shutting down: no new deliveries, finishing those in flight");
                    let _ = stop.send(true);
                    self.held.stop();
                    deadline = Some(Instant::now() + self.settings.shutdown_grace);
                }
                joined = consumers.join_next() => match joined {
                    None => break,
                    Some(Err(e)) if e.is_panic() => error!("a consumer panicked: {e}"),
                    Some(_) => {}
                },
                () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    abandoned = consumers.len();
                    warn!(abandoned, "shutdown grace ran out; in-flight deliveries go back to their queues");
                    // Aborting drops the deliveries unsettled, which returns them to their queues.
                    consumers.shutdown().await;
                    break;
                }
            }
        }
        abandoned += self.hand_on_held(deadline).await;
        let report = RuntimeReport {
            handled: self.looks.load(Ordering::Relaxed),
            abandoned,
        };
        info!(handled = report.handled, abandoned, "runtime stopped");
        report
    }

    /// Once the consumers have stopped: every held wait hands its message on through a delay tier
    /// before `deadline` (the shutdown grace; from now if the bus shut down by itself). Returns
    /// how many were still held when it passed (their deliveries go back unacked).
    async fn hand_on_held(&self, deadline: Option<Instant>) -> usize {
        self.held.stop();
        let deadline = deadline.unwrap_or_else(|| Instant::now() + self.settings.shutdown_grace);
        if tokio::time::timeout_at(deadline, self.held.drained()).await.is_ok() {
            return 0;
        }
        let held = self.held.held();
        warn!(
            held,
            "shutdown grace ran out with waits still held; they go back to their queues"
        );
        held
    }

    /// Handles one delivery to the end: it is acked, requeued, or (dropped mid-way) returned.
    pub async fn handle_delivery(&self, delivery: Delivery) {
        let Delivery {
            stage: queue,
            body,
            delivery_count,
            acker,
        } = delivery;
        let taken = Taken {
            at: Instant::now(),
            delivery: delivery_count,
            queue,
            carrier: Uuid::nil(),
            carried_back: false,
        };
        match Envelope::decode(&body) {
            Err(error) => {
                let span = info_span!("delivery", stage = %queue, delivery = delivery_count);
                self.park_undecodable(queue, &body, delivery_count, error, acker)
                    .instrument(span)
                    .await
            }
            Ok(message) => {
                // This delivery is a span of the run's trace; what it sends names it as the parent.
                let hop = TraceParent::parse(&message.traceparent).unwrap_or_default().hop();
                let span = delivery_span(&message, taken, &hop);
                if message.stage != queue {
                    span.in_scope(
                        || warn!(queue = %queue, "delivered from another stage's queue; handled as its own stage"),
                    );
                }
                self.handle_message(message, &body, acker, &hop, taken)
                    .instrument(span)
                    .await
            }
        }
    }

    async fn handle_message(
        &self,
        mut message: Envelope,
        body: &[u8],
        acker: Box<dyn Acker>,
        hop: &TraceParent,
        taken: Taken,
    ) {
        let now = self.clock.now();
        // Not due yet (sent ahead of its time, `route_encoded`): held here until it is, then
        // judged as any delivery; what the ledger says now may have changed by then.
        if let Some(wait) = remaining(message.due(), now)
            && let Some(slot) = self.slot_for(wait, taken)
        {
            debug!(wait_ms = wait.as_millis(), "not due yet; held here until it is");
            self.hold_encoded(Holding::not_due(&message), body.into(), acker, taken, slot);
            return;
        }
        if let Some(ledger) = &self.ledger {
            match ledger.settled_standing(&message).await {
                Standing::Stale => return self.drop_stale(&message, body, acker, taken, now).await,
                // Another copy's step is under way, or the step that sent this copy on has not
                // committed it (and may never: an orphan of a holder that died).
                Standing::Live if ledger.held_elsewhere(&message) => {
                    return self.put_off_before_step(&message, body, acker, taken).await;
                }
                Standing::Unknown if ledger.maker_pending(&message) => {
                    return self.put_off_before_step(&message, body, acker, taken).await;
                }
                _ => {}
            }
            // Before the due check too: a message waiting on a delay tier stops when it comes back.
            if ledger.is_cancelled(message.run_id) {
                info!("run cancelled: the branch stops here");
                let effects = Effects {
                    handled: Handled::Cancelled,
                    events: vec![EventKind::Cancelled],
                    messages: Vec::new(),
                    park: None,
                    recorded: Vec::new(),
                    parked_body: None,
                    measured: Measured::default(),
                    writes: Writes::None,
                };
                self.conclude(&message, body, effects, acker, now, taken).await;
                return;
            }
        }
        if let Some(wait) = remaining(message.due(), now) {
            // Early with no slot to hold it in (sent ahead, published by hand, or released a
            // moment early by a relay whose clock differs): back to a tier without a look; the
            // message says when it is due.
            if !acker.still_held() {
                self.let_go(message.stage);
                return;
            }
            debug!(wait_ms = wait.as_millis(), "not due yet; back to a delay tier");
            let published = self
                .bus
                .publish_delayed(message.stage, body, wait, Some(&message.traceparent))
                .await;
            if settle(acker, published).await {
                self.observe(message.stage, Handled::Early);
            }
            return;
        }
        // Its hold has passed; clear it so nothing derived from this message inherits it.
        message.not_before = None;
        // Read again: the ledger's checks above may have waited for a commit to come by.
        let tried = self.tried(&message, taken);
        let (mut effects, handler_time) = self.step(&message, tried, hop).await;
        let measured = std::mem::take(&mut effects.measured);
        debug!(handled = effects.handled.as_str(), "stepped");
        let stepped_on = self.step_on(&message, &mut effects, tried, hop).await;
        let now = self.clock.now();
        if self.conclude(&message, body, effects, acker, now, taken).await {
            if let Some(observer) = &self.observer {
                report(observer.as_ref(), &message, handler_time, &measured);
            }
            // Each step taken on is a message handled, as it would have been as a delivery.
            self.looks.fetch_add(stepped_on.len() as u64, Ordering::Relaxed);
            for step in &stepped_on {
                self.observe(step.message.stage, step.handled);
                if let Some(observer) = &self.observer {
                    report(observer.as_ref(), &step.message, step.handler_time, &step.measured);
                }
            }
        }
    }

    /// Runs the handler on `message` and says what the runtime is to do about it, and how long
    /// the handler took. What it sends on names `hop` as its trace parent.
    async fn step(&self, message: &Envelope, tried: Tried, hop: &TraceParent) -> (Effects, Duration) {
        let began = std::time::Instant::now();
        let (result, writes) = self.call_handler(message.clone(), self.clock.now(), tried).await;
        let handler_time = began.elapsed();
        let now = self.clock.now();
        let mut effects = match result {
            Ok(step) => effects_of_step(message, step, now),
            Err(StepError::Azure(error)) => self.effects_of_error(message, &error, now),
            Err(StepError::Broken(why)) => broken(message, &why),
        };
        effects.writes = writes;
        for next in &mut effects.messages {
            next.traceparent = hop.to_string();
        }
        (effects, handler_time)
    }

    /// Steps on at once, within the delivery's own step, while what the last step sent on holds a
    /// message due now, of a stage this runtime consumes (`runtime.step_on`): a stage hop then
    /// costs no quorum message and no history record of its own. What else a step sends on (a
    /// branch, a wait) goes out with the delivery's step as before. The delivery's step stays one
    /// fenced step: `effects` keeps its outcome (for its stage) and takes on what the last step
    /// sends and parks, and every step's events in order, each as its own stage and branch say.
    /// Nothing of a step taken on is published before the delivery's claim or commit, so a copy
    /// that loses, or a worker that dies first, leaves nothing behind: the delivery is stepped
    /// again from where it was, as any step that did not commit. A step taken on may have reached
    /// Azure before only if the delivery's own step may have (`tried`).
    async fn step_on(&self, root: &Envelope, effects: &mut Effects, tried: Tried, hop: &TraceParent) -> Vec<SteppedOn> {
        let mut stepped_on: Vec<SteppedOn> = Vec::new();
        let mut sent_besides: Vec<Envelope> = Vec::new();
        while stepped_on.len() < STEP_ON_MAX
            && let Some(next) = self.to_step_on(
                root,
                effects,
                stepped_on.last().map_or(effects.handled, |s| s.handled),
                &mut sent_besides,
            )
        {
            // What the step before recorded, as of when it was stepped.
            let stepped = stepped_on.last().map_or(root, |s| &s.message);
            effects.record_events_of(stepped, self.clock.now());
            // Its own stage, branch and message id over the delivery's, in its log lines.
            let span = info_span!(
                "stepped on",
                stage = %next.stage,
                branch = %next.branch.label(),
                message_id = %next.message_id,
            );
            let (mut taken_on, handler_time) = self.step(&next, tried, hop).instrument(span.clone()).await;
            span.in_scope(|| debug!(handled = taken_on.handled.as_str(), "stepped"));
            effects.writes = effects.writes.and(taken_on.writes);
            effects.messages = std::mem::take(&mut taken_on.messages);
            effects.park = taken_on.park.take();
            effects.parked_body = effects.park.is_some().then(|| next.encode());
            effects.events = std::mem::take(&mut taken_on.events);
            stepped_on.push(SteppedOn {
                message: next,
                handled: taken_on.handled,
                handler_time,
                measured: taken_on.measured,
            });
        }
        if let Some(last) = stepped_on.last() {
            effects.record_events_of(&last.message, self.clock.now());
        }
        effects.messages.append(&mut sent_besides);
        stepped_on
    }

    /// The message to step on to, taken out of `effects`, if there is one (see `step_on`): the
    /// last step advanced, or waits (a wait of no time is a new phase of its stage, as verify's
    /// rollout after its verdict), to messages of which one is due now, of a stage consumed here,
    /// in a run going on, and the delivery's step is fenced (stepping on defers what the hop would
    /// have recorded to the delivery's commit). The last step's other messages are moved to
    /// `besides`.
    fn to_step_on(
        &self,
        root: &Envelope,
        effects: &mut Effects,
        last: Handled,
        besides: &mut Vec<Envelope>,
    ) -> Option<Envelope> {
        let ledger = self
            .ledger
            .as_ref()
            .filter(|_| self.settings.step_on && !root.token.is_nil())?;
        let ready = matches!(last, Handled::Advanced | Handled::Waiting)
            && effects.park.is_none()
            && !ledger.is_cancelled(root.run_id);
        if !ready {
            return None;
        }
        let now = self.clock.now();
        let due_here = |next: &Envelope| self.stages.contains(&next.stage) && remaining(next.due(), now).is_none();
        let at = effects.messages.iter().position(due_here)?;
        let mut next = effects.messages.remove(at);
        besides.append(&mut effects.messages);
        // Its hold (a wait of no time) has passed, as a delivery's would have.
        next.not_before = None;
        Some(next)
    }

    /// Carries out what a delivery caused and settles it. A step that records something is
    /// fenced by the ledger (as its settings say: claimed first, or committed first). True when
    /// the delivery was acked as handled, or held (and the observer told).
    async fn conclude(
        &self,
        message: &Envelope,
        body: &[u8],
        effects: Effects,
        acker: Box<dyn Acker>,
        now: OffsetDateTime,
        taken: Taken,
    ) -> bool {
        let ledger = match &self.ledger {
            Some(ledger) if !message.token.is_nil() && effects.records_something(message) => ledger,
            _ => return self.conclude_unfenced(message, body, effects, acker, now, taken).await,
        };
        let key = ClaimKey::of(message);
        match ledger.fencing_for(&key, effects.writes) {
            Fencing::CommitFirst => {
                self.conclude_committing_first(ledger, &key, message, body, effects, acker, now, taken)
                    .await
            }
            Fencing::ClaimFirst => {
                self.conclude_claimed(ledger, &key, message, body, effects, acker, now, taken)
                    .await
            }
        }
    }

    /// A step fenced by a claim: claimed first, its messages sent with fresh tokens, committed
    /// last; a copy whose claim loses is dropped, one whose step another claim holds is put off.
    #[allow(clippy::too_many_arguments)]
    async fn conclude_claimed(
        &self,
        ledger: &Ledger,
        key: &ClaimKey,
        message: &Envelope,
        body: &[u8],
        mut effects: Effects,
        acker: Box<dyn Acker>,
        now: OffsetDateTime,
        taken: Taken,
    ) -> bool {
        let handled = effects.handled;
        let claim = match ledger.claim(key).await {
            Ok(Claimed::Won { claim, deadline }) => (claim, deadline),
            Ok(Claimed::Stale) => {
                self.drop_stale(message, body, acker, taken, now).await;
                return false;
            }
            Ok(Claimed::Wait) => {
                self.put_off(message, body, acker).await;
                return false;
            }
            Err(error) => {
                settle(acker, Err(error)).await;
                return false;
            }
        };
        let (claim, deadline) = claim;
        stamp(&mut effects.messages, Maker::claimed(claim));
        let (commit, kept) = self.commit_keeping(message, &mut effects, claim, taken, now);
        let committed = tokio::time::timeout_at(deadline.into(), async {
            self.send_on(body, &effects, now).await?;
            ledger.commit(commit).await
        })
        .await
        .unwrap_or_else(|_| {
            Err(BusError::Connection(
                "the step's claim ran out of time before its commit".into(),
            ))
        });
        if committed.is_err() {
            // Whatever was sent stays unlisted: the next claimant may take the step over at once.
            ledger.release(message.run_id, &message.pipeline, claim).await;
        }
        match kept {
            Some(kept) if committed.is_ok() => self.hold_kept(message, handled, kept, acker, taken).await,
            _ => self.settled(message.stage, handled, settle(acker, committed).await),
        }
    }

    /// A step fenced by its commit alone: a copy whose state is live sends its messages on with
    /// fresh tokens (each naming the state it consumed), then commits; the first commit read that
    /// consumes the state counts. A copy whose commit came second is dropped as stale (what it
    /// sent is stale too), one whose state is not known yet is put off.
    #[allow(clippy::too_many_arguments)]
    async fn conclude_committing_first(
        &self,
        ledger: &Ledger,
        key: &ClaimKey,
        message: &Envelope,
        body: &[u8],
        mut effects: Effects,
        acker: Box<dyn Acker>,
        now: OffsetDateTime,
        taken: Taken,
    ) -> bool {
        match ledger.may_commit(key).await {
            Standing::Stale => {
                self.drop_stale(message, body, acker, taken, now).await;
                return false;
            }
            Standing::Unknown => {
                self.put_off(message, body, acker).await;
                return false;
            }
            Standing::Live | Standing::Unfenced => {}
        }
        // The broker has handed this delivery to another consumer: that copy steps instead.
        if !acker.still_held() {
            return self.let_go(message.stage);
        }
        let step = Uuid::new_v4();
        stamp(
            &mut effects.messages,
            Maker {
                step,
                consumed: message.token,
            },
        );
        let (commit, kept) = self.commit_keeping(message, &mut effects, step, taken, now);
        let counted = async {
            self.send_on(body, &effects, now).await?;
            ledger.commit_first(commit).await
        }
        .await;
        match counted {
            Ok(true) => match kept {
                Some(kept) => self.hold_kept(message, effects.handled, kept, acker, taken).await,
                None => self.settled(message.stage, effects.handled, settle(acker, Ok(())).await),
            },
            // Another step's commit consumed the state first.
            Ok(false) if ledger.spent(key) => {
                self.drop_stale(message, body, acker, taken, now).await;
                false
            }
            // A claim read before this commit holds the state: its holder may commit, or die and
            // be taken over; this copy comes back and claims.
            Ok(false) => {
                self.put_off(message, body, acker).await;
                false
            }
            Err(error) => {
                settle(acker, Err(error)).await;
                false
            }
        }
    }

    /// Carries out a step the ledger does not fence (it records nothing, or its message is from
    /// before the ledger): a wait that records nothing is held here for its next look when it may
    /// be; anything else is published, then the delivery settled.
    async fn conclude_unfenced(
        &self,
        message: &Envelope,
        body: &[u8],
        mut effects: Effects,
        acker: Box<dyn Acker>,
        now: OffsetDateTime,
        taken: Taken,
    ) -> bool {
        let handled = effects.handled;
        // A copy whose delivery the broker has taken back must not publish its next state (that
        // would make a second copy); the redelivery carries on.
        if !acker.still_held() {
            return self.let_go(message.stage);
        }
        // A wait that records nothing has its one message to hold.
        if let Some(slot) = self.may_hold(message, &effects, taken, now)
            && let Some(next) = effects.messages.pop()
        {
            if let Err(error) = self.publish_events(message, &effects.events, now).await {
                return self.settled(message.stage, handled, settle(acker, Err(error)).await);
            }
            self.hold(next, acker, taken, slot);
            return self.settled(message.stage, handled, true);
        }
        let published = self.carry_out(message, body, &effects, now).await;
        self.settled(message.stage, handled, settle(acker, published).await)
    }

    /// The commit of a fenced step, and the successor it keeps with the delivery, taken out of
    /// `effects` so it is not published (`runtime.keep_waits`): a wait of a stage consumed here,
    /// due later, with a slot free to hold it in within `hold_max` (the step's other messages are
    /// published as before). The commit lists it as live and holds it whole, under the token of
    /// the message the delivery carries.
    fn commit_keeping(
        &self,
        message: &Envelope,
        effects: &mut Effects,
        step: Uuid,
        taken: Taken,
        now: OffsetDateTime,
    ) -> (Commit, Option<KeptWait>) {
        let keeping = self.may_keep(effects, taken, now);
        let mut commit = commit_of(message, effects, step, now);
        let kept = keeping.and_then(|(at, slot)| {
            // An envelope always serializes; were it not to, the successor is published instead.
            let kept = record::Kept::new(taken.carrier_of(message), effects.messages.get(at)?).ok()?;
            let next = effects.messages.remove(at);
            let body = kept.message.get().as_bytes().into();
            commit.kept = Some(kept);
            Some(KeptWait { next, body, slot })
        });
        (commit, kept)
    }

    /// Which of this step's successors to keep with its delivery, and a slot to keep it in, if
    /// one may be kept (see `commit_keeping`): of the waits due later of a stage consumed here,
    /// the one due last (the others are published).
    fn may_keep(&self, effects: &Effects, taken: Taken, now: OffsetDateTime) -> Option<(usize, OwnedSemaphorePermit)> {
        if !self.settings.keep_waits || effects.park.is_some() {
            return None;
        }
        let waits = effects.messages.iter().enumerate().filter_map(|(at, next)| {
            let wait = remaining(next.due(), now)?;
            self.stages.contains(&next.stage).then_some((at, wait))
        });
        let (at, wait) = waits.max_by_key(|(_, wait)| *wait)?;
        Some((at, self.slot_for(wait, taken)?))
    }

    /// Holds the successor a committed step kept, with the delivery that carries it, until it is
    /// due (the delivery stays unacked); told to the observer as handled.
    async fn hold_kept(
        &self,
        message: &Envelope,
        handled: Handled,
        kept: KeptWait,
        acker: Box<dyn Acker>,
        taken: Taken,
    ) -> bool {
        if !acker.still_held() {
            // The delivery went back to the broker meanwhile: its next taker may have read the
            // history before this commit. Published, the wait cannot be lost; a second copy of
            // it is fenced as any.
            let published = self.route(&kept.next, self.clock.now()).await;
            debug!(
                published = published.is_ok(),
                "the delivery went back; the kept wait is sent on instead"
            );
            return false;
        }
        debug!("the wait is kept with its delivery until it is due");
        let taken = Taken {
            carrier: taken.carrier_of(message),
            ..taken
        };
        let holding = Holding::of(&kept.next, kept.next.due());
        self.hold_encoded(holding, kept.body, acker, taken, kept.slot);
        self.settled(message.stage, handled, true)
    }

    /// A delivery that came back (its worker died, or let it go) whose step kept its successor
    /// with it: the successor, read back from the commit that kept it, is carried on with this
    /// delivery as if it had been delivered, as one an earlier try may have reached Azure with.
    /// One the history cannot give back now is held a moment (requeued without a slot), never
    /// published again: a copy published anew would carry nothing.
    async fn carry_kept(
        &self,
        ledger: &Ledger,
        message: &Envelope,
        body: &[u8],
        offset: u64,
        acker: Box<dyn Acker>,
        taken: Taken,
    ) {
        let carrier = taken.carrier_of(message);
        match ledger.read_kept(offset, carrier).await {
            Ok(kept) => {
                let body = kept.encode();
                let hop = TraceParent::parse(&kept.traceparent).unwrap_or_default().hop();
                let taken = Taken {
                    carrier,
                    carried_back: true,
                    ..taken
                };
                let span = delivery_span(&kept, taken, &hop);
                span.in_scope(|| {
                    info!(
                        offset,
                        "the delivery came back; carrying on the wait its step kept with it"
                    )
                });
                Box::pin(self.handle_message(kept, &body, acker, &hop, taken).instrument(span)).await;
            }
            Err(BusError::Malformed(why)) => {
                // Only a bug (or a newer build's message) can get here: parked, with why.
                error!(offset, %why, "the wait kept with this delivery cannot be read back; parking it");
                let reason = ParkReason {
                    stage: Some(message.stage),
                    error: crate::model::text::bounded(&format!(
                        "the wait kept with this message at history offset {offset} cannot be read back: {why}"
                    )),
                    attempts: taken.delivery,
                    message_id: Some(message.message_id.to_string()),
                };
                let parked = self.bus.park(body, &reason).await;
                if settle(acker, parked).await {
                    self.observe(message.stage, Handled::Parked);
                }
            }
            Err(error) => {
                warn!(%error, offset, "the wait kept with this delivery cannot be read back yet; holding it a moment");
                // Without a slot, dropped unsettled: the broker hands it out again.
                let _ = self.hold_a_moment(message, body, acker, taken);
            }
        }
    }

    /// A slot to hold this step's wait in, if it may be held: it records nothing (one message,
    /// the same but for when it is due), it is due later, and the delivery's whole hold stays
    /// within `hold_max`.
    fn may_hold(
        &self,
        message: &Envelope,
        effects: &Effects,
        taken: Taken,
        now: OffsetDateTime,
    ) -> Option<OwnedSemaphorePermit> {
        if effects.records_something(message) {
            return None;
        }
        let wait = remaining(effects.messages.first()?.due(), now)?;
        self.slot_for(wait, taken)
    }

    /// A slot to hold the delivery `taken` in for `wait` more, if one of its queue's is free (its
    /// consumer's prefetch window has room for each) and the delivery's whole hold stays within
    /// `hold_max`.
    fn slot_for(&self, wait: Duration, taken: Taken) -> Option<OwnedSemaphorePermit> {
        if taken.at.elapsed().saturating_add(wait) > self.settings.hold_max {
            return None;
        }
        self.held.try_hold(taken.queue)
    }

    /// Keeps `next`'s delivery unacked until `next` is due, then looks again with it; a runtime
    /// that stops meanwhile sends it on through a delay tier instead (`runtime::held`).
    ///
    /// What waits is `next` encoded: a decoded envelope (its spec and plan) takes several times
    /// its JSON's bytes in small allocations, and a worker holds up to `held_waits` of them for
    /// minutes; the next look needs the encoded form anyway.
    fn hold(&self, next: Envelope, acker: Box<dyn Acker>, taken: Taken, slot: OwnedSemaphorePermit) {
        debug!("holding the wait here for its next look");
        let holding = Holding::of(&next, next.due());
        let body = next.encode().into_boxed_slice();
        drop(next);
        self.hold_encoded(holding, body, acker, taken, slot);
    }

    /// Keeps a delivery unacked until `holding.until`, then handles `body` again with it (a
    /// runtime that stops meanwhile publishes `body` as it stands and acks). False, and nothing
    /// held, when the broker has taken the delivery back already.
    fn hold_encoded(
        &self,
        holding: Holding,
        body: Box<[u8]>,
        acker: Box<dyn Acker>,
        taken: Taken,
        slot: OwnedSemaphorePermit,
    ) -> bool {
        if !acker.still_held() {
            return self.let_go(holding.stage);
        }
        let Holding {
            stage,
            until: due,
            traceparent,
            unlooked,
        } = holding;
        let runtime = self.clone();
        let mut stopping = self.held.stopping();
        tokio::spawn(async move {
            let stopped = loop {
                let Some(wait) = remaining(due, runtime.clock.now()) else {
                    break false;
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stopping.wait_for(|stop| *stop) => break true,
                }
            };
            if !acker.still_held() {
                // The connection went: the broker has handed the message out again.
                runtime.let_go(stage);
            } else if stopped {
                let sending = Sending {
                    stage,
                    due,
                    traceparent: &traceparent,
                };
                let published = runtime.route_encoded(&sending, &body, runtime.clock.now()).await;
                if settle(acker, published).await && unlooked {
                    runtime.observe(stage, Handled::Early);
                }
            } else {
                // The slot goes with the look: kept if it holds the delivery again, given back
                // when it ends otherwise. Any other way, it is given back once this task ends.
                let look = runtime.look_again(stage, body, acker, taken, !unlooked);
                held::looking_in(slot, look).await;
            }
        });
        true
    }

    /// The next look of a held wait: handled as its delivery would be, the same delivery held.
    /// Counted as a look unless it is the delivery's first (`counts`: false for one taken before
    /// it was due). Boxed: a look may hold its wait again, which spawns the next look.
    fn look_again(
        self,
        stage: Stage,
        body: Box<[u8]>,
        acker: Box<dyn Acker>,
        taken: Taken,
        counts: bool,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            match Envelope::decode(&body) {
                Ok(next) => {
                    let hop = TraceParent::parse(&next.traceparent).unwrap_or_default().hop();
                    let span = delivery_span(&next, taken, &hop);
                    self.handle_message(next, &body, acker, &hop, taken)
                        .instrument(span)
                        .await;
                }
                // What this worker encoded itself: only a bug could get here; parked, not lost.
                Err(error) => {
                    let span = info_span!("delivery", stage = %stage, delivery = taken.delivery);
                    self.park_undecodable(stage, &body, taken.delivery, error, acker)
                        .instrument(span)
                        .await;
                }
            }
            if counts {
                self.looks.fetch_add(1, Ordering::Relaxed);
            }
        })
    }

    /// A delivery whose connection is gone: nothing is published for it (the broker has given it
    /// to another consumer); dropping its acker is all there is to do.
    fn let_go(&self, stage: Stage) -> bool {
        debug!(%stage, "the delivery's connection is gone; the broker hands it out again");
        false
    }

    /// Tells the observer about a delivery acked as handled; passes `acked` through.
    fn settled(&self, stage: Stage, handled: Handled, acked: bool) -> bool {
        if acked {
            self.observe(stage, handled);
        }
        acked
    }

    /// A copy the ledger knows is stale (its step taken by another copy, or its run finished): it
    /// takes no step; the run's history says it was dropped, and it is acked. Unless its delivery
    /// carries a successor that a step kept with it and is still live (the delivery came back from
    /// a worker that died, or let it go): that successor is carried on instead.
    async fn drop_stale(
        &self,
        message: &Envelope,
        body: &[u8],
        acker: Box<dyn Acker>,
        taken: Taken,
        now: OffsetDateTime,
    ) {
        if let Some(ledger) = &self.ledger
            && let Some(offset) = ledger.kept_with(message.run_id, taken.carrier_of(message))
        {
            return self.carry_kept(ledger, message, body, offset, acker, taken).await;
        }
        info!("a stale copy of this step; dropping it");
        let event = event_of(
            message,
            EventKind::DuplicateDropped {
                message_id: message.message_id,
            },
            now,
        );
        let published = self.bus.publish_event(&event).await;
        if settle(acker, published).await {
            self.observe(message.stage, Handled::Dropped);
        }
    }

    /// A copy put off before its step: held here for `PUT_OFF` when a slot is free (no broker
    /// traffic; a successor sent the moment before its maker's commit is read waits here for it),
    /// else put off through a delay tier.
    async fn put_off_before_step(&self, message: &Envelope, body: &[u8], acker: Box<dyn Acker>, taken: Taken) {
        debug!("the step is held by another claim or its maker's commit is not read yet; holding this copy a moment");
        match self.hold_a_moment(message, body, acker, taken) {
            Ok(true) => self.observe(message.stage, Handled::Waiting),
            Ok(false) => {}
            Err(acker) => self.put_off(message, body, acker).await,
        }
    }

    /// Holds the delivery here for `PUT_OFF`, then handles `message` again; whether it was held
    /// (false: the broker has it back already), or the acker back when no slot is free.
    fn hold_a_moment(
        &self,
        message: &Envelope,
        body: &[u8],
        acker: Box<dyn Acker>,
        taken: Taken,
    ) -> Result<bool, Box<dyn Acker>> {
        let Some(slot) = self.slot_for(PUT_OFF, taken) else {
            return Err(acker);
        };
        let until = self.clock.now() + PUT_OFF;
        Ok(self.hold_encoded(Holding::of(message, Some(until)), body.into(), acker, taken, slot))
    }

    /// A copy whose step another claim holds (or whose state is not known yet): back on a delay
    /// tier, unchanged, to be looked at again.
    async fn put_off(&self, message: &Envelope, body: &[u8], acker: Box<dyn Acker>) {
        if !acker.still_held() {
            self.let_go(message.stage);
            return;
        }
        debug!("the step is held by another claim; putting this copy off");
        let published = self
            .bus
            .publish_delayed(message.stage, body, PUT_OFF, Some(&message.traceparent))
            .await;
        if settle(acker, published).await {
            self.observe(message.stage, Handled::Waiting);
        }
    }

    /// Whether an earlier try of the copy's state may have reached Azure: its first delivery, no
    /// failed try, and a state the ledger knows as untried is a first try. Without a ledger it
    /// cannot be known.
    fn tried(&self, message: &Envelope, taken: Taken) -> Tried {
        match &self.ledger {
            Some(ledger)
                if taken.delivery <= 1 && !taken.carried_back && message.attempt == 0 && ledger.untried(message) =>
            {
                Tried::Never
            }
            _ => Tried::Maybe,
        }
    }

    /// Runs the handler as its own task, so a panic in it becomes an error here (the message is
    /// parked with it, the branch fails) instead of taking the consumer down with the delivery
    /// unsettled.
    /// Also says whether the step sent Azure anything that may change it (not known, so assumed,
    /// when it panicked).
    async fn call_handler(
        &self,
        message: Envelope,
        now: OffsetDateTime,
        tried: Tried,
    ) -> (Result<Step, StepError>, Writes) {
        let handler = Arc::clone(&self.handler);
        let step = async move { handler.handle(message, now, tried).await };
        let task = tokio::spawn(writes::watched(step).instrument(Span::current()));
        // If this delivery is abandoned (shutdown), the handler stops with it.
        let mut task = AbortOnDrop(task);
        match (&mut task.0).await {
            Ok((result, writes)) => (result.map_err(StepError::from), writes),
            Err(join) if join.is_panic() => {
                let what = crate::model::text::panic_message(&*join.into_panic());
                error!(panic = %what, "the handler panicked; parking the message");
                let broken = StepError::Broken(format!("the step panicked (a bug in sigrun): {what}"));
                (Err(broken), Writes::Sent)
            }
            Err(_) => (
                Err(StepError::Broken("the step's task was cancelled".into())),
                Writes::Sent,
            ),
        }
    }

    fn effects_of_error(&self, message: &Envelope, error: &AzureError, now: OffsetDateTime) -> Effects {
        if error.is_paced() {
            // Never sent: no failure, no event; the look waits for its budget like any wait.
            let delay = error.retry_after.unwrap_or_default();
            debug!(
                delay_ms = delay.as_millis(),
                "request budget short; the step is put off"
            );
            let mut again = message.clone();
            again.hold_until(now + delay);
            return Effects {
                handled: Handled::Paced,
                events: Vec::new(),
                messages: vec![again],
                park: None,
                recorded: Vec::new(),
                parked_body: None,
                measured: Measured::default(),
                writes: Writes::None,
            };
        }
        match retry::decide(&self.settings.retry, message.attempt, error) {
            Decision::Retry { attempt, delay, event } => {
                warn!(%error, attempt, delay_ms = delay.as_millis(), "step failed; retrying");
                let mut again = message.clone();
                again.attempt = attempt;
                again.hold_until(now + delay);
                Effects {
                    handled: Handled::Retried,
                    events: vec![event],
                    messages: vec![again],
                    park: None,
                    recorded: Vec::new(),
                    parked_body: None,
                    measured: Measured::default(),
                    writes: Writes::None,
                }
            }
            Decision::Fail { reason, give_up } => {
                warn!(%reason, give_up, "step failed for good; failing the branch");
                let class = if give_up {
                    FailureClass::GaveUp
                } else {
                    FailureClass::Permanent
                };
                parked_failure(message, &reason, class)
            }
        }
    }

    /// Publishes what an unfenced step caused, in order: events (history first), messages,
    /// parking. Stops at the first publish that is not confirmed.
    async fn carry_out(
        &self,
        message: &Envelope,
        body: &[u8],
        effects: &Effects,
        now: OffsetDateTime,
    ) -> Result<(), BusError> {
        // Steps taken on are always fenced (`to_step_on`): their events go in the commit.
        debug_assert!(effects.recorded.is_empty(), "a step taken on concluded unfenced");
        self.publish_events(message, &effects.events, now).await?;
        self.send_on(body, effects, now).await
    }

    /// Publishes a step's events on their own (not in a commit), in order.
    async fn publish_events(
        &self,
        message: &Envelope,
        events: &[EventKind],
        now: OffsetDateTime,
    ) -> Result<(), BusError> {
        for kind in events {
            self.bus.publish_event(&event_of(message, kind.clone(), now)).await?;
        }
        Ok(())
    }

    /// Publishes what a fenced step caused before its commit: its messages, then the parked copy.
    /// Stops at the first publish that is not confirmed.
    async fn send_on(&self, body: &[u8], effects: &Effects, now: OffsetDateTime) -> Result<(), BusError> {
        for next in &effects.messages {
            self.route(next, now).await?;
        }
        if let Some(reason) = &effects.park {
            self.bus
                .park(effects.parked_body.as_deref().unwrap_or(body), reason)
                .await?;
        }
        Ok(())
    }

    /// A message goes to its stage's queue when due, else to a delay tier until it is.
    async fn route(&self, message: &Envelope, now: OffsetDateTime) -> Result<(), BusError> {
        let sending = Sending {
            stage: message.stage,
            due: message.due(),
            traceparent: &message.traceparent,
        };
        self.route_encoded(&sending, &message.encode(), now).await
    }

    /// [`Runtime::route`] for a message already encoded.
    async fn route_encoded(&self, sending: &Sending<'_>, body: &[u8], now: OffsetDateTime) -> Result<(), BusError> {
        let traceparent = Some(sending.traceparent);
        match remaining(sending.due, now) {
            Some(wait) if !self.sends_ahead(sending.stage, wait) => {
                self.bus.publish_delayed(sending.stage, body, wait, traceparent).await
            }
            _ => self.bus.publish(sending.stage, body, traceparent).await,
        }
    }

    /// Whether a message due in `wait` goes to its stage's queue now, to be held by the worker
    /// that takes it until it is due, rather than round a delay tier (two confirmed publishes,
    /// two deliveries and two acks on quorum queues instead of one each): when this runtime
    /// consumes that stage and has a slot free to hold it, the best guess that its taker (most
    /// often this worker) will have one, and the wait fits in a hold. A taker with no slot free
    /// sends it round a tier after all.
    fn sends_ahead(&self, stage: Stage, wait: Duration) -> bool {
        wait < self.settings.hold_max && self.held.has_room(stage)
    }

    /// A message that is not a v1 envelope is parked at once (retrying cannot fix it) and acked.
    async fn park_undecodable(
        &self,
        queue: Stage,
        body: &[u8],
        delivery_count: u32,
        error: EnvelopeError,
        acker: Box<dyn Acker>,
    ) {
        warn!(%error, "message cannot be decoded; parking it");
        let peek = Peek::of(body);
        let reason = ParkReason {
            stage: Some(queue),
            error: crate::model::text::bounded(&error.to_string()),
            attempts: delivery_count,
            message_id: peek.as_ref().and_then(|p| p.message_id.clone()),
        };
        let mut parked = self.bus.park(body, &reason).await;
        let parked_pipeline = peek
            .as_ref()
            .and_then(|p| p.run.as_ref())
            .map(|run| run.pipeline.clone());
        // If enough of it reads as a run's message, its run's history says so too.
        if parked.is_ok()
            && let Some(run) = peek.and_then(|p| p.run)
        {
            let event = Event {
                run_id: run.run_id,
                pipeline: run.pipeline,
                version: run.version,
                stage: run.stage,
                branch: run.branch,
                at: self.clock.now(),
                kind: EventKind::Parked { reason: reason.error },
            };
            parked = self.bus.publish_event(&event).await;
        }
        if settle(acker, parked).await {
            self.observe(queue, Handled::Parked);
            if let (Some(observer), Some(pipeline)) = (&self.observer, &parked_pipeline) {
                observer.stage_failed(pipeline, queue, FailureClass::Malformed);
            }
        }
    }
}

async fn consume(runtime: Arc<Runtime>, mut stopped: watch::Receiver<bool>) {
    loop {
        let delivery = tokio::select! {
            // Shutdown wins a tie: no delivery is taken once it is asked for (`next` is cancel-safe).
            biased;
            _ = stopped.wait_for(|stop| *stop) => return,
            delivery = runtime.bus.next(&runtime.stages) => match delivery {
                Some(delivery) => delivery,
                None => return,
            },
        };
        runtime.handle_delivery(delivery).await;
        runtime.looks.fetch_add(1, Ordering::Relaxed);
    }
}

/// The span of one look at a message: a span of the run's trace.
fn delivery_span(message: &Envelope, taken: Taken, hop: &TraceParent) -> Span {
    info_span!(
        "delivery",
        run_id = %message.run_id,
        pipeline = %message.pipeline,
        stage = %message.stage,
        branch = %message.branch.label(),
        message_id = %message.message_id,
        delivery = taken.delivery,
        trace_id = %hop.trace_id(),
        span_id = %hop.span_id(),
    )
}

/// Tells the observer what a handled message measured.
fn report(observer: &dyn Observer, message: &Envelope, handler_time: Duration, measured: &Measured) {
    observer.handler_time(message.stage, handler_time);
    // A clean-up steps on its scheduler's queue but is not that stage's work: its time and its
    // failures (a warning) stay out of the stage's duration and failure series.
    let stage_work = !matches!(message.branch, Branch::CleanUp { .. });
    if let Some(elapsed) = measured.stage_finished.filter(|_| stage_work) {
        observer.stage_finished(&message.pipeline, message.stage, elapsed);
    }
    for class in measured.failures.iter().filter(|_| stage_work) {
        observer.stage_failed(&message.pipeline, message.stage, *class);
    }
    if let Some((what, elapsed)) = &measured.operation_finished {
        observer.operation_finished(what.as_str(), *elapsed);
    }
    for observation in &measured.observations {
        observer.observed(&message.pipeline, observation);
    }
}

/// What a successful step measured: the stage finished, failures by class, the end of the
/// operation the message waited on (it is not waited on any more), and the step's observations.
fn measure_step(message: &Envelope, step: &Step, now: OffsetDateTime) -> Measured {
    let since = |at: OffsetDateTime| (now - at).max(time::Duration::ZERO).unsigned_abs();
    let stage_finished =
        matches!(step.outcome, Outcome::Advance(_) | Outcome::Done).then(|| since(message.stage_started));
    let mut failures: Vec<FailureClass> = step
        .events
        .iter()
        .filter(|e| matches!(e, EventKind::RegionFailed { .. }))
        .map(|_| FailureClass::RegionFailed)
        .collect();
    if matches!(step.outcome, Outcome::Fail(_)) {
        let class = step.observations.iter().find_map(|o| match o {
            Observation::Failure(class) => Some(*class),
            _ => None,
        });
        failures.push(class.unwrap_or(FailureClass::Permanent));
    }
    let operation_finished = message.operation.as_ref().and_then(|op| {
        let still_waiting = match &step.outcome {
            Outcome::Wait { message: next, .. } => next.operation.as_ref().is_some_and(|n| n.what == op.what),
            _ => false,
        };
        (!still_waiting).then(|| (op.what, since(op.started)))
    });
    Measured {
        stage_finished,
        failures,
        operation_finished,
        observations: step
            .observations
            .iter()
            .filter(|o| !matches!(o, Observation::Failure(_)))
            .cloned()
            .collect(),
    }
}

fn effects_of_step(message: &Envelope, step: Step, now: OffsetDateTime) -> Effects {
    let measured = measure_step(message, &step, now);
    let Step { outcome, events, .. } = step;
    let mut effects = Effects {
        handled: Handled::Done,
        events,
        messages: Vec::new(),
        park: None,
        recorded: Vec::new(),
        parked_body: None,
        measured,
        writes: Writes::None,
    };
    match outcome {
        Outcome::Advance(next) => {
            effects.handled = Handled::Advanced;
            effects.messages = next;
        }
        Outcome::Wait {
            message: mut waiting,
            delay,
            emit,
        } => {
            waiting.hold_until(now + delay);
            effects.handled = Handled::Waiting;
            effects.messages = emit;
            effects.messages.push(*waiting);
        }
        Outcome::Done => {}
        Outcome::Fail(reason) => {
            effects.handled = Handled::Failed;
            effects.events.push(failure(&message.branch, reason));
        }
    }
    // The step succeeded: only consecutive failures count toward the retry budget, so whatever
    // it sends on starts again (a long wait survives any number of recovered hiccups).
    for next in &mut effects.messages {
        next.attempt = 0;
    }
    effects
}

/// The event that ends a branch: a pool's failure, or the whole run's when the trunk fails.
/// A step that broke (a panic): the same message would break it again, so the branch fails and
/// the message is parked with the reason (for a fix, then `dlq replay`); the consumer goes on.
fn broken(message: &Envelope, why: &str) -> Effects {
    parked_failure(message, why, FailureClass::Permanent)
}

/// The branch fails with `reason` and the message is parked with it, for `dlq replay` once
/// what failed is fixed.
fn parked_failure(message: &Envelope, reason: &str, class: FailureClass) -> Effects {
    let reason = crate::model::text::bounded(reason);
    Effects {
        handled: Handled::Parked,
        events: vec![failure(&message.branch, reason.clone())],
        messages: Vec::new(),
        park: Some(ParkReason {
            stage: Some(message.stage),
            error: reason,
            attempts: message.attempt.saturating_add(1),
            message_id: Some(message.message_id.to_string()),
        }),
        recorded: Vec::new(),
        parked_body: None,
        measured: Measured {
            failures: vec![class],
            ..Measured::default()
        },
        writes: Writes::None,
    }
}

fn failure(branch: &Branch, reason: String) -> EventKind {
    // A stage's reason may quote what it was given: bounded like everything written back.
    let reason = crate::model::text::bounded(&reason);
    match branch {
        Branch::Trunk => EventKind::RunFailed { reason },
        Branch::Pool { target, .. } => EventKind::PoolFailed {
            target: target.clone(),
            reason,
        },
        // A clean-up never fails its run: what stayed is a warning.
        Branch::CleanUp { what } => EventKind::CleanUpFinished {
            what: *what,
            failed: Some(reason),
        },
    }
}

/// Gives each message a fenced step sends on a fresh state and names its maker: the step, and
/// what it consumed when it commits first (nil when it claimed: a successor is built from the copy
/// it follows, and a `made_from` left over from a step that committed first, spent by that step's
/// own commit, would make a reader not yet past this step's claim take it for an orphan and drop
/// it).
fn stamp(messages: &mut [Envelope], maker: Maker) {
    for next in messages {
        next.token = Uuid::new_v4();
        next.made_by = maker.step;
        next.made_from = maker.consumed;
    }
}

/// The commit of a fenced step by `step` (its claim, or its own id when it commits first): the
/// state it consumed, the messages it made live, and its events.
fn commit_of(message: &Envelope, effects: &Effects, step: Uuid, now: OffsetDateTime) -> Commit {
    Commit {
        kept: None,
        run_id: message.run_id,
        pipeline: message.pipeline.clone(),
        claim: step,
        consumed: Some(Consumed {
            message_id: message.message_id,
            token: message.token,
        }),
        successors: effects.messages.iter().map(Successor::of).collect(),
        events: effects
            .recorded
            .iter()
            .cloned()
            .chain(effects.events.iter().map(|kind| event_of(message, kind.clone(), now)))
            .collect(),
    }
}

fn event_of(message: &Envelope, kind: EventKind, at: OffsetDateTime) -> Event {
    Event {
        run_id: message.run_id,
        pipeline: message.pipeline.clone(),
        version: message.version.clone(),
        stage: message.stage,
        branch: message.branch.clone(),
        at,
        kind,
    }
}

/// How long until `due`, if it is still ahead.
fn remaining(due: Option<OffsetDateTime>, now: OffsetDateTime) -> Option<Duration> {
    due.filter(|due| *due > now).map(|due| (due - now).unsigned_abs())
}

/// Acks once everything the delivery caused is confirmed; otherwise returns it to its queue so it
/// is handled again (what was published meanwhile may then be published twice: handlers and
/// consumers are idempotent, the price of never losing a message). True when acked.
async fn settle(acker: Box<dyn Acker>, published: Result<(), BusError>) -> bool {
    match published {
        Ok(()) => match acker.ack().await {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "ack failed; the message will be delivered again");
                false
            }
        },
        Err(e) => {
            warn!(error = %e, "a publish was not confirmed; returning the message to its queue");
            if let Err(e) = acker.requeue().await {
                warn!(error = %e, "requeue failed; the broker returns the message when the channel closes");
            }
            false
        }
    }
}

struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What can be read from a message that is not a valid envelope: its id, and its run if the
/// run's fields are intact (for a `Parked` event in that run's history).
struct Peek {
    message_id: Option<String>,
    run: Option<RunHeader>,
}

#[derive(Deserialize)]
struct RunHeader {
    run_id: Uuid,
    pipeline: String,
    version: String,
    stage: Stage,
    branch: Branch,
}

impl Peek {
    fn of(body: &[u8]) -> Option<Peek> {
        if body.len() > MAX_ENVELOPE_BYTES {
            return None;
        }
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        Some(Peek {
            message_id: value.get("message_id").and_then(|v| v.as_str()).map(str::to_string),
            run: RunHeader::deserialize(&value).ok(),
        })
    }
}

#[cfg(test)]
mod measure_tests {
    use super::*;
    use crate::model::envelope::InFlight;

    fn waiting_on(what: Phase, started: OffsetDateTime) -> Envelope {
        let mut message = super::super::testkit::envelope(Stage::Replicate);
        message.stage_started = started;
        message.operation = Some(InFlight {
            what,
            status_urls: Vec::new(),
            started,
            not_before: started,
            polls: 3,
            progress: Default::default(),
        });
        message
    }

    #[test]
    fn a_step_that_advances_finishes_its_stage_and_the_operation_it_waited_on() {
        let started = OffsetDateTime::UNIX_EPOCH;
        let now = started + time::Duration::seconds(90);
        let message = waiting_on(Phase::Replication, started);
        let step =
            Step::new(Outcome::Advance(vec![message.next(Stage::PoolCreate, now)])).observe(Observation::Replication {
                region: "eastus".into(),
                ratio: 1.0,
            });
        let measured = measure_step(&message, &step, now);
        assert_eq!(measured.stage_finished, Some(Duration::from_secs(90)));
        assert_eq!(
            measured.operation_finished,
            Some((Phase::Replication, Duration::from_secs(90)))
        );
        assert!(measured.failures.is_empty());
        assert_eq!(measured.observations.len(), 1);
    }

    #[test]
    fn a_step_still_waiting_finishes_nothing_and_failures_keep_their_class() {
        let started = OffsetDateTime::UNIX_EPOCH;
        let now = started + time::Duration::seconds(30);
        let message = waiting_on(Phase::Allocation, started);
        let mut next = message.clone();
        next.operation.as_mut().unwrap().polls += 1;
        let waiting = Step::new(Outcome::Wait {
            message: Box::new(next),
            delay: Duration::from_secs(5),
            emit: Vec::new(),
        })
        .with(EventKind::RegionFailed {
            region: "westus".into(),
            reason: "replication failed".into(),
        });
        let measured = measure_step(&message, &waiting, now);
        assert_eq!(measured.stage_finished, None);
        assert_eq!(measured.operation_finished, None);
        assert_eq!(measured.failures, vec![FailureClass::RegionFailed]);

        let failed = Step::new(Outcome::Fail("too many start task failures".into()))
            .observe(Observation::Failure(FailureClass::StartTask));
        let measured = measure_step(&message, &failed, now);
        assert_eq!(measured.failures, vec![FailureClass::StartTask]);
        // The operation ended (in failure) all the same; the class is not an observation.
        assert!(measured.operation_finished.is_some());
        assert!(measured.observations.is_empty());
        let unclassified = measure_step(&message, &Step::new(Outcome::Fail("gone".into())), now);
        assert_eq!(unclassified.failures, vec![FailureClass::Permanent]);
    }
}

//! Stepping on (`runtime.step_on`): a step with a successor due now and of a stage the
//! runtime consumes steps that successor at once, within its own fenced step. What must hold: the
//! hop costs no stage message and no claim or commit of its own; every step's events are recorded
//! as that step's stage and branch say, in order, in the delivery's one commit; what a step taken
//! on parks is its own message; a successor of a stage not consumed here, or not due yet, goes
//! through its queue as before. (Faults — copies, failed acks, lagging readers — are
//! `fencing_tests`', which run with stepping on, the default.)

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

use super::testkit::{self, Script, fresh_run};
use super::*;
use crate::admission::{Begun, begin_with};
use crate::azure::AzureError;
use crate::bus::Bus;
use crate::bus::memory::MemoryBus;
use crate::events::{Event, EventKind};
use crate::ledger::record::Record;
use crate::ledger::{Fencing, Ledger};
use crate::model::envelope::{Envelope, Stage};
use crate::stages::{Outcome, Step, Tried};

/// How image-create answers, after snapshot advanced to it recording its snapshot.
type Second = fn(&Envelope) -> Result<Step, AzureError>;

/// Snapshot records a snapshot and advances to image-create (with `not_before`, if given);
/// image-create answers as `second` says.
fn snapshot_then(second: Second, not_before: Option<OffsetDateTime>) -> Arc<Script> {
    Script::new(move |m| match m.stage {
        Stage::Snapshot => {
            let mut next = m.next(Stage::ImageCreate, m.stage_started);
            next.not_before = not_before;
            let created = EventKind::ResourceCreated { id: "snapshot".into() };
            Ok(Step::new(Outcome::Advance(vec![next])).with(created))
        }
        Stage::ImageCreate => second(m),
        other => panic!("no step of {other} in this run"),
    })
}

/// Image-create records its image and ends the branch.
fn image_made(_: &Envelope) -> Result<Step, AzureError> {
    Ok(Step::new(Outcome::Done).with(EventKind::ResourceCreated { id: "image".into() }))
}

/// Image-create fails for good: the branch fails and the message is parked.
fn image_refused(_: &Envelope) -> Result<Step, AzureError> {
    Err(AzureError {
        operation: "PUT image i".into(),
        status: Some(403),
        code: Some("AuthorizationFailed".into()),
        message: "no role on the resource group".into(),
        request_id: None,
        retry_after: None,
    })
}

/// What one run did on a fresh bus: admitted through a ledger fenced by `fencing`, then worked
/// for a few seconds of tokio's time by a runtime over `stages` with `step_on` as given.
struct Worked {
    bus: Arc<MemoryBus>,
    handler: Arc<Script>,
    run_id: Uuid,
    report: RuntimeReport,
}

async fn work(handler: Arc<Script>, stages: &[Stage], fencing: Fencing, step_on: bool) -> Worked {
    work_for(handler, stages, fencing, step_on, Duration::from_secs(5), false).await
}

/// `work` for `window`; with `returned`, the run's first delivery is first taken and dropped
/// unsettled (a worker died before it stepped), so the broker hands it out again.
async fn work_for(
    handler: Arc<Script>,
    stages: &[Stage],
    fencing: Fencing,
    step_on: bool,
    window: Duration,
    returned: bool,
) -> Worked {
    let bus = testkit::bus();
    let settings = RuntimeSettings {
        fencing,
        step_on,
        ..testkit::settings()
    };
    let ledger = Arc::new(Ledger::start(bus.clone(), settings.ledger(), None));
    let (first, started) = fresh_run();
    let run_id = first.run_id;
    let begun = begin_with(bus.as_ref(), &ledger, vec![first], started).await;
    assert!(matches!(begun, Ok(Begun::Started { .. })), "{begun:?}");
    if returned {
        drop(bus.next(&[Stage::Snapshot]).await.unwrap());
    }
    let report = Runtime::new(bus.clone(), handler.clone(), stages.to_vec(), settings)
        .unwrap()
        .with_clock(Clock::tokio())
        .with_ledger(ledger)
        .run(tokio::time::sleep(window))
        .await;
    Worked {
        bus,
        handler,
        run_id,
        report,
    }
}

impl Worked {
    /// The commits of steps (not the admission's, which records the run's start), in the order
    /// read.
    fn step_commits(&self) -> Vec<crate::ledger::record::Commit> {
        let admission = |commit: &crate::ledger::record::Commit| {
            commit
                .events
                .iter()
                .any(|e| matches!(e.kind, EventKind::RunStarted { .. }))
        };
        self.bus
            .records()
            .into_iter()
            .filter_map(|record| match record {
                Record::Commit(commit) if commit.run_id == self.run_id && !admission(&commit) => Some(commit),
                _ => None,
            })
            .collect()
    }

    /// Claims of steps (the admission's slot is the run id).
    fn claims(&self) -> usize {
        let records = self.bus.records();
        let of_a_step =
            |r: &Record| matches!(r, Record::Claim(c) if c.run_id == self.run_id && c.message_id != self.run_id);
        records.iter().filter(|r| of_a_step(r)).count()
    }

    /// The stages the handler was called for, in order, and how each try was judged.
    fn calls(&self) -> Vec<(Stage, Tried)> {
        self.handler
            .calls()
            .iter()
            .map(|c| (c.message.stage, c.tried))
            .collect()
    }

    /// The run's recorded events other than its start: (stage, kind).
    fn recorded(&self) -> Vec<(Stage, EventKind)> {
        let events: Vec<Event> = crate::ledger::book::counted_events(&self.bus.records());
        events
            .into_iter()
            .filter(|e| e.run_id == self.run_id && !matches!(e.kind, EventKind::RunStarted { .. }))
            .map(|e| (e.stage, e.kind))
            .collect()
    }
}

/// Each of `stages` stepped once, in order, every one a first try.
fn first_tries(stages: &[Stage]) -> Vec<(Stage, Tried)> {
    stages.iter().map(|stage| (*stage, Tried::Never)).collect()
}

fn created(stage: Stage, id: &str) -> (Stage, EventKind) {
    (stage, EventKind::ResourceCreated { id: id.into() })
}

#[tokio::test(start_paused = true)]
async fn a_hop_to_a_stage_consumed_here_is_stepped_on_within_one_fenced_step() {
    for fencing in [Fencing::ClaimFirst, Fencing::CommitFirst] {
        let worked = work(snapshot_then(image_made, None), &Stage::ALL, fencing, true).await;
        assert_eq!(
            worked.calls(),
            [(Stage::Snapshot, Tried::Never), (Stage::ImageCreate, Tried::Never)],
            "{fencing:?}: each step once, the one taken on a first try as its delivery's is"
        );
        let stats = worked.bus.stats();
        assert_eq!(
            (stats.published, stats.delayed),
            (1, 0),
            "{fencing:?}: only the admission's message went through a queue"
        );
        let commits = worked.step_commits();
        assert_eq!(commits.len(), 1, "{fencing:?}: one commit for both steps: {commits:#?}");
        assert!(commits[0].successors.is_empty(), "{fencing:?}: the branch ended");
        let claims = usize::from(fencing == Fencing::ClaimFirst);
        assert_eq!(
            worked.claims(),
            claims,
            "{fencing:?}: one claim when claiming first, else none"
        );
        assert_eq!(
            worked.recorded(),
            [
                created(Stage::Snapshot, "snapshot"),
                created(Stage::ImageCreate, "image")
            ],
            "{fencing:?}: each step's events as its own stage's, in order"
        );
        assert!(worked.bus.stats().is_idle(), "{fencing:?}: nothing left in the bus");
        assert_eq!(
            worked.report.handled, 2,
            "{fencing:?}: the delivery and the step taken on are each a message handled"
        );
    }
}

/// Image-create first waits no time (a new phase of its stage, as verify's rollout after its
/// verdict), then records its image and ends the branch.
fn image_in_two_phases(m: &Envelope) -> Result<Step, AzureError> {
    if m.operation.is_some() {
        return image_made(m);
    }
    let mut next = m.clone();
    next.operation = Some(crate::model::envelope::InFlight {
        what: crate::model::envelope::Phase::Retire,
        status_urls: Vec::new(),
        started: m.stage_started,
        not_before: m.stage_started,
        polls: 0,
        progress: Default::default(),
    });
    let wait = Outcome::Wait {
        message: Box::new(next),
        delay: Duration::ZERO,
        emit: Vec::new(),
    };
    Ok(Step::new(wait).with(EventKind::ResourceCreated { id: "phase".into() }))
}

#[tokio::test(start_paused = true)]
async fn a_wait_of_no_time_is_stepped_on_too() {
    let worked = work(
        snapshot_then(image_in_two_phases, None),
        &Stage::ALL,
        Fencing::ClaimFirst,
        true,
    )
    .await;
    assert_eq!(
        worked.calls(),
        first_tries(&[Stage::Snapshot, Stage::ImageCreate, Stage::ImageCreate])
    );
    assert_eq!(
        worked.bus.stats().published,
        1,
        "only the admission's message went through a queue"
    );
    assert_eq!(worked.step_commits().len(), 1, "one commit for the three steps");
    assert_eq!(
        worked.recorded(),
        [
            created(Stage::Snapshot, "snapshot"),
            created(Stage::ImageCreate, "phase"),
            created(Stage::ImageCreate, "image")
        ],
    );
    let held = worked.handler.calls();
    assert_eq!(
        held[2].message.not_before, None,
        "the wait's hold has passed when it is stepped"
    );
}

/// Snapshot records its snapshot and waits 20 s for it, sending image-create on now beside the
/// wait; image-create records its image and ends its branch; snapshot's next look ends the run.
fn snapshot_waits_beside_image(m: &Envelope) -> Result<Step, AzureError> {
    match (m.stage, m.artifacts.recorded.is_empty()) {
        (Stage::Snapshot, true) => {
            let mut again = m.clone();
            again.artifacts.recorded.push("looked".into());
            let image = m.next(Stage::ImageCreate, m.stage_started);
            let wait = Outcome::Wait {
                message: Box::new(again),
                delay: Duration::from_secs(20),
                emit: vec![image],
            };
            Ok(Step::new(wait).with(EventKind::ResourceCreated { id: "snapshot".into() }))
        }
        (Stage::Snapshot, false) => Ok(Step::new(Outcome::Done)),
        (Stage::ImageCreate, _) => image_made(m),
        (other, _) => panic!("no step of {other} in this run"),
    }
}

/// Of a step's several messages, the one due now is stepped on and the wait beside it is kept
/// with the delivery: neither costs the bus a message of its own. One of a stage not consumed
/// here goes through its queue, and the wait is still kept.
#[tokio::test(start_paused = true)]
async fn of_several_messages_one_due_now_is_stepped_on_and_the_rest_go_on_as_before() {
    let a_minute_over = |stages: &'static [Stage]| {
        let script = Script::new(snapshot_waits_beside_image);
        work_for(
            script,
            stages,
            Fencing::ClaimFirst,
            true,
            Duration::from_secs(60),
            false,
        )
    };
    let worked = a_minute_over(&Stage::ALL).await;
    assert_eq!(
        worked.calls(),
        first_tries(&[Stage::Snapshot, Stage::ImageCreate, Stage::Snapshot])
    );
    let stats = worked.bus.stats();
    assert_eq!(
        (stats.published, stats.delayed),
        (1, 0),
        "image-create stepped on, the wait kept: {stats:?}"
    );
    assert_eq!(
        worked.step_commits().len(),
        2,
        "the first look with image-create, then the second look"
    );
    assert_eq!(
        worked.recorded(),
        [
            created(Stage::Snapshot, "snapshot"),
            created(Stage::ImageCreate, "image")
        ]
    );
    assert!(worked.bus.stats().is_idle(), "the run ended: {:?}", worked.bus.stats());

    // Image-create not consumed here: it goes through its queue, and the wait is still kept.
    let worked = a_minute_over(&[Stage::Snapshot]).await;
    assert_eq!(worked.calls(), first_tries(&[Stage::Snapshot, Stage::Snapshot]));
    assert_eq!(
        worked.bus.stats().published,
        2,
        "the admission's message and image-create's"
    );
    assert_eq!(worked.bus.ready(Stage::ImageCreate).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn with_step_on_off_every_hop_goes_through_its_queue() {
    let worked = work(snapshot_then(image_made, None), &Stage::ALL, Fencing::ClaimFirst, false).await;
    assert_eq!(worked.calls().len(), 2);
    assert_eq!(
        worked.bus.stats().published,
        2,
        "image-create's message went through its queue"
    );
    assert_eq!(worked.step_commits().len(), 2, "a commit a step");
    assert_eq!(worked.claims(), 2, "a claim a step");
    assert_eq!(
        worked.recorded(),
        [
            created(Stage::Snapshot, "snapshot"),
            created(Stage::ImageCreate, "image")
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_hop_to_a_stage_not_consumed_here_goes_through_its_queue() {
    let worked = work(
        snapshot_then(image_made, None),
        &[Stage::Snapshot],
        Fencing::ClaimFirst,
        true,
    )
    .await;
    assert_eq!(worked.calls(), [(Stage::Snapshot, Tried::Never)]);
    let ready = worked.bus.ready(Stage::ImageCreate);
    assert_eq!(ready.len(), 1, "image-create's message waits in its queue");
    let next = Envelope::decode(&ready[0]).unwrap();
    let commits = worked.step_commits();
    assert_eq!(commits.len(), 1);
    assert_eq!(
        commits[0].successors.iter().map(|s| s.token).collect::<Vec<_>>(),
        [next.token],
        "the queued message is the one the commit made live"
    );
    assert_eq!(worked.recorded(), [created(Stage::Snapshot, "snapshot")]);
}

#[tokio::test(start_paused = true)]
async fn a_successor_not_due_yet_goes_through_a_queue_or_a_tier() {
    let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
    let worked = work(
        snapshot_then(image_made, Some(later)),
        &Stage::ALL,
        Fencing::ClaimFirst,
        true,
    )
    .await;
    assert_eq!(
        worked.calls(),
        [(Stage::Snapshot, Tried::Never)],
        "not stepped before it is due"
    );
    let stats = worked.bus.stats();
    assert_eq!(stats.published + stats.delayed, 2, "it was sent on: {stats:?}");
    assert_eq!(worked.step_commits().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_step_taken_on_that_fails_for_good_parks_its_own_message() {
    let worked = work(
        snapshot_then(image_refused, None),
        &Stage::ALL,
        Fencing::ClaimFirst,
        true,
    )
    .await;
    assert_eq!(worked.calls().len(), 2);
    let parked = worked.bus.parked();
    assert_eq!(parked.len(), 1, "one message parked");
    let (body, reason) = &parked[0];
    let message = Envelope::decode(body).unwrap();
    assert_eq!(
        message.stage,
        Stage::ImageCreate,
        "the step that failed is what is parked"
    );
    assert_eq!(reason.stage, Some(Stage::ImageCreate));
    assert!(reason.error.contains("AuthorizationFailed"), "{reason:?}");
    let recorded = worked.recorded();
    assert_eq!(recorded[0], created(Stage::Snapshot, "snapshot"));
    assert!(
        matches!(&recorded[1], (Stage::ImageCreate, EventKind::RunFailed { .. })),
        "the run failed at image-create: {recorded:#?}"
    );
    assert_eq!(worked.step_commits().len(), 1, "one commit for both steps and the park");
}

#[tokio::test(start_paused = true)]
async fn a_step_taken_on_from_a_delivery_that_came_back_may_have_reached_azure_before() {
    // The try that died may have stepped on too before it did: the step taken on looks first.
    let handler = snapshot_then(image_made, None);
    let five = Duration::from_secs(5);
    let worked = work_for(handler, &Stage::ALL, Fencing::ClaimFirst, true, five, true).await;
    assert_eq!(
        worked.calls(),
        [(Stage::Snapshot, Tried::Maybe), (Stage::ImageCreate, Tried::Maybe)]
    );
    assert_eq!(worked.step_commits().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_whole_run_records_the_same_with_fewer_messages_and_records_when_stepping_on() {
    let mut seen = Vec::new();
    for step_on in [true, false] {
        let handler = super::fencing_tests::nightly();
        let minute = Duration::from_secs(60);
        let worked = work_for(handler, &Stage::ALL, Fencing::ClaimFirst, step_on, minute, false).await;
        let events = crate::ledger::book::counted_events(&worked.bus.records());
        assert_eq!(
            crate::events::run_result(&events),
            crate::events::RunResult::Succeeded,
            "{events:#?}"
        );
        let mut recorded: Vec<String> = worked
            .recorded()
            .into_iter()
            .map(|(stage, kind)| format!("{stage} {}", serde_json::to_string(&kind).unwrap()))
            .map(|line| line.replace(&worked.run_id.to_string(), "RUN"))
            .collect();
        recorded.sort();
        let stats = worked.bus.stats();
        seen.push((
            recorded,
            stats.published + stats.delayed,
            worked.step_commits().len(),
            worked.claims(),
        ));
    }
    let (on, off) = (&seen[0], &seen[1]);
    assert_eq!(on.0, off.0, "the same events, each under the same stage");
    assert!(
        on.1 < off.1,
        "fewer stage messages stepping on: {} against {}",
        on.1,
        off.1
    );
    assert!(on.2 < off.2, "fewer commits: {} against {}", on.2, off.2);
    assert!(on.3 < off.3, "fewer claims: {} against {}", on.3, off.3);
}

//! What a worker's folds of the run history keep for each waiting run, counted by the allocator:
//! the ledger's [`Book`] and the run tracker behind the run-level metrics are the part of every
//! worker's memory that grows with the number of unfinished runs (issue 15, goal 5: a worker at
//! most 32 MiB with 10,000 runs waiting, about 20 MiB of it the process itself).
//!
//! Each run is folded from the records a fenced nightly run leaves while it waits on replication:
//! the admission's commit (its `RunStarted` and first message), the `gallery-publish` step's claim
//! and commit (the version created, a successor at `replicate` kept with the step's delivery, as
//! `runtime.keep_waits` keeps it), and the first look's `Waiting` note. The live heap is counted before and after 4,000 such runs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use sigrun::events::{Event, EventKind, PoolRef};
use sigrun::ledger::Book;
use sigrun::ledger::record::{Claim, Commit, Consumed, Kept, Record, Successor};
use sigrun::model::envelope::{Branch, Stage};
use sigrun::telemetry::runs::RunTracker;
use time::OffsetDateTime;
use uuid::Uuid;

/// The system allocator, counting the bytes live in the whole process: this binary holds one test,
/// so nothing else allocates while it counts (a second test here would run beside it and count
/// into the same total).
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

fn signed(size: usize) -> isize {
    isize::try_from(size).unwrap_or(isize::MAX)
}

// SAFETY: every call is passed on to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(signed(layout.size()), Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(signed(layout.size()), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let moved = unsafe { System.realloc(ptr, layout, new_size) };
        // A failed realloc leaves the old block as it was.
        if !moved.is_null() {
            LIVE.fetch_add(signed(new_size) - signed(layout.size()), Ordering::Relaxed);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const PIPELINE: &str = "nightly-ubuntu";
const REGIONS: [&str; 3] = ["westeurope", "northeurope", "eastus"];

fn event(run_id: Uuid, stage: Stage, kind: EventKind) -> Event {
    Event {
        run_id,
        pipeline: PIPELINE.into(),
        version: format!("2026.1204.{}", run_id.as_u128() % 10_000),
        stage,
        branch: Branch::Trunk,
        at: OffsetDateTime::now_utc(),
        kind,
    }
}

/// The records a fenced run leaves until its first look at replication, in stream order.
fn waiting_run() -> Vec<Record> {
    let run_id = Uuid::new_v4();
    let (admission, step) = (Uuid::new_v4(), Uuid::new_v4());
    let (message_id, first, second) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let started = event(
        run_id,
        Stage::GalleryPublish,
        EventKind::RunStarted {
            rollout: false,
            regions: REGIONS.iter().map(|r| (*r).into()).collect(),
            pools: vec![PoolRef {
                region: REGIONS[0].into(),
                target: "render".into(),
            }],
        },
    );
    let successor = |token, stage| Successor {
        message_id,
        token,
        stage,
        branch: Branch::Trunk,
    };
    let version = format!(
        "/subscriptions/{}/resourceGroups/rg-images/providers/Microsoft.Compute/galleries/gallery/images/ubuntu/versions/2026.1204.1",
        Uuid::nil()
    );
    vec![
        Record::Commit(Commit {
            kept: None,
            run_id,
            pipeline: PIPELINE.into(),
            claim: admission,
            consumed: None,
            successors: vec![successor(first, Stage::GalleryPublish)],
            events: vec![started],
        }),
        Record::Claim(Claim {
            run_id,
            pipeline: PIPELINE.into(),
            message_id,
            token: first,
            claim: step,
            supersedes: None,
            at: OffsetDateTime::now_utc(),
        }),
        Record::Commit(Commit {
            // The book keeps where this is, not the message: a stand-in body will do.
            kept: Some(Kept {
                carrier: first,
                token: second,
                message: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
            }),
            run_id,
            pipeline: PIPELINE.into(),
            claim: step,
            consumed: Some(Consumed {
                message_id,
                token: first,
            }),
            successors: vec![successor(second, Stage::Replicate)],
            events: vec![event(
                run_id,
                Stage::GalleryPublish,
                EventKind::ResourceCreated { id: version },
            )],
        }),
        Record::Event(event(
            run_id,
            Stage::Replicate,
            EventKind::Waiting {
                what: "replication".into(),
            },
        )),
    ]
}

/// Folds `records` as a worker's ledger does: every record into the book, the events of those
/// that count into the run tracker.
fn fold(book: &mut Book, tracker: &mut RunTracker, records: &[Record]) {
    for (offset, record) in (0u64..).zip(records) {
        if book.apply_at(record, Some(offset), Instant::now()) {
            for event in record.events() {
                tracker.apply(event);
            }
        }
    }
}

#[test]
fn a_waiting_fenced_run_costs_a_workers_folds_a_few_hundred_bytes() {
    const RUNS: usize = 4_000;
    // Built beforehand: only what the folds keep is counted.
    let runs: Vec<Vec<Record>> = (0..RUNS).map(|_| waiting_run()).collect();
    let (mut book, mut tracker) = (Book::default(), RunTracker::default());
    fold(&mut book, &mut tracker, &waiting_run());
    let before = LIVE.load(Ordering::Relaxed);
    for records in &runs {
        fold(&mut book, &mut tracker, records);
    }
    let after = LIVE.load(Ordering::Relaxed);
    let per_run = (after - before) / isize::try_from(RUNS).unwrap();
    let fences = book.fence_bytes() / (RUNS + 1);
    eprintln!("a waiting fenced run: {per_run} bytes in a worker's folds ({fences} of them its fences)");
    assert!(
        book.run_in_progress(runs[0][0].run_id().expect("a run's record")) == Some(true),
        "the runs are waiting, not settled"
    );
    let Record::Claim(claim) = &runs[0][1] else {
        panic!("the second record is the step's claim")
    };
    assert!(
        book.kept_at(claim.run_id, claim.token).is_some(),
        "the book knows where each run's kept wait is"
    );
    // Hash tables grow by doubling: 4,001 runs are just past a doubling (a table of 4,096
    // buckets holds 3,584), where a run's share of the tables is at its largest.
    assert!(per_run <= 640, "{per_run} bytes per waiting run");
}

//! [`Book`]: the ledger's state, folded from the history stream in stream order. Pure: it is told
//! each record and when it was read, and answers what a message copy is worth (its [`Standing`]),
//! who holds the step of a message state (a [`Verdict`] on a claim), which runs have started or
//! been cancelled, and which pool branches a live run is still creating or verifying.
//!
//! Every reader of the stream folds the same records in the same order, so every worker reaches
//! the same answers; only the age of a claim is each reader's own (when it read the claim).
//!
//! Rules:
//! - a token is live once a commit lists it; it is spent once a commit consumes it;
//! - the first claim read on a token holds it; a claim naming the holder in `supersedes` takes it
//!   over (the first such claim wins), which a claimant does only after the holder released it or
//!   held it past the claim timeout;
//! - a commit counts only when made by the holder of the token it consumes;
//! - a copy whose token is spent, or that was made by a claim that lost, is stale; so is every copy
//!   of a run with nothing live left (its records are then forgotten, its start and cancel kept).
//!
//! What a run's steps leave behind is kept small, since a worker's book holds every unfinished run:
//! a committed step leaves its claim (claim id → token) and its spent token, not its hold; a slot
//! whose token is consumed without a successor goes; and a run's tables are short vectors kept at
//! their exact length (see [`Fences`]), not hash tables.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::record::{Claim, Commit, Record, Release};
use crate::events::{Event, EventKind};
use crate::model::envelope::{Branch, Stage};

/// What a message copy is worth, as far as the book knows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The copy carries no token (a message from before the ledger): not fenced.
    Unfenced,
    /// Its token is the live state of its slot.
    Live,
    /// A copy of a state already stepped, of a step that lost its claim, or of a finished run.
    Stale,
    /// Not known (yet): the commit that makes it live may not have been read.
    Unknown,
}

/// The step that sent a copy on, as the copy names it: the id of its claim (or, for a step that
/// committed first, of its commit) and the state it consumed (nil for a step that claimed first,
/// a replay, or a copy from before `made_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Maker {
    pub step: Uuid,
    pub consumed: Uuid,
}

impl Maker {
    /// A maker that claimed first (or is not known by what it consumed).
    pub fn claimed(step: Uuid) -> Maker {
        Maker {
            step,
            consumed: Uuid::nil(),
        }
    }
}

/// The answer to a claim, once the claim itself has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// This claim holds the token: carry the step out and commit it.
    Won,
    /// The state was stepped already (or the copy is stale): drop the copy.
    Stale,
    /// Another claim holds the token and may still commit: look again later.
    Wait,
    /// The copy's state is not known yet (the commit that makes it live may not have been read).
    Unknown,
    /// The holder released the token or held it past the timeout: claim again, superseding it.
    TakeOver { holder: Uuid },
}

/// A claim holding a token that is not spent yet.
#[derive(Debug)]
struct Hold {
    holder: Uuid,
    /// When this reader read the holder's claim.
    since: Instant,
    released: bool,
}

/// A message id's live state: the token its next copy must carry. A slot whose token is consumed
/// without a successor in the same slot is removed.
#[derive(Debug)]
struct Slot {
    live: Uuid,
    branch: Branch,
}

#[derive(Debug, Default)]
struct RunBook {
    /// The stage it entered at, once its admission is recorded.
    started: Option<Stage>,
    cancelled: bool,
    /// Nothing of it is live any more; its slots and claims were forgotten.
    settled: bool,
    /// What fencing keeps, made on a run's first claim, commit or verified pool: a run that has
    /// none (unfenced, or settled with no pool verified) costs the book a few bytes, not the
    /// four empty tables it once held inline for each of 10,000 waiting runs.
    fences: Option<Box<Fences>>,
}

/// What fencing keeps for one run. A run has a few slots and at most tens of claims, and a worker
/// keeps this for each of thousands of waiting runs: short vectors scanned in order, each at its
/// exact length, cost a tenth of the hash tables (hasher state and power-of-two capacity each)
/// they replace, and a scan of tens of entries is as quick as a hash.
#[derive(Debug, Default)]
struct Fences {
    /// Live slots by message id.
    slots: Vec<(Uuid, Slot)>,
    /// Claims by the token they hold, until it is spent.
    holds: Vec<(Uuid, Hold)>,
    /// Every claim read: claim id → the token it claimed.
    claims: Vec<(Uuid, Uuid)>,
    /// Tokens consumed by a commit that counted.
    spent: Vec<Uuid>,
    /// What its verdicts said, once one did (rare: boxed, so a waiting run does not pay for it).
    verdicts: Option<Box<Verdicts>>,
    /// Successors kept with a delivery instead of published: the carrier's token → the kept
    /// state and where its commit is in the stream, while that state is not spent.
    kept: Vec<(Uuid, KeptAt)>,
}

/// What a run's verdicts said: kept past its settling, as a replayed verdict still asks.
#[derive(Debug, Default)]
struct Verdicts {
    /// Pool targets whose pool verified.
    verified: Vec<String>,
    /// A verdict of the run promoted its version (`Promoted`).
    promoted: bool,
}

/// A successor kept with its delivery: its token, and the stream offset of the commit that holds
/// its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeptAt {
    token: Uuid,
    offset: u64,
}

impl Fences {
    fn slot(&self, message_id: &Uuid) -> Option<&Slot> {
        value_of(&self.slots, message_id)
    }

    fn hold(&self, token: &Uuid) -> Option<&Hold> {
        value_of(&self.holds, token)
    }

    fn hold_mut(&mut self, token: &Uuid) -> Option<&mut Hold> {
        self.holds.iter_mut().find(|(t, _)| t == token).map(|(_, hold)| hold)
    }

    fn claimed(&self, claim: &Uuid) -> Option<&Uuid> {
        value_of(&self.claims, claim)
    }

    /// Pool targets whose pool verified.
    fn verified(&self) -> &[String] {
        self.verdicts.as_deref().map_or(&[], |v| &v.verified)
    }

    fn verdicts_mut(&mut self) -> &mut Verdicts {
        self.verdicts.get_or_insert_with(Box::default)
    }

    fn drop_hold(&mut self, token: &Uuid) {
        self.holds.retain(|(t, _)| t != token);
        if self.holds.is_empty() {
            self.holds = Vec::new();
        }
    }

    /// Bytes these tables take on the heap, the box included (for tests and the memory bench).
    fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        size_of::<Fences>()
            + self.slots.capacity() * size_of::<(Uuid, Slot)>()
            + self
                .slots
                .iter()
                .map(|(_, slot)| branch_bytes(&slot.branch))
                .sum::<usize>()
            + self.holds.capacity() * size_of::<(Uuid, Hold)>()
            + self.claims.capacity() * size_of::<(Uuid, Uuid)>()
            + self.spent.capacity() * size_of::<Uuid>()
            + self.verdicts.as_ref().map_or(0, |v| {
                size_of::<Verdicts>()
                    + v.verified.iter().map(String::capacity).sum::<usize>()
                    + v.verified.capacity() * size_of::<String>()
            })
            + self.kept.capacity() * size_of::<(Uuid, KeptAt)>()
    }
}

/// The heap bytes of a branch's names.
fn branch_bytes(branch: &Branch) -> usize {
    match branch {
        Branch::Pool { region, target } => region.capacity() + target.capacity(),
        Branch::Trunk | Branch::CleanUp { .. } => 0,
    }
}

fn value_of<'a, K: PartialEq, V>(entries: &'a [(K, V)], key: &K) -> Option<&'a V> {
    entries.iter().find(|(k, _)| k == key).map(|(_, value)| value)
}

/// Pushes without the spare room a growing vector keeps: most of a run's tables hold one to a few
/// entries for as long as the run waits.
fn push_exact<T>(entries: &mut Vec<T>, entry: T) {
    entries.reserve_exact(1);
    entries.push(entry);
}

/// Sets `key`'s value, in place if it has one.
fn put<K: PartialEq, V>(entries: &mut Vec<(K, V)>, key: K, value: V) {
    match entries.iter_mut().find(|(k, _)| *k == key) {
        Some((_, kept)) => *kept = value,
        None => push_exact(entries, (key, value)),
    }
}

/// The ledger's state over every run the stream retains.
#[derive(Debug, Default)]
pub struct Book {
    runs: HashMap<Uuid, RunBook>,
}

impl Book {
    /// Folds in the next record of the stream, read at `now`. Returns false for a commit that
    /// does not count (not made by the holder of what it consumes), whose events are to be ignored.
    pub fn apply(&mut self, record: &Record, now: Instant) -> bool {
        self.apply_at(record, None, now)
    }

    /// As [`Book::apply`], for a record read at stream offset `offset`: a commit that kept its
    /// successor with its delivery is then found again by [`Book::kept_at`].
    pub fn apply_at(&mut self, record: &Record, offset: Option<u64>, now: Instant) -> bool {
        match record {
            Record::Event(event) => {
                self.run(event.run_id).apply_event(event);
                true
            }
            Record::Claim(claim) => {
                self.run(claim.run_id).apply_claim(claim, now);
                true
            }
            Record::Commit(commit) => self.run(commit.run_id).apply_commit(commit, offset),
            Record::Release(release) => {
                self.run(release.run_id).apply_release(release);
                true
            }
            Record::Marker(_) => true,
        }
    }

    fn run(&mut self, run_id: Uuid) -> &mut RunBook {
        self.runs.entry(run_id).or_default()
    }

    /// What the copy of `message_id` carrying `token`, sent on by `maker`, is worth. The
    /// admission of run `r` is the slot `r` with token `r`.
    pub fn standing(&self, run_id: Uuid, message_id: Uuid, token: Uuid, maker: Maker) -> Standing {
        if token.is_nil() {
            return Standing::Unfenced;
        }
        if message_id == run_id && token == run_id {
            // The admission: open until the run has started.
            let run = self.runs.get(&run_id);
            let started = run.is_some_and(|run| run.started.is_some() || run.is_spent(&token));
            return if started { Standing::Stale } else { Standing::Live };
        }
        let Some(run) = self.runs.get(&run_id) else {
            return Standing::Unknown;
        };
        if run.is_spent(&token) || run.settled {
            return Standing::Stale;
        }
        if run.slot(&message_id).is_some_and(|s| s.live == token) {
            return Standing::Live;
        }
        // Not live: stale when the step that made it did not make it live (what it claimed is spent:
        // by another claim, or by its own commit, which listed other successors; or another claim
        // holds it); otherwise its commit may just not have been read. A maker that committed first
        // is known once its commit counted; before that, what it consumed being spent means another
        // step's commit came first, and the maker's can no longer count.
        match run.claimed(&maker.step) {
            Some(token) if run.is_spent(token) => Standing::Stale,
            Some(token) if run.hold(token).is_some_and(|hold| hold.holder != maker.step) => Standing::Stale,
            None if !maker.consumed.is_nil() && run.is_spent(&maker.consumed) => Standing::Stale,
            _ => Standing::Unknown,
        }
    }

    /// The verdict on `claim` (already read) for the copy it was made for.
    pub fn verdict(&self, claim: &Claim, maker: Maker, now: Instant, timeout: Duration) -> Verdict {
        match self.standing(claim.run_id, claim.message_id, claim.token, maker) {
            Standing::Stale => return Verdict::Stale,
            Standing::Unknown => return Verdict::Unknown,
            Standing::Unfenced => return Verdict::Won,
            Standing::Live => {}
        }
        let hold = self.runs.get(&claim.run_id).and_then(|run| run.hold(&claim.token));
        match hold {
            // Not read yet (the caller waits for its claim to be read first).
            None => Verdict::Wait,
            Some(hold) if hold.holder == claim.claim => Verdict::Won,
            Some(hold) if hold.released || now.saturating_duration_since(hold.since) > timeout => {
                Verdict::TakeOver { holder: hold.holder }
            }
            Some(_) => Verdict::Wait,
        }
    }

    /// Whether a claim other than a released or timed-out one holds `token`, not spent yet: a copy
    /// of that state is put off without a look.
    pub fn held(&self, run_id: Uuid, token: Uuid, now: Instant, timeout: Duration) -> bool {
        self.runs
            .get(&run_id)
            .and_then(|run| run.hold(&token))
            .is_some_and(|hold| !hold.released && now.saturating_duration_since(hold.since) <= timeout)
    }

    /// Whether no try of a copy's state can have begun before, as far as this book has read: the
    /// step that sent it on claimed it in the open (a replay's commit names no claim read here),
    /// and no claim on the state itself has been read (held, released or lost).
    pub fn untried(&self, run_id: Uuid, token: Uuid, made_by: Uuid) -> bool {
        self.runs
            .get(&run_id)
            .is_some_and(|run| run.claimed(&made_by).is_some() && run.hold(&token).is_none() && !run.is_spent(&token))
    }

    /// Where the commit is that kept a successor with the delivery of the copy carrying `carrier`
    /// (a spent state), while that successor is live: the delivery came back, so the successor
    /// is carried on from that commit.
    pub fn kept_at(&self, run_id: Uuid, carrier: Uuid) -> Option<u64> {
        let run = self.runs.get(&run_id)?;
        let fences = run.fences()?;
        let kept = value_of(&fences.kept, &carrier)?;
        let live = fences.slots.iter().any(|(_, slot)| slot.live == kept.token);
        live.then_some(kept.offset)
    }

    /// Whether a claim has been read on `token` and not spent (held, released or timed out): a
    /// step committing first cannot take such a state over, only a claim naming its holder can.
    pub fn claimed_unspent(&self, run_id: Uuid, token: Uuid) -> bool {
        self.runs.get(&run_id).is_some_and(|run| run.hold(&token).is_some())
    }

    /// Whether `token` can no longer be consumed: spent, or its run settled.
    pub fn spent(&self, run_id: Uuid, token: Uuid) -> bool {
        self.runs
            .get(&run_id)
            .is_some_and(|run| run.settled || run.is_spent(&token))
    }

    /// Whether the step that made a copy may still commit it: its claim has been read and neither
    /// committed nor lost, or (a step committing first) its commit has not been read and what it
    /// consumed is not spent. Its copies are not live until it commits (or are orphans, if it
    /// never does: then another copy of its own message steps, and spends what it consumed).
    pub fn maker_pending(&self, run_id: Uuid, maker: Maker) -> bool {
        let Some(run) = self.runs.get(&run_id) else {
            return false;
        };
        match run.claimed(&maker.step) {
            Some(token) => run.hold(token).is_some_and(|hold| hold.holder == maker.step),
            None => !run.settled && !maker.consumed.is_nil() && !run.is_spent(&maker.consumed),
        }
    }

    /// Whether claim `claim` has been read.
    pub fn has_claim(&self, run_id: Uuid, claim: Uuid) -> bool {
        self.runs.get(&run_id).is_some_and(|run| run.claimed(&claim).is_some())
    }

    /// The stage a run entered at, once its admission is recorded.
    pub fn started(&self, run_id: Uuid) -> Option<Stage> {
        self.runs.get(&run_id).and_then(|run| run.started)
    }

    /// Whether nothing of run `run_id` is live (its slots and claims forgotten).
    pub fn is_settled(&self, run_id: Uuid) -> bool {
        self.runs.get(&run_id).is_some_and(|run| run.settled)
    }

    pub fn is_cancelled(&self, run_id: Uuid) -> bool {
        self.runs.get(&run_id).is_some_and(|run| run.cancelled)
    }

    /// Runs known to have started.
    pub fn started_count(&self) -> usize {
        self.runs.values().filter(|run| run.started.is_some()).count()
    }

    /// Whether run `run_id` is still creating or verifying its pool for `target`: `None` when the
    /// run is not known (its history expired, or it never ran here).
    pub fn pool_in_progress(&self, run_id: Uuid, target: &str) -> Option<bool> {
        let run = self.runs.get(&run_id)?;
        if run.settled || run.fences().is_some_and(|f| f.verified().iter().any(|v| v == target)) {
            return Some(false);
        }
        Some(
            run.slots()
                .any(|slot| matches!(&slot.branch, Branch::Pool { target: t, .. } if t == target)),
        )
    }

    /// Whether a verdict of run `run_id` promoted its version; `None` when the book does not hold
    /// the run.
    pub fn version_promoted(&self, run_id: Uuid) -> Option<bool> {
        let run = self.runs.get(&run_id)?;
        Some(
            run.fences()
                .is_some_and(|f| f.verdicts.as_ref().is_some_and(|v| v.promoted)),
        )
    }

    /// Whether run `run_id` still has a message live (anything of it may still act); `None` when
    /// the book does not hold the run.
    pub fn run_in_progress(&self, run_id: Uuid) -> Option<bool> {
        let run = self.runs.get(&run_id)?;
        Some(!run.settled && run.slots().next().is_some())
    }

    /// Slots, claims, holds and spent tokens held in memory (for tests and the memory bench).
    pub fn open_records(&self) -> usize {
        self.runs
            .values()
            .filter_map(|run| run.fences())
            .map(|f| f.slots.len() + f.claims.len() + f.holds.len() + f.spent.len())
            .sum()
    }

    /// Bytes the fencing tables of every run take on the heap (for tests and the memory bench).
    pub fn fence_bytes(&self) -> usize {
        self.runs
            .values()
            .filter_map(|run| run.fences())
            .map(Fences::heap_bytes)
            .sum()
    }
}

impl RunBook {
    fn fences(&self) -> Option<&Fences> {
        self.fences.as_deref()
    }

    fn fences_mut(&mut self) -> &mut Fences {
        self.fences.get_or_insert_with(Box::default)
    }

    fn hold(&self, token: &Uuid) -> Option<&Hold> {
        self.fences()?.hold(token)
    }

    fn slot(&self, message_id: &Uuid) -> Option<&Slot> {
        self.fences()?.slot(message_id)
    }

    /// The token claim `claim` claimed, once read.
    fn claimed(&self, claim: &Uuid) -> Option<&Uuid> {
        self.fences()?.claimed(claim)
    }

    fn is_spent(&self, token: &Uuid) -> bool {
        self.fences().is_some_and(|f| f.spent.contains(token))
    }

    /// The live slots.
    fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.fences()
            .into_iter()
            .flat_map(|f| f.slots.iter().map(|(_, slot)| slot))
    }

    fn apply_event(&mut self, event: &Event) {
        match &event.kind {
            EventKind::RunStarted { .. } => {
                self.started.get_or_insert(event.stage);
            }
            EventKind::CancelRequested => self.cancelled = true,
            EventKind::Promoted { .. } => self.fences_mut().verdicts_mut().promoted = true,
            EventKind::PoolVerified { .. } => {
                if let Branch::Pool { target, .. } = &event.branch {
                    let verified = &mut self.fences_mut().verdicts_mut().verified;
                    if !verified.contains(target) {
                        push_exact(verified, target.clone());
                    }
                }
            }
            _ => {}
        }
    }

    fn apply_claim(&mut self, claim: &Claim, now: Instant) {
        let fences = self.fences_mut();
        // Kept even for a spent token: what such a claim sends is stale.
        put(&mut fences.claims, claim.claim, claim.token);
        if fences.spent.contains(&claim.token) {
            return;
        }
        match fences.hold_mut(&claim.token) {
            None => push_exact(
                &mut fences.holds,
                (
                    claim.token,
                    Hold {
                        holder: claim.claim,
                        since: now,
                        released: false,
                    },
                ),
            ),
            Some(hold) if claim.supersedes == Some(hold.holder) => {
                hold.holder = claim.claim;
                hold.since = now;
                hold.released = false;
            }
            Some(_) => {}
        }
    }

    fn apply_release(&mut self, release: &Release) {
        if let Some(fences) = self.fences.as_deref_mut()
            && let Some(token) = fences.claimed(&release.claim).copied()
            && let Some(hold) = fences.hold_mut(&token)
            && hold.holder == release.claim
        {
            hold.released = true;
        }
    }

    fn apply_commit(&mut self, commit: &Commit, offset: Option<u64>) -> bool {
        // A settled run has nothing live, and has forgotten what it spent: a commit consuming
        // something of it is a late copy's (one that stepped before the run settled and committed
        // first, after). Only a replay, which consumes nothing, revives it.
        if self.settled && commit.consumed.is_some() {
            return false;
        }
        let fences = self.fences_mut();
        if let Some(consumed) = &commit.consumed {
            if fences.spent.contains(&consumed.token) {
                return false;
            }
            match fences.hold(&consumed.token) {
                Some(hold) if hold.holder != commit.claim => return false,
                Some(_) => fences.drop_hold(&consumed.token),
                // Its claim is not in the stream any more (retention): the commit stands.
                None => put(&mut fences.claims, commit.claim, consumed.token),
            }
            push_exact(&mut fences.spent, consumed.token);
            fences.kept.retain(|(_, kept)| kept.token != consumed.token);
            fences
                .slots
                .retain(|(message_id, slot)| !(*message_id == consumed.message_id && slot.live == consumed.token));
        }
        for successor in &commit.successors {
            let slot = Slot {
                live: successor.token,
                branch: successor.branch.clone(),
            };
            put(&mut fences.slots, successor.message_id, slot);
        }
        if let (Some(kept), Some(offset)) = (&commit.kept, offset) {
            let at = KeptAt {
                token: kept.token,
                offset,
            };
            put(&mut fences.kept, kept.carrier, at);
        }
        self.settled = false;
        for event in &commit.events {
            self.apply_event(event);
        }
        self.settle();
        true
    }

    /// Forgets the slots and claims of a started run with nothing live left (and its fences
    /// altogether unless a pool verified or the version was promoted: a replayed verdict still
    /// asks both).
    fn settle(&mut self) {
        if self.started.is_none() || self.slots().next().is_some() {
            return;
        }
        self.settled = true;
        if let Some(verdicts) = self.fences.take().and_then(|f| f.verdicts) {
            self.fences = Some(Box::new(Fences {
                verdicts: Some(verdicts),
                ..Fences::default()
            }));
        }
    }
}

/// The events of `records` that count, in order, as a reader folding them from the first record
/// judges them: a commit that did not count (its step's copy lost) shows nowhere.
pub fn counted_events<'a>(records: impl IntoIterator<Item = &'a Record>) -> Vec<Event> {
    let mut book = Book::default();
    let now = Instant::now();
    records
        .into_iter()
        .filter(|record| book.apply(record, now))
        .flat_map(|record| record.events().iter().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;

    use super::*;
    use crate::ledger::record::{Consumed, Successor};

    const TIMEOUT: Duration = Duration::from_secs(10);

    struct Run {
        id: Uuid,
        book: Book,
        now: Instant,
    }

    fn claim(run: Uuid, message_id: Uuid, token: Uuid, supersedes: Option<Uuid>) -> Claim {
        Claim {
            run_id: run,
            pipeline: "p".into(),
            message_id,
            token,
            claim: Uuid::new_v4(),
            supersedes,
            at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn pool(target: &str) -> Branch {
        Branch::Pool {
            region: "eastus".into(),
            target: target.into(),
        }
    }

    fn started(run: Uuid) -> Event {
        Event {
            run_id: run,
            pipeline: "p".into(),
            version: "1.0.0".into(),
            stage: Stage::Snapshot,
            branch: Branch::Trunk,
            at: OffsetDateTime::UNIX_EPOCH,
            kind: EventKind::RunStarted {
                rollout: false,
                regions: Vec::new(),
                pools: Vec::new(),
            },
        }
    }

    impl Run {
        fn new() -> Run {
            Run {
                id: Uuid::new_v4(),
                book: Book::default(),
                now: Instant::now(),
            }
        }

        fn apply(&mut self, record: Record) -> bool {
            self.book.apply(&record, self.now)
        }

        fn claim(&mut self, message_id: Uuid, token: Uuid) -> Claim {
            let claim = claim(self.id, message_id, token, None);
            self.apply(Record::Claim(claim.clone()));
            claim
        }

        fn commit(&mut self, claim: &Claim, successors: Vec<(Uuid, Uuid, Branch)>, events: Vec<Event>) -> bool {
            self.apply(Record::Commit(Commit {
                kept: None,
                run_id: self.id,
                pipeline: "p".into(),
                claim: claim.claim,
                consumed: Some(Consumed {
                    message_id: claim.message_id,
                    token: claim.token,
                }),
                successors: successors
                    .into_iter()
                    .map(|(message_id, token, branch)| Successor {
                        message_id,
                        token,
                        stage: Stage::Verify,
                        branch,
                    })
                    .collect(),
                events,
            }))
        }

        /// Admits the run with one trunk message; returns its (message id, token, made_by).
        fn admit(&mut self) -> (Uuid, Uuid, Uuid) {
            let admission = self.claim(self.id, self.id);
            let (first, token) = (Uuid::new_v4(), Uuid::new_v4());
            assert!(self.commit(&admission, vec![(first, token, Branch::Trunk)], vec![started(self.id)]));
            (first, token, admission.claim)
        }
    }

    /// A commit by `claim` keeping its one successor `(message_id, token)` with the delivery of
    /// the copy carrying `carrier`, read at `offset`.
    fn keeping(run: &mut Run, claim: &Claim, next: (Uuid, Uuid), carrier: Uuid, offset: u64) -> bool {
        let mut message = crate::runtime::testkit::envelope(Stage::Replicate);
        (message.message_id, message.token) = next;
        let commit = Commit {
            kept: Some(crate::ledger::record::Kept::new(carrier, &message).unwrap()),
            successors: vec![Successor::of(&message)],
            ..claim_commit(run, claim)
        };
        run.book.apply_at(&Record::Commit(commit), Some(offset), run.now)
    }

    #[test]
    fn a_kept_successor_is_found_by_its_carrier_while_it_is_live() {
        let mut run = Run::new();
        let (first, carrier, _) = run.admit();
        assert_eq!(run.book.kept_at(run.id, carrier), None, "nothing kept yet");
        // The first step keeps its wait with the first message's delivery...
        let claim = run.claim(first, carrier);
        let waiting = Uuid::new_v4();
        assert!(keeping(&mut run, &claim, (first, waiting), carrier, 7));
        assert_eq!(run.book.kept_at(run.id, carrier), Some(7));
        assert_eq!(
            run.book.kept_at(run.id, waiting),
            None,
            "found by its carrier, not itself"
        );
        // ...its look keeps the next state with the same delivery: found there instead...
        let claim = run.claim(first, waiting);
        let later = Uuid::new_v4();
        assert!(keeping(&mut run, &claim, (first, later), carrier, 12));
        assert_eq!(run.book.kept_at(run.id, carrier), Some(12));
        // ...and once a step consumes the kept state without keeping another, nothing is.
        let claim = run.claim(first, later);
        assert!(run.commit(
            &claim,
            vec![(Uuid::new_v4(), Uuid::new_v4(), Branch::Trunk)],
            Vec::new()
        ));
        assert_eq!(run.book.kept_at(run.id, carrier), None);
        assert_eq!(run.book.runs[&run.id].fences().unwrap().kept.len(), 0);
    }

    #[test]
    fn a_kept_successor_no_longer_live_is_not_found() {
        let mut run = Run::new();
        let (first, carrier, _) = run.admit();
        let claim = run.claim(first, carrier);
        let waiting = Uuid::new_v4();
        assert!(keeping(&mut run, &claim, (first, waiting), carrier, 3));
        // A replay makes another state of the same slot live: the kept one is not.
        assert!(run.apply(Record::Commit(replay(run.id, first))));
        assert_eq!(run.book.kept_at(run.id, carrier), None);
        // Nor in a book that folds without offsets (a reader that only shows the history).
        let mut other = Run::new();
        let (first, carrier, _) = other.admit();
        let claim = other.claim(first, carrier);
        let commit = Commit {
            kept: Some(
                crate::ledger::record::Kept::new(carrier, &crate::runtime::testkit::envelope(Stage::Replicate))
                    .unwrap(),
            ),
            ..claim_commit(&other, &claim)
        };
        assert!(other.apply(Record::Commit(commit)));
        assert_eq!(other.book.kept_at(other.id, carrier), None);
    }

    /// A replay's commit: it consumes nothing and makes a new state of `message_id` live.
    fn replay(run_id: Uuid, message_id: Uuid) -> Commit {
        Commit {
            kept: None,
            run_id,
            pipeline: "p".into(),
            claim: Uuid::new_v4(),
            consumed: None,
            successors: vec![Successor {
                message_id,
                token: Uuid::new_v4(),
                stage: Stage::Verify,
                branch: Branch::Trunk,
            }],
            events: Vec::new(),
        }
    }

    /// A commit by `claim` consuming what it claimed, with nothing else.
    fn claim_commit(run: &Run, claim: &Claim) -> Commit {
        Commit {
            kept: None,
            run_id: run.id,
            pipeline: "p".into(),
            claim: claim.claim,
            consumed: Some(Consumed {
                message_id: claim.message_id,
                token: claim.token,
            }),
            successors: Vec::new(),
            events: Vec::new(),
        }
    }

    #[test]
    fn the_first_claim_wins_and_its_commit_spends_the_token() {
        let mut run = Run::new();
        let (first, token, made_by) = run.admit();
        assert_eq!(
            run.book.standing(run.id, first, token, Maker::claimed(made_by)),
            Standing::Live
        );
        let a = run.claim(first, token);
        let b = run.claim(first, token);
        assert_eq!(
            run.book.verdict(&a, Maker::claimed(made_by), run.now, TIMEOUT),
            Verdict::Won
        );
        assert_eq!(
            run.book.verdict(&b, Maker::claimed(made_by), run.now, TIMEOUT),
            Verdict::Wait
        );
        assert!(run.book.held(run.id, token, run.now, TIMEOUT));
        let next = Uuid::new_v4();
        assert!(run.commit(&a, vec![(first, next, Branch::Trunk)], Vec::new()));
        assert!(!run.book.held(run.id, token, run.now, TIMEOUT));
        // The loser's copy is stale now; the successor state is live.
        assert_eq!(
            run.book.verdict(&b, Maker::claimed(made_by), run.now, TIMEOUT),
            Verdict::Stale
        );
        assert_eq!(
            run.book.standing(run.id, first, token, Maker::claimed(made_by)),
            Standing::Stale
        );
        assert_eq!(
            run.book.standing(run.id, first, next, Maker::claimed(a.claim)),
            Standing::Live
        );
        // A second commit of the same token does not count, even by its holder.
        assert!(!run.commit(&a, Vec::new(), Vec::new()));
    }

    /// A step committing without a claim: the first commit read that consumes a state counts; what
    /// another sent is stale as soon as that state is spent, before its own commit is read; and a
    /// claim held meanwhile (a fleet changing fencing) keeps the state from a commit without one.
    #[test]
    fn a_commit_without_a_claim_counts_when_it_is_first_and_what_another_sent_is_stale() {
        let mut run = Run::new();
        let (first, token, _) = run.admit();
        // Claims made but never read: the commits name them as their steps.
        let (a, b) = (claim(run.id, first, token, None), claim(run.id, first, token, None));
        let (next_a, next_b) = (Uuid::new_v4(), Uuid::new_v4());
        let maker = |step: &Claim| Maker {
            step: step.claim,
            consumed: token,
        };
        assert_eq!(run.book.standing(run.id, first, next_a, maker(&a)), Standing::Unknown);
        assert!(run.book.maker_pending(run.id, maker(&a)));
        assert!(run.commit(&a, vec![(first, next_a, Branch::Trunk)], Vec::new()));
        assert_eq!(run.book.standing(run.id, first, next_a, maker(&a)), Standing::Live);
        assert!(
            run.book.untried(run.id, next_a, a.claim),
            "the winner's successor is a first try"
        );
        // The other copy's commit is not read yet, but it can no longer count.
        assert_eq!(run.book.standing(run.id, first, next_b, maker(&b)), Standing::Stale);
        assert!(!run.book.maker_pending(run.id, maker(&b)));
        assert!(!run.commit(&b, vec![(first, next_b, Branch::Trunk)], Vec::new()));
        assert_eq!(run.book.standing(run.id, first, next_b, maker(&b)), Standing::Stale);
        assert_eq!(run.book.standing(run.id, first, next_a, maker(&a)), Standing::Live);

        let held = run.claim(first, next_a);
        let unclaimed = claim(run.id, first, next_a, None);
        assert!(!run.commit(&unclaimed, vec![(first, Uuid::new_v4(), Branch::Trunk)], Vec::new()));
        assert!(run.commit(&held, vec![(first, Uuid::new_v4(), Branch::Trunk)], Vec::new()));
    }

    /// A copy that stepped before its run settled and committed (first) after: its commit consumes
    /// what the settled run no longer remembers spending, and must not count; a replay's does.
    #[test]
    fn a_commit_consuming_a_state_of_a_settled_run_does_not_count() {
        let mut run = Run::new();
        let (first, token, _) = run.admit();
        let (a, late) = (claim(run.id, first, token, None), claim(run.id, first, token, None));
        assert!(run.commit(&a, Vec::new(), Vec::new()));
        assert!(run.book.is_settled(run.id));
        assert!(!run.commit(&late, vec![(first, Uuid::new_v4(), Branch::Trunk)], Vec::new()));
        assert!(run.book.is_settled(run.id));
        let replay = replay(run.id, first);
        assert!(run.apply(Record::Commit(replay)));
        assert!(!run.book.is_settled(run.id));
    }

    /// A fenced run's book grows with its steps until it settles: a committed step leaves its
    /// claim and its spent token, never its hold, and copies of what it consumed or sent aside
    /// stay stale.
    #[test]
    fn a_committed_step_leaves_its_claim_and_spent_token_not_its_hold() {
        let mut run = Run::new();
        let (first, mut token, _) = run.admit();
        let mut claims = Vec::new();
        for _ in 0..20 {
            let step = run.claim(first, token);
            let next = Uuid::new_v4();
            assert!(run.commit(&step, vec![(first, next, Branch::Trunk)], Vec::new()));
            claims.push((step, token));
            token = next;
        }
        let fences = run.book.runs[&run.id].fences.as_ref().unwrap();
        assert_eq!(
            (
                fences.slots.len(),
                fences.holds.len(),
                fences.claims.len(),
                fences.spent.len()
            ),
            (1, 0, 21, 21),
            "one slot, no holds, the admission's and 20 steps' claims and spent tokens"
        );
        for (step, spent) in &claims {
            assert_eq!(
                run.book.standing(run.id, first, *spent, Maker::claimed(Uuid::nil())),
                Standing::Stale
            );
            // A copy the step made but its commit did not list.
            assert_eq!(
                run.book
                    .standing(run.id, first, Uuid::new_v4(), Maker::claimed(step.claim)),
                Standing::Stale
            );
            // A claim read after the commit holds nothing and is stale.
            let late = run.claim(first, *spent);
            assert_eq!(
                run.book.verdict(&late, Maker::claimed(Uuid::nil()), run.now, TIMEOUT),
                Verdict::Stale
            );
            assert!(!run.book.held(run.id, *spent, run.now, TIMEOUT));
        }
        assert_eq!(run.book.runs[&run.id].fences.as_ref().unwrap().holds.len(), 0);
        assert_eq!(
            run.book
                .standing(run.id, first, token, Maker::claimed(claims[19].0.claim)),
            Standing::Live
        );
    }

    /// A worker keeps a waiting fenced run's tables for as long as it waits, for each of thousands
    /// of runs: after a few steps they take a few hundred bytes, not the kilobytes of hash tables.
    #[test]
    fn a_waiting_fenced_runs_tables_are_a_few_hundred_bytes() {
        let mut run = Run::new();
        let (first, mut token, _) = run.admit();
        let admitted = run.book.fence_bytes();
        assert!(
            admitted <= 256,
            "admitted, waiting at its first stage: {admitted} bytes"
        );

        // Four steps later, waiting on a pool branch; the trunk has ended.
        for _ in 0..3 {
            let step = run.claim(first, token);
            let next = Uuid::new_v4();
            assert!(run.commit(&step, vec![(first, next, Branch::Trunk)], Vec::new()));
            token = next;
        }
        let step = run.claim(first, token);
        let on_pool = Uuid::new_v4();
        assert!(run.commit(&step, vec![(on_pool, Uuid::new_v4(), pool("render"))], Vec::new()));
        let fences = run.book.runs[&run.id].fences.as_ref().unwrap();
        assert_eq!(fences.slots.len(), 1, "the trunk's slot went with its last token");
        assert_eq!(fences.holds.capacity(), 0, "no hold left: its table is freed");
        let waiting = run.book.fence_bytes();
        assert!(waiting <= 512, "five steps in, waiting on a pool: {waiting} bytes");
        assert_eq!(run.book.pool_in_progress(run.id, "render"), Some(true));
        assert_eq!(run.book.run_in_progress(run.id), Some(true));
    }

    /// Every worker keeps a record per run the stream retains: one that never had a claim, or has
    /// settled with no pool verified, holds no tables at all.
    #[test]
    fn a_run_without_fences_costs_the_book_a_few_bytes() {
        assert!(
            std::mem::size_of::<RunBook>() <= 16,
            "{}",
            std::mem::size_of::<RunBook>()
        );
        let mut run = Run::new();
        run.apply(Record::Event(started(run.id)));
        assert!(run.book.runs[&run.id].fences.is_none(), "an unfenced run has no tables");
        assert_eq!(run.book.started(run.id), Some(Stage::Snapshot));

        let (first, token, _) = run.admit();
        assert!(run.book.runs[&run.id].fences.is_some(), "a fenced run has its tables");
        let last = run.claim(first, token);
        assert!(run.commit(&last, Vec::new(), Vec::new()));
        assert!(run.book.is_settled(run.id));
        assert!(
            run.book.runs[&run.id].fences.is_none(),
            "a settled run drops its tables"
        );
        assert_eq!(run.book.open_records(), 0);
        // Still stale after the tables are gone: settled.
        assert_eq!(
            run.book.standing(run.id, first, token, Maker::claimed(last.claim)),
            Standing::Stale
        );

        // A verified pool is remembered past settling.
        let mut run = Run::new();
        let (first, token, _) = run.admit();
        let verify = run.claim(first, token);
        let mut verified = started(run.id);
        verified.branch = pool("render");
        verified.kind = EventKind::PoolVerified {
            pool_id: "render-1".into(),
        };
        assert!(run.commit(&verify, Vec::new(), vec![verified]));
        assert!(run.book.is_settled(run.id));
        let kept = run.book.runs[&run.id]
            .fences
            .as_ref()
            .expect("the verified pool is kept");
        assert!(kept.verified() == ["render"] && kept.slots.is_empty() && kept.claims.is_empty());
        assert_eq!(run.book.pool_in_progress(run.id, "render"), Some(false));
    }

    #[test]
    fn a_runs_promotion_is_known_from_its_verdicts_commit() {
        let mut run = Run::new();
        let (first, token, _) = run.admit();
        assert_eq!(run.book.version_promoted(run.id), Some(false));
        assert_eq!(run.book.version_promoted(Uuid::new_v4()), None, "a run not in the book");
        let verify = run.claim(first, token);
        let mut promoted = started(run.id);
        promoted.branch = pool("render");
        promoted.kind = EventKind::Promoted { version_id: "v".into() };
        let next = (first, Uuid::new_v4(), pool("render"));
        let (next_id, next_token) = (next.0, next.1);
        assert!(run.commit(&verify, vec![next], vec![promoted]));
        assert_eq!(run.book.version_promoted(run.id), Some(true));

        // Remembered past settling: a verdict replayed later must not promote again unread.
        let rollout = run.claim(next_id, next_token);
        assert!(run.commit(&rollout, Vec::new(), Vec::new()));
        assert!(run.book.is_settled(run.id));
        assert_eq!(run.book.version_promoted(run.id), Some(true));
    }

    #[test]
    fn a_commit_by_a_claim_that_does_not_hold_the_token_does_not_count() {
        let mut run = Run::new();
        let (first, token, _) = run.admit();
        let a = run.claim(first, token);
        let b = run.claim(first, token);
        assert!(!run.commit(&b, vec![(first, Uuid::new_v4(), Branch::Trunk)], Vec::new()));
        assert!(run.commit(&a, vec![(first, Uuid::new_v4(), Branch::Trunk)], Vec::new()));
    }

    #[test]
    fn a_held_token_is_taken_over_after_release_or_timeout_and_the_old_holders_work_goes_stale() {
        let mut run = Run::new();
        let (first, token, made_by) = run.admit();
        let dead = run.claim(first, token);
        let waiting = run.claim(first, token);
        assert_eq!(
            run.book.verdict(&waiting, Maker::claimed(made_by), run.now, TIMEOUT),
            Verdict::Wait
        );
        let later = run.now + TIMEOUT + Duration::from_millis(1);
        assert_eq!(
            run.book.verdict(&waiting, Maker::claimed(made_by), later, TIMEOUT),
            Verdict::TakeOver { holder: dead.claim }
        );
        // Two takers supersede the same holder: the first read wins.
        run.now = later;
        let taker = claim(run.id, first, token, Some(dead.claim));
        let second = claim(run.id, first, token, Some(dead.claim));
        run.apply(Record::Claim(taker.clone()));
        run.apply(Record::Claim(second.clone()));
        assert_eq!(
            run.book.verdict(&taker, Maker::claimed(made_by), later, TIMEOUT),
            Verdict::Won
        );
        assert_eq!(
            run.book.verdict(&second, Maker::claimed(made_by), later, TIMEOUT),
            Verdict::Wait
        );
        // What the dead holder sent on before dying is stale: its claim lost.
        let orphan = Uuid::new_v4();
        assert_eq!(
            run.book.standing(run.id, first, orphan, Maker::claimed(dead.claim)),
            Standing::Stale
        );
        // The dead holder's late commit does not count; the taker's does.
        assert!(!run.commit(&dead, vec![(first, orphan, Branch::Trunk)], Vec::new()));
        let next = Uuid::new_v4();
        assert!(run.commit(&taker, vec![(first, next, Branch::Trunk)], Vec::new()));
        assert_eq!(
            run.book.standing(run.id, first, next, Maker::claimed(taker.claim)),
            Standing::Live
        );

        // A released claim can be taken over at once.
        let holder = run.claim(first, next);
        let other = run.claim(first, next);
        run.apply(Record::Release(Release {
            run_id: run.id,
            pipeline: "p".into(),
            claim: holder.claim,
        }));
        assert_eq!(
            run.book.verdict(&other, Maker::claimed(taker.claim), run.now, TIMEOUT),
            Verdict::TakeOver { holder: holder.claim }
        );
    }

    /// A state is untried until a claim on it is read (held, released or lost), and never when
    /// a replay made it (its commit names no claim read here: the parked copy may have written).
    #[test]
    fn a_state_is_untried_until_claimed_and_never_when_a_replay_made_it() {
        let mut run = Run::new();
        let (first, token, made_by) = run.admit();
        assert!(
            run.book.untried(run.id, token, made_by),
            "the admission's first message"
        );
        let step = run.claim(first, token);
        assert!(!run.book.untried(run.id, token, made_by), "claimed: a try began");
        let next = Uuid::new_v4();
        assert!(run.commit(&step, vec![(first, next, Branch::Trunk)], Vec::new()));
        assert!(!run.book.untried(run.id, token, made_by), "spent");
        assert!(run.book.untried(run.id, next, step.claim), "its successor");
        // A claim that is released still says a try began.
        let held = run.claim(first, next);
        run.apply(Record::Release(Release {
            run_id: run.id,
            pipeline: "p".into(),
            claim: held.claim,
        }));
        assert!(!run.book.untried(run.id, next, step.claim));
        // A replay: a commit consuming nothing, by a claim never read.
        let (replay, revived) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(run.apply(Record::Commit(Commit {
            kept: None,
            run_id: run.id,
            pipeline: "p".into(),
            claim: replay,
            consumed: None,
            successors: vec![Successor {
                message_id: Uuid::new_v4(),
                token: revived,
                stage: Stage::ImageCreate,
                branch: Branch::Trunk,
            }],
            events: Vec::new(),
        })));
        assert!(!run.book.untried(run.id, revived, replay));
        assert!(!run.book.untried(Uuid::new_v4(), next, step.claim), "a run not read");
    }

    #[test]
    fn a_successor_whose_commit_is_not_read_is_unknown_until_it_is() {
        let mut run = Run::new();
        let (first, token, _) = run.admit();
        let a = run.claim(first, token);
        let (pool_message, pool_token) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(
            run.book
                .standing(run.id, pool_message, pool_token, Maker::claimed(a.claim)),
            Standing::Unknown
        );
        assert!(run.commit(
            &a,
            vec![
                (first, Uuid::new_v4(), Branch::Trunk),
                (pool_message, pool_token, pool("render"))
            ],
            Vec::new()
        ));
        assert_eq!(
            run.book
                .standing(run.id, pool_message, pool_token, Maker::claimed(a.claim)),
            Standing::Live
        );
        // A copy the same step made but did not commit (a twin with another token) is stale.
        assert_eq!(
            run.book
                .standing(run.id, pool_message, Uuid::new_v4(), Maker::claimed(a.claim)),
            Standing::Stale
        );
    }

    #[test]
    fn the_admission_is_one_slot_and_a_second_admission_is_stale() {
        let mut run = Run::new();
        assert_eq!(
            run.book.standing(run.id, run.id, run.id, Maker::claimed(Uuid::nil())),
            Standing::Live
        );
        let a = run.claim(run.id, run.id);
        let b = run.claim(run.id, run.id);
        assert_eq!(
            run.book.standing(run.id, run.id, run.id, Maker::claimed(Uuid::nil())),
            Standing::Live
        );
        assert_eq!(
            run.book.verdict(&a, Maker::claimed(Uuid::nil()), run.now, TIMEOUT),
            Verdict::Won
        );
        assert!(run.commit(
            &a,
            vec![(Uuid::new_v4(), Uuid::new_v4(), Branch::Trunk)],
            vec![started(run.id)]
        ));
        assert_eq!(run.book.started(run.id), Some(Stage::Snapshot));
        assert_eq!(
            run.book.verdict(&b, Maker::claimed(Uuid::nil()), run.now, TIMEOUT),
            Verdict::Stale
        );
    }

    #[test]
    fn a_run_with_nothing_live_is_settled_and_forgotten_but_still_known_started() {
        let mut run = Run::new();
        let (first, token, made_by) = run.admit();
        let a = run.claim(first, token);
        let pool_message = Uuid::new_v4();
        let pool_token = Uuid::new_v4();
        assert!(run.commit(&a, vec![(pool_message, pool_token, pool("render"))], Vec::new()));
        assert_eq!(run.book.pool_in_progress(run.id, "render"), Some(true));
        assert_eq!(run.book.pool_in_progress(run.id, "sim"), Some(false));
        let p = run.claim(pool_message, pool_token);
        assert!(run.commit(&p, Vec::new(), Vec::new()));
        assert_eq!(run.book.open_records(), 0);
        assert_eq!(run.book.started(run.id), Some(Stage::Snapshot));
        assert_eq!(run.book.pool_in_progress(run.id, "render"), Some(false));
        // Any copy of a finished run is stale.
        assert_eq!(
            run.book.standing(run.id, first, token, Maker::claimed(made_by)),
            Standing::Stale
        );
        assert_eq!(
            run.book
                .standing(run.id, Uuid::new_v4(), Uuid::new_v4(), Maker::claimed(Uuid::new_v4())),
            Standing::Stale
        );
        assert_eq!(run.book.pool_in_progress(Uuid::new_v4(), "render"), None);
    }

    #[test]
    fn a_verified_pool_is_not_in_progress_while_its_branch_retires_older_pools() {
        let mut run = Run::new();
        let (first, token, _) = run.admit();
        let a = run.claim(first, token);
        let (verify, verify_token) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(run.commit(&a, vec![(verify, verify_token, pool("render"))], Vec::new()));
        let v = run.claim(verify, verify_token);
        let mut verified = started(run.id);
        verified.branch = pool("render");
        verified.kind = EventKind::PoolVerified {
            pool_id: "render-1".into(),
        };
        assert!(run.commit(&v, vec![(verify, Uuid::new_v4(), pool("render"))], vec![verified]));
        assert_eq!(run.book.pool_in_progress(run.id, "render"), Some(false));
    }

    #[test]
    fn copies_without_a_token_are_not_fenced() {
        let book = Book::default();
        assert_eq!(
            book.standing(Uuid::new_v4(), Uuid::new_v4(), Uuid::nil(), Maker::claimed(Uuid::nil())),
            Standing::Unfenced
        );
    }
}

//! The ledger: what makes each step of a run happen once, whatever the bus does to its messages.
//! A broker delivers at least once, a publish cut by a dropped connection may land twice, a worker
//! killed mid-step leaves its delivery to another: so several copies of one message can be alive
//! at once. The ledger keeps them from all acting.
//!
//! Every worker folds the shared history stream into a [`Book`] (tailing it from its first
//! retained record). A step that records something — events, messages sent on, a park, a changed
//! run state — first publishes a [`Claim`] on the state its message copy carries (its token) and
//! waits until its own claim comes by in the stream: every claim published before it has then been
//! read, so the stream's order decides, the same way for every reader, which claim holds the token.
//! The holder sends its messages on (each with a fresh token), then publishes one [`Commit`]
//! (the consumed token, the tokens it made live, its events) and acks. Every other copy is stale
//! and is dropped with an event; a copy whose state is not known yet waits. A holder that dies
//! before its commit is superseded after the claim timeout (or at once when it released its claim);
//! it gives up its own claim halfway through that timeout, so two holders never both commit.
//!
//! Or, when configured so ([`Fencing::CommitFirst`]), a step commits without claiming: it sends its
//! messages on, each naming the token it consumed (`made_from`), and publishes its commit; the
//! first commit read that consumes a token counts, and what a later one's step sent is stale once
//! the token is spent. A step that dies before its commit leaves its delivery to another copy,
//! which steps again. One record a step instead of two, for every reader of the history.
//!
//! - [`record`] — the records: claims, commits, releases, markers, events.
//! - [`book`] — the pure fold and the rules.
//!
//! Admission is a step like the others: the slot and token of run `r`'s admission are both `r`, its
//! commit carries `RunStarted` and makes the first messages live.

pub mod book;
pub mod record;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use uuid::Uuid;

pub use book::{Book, Maker, Standing, Verdict};
use record::{Claim, Commit, Record, Release};

use crate::azure::writes::Writes;
use crate::bus::{Bus, BusError, StreamOffset};
use crate::model::envelope::{Envelope, Stage};
use crate::runtime::Observer;

/// How long to wait before opening the history again after its reader failed.
const REOPEN_DELAY: Duration = Duration::from_millis(200);

/// How long a claimant waits for the commit that makes its copy's state known before it puts the
/// copy off (the commit is published just after the messages it lists, so this is short).
const UNKNOWN_WAIT: Duration = Duration::from_millis(500);

/// How a step that records something is fenced. Both kinds of writer agree on every record, so a
/// fleet may run both at once while it changes from one to the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fencing {
    /// Claim the copy's state, wait for the claim to come by, then send on and commit: a copy
    /// whose step another claim holds is put off, so two copies seldom both send on. Two records
    /// a step. The default.
    #[default]
    ClaimFirst,
    /// Send on, then commit: the first commit read that consumes the state wins, and what a losing
    /// copy sent names the state its maker consumed (`made_from`), so it is stale once that state is
    /// spent. One record a step: every reader of the history reads half as many. Messages carry
    /// `made_from`, which workers from before it park (upgrade them first, with `claim_first`).
    /// Opt-in: two copies of one state delivered at once both step (both ask Azure for what the
    /// step makes; one's commit counts), where a claim lets one step at a time.
    CommitFirst,
}

/// The ledger's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LedgerSettings {
    /// A claim not committed within this long (as each reader measures it from reading the claim)
    /// may be taken over; its holder gives up at half of it.
    pub claim_timeout: Duration,
    /// How long a claimant waits for its claim to come by in the stream before it gives up.
    pub read_limit: Duration,
    pub fencing: Fencing,
}

impl Default for LedgerSettings {
    fn default() -> Self {
        LedgerSettings {
            claim_timeout: Duration::from_secs(20),
            read_limit: Duration::from_secs(30),
            fencing: Fencing::default(),
        }
    }
}

/// What a copy's claim came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// This claim holds the step: carry it out before `deadline`, then commit.
    Won { claim: Uuid, deadline: Instant },
    /// The step was taken already: drop the copy.
    Stale,
    /// Another claim may still commit, or the copy's state is not known yet: look again later.
    Wait,
}

/// What a claim is made on: a message copy (its slot, token and maker), or a run's admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimKey {
    pub run_id: Uuid,
    pub pipeline: String,
    pub message_id: Uuid,
    pub token: Uuid,
    pub made_by: Uuid,
    pub made_from: Uuid,
}

impl ClaimKey {
    pub fn of(message: &Envelope) -> ClaimKey {
        ClaimKey {
            run_id: message.run_id,
            pipeline: message.pipeline.clone(),
            message_id: message.message_id,
            token: message.token,
            made_by: message.made_by,
            made_from: message.made_from,
        }
    }

    /// The admission of run `run_id`.
    pub fn admission(run_id: Uuid, pipeline: &str) -> ClaimKey {
        ClaimKey {
            run_id,
            pipeline: pipeline.to_string(),
            message_id: run_id,
            token: run_id,
            made_by: Uuid::nil(),
            made_from: Uuid::nil(),
        }
    }

    /// What the book says of this copy.
    fn standing(&self, book: &Book) -> Standing {
        book.standing(self.run_id, self.message_id, self.token, self.maker())
    }

    fn maker(&self) -> Maker {
        Maker {
            step: self.made_by,
            consumed: self.made_from,
        }
    }
}

/// The step that sent a copy on, as the copy names it.
fn maker_of(message: &Envelope) -> Maker {
    Maker {
        step: message.made_by,
        consumed: message.made_from,
    }
}

/// What `book` says of the copy `message`.
fn standing_of(book: &Book, message: &Envelope) -> Standing {
    book.standing(message.run_id, message.message_id, message.token, maker_of(message))
}

struct Shared {
    book: Mutex<Book>,
    /// Records read so far; bumped after each is folded in, so waiters can look again.
    read: watch::Sender<u64>,
    markers: Mutex<HashMap<Uuid, oneshot::Sender<()>>>,
    /// Steps waiting to learn whether their commit (by its id) counted.
    commits: Mutex<HashMap<Uuid, oneshot::Sender<bool>>>,
    /// Told when a catch-up's marker was not read in time: the tail's reader, whatever it waits
    /// on, is given up and the history opened again where it left off.
    reopen: tokio::sync::Notify,
}

impl Shared {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The ledger of one bus's history. Dropping it stops the tail.
pub struct Ledger {
    bus: Arc<dyn Bus>,
    shared: Arc<Shared>,
    settings: LedgerSettings,
    tail: JoinHandle<()>,
}

impl Ledger {
    /// Starts tailing `bus`'s history from its first retained record, handing every event that
    /// counts to `observer` in stream order (the run-level metrics). Call [`Ledger::catch_up`]
    /// before relying on what it says.
    pub fn start(bus: Arc<dyn Bus>, settings: LedgerSettings, observer: Option<Arc<dyn Observer>>) -> Ledger {
        let shared = Arc::new(Shared {
            book: Mutex::new(Book::default()),
            read: watch::Sender::new(0),
            markers: Mutex::new(HashMap::new()),
            commits: Mutex::new(HashMap::new()),
            reopen: tokio::sync::Notify::new(),
        });
        let tail = tokio::spawn(tail(Arc::clone(&bus), Arc::clone(&shared), observer));
        Ledger {
            bus,
            shared,
            settings,
            tail,
        }
    }

    pub fn settings(&self) -> LedgerSettings {
        self.settings
    }

    /// Returns once every record confirmed before the call has been read, or fails after `limit`.
    pub async fn catch_up(&self, limit: Duration) -> Result<(), BusError> {
        let marker = Uuid::new_v4();
        let (reached, wait) = oneshot::channel();
        // Waiting before publishing: the tail may read the marker before the publish returns.
        lock(&self.shared.markers).insert(marker, reached);
        let caught_up = async {
            self.bus.publish_record(&Record::Marker(marker)).await?;
            match tokio::time::timeout(limit, wait).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(BusError::Closed),
                Err(_) => Err(BusError::Connection(format!(
                    "the history was not read up to its marker within {} ms",
                    limit.as_millis()
                ))),
            }
        }
        .await;
        if caught_up.is_err() {
            lock(&self.shared.markers).remove(&marker);
            // The marker went out but the reader never gave it back: a reader left on a link
            // that stopped delivering without closing. The next catch-up reads through a new one.
            self.shared.reopen.notify_one();
        }
        caught_up
    }

    /// What the copy is worth now, from what has been read (no IO).
    pub fn standing(&self, message: &Envelope) -> Standing {
        standing_of(&self.shared.book(), message)
    }

    /// What the copy is worth, giving a copy whose state is not known yet a short while for the
    /// commit that makes it live (published just after the copy) to come by.
    ///
    /// A copy of a run that has settled (nothing of it live) is stale unless a commit read later
    /// revives the run: a replay (`sigrun dlq replay`, the web page) publishes that commit just
    /// before the copy, and the copy may be delivered before this reader has read the commit. So
    /// such a copy gets the same short while (a stale duplicate of a finished run is dropped
    /// that much later; a replayed message is no longer dropped as one).
    pub async fn settled_standing(&self, message: &Envelope) -> Standing {
        let standing = |book: &Book| standing_of(book, message);
        let known = |book: &Book| match standing(book) {
            Standing::Unknown => false,
            Standing::Stale => !book.is_settled(message.run_id),
            Standing::Live | Standing::Unfenced => true,
        };
        let _ = self.wait_until(known, UNKNOWN_WAIT).await;
        standing(&self.shared.book())
    }

    /// Whether the step that sent this copy on may still commit it: it holds its claim without
    /// having committed, or (committing first) what it consumed is not spent yet. Until then the
    /// copy may be an orphan of a step that died.
    pub fn maker_pending(&self, message: &Envelope) -> bool {
        self.shared.book().maker_pending(message.run_id, maker_of(message))
    }

    /// Whether no try of the copy's state can have begun before (no IO; see [`Book::untried`]).
    pub fn untried(&self, message: &Envelope) -> bool {
        self.shared
            .book()
            .untried(message.run_id, message.token, message.made_by)
    }

    /// Whether another claim holds the copy's live state and may still commit (no IO): such a copy
    /// is put off without a look.
    pub fn held_elsewhere(&self, message: &Envelope) -> bool {
        let book = self.shared.book();
        standing_of(&book, message) == Standing::Live
            && book.held(message.run_id, message.token, now(), self.settings.claim_timeout)
    }

    /// Claims the step of the copy `key` names; returns once the verdict is exact. A copy that is
    /// not live (stale, or its state not known yet) claims nothing: a claim that could not commit
    /// would only hold the step up for others until it timed out.
    pub async fn claim(&self, key: &ClaimKey) -> Result<Claimed, BusError> {
        let _ = self
            .wait_until(|book| key.standing(book) != Standing::Unknown, UNKNOWN_WAIT)
            .await;
        match key.standing(&self.shared.book()) {
            Standing::Stale => return Ok(Claimed::Stale),
            Standing::Unknown => return Ok(Claimed::Wait),
            Standing::Live | Standing::Unfenced => {}
        }
        let mut supersedes = None;
        loop {
            let claim = Claim {
                run_id: key.run_id,
                pipeline: key.pipeline.clone(),
                message_id: key.message_id,
                token: key.token,
                claim: Uuid::new_v4(),
                supersedes,
                at: OffsetDateTime::now_utc(),
            };
            let began = now();
            self.bus.publish_record(&Record::Claim(claim.clone())).await?;
            self.wait_until(
                |book| book.has_claim(claim.run_id, claim.claim),
                self.settings.read_limit,
            )
            .await
            .map_err(|_| {
                BusError::Connection(format!(
                    "the claim did not come by in the history within {} ms",
                    self.settings.read_limit.as_millis()
                ))
            })?;
            let verdict = self.verdict(&claim, key.maker()).await;
            debug!(run_id = %key.run_id, message_id = %key.message_id, ?verdict, "claimed");
            match verdict {
                Verdict::Won => {
                    return Ok(Claimed::Won {
                        claim: claim.claim,
                        deadline: began + self.settings.claim_timeout / 2,
                    });
                }
                Verdict::Stale => return Ok(Claimed::Stale),
                Verdict::Wait | Verdict::Unknown => return Ok(Claimed::Wait),
                Verdict::TakeOver { holder } => {
                    warn!(run_id = %key.run_id, message_id = %key.message_id, %holder,
                        "the step's claim was released or timed out; taking it over");
                    supersedes = Some(holder);
                }
            }
        }
    }

    /// The verdict on a claim that has been read; a copy whose state is not known yet gets a
    /// short while for the commit that makes it live to come by.
    async fn verdict(&self, claim: &Claim, maker: Maker) -> Verdict {
        let timeout = self.settings.claim_timeout;
        let decide = |book: &Book| book.verdict(claim, maker, now(), timeout);
        let known = self
            .wait_until(|book| decide(book) != Verdict::Unknown, UNKNOWN_WAIT)
            .await;
        match known {
            Ok(()) => decide(&self.shared.book()),
            Err(()) => Verdict::Unknown,
        }
    }

    /// Publishes a step's commit (confirmed).
    pub async fn commit(&self, commit: Commit) -> Result<(), BusError> {
        self.bus.publish_record(&Record::Commit(commit)).await
    }

    /// How the step of the copy `key` names is fenced, given what it sent Azure. A claim keeps two
    /// copies of one state from both writing to Azure; a step that only read (or an admission,
    /// which reads nothing) has nothing to keep apart, so it commits first whatever the settings
    /// say: one history record instead of a claim and a commit. A step that wrote is fenced as
    /// the settings say. Either way, a state on which a claim was read and not spent (a fleet
    /// changing fencing has a step that claims first under way, or dead) is taken over only by a
    /// claim naming its holder, so it is claimed.
    pub fn fencing_for(&self, key: &ClaimKey, writes: Writes) -> Fencing {
        if self.shared.book().claimed_unspent(key.run_id, key.token) {
            return Fencing::ClaimFirst;
        }
        match (self.settings.fencing, writes) {
            (Fencing::ClaimFirst, Writes::Sent) => Fencing::ClaimFirst,
            (Fencing::CommitFirst, _) | (_, Writes::None) => Fencing::CommitFirst,
        }
    }

    /// Whether the copy's state can no longer be consumed (spent, or its run settled).
    pub fn spent(&self, key: &ClaimKey) -> bool {
        self.shared.book().spent(key.run_id, key.token)
    }

    /// What a copy committing first may do now: commit if its state is live (or unfenced); a copy
    /// whose state is not known yet gets the same short while as a claim's.
    pub async fn may_commit(&self, key: &ClaimKey) -> Standing {
        let _ = self
            .wait_until(|book| key.standing(book) != Standing::Unknown, UNKNOWN_WAIT)
            .await;
        key.standing(&self.shared.book())
    }

    /// Publishes a commit made without a claim (confirmed) and waits until it comes by in the
    /// history: true when it counted (it consumed its state first), false when another step's
    /// commit had. A commit not read within the read limit is an error, like a claim's.
    pub async fn commit_first(&self, commit: Commit) -> Result<bool, BusError> {
        let id = commit.claim;
        let (outcome, counted) = oneshot::channel();
        // Waiting before publishing: the tail may read the commit before the publish returns.
        lock(&self.shared.commits).insert(id, outcome);
        let read = async {
            self.bus.publish_record(&Record::Commit(commit)).await?;
            match tokio::time::timeout(self.settings.read_limit, counted).await {
                Ok(Ok(counts)) => Ok(counts),
                Ok(Err(_)) => Err(BusError::Closed),
                Err(_) => Err(BusError::Connection(format!(
                    "the commit did not come by in the history within {} ms",
                    self.settings.read_limit.as_millis()
                ))),
            }
        }
        .await;
        if read.is_err() {
            lock(&self.shared.commits).remove(&id);
        }
        read
    }

    /// Where the successor kept with the delivery of the copy carrying `carrier` is recorded, while
    /// it is live (no IO): that delivery came back.
    pub fn kept_with(&self, run_id: Uuid, carrier: Uuid) -> Option<u64> {
        if carrier.is_nil() {
            return None;
        }
        self.shared.book().kept_at(run_id, carrier)
    }

    /// The successor the commit at `offset` kept with the delivery of the copy carrying
    /// `carrier`, read back from the history.
    pub async fn read_kept(&self, offset: u64, carrier: Uuid) -> Result<Envelope, BusError> {
        let mut reader = tokio::time::timeout(
            self.settings.read_limit,
            self.bus.open_history(StreamOffset::At(offset)),
        )
        .await
        .map_err(|_| BusError::Connection("the history did not open in time".into()))??;
        // A stream may hand out its chunk from the start: the records before `offset` are skipped.
        let read = tokio::time::timeout(self.settings.read_limit, async {
            loop {
                match reader.next_record().await {
                    Some(Ok((at, _))) if at < offset => {}
                    Some(Ok((at, record))) if at == offset => return Ok(record),
                    Some(Ok(_)) => return Err(BusError::Malformed(format!("no record at offset {offset}"))),
                    Some(Err(BusError::Malformed(_))) => {}
                    Some(Err(error)) => return Err(error),
                    None => return Err(BusError::Closed),
                }
            }
        })
        .await;
        reader.close().await;
        let record = read.map_err(|_| {
            BusError::Connection(format!(
                "the record at offset {offset} was not read within {} ms",
                self.settings.read_limit.as_millis()
            ))
        })??;
        match record {
            Record::Commit(Commit { kept: Some(kept), .. }) if kept.carrier == carrier => {
                kept.message().map_err(|why| {
                    BusError::Malformed(format!("the successor kept at offset {offset} does not decode: {why}"))
                })
            }
            _ => Err(BusError::Malformed(format!(
                "the record at offset {offset} keeps no successor for state {carrier}"
            ))),
        }
    }

    /// Gives up a claim that cannot be carried out (best effort: a release that is lost only makes
    /// the next claimant wait for the timeout).
    pub async fn release(&self, run_id: Uuid, pipeline: &str, claim: Uuid) {
        let release = Record::Release(Release {
            run_id,
            pipeline: pipeline.to_string(),
            claim,
        });
        if let Err(error) = self.bus.publish_record(&release).await {
            debug!(%error, "releasing a claim failed; it times out instead");
        }
    }

    /// The stage a run entered at, once its admission is recorded.
    pub fn started(&self, run_id: Uuid) -> Option<Stage> {
        self.shared.book().started(run_id)
    }

    pub fn is_cancelled(&self, run_id: Uuid) -> bool {
        self.shared.book().is_cancelled(run_id)
    }

    /// Runs known to have started.
    pub fn started_count(&self) -> usize {
        self.shared.book().started_count()
    }

    /// Whether run `run_id` is still creating or verifying its pool for `target` (`None`: the run
    /// is not in the retained history).
    pub fn pool_in_progress(&self, run_id: Uuid, target: &str) -> Option<bool> {
        self.shared.book().pool_in_progress(run_id, target)
    }

    pub fn run_in_progress(&self, run_id: Uuid) -> Option<bool> {
        self.shared.book().run_in_progress(run_id)
    }

    /// Whether a verdict of run `run_id` promoted its version (`None`: the run is not in the
    /// retained history).
    pub fn version_promoted(&self, run_id: Uuid) -> Option<bool> {
        self.shared.book().version_promoted(run_id)
    }

    /// Records read so far.
    pub fn records_read(&self) -> u64 {
        *self.shared.read.borrow()
    }

    /// Slots and claims kept in memory (runs not finished).
    pub fn open_records(&self) -> usize {
        self.shared.book().open_records()
    }

    /// Waits until `ready` holds of the book, looking again after each record read.
    async fn wait_until(&self, ready: impl Fn(&Book) -> bool, limit: Duration) -> Result<(), ()> {
        let mut read = self.shared.read.subscribe();
        let waited = tokio::time::timeout(limit, async {
            loop {
                if ready(&self.shared.book()) {
                    return;
                }
                if read.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        waited.map_err(|_| ())
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.tail.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads the history until aborted, opening it again (after the last record read) whenever the
/// reader ends: a reader does not survive a reconnect.
async fn tail(bus: Arc<dyn Bus>, shared: Arc<Shared>, observer: Option<Arc<dyn Observer>>) {
    let mut offset = StreamOffset::First;
    loop {
        let mut reader = match bus.open_history(offset.clone()).await {
            Ok(reader) => reader,
            Err(BusError::Closed) => return,
            Err(error) => {
                warn!(%error, "ledger: cannot open the history; trying again");
                tokio::time::sleep(REOPEN_DELAY).await;
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                next = reader.next_record() => next,
                () = shared.reopen.notified() => {
                    warn!("ledger: the history reader delivered no marker in time; opening it again");
                    break;
                }
            };
            match next {
                None => break,
                Some(Ok((at, record))) => {
                    offset = StreamOffset::At(at + 1);
                    read_one(&shared, observer.as_deref(), &record, at);
                }
                // Another build's record, say: not ours to judge; the rest of the stream counts.
                Some(Err(BusError::Malformed(reason))) => debug!(%reason, "ledger: skipped a record"),
                Some(Err(error)) => {
                    warn!(%error, "ledger: the history failed; opening it again");
                    break;
                }
            }
        }
        reader.close().await;
        tokio::time::sleep(REOPEN_DELAY).await;
    }
}

/// Folds one record in, tells the observer its events (those that count), wakes the waiters.
fn read_one(shared: &Shared, observer: Option<&dyn Observer>, record: &Record, offset: u64) {
    if let Record::Marker(marker) = record
        && let Some(reached) = lock(&shared.markers).remove(marker)
    {
        let _ = reached.send(());
    }
    let counts = shared.book().apply_at(record, Some(offset), now());
    if let Record::Commit(commit) = record
        && let Some(waiter) = lock(&shared.commits).remove(&commit.claim)
    {
        let _ = waiter.send(counts);
    }
    if !counts {
        warn!(run_id = ?record.run_id(), "ledger: a commit by a claim that did not hold its step is ignored");
    }
    if counts && let Some(observer) = observer {
        for event in record.events() {
            observer.event(event);
        }
    }
    shared.read.send_modify(|read| *read += 1);
}

/// Now, on tokio's clock (which tests may pause and advance), as a std instant for the book.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl crate::stages::Runs for Ledger {
    fn pool_in_progress(&self, run_id: Uuid, target: &str) -> Option<bool> {
        Ledger::pool_in_progress(self, run_id, target)
    }

    fn run_in_progress(&self, run_id: Uuid) -> Option<bool> {
        Ledger::run_in_progress(self, run_id)
    }

    fn version_promoted(&self, run_id: Uuid) -> Option<bool> {
        Ledger::version_promoted(self, run_id)
    }
}

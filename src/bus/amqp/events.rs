//! Reading the events stream back: the run history `status` and `watch` need. A stream over AMQP
//! 0-9-1 is consumed like a queue with three rules the broker enforces: `basic.qos` must be set
//! (per consumer), acks must be manual (auto-ack closes the connection), and where to start is the
//! `x-stream-offset` consumer argument. Acking does not remove anything from a stream; it only
//! makes room in the prefetch window. A reader does not survive a reconnect: open a new one from
//! the last offset it saw.
//!
//! A stream has no "end" a consumer can see: a reader at the head just waits. To read "everything
//! published so far" a reader publishes a marker (routing key [`MARKER_ROUTING_KEY`], an id in the
//! body) and reads up to it; since the stream keeps publish order, every event confirmed before the
//! marker comes before it. Other readers skip markers.
//!
//! A reader opened at the first offset hands out the events of the commits that count, as the
//! workers' ledgers judge them: it folds the ledger's records into a [`Book`] of its own, so a
//! commit made by a holder that was superseded (it held its claim past the timeout, then committed
//! anyway) shows nowhere — not in `status`, `watch --from-start` or the web page — as it counts
//! nowhere in the workers. A reader that replaces it after a reconnect carries its book on
//! ([`EventReader::take_book`], [`EventReader::with_book`]). A reader opened anywhere else has not
//! read the claims before its offset, so it cannot judge: it hands out every commit's events.

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Consumer};

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

use super::connection::Link;
use super::connection_error;
use super::consumer::integer;
use super::topology::Names;
use crate::bus::{BusError, HistoryReader, StreamOffset};
use crate::events::Event;
use crate::ledger::Book;
use crate::ledger::record::{Record, keys};

/// The argument `x-stream-offset` takes for an offset.
fn offset_argument(offset: &StreamOffset) -> AMQPValue {
    match offset {
        StreamOffset::First => AMQPValue::LongString(LongString::from("first")),
        StreamOffset::Next => AMQPValue::LongString(LongString::from("next")),
        StreamOffset::Last => AMQPValue::LongString(LongString::from("last")),
        StreamOffset::At(offset) => AMQPValue::LongLongInt(i64::try_from(*offset).unwrap_or(i64::MAX)),
    }
}

/// How many records the broker may send a reader ahead of its acks. A stream keeps what is acked,
/// so the window only paces the broker: a wide one lets it send a run of records at once.
pub const WINDOW: u16 = 256;

/// A reader acks once for every this many records (`multiple`), never letting the window fill: one
/// ack a record cost the broker as much as the delivery itself, for every reader of every record.
pub const ACK_EVERY: u16 = WINDOW / 2;

/// The routing key of a marker on the events exchange (never an event's: those have three parts).
pub const MARKER_ROUTING_KEY: &str = keys::MARKER;

/// One item of the stream: an event (alone or one of a commit's), or a record of the ledger.
// Items are read one at a time and moved once: boxing the event would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// Boxed: an event is some 200 bytes, a marker 16.
    Event(Box<StreamedEvent>),
    Marker(Uuid),
}

/// One event read from the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamedEvent {
    pub offset: u64,
    pub routing_key: String,
    pub event: Event,
}

pub struct EventReader {
    channel: Channel,
    consumer: Consumer,
    /// The bus's link as the supervisor replaces it, and the generation this reader reads on: a
    /// consumer of a connection lapin gave up on may never end by itself (a cut during the
    /// ledger's first catch-up left it waiting for ever), so the reader ends when its link does.
    link: watch::Receiver<Option<Arc<Link>>>,
    generation: u64,
    /// The offset of the last item read (event or marker): where a reader that replaces this one
    /// after a reconnect goes on from (`At(position + 1)`).
    position: Option<u64>,
    /// Events of a commit read but not handed out yet.
    pending: VecDeque<StreamedEvent>,
    /// Records delivered since the last ack.
    unacked: u16,
    /// The ledger's records read so far, folded: which commits count. Only for a reader that
    /// has read everything before its position (see the module's doc).
    book: Option<Book>,
}

impl EventReader {
    pub(super) async fn open(
        link: &Link,
        watched: watch::Receiver<Option<Arc<Link>>>,
        names: &Names,
        offset: StreamOffset,
    ) -> Result<EventReader, BusError> {
        let channel = link.connection.create_channel().await.map_err(connection_error)?;
        channel
            .basic_qos(WINDOW, BasicQosOptions { global: false })
            .await
            .map_err(connection_error)?;
        let mut arguments = FieldTable::default();
        arguments.insert("x-stream-offset".into(), offset_argument(&offset));
        let consumer = channel
            .basic_consume(
                names.events().as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await
            .map_err(connection_error)?;
        Ok(EventReader {
            channel,
            consumer,
            link: watched,
            generation: link.generation,
            position: None,
            pending: VecDeque::new(),
            unacked: 0,
            book: matches!(offset, StreamOffset::First).then(Book::default),
        })
    }

    /// The next event, skipping markers; waits for one to be published when the reader is at the
    /// end. `None` when the reader's channel closed. An event that does not parse is [`BusError::Malformed`] (and is
    /// skipped).
    pub async fn next(&mut self) -> Option<Result<StreamedEvent, BusError>> {
        loop {
            match self.next_item().await? {
                Ok(StreamItem::Marker(_)) => continue,
                Ok(StreamItem::Event(event)) => return Some(Ok(*event)),
                Err(error) => return Some(Err(error)),
            }
        }
    }

    /// Every event from the reader's position up to now: publishes a marker through `bus` and reads
    /// until it comes by. Events that do not parse are returned as errors in place.
    pub async fn read_to_end(
        &mut self,
        bus: &super::AmqpBus,
    ) -> Result<Vec<Result<StreamedEvent, BusError>>, BusError> {
        let marker = bus.publish_marker().await?;
        let mut read = Vec::new();
        loop {
            match self.next_item().await {
                None => {
                    return Err(BusError::Connection(
                        "the events stream closed before its end was read".into(),
                    ));
                }
                Some(Ok(StreamItem::Marker(seen))) if seen == marker => return Ok(read),
                Some(Ok(StreamItem::Marker(_))) => {}
                Some(Ok(StreamItem::Event(event))) => read.push(Ok(*event)),
                Some(Err(error @ BusError::Malformed(_))) => read.push(Err(error)),
                Some(Err(error)) => return Err(error),
            }
        }
    }

    /// The next item: an event (a counting commit's events one by one) or a marker; the ledger's
    /// other records are skipped.
    pub async fn next_item(&mut self) -> Option<Result<StreamItem, BusError>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(StreamItem::Event(Box::new(event))));
            }
            let (offset, routing_key, record) = match self.next_raw().await? {
                Ok(read) => read,
                Err(error) => return Some(Err(error)),
            };
            // The age of a claim (the book's only use of the time) decides nothing here.
            let counts = self
                .book
                .as_mut()
                .is_none_or(|book| book.apply(&record, Instant::now()));
            match record {
                Record::Marker(marker) => return Some(Ok(StreamItem::Marker(marker))),
                Record::Event(event) => {
                    return Some(Ok(StreamItem::Event(Box::new(StreamedEvent {
                        offset,
                        routing_key,
                        event,
                    }))));
                }
                Record::Commit(commit) if counts => {
                    self.pending
                        .extend(commit.events.into_iter().map(|event| StreamedEvent {
                            offset,
                            routing_key: event.routing_key(),
                            event,
                        }))
                }
                Record::Commit(_) | Record::Claim(_) | Record::Release(_) => {}
            }
        }
    }

    /// The next record as stored, with its offset and routing key.
    async fn next_raw(&mut self) -> Option<Result<(u64, String, Record), BusError>> {
        let generation = self.generation;
        let link_gone = self
            .link
            .wait_for(|link| link.as_ref().is_none_or(|l| l.generation != generation));
        let delivery = tokio::select! {
            next = self.consumer.next() => match next? {
                Ok(delivery) => delivery,
                Err(error) => return Some(Err(connection_error(error))),
            },
            _ = link_gone => {
                return Some(Err(BusError::Connection(
                    "the broker connection the events stream was read on is gone".into(),
                )));
            }
        };
        let offset = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-stream-offset"))
            .and_then(integer)
            .and_then(|o| u64::try_from(o).ok())
            .unwrap_or_default();
        self.position = Some(offset);
        self.unacked += 1;
        if self.unacked >= ACK_EVERY {
            self.unacked = 0;
            if let Err(error) = delivery.acker.ack(BasicAckOptions { multiple: true }).await {
                return Some(Err(connection_error(error)));
            }
        }
        let routing_key = delivery.routing_key.to_string();
        Some(
            Record::decode(&routing_key, &delivery.data)
                .map(|record| (offset, routing_key, record))
                .map_err(|e| BusError::Malformed(format!("offset {offset}: {e}"))),
        )
    }

    /// The offset of the last item read (an event or a marker), if any.
    pub fn position(&self) -> Option<u64> {
        self.position
    }

    /// What this reader judged commits by, for the reader that goes on just after its
    /// [`position`](Self::position) (or where it began, if it read nothing); `None` for a reader
    /// that does not judge.
    pub fn take_book(&mut self) -> Option<Book> {
        self.book.take()
    }

    /// Makes a reader opened just after another's position (or where that one began, having read
    /// nothing) judge commits as that one did, with the book it took from it.
    #[must_use]
    pub fn with_book(mut self, book: Option<Book>) -> EventReader {
        if book.is_some() {
            self.book = book;
        }
        self
    }

    /// Stops reading and closes the reader's channel; on a connection gone silent the close-ok
    /// never comes, so it is waited for at most the links' close timeout.
    pub async fn close(self) {
        let closing = self.channel.close(200, "done".into());
        let _ = tokio::time::timeout(super::connection::CLOSE_TIMEOUT, closing).await;
    }
}

#[async_trait]
impl HistoryReader for EventReader {
    async fn next_record(&mut self) -> Option<Result<(u64, Record), BusError>> {
        Some(self.next_raw().await?.map(|(offset, _, record)| (offset, record)))
    }

    async fn close(self: Box<Self>) {
        EventReader::close(*self).await;
    }
}

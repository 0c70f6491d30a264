//! Looking into the parking queue without losing what is in it (what `sigrun dlq` needs). A
//! [`ParkedBrowser`] takes every parked message with `basic.get` on a channel of its own, without
//! acking; a message the caller removes (after replaying it) is acked, and closing the browser
//! closes its channel, which returns everything else to the queue as it was.
//!
//! A return raises the message's `x-delivery-count` on a quorum queue, but the parked queue has no
//! `x-delivery-limit`, so on RabbitMQ 3.x nothing is ever dropped for it. (RabbitMQ 4.0–4.2 give
//! quorum queues a default limit of 20 that counts such returns; 4.3 counts only rejections.)
//!
//! Why a message is here comes in two shapes: the runtime parks with `x-sigrun-*` headers (see
//! [`super::headers`]), the broker dead-letters with `x-death` (a delivery limit reached, a
//! rejection). Messages parked because nothing was bound to their routing key carry neither.

use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Acker, Channel, Connection};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::connection_error;
use super::consumer::integer;
use super::publisher::headers;
use super::topology::Names;
use crate::bus::BusError;

/// One parked message as it sits in the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedMessage {
    /// The AMQP `message_id`, else the body's `message_id` field, else `sha256:` and the first 16
    /// hex digits of the body's digest — stable across listings either way.
    pub id: String,
    pub body: Vec<u8>,
    /// The routing key it reached the parking exchange with: the stage for what the runtime parks,
    /// the original key for what the broker dead-letters or could not route.
    pub routing_key: String,
    /// Set when the runtime parked it.
    pub runtime: Option<RuntimePark>,
    /// Set when the broker dead-lettered it; newest first.
    pub deaths: Vec<Death>,
    /// Times this copy went back to the parking queue unsettled (listings, crashed replays).
    pub returns: u32,
}

/// The `x-sigrun-*` headers of a message the runtime parked.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimePark {
    pub error: String,
    pub stage: Option<String>,
    pub attempts: Option<u32>,
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
}

/// One entry of `x-death`: the broker's record of a dead-lettering.
#[derive(Debug, Clone, PartialEq)]
pub struct Death {
    /// `delivery_limit`, `rejected`, `expired`, `maxlen`.
    pub reason: String,
    pub queue: String,
    pub exchange: String,
    pub routing_keys: Vec<String>,
    /// Times it was dead-lettered from this queue for this reason.
    pub count: i64,
    /// The last time (the broker records whole seconds).
    pub time: Option<OffsetDateTime>,
}

/// Every parked message (up to a limit), held unacked until removed or returned by [`close`].
///
/// [`close`]: ParkedBrowser::close
pub struct ParkedBrowser {
    channel: Channel,
    messages: Vec<ParkedMessage>,
    ackers: Vec<Option<Acker>>,
    /// Messages still in the queue beyond `limit`, not taken.
    left: u32,
}

impl ParkedBrowser {
    pub(super) async fn open(connection: &Connection, names: &Names, limit: usize) -> Result<ParkedBrowser, BusError> {
        let channel = connection.create_channel().await.map_err(connection_error)?;
        let queue = names.parked_queue();
        let mut browser = ParkedBrowser {
            channel,
            messages: Vec::new(),
            ackers: Vec::new(),
            left: 0,
        };
        while browser.messages.len() < limit {
            let got = browser
                .channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(connection_error)?;
            let Some(got) = got else { break };
            browser.left = got.message_count;
            let delivery = got.delivery;
            browser.messages.push(parked_message(
                delivery.data,
                delivery.routing_key.to_string(),
                delivery.properties.message_id().as_ref().map(|id| id.to_string()),
                delivery.properties.headers().as_ref(),
            ));
            browser.ackers.push(Some(delivery.acker));
        }
        if browser.messages.len() < limit {
            browser.left = 0;
        }
        Ok(browser)
    }

    /// The parked messages, oldest first.
    pub fn messages(&self) -> &[ParkedMessage] {
        &self.messages
    }

    /// Parked messages not taken because of the limit.
    pub fn left(&self) -> u32 {
        self.left
    }

    /// Removes message `index` from the parking queue for good (ack).
    ///
    /// # Panics
    /// When `index` is out of range.
    pub async fn remove(&mut self, index: usize) -> Result<(), BusError> {
        let Some(acker) = self.ackers[index].take() else {
            return Ok(());
        };
        match acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(BusError::Connection(
                "the parking channel is closed; the message stays parked".into(),
            )),
            Err(error) => Err(connection_error(error)),
        }
    }

    /// Closes the browser's channel: everything not removed goes back to the parking queue.
    pub async fn close(self) {
        let _ = self.channel.close(200, "parked messages looked at".into()).await;
    }
}

/// Reads what a parked message carries; never fails (an odd header is just absent).
fn parked_message(
    body: Vec<u8>,
    routing_key: String,
    message_id: Option<String>,
    table: Option<&FieldTable>,
) -> ParkedMessage {
    let get = |key: &str| table.and_then(|t| t.inner().get(key));
    let runtime = get(headers::ERROR).and_then(text).map(|error| RuntimePark {
        error,
        stage: get(headers::STAGE).and_then(text),
        attempts: get(headers::ATTEMPTS)
            .and_then(integer)
            .and_then(|a| u32::try_from(a).ok()),
        first_seen: get(headers::FIRST_SEEN).and_then(text),
        last_seen: get(headers::LAST_SEEN).and_then(text),
    });
    let deaths = match get("x-death") {
        Some(AMQPValue::FieldArray(entries)) => entries
            .as_slice()
            .iter()
            .filter_map(|entry| match entry {
                AMQPValue::FieldTable(death) => Some(death_of(death)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let returns = get("x-delivery-count")
        .and_then(integer)
        .and_then(|c| u32::try_from(c).ok())
        .unwrap_or(0);
    let id = message_id
        .filter(|id| !id.is_empty())
        .or_else(|| body_message_id(&body))
        .unwrap_or_else(|| digest_id(&body));
    ParkedMessage {
        id,
        body,
        routing_key,
        runtime,
        deaths,
        returns,
    }
}

fn death_of(death: &FieldTable) -> Death {
    let get = |key: &str| death.inner().get(key);
    Death {
        reason: get("reason").and_then(text).unwrap_or_default(),
        queue: get("queue").and_then(text).unwrap_or_default(),
        exchange: get("exchange").and_then(text).unwrap_or_default(),
        routing_keys: match get("routing-keys") {
            Some(AMQPValue::FieldArray(keys)) => keys.as_slice().iter().filter_map(text).collect(),
            _ => Vec::new(),
        },
        count: get("count").and_then(integer).unwrap_or(0),
        time: match get("time") {
            Some(AMQPValue::Timestamp(seconds)) => i64::try_from(*seconds)
                .ok()
                .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok()),
            _ => None,
        },
    }
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// The `message_id` field of a JSON body, if it has one (an envelope the broker dead-lettered
/// carries no AMQP message id). Oversized bodies are not parsed.
fn body_message_id(body: &[u8]) -> Option<String> {
    if body.len() > crate::model::envelope::MAX_ENVELOPE_BYTES {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value
        .get("message_id")?
        .as_str()
        .filter(|id| !id.is_empty())
        .map(str::to_string)
}

fn digest_id(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use lapin::types::{FieldArray, LongString};

    use super::*;

    fn long(text: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(text))
    }

    #[test]
    fn runtime_headers_are_read_and_the_id_is_the_message_id() {
        let mut table = FieldTable::default();
        table.insert(headers::ERROR.into(), long("gave up after 2 attempts: HTTP 500"));
        table.insert(headers::STAGE.into(), long("gallery-publish"));
        table.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(2));
        table.insert(headers::FIRST_SEEN.into(), long("2026-11-27T02:00:00Z"));
        table.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        let parked = parked_message(
            b"{}".to_vec(),
            "gallery-publish".into(),
            Some("m-1".into()),
            Some(&table),
        );
        assert_eq!(parked.id, "m-1");
        let runtime = parked.runtime.expect("runtime headers");
        assert_eq!(runtime.error, "gave up after 2 attempts: HTTP 500");
        assert_eq!(runtime.stage.as_deref(), Some("gallery-publish"));
        assert_eq!(runtime.attempts, Some(2));
        assert_eq!(runtime.first_seen.as_deref(), Some("2026-11-27T02:00:00Z"));
        assert_eq!(runtime.last_seen, None);
        assert!(parked.deaths.is_empty());
        assert_eq!(parked.returns, 3);
    }

    #[test]
    fn x_death_is_read_and_the_id_falls_back_to_the_body() {
        let mut death = FieldTable::default();
        death.insert("reason".into(), long("delivery_limit"));
        death.insert("queue".into(), long("p.stage.replicate"));
        death.insert("exchange".into(), long("p.work"));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![long("replicate")])),
        );
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
        let mut table = FieldTable::default();
        table.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        let body = br#"{"v":1,"message_id":"0b6f0c7e-0000-4000-8000-000000000001"}"#.to_vec();
        let parked = parked_message(body, "replicate".into(), None, Some(&table));
        assert_eq!(parked.id, "0b6f0c7e-0000-4000-8000-000000000001");
        assert!(parked.runtime.is_none());
        assert_eq!(
            parked.deaths,
            vec![Death {
                reason: "delivery_limit".into(),
                queue: "p.stage.replicate".into(),
                exchange: "p.work".into(),
                routing_keys: vec!["replicate".into()],
                count: 1,
                time: OffsetDateTime::from_unix_timestamp(1_700_000_000).ok(),
            }]
        );
    }

    #[test]
    fn a_body_without_an_id_gets_a_stable_digest_id() {
        let first = parked_message(b"not json".to_vec(), "snapshot".into(), None, None);
        let again = parked_message(b"not json".to_vec(), "snapshot".into(), Some(String::new()), None);
        assert!(first.id.starts_with("sha256:") && first.id.len() == "sha256:".len() + 16);
        assert_eq!(first.id, again.id);
        assert_ne!(
            first.id,
            parked_message(b"other".to_vec(), "snapshot".into(), None, None).id
        );
    }
}

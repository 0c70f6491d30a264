//! Confirmed publishes. Every publish goes on the link's confirm-mode channel and returns only once
//! the broker has acked it (for a quorum queue: written to a majority); a nack — e.g. a full queue
//! with `reject-publish` overflow — is [`BusError::NotConfirmed`]. A publish that fails because the
//! connection died is tried again on the next connection (within `publish_timeout`): its fate on
//! the old one is unknown, so it may arrive twice, which handlers tolerate; it is never lost
//! silently. Messages are persistent; parked ones carry why in `x-sigrun-*` headers; stage
//! messages carry their envelope's `traceparent` header.

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::time::Instant;

use super::Shared;
use super::connection::{publish_failed, wait_link};
use crate::bus::{BusError, ParkReason};

/// Header names of a parked message.
pub mod headers {
    pub const ERROR: &str = "x-sigrun-error";
    pub const STAGE: &str = "x-sigrun-stage";
    pub const ATTEMPTS: &str = "x-sigrun-attempts";
    /// When the message was first parked (kept by a replay that parks it again).
    pub const FIRST_SEEN: &str = "x-sigrun-first-seen";
    pub const LAST_SEEN: &str = "x-sigrun-last-seen";
    /// W3C trace context of a stage message (the envelope's) or of a trigger (the producer's).
    pub const TRACEPARENT: &str = "traceparent";
}

/// AMQP delivery mode 2: written to disk (quorum queues persist everything anyway; classic
/// queues an operator might bind would not).
const PERSISTENT: u8 = 2;

pub(super) fn work_properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type("application/json".into())
}

/// A stage message's properties: those of all work, plus the envelope's W3C `traceparent` (handed
/// over by the caller, never read back out of the body) as a header of the same name, so tools
/// that know AMQP and trace context but not the envelope (and a consumer in another language)
/// follow the run too.
pub(super) fn stage_properties(traceparent: Option<&str>) -> BasicProperties {
    let properties = work_properties();
    match traceparent {
        Some(traceparent) => {
            let mut table = FieldTable::default();
            table.insert(
                headers::TRACEPARENT.into(),
                AMQPValue::LongString(LongString::from(traceparent)),
            );
            properties.with_headers(table)
        }
        None => properties,
    }
}

pub(super) fn event_properties() -> BasicProperties {
    work_properties()
}

pub(super) fn park_properties(reason: &ParkReason) -> BasicProperties {
    let now = OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default();
    let mut table = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    // Bounded here too: a header must fit in one frame, and a reason may quote hostile input.
    table.insert(headers::ERROR.into(), text(&crate::model::text::bounded(&reason.error)));
    if let Some(stage) = reason.stage {
        table.insert(headers::STAGE.into(), text(stage.as_str()));
    }
    table.insert(
        headers::ATTEMPTS.into(),
        AMQPValue::LongLongInt(i64::from(reason.attempts)),
    );
    table.insert(headers::FIRST_SEEN.into(), text(&now));
    table.insert(headers::LAST_SEEN.into(), text(&now));
    let mut properties = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_headers(table);
    if let Some(id) = &reason.message_id {
        properties = properties.with_message_id(id.as_str().into());
    }
    properties
}

/// Publishes and waits for the broker's confirm, across reconnects for at most `publish_timeout`.
pub(super) async fn publish(
    shared: &Shared,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), BusError> {
    let deadline = Instant::now() + shared.settings.publish_timeout;
    let target = || format!("{exchange} ({routing_key})");
    // A failed link is not retried: the next attempt waits for its replacement.
    let mut failed_generation = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let link = match wait_link(shared, failed_generation, left).await {
            Ok(link) => link,
            Err(BusError::Connection(reason)) => {
                return Err(BusError::NotConfirmed {
                    target: target(),
                    reason,
                });
            }
            Err(other) => return Err(other),
        };
        let sending = async {
            let confirm = link
                .publisher
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body,
                    properties.clone(),
                )
                .await?;
            confirm.await
        };
        // A connection gone silent (no reset, no close) never confirms: past the deadline it is
        // taken for dead, so the link is replaced rather than waited on until the heartbeat.
        let Ok(confirmed) = tokio::time::timeout_at(deadline, sending).await else {
            shared.report_broken(link.generation);
            return Err(BusError::NotConfirmed {
                target: target(),
                reason: format!("no confirm within {} ms", shared.settings.publish_timeout.as_millis()),
            });
        };
        match confirmed {
            Ok(confirmation) if confirmation.is_ack() => return Ok(()),
            Ok(confirmation) => {
                return Err(BusError::NotConfirmed {
                    target: target(),
                    reason: if confirmation.is_nack() {
                        "the broker refused it (nack: a full or unavailable queue)".into()
                    } else {
                        "the channel is not in confirm mode".into()
                    },
                });
            }
            Err(error) => {
                publish_failed(shared, &link, &error);
                failed_generation = link.generation;
            }
        }
    }
}

//! Triggers on the RabbitMQ bus: publishing one (what `sigrun submit` and event producers do),
//! taking them from `{p}.triggers` (a single-active-consumer queue, so while several workers wait
//! only one takes triggers at a time), and what the admitter does with one it cannot admit now:
//! park it with the reason, or put it on a delay tier to come back later. Both keep the trigger's
//! content type and message id, so a parked CloudEvent is still one when replayed; a trigger's
//! routing key is `trigger` everywhere, parking included.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};

use super::AmqpBus;
use super::consumer::{self, Source, integer};
use super::publisher::{self, headers};
use super::topology::TRIGGER_ROUTING_KEY;
use crate::bus::{BusError, ParkReason, TriggerDelivery, TriggerMessage};

const PERSISTENT: u8 = 2;

impl AmqpBus {
    /// Publishes a trigger to the work exchange with routing key `trigger` (persistent, confirmed).
    pub async fn publish_trigger(
        &self,
        body: &[u8],
        content_type: &str,
        message_id: Option<&str>,
    ) -> Result<(), BusError> {
        self.publish_trigger_traced(body, content_type, message_id, None).await
    }

    /// As [`AmqpBus::publish_trigger`], with a W3C `traceparent` header: the run it starts
    /// joins that trace.
    pub async fn publish_trigger_traced(
        &self,
        body: &[u8],
        content_type: &str,
        message_id: Option<&str>,
        traceparent: Option<&str>,
    ) -> Result<(), BusError> {
        let mut properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type(content_type.into());
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.into());
        }
        if let Some(traceparent) = traceparent {
            properties = properties.with_headers(trace_header(traceparent, FieldTable::default()));
        }
        publisher::publish(
            &self.shared,
            &self.shared.names.work(),
            TRIGGER_ROUTING_KEY,
            body,
            properties,
        )
        .await
    }

    /// The next trigger; `None` once the bus is shut down. Consumes the triggers queue from the
    /// first call on (and after every reconnect). Cancel-safe like [`crate::bus::Bus::next`].
    pub async fn next_trigger(&self) -> Option<TriggerDelivery> {
        self.want(&[Source::Triggers]);
        let (_, generation, delivery) = self.shared.inbox.next(&self.shared, &[Source::Triggers]).await?;
        let properties = &delivery.properties;
        let attempts = properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(headers::ATTEMPTS))
            .and_then(integer)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        let traceparent = properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(headers::TRACEPARENT))
            .and_then(text);
        let message = TriggerMessage {
            traceparent,
            content_type: properties.content_type().as_ref().map(|c| c.to_string()),
            message_id: properties.message_id().as_ref().map(|m| m.to_string()),
            attempts,
            delivery_count: consumer::delivery_count(properties.headers().as_ref()),
            body: delivery.data,
        };
        Some(TriggerDelivery {
            message,
            acker: consumer::acker(&self.shared, generation, delivery.acker),
        })
    }

    /// Parks a trigger with the reason (confirmed): `x-sigrun-*` headers as for a parked stage
    /// message, no stage, routing key `trigger`, its content type and message id kept.
    pub async fn park_trigger(&self, trigger: &TriggerMessage, error: &str) -> Result<(), BusError> {
        let reason = ParkReason {
            stage: None,
            error: error.to_string(),
            attempts: trigger.attempts.max(trigger.delivery_count),
            message_id: trigger.message_id.clone(),
        };
        let mut properties = publisher::park_properties(&reason);
        if let Some(traceparent) = &trigger.traceparent {
            let table = properties.headers().clone().unwrap_or_default();
            properties = properties.with_headers(trace_header(traceparent, table));
        }
        if let Some(content_type) = &trigger.content_type {
            properties = properties.with_content_type(content_type.as_str().into());
        }
        publisher::publish(
            &self.shared,
            &self.shared.names.parking_exchange(),
            TRIGGER_ROUTING_KEY,
            &trigger.body,
            properties,
        )
        .await
    }

    /// Puts a trigger off for `delay`, held on the tier that fits until then; it is back on the
    /// triggers queue carrying `attempts` (confirmed).
    pub async fn delay_trigger(
        &self,
        trigger: &TriggerMessage,
        delay: std::time::Duration,
        attempts: u32,
    ) -> Result<(), BusError> {
        let Some(&tier) = self.tiers.get(crate::bus::tier_for(&self.tiers, delay)) else {
            return Err(BusError::NotConfirmed {
                target: "a delay tier".into(),
                reason: "the bus has no delay tiers".into(),
            });
        };
        let mut table = FieldTable::default();
        table.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(i64::from(attempts)));
        if let Some(traceparent) = &trigger.traceparent {
            table = trace_header(traceparent, table);
        }
        let mut properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_headers(super::delays::with_due(table, delay));
        if let Some(content_type) = &trigger.content_type {
            properties = properties.with_content_type(content_type.as_str().into());
        }
        if let Some(id) = &trigger.message_id {
            properties = properties.with_message_id(id.as_str().into());
        }
        // The tier's fanout exchange keeps the routing key; once due, the relay sends the trigger
        // back to the work exchange with it, which routes it to the triggers queue.
        publisher::publish(
            &self.shared,
            &self.shared.names.tier(tier),
            TRIGGER_ROUTING_KEY,
            &trigger.body,
            properties,
        )
        .await
    }
}

/// `table` with a `traceparent` header added (kept through delays and parking, so a trigger that
/// comes back still starts its run in the producer's trace).
fn trace_header(traceparent: &str, mut table: FieldTable) -> FieldTable {
    table.insert(
        headers::TRACEPARENT.into(),
        AMQPValue::LongString(LongString::from(traceparent)),
    );
    table
}

/// A header's text (AMQP has two string types; producers use either).
fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

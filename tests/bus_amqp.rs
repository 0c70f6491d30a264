//! The RabbitMQ bus against the real broker at `SIGRUN_TEST_AMQP_URL` (default
//! amqp://guest:guest@127.0.0.1:5672). Nothing is skipped: an unreachable broker fails every test
//! with how to start it. Each test declares its own topology under a random name prefix (tests run
//! in parallel on one broker) and deletes it at the end. Broker-side timing (dead-lettering, a
//! relay's hold) is awaited with bounded polling; everything else awaits the event itself.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use sigrun::azure::AzureError;
use sigrun::bus::amqp::{AmqpBus, AmqpSettings, StreamOffset, TriggerDelivery, TriggerMessage, headers};
use sigrun::bus::{Bus, BusError, Delivery, ParkReason};
use sigrun::events::{Event, EventKind};
use sigrun::model::envelope::{Branch, ENVELOPE_VERSION, Envelope, Stage, new_traceparent};
use sigrun::model::ids::{GalleryId, GalleryImageId, GalleryImageVersionId};
use sigrun::model::plan::Plan;
use sigrun::model::spec::PipelineSpec;
use sigrun::runtime::{Handler, Runtime, RuntimeSettings};
use sigrun::stages::{Outcome, Step};
use time::OffsetDateTime;
use tokio::time::{Instant, sleep, timeout};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

fn url() -> String {
    std::env::var("SIGRUN_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn settings(prefix: &str) -> AmqpSettings {
    AmqpSettings {
        url: url(),
        cluster_urls: Vec::new(),
        prefix: prefix.into(),
        delivery_limit: 2,
        prefetch: 10,
        event_max_age: "1h".into(),
        connect_timeout: Duration::from_secs(5),
        publish_timeout: Duration::from_secs(15),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_secs(1),
    }
}

fn prefix() -> String {
    format!("sigrun-test-{}", &Uuid::new_v4().simple().to_string()[..12])
}

fn tiers() -> Vec<Duration> {
    [150, 400, 800].map(Duration::from_millis).to_vec()
}

async fn connect(prefix: &str) -> AmqpBus {
    connect_with(settings(prefix), tiers()).await
}

async fn connect_with(settings: AmqpSettings, tiers: Vec<Duration>) -> AmqpBus {
    let url = settings.redacted_url();
    match AmqpBus::connect(settings, tiers).await {
        Ok(bus) => bus,
        Err(error) => panic!(
            "RabbitMQ is not reachable at {url} ({error}). Start it with `rabbitmq-server -detached` \
             (or point SIGRUN_TEST_AMQP_URL at a broker)"
        ),
    }
}

/// Deletes the test's topology and closes the bus.
async fn teardown(bus: AmqpBus) {
    let (settings, tiers) = (bus.settings().clone(), bus.tiers().to_vec());
    bus.close().await;
    AmqpBus::delete_topology(&settings, &tiers)
        .await
        .expect("delete the test topology");
}

async fn next(bus: &AmqpBus, stages: &[Stage]) -> Delivery {
    timeout(WAIT, bus.next(stages))
        .await
        .expect("a delivery within the wait")
        .expect("the bus is open")
}

/// A plain connection for looking at queues directly.
async fn raw() -> Connection {
    Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("raw connection")
}

/// Waits (bounded) for a message on `queue` by `basic.get` — for broker-side moves such as
/// dead-lettering, which no consumer of ours sees.
async fn get_eventually(connection: &Connection, queue: &str) -> lapin::message::BasicGetMessage {
    let channel = connection.create_channel().await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            message.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
            return message;
        }
        assert!(Instant::now() < deadline, "nothing arrived on {queue}");
        sleep(Duration::from_millis(20)).await;
    }
}

fn header<'a>(table: &'a FieldTable, key: &str) -> &'a AMQPValue {
    table
        .inner()
        .get(key)
        .unwrap_or_else(|| panic!("header {key} in {table:?}"))
}

fn text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        other => panic!("not a string: {other:?}"),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[tokio::test]
async fn a_published_message_is_delivered_once_confirmed_and_acked() {
    let bus = connect(&prefix()).await;
    let mut round_trips = Vec::new();
    for i in 0..50 {
        let body = format!("{{\"n\":{i}}}");
        let start = Instant::now();
        bus.publish(Stage::Snapshot, body.as_bytes(), None).await.unwrap();
        let confirmed = start.elapsed();
        let d = next(&bus, &[Stage::Snapshot]).await;
        round_trips.push((confirmed, start.elapsed()));
        assert_eq!(
            (d.stage, d.body.as_slice(), d.delivery_count),
            (Stage::Snapshot, body.as_bytes(), 1)
        );
        d.acker.ack().await.unwrap();
    }
    let mut confirms: Vec<Duration> = round_trips.iter().map(|r| r.0).collect();
    let mut deliveries: Vec<Duration> = round_trips.iter().map(|r| r.1).collect();
    confirms.sort();
    deliveries.sort();
    println!(
        "publish confirm: p50 {:?} max {:?}; publish → next: p50 {:?} max {:?}",
        percentile(&confirms, 0.5),
        confirms.last().unwrap(),
        percentile(&deliveries, 0.5),
        deliveries.last().unwrap()
    );
    // Nothing else is left: another consumer of the stage waits in vain.
    assert!(
        timeout(Duration::from_millis(300), bus.next(&[Stage::Snapshot]))
            .await
            .is_err()
    );
    teardown(bus).await;
}

#[tokio::test]
async fn a_consumer_gets_only_the_stages_it_asks_for() {
    let bus = connect(&prefix()).await;
    bus.publish(Stage::Verify, b"v", None).await.unwrap();
    bus.publish(Stage::Replicate, b"r", None).await.unwrap();
    let d = next(&bus, &[Stage::Replicate]).await;
    assert_eq!((d.stage, d.body.as_slice()), (Stage::Replicate, b"r".as_slice()));
    d.acker.ack().await.unwrap();
    let d = next(&bus, &[Stage::Verify, Stage::Snapshot]).await;
    assert_eq!((d.stage, d.body.as_slice()), (Stage::Verify, b"v".as_slice()));
    d.acker.ack().await.unwrap();
    teardown(bus).await;
}

#[tokio::test]
async fn a_requeued_or_dropped_delivery_comes_back_with_its_count_raised() {
    let bus = connect(&prefix()).await;
    bus.publish(Stage::ImageCreate, b"again", None).await.unwrap();
    let first = next(&bus, &[Stage::ImageCreate]).await;
    assert_eq!(first.delivery_count, 1);
    first.acker.requeue().await.unwrap();
    let second = next(&bus, &[Stage::ImageCreate]).await;
    assert_eq!(
        (second.body.as_slice(), second.delivery_count),
        (b"again".as_slice(), 2)
    );
    // Dropped unsettled: the bus returns it.
    drop(second);
    let third = next(&bus, &[Stage::ImageCreate]).await;
    assert_eq!(third.delivery_count, 3);
    third.acker.ack().await.unwrap();
    teardown(bus).await;
}

#[tokio::test]
async fn a_message_returned_past_the_delivery_limit_is_parked_by_the_broker() {
    let prefix = prefix();
    let bus = connect(&prefix).await;
    bus.publish(Stage::Replicate, b"poison", None).await.unwrap();
    // Limit 2: delivered three times, then dead-lettered to parking.
    for count in 1..=3 {
        let d = next(&bus, &[Stage::Replicate]).await;
        assert_eq!(d.delivery_count, count);
        d.acker.requeue().await.unwrap();
    }
    let raw = raw().await;
    let parked = get_eventually(&raw, &format!("{prefix}.parked")).await;
    assert_eq!(parked.delivery.data, b"poison");
    let headers = parked.delivery.properties.headers().clone().unwrap();
    let AMQPValue::FieldArray(deaths) = header(&headers, "x-death") else {
        panic!("x-death is an array: {headers:?}");
    };
    let AMQPValue::FieldTable(death) = &deaths.as_slice()[0] else {
        panic!("an x-death entry is a table");
    };
    assert_eq!(text(header(death, "reason")), "delivery_limit");
    assert_eq!(text(header(death, "queue")), format!("{prefix}.stage.replicate"));
    assert!(
        timeout(Duration::from_millis(300), bus.next(&[Stage::Replicate]))
            .await
            .is_err(),
        "not delivered a fourth time"
    );
    let _ = raw.close(200, "done".into()).await;
    teardown(bus).await;
}

#[tokio::test]
async fn a_delayed_message_returns_to_its_stage_after_its_delay_and_not_before() {
    let prefix = prefix();
    let bus = connect(&prefix).await;
    let tiers = bus.tiers().to_vec();
    // Each tier's own delay, and delays between two tiers (held on the shorter for all of it).
    let mut delays = tiers.clone();
    delays.extend(tiers.windows(2).map(|pair| (pair[0] + pair[1]) / 2));
    delays.push(tiers[tiers.len() - 1] + tiers[0]);
    let stages = [Stage::Snapshot, Stage::GalleryPublish, Stage::Verify];
    let mut lateness = Vec::new();
    for round in 0..4 {
        for (n, delay) in delays.iter().enumerate() {
            let stage = stages[n % stages.len()];
            let body = format!("delay {delay:?} round {round}");
            let start = Instant::now();
            bus.publish_delayed(stage, body.as_bytes(), *delay, None).await.unwrap();
            let d = next(&bus, &[stage]).await;
            let waited = start.elapsed();
            // Back on the stage it was published for, once: the routing key survived the relay.
            assert_eq!((d.stage, d.body.as_slice()), (stage, body.as_bytes()));
            assert_eq!(d.delivery_count, 1);
            assert!(waited >= *delay, "{body} came back after {waited:?}");
            assert!(
                waited < *delay + Duration::from_secs(2),
                "{body} came back {:?} late",
                waited - *delay
            );
            lateness.push(waited - *delay);
            d.acker.ack().await.unwrap();
        }
    }
    lateness.sort();
    println!(
        "delays {:?} on tiers {:?}: lateness over {} messages p50 {:?} max {:?}",
        delays,
        tiers,
        lateness.len(),
        percentile(&lateness, 0.5),
        lateness.last().unwrap()
    );
    teardown(bus).await;
}

/// A relay that dies holding a delayed message (its process killed, its connection gone) leaves
/// it with the broker; another worker's relay sends it on when due, once, and not before.
#[tokio::test]
async fn a_delay_held_by_a_relay_that_dies_comes_back_through_another_once() {
    let prefix = prefix();
    let holder = connect(&prefix).await;
    let delay = *holder.tiers().last().unwrap();
    // Consuming anything starts the holder's relays.
    let _ = timeout(Duration::from_millis(50), holder.next(&[Stage::Verify])).await;
    let start = Instant::now();
    holder
        .publish_delayed(Stage::Snapshot, b"held", delay, None)
        .await
        .unwrap();
    let queue = holder.names().tier(delay);
    // A passive declare counts the ready messages only: 0 once the relay holds it unacked.
    let looker = raw().await;
    let channel = looker.create_channel().await.unwrap();
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let ready = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .unwrap()
            .message_count();
        if ready == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the holder's relay took the message from {queue}"
        );
        sleep(Duration::from_millis(10)).await;
    }
    assert!(start.elapsed() < delay, "taken while it waits");
    let _ = looker.close(200, "done".into()).await;
    holder.close().await;

    let other = connect(&prefix).await;
    let d = next(&other, &[Stage::Snapshot]).await;
    let waited = start.elapsed();
    assert_eq!(d.body, b"held");
    assert_eq!(d.delivery_count, 1, "the stage queue counts its own deliveries only");
    assert!(waited >= delay, "sent on after {waited:?}, before its {delay:?}");
    d.acker.ack().await.unwrap();
    assert!(
        timeout(delay * 3, other.next(&[Stage::Snapshot])).await.is_err(),
        "sent on once"
    );
    teardown(other).await;
}

/// A broker policy refusing publishes to one queue once it holds a message (`max-length` 0 with
/// `reject-publish`: each publish is nacked), cleared when dropped, so a failing test leaves the
/// broker as it was.
struct Refusing {
    name: String,
    pattern: String,
}

impl Refusing {
    fn publishes_to(queue: &str) -> Refusing {
        let refusing = Refusing {
            name: format!("refuse-{queue}"),
            pattern: format!("^{}$", queue.replace('.', "\\.")),
        };
        refusing.limit(0);
        refusing
    }

    /// The queue takes publishes again. Only a limit it is under lifts a quorum queue's refusal
    /// (checked as messages leave it); with no limit at all it goes on refusing.
    fn lift(&self) {
        self.limit(1_000_000);
    }

    fn limit(&self, max_length: u64) {
        let definition = format!(r#"{{"max-length":{max_length},"overflow":"reject-publish"}}"#);
        let args = ["-q", "set_policy", "--apply-to", "queues", "--priority", "100"];
        let status = Command::new("rabbitmqctl")
            .args(args)
            .args([&self.name, &self.pattern, &definition])
            .status()
            .expect("rabbitmqctl runs");
        assert!(status.success(), "rabbitmqctl set_policy {}", self.name);
    }
}

impl Drop for Refusing {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "clear_policy", &self.name])
            .status();
    }
}

/// A relay whose release the broker refuses (its nack, as a full or leaderless queue sends) puts
/// the message back on its tier and sends it on once the broker takes it: it is never left held,
/// unacked, on a connection that stays up.
#[tokio::test]
async fn a_due_message_the_broker_refuses_goes_back_on_its_tier_and_on_once_taken() {
    let prefix = prefix();
    let bus = connect(&prefix).await;
    let stage_queue = bus.names().stage_queue(Stage::Snapshot);
    // Consuming anything starts the relays; the stage itself is not consumed until the end.
    let _ = timeout(Duration::from_millis(50), bus.next(&[Stage::Verify])).await;
    let refusing = Refusing::publishes_to(&stage_queue);
    // A quorum queue refuses once it holds more than its limit: probes land until one is
    // refused, and wait on the queue with the refusal in force.
    let deadline = Instant::now() + WAIT;
    let mut probes = 0;
    while bus.publish(Stage::Snapshot, b"probe", None).await.is_ok() {
        probes += 1;
        assert!(
            Instant::now() < deadline,
            "the policy refuses publishes to {stage_queue}"
        );
        sleep(Duration::from_millis(50)).await;
    }
    let delay = bus.tiers()[0];
    bus.publish_delayed(Stage::Snapshot, b"refused at first", delay, None)
        .await
        .unwrap();
    // Due, released, refused at least once (put back and taken again), and not sent on.
    sleep(delay + Duration::from_secs(2)).await;
    refusing.lift();
    for _ in 0..probes {
        let probe = next(&bus, &[Stage::Snapshot]).await;
        assert_eq!(probe.body, b"probe", "nothing got past a refusing queue");
        probe.acker.ack().await.unwrap();
    }
    let d = next(&bus, &[Stage::Snapshot]).await;
    assert_eq!(d.body, b"refused at first");
    d.acker.ack().await.unwrap();
    assert!(
        timeout(Duration::from_secs(2), bus.next(&[Stage::Snapshot]))
            .await
            .is_err(),
        "sent on once"
    );
    drop(refusing);
    teardown(bus).await;
}

#[tokio::test]
async fn park_puts_the_message_and_its_reason_in_the_parking_queue() {
    let prefix = prefix();
    let bus = connect(&prefix).await;
    let reason = ParkReason {
        stage: Some(Stage::PoolCreate),
        error: "PoolQuotaReached: no dedicated cores left".into(),
        attempts: 4,
        message_id: Some("m-123".into()),
    };
    bus.park(b"{\"v\":1}", &reason).await.unwrap();
    let raw = raw().await;
    let parked = get_eventually(&raw, &format!("{prefix}.parked")).await;
    assert_eq!(parked.delivery.data, b"{\"v\":1}");
    let properties = &parked.delivery.properties;
    assert_eq!(properties.message_id().as_ref().map(|s| s.as_str()), Some("m-123"));
    assert_eq!(properties.delivery_mode(), &Some(2));
    let table = properties.headers().clone().unwrap();
    assert_eq!(text(header(&table, headers::ERROR)), reason.error);
    assert_eq!(text(header(&table, headers::STAGE)), "pool-create");
    assert!(matches!(header(&table, headers::ATTEMPTS), AMQPValue::LongLongInt(4)));
    let seen = text(header(&table, headers::FIRST_SEEN));
    OffsetDateTime::parse(&seen, &time::format_description::well_known::Rfc3339).expect("an RFC 3339 time");
    assert!(table.contains_key(headers::LAST_SEEN));
    let _ = raw.close(200, "done".into()).await;
    teardown(bus).await;
}

fn event(kind: EventKind) -> Event {
    Event {
        run_id: Uuid::new_v4(),
        pipeline: "nightly-ubuntu".into(),
        version: "2026.1126.0".into(),
        stage: Stage::Replicate,
        branch: Branch::Trunk,
        at: OffsetDateTime::now_utc().replace_nanosecond(0).unwrap(),
        kind,
    }
}

#[tokio::test]
async fn events_land_in_the_stream_and_read_back_from_the_first() {
    let bus = connect(&prefix()).await;
    let sent = vec![
        event(EventKind::Throttled { retry_after_ms: None }),
        event(EventKind::Waiting {
            what: "replication".into(),
        }),
        event(EventKind::RegionCompleted {
            region: "eastus".into(),
        }),
    ];
    for e in &sent {
        bus.publish_event(e).await.unwrap();
    }
    let mut reader = bus.read_events(StreamOffset::First).await.unwrap();
    let mut offsets = Vec::new();
    for e in &sent {
        let got = timeout(WAIT, reader.next())
            .await
            .expect("an event")
            .expect("open")
            .unwrap();
        assert_eq!(&got.event, e);
        assert_eq!(got.routing_key, e.routing_key());
        offsets.push(got.offset);
    }
    assert_eq!(
        sent.iter().map(Event::routing_key).collect::<Vec<_>>(),
        [
            "nightly-ubuntu.replicate.throttled",
            "nightly-ubuntu.replicate.waiting",
            "nightly-ubuntu.replicate.region_completed"
        ]
    );
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    reader.close().await;
    // A reader from an offset starts there.
    let mut from_second = bus.read_events(StreamOffset::At(offsets[1])).await.unwrap();
    let got = timeout(WAIT, from_second.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(got.event, sent[1]);
    from_second.close().await;
    teardown(bus).await;
}

#[tokio::test]
async fn read_to_end_returns_everything_published_before_it_and_skips_other_markers() {
    let bus = connect(&prefix()).await;
    let first = event(EventKind::Throttled { retry_after_ms: None });
    bus.publish_event(&first).await.unwrap();
    // Another reader's marker in between is skipped by everyone else.
    bus.publish_marker().await.unwrap();
    let second = event(EventKind::RegionCompleted {
        region: "eastus".into(),
    });
    bus.publish_event(&second).await.unwrap();
    let mut reader = bus.read_events(StreamOffset::First).await.unwrap();
    let read = timeout(WAIT, reader.read_to_end(&bus)).await.expect("the end").unwrap();
    let read: Vec<Event> = read.into_iter().map(|e| e.unwrap().event).collect();
    assert_eq!(read, [first.clone(), second.clone()]);
    // At the end already: a second read finds only what came since.
    let third = event(EventKind::Throttled { retry_after_ms: None });
    bus.publish_event(&third).await.unwrap();
    let read = timeout(WAIT, reader.read_to_end(&bus)).await.expect("the end").unwrap();
    let read: Vec<Event> = read.into_iter().map(|e| e.unwrap().event).collect();
    assert_eq!(read, [third]);
    reader.close().await;
    teardown(bus).await;
}

/// The `retry_after_ms` of each `Throttled` event `reader` reads up to the stream's end.
async fn throttle_waits_to_end(reader: &mut sigrun::bus::amqp::EventReader, bus: &AmqpBus) -> Vec<Option<u64>> {
    let read = timeout(WAIT, reader.read_to_end(bus)).await.expect("the end").unwrap();
    read.into_iter()
        .map(|e| match e.unwrap().event.kind {
            EventKind::Throttled { retry_after_ms } => retry_after_ms,
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

/// A reader from the first offset hands out only the events of commits the ledger counts: not
/// those of a holder that was superseded and committed anyway, nor those of a second commit of a
/// spent token; a reader reopened after it judges on with its book; a reader opened after the
/// claims, which cannot judge, hands out every commit's events.
#[tokio::test]
async fn a_reader_hands_out_the_events_of_counting_commits_only() {
    use sigrun::ledger::record::{Claim, Commit, Consumed, Record};
    let bus = connect(&prefix()).await;
    let run_id = Uuid::new_v4();
    let (message_id, token) = (Uuid::new_v4(), Uuid::new_v4());
    let claim = |supersedes: Option<Uuid>| Claim {
        run_id,
        pipeline: "nightly-ubuntu".into(),
        message_id,
        token,
        claim: Uuid::new_v4(),
        supersedes,
        at: OffsetDateTime::now_utc(),
    };
    let commit = |by: &Claim, retry_after_ms: u64| {
        let mut said = event(EventKind::Throttled {
            retry_after_ms: Some(retry_after_ms),
        });
        said.run_id = run_id;
        Record::Commit(Commit {
            kept: None,
            run_id,
            pipeline: "nightly-ubuntu".into(),
            claim: by.claim,
            consumed: Some(Consumed { message_id, token }),
            successors: Vec::new(),
            events: vec![said],
        })
    };
    let timed_out = claim(None);
    let taker = claim(Some(timed_out.claim));
    bus.publish_record(&Record::Claim(timed_out.clone())).await.unwrap();
    bus.publish_record(&Record::Claim(taker.clone())).await.unwrap();
    // Read up to here from the first; then the reader is lost and replaced just after it.
    let mut first = bus.read_events(StreamOffset::First).await.unwrap();
    let read = timeout(WAIT, first.read_to_end(&bus)).await.expect("the end").unwrap();
    assert!(read.is_empty(), "claims carry no events");
    let after_claims = StreamOffset::At(first.position().expect("the marker was read") + 1);
    let book = first.take_book();
    assert!(book.is_some(), "a reader from the first judges commits");
    first.close().await;

    for record in [commit(&timed_out, 1), commit(&taker, 2), commit(&taker, 3)] {
        bus.publish_record(&record).await.unwrap();
    }
    let mut from_first = bus.read_events(StreamOffset::First).await.unwrap();
    assert_eq!(
        throttle_waits_to_end(&mut from_first, &bus).await,
        [Some(2)],
        "only the holder's first commit counts"
    );
    from_first.close().await;

    let mut reopened = bus.read_events(after_claims.clone()).await.unwrap().with_book(book);
    assert_eq!(
        throttle_waits_to_end(&mut reopened, &bus).await,
        [Some(2)],
        "the reopened reader judges on"
    );
    reopened.close().await;

    let mut blind = bus.read_events(after_claims).await.unwrap();
    assert!(blind.take_book().is_none(), "a reader from an offset cannot judge");
    assert_eq!(
        throttle_waits_to_end(&mut blind, &bus).await,
        [Some(1), Some(2), Some(3)],
        "it hands out every commit's events"
    );
    blind.close().await;
    teardown(bus).await;
}

/// A stage message's `traceparent` header is the value handed over, whatever the body says (the
/// bus never reads the body for it); a message published with none has no such header.
#[tokio::test]
async fn the_traceparent_header_is_the_value_handed_over_not_read_from_the_body() {
    let prefix = prefix();
    let bus = connect(&prefix).await;
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = br#"{"traceparent":"00-11111111111111111111111111111111-2222222222222222-01"}"#;
    let raw = raw().await;
    let queue = format!("{prefix}.stage.verify");
    // Not consumed by the bus: read straight off the queue with the properties as the broker has them.
    bus.publish(Stage::Verify, body, Some(given)).await.unwrap();
    let traced = get_eventually(&raw, &queue).await;
    let table = traced.delivery.properties.headers().clone().expect("headers");
    assert_eq!(text(header(&table, headers::TRACEPARENT)), given);
    bus.publish(Stage::Verify, body, None).await.unwrap();
    let plain = get_eventually(&raw, &queue).await;
    let none = plain.delivery.properties.headers().clone().unwrap_or_default();
    assert!(!none.contains_key(headers::TRACEPARENT), "{none:?}");
    let _ = raw.close(200, "done".into()).await;
    teardown(bus).await;
}

/// The frame size each of the bus's connections uses, as the broker lists it (found by the
/// connection name `sigrun {prefix}` among its client properties).
fn frame_max_of(prefix: &str) -> Vec<u64> {
    let output = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "frame_max", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&format!("sigrun {prefix}")))
        .filter_map(|line| line.split_whitespace().next()?.parse().ok())
        .collect()
}

/// lapin keeps rings of 32 frames per connection: the bus asks for 32 KiB frames (rings of 1 MiB,
/// not RabbitMQ's 128 KiB frames' 4 MiB), unless its URL names a size.
#[tokio::test]
async fn the_bus_asks_for_small_frames_unless_its_url_names_a_size() {
    let prefix = prefix();
    let bus = connect(&prefix).await;
    let sizes = tokio::task::spawn_blocking({
        let prefix = prefix.clone();
        move || frame_max_of(&prefix)
    })
    .await
    .unwrap();
    assert_eq!(sizes, [u64::from(sigrun::bus::amqp::FRAME_MAX)]);
    // A message larger than a frame goes through in several.
    let big = vec![b'x'; 3 * sigrun::bus::amqp::FRAME_MAX as usize + 17];
    bus.publish(Stage::Verify, &big, None).await.unwrap();
    let delivery = next(&bus, &[Stage::Verify]).await;
    assert_eq!(delivery.body, big);
    delivery.acker.ack().await.unwrap();
    teardown(bus).await;

    let prefix = self::prefix();
    let mut named = settings(&prefix);
    named.url = format!("{}?frame_max=8192", url());
    let bus = connect_with(named, tiers()).await;
    let sizes = tokio::task::spawn_blocking({
        let prefix = prefix.clone();
        move || frame_max_of(&prefix)
    })
    .await
    .unwrap();
    assert_eq!(sizes, [8192]);
    teardown(bus).await;
}

/// A reader acks a run of records at once, not each: it must never stop the broker sending, however
/// many records a reading spans and wherever in a run of acks the stream's head falls.
#[tokio::test]
async fn a_reader_reads_far_past_its_window_and_then_each_new_record() {
    let bus = connect(&prefix()).await;
    // Several windows (256) and not a whole number of ack runs (128).
    let sent: Vec<Event> = (0..701u64)
        .map(|i| {
            event(EventKind::Throttled {
                retry_after_ms: Some(i),
            })
        })
        .collect();
    futures_util::future::try_join_all(sent.iter().map(|e| bus.publish_event(e)))
        .await
        .unwrap();
    let mut reader = bus.read_events(StreamOffset::First).await.unwrap();
    let read = timeout(WAIT, reader.read_to_end(&bus)).await.expect("the end").unwrap();
    let mut read: Vec<Event> = read.into_iter().map(|e| e.unwrap().event).collect();
    // Published concurrently, so in any order: the same events, each once.
    let key = |e: &Event| serde_json::to_string(e).unwrap();
    read.sort_by_key(key);
    let mut expected = sent.clone();
    expected.sort_by_key(key);
    assert_eq!(read, expected);
    // At the head, with part of an ack run outstanding: each new record still comes, one by one.
    for i in 0..3u64 {
        let next = event(EventKind::Throttled {
            retry_after_ms: Some(1000 + i),
        });
        bus.publish_event(&next).await.unwrap();
        let got = timeout(WAIT, reader.next())
            .await
            .expect("the new event")
            .expect("open")
            .unwrap();
        assert_eq!(got.event, next);
    }
    reader.close().await;
    teardown(bus).await;
}

#[tokio::test]
async fn a_second_bus_on_the_same_prefix_redeclares_idempotently_and_shares_the_queues() {
    let prefix = prefix();
    let first = connect(&prefix).await;
    let second = connect(&prefix).await;
    first.publish(Stage::Verify, b"shared", None).await.unwrap();
    let d = next(&second, &[Stage::Verify]).await;
    assert_eq!(d.body, b"shared");
    d.acker.ack().await.unwrap();
    // Different arguments on the same names are refused by the broker, and said so.
    let mut changed = settings(&prefix);
    changed.delivery_limit = 7;
    let err = match AmqpBus::connect(changed, tiers()).await {
        Ok(_) => panic!("a changed delivery limit must not redeclare silently"),
        Err(err) => err.to_string(),
    };
    assert!(err.contains("inequivalent arg"), "{err}");
    second.close().await;
    teardown(first).await;
}

/// Whether `queue` exists, looked at passively on a channel of its own.
async fn queue_exists(connection: &Connection, queue: &str) -> bool {
    let channel = connection.create_channel().await.unwrap();
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let found = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .is_ok();
    if found {
        let _ = channel.close(200, "looked".into()).await;
    }
    found
}

#[tokio::test]
async fn a_publishing_bus_declares_the_topology_only_where_there_is_none() {
    let prefix = prefix();
    let names = sigrun::bus::amqp::topology::Names::new(&prefix);
    let look = raw().await;
    // A prefix nobody used: the publisher declares it all, and its trigger lands for the admitter.
    let publisher = AmqpBus::connect_to_publish(settings(&prefix), tiers())
        .await
        .expect("a publishing bus connects");
    assert!(AmqpBus::topology_exists(&settings(&prefix)).await.unwrap());
    publisher
        .publish_trigger(b"{\"v\":1}", "application/json", Some("t-1"))
        .await
        .expect("the trigger is confirmed");
    publisher.close().await;
    let worker = connect(&prefix).await;
    let trigger = next_trigger(&worker).await;
    assert_eq!(trigger.message.message_id.as_deref(), Some("t-1"));
    trigger.acker.ack().await.unwrap();
    worker.close().await;

    // On a declared prefix it declares nothing: a queue deleted behind its back stays deleted,
    // where a worker's connection declares it again.
    let tier = names.tier(tiers()[0]);
    let channel = look.create_channel().await.unwrap();
    channel
        .queue_delete(tier.as_str().into(), lapin::options::QueueDeleteOptions::default())
        .await
        .unwrap();
    let publisher = AmqpBus::connect_to_publish(settings(&prefix), tiers()).await.unwrap();
    publisher
        .publish_trigger(b"{\"v\":1}", "application/json", Some("t-2"))
        .await
        .unwrap();
    publisher.close().await;
    assert!(!queue_exists(&look, &tier).await, "the publisher declared {tier}");
    let worker = connect(&prefix).await;
    assert!(
        queue_exists(&look, &tier).await,
        "a worker's connection declares {tier} again"
    );
    let trigger = next_trigger(&worker).await;
    assert_eq!(trigger.message.message_id.as_deref(), Some("t-2"));
    trigger.acker.ack().await.unwrap();
    teardown(worker).await;
}

/// Force-closes this test's connections (named `sigrun {prefix}`) from the broker's side, as an
/// operator's `rabbitmqctl close_all_connections` would, without touching other tests' connections.
fn close_connections_of(prefix: &str) -> usize {
    let list = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    let listing = String::from_utf8_lossy(&list.stdout);
    let mut closed = 0;
    for line in listing.lines().filter(|l| l.contains(&format!("sigrun {prefix}"))) {
        let pid = line.split_whitespace().next().unwrap();
        let status = Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "test closes it"])
            .status()
            .expect("rabbitmqctl runs");
        assert!(status.success());
        closed += 1;
    }
    closed
}

#[tokio::test]
async fn a_closed_connection_is_reestablished_and_unacked_deliveries_come_back() {
    let prefix = prefix();
    let bus = connect(&prefix).await;
    bus.publish(Stage::Snapshot, b"in flight", None).await.unwrap();
    let held = next(&bus, &[Stage::Snapshot]).await;
    assert_eq!(bus.generation(), 1);

    assert_eq!(close_connections_of(&prefix), 1);
    let started = Instant::now();
    let generation = bus.connected(1).await.expect("reconnected");
    println!(
        "reconnected (generation {generation}) {:?} after the close",
        started.elapsed()
    );
    assert!(generation > 1);

    // The held delivery's channel is gone: acking fails harmlessly, and the broker returned it.
    assert!(held.acker.ack().await.is_err());
    let again = next(&bus, &[Stage::Snapshot]).await;
    assert_eq!(
        (again.body.as_slice(), again.delivery_count),
        (b"in flight".as_slice(), 2)
    );
    again.acker.ack().await.unwrap();

    bus.publish(Stage::Snapshot, b"after", None).await.unwrap();
    let after = next(&bus, &[Stage::Snapshot]).await;
    assert_eq!((after.body.as_slice(), after.delivery_count), (b"after".as_slice(), 1));
    after.acker.ack().await.unwrap();
    teardown(bus).await;
}

#[tokio::test]
async fn unacked_deliveries_of_a_closed_bus_go_to_another() {
    let prefix = prefix();
    let gone = connect(&prefix).await;
    let other = connect(&prefix).await;
    gone.publish(Stage::PoolCreate, b"orphan", None).await.unwrap();
    let held = next(&gone, &[Stage::PoolCreate]).await;
    gone.close().await;
    assert!(
        gone.next(&[Stage::PoolCreate]).await.is_none(),
        "a closed bus delivers nothing"
    );
    assert!(matches!(
        gone.publish(Stage::PoolCreate, b"x", None).await,
        Err(BusError::Closed)
    ));

    let d = next(&other, &[Stage::PoolCreate]).await;
    assert_eq!((d.body.as_slice(), d.delivery_count), (b"orphan".as_slice(), 2));
    d.acker.ack().await.unwrap();
    drop(held);
    teardown(other).await;
}

async fn next_trigger(bus: &AmqpBus) -> TriggerDelivery {
    timeout(WAIT, bus.next_trigger())
        .await
        .expect("a trigger within the wait")
        .expect("the bus is open")
}

#[tokio::test]
async fn triggers_go_to_one_consumer_at_a_time_and_keep_their_properties_when_delayed_or_parked() {
    let prefix = prefix();
    let active = connect(&prefix).await;
    let standby = connect(&prefix).await;
    let plain = br#"{"v":1,"pipeline":"a"}"#;
    let event = br#"{"specversion":"1.0","id":"e-2","source":"/ci","type":"io.sigrun.trigger.v1","data":{"v":1,"pipeline":"b"}}"#;
    active
        .publish_trigger(plain, "application/json", Some("t-1"))
        .await
        .unwrap();
    let one = next_trigger(&active).await;
    // The first consumer is the single active one: the other stands by and gets nothing.
    assert!(
        timeout(Duration::from_millis(500), standby.next_trigger())
            .await
            .is_err(),
        "a standby consumer got a trigger"
    );
    active
        .publish_trigger(event, "application/cloudevents+json", Some("t-2"))
        .await
        .unwrap();
    let two = next_trigger(&active).await;
    assert_eq!(
        one.message,
        TriggerMessage {
            body: plain.to_vec(),
            content_type: Some("application/json".into()),
            message_id: Some("t-1".into()),
            attempts: 0,
            delivery_count: 1,
            traceparent: None,
        }
    );
    assert_eq!(two.message.body, event.to_vec());
    assert_eq!(
        two.message.content_type.as_deref(),
        Some("application/cloudevents+json")
    );

    // Put off: back on the triggers queue after its delay (between two tiers: held for all of
    // it), its attempts in a header.
    let put_off = (tiers()[0] + tiers()[1]) / 2;
    let sent = Instant::now();
    active.delay_trigger(&one.message, put_off, 3).await.unwrap();
    one.acker.ack().await.unwrap();
    // Parked: reason in the headers, routing key and content type kept.
    active
        .park_trigger(&two.message, "no pipeline named `b`")
        .await
        .unwrap();
    two.acker.ack().await.unwrap();
    let again = next_trigger(&active).await;
    assert!(
        sent.elapsed() >= put_off,
        "back before its delay {put_off:?}: {:?}",
        sent.elapsed()
    );
    assert_eq!(
        (
            again.message.body.as_slice(),
            again.message.attempts,
            again.message.message_id.as_deref()
        ),
        (plain.as_slice(), 3, Some("t-1"))
    );
    assert_eq!(again.message.content_type.as_deref(), Some("application/json"));

    let raw = raw().await;
    let parked = get_eventually(&raw, &format!("{prefix}.parked")).await;
    assert_eq!(parked.delivery.data, event.to_vec());
    assert_eq!(parked.delivery.routing_key.as_str(), "trigger");
    let properties = &parked.delivery.properties;
    assert_eq!(
        properties.content_type().as_ref().map(|s| s.as_str()),
        Some("application/cloudevents+json")
    );
    assert_eq!(properties.message_id().as_ref().map(|s| s.as_str()), Some("t-2"));
    let table = properties.headers().clone().unwrap();
    assert_eq!(text(header(&table, headers::ERROR)), "no pipeline named `b`");
    assert!(!table.contains_key(headers::STAGE), "a trigger has no stage");

    // The active consumer goes away with the trigger unacked: the standby takes over and gets it.
    active.close().await;
    let taken_over = next_trigger(&standby).await;
    assert_eq!(
        (
            taken_over.message.message_id.as_deref(),
            taken_over.message.delivery_count
        ),
        (Some("t-1"), 2)
    );
    taken_over.acker.ack().await.unwrap();
    drop(again);
    let _ = raw.close(200, "done".into()).await;
    teardown(standby).await;
}

const SPEC: &str = r#"
name = "amqp-runtime"
[gallery]
id = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg/providers/Microsoft.Compute/galleries/g"
[definition]
name = "d"
os_type = "Linux"
publisher = "p"
offer = "o"
sku = "s"
[version]
scheme = "existing"
value = "1.0.0"
[[pools]]
target = "t"
account = "/subscriptions/22222222-2222-4222-8222-222222222222/resourceGroups/rg/providers/Microsoft.Batch/batchAccounts/a"
vm_size = "Standard_D2s_v5"
dedicated_nodes = 2
node_agent_sku_id = "batch.node.ubuntu 22.04"
"#;

fn first_message() -> Envelope {
    let spec = PipelineSpec::parse(SPEC, "amqp.toml").unwrap();
    let sub = "11111111-1111-4111-8111-111111111111";
    let now = OffsetDateTime::now_utc();
    Envelope {
        v: ENVELOPE_VERSION,
        message_id: Uuid::new_v4(),
        run_id: Uuid::new_v4(),
        pipeline: spec.name.clone(),
        version: "1.0.0".into(),
        stage: Stage::Snapshot,
        branch: Branch::Trunk,
        plan: std::sync::Arc::new(Plan {
            version: "1.0.0".into(),
            build: None,
            gallery: GalleryId::new(sub, "rg", &["g"]).unwrap(),
            gallery_region: "westeurope".into(),
            create_gallery: false,
            definition: GalleryImageId::new(sub, "rg", &["g", "d"]).unwrap(),
            version_id: GalleryImageVersionId::new(sub, "rg", &["g", "d", "1.0.0"]).unwrap(),
            regions: Vec::new(),
            pools: Vec::new(),
            publish_excluded: false,
            final_excluded: false,
            end_of_life: None,
            register_batch_in: Vec::new(),
            quota_use: Vec::new(),
            seen: Default::default(),
            warnings: Vec::new(),
        }),
        spec: std::sync::Arc::new(spec),
        artifacts: Default::default(),
        operation: None,
        not_before: None,
        attempt: 0,
        run_started: now,
        stage_started: now,
        traceparent: new_traceparent(),
        token: Uuid::new_v4(),
        made_by: Uuid::nil(),
        made_from: Uuid::nil(),
        admission: Uuid::nil(),
    }
}

/// Snapshot → (a short wait on a delay tier) → image-create → done, with an event at each step.
struct TwoStages;

#[async_trait]
impl Handler for TwoStages {
    async fn handle(
        &self,
        message: Envelope,
        _now: time::OffsetDateTime,
        _: sigrun::stages::Tried,
    ) -> Result<Step, AzureError> {
        let now = OffsetDateTime::now_utc();
        Ok(match message.stage {
            Stage::Snapshot => {
                let mut next = message.next(Stage::ImageCreate, now);
                // Held briefly, so the hand-off also goes through a delay tier.
                next.hold_until(now + Duration::from_millis(200));
                Step::new(Outcome::Advance(vec![next])).with(EventKind::Throttled { retry_after_ms: None })
            }
            Stage::ImageCreate => Step::new(Outcome::Done).with(EventKind::ResourceCreated {
                id: "/subscriptions/x/image".into(),
            }),
            _ => Step::new(Outcome::Fail("unexpected".into())),
        })
    }
}

#[tokio::test]
async fn the_runtime_runs_a_message_through_two_stages_on_rabbitmq() {
    let bus = Arc::new(connect(&prefix()).await);
    let mut settings = RuntimeSettings {
        consumers: 2,
        tiers: tiers(),
        ..RuntimeSettings::default()
    };
    settings.shutdown_grace = Duration::from_secs(5);
    let runtime = Runtime::new(
        Arc::clone(&bus) as Arc<dyn Bus>,
        Arc::new(TwoStages),
        vec![Stage::Snapshot, Stage::ImageCreate],
        settings,
    )
    .unwrap();
    let first = first_message();
    bus.publish(Stage::Snapshot, &first.encode(), None).await.unwrap();

    let running = runtime.spawn();
    let mut reader = bus.read_events(StreamOffset::First).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let got = timeout(WAIT, reader.next())
            .await
            .expect("the run's events")
            .unwrap()
            .unwrap();
        assert_eq!(got.event.run_id, first.run_id);
        seen.push((got.routing_key, got.event.kind));
    }
    reader.close().await;
    let report = timeout(WAIT, running.stop()).await.unwrap().unwrap();
    assert_eq!(
        seen,
        vec![
            (
                "amqp-runtime.snapshot.throttled".to_string(),
                EventKind::Throttled { retry_after_ms: None }
            ),
            (
                "amqp-runtime.image-create.resource_created".to_string(),
                EventKind::ResourceCreated {
                    id: "/subscriptions/x/image".into()
                }
            ),
        ]
    );
    // Two steps, plus any early return from the tier (the hold is longer than the shortest tier).
    assert!(report.handled >= 2, "{report:?}");
    assert_eq!(report.abandoned, 0);
    let bus = Arc::into_inner(bus).expect("the runtime let go of the bus");
    teardown(bus).await;
}

/// Looks `LOOKS` times, 150 ms apart, at a snapshot that is not done, recording nothing (the
/// runtime holds such a wait with its delivery), then records the snapshot and is done.
struct SlowSnapshot {
    looks: std::sync::atomic::AtomicU32,
}

const LOOKS: u32 = 6;

#[async_trait]
impl Handler for SlowSnapshot {
    async fn handle(
        &self,
        message: Envelope,
        now: time::OffsetDateTime,
        _: sigrun::stages::Tried,
    ) -> Result<Step, AzureError> {
        self.looks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let polls = message.operation.as_ref().map_or(0, |op| op.polls + 1);
        if polls >= LOOKS - 1 {
            return Ok(Step::new(Outcome::Done).with(EventKind::ResourceCreated {
                id: "/subscriptions/x/snapshot".into(),
            }));
        }
        let mut again = message.clone();
        again.operation = Some(sigrun::model::envelope::InFlight {
            what: sigrun::model::envelope::Phase::Snapshots,
            status_urls: Vec::new(),
            started: now,
            not_before: now,
            polls,
            progress: Default::default(),
        });
        Ok(Step::new(Outcome::Wait {
            message: Box::new(again),
            delay: Duration::from_millis(150),
            emit: Vec::new(),
        }))
    }
}

/// The AMQP bus, counting what goes on a delay tier.
struct CountingDelays {
    bus: Arc<AmqpBus>,
    delayed: std::sync::atomic::AtomicU32,
}

#[async_trait]
impl Bus for CountingDelays {
    async fn publish(&self, stage: Stage, body: &[u8], traceparent: Option<&str>) -> Result<(), BusError> {
        self.bus.publish(stage, body, traceparent).await
    }
    async fn publish_delayed(
        &self,
        stage: Stage,
        body: &[u8],
        delay: Duration,
        traceparent: Option<&str>,
    ) -> Result<(), BusError> {
        self.delayed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.bus.publish_delayed(stage, body, delay, traceparent).await
    }
    async fn park(&self, body: &[u8], reason: &ParkReason) -> Result<(), BusError> {
        self.bus.park(body, reason).await
    }
    async fn publish_record(&self, record: &sigrun::ledger::record::Record) -> Result<(), BusError> {
        self.bus.publish_record(record).await
    }
    async fn open_history(&self, from: StreamOffset) -> Result<Box<dyn sigrun::bus::HistoryReader>, BusError> {
        self.bus.open_history(from).await
    }
    async fn next(&self, stages: &[Stage]) -> Option<Delivery> {
        self.bus.next(stages).await
    }
}

/// Runs `SlowSnapshot` on the broker until its event is read, closing the bus's connection from
/// the broker's side after `close_after` looks (0: never). Returns the looks and the tier publishes.
async fn held_wait_run(close_after: u32) -> (u32, u32) {
    let prefix = prefix();
    let bus = Arc::new(connect(&prefix).await);
    let counting = Arc::new(CountingDelays {
        bus: Arc::clone(&bus),
        delayed: Default::default(),
    });
    let handler = Arc::new(SlowSnapshot {
        looks: Default::default(),
    });
    let settings = RuntimeSettings {
        consumers: 2,
        tiers: tiers(),
        shutdown_grace: Duration::from_secs(5),
        ..RuntimeSettings::default()
    };
    let runtime = Runtime::new(
        Arc::clone(&counting) as Arc<dyn Bus>,
        Arc::clone(&handler) as Arc<dyn Handler>,
        vec![Stage::Snapshot],
        settings,
    )
    .unwrap();
    let first = first_message();
    bus.publish(Stage::Snapshot, &first.encode(), None).await.unwrap();
    let running = runtime.spawn();
    if close_after > 0 {
        let looked = timeout(WAIT, async {
            while handler.looks.load(std::sync::atomic::Ordering::SeqCst) < close_after {
                sleep(Duration::from_millis(10)).await;
            }
        });
        looked.await.expect("the first looks");
        assert_eq!(close_connections_of(&prefix), 1);
        bus.connected(1).await.expect("reconnected");
    }
    let mut reader = bus.read_events(StreamOffset::First).await.unwrap();
    let got = timeout(WAIT, reader.next())
        .await
        .expect("the snapshot's event")
        .unwrap()
        .unwrap();
    assert_eq!(got.event.run_id, first.run_id);
    assert!(matches!(got.event.kind, EventKind::ResourceCreated { .. }));
    reader.close().await;
    let report = timeout(WAIT, running.stop()).await.unwrap().unwrap();
    assert_eq!(report.abandoned, 0);
    let delayed = counting.delayed.load(std::sync::atomic::Ordering::SeqCst);
    drop(counting);
    let looks = handler.looks.load(std::sync::atomic::Ordering::SeqCst);
    let bus = Arc::into_inner(bus).expect("the runtime let go of the bus");
    teardown(bus).await;
    (looks, delayed)
}

#[tokio::test]
async fn a_wait_that_records_nothing_stays_with_its_worker_and_never_goes_round_a_tier() {
    let (looks, delayed) = held_wait_run(0).await;
    assert_eq!((looks, delayed), (LOOKS, 0), "every look held with its delivery");
}

#[tokio::test]
async fn a_held_wait_whose_connection_closes_is_looked_at_again_from_its_redelivery() {
    let (looks, delayed) = held_wait_run(3).await;
    // The redelivered message is as it was published: its looks start over, and the run ends.
    assert!(looks > LOOKS, "looked {looks} times");
    assert_eq!(delayed, 0);
}

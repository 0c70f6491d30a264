//! Stage-to-stage hand-off latency on RabbitMQ, beside the broker's own publish→consume round trip
//! (goal: hand-off p50 ≤ 2 ms, p99 ≤ 10 ms).
//!
//! **Hand-off**: from the moment a stage's handler returns "advance to the next stage" to the moment
//! the next stage's handler receives the message, through the real `Runtime` on the real `AmqpBus`:
//! the runtime turns the outcome into effects, encodes the envelope, publishes it with a confirm
//! (after the step's events, when it has any), the broker routes it into the next stage's quorum
//! queue, the bus's consumer hands it to a runtime consumer, which decodes it, checks it is due and
//! calls the handler. One runtime consumes both stages (`snapshot` → `image-create`) with the
//! worker's default settings (`runtime.consumers`, `amqp.prefetch`); the handler's steps return at
//! once. The message is the nightly pipeline's real first envelope (planned against an in-process
//! emulator). Messages go one at a time: the next is published only after the previous reached
//! the second stage. Two rows: a step with no event, and a step with one event (as most of the
//! stages' advancing steps have: the event is published and confirmed before the message).
//!
//! **Bare lapin**: the same broker, in the same run, no sigrun code: a quorum queue of its own,
//! a body of the envelope's size published persistent with a confirm on one channel and consumed with
//! manual acks (prefetch as the bus's) on another, one at a time; measured from the publish call to
//! the consumer's receipt (the confirm is awaited before the next message, and its own latency is
//! printed too).
//!
//! The rows take turns message by message (bare, hand-off, hand-off with an event), so a change
//! in the load of the machine (it is shared) falls on each alike. Also printed: what encoding,
//! decoding and cloning the envelope cost here (our code on the hand-off's path, without the
//! broker).
//!
//! `cargo bench --bench amqp_handoff`; `SIGRUN_BENCH_SAMPLES` (default 2000, after 200 warm-up
//! messages per row), `SIGRUN_BENCH_AMQP_URL` (default the local broker). Uses its own prefix on the
//! broker and deletes it at the end.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use sigrun::azure::AzureError;
use sigrun::bus::Bus;
use sigrun::bus::amqp::AmqpBus;
use sigrun::events::EventKind;
use sigrun::model::envelope::{Envelope, Stage};
use sigrun::runtime::{Handler, Runtime};
use sigrun::stages::{Outcome, Step};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use uuid::Uuid;

use common::{Stats, ms};

const WARMUP: usize = 200;
/// No single hand-off should come near this; a message not arriving within it fails the bench.
const LIMIT: Duration = Duration::from_secs(10);

fn main() {
    if !common::measuring("amqp_handoff") {
        return;
    }
    let samples: usize = common::env_or("SIGRUN_BENCH_SAMPLES", 2000);
    let runtime = common::runtime();
    runtime.block_on(bench(samples));
}

async fn bench(samples: usize) {
    let envelope = common::nightly_envelope().await;
    let body = envelope.encode();
    let prefix = common::prefix("handoff");
    println!("== stage hand-off on RabbitMQ ({})", common::machine());
    println!(
        "broker {} (prefix {prefix}); envelope {} bytes; {samples} messages per row after {WARMUP} warm-up, \
         the rows taking turns message by message",
        common::amqp_settings(&prefix).redacted_url(),
        body.len()
    );

    let mut bare = BareLapin::open(&prefix, body.len()).await;
    let mut staged = Staged::start(&prefix).await;
    let (mut round_trip, mut confirm, mut handoff, mut handoff_event) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // One message of each kind in turn, so a change in the machine's load (it is shared) falls on
    // every row alike.
    for i in 0..WARMUP + samples {
        let (r, c) = bare.one().await;
        let h = staged.one(&envelope, false).await;
        let e = staged.one(&envelope, true).await;
        if i >= WARMUP {
            round_trip.push(r);
            confirm.push(c);
            handoff.push(h);
            handoff_event.push(e);
        }
    }
    bare.close().await;
    staged.stop().await;
    let (encode, decode, clone) = codec(&envelope);
    let (round_trip, confirm, handoff, handoff_event) = (
        Stats::new(round_trip),
        Stats::new(confirm),
        Stats::new(handoff),
        Stats::new(handoff_event),
    );

    println!();
    println!(
        "{:<44} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "ms", "p50", "p90", "p99", "max", "mean"
    );
    let row = |name: &str, s: &Stats| {
        println!(
            "{:<44} {:>8} {:>8} {:>8} {:>8} {:>8}",
            name,
            ms(s.pct(50.0)),
            ms(s.pct(90.0)),
            ms(s.pct(99.0)),
            ms(s.max()),
            ms(s.mean())
        );
    };
    row("bare lapin: publish → consumer receives", &round_trip);
    row("bare lapin: publish → confirm", &confirm);
    row("hand-off: step without events", &handoff);
    row("hand-off: step with one event", &handoff_event);
    println!(
        "envelope encode {:.1} µs, decode {:.1} µs, clone {:.1} µs (mean of 1000, this process)",
        encode.as_secs_f64() * 1e6,
        decode.as_secs_f64() * 1e6,
        clone.as_secs_f64() * 1e6
    );
    let (p50, p99) = (handoff.pct(50.0), handoff.pct(99.0));
    let over = |ours: Duration, bare: Duration| ours.as_secs_f64() * 1000.0 - bare.as_secs_f64() * 1000.0;
    println!(
        "\nHAND-OFF p50 {} ms (goal ≤ 2), p99 {} ms (goal ≤ 10): {}; against bare lapin p50 {:+.3} ms, p99 {:+.3} ms",
        ms(p50),
        ms(p99),
        if p50 <= Duration::from_millis(2) && p99 <= Duration::from_millis(10) {
            "met"
        } else {
            "NOT MET"
        },
        over(p50, round_trip.pct(50.0)),
        over(p99, round_trip.pct(99.0)),
    );
}

/// Publish with confirm → consume with manual ack on a quorum queue of its own, no sigrun code.
struct BareLapin {
    connection: lapin::Connection,
    publisher: lapin::Channel,
    /// Closed before the queue is deleted: a consumer still open on it races the broker's cancel
    /// against its own, and lapin ends the connection on the stray cancel-ok.
    consumer_channel: lapin::Channel,
    queue: String,
    body: Vec<u8>,
    arrivals: mpsc::UnboundedReceiver<Instant>,
    consuming: tokio::task::JoinHandle<()>,
}

impl BareLapin {
    async fn open(prefix: &str, size: usize) -> BareLapin {
        let connection = common::raw_connection().await;
        let queue = format!("{prefix}.bare");
        let publisher = connection.create_channel().await.expect("channel");
        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        publisher
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .expect("declare the bare queue");
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let consumer_channel = connection.create_channel().await.expect("channel");
        consumer_channel
            .basic_qos(
                common::worker_defaults().amqp.prefetch,
                BasicQosOptions { global: false },
            )
            .await
            .expect("qos");
        let mut consumer = consumer_channel
            .basic_consume(
                queue.as_str().into(),
                "bare".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let (received, arrivals) = mpsc::unbounded_channel::<Instant>();
        let consuming = tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let at = Instant::now();
                delivery.acker.ack(BasicAckOptions::default()).await.expect("ack");
                if received.send(at).is_err() {
                    break;
                }
            }
        });
        BareLapin {
            connection,
            publisher,
            consumer_channel,
            queue,
            body: vec![b'x'; size],
            arrivals,
            consuming,
        }
    }

    /// One message: (publish → consumer receives, publish → confirm).
    async fn one(&mut self) -> (Duration, Duration) {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let sent = Instant::now();
        let confirmation = self
            .publisher
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                &self.body,
                properties,
            )
            .await
            .expect("publish");
        let arrivals = &mut self.arrivals;
        let (confirmed, arrived) = tokio::join!(
            async {
                let ack = confirmation.await.expect("confirm");
                assert!(ack.is_ack(), "the broker confirms the bare publish");
                Instant::now()
            },
            async {
                tokio::time::timeout(LIMIT, arrivals.recv())
                    .await
                    .expect("the bare message arrives")
                    .expect("the consumer runs")
            }
        );
        (arrived - sent, confirmed - sent)
    }

    /// Cancels the consumer and waits for the broker's cancel-ok before closing anything:
    /// aborting the consuming task drops lapin's consumer, which cancels it in the background,
    /// and a cancel-ok that arrives once its channel is closing ends the connection
    /// (UNEXPECTEDFRAME: "unexpected basic cancel-ok received on channel 2").
    async fn close(self) {
        self.consumer_channel
            .basic_cancel("bare".into(), BasicCancelOptions::default())
            .await
            .expect("cancel the bare consumer");
        // Its stream ends with the cancel-ok; the task then returns on its own.
        if tokio::time::timeout(LIMIT, self.consuming).await.is_err() {
            panic!("the bare consumer did not end after its cancel");
        }
        let _ = self.consumer_channel.close(200, "bench done".into()).await;
        self.publisher
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete the bare queue");
        let _ = self.connection.close(200, "bench done".into()).await;
    }
}

/// `snapshot` advances at once to `image-create`, which records the arrival and is done.
struct Relay {
    with_event: AtomicBool,
    /// When the first stage's handler returned, for the message in flight.
    returned: Mutex<Option<Instant>>,
    arrived: mpsc::UnboundedSender<(Uuid, Instant)>,
}

#[async_trait]
impl Handler for Relay {
    async fn handle(
        &self,
        message: Envelope,
        _now: time::OffsetDateTime,
        _: sigrun::stages::Tried,
    ) -> Result<Step, AzureError> {
        match message.stage {
            Stage::Snapshot => {
                let next = message.next(Stage::ImageCreate, OffsetDateTime::now_utc());
                let mut step = Step::new(Outcome::Advance(vec![next]));
                if self.with_event.load(Ordering::Relaxed) {
                    step = step.with(EventKind::Throttled { retry_after_ms: None });
                }
                *self.returned.lock().expect("lock") = Some(Instant::now());
                Ok(step)
            }
            Stage::ImageCreate => {
                let at = Instant::now();
                let _ = self.arrived.send((message.run_id, at));
                Ok(Step::new(Outcome::Done))
            }
            other => panic!("the bench publishes nothing to {other}"),
        }
    }
}

/// One runtime consuming both stages on the bus, as a worker of both would.
struct Staged {
    bus: Arc<AmqpBus>,
    relay: Arc<Relay>,
    arrivals: mpsc::UnboundedReceiver<(Uuid, Instant)>,
    running: sigrun::runtime::Running,
}

impl Staged {
    async fn start(prefix: &str) -> Staged {
        let defaults = common::worker_defaults();
        let bus = Arc::new(common::connect(common::amqp_settings(prefix), defaults.runtime.tiers.clone()).await);
        let (arrived, arrivals) = mpsc::unbounded_channel();
        let relay = Arc::new(Relay {
            with_event: AtomicBool::new(false),
            returned: Mutex::new(None),
            arrived,
        });
        let runtime = Runtime::new(
            Arc::clone(&bus) as Arc<dyn Bus>,
            Arc::clone(&relay) as Arc<dyn Handler>,
            vec![Stage::Snapshot, Stage::ImageCreate],
            defaults.runtime.clone(),
        )
        .expect("the default runtime settings are valid");
        let running = runtime.spawn();
        Staged {
            bus,
            relay,
            arrivals,
            running,
        }
    }

    /// One hand-off: the first stage's message published, then the time from its handler's
    /// return to the second stage's handler.
    async fn one(&mut self, envelope: &Envelope, with_event: bool) -> Duration {
        self.relay.with_event.store(with_event, Ordering::Relaxed);
        let mut message = envelope.clone();
        message.message_id = Uuid::new_v4();
        message.run_id = Uuid::new_v4();
        self.bus
            .publish(Stage::Snapshot, &message.encode(), None)
            .await
            .expect("publish the first stage's message");
        let (run, at) = tokio::time::timeout(LIMIT, self.arrivals.recv())
            .await
            .expect("the message reaches the second stage")
            .expect("the runtime runs");
        assert_eq!(run, message.run_id, "messages go one at a time");
        let returned = self
            .relay
            .returned
            .lock()
            .expect("lock")
            .take()
            .expect("the first stage ran before the second");
        at - returned
    }

    async fn stop(self) {
        let report = self.running.stop().await.expect("the runtime stops");
        assert_eq!(report.abandoned, 0, "nothing left unfinished");
        drop(self.relay);
        let bus = Arc::into_inner(self.bus).expect("the runtime let go of the bus");
        common::teardown(bus).await;
    }
}

/// Mean time to encode, to decode and to clone the envelope.
fn codec(envelope: &Envelope) -> (Duration, Duration, Duration) {
    const N: u32 = 1000;
    let started = Instant::now();
    let mut body = Vec::new();
    for _ in 0..N {
        body = std::hint::black_box(envelope.encode());
    }
    let encode = started.elapsed() / N;
    let started = Instant::now();
    for _ in 0..N {
        std::hint::black_box(Envelope::decode(&body).expect("decodes"));
    }
    let decode = started.elapsed() / N;
    let started = Instant::now();
    for _ in 0..N {
        std::hint::black_box(envelope.clone());
    }
    (encode, decode, started.elapsed() / N)
}

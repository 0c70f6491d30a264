//! What each kind of broker operation sigrun uses costs RabbitMQ's CPU, one kind at a time, so a
//! change to how sigrun talks to the broker can be priced before it is made. Printed per
//! operation: the broker's CPU (`beam.smp`'s utime + stime over the timed part, less what it
//! spent idle over as long just before), and then the nightly pipeline's bill as
//! `cargo bench --bench concurrent` counts its operations, beside what that bench measures.
//!
//! - **connect (declaring)**: `AmqpBus::connect` on a declared prefix and `close`: what a worker
//!   or command pays per connection (open, the whole topology declared again, close).
//! - **connect (to publish)**: `AmqpBus::connect_to_publish` on the same prefix and `close`: what
//!   `sigrun submit` pays (open, one passive look, close).
//! - **quorum message**: a persistent nightly-sized body (7.7 KB) published with a confirm to a
//!   quorum queue, one at a time as a stage's consumer does, then delivered and acked one by one:
//!   a stage hand-off.
//! - **stream record**: a ledger-sized record (600 bytes) published with a confirm to a stream,
//!   one at a time: a claim, a commit or a note.
//! - **stream delivery**: one reader taking those records from the first, with the events
//!   reader's window (`events::WINDOW` unacked, acked `ACK_EVERY` at a time): what each reader of
//!   the history costs.
//! - **stream record, trickled**: seven readers following the stream live (six workers and a
//!   watcher, as in `concurrent`) while records are published one every 2 ms, as the steps of
//!   100 pipelines come: a record's publish and its seven deliveries, beside the same priced
//!   back to back (the rows above).
//!
//! `cargo bench --bench broker_costs`; `SIGRUN_BENCH_MESSAGES` (default 2000; connections a
//! twentieth of it), `SIGRUN_BENCH_AMQP_URL`, `SIGRUN_BENCH_BROKER_PID`. Uses its own prefix and
//! deletes it at the end.

mod common;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use sigrun::bus::amqp::AmqpBus;
use sigrun::bus::amqp::events::{ACK_EVERY, WINDOW};

const PERSISTENT: u8 = 2;
/// The history's readers in `concurrent`: six workers and the bench's own.
const READERS: u16 = 7;

/// What the concurrent bench counts per nightly pipeline (its broker counters, 2026-12-06).
const PIPELINE_QUORUM_MESSAGES: f64 = 25.0;
const PIPELINE_STREAM_RECORDS: f64 = 35.0;
const PIPELINE_STREAM_DELIVERIES: f64 = 245.0;
const PIPELINE_SUBMITS: f64 = 1.0;

fn main() {
    if !common::measuring("broker_costs") {
        return;
    }
    let messages: usize = common::env_or("SIGRUN_BENCH_MESSAGES", 2000);
    let broker = common::workers::broker_pid().expect(
        "no RabbitMQ beam.smp found to measure: start it with `rabbitmq-server -detached`, or set \
         SIGRUN_BENCH_BROKER_PID",
    );
    common::runtime().block_on(bench(broker, messages));
}

/// The broker's CPU over `work`, less its idle rate over a span as long just before, per item.
struct Meter {
    broker: u32,
    ticks: f64,
}

impl Meter {
    async fn per_item<F: Future<Output = ()>>(&self, items: usize, work: F) -> Duration {
        self.per_item_keeping(items, work).await.0
    }

    /// As [`Meter::per_item`], handing back what `work` returns. Consumers come back this way so
    /// they outlive their queue: dropped, lapin cancels them, and RabbitMQ 3.10 here once crashed
    /// the channel on a quorum consumer's cancel, taking the connection with it.
    async fn per_item_keeping<T, F: Future<Output = T>>(&self, items: usize, work: F) -> (Duration, T) {
        let idle = self.idle(Duration::from_millis(500)).await;
        let before = common::cpu_time(self.broker, self.ticks);
        let started = Instant::now();
        let kept = work.await;
        let wall = started.elapsed();
        let spent = common::cpu_time(self.broker, self.ticks).saturating_sub(before);
        let idle_share = idle.mul_f64(wall.as_secs_f64() / 0.5);
        let each = spent.saturating_sub(idle_share) / u32::try_from(items).expect("a count that fits");
        (each, kept)
    }

    async fn idle(&self, span: Duration) -> Duration {
        let before = common::cpu_time(self.broker, self.ticks);
        tokio::time::sleep(span).await;
        common::cpu_time(self.broker, self.ticks).saturating_sub(before)
    }
}

async fn bench(broker: u32, messages: usize) {
    let meter = Meter {
        broker,
        ticks: common::clock_ticks(),
    };
    let prefix = common::prefix("broker-costs");
    let settings = common::amqp_settings(&prefix);
    let tiers = common::worker_defaults().runtime.tiers;
    println!(
        "== the broker's CPU per operation ({messages} messages, {} connections; {})",
        messages / 20,
        common::machine()
    );
    // Declared once, so both connects meet a declared prefix.
    AmqpBus::connect(settings.clone(), tiers.clone())
        .await
        .expect("RabbitMQ answers: start it with `rabbitmq-server -detached`")
        .close()
        .await;
    let connections = (messages / 20).max(1);
    let declaring = meter
        .per_item(connections, async {
            for _ in 0..connections {
                AmqpBus::connect(settings.clone(), tiers.clone())
                    .await
                    .unwrap()
                    .close()
                    .await;
            }
        })
        .await;
    let publishing = meter
        .per_item(connections, async {
            for _ in 0..connections {
                let bus = AmqpBus::connect_to_publish(settings.clone(), tiers.clone())
                    .await
                    .unwrap();
                bus.close().await;
            }
        })
        .await;

    let connection = Connection::connect(&settings.url, ConnectionProperties::default())
        .await
        .expect("a plain connection");
    let (quorum, quorum_delivery) = publish_then_take(&meter, &connection, &prefix, Kind::Quorum, messages).await;
    let (record, delivery) = publish_then_take(&meter, &connection, &prefix, Kind::Stream, messages).await;
    let trickled = trickled_record(&meter, &connection, &prefix, messages / 4).await;
    let _ = connection.close(200, "measured".into()).await;
    AmqpBus::delete_topology(&settings, &tiers)
        .await
        .expect("delete the bench topology");

    let rows = [
        ("connect (declaring), per connection", declaring),
        ("connect (to publish), per connection", publishing),
        ("quorum message: publish, confirmed", quorum),
        ("quorum message: delivery and ack", quorum_delivery),
        ("stream record: publish, confirmed", record),
        ("stream delivery, per reader", delivery),
        ("stream record, trickled, with 7 live readers", trickled),
    ];
    println!("\n{:<48}{:>12}", "", "broker CPU");
    for (name, cost) in rows {
        println!("{name:<48}{:>9.3} ms", ms(cost));
    }
    println!(
        "(a trickled record with its deliveries / the same back to back: {:.2})",
        ms(trickled) / (ms(record) + f64::from(READERS) * ms(delivery))
    );
    println!("\na nightly pipeline's operations (as `concurrent` counts them), priced:");
    let quorum_bill = PIPELINE_QUORUM_MESSAGES * (ms(quorum) + ms(quorum_delivery));
    let submit_bill = PIPELINE_SUBMITS * ms(publishing);
    let back_to_back = PIPELINE_STREAM_RECORDS * ms(record) + PIPELINE_STREAM_DELIVERIES * ms(delivery);
    let trickle = PIPELINE_STREAM_RECORDS * ms(trickled);
    let lines = [
        (format!("{PIPELINE_QUORUM_MESSAGES:.0} quorum messages"), quorum_bill),
        (format!("{PIPELINE_SUBMITS:.0} submit's connection"), submit_bill),
        (
            format!(
                "{PIPELINE_STREAM_RECORDS:.0} stream records, {PIPELINE_STREAM_DELIVERIES:.0} deliveries, back to back"
            ),
            back_to_back,
        ),
        ("the same records trickled".to_string(), trickle),
    ];
    for (name, cost) in &lines {
        println!("  {name:<56}{cost:>7.1} ms");
    }
    println!(
        "  all: {:.1} ms back to back, {:.1} ms trickled (set beside `concurrent`'s broker share)",
        quorum_bill + submit_bill + back_to_back,
        quorum_bill + submit_bill + trickle
    );
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

async fn confirm_channel(connection: &Connection) -> Channel {
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    channel
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// The two kinds of queue sigrun's messages go through, as its own code uses them.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A stage's quorum queue: nightly envelopes (7.7 KB), taken with a stage consumer's prefetch
    /// and acked one by one.
    Quorum,
    /// The history stream: ledger records (600 bytes), taken with the events reader's window and
    /// acked [`ACK_EVERY`] at a time.
    Stream,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Quorum => "quorum",
            Kind::Stream => "stream",
        }
    }

    fn body_bytes(self) -> usize {
        match self {
            Kind::Quorum => 7_700,
            Kind::Stream => 600,
        }
    }

    fn prefetch(self) -> u16 {
        match self {
            Kind::Quorum => common::worker_defaults().amqp.prefetch,
            Kind::Stream => WINDOW,
        }
    }

    fn ack_every(self) -> usize {
        match self {
            Kind::Quorum => 1,
            Kind::Stream => usize::from(ACK_EVERY),
        }
    }
}

/// A confirm channel on which `queue` of `kind` is declared.
async fn declared(connection: &Connection, queue: &str, kind: Kind) -> Channel {
    let channel = confirm_channel(connection).await;
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString(kind.name().into()));
    channel.queue_declare(queue.into(), durable(), arguments).await.unwrap();
    channel
}

/// Publishes `count` bodies of `bytes` to `queue` one at a time, each confirmed, `gap` apart.
async fn publish_each(channel: &Channel, queue: &str, count: usize, bytes: usize, gap: Duration) {
    let body = vec![b'x'; bytes];
    for _ in 0..count {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(PERSISTENT),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "the broker refused a publish to {queue}");
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
    }
}

/// A consumer of `queue` as `kind`'s consumers take it; a stream is read from `offset` (`first`,
/// `next`).
async fn consume(connection: &Connection, queue: &str, kind: Kind, offset: &str, tag: &str) -> Consumer {
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_qos(kind.prefetch(), BasicQosOptions::default())
        .await
        .unwrap();
    let mut arguments = FieldTable::default();
    if let Kind::Stream = kind {
        arguments.insert("x-stream-offset".into(), AMQPValue::LongString(offset.into()));
    }
    channel
        .basic_consume(queue.into(), tag.into(), BasicConsumeOptions::default(), arguments)
        .await
        .unwrap()
}

/// Takes `count` deliveries from `consumer`, acking as `kind`'s consumers do.
async fn take(consumer: &mut Consumer, kind: Kind, count: usize) {
    let every = kind.ack_every();
    for n in 1..=count {
        let delivery = consumer.next().await.expect("a delivery").unwrap();
        if n % every == 0 || n == count {
            delivery.ack(BasicAckOptions { multiple: every > 1 }).await.unwrap();
        }
    }
}

async fn delete(channel: &Channel, queue: &str) {
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

/// A queue of `kind`: the broker's CPU per confirmed publish, one at a time as a stage's
/// consumer publishes, then per delivery to one consumer.
async fn publish_then_take(
    meter: &Meter,
    connection: &Connection,
    prefix: &str,
    kind: Kind,
    count: usize,
) -> (Duration, Duration) {
    let queue = format!("{prefix}.{}", kind.name());
    let channel = declared(connection, &queue, kind).await;
    let bytes = kind.body_bytes();
    let publish = meter
        .per_item(count, publish_each(&channel, &queue, count, bytes, Duration::ZERO))
        .await;
    let (deliver, consumer) = meter
        .per_item_keeping(count, async {
            let mut consumer = consume(connection, &queue, kind, "first", "bench").await;
            take(&mut consumer, kind, count).await;
            consumer
        })
        .await;
    delete(&channel, &queue).await;
    drop(consumer);
    (publish, deliver)
}

/// A record published every 2 ms to a stream seven readers follow live: the broker's CPU per
/// record, its deliveries included.
async fn trickled_record(meter: &Meter, connection: &Connection, prefix: &str, count: usize) -> Duration {
    let stream = format!("{prefix}.trickle");
    let channel = declared(connection, &stream, Kind::Stream).await;
    let mut readers = Vec::new();
    for n in 0..READERS {
        let mut consumer = consume(connection, &stream, Kind::Stream, "next", &format!("reader-{n}")).await;
        readers.push(tokio::spawn(async move {
            take(&mut consumer, Kind::Stream, count).await;
            consumer
        }));
    }
    let bytes = Kind::Stream.body_bytes();
    let (cost, consumers) = meter
        .per_item_keeping(count, async {
            publish_each(&channel, &stream, count, bytes, Duration::from_millis(2)).await;
            let mut consumers = Vec::new();
            for reader in readers {
                consumers.push(reader.await.expect("a reader got every record"));
            }
            consumers
        })
        .await;
    delete(&channel, &stream).await;
    drop(consumers);
    cost
}

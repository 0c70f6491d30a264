//! Messages per second through one stage on RabbitMQ, beside the broker's own rate for the same
//! message size.
//!
//! **Stage**: the real `Runtime` on the real `AmqpBus` with the worker's default settings
//! (`runtime.consumers` deliveries handled at once, `amqp.prefetch`), consuming `snapshot` with a
//! handler whose step returns at once (as if every Azure call answered instantly) and advances each
//! message to `image-create`. Per message that is what a stage always does: take the delivery,
//! decode the envelope, run the step, encode and publish the next message with a confirm, ack.
//! `SIGRUN_BENCH_MESSAGES` nightly envelopes are put on the `snapshot` queue first (not timed);
//! the clock runs from the handler's first call until the last message has landed on
//! `image-create` (its queue's count, read every 5 ms).
//!
//! **Broker**: no sigrun code: lapin publishes bodies of the envelope's size, persistent, to a
//! quorum queue of its own with `W` publishes awaiting their confirms at once, while a consumer on
//! another channel (prefetch as the bus's) acks each delivery; timed from the first publish until
//! the consumer has the last message. The broker does the same work per message as for the stage
//! (accept a confirmed persistent publish into a quorum queue, deliver one, take its ack). Two
//! rows: `W` = `runtime.consumers` (the stage's own concurrency: each consumer awaits one
//! confirm at a time) and `W` = 64 (what the broker can take with a deep pipeline).
//!
//! Rounds alternate stage and broker (`SIGRUN_BENCH_ROUNDS`, default 3); the table shows each
//! round and the median, and the ratio of the medians. Beside each rate: this process's CPU time
//! (user + system) per message over the timed part, which splits what a stage costs its worker
//! into the client library's share (the broker rows) and ours.
//!
//! `cargo bench --bench amqp_throughput`; `SIGRUN_BENCH_MESSAGES` (default 5000),
//! `SIGRUN_BENCH_AMQP_URL`. Uses its own prefix on the broker and deletes it at the end.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use sigrun::azure::AzureError;
use sigrun::bus::Bus;
use sigrun::bus::amqp::topology::Names;
use sigrun::model::envelope::{Envelope, Stage};
use sigrun::runtime::{Handler, Runtime};
use sigrun::stages::{Outcome, Step};
use time::OffsetDateTime;
use uuid::Uuid;

/// A round taking longer than this has stalled.
const LIMIT: Duration = Duration::from_secs(300);
const DEEP: usize = 64;

fn main() {
    if !common::measuring("amqp_throughput") {
        return;
    }
    let messages: usize = common::env_or("SIGRUN_BENCH_MESSAGES", 5000);
    let rounds: usize = common::env_or("SIGRUN_BENCH_ROUNDS", 3);
    let runtime = common::runtime();
    runtime.block_on(bench(messages, rounds));
}

async fn bench(messages: usize, rounds: usize) {
    let envelope = common::nightly_envelope().await;
    let size = envelope.encode().len();
    let defaults = common::worker_defaults();
    let consumers = defaults.runtime.consumers;
    let prefix = common::prefix("throughput");
    println!(
        "== messages per second through a stage on RabbitMQ ({})",
        common::machine()
    );
    println!(
        "broker {} (prefix {prefix}); envelope {size} bytes; {messages} messages per round; \
         runtime.consumers {consumers}, amqp.prefetch {}",
        common::amqp_settings(&prefix).redacted_url(),
        defaults.amqp.prefetch
    );

    let raw = common::raw_connection().await;
    let bare_queue = format!("{prefix}.bare");
    declare_quorum(&raw, &bare_queue).await;

    let ticks = common::clock_ticks();
    let (mut stage, mut shallow, mut deep) = (Rounds::default(), Rounds::default(), Rounds::default());
    for round in 1..=rounds {
        let s = through_stage(&prefix, &raw, &envelope, messages, ticks).await;
        let b = broker(&raw, &bare_queue, size, messages, consumers, ticks).await;
        let d = broker(&raw, &bare_queue, size, messages, DEEP, ticks).await;
        println!(
            "round {round}: stage {:.0} msg/s, broker W={consumers} {:.0} msg/s, broker W={DEEP} {:.0} msg/s",
            s.per_second, b.per_second, d.per_second
        );
        stage.add(s);
        shallow.add(b);
        deep.add(d);
    }

    let (s, b, d) = (stage.median(), shallow.median(), deep.median());
    println!();
    println!(
        "{:<58} {:>10} {:>16}",
        "median of the rounds", "msg/s", "client CPU/msg"
    );
    let row = |name: String, rate: &Rate| {
        println!(
            "{:<58} {:>10.0} {:>13.0} µs",
            name,
            rate.per_second,
            rate.cpu_per_message.as_secs_f64() * 1e6
        );
    };
    row("stage (Runtime + AmqpBus, step returns at once)".into(), &s);
    row(
        format!("broker: lapin, {consumers} confirms in flight + manual-ack consumer"),
        &b,
    );
    row(
        format!("broker: lapin, {DEEP} confirms in flight + manual-ack consumer"),
        &d,
    );
    println!("(client CPU/msg: this process's user + system time over the timed part, per message)");
    let (s, b, d) = (s.per_second, b.per_second, d.per_second);
    println!(
        "\nSTAGE / BROKER: {:.2} at the same concurrency ({consumers} in flight), {:.2} against {DEEP} in flight",
        s / b,
        s / d
    );

    let channel = raw.create_channel().await.expect("channel");
    channel
        .queue_delete(bare_queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the bare queue");
    let _ = raw.close(200, "bench done".into()).await;
    sigrun::bus::amqp::AmqpBus::delete_topology(&common::amqp_settings(&prefix), &defaults.runtime.tiers)
        .await
        .expect("delete the bench topology");
}

async fn declare_quorum(connection: &lapin::Connection, queue: &str) {
    let channel = connection.create_channel().await.expect("channel");
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .expect("declare the bare queue");
}

/// Messages on `queue` (ready), by a passive declare.
async fn ready(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the queue exists")
        .message_count()
}

/// Advances every message at once and notes when it was first called.
struct Pass {
    first_call: OnceLock<Instant>,
    calls: AtomicU64,
}

#[async_trait]
impl Handler for Pass {
    async fn handle(
        &self,
        message: Envelope,
        _now: time::OffsetDateTime,
        _: sigrun::stages::Tried,
    ) -> Result<Step, AzureError> {
        self.first_call.get_or_init(Instant::now);
        self.calls.fetch_add(1, Ordering::Relaxed);
        let next = message.next(Stage::ImageCreate, OffsetDateTime::now_utc());
        Ok(Step::new(Outcome::Advance(vec![next])))
    }
}

/// Messages per second through the `snapshot` stage, on a bus of its own (closed at the end, so
/// no consumer of this round holds a delivery into the next).
async fn through_stage(prefix: &str, raw: &lapin::Connection, envelope: &Envelope, n: usize, ticks: f64) -> Rate {
    let defaults = common::worker_defaults();
    let bus = Arc::new(common::connect(common::amqp_settings(prefix), defaults.runtime.tiers.clone()).await);
    let names = Names::new(prefix);
    let (input, output) = (
        names.stage_queue(Stage::Snapshot),
        names.stage_queue(Stage::ImageCreate),
    );
    let channel = raw.create_channel().await.expect("channel");
    channel
        .queue_purge(output.as_str().into(), QueuePurgeOptions::default())
        .await
        .expect("purge the output queue");

    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|_| {
            let mut message = envelope.clone();
            message.message_id = Uuid::new_v4();
            message.run_id = Uuid::new_v4();
            message.encode()
        })
        .collect();
    futures_util::stream::iter(bodies.iter())
        .map(|body| bus.publish(Stage::Snapshot, body, None))
        .buffer_unordered(DEEP)
        .for_each(|published| async move { published.expect("fill the input queue") })
        .await;
    assert_eq!(ready(&channel, &input).await as usize, n, "the input queue is filled");

    let pass = Arc::new(Pass {
        first_call: OnceLock::new(),
        calls: AtomicU64::new(0),
    });
    let runtime = Runtime::new(
        Arc::clone(&bus) as Arc<dyn Bus>,
        Arc::clone(&pass) as Arc<dyn Handler>,
        vec![Stage::Snapshot],
        defaults.runtime,
    )
    .expect("the default runtime settings are valid");
    let cpu_before = common::cpu_time(std::process::id(), ticks);
    let running = runtime.spawn();
    let deadline = Instant::now() + LIMIT;
    loop {
        if ready(&channel, &output).await as usize >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stage did not pass {n} messages within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done = Instant::now();
    let cpu = common::cpu_time(std::process::id(), ticks) - cpu_before;
    let report = running.stop().await.expect("the runtime stops");
    assert_eq!(report.abandoned, 0, "nothing left unfinished");
    assert_eq!(ready(&channel, &input).await, 0, "every input was taken");
    assert!(
        pass.calls.load(Ordering::Relaxed) >= n as u64,
        "every message went through the handler"
    );
    Arc::into_inner(bus)
        .expect("the runtime let go of the bus")
        .close()
        .await;
    let elapsed = done - *pass.first_call.get().expect("the handler ran");
    Rate::of(n, elapsed, cpu)
}

/// The broker's own rate: `in_flight` confirmed publishes at a time, one manual-ack consumer.
async fn broker(raw: &lapin::Connection, queue: &str, size: usize, n: usize, in_flight: usize, ticks: f64) -> Rate {
    let publisher = raw.create_channel().await.expect("channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let consumer_channel = raw.create_channel().await.expect("channel");
    consumer_channel
        .basic_qos(
            common::worker_defaults().amqp.prefetch,
            BasicQosOptions { global: false },
        )
        .await
        .expect("qos");
    let tag = format!("bare-{}", Uuid::new_v4().simple());
    let mut consumer = consumer_channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let consumed = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            let delivery = consumer.next().await.expect("the consumer runs").expect("a delivery");
            delivery.acker.ack(BasicAckOptions::default()).await.expect("ack");
            got += 1;
        }
        Instant::now()
    });

    let body = vec![b'x'; size];
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let cpu_before = common::cpu_time(std::process::id(), ticks);
    let started = Instant::now();
    futures_util::stream::iter(0..n)
        .map(|_| {
            let (publisher, body, properties) = (&publisher, &body, properties.clone());
            async move {
                let confirm = publisher
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        body,
                        properties,
                    )
                    .await
                    .expect("publish");
                assert!(confirm.await.expect("confirm").is_ack(), "the broker confirms");
            }
        })
        .buffer_unordered(in_flight)
        .collect::<Vec<()>>()
        .await;
    let done = tokio::time::timeout(LIMIT, consumed)
        .await
        .expect("the consumer gets every message")
        .expect("the consumer task");
    let cpu = common::cpu_time(std::process::id(), ticks) - cpu_before;
    let _ = publisher.close(200, "round done".into()).await;
    let _ = consumer_channel.close(200, "round done".into()).await;
    Rate::of(n, done - started, cpu)
}

/// A measured rate and what it cost this process.
#[derive(Clone, Copy)]
struct Rate {
    per_second: f64,
    cpu_per_message: Duration,
}

impl Rate {
    fn of(n: usize, elapsed: Duration, cpu: Duration) -> Rate {
        Rate {
            per_second: n as f64 / elapsed.as_secs_f64(),
            cpu_per_message: cpu / n as u32,
        }
    }
}

#[derive(Default)]
struct Rounds(Vec<Rate>);

impl Rounds {
    fn add(&mut self, rate: Rate) {
        self.0.push(rate);
    }

    /// The median of each figure on its own.
    fn median(&self) -> Rate {
        let mut rates: Vec<f64> = self.0.iter().map(|r| r.per_second).collect();
        let mut cpu: Vec<f64> = self.0.iter().map(|r| r.cpu_per_message.as_secs_f64()).collect();
        Rate {
            per_second: common::median(&mut rates),
            cpu_per_message: Duration::from_secs_f64(common::median(&mut cpu)),
        }
    }
}

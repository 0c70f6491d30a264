//! ARM's request budget as the emulator enforces it, over a real socket: token buckets per
//! subscription, principal and kind, the subscription's global bucket, the remaining-count headers
//! on every answer, 429 `SubscriptionRequestsThrottled` with `Retry-After` when a bucket is empty,
//! the refill on the emulated clock, Batch's per-account buckets, and budgets turned off.

use reqwest::{Method, StatusCode};
use serde_json::json;
use sigrun::emulator::EmulatorOptions;
use sigrun::emulator::budget::Limits;

use crate::helpers::*;

/// A clock a thousand times slower than real time: the buckets refill 25 reads per 1000 real
/// seconds, so a test's own pace does not refill them, and `advance` does.
async fn slow_clock(budgets: Option<Limits>) -> TestEmulator {
    start(EmulatorOptions {
        time_scale: 0.001,
        budgets,
        ..Default::default()
    })
    .await
}

fn missing_snapshot() -> String {
    compute(SUB_IMAGING, "rg-imaging", "snapshots/not-there", DISK_API)
}

fn count(reply: &Reply, name: &str) -> Option<u64> {
    reply.header(name).and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn reads_empty_their_bucket_then_get_429_with_the_time_to_the_next_token() {
    let emu = slow_clock(Some(Limits::arm())).await;
    let token = emu.arm_token().await;
    for n in 1..=250u64 {
        let reply = emu.get(&missing_snapshot(), &token).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "read {n}: {:?}", reply.body);
        assert_eq!(
            count(&reply, "x-ms-ratelimit-remaining-subscription-reads"),
            Some(250 - n)
        );
        assert_eq!(
            count(&reply, "x-ms-ratelimit-remaining-subscription-global-reads"),
            Some(3750 - n)
        );
    }
    let refused = emu.get(&missing_snapshot(), &token).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.code(), "SubscriptionRequestsThrottled");
    let message = refused.body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("'read' requests") && message.contains(SUB_IMAGING),
        "{message}"
    );
    // One token comes in 1/25 of an emulated second: 40 real seconds on this clock, less what
    // the clock moved during the test's reads.
    assert_eq!(refused.header("retry-after"), Some("40"));
    let ms = count(&refused, "retry-after-ms").expect("retry-after-ms");
    assert!((38_000..=40_000).contains(&ms), "{ms}");
    assert_eq!(count(&refused, "x-ms-ratelimit-remaining-subscription-reads"), None);

    // Writes, another subscription and another principal have buckets of their own.
    let write = emu
        .put(
            &compute(SUB_IMAGING, "rg-imaging", "snapshots/Bad_Name!", DISK_API),
            &token,
            &json!({}),
        )
        .await;
    assert_ne!(write.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(count(&write, "x-ms-ratelimit-remaining-subscription-writes"), Some(199));
    let elsewhere = emu
        .get(&compute(SUB_COMPUTE, "rg-batch", "snapshots/x", DISK_API), &token)
        .await;
    assert_eq!(
        count(&elsewhere, "x-ms-ratelimit-remaining-subscription-reads"),
        Some(249)
    );
    let reader = emu.token_for(READER_APP, TENANT, ARM_SCOPE).await;
    let other = emu.get(&missing_snapshot(), &reader).await;
    assert_ne!(other.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(count(&other, "x-ms-ratelimit-remaining-subscription-reads"), Some(249));
    assert_eq!(
        count(&other, "x-ms-ratelimit-remaining-subscription-global-reads"),
        Some(3750 - 251),
        "the global bucket is the subscription's, every principal's"
    );

    // Two emulated seconds bring 50 tokens back, and no more.
    emu.advance(2.0).await;
    for n in 1..=50u64 {
        let reply = emu.get(&missing_snapshot(), &token).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "read {n} after the refill");
    }
    let again = emu.get(&missing_snapshot(), &token).await;
    assert_eq!(again.status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn batch_accounts_have_buckets_of_their_own_in_batchs_error_shape() {
    let emu = slow_clock(Some(Limits::arm())).await;
    let token = emu.batch_token().await;
    let url = format!("{}/pools/not-there?api-version={BATCH_API}", emu.batch_url("sigrunweu"));
    for n in 1..=200u64 {
        let reply = emu.call(Method::DELETE, &url, Some(&token), None).await;
        assert_ne!(reply.status, StatusCode::TOO_MANY_REQUESTS, "delete {n}");
    }
    let refused = emu.call(Method::DELETE, &url, Some(&token), None).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.body["code"], "TooManyRequests", "{:?}", refused.body);
    let ms = count(&refused, "retry-after-ms").expect("retry-after-ms");
    assert!(
        (95_000..=100_000).contains(&ms),
        "a delete token comes in 1/10 emulated s: {ms}"
    );
    // Reads on the same account, and deletes on another, still go.
    let read = emu.get(&url, &token).await;
    assert_ne!(read.status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn budgets_off_serve_everything_without_counts() {
    let emu = slow_clock(None).await;
    let token = emu.arm_token().await;
    for n in 1..=300 {
        let reply = emu.get(&missing_snapshot(), &token).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "read {n}");
        assert_eq!(reply.header("x-ms-ratelimit-remaining-subscription-reads"), None);
    }
}

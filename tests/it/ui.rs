//! The web page's server against hostile input, over a real socket: events forged into the stream
//! with markup in every text (pipeline, version, reasons, a parked message's error), absurd paths
//! and query strings, actions without and with the token. Nothing forged reaches a page as markup,
//! no request stops the server, every answer carries the CSP. The parking queue behind it is an
//! in-process fake (the real one is driven by `tests/browser.rs`).

use std::sync::{Arc, Mutex};

use reqwest::StatusCode;
use sigrun::events::{Event, EventKind};
use sigrun::model::envelope::Stage;
use sigrun::ui::{Actions, ActionsAllowed, Backends, Feed, ParkedView, Parking, ReplayRefused, UiServer};
use uuid::Uuid;

const MARKUP: &str = "<script>alert(1)</script>\"'><img src=x onerror=alert(2)>";
const TOKEN: &str = "ui-hostile-token";

#[derive(Default)]
struct Recorded {
    published: Mutex<Vec<Event>>,
    replayed: Mutex<Vec<String>>,
    /// Looks at the parking queue.
    looks: std::sync::atomic::AtomicUsize,
}

/// A run that only waits: nothing of it can be parked.
const QUIET: Uuid = Uuid::from_u128(42);

#[async_trait::async_trait]
impl Actions for Recorded {
    async fn publish(&self, event: Event) -> Result<(), String> {
        self.published.lock().unwrap().push(event);
        Ok(())
    }
}

struct FakeParking {
    parked: Vec<ParkedView>,
    recorded: Arc<Recorded>,
}

#[async_trait::async_trait]
impl Parking for FakeParking {
    async fn parked(&self) -> Result<Vec<ParkedView>, String> {
        self.recorded.looks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(self.parked.clone())
    }

    async fn replay(&self, id: &str) -> Result<String, ReplayRefused> {
        match self.parked.iter().find(|p| p.id == id) {
            None => Err(ReplayRefused::NotFound),
            Some(p) if p.not_replayable.is_some() => Err(ReplayRefused::NotReplayable("not JSON".into())),
            Some(_) => {
                self.recorded.replayed.lock().unwrap().push(id.to_string());
                Ok(format!("{id} back on its queue"))
            }
        }
    }
}

fn forged(run: Uuid, kind: EventKind) -> Event {
    sigrun::admission::trunk_event(run, MARKUP, MARKUP, Stage::GalleryPublish, kind)
}

async fn server(run: Uuid, token: bool) -> (UiServer, Arc<Recorded>) {
    let feed = Feed::default();
    feed.apply(forged(run, EventKind::Waiting { what: MARKUP.into() }));
    feed.apply(forged(
        run,
        EventKind::Retried {
            attempt: 1,
            error: MARKUP.into(),
        },
    ));
    feed.apply(forged(
        QUIET,
        EventKind::Waiting {
            what: "replication".into(),
        },
    ));
    // A branch failed (so its page looks at the parking queue); the run goes on.
    feed.apply(forged(
        run,
        EventKind::PoolFailed {
            target: MARKUP.into(),
            reason: MARKUP.into(),
        },
    ));
    let recorded = Arc::new(Recorded::default());
    let parked = vec![
        ParkedView {
            id: "m-1".into(),
            run_id: Some(run),
            stage: Some(MARKUP.into()),
            branch: Some(MARKUP.into()),
            error: MARKUP.into(),
            attempts: Some(2),
            last_seen: None,
            not_replayable: None,
        },
        ParkedView {
            id: "sha256:00ff".into(),
            run_id: Some(run),
            stage: None,
            branch: None,
            error: "does not decode".into(),
            attempts: None,
            last_seen: None,
            not_replayable: Some(MARKUP.into()),
        },
    ];
    let backends = Backends {
        parking: Some(Arc::new(FakeParking {
            parked,
            recorded: Arc::clone(&recorded),
        })),
        fleet: None,
        fleet_note: Some(MARKUP.into()),
        allowed: token.then(|| ActionsAllowed {
            token: TOKEN.into(),
            actions: Arc::clone(&recorded) as Arc<dyn Actions>,
        }),
    };
    let server = UiServer::start("127.0.0.1:0".parse().unwrap(), feed, backends)
        .await
        .expect("the page serves");
    (server, recorded)
}

fn inert(page: &str) {
    assert!(
        !page.contains("<script>alert") && !page.contains("<img src=x"),
        "forged markup reached the page: {page}"
    );
}

#[tokio::test]
async fn forged_text_renders_inert_and_absurd_requests_leave_the_server_answering() {
    let run = Uuid::new_v4();
    let (server, recorded) = server(run, true).await;
    let base = format!("http://{}", server.local_addr());
    let client = reqwest::Client::new();
    let get = |path: String| client.get(format!("{base}{path}")).send();

    let quiet = get(format!("/runs/{QUIET}")).await.expect("a quiet run's page");
    assert_eq!(quiet.status(), StatusCode::OK);
    let looks = || recorded.looks.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(looks(), 0, "a run with no failed branch has nothing parked to look for");
    let run_page = get(format!("/runs/{run}")).await.expect("run page");
    assert_eq!(looks(), 1, "a run with a failed branch looks at the parking queue");
    assert_eq!(run_page.status(), StatusCode::OK);
    assert!(run_page.headers().contains_key("content-security-policy"));
    let text = run_page.text().await.expect("text");
    inert(&text);
    assert!(text.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{text}");
    assert!(
        text.contains("data-id=\"m-1\""),
        "a replay button for the replayable one"
    );
    assert!(
        !text.contains("data-id=\"sha256:00ff\""),
        "none for the one that cannot go back"
    );
    for path in [
        "/".to_string(),
        format!("/?pipeline={}&state={}", urlencode(MARKUP), urlencode(MARKUP)),
        "/fleet".to_string(),
    ] {
        let answer = get(path.clone()).await.expect("page");
        assert_eq!(answer.status(), StatusCode::OK, "{path}");
        inert(&answer.text().await.expect("text"));
    }
    let long = "x".repeat(8 * 1024);
    for path in [
        format!("/runs/{long}"),
        "/runs/%00".to_string(),
        format!("/?pipeline={long}"),
        "/runs/00000000-0000-0000-0000-000000000000".to_string(),
        "/../../etc/passwd".to_string(),
    ] {
        let answer = get(path.clone()).await.expect("an answer");
        assert!(
            answer.status().is_client_error() || answer.status() == StatusCode::OK,
            "{}: {}",
            &path[..path.len().min(40)],
            answer.status()
        );
        assert!(answer.headers().contains_key("content-security-policy"));
    }

    let post = |path: String, auth: Option<&str>| {
        let mut request = client.post(format!("{base}{path}"));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send()
    };
    let bearer = format!("Bearer {TOKEN}");
    let replay = "/parked/m-1/replay".to_string();
    assert_eq!(
        post(replay.clone(), None).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post(replay.clone(), Some(&format!("Bearer {TOKEN}x")))
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(
        recorded.replayed.lock().unwrap().is_empty(),
        "nothing done without the token"
    );
    assert_eq!(
        post(replay, Some(&bearer)).await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(*recorded.replayed.lock().unwrap(), ["m-1"]);
    let refused = post("/parked/sha256%3A00ff/replay".into(), Some(&bearer))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    let unknown = post("/parked/nope/replay".into(), Some(&bearer)).await.unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let absurd = post(format!("/parked/{}/replay", "y".repeat(300)), Some(&bearer))
        .await
        .unwrap();
    assert_eq!(absurd.status(), StatusCode::BAD_REQUEST);
    let cancel = post(format!("/runs/{run}/cancel"), Some(&bearer)).await.unwrap();
    assert_eq!(cancel.status(), StatusCode::ACCEPTED);
    let published = recorded.published.lock().unwrap().clone();
    assert!(
        matches!(published.as_slice(), [e] if e.run_id == run && matches!(e.kind, EventKind::CancelRequested)),
        "{published:?}"
    );

    let still = get("/".into()).await.expect("the server still answers");
    assert_eq!(still.status(), StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn a_page_started_without_a_token_refuses_every_action() {
    let run = Uuid::new_v4();
    let (server, recorded) = server(run, false).await;
    let base = format!("http://{}", server.local_addr());
    let client = reqwest::Client::new();
    for path in [format!("/runs/{run}/cancel"), "/parked/m-1/replay".to_string()] {
        let answer = client
            .post(format!("{base}{path}"))
            .header("authorization", format!("Bearer {TOKEN}"))
            .send()
            .await
            .expect("post");
        assert_eq!(answer.status(), StatusCode::FORBIDDEN, "{path}");
    }
    let page = client
        .get(format!("{base}/runs/{run}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !page.contains("id=\"token\"") && !page.contains("button class=\"replay\""),
        "{page}"
    );
    assert!(recorded.replayed.lock().unwrap().is_empty() && recorded.published.lock().unwrap().is_empty());
    server.stop().await;
}

fn urlencode(text: &str) -> String {
    text.bytes().map(|b| format!("%{b:02X}")).collect()
}

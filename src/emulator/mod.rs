//! The Azure emulator: a real HTTP(S) server that speaks the REST contract of every Azure API the
//! pipeline calls (Azure AD v2 tokens and discovery, managed identity, ARM compute, galleries,
//! providers and Batch accounts, and the Batch data plane), keeps state, runs operations over
//! emulated time, enforces the Azure rules with Azure's error codes and injects faults from a seed.
//!
//! It shares no code with the client side of sigrun, so a client bug cannot hide behind the same
//! mistake here. Start it with [`Emulator::start`]; `sigrun emulator` is a thin wrapper.

mod aad;
mod arm;
mod arm_view;
mod auth;
mod batch;
pub mod budget;
mod clock;
mod control;
pub mod faults;
mod http;
mod log;
pub mod regions;
mod server;
mod state;
mod tls;
mod vm_sizes;
pub mod world;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rand::RngCore;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;

use self::auth::TokenKey;
use self::clock::Clock;
use self::faults::{Api, FaultPlan};
use self::http::{Request, Response};
use self::state::{State, Store};
pub use self::world::World;

/// The pages this emulator serves of Batch's VM size list in a region, unasked for fewer: what a
/// correct client must read (the nightly bench's minimum).
pub fn vm_size_list_pages() -> usize {
    vm_sizes::rendered().len().div_ceil(arm::catalog::SKU_PAGE)
}

/// How to run an emulator.
#[derive(Debug, Clone)]
pub struct EmulatorOptions {
    pub listen: SocketAddr,
    pub world: World,
    /// Emulated seconds per real second.
    pub time_scale: f64,
    pub seed: u64,
    /// A fault plan (see [`faults`]); empty for none.
    pub faults: String,
    pub state_dir: Option<PathBuf>,
    pub plain_http: bool,
    /// ARM's request budget (token buckets, see [`budget`]); `None` serves every request.
    pub budgets: Option<budget::Limits>,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        EmulatorOptions {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            world: World::default_world(),
            time_scale: 1.0,
            seed: 0,
            faults: String::new(),
            state_dir: None,
            plain_http: false,
            budgets: Some(budget::Limits::arm()),
        }
    }
}

/// Where a running emulator is: printed as one JSON line by `sigrun emulator`.
#[derive(Debug, Clone, Serialize)]
pub struct EmulatorInfo {
    pub base_url: String,
    /// PEM file of the CA a client must trust (absent with plain HTTP).
    pub ca_cert: Option<String>,
    pub tenant_id: String,
    pub tenant_ids: Vec<String>,
    pub subscription_ids: Vec<String>,
    /// Batch account name → data-plane URL.
    pub batch_accounts: BTreeMap<String, String>,
    pub control_url: String,
    /// App Service style managed identity endpoint and the header secret it wants.
    pub identity_endpoint: String,
    pub identity_header: String,
    /// IMDS style managed identity endpoint.
    pub imds_endpoint: String,
    pub time_scale: f64,
    pub seed: u64,
}

/// Shared by every connection: the world, the clock, the state and the fault plan.
pub(crate) struct Ctx {
    pub world: World,
    pub clock: Clock,
    pub state: Mutex<State>,
    pub faults: Mutex<FaultPlan>,
    pub log: Mutex<Vec<log::LogEntry>>,
    pub key: TokenKey,
    pub base_url: String,
    pub identity_header: String,
    pub seed: u64,
    pub started: Instant,
    pub budgets: budget::Budgets,
    store: Store,
    seq: AtomicU64,
    rate: Mutex<HashMap<String, u64>>,
}

impl Ctx {
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A factor in [1 - spread, 1 + spread] fixed by the seed and `key`, so durations vary between
    /// resources but not between runs with the same seed.
    pub fn jitter(&self, key: &str, spread: f64) -> f64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (self.seed, key).hash(&mut hasher);
        let unit = (hasher.finish() % 10_000) as f64 / 10_000.0;
        1.0 - spread + 2.0 * spread * unit
    }

    /// Persists the state (when a state directory is set). Called with the state lock held.
    pub fn save(&self, state: &State) {
        if let Err(err) = self.store.save(state, self.clock.now(), self.key.bytes()) {
            tracing::error!(error = %err, "emulator could not save its state");
        }
    }

    /// Counts a request against a subscription's hourly budget and returns what is left.
    pub fn remaining(&self, bucket: &str, budget: u64) -> u64 {
        let hour = self.started.elapsed().as_secs() / 3600;
        let mut rate = self.rate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let used = rate.entry(format!("{hour}:{bucket}")).or_insert(0);
        *used += 1;
        budget.saturating_sub(*used)
    }

    pub fn principal_name(&self, oid: &str) -> String {
        self.world
            .apps
            .iter()
            .chain(self.world.managed_identities.iter())
            .find(|p| p.object_id.eq_ignore_ascii_case(oid))
            .map(|p| p.client_id.clone())
            .unwrap_or_else(|| oid.to_string())
    }
}

/// A running emulator. Dropping it stops the server.
pub struct Emulator {
    info: EmulatorInfo,
    ctx: Arc<Ctx>,
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    _scratch: Option<tempfile::TempDir>,
}

impl Emulator {
    pub async fn start(options: EmulatorOptions) -> anyhow::Result<Emulator> {
        anyhow::ensure!(
            options.time_scale > 0.0 && options.time_scale <= 1e6,
            "--time-scale must be a number above 0 and at most 1000000, got {}",
            options.time_scale
        );
        let plan = FaultPlan::parse(&options.faults, options.seed)?;
        let listener = server::bind(options.listen).await?;
        let addr = listener.local_addr()?;
        let scheme = if options.plain_http { "http" } else { "https" };
        let base_url = format!("{scheme}://{addr}");

        let scratch = match &options.state_dir {
            Some(_) => None,
            None => Some(tempfile::Builder::new().prefix("sigrun-emulator-").tempdir()?),
        };
        let dir = options
            .state_dir
            .clone()
            .unwrap_or_else(|| scratch.as_ref().expect("scratch dir").path().to_path_buf());
        std::fs::create_dir_all(&dir)?;
        let tls = if options.plain_http {
            None
        } else {
            Some(tls::load_or_create(&dir)?)
        };

        let store = Store::new(options.state_dir.as_deref());
        let restored = store.load(options.time_scale)?;
        let (state, start, key) = match restored {
            Some(r) => (r.state, r.emulated_now, r.token_key),
            None => {
                let mut key = vec![0u8; 32];
                rand::rng().fill_bytes(&mut key);
                (State::default(), OffsetDateTime::now_utc(), key)
            }
        };
        let identity_header = format!("{:x}", {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut h);
            h.finish()
        });
        let ctx = Arc::new(Ctx {
            world: options.world.clone(),
            clock: Clock::new(options.time_scale, start),
            state: Mutex::new(state),
            faults: Mutex::new(plan),
            log: Mutex::new(Vec::new()),
            key: TokenKey::new(key),
            base_url: base_url.clone(),
            identity_header: identity_header.clone(),
            seed: options.seed,
            started: Instant::now(),
            budgets: budget::Budgets::new(options.budgets.clone()),
            store,
            seq: AtomicU64::new(0),
            rate: Mutex::new(HashMap::new()),
        });
        {
            let mut st = ctx.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            arm::seed_providers(&ctx, &mut st);
            ctx.save(&st);
        }

        let world = &options.world;
        let info = EmulatorInfo {
            base_url: base_url.clone(),
            ca_cert: tls.as_ref().map(|t| t.ca_cert_path.display().to_string()),
            tenant_id: world.tenants[0].id.clone(),
            tenant_ids: world.tenants.iter().map(|t| t.id.clone()).collect(),
            subscription_ids: world.subscriptions.iter().map(|s| s.id.clone()).collect(),
            batch_accounts: world
                .batch_accounts
                .iter()
                .map(|a| (a.name.clone(), batch::account_url(&base_url, &a.name)))
                .collect(),
            control_url: format!("{base_url}/_emulator"),
            identity_endpoint: format!("{base_url}/msi/token"),
            identity_header,
            imds_endpoint: format!("{base_url}/metadata/identity/oauth2/token"),
            time_scale: options.time_scale,
            seed: options.seed,
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(t.server_config));
        let task = tokio::spawn(server::serve(listener, acceptor, ctx.clone(), shutdown_rx));
        tracing::info!(base_url = %info.base_url, time_scale = options.time_scale, "emulator listening");
        Ok(Emulator {
            info,
            ctx,
            shutdown,
            task: Some(task),
            _scratch: scratch,
        })
    }

    pub fn info(&self) -> &EmulatorInfo {
        &self.info
    }

    pub fn base_url(&self) -> &str {
        &self.info.base_url
    }

    /// Emulated time now.
    /// Every request answered so far, as (front door, method, path), in order: what `sigrun run`
    /// counts for its summary without a round trip through the control API.
    pub fn answered(&self) -> Vec<(faults::Api, String, String)> {
        let log = self.ctx.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        log.iter().map(|e| (e.api, e.method.clone(), e.path.clone())).collect()
    }

    pub fn now(&self) -> OffsetDateTime {
        self.ctx.clock.now()
    }

    /// Stops accepting, closes connections and saves the state.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let st = self.ctx.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.ctx.save(&st);
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Which front door a request is for, from its path alone.
pub(crate) fn classify(req: &Request) -> Api {
    let s = &req.segments;
    let at = |i: usize, v: &str| s.get(i).is_some_and(|x| x.eq_ignore_ascii_case(v));
    if at(0, "_emulator") {
        Api::Control
    } else if at(0, "subscriptions") || at(0, "tenants") || (at(0, "metadata") && at(1, "endpoints")) {
        Api::Arm
    } else if at(0, "batch") {
        Api::Batch
    } else if (at(0, "metadata") && at(1, "identity")) || (at(0, "msi") && at(1, "token")) {
        Api::Identity
    } else {
        Api::Aad
    }
}

/// Answers one request. A handler that panics (a body shape no check foresaw) answers 500 in its
/// API's error shape instead of taking the connection — or, holding the state lock, every later
/// request — down with it; the locks recover from poisoning, and each handler leaves the state
/// consistent between its statements.
pub(crate) fn dispatch(ctx: &Ctx, api: Api, req: &Request) -> Response {
    let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dispatch_unguarded(ctx, api, req)));
    answered.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        tracing::error!(method = %req.method, path = %req.path, panic = %what, "emulator handler panicked");
        server_error(api, req, 500)
    })
}

fn dispatch_unguarded(ctx: &Ctx, api: Api, req: &Request) -> Response {
    match api {
        Api::Control => control::handle(ctx, req),
        Api::Arm => arm::handle(ctx, req),
        Api::Batch => batch::handle(ctx, req),
        Api::Identity => aad::managed_identity(ctx, req),
        Api::Aad => aad::handle(ctx, req),
    }
}

/// Headers each API sends on every answer; every one has a `Date` (HTTP-date) on the emulated
/// clock, which is what a client reads Azure's time from.
pub(crate) fn stamp(ctx: &Ctx, api: Api, req: &Request, resp: &mut Response) {
    if api != Api::Control {
        let format = time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        let now = ctx.clock.now().to_offset(time::UtcOffset::UTC);
        if let Ok(date) = now.format(&format) {
            resp.set_header("date", date);
        }
    }
    match api {
        Api::Arm => arm::stamp(ctx, req, resp),
        Api::Batch => batch::stamp(req, resp),
        Api::Aad | Api::Identity => {
            if resp.header("x-ms-request-id").is_none() {
                resp.set_header("x-ms-request-id", uuid::Uuid::new_v4().to_string());
            }
            if let Some(id) = req.header("client-request-id") {
                resp.set_header("client-request-id", id.to_string());
            }
        }
        Api::Control => {}
    }
}

fn retry_after(resp: Response, secs: f64) -> Response {
    resp.with_header("retry-after", format!("{}", secs.ceil() as u64))
        .with_header("retry-after-ms", format!("{}", (secs * 1000.0).round() as u64))
}

/// A throttling answer in the shape of the API that was called.
pub(crate) fn throttled(api: Api, req: &Request, secs: f64) -> Response {
    let resp = match api {
        Api::Arm => arm::error(429, "TooManyRequests", "The request is being throttled.", None),
        Api::Batch => batch::error(
            req,
            429,
            "TooManyRequests",
            "The server is busy; retry the request later.",
            &[],
        ),
        _ => Response::json(
            429,
            &serde_json::json!({"error": "too_many_requests", "error_description": "Too many requests"}),
        ),
    };
    retry_after(resp, secs)
}

/// A request refused for want of tokens: 429 in its API's shape, `Retry-After` in whole real
/// seconds (at least 1, as Azure sends it) and `retry-after-ms` exact (at least 1).
pub(crate) fn over_budget(ctx: &Ctx, api: Api, req: &Request, message: &str, wait_secs: f64) -> Response {
    let resp = match api {
        Api::Batch => batch::error(req, 429, "TooManyRequests", message, &[]),
        _ => arm::error(429, "SubscriptionRequestsThrottled", message, None),
    };
    let real =
        std::time::Duration::try_from_secs_f64(wait_secs / ctx.clock.scale()).unwrap_or(std::time::Duration::MAX);
    with_wait_hint(resp, real)
}

/// The wait before a client should ask again (a refused request, an operation still running), as
/// Azure sends it: `Retry-After` in whole seconds rounded up and never 0 (a client reads 0 as "no
/// hint" and falls back to its own interval, 30 s for the Azure SDKs), and `retry-after-ms`
/// exact to the millisecond above, at least 1; on a fast clock that is where the real wait is.
pub(crate) fn with_wait_hint(resp: Response, real: std::time::Duration) -> Response {
    let (secs, ms) = wait_hint(real);
    resp.with_header("retry-after", secs.to_string())
        .with_header("retry-after-ms", ms.to_string())
}

/// (`Retry-After` seconds, `retry-after-ms`) for a real wait.
fn wait_hint(real: std::time::Duration) -> (u64, u64) {
    let ms = u64::try_from(real.as_nanos().div_ceil(1_000_000))
        .unwrap_or(u64::MAX)
        .max(1);
    (ms.div_ceil(1000), ms)
}

/// A server-side failure in the shape of the API that was called.
pub(crate) fn server_error(api: Api, req: &Request, status: u16) -> Response {
    let (code, message) = if status == 503 {
        (
            "ServiceUnavailable",
            "The service is temporarily unavailable. Please retry the request.",
        )
    } else {
        (
            "InternalServerError",
            "The server encountered an internal error. Please retry the request.",
        )
    };
    match api {
        Api::Arm => arm::error(status, code, message, None),
        Api::Batch => batch::error(req, status, code, message, &[]),
        _ => Response::json(
            status,
            &serde_json::json!({"error": "server_error", "error_description": message}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::wait_hint;

    #[test]
    fn a_wait_hint_is_whole_seconds_rounded_up_never_zero_and_exact_ms() {
        assert_eq!(wait_hint(Duration::ZERO), (1, 1));
        assert_eq!(wait_hint(Duration::from_micros(50_001)), (1, 51));
        assert_eq!(wait_hint(Duration::from_millis(1000)), (1, 1000));
        assert_eq!(wait_hint(Duration::from_millis(1001)), (2, 1001));
        assert_eq!(wait_hint(Duration::from_secs(600)), (600, 600_000));
        assert_eq!(wait_hint(Duration::MAX).1, u64::MAX);
    }
}

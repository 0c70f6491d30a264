//! Sockets, TLS and the per-request frame around the handlers: read the request, let the fault plan
//! act (throttle, fail, stall, or cut the connection after the work is done, the case that makes
//! idempotency matter), dispatch, stamp the headers each API always sends, and log the exchange.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;

use super::Ctx;
use super::faults::{Api, RequestFault};
use super::http::{Request, Response};
use super::log::LogEntry;

const MAX_BODY: usize = 8 * 1024 * 1024;

pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: Arc<Ctx>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(error = %err, "emulator accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let fd = stream.as_raw_fd();
            match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls_stream) => serve_connection(tls_stream, fd, ctx, shutdown).await,
                    Err(err) => tracing::debug!(error = %err, "emulator TLS handshake failed"),
                },
                None => serve_connection(stream, fd, ctx, shutdown).await,
            }
        });
    }
}

async fn serve_connection<S>(stream: S, fd: i32, ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let reset = Arc::new(Notify::new());
    let service = {
        let reset = reset.clone();
        hyper::service::service_fn(move |req| {
            let ctx = ctx.clone();
            let reset = reset.clone();
            async move { Ok::<_, Infallible>(exchange(ctx, req, reset).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        _ = reset.notified() => {
            // SO_LINGER 0 makes the close an RST: the client sees "connection reset", as when a
            // load balancer drops a connection mid-request.
            // SAFETY: the connection future (which owns the socket) is still alive in this scope.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            let _ = socket2::SockRef::from(&borrowed).set_linger(Some(Duration::ZERO));
        }
        _ = shutdown.changed() => {}
    }
}

async fn exchange(ctx: Arc<Ctx>, req: hyper::Request<Incoming>, reset: Arc<Notify>) -> hyper::Response<Full<Bytes>> {
    let received_ms = ctx.started.elapsed().as_secs_f64() * 1000.0;
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return to_hyper(Response::empty(413)),
    };
    let request = Request::new(parts.method, &parts.uri, parts.headers, body, &ctx.base_url);
    let api = super::classify(&request);
    let fault = if api == Api::Control {
        None
    } else {
        ctx.faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .on_request(api, request.method.as_str(), &request.path)
    };
    let mut fault_name = None;
    let mut response = match &fault {
        Some(RequestFault::Throttle { retry_after_secs }) => {
            fault_name = Some("429".to_string());
            super::throttled(api, &request, *retry_after_secs)
        }
        Some(RequestFault::ServerError { status }) => {
            fault_name = Some(status.to_string());
            super::server_error(api, &request, *status)
        }
        Some(RequestFault::Slow { delay_ms }) => {
            fault_name = Some("slow".to_string());
            tokio::time::sleep(Duration::from_millis(*delay_ms)).await;
            super::dispatch(&ctx, api, &request)
        }
        Some(RequestFault::Reset) => {
            fault_name = Some("reset".to_string());
            super::dispatch(&ctx, api, &request)
        }
        None => super::dispatch(&ctx, api, &request),
    };
    super::stamp(&ctx, api, &request, &mut response);
    let reset_now = matches!(fault, Some(RequestFault::Reset));
    if api != Api::Control {
        ctx.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(LogEntry::new(
                &ctx,
                received_ms,
                api,
                &request,
                if reset_now { 0 } else { response.status.as_u16() },
                fault_name,
                &response,
            ));
    }
    if reset_now {
        reset.notify_one();
        // Hold the response back; the connection is cut before it can be written.
        std::future::pending::<()>().await;
    }
    to_hyper(response)
}

fn to_hyper(response: Response) -> hyper::Response<Full<Bytes>> {
    let mut builder = hyper::Response::builder().status(response.status);
    for (name, value) in &response.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    builder.body(Full::new(response.body)).expect("valid response")
}

/// Binds the listener, turning "address in use" into a message that names the address.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .map_err(|e| anyhow::anyhow!("emulator cannot listen on {addr}: {e}"))?;
    Ok(socket.listen(1024)?)
}

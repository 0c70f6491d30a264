//! A TCP relay between a `sigrun` process and the real broker that a test can cut and reopen:
//! while cut, open connections are dropped (the broker sees them close) and new ones are closed at
//! once. Only the process whose URL points at the relay loses its broker; nothing else sharing
//! the broker is disturbed. A stall is the quieter failure: the connections stay open and nothing
//! crosses them (no reset, no close), as when a network path goes silent.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::amqp_url;

/// A TCP relay to the broker that the test can cut: while cut, open connections are dropped and
/// new ones are closed at once, as if the network to the broker were gone.
pub struct Relay {
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    /// Bumped by each stall: a connection open before the bump goes silent.
    stall: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        let (cut, _) = watch::channel(false);
        let (stall, _) = watch::channel(0u64);
        let watcher = cut.clone();
        let staller = stall.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if *watcher.borrow() {
                    continue; // dropped: closed at once
                }
                let mut cut = watcher.subscribe();
                let mut cut_while_stalled = watcher.subscribe();
                let mut stalled = staller.subscribe();
                let epoch = *stalled.borrow();
                tokio::spawn(async move {
                    let Ok(mut broker) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let went_silent = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut broker) => false,
                        _ = cut.wait_for(|cut| *cut) => false,
                        _ = stalled.wait_for(|now| *now != epoch) => true,
                    };
                    if went_silent {
                        // Both sockets stay open, silent, until the relay is cut.
                        let _ = cut_while_stalled.wait_for(|cut| *cut).await;
                    }
                    drop((client, broker));
                });
            }
        });
        Relay { addr, cut, stall, task }
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }

    /// Silences the open connections (nothing crosses, nothing closes); new ones are relayed.
    pub fn stall(&self) {
        self.stall.send_modify(|epoch| *epoch += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The AMQP URL the tests use, split around its `host:port`.
pub fn broker_url_parts() -> (String, String, String) {
    let url = amqp_url();
    let authority_start = url.find("://").map(|i| i + 3).expect("an amqp URL");
    let host_start = url[authority_start..]
        .rfind('@')
        .map_or(authority_start, |at| authority_start + at + 1);
    let host_end = url[host_start..]
        .find('/')
        .map_or(url.len(), |slash| host_start + slash);
    (
        url[..host_start].to_string(),
        url[host_start..host_end].to_string(),
        url[host_end..].to_string(),
    )
}

/// The broker's socket address.
pub fn broker_addr() -> SocketAddr {
    let (_, host_port, _) = broker_url_parts();
    let with_port = if host_port.contains(':') {
        host_port
    } else {
        format!("{host_port}:5672")
    };
    std::net::ToSocketAddrs::to_socket_addrs(&with_port)
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("cannot resolve the broker address {with_port}"))
}

impl Relay {
    /// The broker's URL with the relay in the broker's place.
    pub fn url(&self) -> String {
        let (before_host, _, after_host) = broker_url_parts();
        format!("{before_host}{}{after_host}", self.addr)
    }
}

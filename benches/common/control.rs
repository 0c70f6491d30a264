//! The emulator's control API as the benches use it: jump its clock, clear and read its log of
//! answered requests.

use std::time::Duration;

use serde_json::Value;
use sigrun::emulator::Emulator;

pub struct Control {
    client: reqwest::Client,
    url: String,
}

impl Control {
    pub fn new(emulator: &Emulator) -> Control {
        let info = emulator.info();
        let pem = std::fs::read(info.ca_cert.as_deref().expect("TLS")).expect("read the CA");
        let client = reqwest::Client::builder()
            .no_proxy()
            .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).expect("the CA parses"))
            .build()
            .expect("client");
        Control {
            client,
            url: info.control_url.clone(),
        }
    }

    pub async fn advance(&self, by: Duration) {
        let reply = self
            .client
            .post(format!("{}/clock", self.url))
            .json(&serde_json::json!({ "advance_seconds": by.as_secs_f64() }))
            .send()
            .await
            .expect("advance the emulated clock");
        assert!(
            reply.status().is_success(),
            "advance the emulated clock: {}",
            reply.status()
        );
    }

    pub async fn clear_log(&self) {
        let reply = self
            .client
            .delete(format!("{}/requests", self.url))
            .send()
            .await
            .expect("clear the request log");
        assert!(reply.status().is_success(), "clear the request log");
    }

    /// Requests answered since the log was cleared, each with its `method`, `path` and `status`.
    pub async fn requests(&self) -> Vec<Value> {
        let mut log: Value = self
            .client
            .get(format!("{}/requests", self.url))
            .send()
            .await
            .expect("read the request log")
            .json()
            .await
            .expect("the request log is JSON");
        match log["requests"].take() {
            Value::Array(entries) => entries,
            other => panic!("the request log has no list of requests: {other}"),
        }
    }
}

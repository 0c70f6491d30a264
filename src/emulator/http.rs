//! The emulator's view of one HTTP exchange: a fully read request (path split and decoded, query
//! parsed, body collected) and a response built by a handler. Handlers are plain functions from a
//! `Request` to a `Response`; the server does the sockets, TLS and faults around them.

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde_json::Value;

#[derive(Debug)]
pub struct Request {
    pub method: Method,
    /// Path as received, without the query.
    pub path: String,
    /// Path segments, percent-decoded, empty ones dropped.
    pub segments: Vec<String>,
    pub query: Vec<(String, String)>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Scheme, host and port of the emulator, e.g. `https://127.0.0.1:8443`.
    pub base_url: String,
}

impl Request {
    pub fn new(method: Method, uri: &http::Uri, headers: HeaderMap, body: Bytes, base_url: &str) -> Request {
        let path = uri.path().to_string();
        let segments = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned())
            .collect();
        let query = uri
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        Request {
            method,
            path,
            segments,
            query,
            headers,
            body,
            base_url: base_url.to_string(),
        }
    }

    /// A query parameter; names compare ignoring case, as Azure's front ends do.
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Result<Value, String> {
        if self.body.is_empty() {
            return Err("The request body is empty.".to_string());
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| format!("The request content was invalid and could not be deserialized: {e}"))
    }

    /// Segment `i` compared ignoring case (ARM resource type segments are case-insensitive).
    pub fn seg_is(&self, i: usize, expected: &str) -> bool {
        self.segments.get(i).is_some_and(|s| s.eq_ignore_ascii_case(expected))
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Response {
    pub fn json(status: u16, body: &Value) -> Response {
        Response {
            status: StatusCode::from_u16(status).expect("valid status"),
            headers: vec![("content-type".into(), "application/json; charset=utf-8".into())],
            body: Bytes::from(serde_json::to_vec(body).expect("json")),
        }
    }

    pub fn empty(status: u16) -> Response {
        Response {
            status: StatusCode::from_u16(status).expect("valid status"),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    pub fn set_header(&mut self, name: &str, value: impl Into<String>) {
        let name = name.to_ascii_lowercase();
        self.headers.retain(|(k, _)| *k != name);
        self.headers.push((name, value.into()));
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

//! Answers the host gives itself, without the app: the health and metrics
//! endpoints, and the plain-text errors of the request path.

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Response, StatusCode};

use super::body::ResponseBody;
use super::server::Server;
use crate::operations::metrics;

/// The health endpoint, answered by the host itself (never by the app), so a
/// load balancer sees the server's state even while an app misbehaves:
/// `200 {"status":"ok",...}` while serving, `503 {"status":"draining",...}`
/// once shutdown has begun.
/// `brief`: only status and generation (the app's port, when an admin
/// listener has the full answer).
pub fn health(method: &Method, server: &Server, brief: bool) -> Response<ResponseBody> {
    if method != Method::GET && method != Method::HEAD {
        return only_get_or_head();
    }
    let snapshot = server.snapshot();
    let status = if snapshot.shutting_down { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let json = if brief { snapshot.to_brief_json() } else { snapshot.to_json() };
    let mut response = Response::new(ResponseBody::full(json.into(), None));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The Prometheus exposition (`--metrics-path`).
pub fn metrics(method: &Method, server: &Server) -> Response<ResponseBody> {
    let Some(metrics) = server.reporter.metrics().filter(|_| method == Method::GET || method == Method::HEAD) else {
        return only_get_or_head();
    };
    let mut response = Response::new(ResponseBody::full(metrics.render(&server.snapshot()).into(), None));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(metrics::CONTENT_TYPE));
    response
}

/// The admin listener: the health endpoint (full answer) and the metrics,
/// nothing else.
pub fn admin(method: &Method, path: &str, server: &Server) -> Response<ResponseBody> {
    let config = &server.config;
    if config.health_path.as_deref() == Some(path) {
        return health(method, server, false);
    }
    if config.metrics_path.as_deref() == Some(path) {
        return metrics(method, server);
    }
    let offered: Vec<&str> =
        [config.health_path.as_deref(), config.metrics_path.as_deref()].into_iter().flatten().collect();
    let text = format!("not found: this admin listener answers only {}\n", offered.join(" and "));
    host_answer(StatusCode::NOT_FOUND, text, false)
}

fn only_get_or_head() -> Response<ResponseBody> {
    let mut response = host_answer(StatusCode::METHOD_NOT_ALLOWED, "use GET or HEAD\n", false);
    response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

pub fn too_large(limit: u64) -> Response<ResponseBody> {
    host_answer(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body is larger than the limit of {limit} bytes\n"),
        true,
    )
}

/// A plain-text answer from the host itself. `close` adds `Connection:
/// close` (and `Retry-After` for 503s), for answers after which the
/// connection should not be reused.
pub fn host_answer(status: StatusCode, text: impl Into<Bytes>, close: bool) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(text.into(), None));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if close {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

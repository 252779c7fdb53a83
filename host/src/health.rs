//! The health endpoint, answered by the host itself (never by the app), so a
//! load balancer sees the server's state even while an app misbehaves.

use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Response, StatusCode};
use serde_json::json;

use crate::body::ResponseBody;
use crate::server::Server;

/// `200 {"status":"ok",...}` while serving; `503 {"status":"draining",...}`
/// once shutdown has begun, so load balancers stop routing here.
pub fn respond(method: &Method, server: &Server) -> Response<ResponseBody> {
    if method != Method::GET && method != Method::HEAD {
        let mut response = Response::new(ResponseBody::full("use GET or HEAD\n".into(), None));
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        response.headers_mut().insert(ALLOW, http::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let snapshot = server.snapshot();
    let (status, label) =
        if snapshot.shutting_down { (StatusCode::SERVICE_UNAVAILABLE, "draining") } else { (StatusCode::OK, "ok") };
    let body = json!({
        "status": label,
        "generation": snapshot.generation,
        "uptime_seconds": snapshot.uptime.as_secs_f64(),
        "in_flight": snapshot.in_flight,
        "connections": snapshot.connections,
        "draining_generations": snapshot.draining,
        "last_reload": snapshot.last_reload,
    });
    let mut response = Response::new(ResponseBody::full(format!("{body}\n").into(), None));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    response
}

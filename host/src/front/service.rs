//! The request path: from a hyper request to the response the client gets.
//!
//! 1. The health and metrics paths are answered by the host (with
//!    `--admin-listen`: metrics and the full health answer only there, and
//!    the admin listener answers nothing else).
//! 2. During shutdown, new requests get `503` with `Connection: close`.
//! 3. A declared body over `max_body_size` gets `413` without the app.
//! 4. Otherwise the request leases the current generation and goes to the
//!    app. An answer that is ready at the first poll goes straight out (no
//!    timer, no extra task); one that is not races `request_timeout` and the
//!    generation's retirement.
//! 5. A `101` that takes the connection over leaves its session (see
//!    `upgrade`) on the connection, which runs it once hyper has sent the
//!    `101` and handed the socket over.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::access::RequestRecord;
use super::body::ResponseBody;
use super::connection::{Activity, Connection};
use super::host;
use super::host::{host_answer, too_large};
use super::server::Server;
use super::upgrade;
use crate::config::format_duration;
use crate::ffi::{AppBody, AppCall, AppResponse, CallError};
use crate::generations::stalls::{self, CallKind};
use crate::generations::{InFlight, UpgradedLease};

pub async fn handle(
    request: Request<Incoming>,
    server: Arc<Server>,
    connection: Arc<Connection>,
) -> Result<Response<ResponseBody>, Infallible> {
    let activity = Activity::start(connection.clone());
    if request.version() == http::Version::HTTP_2 {
        connection.speaks_http2();
    }
    let mut record = RequestRecord::start(&server, &connection.peer, request.method(), request.uri().path());
    let (mut response, generation) = answer(request, &server, &connection).await;
    if let Some(record) = &mut record {
        record.answered(response.status().as_u16(), generation);
    }
    response.body_mut().attach(activity, record);
    if server.connections.is_retiring() && response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // A retiring worker's client should take its next request elsewhere
        // (an upgraded connection is cut at reload_timeout instead).
        response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    Ok(response)
}

/// The response, and the generation that gave it (`None`: the host did).
async fn answer(
    request: Request<Incoming>,
    server: &Server,
    connection: &Connection,
) -> (Response<ResponseBody>, Option<u64>) {
    let config = &server.config;
    let path = request.uri().path();
    if connection.admin {
        return (host::admin(request.method(), path, server), None);
    }
    if config.health_path.as_deref() == Some(path) {
        // With an admin listener, the app's port says only whether it serves.
        let brief = config.admin_listen.is_some();
        return (host::health(request.method(), server, brief), None);
    }
    if config.metrics_path.as_deref() == Some(path) && config.admin_listen.is_none() {
        return (host::metrics(request.method(), server), None);
    }
    if server.is_shutting_down() {
        let text = "the server is shutting down; retry shortly\n";
        return (host_answer(StatusCode::SERVICE_UNAVAILABLE, text, true), None);
    }
    if declared_length(&request).is_some_and(|length| length > config.max_body_size) {
        return (too_large(config.max_body_size), None);
    }
    let generation = server.current.lease();
    let number = generation.number();
    connection.serves(number);
    let may_upgrade = request.version() == http::Version::HTTP_11
        && request.extensions().get::<hyper::upgrade::OnUpgrade>().is_some();
    connection.set_upgrading(may_upgrade);
    let in_flight = InFlight::start(generation.clone());
    // What the stall watchdog names if the handler blocks (cheap: standard
    // methods are constants, a URI shares its bytes).
    let head = (request.method().clone(), request.uri().clone());
    let call = AppCall::start(generation, request, connection.peer.ip(), config.max_body_size);
    let outcome = run(call, &in_flight, config.request_timeout, head).await;
    let mut response = respond(outcome, in_flight, config.max_body_size, connection);
    if may_upgrade && response.status() != StatusCode::SWITCHING_PROTOCOLS {
        connection.set_upgrading(false);
        if server.is_shutting_down() {
            // The shutdown's request to finish skipped this connection while
            // it might upgrade: close it after this answer.
            response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        }
    }
    (response, Some(number))
}

/// A request's method and URI.
type Head = (http::Method, http::Uri);

/// How an app call ended.
enum Outcome {
    Answered(AppResponse),
    Failed(CallError),
    TimedOut(std::time::Duration),
    Retired,
}

async fn run(mut call: AppCall, in_flight: &InFlight, timeout: std::time::Duration, request: Head) -> Outcome {
    let generation = in_flight.generation.number();
    // Every poll of the handler counts as a running app call, for the stall
    // watchdog.
    let mut poll = |cx: &mut std::task::Context<'_>| {
        let _running = stalls::enter(CallKind::Handler, generation, Some((&request.0, &request.1)));
        Pin::new(&mut call).poll(cx)
    };
    let first = poll_fn(|cx| Poll::Ready(poll(cx))).await;
    let result = match first {
        Poll::Ready(result) => result,
        Poll::Pending => {
            tokio::select! {
                result = poll_fn(&mut poll) => result,
                () = tokio::time::sleep(timeout) => return Outcome::TimedOut(timeout),
                () = in_flight.generation.cancelled() => return Outcome::Retired,
            }
        }
    };
    match result {
        Ok(response) => Outcome::Answered(response),
        Err(e) => Outcome::Failed(e),
    }
}

fn respond(
    outcome: Outcome,
    in_flight: InFlight,
    max_body_size: u64,
    connection: &Connection,
) -> Response<ResponseBody> {
    let generation = in_flight.generation.number();
    match outcome {
        Outcome::Answered(answer) if answer.body_over_limit => too_large(max_body_size),
        Outcome::Answered(answer) => app_response(answer, in_flight, connection),
        Outcome::Failed(CallError::Panicked) => {
            tracing::warn!(generation, "request handler panicked; answered 500");
            host_answer(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n", false)
        }
        Outcome::Failed(e @ CallError::InvalidResponse(_)) => {
            tracing::error!(generation, "{e}; answered 500");
            host_answer(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n", false)
        }
        Outcome::TimedOut(timeout) => {
            tracing::warn!(generation, "request handler gave no response within request_timeout; answered 504");
            let text = format!("the app did not answer within {}\n", format_duration(timeout));
            host_answer(StatusCode::GATEWAY_TIMEOUT, text, true)
        }
        Outcome::Retired => host_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "the app version serving this request was retired before it answered; retry\n",
            true,
        ),
    }
}

fn app_response(answer: AppResponse, in_flight: InFlight, connection: &Connection) -> Response<ResponseBody> {
    let AppResponse { status, headers, body, upgrade, .. } = answer;
    if let Some(upgrade) = upgrade {
        // Counted in the generation from now on, so a drain cannot miss it
        // between the `101` and the session's start.
        let lease = UpgradedLease::start(in_flight.generation.clone());
        connection.upgrade(Box::pin(upgrade::session(upgrade, lease)));
    }
    let body = match body {
        AppBody::Full(bytes) => ResponseBody::full(bytes, Some(in_flight)),
        AppBody::Stream(stream) => ResponseBody::stream(stream, in_flight),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// The body length the client declared (hyper turns `Content-Length` into
/// the body's exact size hint), without looking the header up again.
fn declared_length(request: &Request<Incoming>) -> Option<u64> {
    http_body::Body::size_hint(request.body()).exact()
}

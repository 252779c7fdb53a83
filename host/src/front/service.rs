//! The request path: from a hyper request to the response the client gets.
//!
//! 1. The health and metrics paths are answered by the host (with
//!    `--admin-listen`: metrics and the full health answer only there, and
//!    the admin listener answers nothing else).
//! 2. During shutdown, new requests get `503` with `Connection: close`.
//! 3. A declared body over `max_body_size` gets `413` without the app.
//! 4. Otherwise the request leases the current generation and goes to the
//!    app. An answer that is ready at the first poll goes straight out (no
//!    timer, no extra task, no allocation here); one that is not races
//!    `request_timeout` and the generation's retirement.
//! 5. A `101` that takes the connection over leaves its session (see
//!    `upgrade`) on the connection, which runs it once hyper has sent the
//!    `101` and handed the socket over.
//!
//! [`Handling`] is written by hand rather than as an `async fn`: the
//! compiler's state machine for the nested futures moved the request and
//! the response through a dozen copies on every request (measured with
//! callgrind); here the request is routed when hyper calls the service, the
//! common case answers at the first poll, and only a request that waits is
//! boxed.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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

/// Answers `request`, which came in on `connection`. Everything up to the
/// app's first poll runs here, in hyper's call of the service: the future
/// then holds the app call, not the request.
pub fn handle(request: Request<Incoming>, server: Arc<Server>, connection: Arc<Connection>) -> Handling {
    if request.version() == http::Version::HTTP_2 {
        connection.speaks_http2();
    }
    let record = RequestRecord::start(&server, &connection.peer, request.method(), request.uri().path());
    let exchange = Exchange { server, activity: Activity::start(connection), record };
    if let Some(response) = host_route(&request, &exchange) {
        return Handling(State::Answered(Some(exchange.respond(response, None))));
    }
    let call = AppRequest::start(request, &exchange.server, exchange.connection());
    Handling(State::New { call, exchange })
}

/// hyper's future for one request.
pub struct Handling(State);

enum State {
    /// The host answered.
    Answered(Option<Response<ResponseBody>>),
    /// The app has the request, not polled yet.
    New {
        call: AppRequest,
        exchange: Exchange,
    },
    /// The app did not answer at its first poll: the rest, boxed.
    Waiting(Waiting),
    Done,
}

type Waiting = Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>>;

impl Future for Handling {
    type Output = Result<Response<ResponseBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let state = &mut self.get_mut().0;
        match state {
            State::Answered(response) => return response.take().map_or(Poll::Pending, |r| Poll::Ready(Ok(r))),
            State::New { .. } => {
                let State::New { call, exchange } = std::mem::replace(state, State::Done) else {
                    return Poll::Pending;
                };
                match call.first_poll(exchange, cx) {
                    Started::Answered(response) => return Poll::Ready(Ok(response)),
                    Started::Waiting(waiting) => *state = State::Waiting(waiting),
                }
            }
            State::Waiting(_) | State::Done => {}
        }
        // `Done`: polled after completion, which hyper never does.
        let State::Waiting(waiting) = state else { return Poll::Pending };
        match waiting.as_mut().poll(cx) {
            Poll::Ready(response) => {
                *state = State::Done;
                Poll::Ready(Ok(response))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// How the first poll of a request ended.
enum Started {
    Answered(Response<ResponseBody>),
    Waiting(Waiting),
}

/// What a request carries until its response is handed to hyper.
struct Exchange {
    server: Arc<Server>,
    activity: Activity,
    record: Option<RequestRecord>,
}

impl Exchange {
    fn connection(&self) -> &Connection {
        self.activity.connection()
    }

    /// The response as the client gets it. `generation`: the one that gave
    /// it (`None`: the host did).
    fn respond(self, mut response: Response<ResponseBody>, generation: Option<u64>) -> Response<ResponseBody> {
        let Exchange { server, activity, mut record } = self;
        if let Some(record) = &mut record {
            record.answered(response.status().as_u16(), generation);
        }
        response.body_mut().attach(activity, record);
        if server.connections.is_retiring() && response.status() != StatusCode::SWITCHING_PROTOCOLS {
            // A retiring worker's client should take its next request elsewhere
            // (an upgraded connection is cut at reload_timeout instead).
            close_after(&mut response);
        }
        response
    }
}

fn close_after(response: &mut Response<ResponseBody>) {
    response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
}

/// The host's own answer to `request`, if it does not go to the app.
fn host_route(request: &Request<Incoming>, exchange: &Exchange) -> Option<Response<ResponseBody>> {
    let (server, connection) = (&exchange.server, exchange.connection());
    let config = &server.config;
    let path = request.uri().path();
    if connection.admin {
        return Some(host::admin(request.method(), path, server));
    }
    if config.health_path.as_deref() == Some(path) {
        // With an admin listener, the app's port says only whether it serves.
        let brief = config.admin_listen.is_some();
        return Some(host::health(request.method(), server, brief));
    }
    if config.metrics_path.as_deref() == Some(path) && config.admin_listen.is_none() {
        return Some(host::metrics(request.method(), server));
    }
    if server.is_shutting_down() {
        let text = "the server is shutting down; retry shortly\n";
        return Some(host_answer(StatusCode::SERVICE_UNAVAILABLE, text, true));
    }
    if declared_length(request).is_some_and(|length| length > config.max_body_size) {
        return Some(too_large(config.max_body_size));
    }
    None
}

/// A request handed to the current generation.
struct AppRequest {
    call: AppCall,
    in_flight: InFlight,
    /// The client asked for an upgrade that the app may accept.
    may_upgrade: bool,
}

impl AppRequest {
    fn start(request: Request<Incoming>, server: &Server, connection: &Connection) -> AppRequest {
        let generation = server.current.lease();
        connection.serves(generation.number());
        let may_upgrade = request.version() == http::Version::HTTP_11
            && request.extensions().get::<hyper::upgrade::OnUpgrade>().is_some();
        connection.set_upgrading(may_upgrade);
        let in_flight = InFlight::start(generation.clone());
        let call = AppCall::start(generation, request, connection.peer.ip(), server.config.max_body_size);
        AppRequest { call, in_flight, may_upgrade }
    }

    /// Polls the app's handler, as a running app call for the stall
    /// watchdog.
    fn poll_app(&mut self, cx: &mut Context<'_>) -> Poll<Result<AppResponse, CallError>> {
        let _running = stalls::enter(CallKind::Handler, self.in_flight.generation.number(), Some(self.call.line()));
        Pin::new(&mut self.call).poll(cx)
    }

    fn first_poll(mut self, exchange: Exchange, cx: &mut Context<'_>) -> Started {
        match self.poll_app(cx) {
            Poll::Ready(result) => Started::Answered(self.finish(Outcome::from(result), exchange)),
            Poll::Pending => Started::Waiting(Box::pin(self.wait(exchange))),
        }
    }

    async fn wait(mut self, exchange: Exchange) -> Response<ResponseBody> {
        let timeout = exchange.server.config.request_timeout;
        let generation = self.in_flight.generation.clone();
        let outcome = tokio::select! {
            result = poll_fn(|cx| self.poll_app(cx)) => Outcome::from(result),
            () = tokio::time::sleep(timeout) => Outcome::TimedOut(timeout),
            () = generation.cancelled() => Outcome::Retired,
        };
        self.finish(outcome, exchange)
    }

    fn finish(self, outcome: Outcome, exchange: Exchange) -> Response<ResponseBody> {
        let AppRequest { call, in_flight, may_upgrade } = self;
        drop(call);
        let generation = in_flight.generation.number();
        let connection = exchange.connection();
        let mut response = outcome.response(in_flight, exchange.server.config.max_body_size, connection);
        if may_upgrade && response.status() != StatusCode::SWITCHING_PROTOCOLS {
            connection.set_upgrading(false);
            if exchange.server.is_shutting_down() {
                // The shutdown's request to finish skipped this connection while
                // it might upgrade: close it after this answer.
                close_after(&mut response);
            }
        }
        exchange.respond(response, Some(generation))
    }
}

/// How an app call ended.
enum Outcome {
    Answered(AppResponse),
    Failed(CallError),
    TimedOut(Duration),
    Retired,
}

impl From<Result<AppResponse, CallError>> for Outcome {
    fn from(result: Result<AppResponse, CallError>) -> Outcome {
        match result {
            Ok(response) => Outcome::Answered(response),
            Err(e) => Outcome::Failed(e),
        }
    }
}

impl Outcome {
    fn response(self, in_flight: InFlight, max_body_size: u64, connection: &Connection) -> Response<ResponseBody> {
        let generation = in_flight.generation.number();
        match self {
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

//! Serving a `tower::Service` (an axum `Router`): the `tower` feature and
//! [`export_service!`](crate::export_service).
//!
//! ```ignore
//! use app_abi::{InitContext, InitError};
//! use axum::{routing::get, Router};
//!
//! fn app(ctx: &InitContext) -> Result<Router, InitError> {
//!     let greeting = ctx.setting("greeting").unwrap_or("Hello, World!").to_owned();
//!     Ok(Router::new().route("/", get(move || async move { greeting })))
//! }
//!
//! app_abi::export_service!(app);
//! ```
//!
//! What the service sees is what hyper would give it:
//! - an `http::Request<`[`Body`]`>`: method, origin-form URI, version and
//!   headers as the client sent them; the body streams from the host and
//!   stops at the host's `--max-body-size` (the client gets `413`, whatever
//!   the service answers);
//! - in its extensions, the client's address: axum's
//!   `ConnectInfo<SocketAddr>` with the `axum` feature, [`PeerAddr`] without;
//! - for a request that can be upgraded (HTTP/1.1 with `Upgrade`), hyper's
//!   own `OnUpgrade`: axum's `WebSocketUpgrade` works unchanged. Such a
//!   request (only such a request) is served by a hyper server of the app's
//!   over an in-memory connection, the only way to get an `OnUpgrade` from
//!   hyper; a `101` answer hands the host that connection's other end, and
//!   the host joins it to the client's.
//!
//! Any response body works: one that is complete at once goes out in the
//! same call, any other is streamed, pulled only as fast as the client reads.
//! A service error, or a `poll_ready` error, answers `500` and is logged; a
//! body that fails midway cuts the response (logged).

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use futures_core::Stream;
use http::header::{HeaderName, HeaderValue};
use http_body::Frame;
use hyper_util::rt::TokioIo;
use tower_service::Service;

use crate::ffi::host::HeadRef;
use crate::request::{OwnedBody, Request, Version};
use crate::response::{Body as ResponseBody, Response};
use crate::InitError;

/// The error type of bodies and services.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's address, in every request's extensions without the `axum`
/// feature (with it, axum's `ConnectInfo<SocketAddr>` is there instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The request body a service gets: it implements `http_body::Body`, with
/// the exact size hint when the client declared a length.
pub struct Body {
    kind: Kind,
}

enum Kind {
    Empty,
    Host(OwnedBody),
    Hyper(hyper::body::Incoming),
}

impl Body {
    /// An empty body.
    pub fn empty() -> Body {
        Body { kind: Kind::Empty }
    }

    fn host(body: OwnedBody) -> Body {
        let kind = if body.is_end() { Kind::Empty } else { Kind::Host(body) };
        Body { kind }
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body").field("size_hint", &http_body::Body::size_hint(self)).finish()
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Host(body) => body.poll_chunk(cx).map(|chunk| chunk.map(|c| c.map(Frame::data).map_err(Into::into))),
            Kind::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Host(body) => body.is_end(),
            Kind::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.kind {
            Kind::Empty => http_body::SizeHint::with_exact(0),
            Kind::Host(body) => body.size().map(http_body::SizeHint::with_exact).unwrap_or_default(),
            Kind::Hyper(body) => body.size_hint(),
        }
    }
}

/// What [`export_service!`](crate::export_service) serves: a service, made
/// once per generation by the app's function. Not for direct use.
#[doc(hidden)]
pub struct ServiceApp {
    service: Box<dyn Serve>,
}

/// The app's function may fail with any error that converts into an
/// [`InitError`].
#[doc(hidden)]
pub fn made<S, E: Into<InitError>>(made: Result<S, E>) -> Result<S, InitError> {
    made.map_err(Into::into)
}

impl ServiceApp {
    pub fn new<S, B>(service: S) -> ServiceApp
    where
        S: Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        ServiceApp { service: Box::new(Erased(service)) }
    }

    pub fn handle(&self, req: Request<'_>) -> Pin<Box<dyn Future<Output = Response> + Send + 'static>> {
        let upgrade = req.is_upgrade();
        let peer = req.peer_addr();
        match http_request(req, peer) {
            Ok(request) => self.service.serve(request, peer, upgrade),
            Err(bad) => Box::pin(std::future::ready(bad)),
        }
    }
}

/// A service with its types erased, so [`ServiceApp`] needs no type
/// parameter (the export macro cannot name the service's type).
trait Serve: Send + Sync + 'static {
    fn serve(
        &self,
        request: http::Request<Body>,
        peer: Option<SocketAddr>,
        upgrade: bool,
    ) -> Pin<Box<dyn Future<Output = Response> + Send + 'static>>;
}

struct Erased<S>(S);

impl<S, B> Serve for Erased<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn serve(
        &self,
        request: http::Request<Body>,
        peer: Option<SocketAddr>,
        upgrade: bool,
    ) -> Pin<Box<dyn Future<Output = Response> + Send + 'static>> {
        let mut service = self.0.clone();
        if upgrade {
            return Box::pin(through_hyper(service, request, peer));
        }
        // A service that is ready at once (an axum `Router` always is) is
        // called here, so the future boxed is its own, not one that still
        // holds the request and moves it on. One that is not is asked again
        // with the real waker.
        match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => Box::pin(answer(service.call(request))),
            Poll::Ready(Err(e)) => Box::pin(std::future::ready(failed(e.into()))),
            Poll::Pending => Box::pin(answer(call(service, request))),
        }
    }
}

/// The response of a called service, as the host takes it.
async fn answer<B, E>(called: impl Future<Output = Result<http::Response<B>, E>>) -> Response
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    E: Into<BoxError>,
{
    match called.await.map_err(Into::into) {
        Ok(response) => app_response(response, false).await,
        Err(e) => failed(e),
    }
}

/// `poll_ready`, then `call`, as tower requires.
async fn call<S, R>(mut service: S, request: R) -> Result<S::Response, S::Error>
where
    S: Service<R>,
{
    poll_fn(|cx| service.poll_ready(cx)).await?;
    service.call(request).await
}

fn failed(error: BoxError) -> Response {
    tracing::error!("the service failed: {error}; answered 500");
    Response::text("internal server error\n").with_status(500)
}

/// The host's request as an `http::Request`, or the `400` to answer. It
/// fills the parts of `http::Request::new` in place (an empty header map,
/// the URI `/`, HTTP/1.1) rather than building and swapping them in: what
/// is default already, a `GET /` over HTTP/1.1, costs nothing.
fn http_request(req: Request<'_>, peer: Option<SocketAddr>) -> Result<http::Request<Body>, Response> {
    let bad = |what: &str| Response::text(format!("bad request: {what}\n")).with_status(400);
    let head = req.head();
    let method = http::Method::from_bytes(head.method_bytes()).map_err(|_| bad("method"))?;
    let uri = match (req.path(), req.query()) {
        ("/", None) => None,
        (path, Some(query)) => Some(http::Uri::try_from(format!("{path}?{query}"))),
        (path, None) => Some(http::Uri::try_from(path)),
    }
    .transpose()
    .map_err(|_| bad("target"))?;
    let version = match req.version() {
        Version::Http11 => None,
        Version::Http09 => Some(http::Version::HTTP_09),
        Version::Http10 => Some(http::Version::HTTP_10),
        Version::Http2 => Some(http::Version::HTTP_2),
        Version::Http3 => Some(http::Version::HTTP_3),
    };
    let mut request = http::Request::new(Body::host(req.into_body()));
    copy_request_headers(head, request.headers_mut()).map_err(bad)?;
    if method != http::Method::GET {
        *request.method_mut() = method;
    }
    if let Some(uri) = uri {
        *request.uri_mut() = uri;
    }
    if let Some(version) = version {
        *request.version_mut() = version;
    }
    add_peer(request.extensions_mut(), peer);
    Ok(request)
}

/// Appends the host's request headers to `headers`; on a bad one, what is
/// bad.
fn copy_request_headers(head: HeadRef<'_>, headers: &mut http::HeaderMap) -> Result<(), &'static str> {
    let count = head.header_bytes().len();
    headers.reserve(count);
    // Past a few headers, all values go in one buffer, each header's value
    // a slice of it: two allocations for the values, not one per header.
    let mut values = match count {
        0..=2 => Bytes::new(),
        _ => {
            let mut all = bytes::BytesMut::with_capacity(head.header_bytes().map(|(_, v)| v.len()).sum());
            head.header_bytes().for_each(|(_, value)| all.extend_from_slice(value));
            all.freeze()
        }
    };
    for (name, value) in head.header_bytes() {
        let name = HeaderName::from_bytes(name).map_err(|_| "header name")?;
        let value = match count {
            0..=2 => HeaderValue::from_bytes(value),
            _ => HeaderValue::from_maybe_shared(values.split_to(value.len())),
        }
        .map_err(|_| "header value")?;
        headers.append(name, value);
    }
    Ok(())
}

/// The client's address in the extensions: axum's `ConnectInfo` with the
/// `axum` feature, [`PeerAddr`] without.
fn add_peer(extensions: &mut http::Extensions, peer: Option<SocketAddr>) {
    if let Some(peer) = peer {
        #[cfg(feature = "axum")]
        extensions.insert(axum::extract::ConnectInfo(peer));
        #[cfg(not(feature = "axum"))]
        extensions.insert(PeerAddr(peer));
    }
}

/// An `http::Response` as the host takes it. `framed`: it came over the
/// in-memory connection, so its framing headers describe that hop, and the
/// host's server frames the body anew.
async fn app_response<B>(response: http::Response<B>, framed: bool) -> Response
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (parts, body) = response.into_parts();
    let mut out = Response::new(parts.status.as_u16());
    out.body = response_body(body).await;
    // A length that complete bytes carry anyway: the host's server writes it.
    let implied = match &out.body {
        ResponseBody::Bytes(bytes) if !framed => Some(bytes.len()),
        _ => None,
    };
    copy_headers(&parts.headers, &mut out, framed, implied);
    out
}

/// Copies `headers` into `out`, less `transfer-encoding` if `framed` and
/// less a `content-length` equal to `implied`, borrowing the common names and
/// values instead of copying them.
fn copy_headers(headers: &http::HeaderMap, out: &mut Response, framed: bool, implied: Option<usize>) {
    use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
    for (name, value) in headers {
        if framed && name == TRANSFER_ENCODING {
            continue;
        }
        let length = || value.to_str().ok().and_then(|v| v.parse::<usize>().ok());
        if name == CONTENT_LENGTH && implied.is_some() && length() == implied {
            continue;
        }
        // Standard names compare as a tag, without looking at the text.
        let name = match COMMON_NAMES.iter().find(|common| *common == name) {
            Some(common) => Cow::Borrowed(common.as_str().as_bytes()),
            None => Cow::Owned(name.as_str().as_bytes().to_vec()),
        };
        let value = match COMMON_VALUES.iter().find(|common| common.as_bytes() == value.as_bytes()) {
            Some(common) => Cow::Borrowed(common.as_bytes()),
            None => Cow::Owned(value.as_bytes().to_vec()),
        };
        out.headers.push_bytes(name, value);
    }
}

/// The names `copy_headers` lends instead of copying (a `static`, so their
/// text is `'static`).
static COMMON_NAMES: [HeaderName; 8] = {
    use http::header::{CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, SEC_WEBSOCKET_ACCEPT};
    use http::header::{UPGRADE, VARY};
    [CONTENT_TYPE, CONTENT_LENGTH, CACHE_CONTROL, LOCATION, VARY, UPGRADE, CONNECTION, SEC_WEBSOCKET_ACCEPT]
};

const COMMON_VALUES: [&str; 8] = [
    "text/plain; charset=utf-8",
    "text/html; charset=utf-8",
    "application/json",
    "text/event-stream",
    "application/octet-stream",
    "no-cache",
    "websocket",
    "upgrade",
];

/// The body as the host takes it: complete bytes when the body is complete
/// at once (one frame, then its end), a stream otherwise.
async fn response_body<B>(body: B) -> ResponseBody
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return ResponseBody::Bytes(Bytes::new());
    }
    let mut body = Box::pin(body);
    let first = poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await;
    let first = match first {
        Poll::Ready(None) => return ResponseBody::Bytes(Bytes::new()),
        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
            Ok(mut data) => {
                let data = data.copy_to_bytes(data.remaining());
                if body.is_end_stream() {
                    return ResponseBody::Bytes(data);
                }
                Some(Ok(data))
            }
            Err(_trailers) => None,
        },
        Poll::Ready(Some(Err(e))) => Some(Err(e.into().to_string())),
        Poll::Pending => None,
    };
    ResponseBody::Stream(Box::pin(BodyChunks { first, body }))
}

/// An `http_body::Body` as the stream of chunks the host pulls.
struct BodyChunks<B> {
    first: Option<Result<Bytes, String>>,
    body: Pin<Box<B>>,
}

impl<B> Stream for BodyChunks<B>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    type Item = Result<Bytes, String>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(first));
        }
        loop {
            return match this.body.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) if data.has_remaining() => Poll::Ready(Some(Ok(data.copy_to_bytes(data.remaining())))),
                    // Empty data and trailers: the host sends no trailers.
                    _ => continue,
                },
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into().to_string()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

/// How many bytes may wait in each direction of the in-memory connection.
const UPGRADE_BUFFER: usize = 64 * 1024;

/// Serves an upgradable request through a hyper server of the app's, over
/// an in-memory connection whose client side is a hyper client: the service
/// gets hyper's own `OnUpgrade`. On `101`, the client side's upgraded
/// connection goes to the host, which joins it to the real client.
async fn through_hyper<S, B>(service: S, request: http::Request<Body>, peer: Option<SocketAddr>) -> Response
where
    S: Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (client_end, server_end) = tokio::io::duplex(UPGRADE_BUFFER);
    let serve = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let mut request = request.map(|body| Body { kind: Kind::Hyper(body) });
        add_peer(request.extensions_mut(), peer);
        let service = service.clone();
        async move {
            match call(service, request).await {
                Ok(response) => Ok::<_, Infallible>(response.map(in_memory::boxed)),
                Err(e) => Ok(in_memory::error_response(e.into())),
            }
        }
    });
    let server = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server_end), serve);
    tokio::spawn(async move {
        if let Err(e) = server.with_upgrades().await {
            tracing::debug!("in-memory connection for an upgrade ended: {e}");
        }
    });
    let exchanged = async {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client_end)).await?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        sender.send_request(request).await
    };
    let mut response = match exchanged.await {
        Ok(response) => response,
        Err(e) => return failed(e.into()),
    };
    if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        return app_response(response, true).await;
    }
    let headers = std::mem::take(response.headers_mut());
    match hyper::upgrade::on(response).await {
        Ok(upgraded) => {
            let mut out = Response::upgraded(Box::pin(TokioIo::new(upgraded)));
            copy_headers(&headers, &mut out, false, None);
            out
        }
        Err(e) => failed(e.into()),
    }
}

/// The response body of the in-memory server: the service's body, boxed,
/// or the text of a `500`.
mod in_memory {
    use super::*;

    pub(super) type Boxed = Pin<Box<dyn http_body::Body<Data = Bytes, Error = BoxError> + Send>>;

    pub(super) fn boxed<B>(body: B) -> Boxed
    where
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        Box::pin(Mapped(Box::pin(body)))
    }

    pub(super) fn error_response(error: BoxError) -> http::Response<Boxed> {
        tracing::error!("the service failed: {error}; answered 500");
        let mut response = http::Response::new(boxed(Full(Some(Bytes::from_static(b"internal server error\n")))));
        *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        response
    }

    /// Any body as `Data = Bytes`, `Error = BoxError`.
    struct Mapped<B>(Pin<Box<B>>);

    impl<B> http_body::Body for Mapped<B>
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.get_mut().0.as_mut().poll_frame(cx).map(|frame| {
                frame.map(|frame| {
                    frame
                        .map(|frame| frame.map_data(|mut data| data.copy_to_bytes(data.remaining())))
                        .map_err(Into::into)
                })
            })
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_end_stream()
        }

        fn size_hint(&self) -> http_body::SizeHint {
            self.0.size_hint()
        }
    }

    /// A complete body.
    struct Full(Option<Bytes>);

    impl http_body::Body for Full {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.get_mut().0.take().map(|bytes| Ok(Frame::data(bytes))))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::response::Body as ResponseBody;

    /// A service not ready at its first `not_ready` calls of `poll_ready`
    /// (each wakes its caller 5 ms later, from another task), then ready, or
    /// failing when `fails`; it answers `204` "done".
    #[derive(Clone)]
    struct Gated {
        polls: Arc<AtomicUsize>,
        not_ready: usize,
        fails: bool,
    }

    impl Service<http::Request<Body>> for Gated {
        type Response = http::Response<String>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<http::Response<String>, BoxError>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            if self.polls.fetch_add(1, Ordering::SeqCst) < self.not_ready {
                let waker = cx.waker().clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    waker.wake();
                });
                return Poll::Pending;
            }
            match self.fails {
                true => Poll::Ready(Err("overloaded".into())),
                false => Poll::Ready(Ok(())),
            }
        }

        fn call(&mut self, _request: http::Request<Body>) -> Self::Future {
            let mut response = http::Response::new("done".to_owned());
            *response.status_mut() = http::StatusCode::NO_CONTENT;
            std::future::ready(Ok(response))
        }
    }

    /// Serves one request; the response and how often `poll_ready` ran.
    async fn serve(not_ready: usize, fails: bool) -> (Response, usize) {
        let polls = Arc::new(AtomicUsize::new(0));
        let service = Erased(Gated { polls: polls.clone(), not_ready, fails });
        let served = service.serve(http::Request::new(Body::empty()), None, false);
        let response = tokio::time::timeout(Duration::from_secs(10), served).await.expect("answered");
        (response, polls.load(Ordering::SeqCst))
    }

    fn says_done(response: &Response) -> bool {
        matches!(&response.body, ResponseBody::Bytes(bytes) if bytes.as_ref() == b"done")
    }

    #[tokio::test]
    async fn a_service_ready_at_once_is_called_at_once() {
        let (response, polls) = serve(0, false).await;
        assert_eq!((response.status, polls), (204, 1));
        assert!(says_done(&response));
    }

    /// The second `Pending` is answered to the real waker only: if it were
    /// not kept, the request would never be answered.
    #[tokio::test]
    async fn a_service_not_ready_at_once_is_asked_again_when_it_wakes_its_caller() {
        let (response, polls) = serve(2, false).await;
        assert_eq!((response.status, polls), (204, 3));
        assert!(says_done(&response));
    }

    #[tokio::test]
    async fn a_service_whose_poll_ready_fails_answers_500() {
        assert_eq!(serve(0, true).await.0.status, 500);
        let (response, polls) = serve(1, true).await;
        assert_eq!((response.status, polls), (500, 2));
    }
}

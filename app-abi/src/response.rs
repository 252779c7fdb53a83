//! The response an app handler returns.

use std::borrow::Cow;
use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::ffi::header_list::HeaderList;

type HeaderText = Cow<'static, str>;

pub(crate) type BoxStream = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// The app's end of an upgraded connection, as the host drives it.
pub(crate) trait UpgradedIo: AsyncRead + AsyncWrite + Send {}

impl<T: AsyncRead + AsyncWrite + Send + ?Sized> UpgradedIo for T {}

pub(crate) type BoxIo = Pin<Box<dyn UpgradedIo>>;

/// A response body: complete bytes, a stream of chunks that the host pulls
/// only as fast as the client reads (backpressure), or (`101`) the app's end
/// of the upgraded connection.
pub(crate) enum Body {
    Bytes(Bytes),
    Stream(BoxStream),
    Upgrade(BoxIo),
}

/// A connection the app took over with [`Response::upgrade`]: it reads what
/// the client sends after the `101`, and what it writes goes to the client.
pub type Upgraded = tokio::io::DuplexStream;

/// How many bytes may wait in each direction between the host and an
/// upgraded connection's task.
const UPGRADE_BUFFER: usize = 64 * 1024;

/// An HTTP response.
///
/// ```
/// use app_abi::Response;
/// let ok = Response::text("Hello, World!");
/// let missing = Response::text("no such page\n").with_status(404);
/// let json = Response::bytes("application/json", r#"{"ok":true}"#).with_header("cache-control", "no-store");
/// # let _ = (ok, missing, json);
/// ```
pub struct Response {
    pub(crate) status: u16,
    pub(crate) headers: HeaderList,
    pub(crate) body: Body,
}

/// Headers holding `content-type`, with room for one more.
fn content_type_headers(content_type: HeaderText) -> HeaderList {
    let mut headers = HeaderList::with_capacity(2);
    headers.push(Cow::Borrowed("content-type"), content_type);
    headers
}

impl Response {
    /// An empty response with `status`.
    pub fn new(status: u16) -> Response {
        Response { status, headers: HeaderList::default(), body: Body::Bytes(Bytes::new()) }
    }

    /// `200` with a `text/plain; charset=utf-8` body.
    pub fn text(body: impl Into<Bytes>) -> Response {
        Response::bytes("text/plain; charset=utf-8", body)
    }

    /// `200` with a body of `content_type`.
    pub fn bytes(content_type: impl Into<HeaderText>, body: impl Into<Bytes>) -> Response {
        Response { status: 200, headers: content_type_headers(content_type.into()), body: Body::Bytes(body.into()) }
    }

    /// `200` with a body streamed from `stream`; the host pulls the next
    /// chunk only when the client has taken the previous one.
    pub fn stream<S>(content_type: impl Into<HeaderText>, stream: S) -> Response
    where
        S: Stream<Item = Bytes> + Send + 'static,
    {
        Response::try_stream(content_type, Infallibly(Box::pin(stream)))
    }

    /// Like [`Response::stream`], for a stream that can fail: on an error the
    /// host logs it and cuts the response (the client sees an incomplete body).
    pub fn try_stream<S, E>(content_type: impl Into<HeaderText>, stream: S) -> Response
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Display,
    {
        Response {
            status: 200,
            headers: content_type_headers(content_type.into()),
            body: Body::Stream(Box::pin(ErrorsAsText(Box::pin(stream)))),
        }
    }

    /// `200` with a streamed body fed through a channel that holds at most
    /// `capacity` chunks: [`BodySender::send`] waits while it is full.
    pub fn channel(content_type: impl Into<HeaderText>, capacity: usize) -> (Response, BodySender) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Response::stream(content_type, ChannelStream(rx)), BodySender { tx })
    }

    /// `101 Switching Protocols`, taking the connection over: answer it to a
    /// request whose [`Request::is_upgrade`](crate::Request::is_upgrade) is
    /// true (any other gets `500`), with the protocol's headers added by
    /// [`Response::with_header`]. `on_upgrade` runs at once as a task of the
    /// generation's runtime (call this inside a handler) with the
    /// connection; if the client is gone before the upgrade, it reads the
    /// end at once.
    ///
    /// The connection keeps the generation's code loaded. When the
    /// generation drains ([`DrainSignal`](crate::DrainSignal)), finish the
    /// protocol's way (a WebSocket Close 1001, say): the host cuts the
    /// connection at `reload_timeout` (on shutdown, `shutdown_timeout`).
    /// Closing or dropping the connection ends it for the client too.
    pub fn upgrade<F, Fut>(on_upgrade: F) -> Response
    where
        F: FnOnce(Upgraded) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (host_end, app_end) = tokio::io::duplex(UPGRADE_BUFFER);
        tokio::spawn(async move { on_upgrade(app_end).await });
        Response::upgraded(Box::pin(host_end))
    }

    /// `101` handing the host `io`, the app's end of the connection.
    pub(crate) fn upgraded(io: BoxIo) -> Response {
        Response { status: 101, headers: HeaderList::default(), body: Body::Upgrade(io) }
    }

    pub fn with_status(mut self, status: u16) -> Response {
        self.status = status;
        self
    }

    /// Adds a header (it does not replace one of the same name).
    pub fn with_header(mut self, name: impl Into<HeaderText>, value: impl Into<HeaderText>) -> Response {
        self.headers.push(name.into(), value.into());
        self
    }

    pub fn status(&self) -> u16 {
        self.status
    }
}

/// The sending half of [`Response::channel`].
pub struct BodySender {
    tx: mpsc::Sender<Bytes>,
}

/// The client is gone (or the response was cancelled): stop producing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientGone;

impl std::fmt::Display for ClientGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the response was closed before the body ended")
    }
}

impl std::error::Error for ClientGone {}

impl BodySender {
    /// Sends a chunk, waiting while the channel is full.
    pub async fn send(&self, chunk: impl Into<Bytes>) -> Result<(), ClientGone> {
        self.tx.send(chunk.into()).await.map_err(|_| ClientGone)
    }

    /// Whether the response was closed (client gone or request cancelled).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

struct ChannelStream(mpsc::Receiver<Bytes>);

impl Stream for ChannelStream {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        self.0.poll_recv(cx)
    }
}

/// Adapts a stream of chunks to the fallible form. The inner stream is boxed
/// so it can be polled without unsafe pin projection.
struct Infallibly<S>(Pin<Box<S>>);

impl<S: Stream<Item = Bytes>> Stream for Infallibly<S> {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().0.as_mut().poll_next(cx).map(|item| item.map(Ok))
    }
}

/// Turns a stream's errors into text for the host's log.
struct ErrorsAsText<S>(Pin<Box<S>>);

impl<S, E> Stream for ErrorsAsText<S>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: Display,
{
    type Item = Result<Bytes, String>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().0.as_mut().poll_next(cx).map(|item| item.map(|r| r.map_err(|e| e.to_string())))
    }
}

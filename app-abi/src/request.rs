//! The request an app handler receives.

use std::fmt;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_core::Stream;

use crate::ffi::abi::{body_status, version};
use crate::ffi::host::{BodyGate, HeadRef, HostBodyRef};

/// The HTTP version of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http09,
    Http10,
    Http11,
    Http2,
    Http3,
}

/// An HTTP request, borrowed from the host for as long as the handler runs.
///
/// The head (method, path, headers) is not copied: it is read in place from
/// the host's buffers, which is why a `Request` cannot outlive the handler
/// (it cannot be moved into a `tokio::spawn`ed task; copy what such a task
/// needs).
pub struct Request<'a> {
    head: HeadRef<'a>,
    /// The body for readers that outlive the handler (`None`: no body).
    gate: Option<Arc<BodyGate>>,
}

impl<'a> Request<'a> {
    pub(crate) fn new(head: HeadRef<'a>, gate: Option<Arc<BodyGate>>) -> Request<'a> {
        Request { head, gate }
    }

    /// The host's head, for conversions that read it as bytes.
    #[cfg(feature = "tower")]
    pub(crate) fn head(&self) -> HeadRef<'a> {
        self.head
    }

    /// The method, e.g. `GET`.
    pub fn method(&self) -> &'a str {
        self.head.method()
    }

    /// The path without the query, as sent (not percent-decoded), e.g. `/users/7`.
    pub fn path(&self) -> &'a str {
        self.head.path()
    }

    /// The raw query string after `?`, if there was one.
    pub fn query(&self) -> Option<&'a str> {
        self.head.query()
    }

    /// The raw value of the first query parameter called `name` (not
    /// percent-decoded); `Some("")` for a bare `?name`.
    pub fn query_param(&self, name: &str) -> Option<&'a str> {
        self.query()?.split('&').find_map(|pair| match pair.split_once('=') {
            Some((key, value)) if key == name => Some(value),
            None if pair == name => Some(""),
            _ => None,
        })
    }

    pub fn version(&self) -> Version {
        match self.head.version() {
            version::HTTP_09 => Version::Http09,
            version::HTTP_10 => Version::Http10,
            version::HTTP_2 => Version::Http2,
            version::HTTP_3 => Version::Http3,
            _ => Version::Http11,
        }
    }

    /// The first value of header `name` (case-insensitive), if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers().find(|(n, _)| n.eq_ignore_ascii_case(name)).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// All headers in arrival order: lowercase name, raw value.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = (&'a str, &'a [u8])> {
        self.head.headers()
    }

    /// The address of the client, if the host knows it.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.head.peer()
    }

    /// Whether the host can hand this request's connection to the app (an
    /// HTTP/1.1 request with an `Upgrade` header): answer
    /// [`Response::upgrade`](crate::Response::upgrade) to take it.
    pub fn is_upgrade(&self) -> bool {
        self.head.upgrade()
    }

    /// The body's exact length, when the client declared it (`Some(0)`: no body).
    pub fn body_size(&self) -> Option<u64> {
        self.head.body_size()
    }

    /// The request body, as a stream of chunks. It is bounded by the host's
    /// `max_body_size`: past it, reading fails with [`BodyError::TooLarge`]
    /// and the client gets `413` whatever the handler answers. It takes
    /// `&mut self` so only one reader exists at a time.
    pub fn body(&mut self) -> RequestBody<'_> {
        RequestBody { raw: self.head.body(), done: false }
    }

    /// The request body as an owned value that may outlive the handler's
    /// borrow (moved into a task, say). Reading it after the response was
    /// sent fails with [`BodyError::Read`]. Same limit as [`Request::body`].
    pub fn into_body(self) -> OwnedBody {
        OwnedBody { gate: self.gate, size: self.head.body_size(), done: false }
    }
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method())
            .field("path", &self.path())
            .field("query", &self.query())
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

/// Why reading a request body failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyError {
    /// The body is larger than the host's `max_body_size` (in bytes).
    TooLarge { limit: u64 },
    /// The host could not read the body (the client went away, bad framing...).
    Read(String),
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::TooLarge { limit } => write!(f, "request body is larger than the limit of {limit} bytes"),
            BodyError::Read(reason) => write!(f, "could not read the request body: {reason}"),
        }
    }
}

impl std::error::Error for BodyError {}

/// A request body: read it chunk by chunk with [`RequestBody::chunk`] (or as
/// a [`Stream`]), or whole with [`RequestBody::collect`].
pub struct RequestBody<'a> {
    raw: HostBodyRef<'a>,
    done: bool,
}

impl RequestBody<'_> {
    /// The next chunk, or `None` at the end of the body.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        poll_fn(|cx| self.poll_chunk(cx)).await.transpose()
    }

    /// The whole body.
    pub async fn collect(mut self) -> Result<Bytes, BodyError> {
        let mut all = BytesMut::new();
        while let Some(chunk) = self.chunk().await? {
            all.extend_from_slice(&chunk);
        }
        Ok(all.freeze())
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let (code, bytes) = self.raw.poll(cx.waker());
        let polled = decode(code, bytes, Bytes::copy_from_slice);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.done = true;
        }
        polled
    }
}

/// What a [`body_status`] code and the bytes that came with it mean.
fn decode<B: AsRef<[u8]>>(
    code: u32,
    bytes: B,
    chunk: impl FnOnce(B) -> Bytes,
) -> Poll<Option<Result<Bytes, BodyError>>> {
    match code {
        body_status::CHUNK => Poll::Ready(Some(Ok(chunk(bytes)))),
        body_status::END => Poll::Ready(None),
        body_status::PENDING => Poll::Pending,
        body_status::TOO_LARGE => {
            let limit = std::str::from_utf8(bytes.as_ref()).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
            Poll::Ready(Some(Err(BodyError::TooLarge { limit })))
        }
        _ => Poll::Ready(Some(Err(BodyError::Read(String::from_utf8_lossy(bytes.as_ref()).into_owned())))),
    }
}

/// A request body that is not tied to the handler's borrow: see
/// [`Request::into_body`]. Read it as a [`Stream`] or with
/// [`OwnedBody::collect`].
pub struct OwnedBody {
    gate: Option<Arc<BodyGate>>,
    size: Option<u64>,
    done: bool,
}

impl OwnedBody {
    /// The whole body.
    pub async fn collect(mut self) -> Result<Bytes, BodyError> {
        let mut all = BytesMut::new();
        while let Some(chunk) = poll_fn(|cx| self.poll_chunk(cx)).await {
            all.extend_from_slice(&chunk?);
        }
        Ok(all.freeze())
    }

    /// The body's exact length, when the client declared it.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// Whether nothing more will come.
    pub fn is_end(&self) -> bool {
        self.done || self.gate.is_none() || self.size == Some(0)
    }

    pub(crate) fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        let Some(gate) = self.gate.as_ref().filter(|_| !self.done) else {
            return Poll::Ready(None);
        };
        let Some((code, bytes)) = gate.poll(cx.waker()) else {
            self.done = true;
            return Poll::Ready(Some(Err(BodyError::Read("the request has ended".to_owned()))));
        };
        let polled = decode(code, bytes, |bytes| bytes);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.done = true;
        }
        polled
    }
}

impl Stream for OwnedBody {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_chunk(cx)
    }
}

impl fmt::Debug for OwnedBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedBody").field("size", &self.size).field("done", &self.done).finish()
    }
}

impl Stream for RequestBody<'_> {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_chunk(cx)
    }
}

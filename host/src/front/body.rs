//! The body of every response the host sends.
//!
//! One concrete type (no boxing) for host answers, complete app bodies and
//! streamed app bodies. It carries the request's guards ([`Activity`] on its
//! connection, [`InFlight`] in its generation), so a request counts as in
//! flight until hyper drops its body: after the last byte is written, or
//! when the connection fails. Through the [`Activity`] it also tells its
//! connection when a frame it handed out is waiting on the client
//! (`send_timeout`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::access::RequestRecord;
use super::connection::Activity;
use crate::ffi::AppStream;
use crate::generations::stalls::{self, CallKind};
use crate::generations::InFlight;

/// Why a streamed body was cut short.
#[derive(Debug, thiserror::Error)]
pub enum BodyAborted {
    #[error("the app's response stream failed")]
    StreamFailed,
    #[error("the generation was retired before the stream ended")]
    Retired,
}

pub struct ResponseBody {
    kind: Kind,
    _in_flight: Option<InFlight>,
    activity: Option<Activity>,
    record: Option<Box<RequestRecord>>,
}

enum Kind {
    Full(Option<Bytes>),
    Stream { stream: AppStream, retired: Pin<Box<dyn Future<Output = ()> + Send>> },
}

impl ResponseBody {
    /// A complete body.
    pub fn full(bytes: Bytes, in_flight: Option<InFlight>) -> ResponseBody {
        let bytes = (!bytes.is_empty()).then_some(bytes);
        ResponseBody { kind: Kind::Full(bytes), _in_flight: in_flight, activity: None, record: None }
    }

    /// A body streamed from the app, cut short if its generation is retired
    /// before it ends.
    pub fn stream(stream: AppStream, in_flight: InFlight) -> ResponseBody {
        let generation = in_flight.generation.clone();
        let retired = Box::pin(async move { generation.cancelled().await });
        ResponseBody {
            kind: Kind::Stream { stream, retired },
            _in_flight: Some(in_flight),
            activity: None,
            record: None,
        }
    }

    /// Attaches the request's connection activity and its record (finished
    /// when this body is dropped).
    pub fn attach(&mut self, activity: Activity, record: Option<RequestRecord>) {
        self.activity = Some(activity);
        self.record = record.map(Box::new);
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            record.finish();
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyAborted;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyAborted>>> {
        let this = self.get_mut();
        if let Some(activity) = &mut this.activity {
            activity.frame_asked();
        }
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(Ok)),
            Kind::Stream { stream, retired } => {
                if retired.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(BodyAborted::Retired)));
                }
                let generation = this._in_flight.as_ref().map_or(0, |in_flight| in_flight.generation.number());
                let _running = stalls::enter(CallKind::Stream, generation, None);
                stream.poll_chunk(cx).map(|chunk| chunk.map(|c| c.map_err(|_| BodyAborted::StreamFailed)))
            }
        };
        if let Poll::Ready(Some(Ok(bytes))) = &polled {
            if let Some(record) = &mut this.record {
                record.sent(bytes.len());
            }
            if let Some(activity) = &mut this.activity {
                activity.frame_given();
            }
        }
        polled.map(|chunk| chunk.map(|c| c.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.kind, Kind::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream { .. } => SizeHint::default(),
        }
    }
}

//! The admin API's answers: JSON objects, `{"error": "..."}` naming the problem, plain text, or
//! a streamed body (the registry export).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Body, Frame, SizeHint};
use serde_json::json;
use tokio::sync::mpsc;

pub(super) type Answer = Response<AnswerBody>;

/// A whole body, or one streamed from a channel. A streamed body that ends in an error is cut
/// off without its last chunk marker, so the client sees a broken transfer, never a short one
/// that looks complete.
pub(super) enum AnswerBody {
    Full(Full<Bytes>),
    Stream(mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

impl AnswerBody {
    pub(super) fn full(bytes: impl Into<Bytes>) -> AnswerBody {
        AnswerBody::Full(Full::new(bytes.into()))
    }
}

impl Body for AnswerBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            AnswerBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|never| match never {}))),
            AnswerBody::Stream(rx) => rx.poll_recv(cx).map(|c| c.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AnswerBody::Full(full) => full.is_end_stream(),
            AnswerBody::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AnswerBody::Full(full) => full.size_hint(),
            AnswerBody::Stream(_) => SizeHint::default(),
        }
    }
}

pub(super) fn json_answer(status: StatusCode, value: serde_json::Value) -> Answer {
    let mut resp = Response::new(AnswerBody::full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The message of an error answer, kept beside its body for the audit log.
#[derive(Clone)]
pub(super) struct ErrorText(pub String);

pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    let message = message.into();
    let mut resp = json_answer(status, json!({"error": message}));
    resp.extensions_mut().insert(ErrorText(message));
    resp
}

pub(super) fn text(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    let mut resp = Response::new(AnswerBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

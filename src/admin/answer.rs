//! The admin API's answers: JSON objects, `{"error": "..."}` naming the problem, or plain text.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

pub(super) type Answer = Response<Full<Bytes>>;

pub(super) fn json_answer(status: StatusCode, value: serde_json::Value) -> Answer {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
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
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

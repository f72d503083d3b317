//! NDJSON request bodies (batches and full replaces), parsed line by line as they arrive.

use bytes::{Bytes, BytesMut};
use http::StatusCode;

use super::answer::{Answer, error};
use super::body::Body;

/// Longest NDJSON line accepted in a batch or replace.
const MAX_LINE: usize = 64 * 1024;

/// Streams an NDJSON body to `each` on a blocking thread (a full replace can carry 10 million
/// lines), stopping at the first bad line with a 400 `line N: problem`, or with the body's own
/// fault (too slow: 408).
pub(super) async fn read_ndjson<T, F>(mut body: Body, init: T, mut each: F) -> Result<T, Answer>
where
    T: Send + 'static,
    F: FnMut(&mut T, &str) -> Result<(), String> + Send + 'static,
{
    // `None` marks the end of a complete body; a channel closed without it is a body cut short.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Bytes>>(16);
    let parser = tokio::task::spawn_blocking(move || {
        let mut state = init;
        let mut pending = BytesMut::new();
        let mut line_no = 0usize;
        let mut line = |state: &mut T, raw: &[u8], line_no: usize| -> Result<(), String> {
            let text =
                std::str::from_utf8(raw).map_err(|_| format!("line {line_no}: not UTF-8"))?;
            let text = text.trim();
            if text.is_empty() {
                return Ok(());
            }
            each(state, text).map_err(|e| format!("line {line_no}: {e}"))
        };
        let mut complete = false;
        while let Some(chunk) = rx.blocking_recv() {
            let Some(chunk) = chunk else {
                complete = true;
                break;
            };
            pending.extend_from_slice(&chunk);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let raw = pending.split_to(nl + 1);
                line_no += 1;
                line(&mut state, &raw[..nl], line_no)?;
            }
            if pending.len() > MAX_LINE {
                return Err(format!(
                    "line {}: longer than {MAX_LINE} bytes",
                    line_no + 1
                ));
            }
        }
        if !complete {
            return Err("body: cut short".to_string());
        }
        if !pending.is_empty() {
            line(&mut state, &pending, line_no + 1)?;
        }
        Ok(state)
    });
    let mut body_fault = None;
    loop {
        match body.chunk().await {
            Ok(Some(data)) => {
                // The parser stopped at a bad line: its error is the answer.
                if tx.send(Some(data)).await.is_err() {
                    break;
                }
            }
            Ok(None) => {
                let _ = tx.send(None).await;
                break;
            }
            Err(fault) => {
                body_fault = Some(fault);
                break;
            }
        }
    }
    drop(tx);
    let parsed = parser.await.map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("body parser failed: {e}"),
        )
    })?;
    match (parsed, body_fault) {
        // A body cut short is answered for what cut it, not for its unfinished last line.
        (_, Some(fault)) => Err(fault.answer()),
        (Err(e), None) => Err(error(StatusCode::BAD_REQUEST, e)),
        (Ok(state), None) => Ok(state),
    }
}

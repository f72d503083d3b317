//! NDJSON request bodies (batches and full replaces), parsed line by line as they arrive.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// Longest NDJSON line accepted in a batch or replace.
const MAX_LINE: usize = 64 * 1024;

/// Streams an NDJSON body to `each` on a blocking thread (a full replace can carry 10 million
/// lines), stopping at the first bad line with `line N: problem`.
pub(super) async fn read_ndjson<T, F>(mut body: Incoming, init: T, mut each: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnMut(&mut T, &str) -> Result<(), String> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
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
        while let Some(chunk) = rx.blocking_recv() {
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
        if !pending.is_empty() {
            line(&mut state, &pending, line_no + 1)?;
        }
        Ok(state)
    });
    let mut body_error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    // The parser stopped at a bad line: its error is the answer.
                    if tx.send(data).await.is_err() {
                        break;
                    }
                }
            }
            Err(e) => {
                body_error = Some(format!("body: {e}"));
                break;
            }
        }
    }
    drop(tx);
    let parsed = parser
        .await
        .map_err(|e| format!("body parser failed: {e}"))?;
    match (parsed, body_error) {
        (Err(e), _) => Err(e),
        (Ok(_), Some(e)) => Err(e),
        (Ok(state), None) => Ok(state),
    }
}

//! Who may call `/v1`: the bearer token from `admin.token_file` (compared in constant time) and,
//! with `admin.client_ca`, a verified client certificate.

use std::path::Path;
use std::sync::Arc;

use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderValue, Request, StatusCode};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;
use tokio_rustls::TlsAcceptor;

use super::answer::{Answer, error};
use crate::config::{AdminConfig, tls};

/// How the admin listener authenticates `/v1`.
pub(crate) struct AdminAuth {
    token: Option<Vec<u8>>,
    pub(super) tls: Option<TlsAcceptor>,
    require_client_cert: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin.token_file {}: {source}", path.display())]
    Token {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("admin.token_file {}: the token is empty", .0.display())]
    EmptyToken(std::path::PathBuf),
    #[error("admin TLS: {0}")]
    Tls(String),
}

impl AdminAuth {
    pub(crate) fn load(cfg: &AdminConfig) -> Result<AdminAuth, AdminError> {
        let token = match &cfg.token_file {
            Some(path) => {
                let text = std::fs::read(path).map_err(|source| AdminError::Token {
                    path: path.clone(),
                    source,
                })?;
                let token = text.trim_ascii().to_vec();
                if token.is_empty() {
                    return Err(AdminError::EmptyToken(path.clone()));
                }
                Some(token)
            }
            None => None,
        };
        let tls = match &cfg.tls {
            Some((cert, key)) => {
                Some(admin_acceptor(cert, key, cfg.client_ca.as_deref()).map_err(AdminError::Tls)?)
            }
            None => None,
        };
        Ok(AdminAuth {
            token,
            tls,
            require_client_cert: cfg.client_ca.is_some(),
        })
    }

    /// The answer refusing a `/v1` request, or `None` when it may proceed.
    pub(super) fn refusal(&self, req: &Request<Incoming>, client_verified: bool) -> Option<Answer> {
        let Some(token) = &self.token else {
            return Some(error(
                StatusCode::FORBIDDEN,
                "the registry API is disabled: set admin.token_file",
            ));
        };
        if self.require_client_cert && !client_verified {
            return Some(error(
                StatusCode::FORBIDDEN,
                "a client certificate signed by admin.client_ca is required",
            ));
        }
        let presented = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .map(<[u8]>::trim_ascii);
        match presented {
            None => {
                let mut resp = error(StatusCode::UNAUTHORIZED, "missing bearer token");
                resp.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                Some(resp)
            }
            Some(p) if bool::from(p.ct_eq(token)) => None,
            Some(_) => Some(error(StatusCode::FORBIDDEN, "wrong bearer token")),
        }
    }
}

/// TLS for the admin listener. With a client CA, certificates are verified when offered but not
/// demanded at the handshake, so Prometheus can scrape `/metrics` without one; `/v1` then
/// requires a verified certificate.
fn admin_acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<TlsAcceptor, String> {
    let config = tls::server_config(cert, key, client_ca, &[])?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

//! Who may call `/v1`: named bearer tokens with a role (`admin.tokens_file`, and
//! `admin.token_file` as one write token), compared in constant time, reloaded on SIGHUP; and,
//! with `admin.client_ca`, a verified client certificate, whose subject names the caller in the
//! audit log.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, StatusCode};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;
use tokio_rustls::TlsAcceptor;

use super::answer::{Answer, error};
use crate::config::{AdminConfig, tls};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// `GET` calls, `/v1/decision` among them.
    Read,
    /// Everything: reads and changes.
    Write,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            _ => None,
        }
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
        }
    }
}

/// One named token.
struct Token {
    name: String,
    role: Role,
    secret: Vec<u8>,
}

/// The name the token of `admin.token_file` goes by in the audit log.
const TOKEN_FILE_NAME: &str = "token_file";

/// How the admin listener authenticates `/v1`.
pub(crate) struct AdminAuth {
    /// Swapped whole on SIGHUP: a request sees the old set or the new one.
    tokens: ArcSwap<Vec<Token>>,
    pub(super) tls: Option<TlsAcceptor>,
    require_client_cert: bool,
    /// The config the listener and its TLS were built from (a change needs a restart).
    fixed: (SocketAddr, Option<PathBuf>, Option<(PathBuf, PathBuf)>),
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
    #[error("admin.tokens_file {}: {source}", path.display())]
    Tokens {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("admin.tokens_file {}:{line}: {why}", path.display())]
    TokensLine {
        path: std::path::PathBuf,
        line: usize,
        why: String,
    },
    #[error("admin TLS: {0}")]
    Tls(String),
}

/// Who is at the other end of an admin connection.
pub(super) struct Peer {
    pub addr: SocketAddr,
    /// A client certificate from `admin.client_ca` was presented.
    pub verified: bool,
    /// Its subject (`CN=…,O=…`).
    pub subject: Option<String>,
}

impl Peer {
    pub(super) fn plain(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            verified: false,
            subject: None,
        }
    }
}

/// An authenticated `/v1` caller.
pub(super) struct Caller<'a> {
    pub name: String,
    pub role: Role,
    pub peer: &'a Peer,
}

/// A refused `/v1` call: the answer, and what the audit line and metric say.
pub(super) struct Refused {
    pub answer: Answer,
    /// `unauthorized` (no token), `forbidden` (wrong token, missing certificate, role too
    /// small), or `disabled` (no token configured).
    pub result: &'static str,
    /// The token's name when it was right but its role too small.
    pub token: Option<String>,
    pub why: String,
}

fn refused(status: StatusCode, result: &'static str, why: impl Into<String>) -> Box<Refused> {
    let why = why.into();
    Box::new(Refused {
        answer: error(status, why.clone()),
        result,
        token: None,
        why,
    })
}

impl AdminAuth {
    pub(crate) fn load(cfg: &AdminConfig) -> Result<AdminAuth, AdminError> {
        let tokens = load_tokens(cfg)?;
        let tls = match &cfg.tls {
            Some((cert, key)) => {
                Some(admin_acceptor(cert, key, cfg.client_ca.as_deref()).map_err(AdminError::Tls)?)
            }
            None => None,
        };
        Ok(AdminAuth {
            tokens: ArcSwap::from_pointee(tokens),
            tls,
            require_client_cert: cfg.client_ca.is_some(),
            fixed: (cfg.bind, cfg.client_ca.clone(), cfg.tls.clone()),
        })
    }

    /// Reads the token files again (SIGHUP). On an error the tokens in force stay. Returns
    /// whether the listener's own settings (bind, TLS, client CA) changed too, which takes a
    /// restart.
    pub(crate) fn reload(&self, cfg: &AdminConfig) -> Result<bool, AdminError> {
        let tokens = load_tokens(cfg)?;
        let names: Vec<String> = tokens
            .iter()
            .map(|t| format!("{}:{}", t.name, t.role.as_str()))
            .collect();
        self.tokens.store(Arc::new(tokens));
        tracing::info!(tokens = names.join(" "), "admin tokens reloaded");
        Ok(self.fixed != (cfg.bind, cfg.client_ca.clone(), cfg.tls.clone()))
    }

    /// The caller of a `/v1` request, or why it is refused.
    pub(super) fn caller<'a>(
        &self,
        req: &Request<Incoming>,
        peer: &'a Peer,
    ) -> Result<Caller<'a>, Box<Refused>> {
        let tokens = self.tokens.load();
        if tokens.is_empty() {
            return Err(refused(
                StatusCode::FORBIDDEN,
                "disabled",
                "the registry API is disabled: set admin.token_file or admin.tokens_file",
            ));
        }
        if self.require_client_cert && !peer.verified {
            return Err(refused(
                StatusCode::FORBIDDEN,
                "forbidden",
                "a client certificate signed by admin.client_ca is required",
            ));
        }
        let presented = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .map(<[u8]>::trim_ascii);
        let Some(presented) = presented else {
            let mut r = refused(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing bearer token",
            );
            r.answer
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return Err(r);
        };
        // Every token is compared, in constant time each, whichever matches.
        let mut found: Option<&Token> = None;
        for token in tokens.iter() {
            let equal = same(&token.secret, presented);
            if equal && found.is_none() {
                found = Some(token);
            }
        }
        let Some(token) = found else {
            return Err(refused(
                StatusCode::FORBIDDEN,
                "forbidden",
                "wrong bearer token",
            ));
        };
        let needs = if req.method() == Method::GET || req.method() == Method::HEAD {
            Role::Read
        } else {
            Role::Write
        };
        if needs == Role::Write && token.role == Role::Read {
            let mut r = refused(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "token {} has the role read: {} needs a write token",
                    token.name,
                    req.method()
                ),
            );
            r.token = Some(token.name.clone());
            return Err(r);
        }
        Ok(Caller {
            name: token.name.clone(),
            role: token.role,
            peer,
        })
    }
}

/// Whether two byte strings are equal, in time that depends on the longer one's length only (a
/// plain slice comparison returns at once when the lengths differ, telling a token's length).
fn same(secret: &[u8], presented: &[u8]) -> bool {
    let mut equal = (secret.len() as u64).ct_eq(&(presented.len() as u64));
    for i in 0..secret.len().max(presented.len()) {
        let a = secret.get(i).copied().unwrap_or(0);
        let b = presented.get(i).copied().unwrap_or(0);
        equal &= a.ct_eq(&b);
    }
    equal.into()
}

fn load_tokens(cfg: &AdminConfig) -> Result<Vec<Token>, AdminError> {
    let mut tokens = Vec::new();
    if let Some(path) = &cfg.token_file {
        let text = std::fs::read(path).map_err(|source| AdminError::Token {
            path: path.clone(),
            source,
        })?;
        let secret = text.trim_ascii().to_vec();
        if secret.is_empty() {
            return Err(AdminError::EmptyToken(path.clone()));
        }
        tokens.push(Token {
            name: TOKEN_FILE_NAME.into(),
            role: Role::Write,
            secret,
        });
    }
    if let Some(path) = &cfg.tokens_file {
        let text = std::fs::read_to_string(path).map_err(|source| AdminError::Tokens {
            path: path.clone(),
            source,
        })?;
        tokens.extend(parse_tokens(path, &text, !tokens.is_empty())?);
    }
    Ok(tokens)
}

/// `NAME ROLE TOKEN` per line; blank lines and `#` comments are skipped.
fn parse_tokens(path: &Path, text: &str, has_token_file: bool) -> Result<Vec<Token>, AdminError> {
    let mut tokens: Vec<Token> = Vec::new();
    let mut names = HashSet::new();
    if has_token_file {
        names.insert(TOKEN_FILE_NAME.to_string());
    }
    for (i, line) in text.lines().enumerate() {
        let bad = |why: String| AdminError::TokensLine {
            path: path.to_path_buf(),
            line: i + 1,
            why,
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, role, secret] = fields[..] else {
            return Err(bad(format!(
                "expected `NAME ROLE TOKEN`, found {} fields",
                fields.len()
            )));
        };
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
        {
            return Err(bad(format!(
                "name {name:?}: letters, digits and - _ . @ only"
            )));
        }
        let role = Role::parse(role)
            .ok_or_else(|| bad(format!("role {role:?}: must be read or write")))?;
        if !names.insert(name.to_string()) {
            return Err(bad(format!("name {name} is used twice")));
        }
        if tokens.iter().any(|t| t.secret == secret.as_bytes()) {
            return Err(bad(format!(
                "token of {name} is the same as another's: each caller needs its own"
            )));
        }
        tokens.push(Token {
            name: name.to_string(),
            role,
            secret: secret.as_bytes().to_vec(),
        });
    }
    Ok(tokens)
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

/// The subject of a DER certificate as `CN=…,OU=…,O=…` (the common attributes, in the order the
/// certificate lists them), or `None` when it cannot be read.
pub(super) fn subject(der: &[u8]) -> Option<String> {
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    // version [0] (optional), serial, signature algorithm, issuer, validity, subject
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xA0 {
        rest = after;
    }
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (_, mut name, _) = tlv(rest)?;
    let mut parts = Vec::new();
    while !name.is_empty() {
        let (_, set, next) = tlv(name)?;
        name = next;
        let mut set = set;
        while !set.is_empty() {
            let (_, atv, next) = tlv(set)?;
            set = next;
            let (_, oid, value) = tlv(atv)?;
            let (_, value, _) = tlv(value)?;
            let key = match oid {
                [0x55, 0x04, 0x03] => "CN",
                [0x55, 0x04, 0x06] => "C",
                [0x55, 0x04, 0x07] => "L",
                [0x55, 0x04, 0x08] => "ST",
                [0x55, 0x04, 0x0A] => "O",
                [0x55, 0x04, 0x0B] => "OU",
                _ => continue,
            };
            parts.push(format!("{key}={}", String::from_utf8_lossy(value)));
        }
    }
    Some(parts.join(","))
}

/// One DER element: its tag, its contents and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret\0"));
        assert!(!same(b"secret", b"secre"));
        assert!(!same(b"secret", b""));
    }

    #[test]
    fn tokens_file_lines() {
        let path = Path::new("/etc/icp-gate/admin.tokens");
        let text = "# name role token\n\nfiling write s3cret-1\n  monitor read s3cret-2  \n";
        let tokens = parse_tokens(path, text, false).unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            (tokens[1].name.as_str(), tokens[1].role),
            ("monitor", Role::Read)
        );
        assert_eq!(tokens[1].secret, b"s3cret-2");
        for (text, why) in [
            ("a write", "found 2 fields"),
            ("a admin x", "must be read or write"),
            ("a read x\na write y", "used twice"),
            ("a read x\nb write x", "same as another"),
            ("a/b read x", "letters, digits"),
        ] {
            let e = parse_tokens(path, text, false)
                .err()
                .expect(text)
                .to_string();
            assert!(e.contains(why), "{text}: {e}");
            assert!(
                e.starts_with("admin.tokens_file /etc/icp-gate/admin.tokens:"),
                "{e}"
            );
        }
        let e = parse_tokens(path, "token_file read x", true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("used twice"), "{e}");
    }

    #[test]
    fn certificate_subject() {
        let mut params = rcgen::CertificateParams::new(vec!["filing.example".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Filing Bureau");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "filing-system");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let named = subject(cert.der()).unwrap();
        assert!(named.contains("CN=filing-system"), "{named}");
        assert!(named.contains("O=Filing Bureau"), "{named}");
        assert_eq!(subject(b"\x30\x03\x02"), None);
    }
}

//! What an operator asks of the process itself rather than of the traffic
//! (docs/operations.md#metrics): which build is running, whether the last config reload took,
//! and when the certificates the config names expire.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{Gauge, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tracing::warn;

use crate::config::Config;

/// The commit the binary was built from (see build.rs), "unknown" outside git.
pub(crate) const COMMIT: &str = env!("ICP_GATE_COMMIT");

/// The certificates whose expiry is exported, by the config key that names them (the `cert`
/// label): the block page's (reloadable) and the admin listener's (read at start).
pub(crate) const BLOCK_CERT: &str = "tls.block_cert";
pub(crate) const ADMIN_CERT: &str = "admin.tls_cert";

pub(crate) struct OpsMetrics {
    reloads: IntCounterVec,
    last_reload_success: Gauge,
    certificate_expiry: GaugeVec,
    connections_limit: IntGauge,
}

fn registered<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

impl OpsMetrics {
    /// Registers the build, reload and certificate metrics in `r`.
    pub(crate) fn register(r: &Registry) -> OpsMetrics {
        let build_info = registered(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "icp_gate_build_info",
                    "Always 1; the labels name the version and the git commit of the binary.",
                ),
                &["version", "commit"],
            )
            .expect("valid metric definition"),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), COMMIT])
            .set(1);
        let reloads = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "icp_gate_config_reloads_total",
                    "Config reloads (SIGHUP), by result: ok, or error when the new config was rejected.",
                ),
                &["result"],
            )
            .expect("valid metric definition"),
        );
        // Both series exist from the start, so rate() and increase() see the first error.
        for result in ["ok", "error"] {
            reloads.with_label_values(&[result]);
        }
        let last_reload_success = registered(
            r,
            Gauge::new(
                "icp_gate_config_last_reload_success_timestamp_seconds",
                "Unix time the running config was loaded: at start, then at each reload that took.",
            )
            .expect("valid metric definition"),
        );
        let certificate_expiry = registered(
            r,
            GaugeVec::new(
                Opts::new(
                    "icp_gate_certificate_expiry_timestamp_seconds",
                    "Unix time the certificate the config names expires (its notAfter), by config key.",
                ),
                &["cert"],
            )
            .expect("valid metric definition"),
        );
        let connections_limit = registered(
            r,
            IntGauge::new(
                "icp_gate_connections_limit",
                "limits.max_connections of the running config: client connections beyond it are closed at accept.",
            )
            .expect("valid metric definition"),
        );
        OpsMetrics {
            reloads,
            last_reload_success,
            certificate_expiry,
            connections_limit,
        }
    }

    /// The config the process starts with: its load time and its certificates.
    pub(crate) fn started(&self, config: &Config) {
        self.last_reload_success.set(unix_now());
        self.connections_limit
            .set(i64::try_from(config.limits.max_connections).unwrap_or(i64::MAX));
        self.certificate(BLOCK_CERT, config.tls.block_cert.as_deref());
        let admin = config.admin.as_ref().and_then(|a| a.tls.as_ref());
        self.certificate(ADMIN_CERT, admin.map(|(cert, _)| cert.as_path()));
    }

    /// A reload that took (`Some`, with the config now serving) or was rejected (`None`).
    pub(crate) fn reloaded(&self, config: Option<&Config>) {
        match config {
            Some(config) => {
                self.reloads.with_label_values(&["ok"]).inc();
                self.last_reload_success.set(unix_now());
                self.connections_limit
                    .set(i64::try_from(config.limits.max_connections).unwrap_or(i64::MAX));
                // The admin listener keeps its certificate until a restart.
                self.certificate(BLOCK_CERT, config.tls.block_cert.as_deref());
            }
            None => self.reloads.with_label_values(&["error"]).inc(),
        }
    }

    /// Exports the expiry of the first certificate in `path` under `key`, or drops the series
    /// when the config names none (or it cannot be read as X.509, which is logged).
    fn certificate(&self, key: &str, path: Option<&Path>) {
        let Some(path) = path else {
            let _ = self.certificate_expiry.remove_label_values(&[key]);
            return;
        };
        match not_after(path) {
            Ok(t) => self
                .certificate_expiry
                .with_label_values(&[key])
                .set(t as f64),
            Err(e) => {
                warn!(cert = key, error = %e, "certificate expiry not exported");
                let _ = self.certificate_expiry.remove_label_values(&[key]);
            }
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The notAfter of the first (leaf) certificate of a PEM chain, as Unix seconds.
pub(crate) fn not_after(path: &Path) -> Result<i64, String> {
    let der = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .next()
        .ok_or_else(|| format!("{}: no certificate", path.display()))?
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("{}: not an X.509 certificate: {e}", path.display()))?;
    Ok(cert.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_after_reads_the_leaf_of_a_pem_chain() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["block.example".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let leaf = params.self_signed(&key).unwrap();
        let mut other = rcgen::CertificateParams::new(vec!["ca.example".into()]).unwrap();
        other.not_after = rcgen::date_time_ymd(2040, 1, 1);
        let ca = other.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let chain = dir.path().join("chain.pem");
        std::fs::write(&chain, leaf.pem() + &ca.pem()).unwrap();
        let expected = humantime::parse_rfc3339("2031-05-17T00:00:00Z")
            .unwrap()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert_eq!(not_after(&chain), Ok(expected));

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(not_after(&empty).unwrap_err().contains("no certificate"));
        assert!(not_after(&dir.path().join("missing.pem")).is_err());
    }
}

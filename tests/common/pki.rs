//! A throw-away certificate authority for TLS tests.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsConnector;

/// A test certificate authority that issues leaf certificates.
pub struct Pki {
    pub ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "icp-gate test CA");
        Pki {
            ca: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// (certificate chain, key, certificate PEM, key PEM) for `names`.
    pub fn leaf(
        &self,
        names: &[&str],
    ) -> (
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        String,
        String,
    ) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (
            vec![cert.der().clone()],
            der,
            cert.pem(),
            key.serialize_pem(),
        )
    }

    /// A client that trusts this CA.
    pub fn client(&self, alpn: &[&[u8]]) -> TlsConnector {
        let mut cfg = self.trusting().with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(cfg))
    }

    /// A client that presents a certificate for `name` issued by this CA.
    /// that trusts `trust`'s CA.
    pub fn client_with_cert(&self, trust: &Pki, name: &str) -> TlsConnector {
        let (chain, key, _, _) = self.leaf(&[name]);
        let cfg = trust.trusting().with_client_auth_cert(chain, key).unwrap();
        TlsConnector::from(Arc::new(cfg))
    }

    fn trusting(
        &self,
    ) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
    }
}

//! TLS material that can be swapped while connections are open: the server certificate
//! and key (through a [`ResolvesServerCert`] that reads an [`ArcSwap`]) and the client CA
//! (through a [`ClientCertVerifier`] that does the same), plus the client-SAN allow-list.
//!
//! The listener's rustls `ServerConfig` ([`server_config`]) is built once, at start-up.
//! Giving it a resolver and a verifier that look the current material up on every
//! handshake makes a reload one atomic pointer swap: handshakes in
//! flight finish with the material they started with, later ones get the new one, and no
//! connection is dropped.

use std::{fmt, path::Path, sync::Arc};

use arc_swap::ArcSwap;
use rustls::{
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
    },
    sign::CertifiedKey,
    DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use crate::config::TlsPaths;

/// Why TLS material could not be loaded. Names the file, never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{key} {path}: {reason}")]
    File {
        /// The flag that named the file.
        key: &'static str,
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// The material was readable but rustls refused it.
    #[error("{key}: {reason}")]
    Rejected {
        /// The flag concerned.
        key: &'static str,
        /// rustls's reason.
        reason: String,
    },
}

fn file_err(key: &'static str, path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError::File {
        key,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The crypto provider used everywhere: *ring*, with its AEAD suites ordered so the
/// server picks AES-128-GCM, then AES-256-GCM, then ChaCha20-Poly1305, in each TLS
/// version. AES-128-GCM is as strong as needed here and the cheapest per byte on CPUs
/// with AES-NI; clients without AES-NI usually list ChaCha20 first and still get it
/// when they offer nothing else.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// The listener's rustls configuration: TLS 1.2 and 1.3 only, the server's suite order
/// (not the client's), HTTP/1.1 by ALPN, and the swappable certificate and client
/// verifier of `material`, so a reload never rebuilds it.
pub fn server_config(material: &TlsMaterial) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| TlsError::Rejected {
            key: "--tls-cert",
            reason: e.to_string(),
        })?;
    let builder = match &material.verifier {
        Some(v) => builder.with_client_cert_verifier(v.clone()),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(material.resolver.clone());
    config.ignore_client_order = true;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Loads a certificate chain and its private key, and checks that they belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err("--tls-cert", cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err("--tls-cert", cert, e))?;
    if chain.is_empty() {
        return Err(file_err("--tls-cert", cert, "no CERTIFICATE in the file"));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| file_err("--tls-key", key, format!("no usable private key ({e})")))?;
    let provider = provider();
    let certified =
        CertifiedKey::from_der(chain, private, &provider).map_err(|e| TlsError::Rejected {
            key: "--tls-key",
            reason: format!("the key does not fit the certificate or is unsupported: {e}"),
        })?;
    Ok(Arc::new(certified))
}

/// Loads a client CA bundle into a verifier that requires a client certificate.
pub fn load_client_verifier(ca: &Path) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .map_err(|e| file_err("--tls-client-ca", ca, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err("--tls-client-ca", ca, e))?;
    if certs.is_empty() {
        return Err(file_err(
            "--tls-client-ca",
            ca,
            "no CERTIFICATE in the file",
        ));
    }
    for c in certs {
        roots.add(c).map_err(|e| {
            file_err(
                "--tls-client-ca",
                ca,
                format!("not a usable CA certificate: {e}"),
            )
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Rejected {
            key: "--tls-client-ca",
            reason: e.to_string(),
        })
}

/// The server's current certificate, swapped on reload.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A verifier held in an [`ArcSwap`] (which needs a sized type).
struct Inner(Arc<dyn ClientCertVerifier>);

/// The client verifier: the current CA's verifier, then the SAN allow-list.
pub struct ReloadingVerifier {
    current: ArcSwap<Inner>,
    allowed_sans: Vec<ServerName<'static>>,
    schemes: Vec<SignatureScheme>,
}

impl fmt::Debug for ReloadingVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingVerifier")
            .field("allowed_sans", &self.allowed_sans)
            .finish()
    }
}

impl ClientCertVerifier for ReloadingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Fail closed: a client without a certificate fails the handshake.
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints would have to borrow from the swappable CA, which this signature
        // cannot express. An empty list is allowed (RFC 8446 4.2.4) and clients with one
        // configured certificate send it regardless.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .current
            .load()
            .0
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed_sans.is_empty() {
            return Ok(verified);
        }
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        if self
            .allowed_sans
            .iter()
            .any(|name| cert.verify_is_valid_for_subject_name(name).is_ok())
        {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .0
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .0
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

/// All swappable TLS material of one listener.
#[derive(Debug)]
pub struct TlsMaterial {
    paths: TlsPaths,
    /// The server certificate resolver the listener's configuration reads.
    pub resolver: Arc<CertResolver>,
    /// The client verifier the listener's configuration reads, when mTLS is on.
    pub verifier: Option<Arc<ReloadingVerifier>>,
}

impl TlsMaterial {
    /// Loads everything; any failure is a start-up error naming the file.
    pub fn load(paths: &TlsPaths) -> Result<Self, TlsError> {
        let key = load_certified_key(&paths.cert, &paths.key)?;
        let mut allowed_sans = Vec::new();
        for san in &paths.client_allowed_sans {
            let name = ServerName::try_from(san.clone()).map_err(|e| TlsError::Rejected {
                key: "--tls-client-allowed-san",
                reason: format!("{san:?} is not a DNS name or IP address: {e}"),
            })?;
            allowed_sans.push(name);
        }
        let verifier = match &paths.client_ca {
            Some(ca) => {
                let inner = load_client_verifier(ca)?;
                let schemes = inner.supported_verify_schemes();
                Some(Arc::new(ReloadingVerifier {
                    current: ArcSwap::from_pointee(Inner(inner)),
                    allowed_sans,
                    schemes,
                }))
            }
            None => None,
        };
        Ok(TlsMaterial {
            paths: paths.clone(),
            resolver: Arc::new(CertResolver {
                current: ArcSwap::new(key),
            }),
            verifier,
        })
    }

    /// The files to watch for changes.
    pub fn files(&self) -> Vec<std::path::PathBuf> {
        let mut v = vec![self.paths.cert.clone(), self.paths.key.clone()];
        v.extend(self.paths.client_ca.clone());
        v
    }

    /// Re-reads the files. Everything is loaded and checked before anything is swapped,
    /// so a failure keeps the old material whole.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load_certified_key(&self.paths.cert, &self.paths.key)?;
        let ca = match (&self.paths.client_ca, &self.verifier) {
            (Some(path), Some(_)) => Some(load_client_verifier(path)?),
            _ => None,
        };
        self.resolver.current.store(key);
        if let (Some(v), Some(ca)) = (&self.verifier, ca) {
            v.current.store(Arc::new(Inner(ca)));
        }
        Ok(())
    }
}

//! TLS for TCP pools (rustls with the `ring` provider): the server's config and handshake,
//! the client's config with the pool's certificate **pinned** (the client trusts exactly that
//! certificate, no CA, no name check), optional mutual TLS, and the self-signed certificates
//! and keys `torpor pool-cert` writes. Unix-socket pools never use TLS: the socket file's mode
//! already limits who can connect, and nothing crosses a network.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use thiserror::Error;
use tracing::{debug, info};

/// How long a TLS handshake may take before the server drops the connection: a client that
/// opens TCP and says nothing must not hold a connection task for long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why TLS material could not be loaded, made or used.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("{} holds more than one certificate; pin exactly one", .0.display())]
    SeveralCertificates(PathBuf),
    #[error("{} holds no PEM private key", .0.display())]
    NoKey(PathBuf),
    #[error("{} is readable by group or others (mode {mode:o}); chmod 600 it", .path.display())]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("invalid TLS configuration")]
    Config(#[from] rustls::Error),
    #[error("invalid client CA")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
    #[error("TLS is for TCP pools; a Unix socket stays plaintext")]
    NotTcp,
    #[error("generating a certificate failed")]
    Generate(#[from] rcgen::Error),
}

/// The crypto provider of every torpor TLS config: `ring` (builds without cmake or nasm).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

/// A private key file, refused when others can read it (a key anyone can read protects
/// nothing).
fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)
        .map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyMode {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|_| TlsError::NoKey(path.to_path_buf()))
}

/// The pool's TLS server config: its certificate chain and key, and, for mutual TLS, the CA
/// that client certificates must chain to (clients without one are then refused).
pub fn server_config(
    cert: &Path,
    key_file: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c)?;
            }
            builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build()?,
            )
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(
        builder.with_single_cert(certs(cert)?, key(key_file)?)?,
    ))
}

impl crate::server::Listener {
    /// Makes a TCP listener speak TLS with `config` (from [`server_config`]).
    pub fn with_tls(self, config: Arc<ServerConfig>) -> Result<Self, TlsError> {
        match self {
            Self::Tcp(l) | Self::Tls(l, _) => Ok(Self::Tls(l, config)),
            Self::Unix(..) => Err(TlsError::NotTcp),
        }
    }
}

/// Runs the server side of a handshake under [`HANDSHAKE_TIMEOUT`]; a failure is logged
/// (it is the peer's, not the pool's) and yields `None`.
pub(crate) async fn handshake<S>(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: S,
    peer: &str,
) -> Option<tokio_rustls::server::TlsStream<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            info!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// A client's TLS settings: the pool's pinned certificate and, for mutual TLS, the client's
/// own certificate and key. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls { pinned }")
    }
}

impl ClientTls {
    /// Trusts exactly the certificate in `pool_cert` (PEM, one certificate); presents
    /// `identity` (certificate chain, key) when given.
    pub fn pinned(
        pool_cert: &Path,
        identity: Option<(&Path, &Path)>,
    ) -> Result<ClientTls, TlsError> {
        let mut pinned = certs(pool_cert)?;
        if pinned.len() != 1 {
            return Err(TlsError::SeveralCertificates(pool_cert.to_path_buf()));
        }
        let identity = match identity {
            Some((c, k)) => Some((certs(c)?, key(k)?)),
            None => None,
        };
        ClientTls::from_der(pinned.remove(0), identity)
    }

    fn from_der(
        pinned: CertificateDer<'static>,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<ClientTls, TlsError> {
        let provider = provider();
        let verifier = Arc::new(Pinned {
            cert: pinned,
            algorithms: provider.signature_verification_algorithms,
        });
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match identity {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
            None => builder.with_no_client_auth(),
        };
        Ok(ClientTls {
            config: Arc::new(config),
        })
    }

    pub(crate) fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }
}

/// The name sent in the handshake (SNI). With a pinned certificate the name proves nothing,
/// so any syntactically valid one does.
pub(crate) fn server_name(host: &str) -> ServerName<'static> {
    ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
    .unwrap_or_else(|_| ServerName::try_from("torpor-pool").expect("a valid DNS name"))
}

/// Accepts the server's certificate only when it is byte for byte the pinned one; the
/// handshake signatures are still verified against it, so only the holder of its key passes.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone)]
pub struct GeneratedFiles {
    /// The pool's certificate: give it to `torpor pool --tls-cert` and pin it on clients.
    pub pool_cert: PathBuf,
    /// The pool's key (0600): `torpor pool --tls-key`.
    pub pool_key: PathBuf,
    /// With a client identity: the CA for `torpor pool --tls-client-ca`, and the client's
    /// certificate and key (0600).
    pub client: Option<(PathBuf, PathBuf, PathBuf)>,
}

/// Writes a self-signed certificate and key for a pool into `dir` (`pool.crt`, `pool.key`),
/// valid for `names` (DNS names or IP addresses), and with `client` also a client CA and a
/// client certificate signed by it (`client-ca.crt`, `client.crt`, `client.key`; the CA's
/// key is not kept: run again to issue a new set). Every file is created 0600 and existing
/// files are not overwritten.
pub fn generate(dir: &Path, names: &[String], client: bool) -> Result<GeneratedFiles, TlsError> {
    let write = |name: &str, text: &str| -> Result<PathBuf, TlsError> {
        let path = dir.join(name);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
            .map_err(|source| TlsError::Write {
                path: path.clone(),
                source,
            })?;
        Ok(path)
    };
    fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let pool = pool_certificate(names)?;
    let pool_cert = write("pool.crt", &pool.cert.pem())?;
    let pool_key = write("pool.key", &pool.key_pair.serialize_pem())?;
    let client = if client {
        let (ca, cert, key) = client_certificate()?;
        Some((
            write("client-ca.crt", &ca)?,
            write("client.crt", &cert)?,
            write("client.key", &key)?,
        ))
    } else {
        None
    };
    Ok(GeneratedFiles {
        pool_cert,
        pool_key,
        client,
    })
}

/// A fresh self-signed pool certificate for `names`.
pub fn pool_certificate(names: &[String]) -> Result<rcgen::CertifiedKey, TlsError> {
    Ok(rcgen::generate_simple_self_signed(names.to_vec())?)
}

/// A fresh client CA and a client certificate it signed, as PEM: (CA cert, client cert,
/// client key).
pub fn client_certificate() -> Result<(String, String, String), TlsError> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "torpor pool client CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["torpor-client".to_string()])?;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_files_are_private_and_load_on_both_sides() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let g = generate(dir.path(), &["127.0.0.1".into()], true).unwrap();
        let (ca, cert, key) = g.client.clone().unwrap();
        for f in [&g.pool_cert, &g.pool_key, &ca, &cert, &key] {
            let mode = fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
        server_config(&g.pool_cert, &g.pool_key, Some(&ca)).unwrap();
        ClientTls::pinned(&g.pool_cert, Some((&cert, &key))).unwrap();
        // A second run must not overwrite a key in use.
        assert!(matches!(
            generate(dir.path(), &["127.0.0.1".into()], false),
            Err(TlsError::Write { .. })
        ));
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let g = generate(dir.path(), &["localhost".into()], false).unwrap();
        fs::set_permissions(&g.pool_key, fs::Permissions::from_mode(0o644)).unwrap();
        let e = server_config(&g.pool_cert, &g.pool_key, None).unwrap_err();
        assert!(matches!(e, TlsError::KeyMode { mode: 0o644, .. }), "{e:?}");
    }

    #[test]
    fn a_pin_file_with_no_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("empty.pem");
        fs::write(&f, "not a certificate").unwrap();
        assert!(matches!(
            ClientTls::pinned(&f, None),
            Err(TlsError::NoCertificate(_))
        ));
    }
}

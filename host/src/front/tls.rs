//! HTTPS: the certificate chain and key (`--tls-cert`, `--tls-key`, PEM),
//! read into a rustls server configuration (TLS 1.3 and 1.2, ALPN `h2`
//! then `http/1.1`, the ring provider), and swapped as one on a reload.
//!
//! A reload reads both files again into a new configuration *before* the
//! app library is loaded; only when both the pair and the library are good
//! is the new configuration installed, together with the new generation.
//! A missing or broken pair fails the reload like a bad library: the old
//! certificate and the old generation keep serving. Handshakes in progress
//! finish with the configuration they started with.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

/// Why a certificate/key pair cannot be used. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS {what} {}: cannot read it: {error}", path.display())]
    Read { what: &'static str, path: PathBuf, error: io::Error },
    #[error("TLS certificate {}: {problem}", path.display())]
    Certificate { path: PathBuf, problem: String },
    #[error("TLS key {}: {problem}", path.display())]
    Key { path: PathBuf, problem: String },
    #[error("TLS certificate {} and key {} cannot be used together: {problem}", cert.display(), key.display())]
    Pair { cert: PathBuf, key: PathBuf, problem: String },
}

/// The serving TLS configuration and where it is read from.
pub struct Tls {
    files: TlsFiles,
    current: ArcSwap<ServerConfig>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish_non_exhaustive()
    }
}

/// ALPN protocols offered, in order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

impl Tls {
    /// Reads the pair; any problem names the file.
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        let config = read(files)?;
        Ok(Tls { files: files.clone(), current: ArcSwap::from(config) })
    }

    /// Reads the files again; nothing changes until [`Tls::install`].
    pub fn prepare(&self) -> Result<Arc<ServerConfig>, TlsError> {
        read(&self.files)
    }

    /// New handshakes use `config` from now on.
    pub fn install(&self, config: Arc<ServerConfig>) {
        self.current.store(config);
    }

    /// An acceptor with the current configuration (one atomic load and an
    /// `Arc` clone per connection).
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

/// Checks that the pair can be served, without keeping it (process mode's
/// supervisor, before it starts workers that read it).
pub fn check(files: &TlsFiles) -> Result<(), TlsError> {
    read(files).map(drop)
}

fn read(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(&files.cert)?;
    let key = private_key(&files.key)?;
    let pair = |problem: String| TlsError::Pair { cert: files.cert.clone(), key: files.key.clone(), problem };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| pair(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| pair(describe(e)))?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn describe(error: rustls::Error) -> String {
    match error {
        rustls::Error::InconsistentKeys(_) => "the private key does not belong to the (first) certificate".to_owned(),
        other => other.to_string(),
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read { what, path: path.to_owned(), error })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file("certificate", path)?;
    let problem = |problem: String| TlsError::Certificate { path: path.to_owned(), problem };
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| problem(format!("not valid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(problem("no CERTIFICATE block: expected a PEM certificate chain, the server's first".to_owned()));
    }
    Ok(chain)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_file("key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        let problem = match e {
            pem::Error::NoItemsFound => {
                "no private key: expected a PEM PRIVATE KEY (PKCS#8), RSA PRIVATE KEY or EC PRIVATE KEY block"
                    .to_owned()
            }
            other => format!("not a valid PEM private key: {other}"),
        };
        TlsError::Key { path: path.to_owned(), problem }
    })
}

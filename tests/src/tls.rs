//! HTTPS for the end-to-end tests: self-signed certificates made at test
//! time, and a rustls client that trusts exactly the certificate it is
//! given, offers the ALPN protocols and TLS versions a test chooses, and
//! reports what was negotiated and which certificate the server showed.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::{ClientError, Reply};

pub use rustls::version::{TLS12, TLS13};

/// A self-signed certificate for `localhost` and 127.0.0.1, and its key.
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl TestCert {
    pub fn new() -> TestCert {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
        let made = rcgen::generate_simple_self_signed(names).expect("make a self-signed certificate");
        TestCert { cert_pem: made.cert.pem(), key_pem: made.key_pair.serialize_pem(), der: made.cert.der().to_vec() }
    }

    /// Writes the certificate and the key as PEM files (the key 0600).
    pub fn write(&self, cert: &Path, key: &Path) {
        write_replacing(cert, self.cert_pem.as_bytes(), 0o644);
        write_replacing(key, self.key_pem.as_bytes(), 0o600);
    }
}

impl Default for TestCert {
    fn default() -> TestCert {
        TestCert::new()
    }
}

/// Writes `bytes` to a new file and renames it over `path`, as a
/// certificate renewal does.
pub fn write_replacing(path: &Path, bytes: &[u8], mode: u32) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes).expect("write");
    crate::set_mode(&partial, mode);
    std::fs::rename(&partial, path).expect("rename");
}

/// What an HTTPS request saw.
#[derive(Debug)]
pub struct TlsReply {
    /// The ALPN protocol the server chose.
    pub alpn: Option<Vec<u8>>,
    pub tls_version: Option<rustls::ProtocolVersion>,
    pub http_version: http::Version,
    /// The server's certificate (DER).
    pub certificate: Vec<u8>,
    pub reply: Reply,
}

/// Options of an HTTPS request.
pub struct TlsClient<'a> {
    /// Certificates (DER) the client trusts.
    pub trusted: Vec<&'a [u8]>,
    pub alpn: Vec<&'static [u8]>,
    pub versions: Vec<&'static SupportedProtocolVersion>,
}

impl<'a> TlsClient<'a> {
    /// Trusts `certificate`, offers `h2` and `http/1.1`, TLS 1.3 and 1.2.
    pub fn trusting(certificate: &'a [u8]) -> TlsClient<'a> {
        TlsClient { trusted: vec![certificate], alpn: vec![b"h2", b"http/1.1"], versions: vec![&TLS13, &TLS12] }
    }

    pub fn alpn(mut self, alpn: &[&'static [u8]]) -> TlsClient<'a> {
        self.alpn = alpn.to_vec();
        self
    }

    pub fn versions(mut self, versions: &[&'static SupportedProtocolVersion]) -> TlsClient<'a> {
        self.versions = versions.to_vec();
        self
    }

    /// `GET path` on a fresh HTTPS connection to `addr`; HTTP/2 if the
    /// server chose `h2`, else HTTP/1.1.
    pub async fn get(&self, addr: SocketAddr, path: &str) -> Result<TlsReply, ClientError> {
        let mut roots = RootCertStore::empty();
        for der in &self.trusted {
            roots.add(CertificateDer::from(der.to_vec())).map_err(|e| format!("trust: {e}"))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&self.versions)
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = self.alpn.iter().map(|p| p.to_vec()).collect();
        let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::from(addr.ip());
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let (_, session) = tls.get_ref();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let tls_version = session.protocol_version();
        let certificate = session.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
        let request = http::Request::builder()
            .uri(format!("https://{addr}{path}"))
            .header(http::header::HOST, addr.to_string())
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = if alpn.as_deref() == Some(b"h2") {
            let (mut sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(connection);
            let mut request = request;
            request.headers_mut().remove(http::header::HOST);
            sender.send_request(request).await.map_err(|e| format!("request: {e}"))?
        } else {
            let (mut sender, connection) =
                http1::handshake(TokioIo::new(tls)).await.map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(connection);
            let mut request = request;
            *request.uri_mut() = path.parse().map_err(|e| format!("path: {e}"))?;
            sender.send_request(request).await.map_err(|e| format!("request: {e}"))?
        };
        let http_version = response.version();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        let reply = Reply { status: parts.status.as_u16(), headers: parts.headers, body };
        Ok(TlsReply { alpn, tls_version, http_version, certificate, reply })
    }
}

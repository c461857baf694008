//! HTTPS for the simulator: a certificate chain and key from PEM, and the
//! handshake that counts connections so tests can see how the proxy reuses
//! them.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

use super::state::State;
use crate::server::Handshake;

/// Why the certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("the certificate chain is not PEM: {0}")]
    Certificates(String),
    #[error("the certificate file holds no certificate")]
    NoCertificate,
    #[error("the private key is not a PEM key: {0}")]
    Key(String),
    #[error("the key does not fit the certificate: {0}")]
    Mismatch(#[source] rustls::Error),
}

/// TLS settings serving `cert_chain_pem` (leaf first) with `key_pem`.
pub fn server_config(cert_chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let chain = CertificateDer::pem_slice_iter(cert_chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsSetupError::Certificates(error.to_string()))?;
    if chain.is_empty() {
        return Err(TlsSetupError::NoCertificate);
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| TlsSetupError::Key(error.to_string()))?;
    let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Mismatch)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsSetupError::Mismatch)?;
    Ok(Arc::new(config))
}

/// Counts each accepted connection, then speaks TLS on it when the
/// simulator serves HTTPS.
#[derive(Clone)]
pub(super) struct Accept {
    pub tls: Option<TlsAcceptor>,
    pub state: Arc<State>,
}

impl Handshake for Accept {
    type Io = Either<TcpStream, TlsStream<TcpStream>>;

    async fn handshake(&self, stream: TcpStream) -> std::io::Result<Self::Io> {
        self.state.lock().stats.connections += 1;
        let Some(tls) = &self.tls else {
            return Ok(Either::Left(stream));
        };
        let result = tls.accept(stream).await;
        let mut inner = self.state.lock();
        match result {
            Ok(stream) => {
                inner.stats.tls_handshakes += 1;
                Ok(Either::Right(stream))
            }
            Err(error) => {
                inner.stats.tls_failed_handshakes += 1;
                Err(error)
            }
        }
    }
}

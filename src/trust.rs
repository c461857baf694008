//! Which certificates Marketo's may chain to, and what a failed connection
//! means in words.
//!
//! The roots are the operating system's, the bundled webpki roots (for a
//! slim container without a CA bundle) and `marketo.ca_file` when set, for
//! a private CA or a TLS-inspecting egress gateway.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{CertificateError, ClientConfig, RootCertStore};

/// Why the trusted roots cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("marketo.ca_file: {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
    #[error("cannot build the TLS client")]
    Tls(#[source] rustls::Error),
}

/// The certificates in a PEM bundle; at least one, each one usable as a
/// trust anchor.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let failed = |reason: String| TrustError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|error| failed(error.to_string()))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| failed(format!("not a PEM certificate bundle ({error})")))?;
    if certificates.is_empty() {
        return Err(failed(
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let mut roots = RootCertStore::empty();
    for (index, certificate) in certificates.iter().enumerate() {
        roots
            .add(certificate.clone())
            .map_err(|error| failed(format!("certificate {} is not usable: {error}", index + 1)))?;
    }
    Ok(certificates)
}

/// The TLS settings of every call to Marketo.
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, TrustError> {
    let mut roots = RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(system.certs);
    if added == 0 {
        tracing::debug!(errors = ?system.errors, "no system CA certificates found; using the bundled roots");
    }
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        for certificate in read_ca_file(path)? {
            // read_ca_file checked that each one is accepted.
            let _ = roots.add(certificate);
        }
    }
    Ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(TrustError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Why a connection to Marketo failed, in words an operator can act on.
#[derive(Debug, Clone)]
pub struct ConnectFailure {
    pub reason: String,
    /// Marketo's certificate (or the TLS handshake) was refused: asking
    /// again at once will not change that.
    pub tls: bool,
}

impl ConnectFailure {
    pub fn of(error: &(dyn StdError + 'static)) -> Self {
        let mut reasons: Vec<String> = Vec::new();
        let mut next = error.source();
        while let Some(error) = next {
            if let Some(tls) = find_tls_error(error) {
                return Self {
                    reason: format!("TLS handshake failed: {}", describe_tls(tls)),
                    tls: true,
                };
            }
            let text = error.to_string();
            if !reasons.iter().any(|reason| reason == &text) {
                reasons.push(text);
            }
            next = error.source();
        }
        Self {
            reason: if reasons.is_empty() {
                error.to_string()
            } else {
                reasons.join(": ")
            },
            tls: false,
        }
    }
}

/// rustls reports through `io::Error`s (wrapped more than once on the way
/// up), whose `source` skips the error each wraps; look inside them.
fn find_tls_error<'a>(mut error: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    loop {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        error = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)?;
    }
}

fn describe_tls(error: &rustls::Error) -> String {
    let rustls::Error::InvalidCertificate(certificate) = error else {
        return error.to_string();
    };
    match certificate {
        CertificateError::UnknownIssuer => "certificate not trusted (issued by an unknown CA; \
             set marketo.ca_file to trust a private or inspecting CA)"
            .to_owned(),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "certificate expired".to_owned()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "certificate not valid yet (check this host's clock)".to_owned()
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "certificate not valid for Marketo's host name".to_owned()
        }
        CertificateError::Revoked => "certificate revoked".to_owned(),
        other => format!("certificate rejected ({other:?})"),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused_with_its_path() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(b"not a certificate\n").expect("write");
        let error = read_ca_file(file.path()).expect_err("no certificate");
        assert!(error.to_string().contains("holds no PEM certificate"), "{error}");
        assert!(error.to_string().contains(&file.path().display().to_string()));

        let missing = read_ca_file(Path::new("/nonexistent/ca.pem")).expect_err("missing");
        assert!(
            missing
                .to_string()
                .starts_with("marketo.ca_file: /nonexistent/ca.pem: "),
            "{missing}"
        );
    }

    #[test]
    fn tls_errors_inside_io_errors_are_found_and_named() {
        // As hyper-rustls reports it: tokio-rustls's io::Error, wrapped.
        let wrapped = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        ));
        #[derive(Debug, thiserror::Error)]
        #[error("client error (Connect)")]
        struct Outer(#[source] std::io::Error);
        let failure = ConnectFailure::of(&Outer(wrapped));
        assert!(failure.tls);
        assert!(
            failure.reason.contains("certificate not trusted"),
            "{}",
            failure.reason
        );

        let refused = Outer(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let failure = ConnectFailure::of(&refused);
        assert!(!failure.tls);
        assert_eq!(failure.reason, "connection refused");
    }
}

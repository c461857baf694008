//! A throwaway private CA and the server certificates it signs, made at
//! run time, for a simulator that serves HTTPS.

use std::path::PathBuf;
use std::sync::Arc;

use marketo_proxy::sim::{SimConfig, SimHandle, Simulator};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, date_time_ymd,
};

/// A CA whose certificate is written to a PEM file for `marketo.ca_file`.
pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    dir: tempfile::TempDir,
}

/// When a server certificate is valid.
#[derive(Clone, Copy)]
pub enum Validity {
    Current,
    Expired,
}

impl Pki {
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "marketo-proxy test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let certificate = params.self_signed(&key).expect("CA certificate");
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("ca.pem"), certificate.pem()).expect("write CA");
        Self {
            issuer: Issuer::new(params, key),
            dir,
        }
    }

    /// The CA's certificate, for `marketo.ca_file`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate and key for `127.0.0.1` and `localhost`, as PEM.
    pub fn server_pem(&self, validity: Validity) -> (String, String) {
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, "127.0.0.1");
        if let Validity::Expired = validity {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let certificate = params.signed_by(&key, &self.issuer).expect("server certificate");
        (certificate.pem(), key.serialize_pem())
    }

    /// A simulator serving HTTPS with a certificate from this CA.
    pub async fn simulator(&self, config: SimConfig, validity: Validity) -> SimHandle {
        let (cert, key) = self.server_pem(validity);
        let tls = marketo_proxy::sim::server_config(cert.as_bytes(), key.as_bytes()).expect("TLS config");
        Simulator::spawn_tls(config, Arc::clone(&tls))
            .await
            .expect("simulator starts")
    }
}

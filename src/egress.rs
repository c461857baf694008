//! How calls leave for Marketo: straight to its host, or through an HTTP
//! proxy that the company's egress requires, tunnelled with `CONNECT`.
//!
//! The proxy is `marketo.egress_proxy` when the config sets one; otherwise
//! `HTTPS_PROXY` (or `https_proxy`, `ALL_PROXY`, `all_proxy`) for an
//! `https://` Marketo, unless `NO_PROXY` (or `no_proxy`) names its host, as
//! curl reads them. A plain `http://` base URL is a local simulator and
//! ignores the environment. Credentials in the proxy URL go to the proxy
//! as `Proxy-Authorization` and are never logged.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::Service;

use crate::secret::Secret;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The environment variables read for the proxy, in order of preference.
const PROXY_VARIABLES: [&str; 4] = ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"];
const NO_PROXY_VARIABLES: [&str; 2] = ["NO_PROXY", "no_proxy"];

/// Why the egress proxy setting cannot be used. Names where it came from,
/// never the URL (it may hold a password).
#[derive(Debug, thiserror::Error)]
#[error("{source_name} is not an http:// proxy URL (host and port, optionally user:password@)")]
pub struct EgressError {
    source_name: &'static str,
}

/// An HTTP proxy that calls to Marketo tunnel through.
#[derive(Clone)]
pub struct EgressProxy {
    /// `http://host:port/`, without credentials.
    uri: Uri,
    /// `Proxy-Authorization` for the `CONNECT`, when the URL had credentials.
    auth: Option<HeaderValue>,
    /// Where the setting came from, for the startup log.
    source_name: &'static str,
}

impl EgressProxy {
    /// The proxy calls to `base` go through, if any: the configured one,
    /// or the environment's as `env` reads it.
    pub fn choose(
        configured: Option<&Secret>,
        base: &Uri,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, EgressError> {
        if let Some(url) = configured {
            let matcher = Matcher::builder().all(url.expose().to_owned()).build();
            return Self::from_match(matcher.intercept(base), "marketo.egress_proxy").map(Some);
        }
        if base.scheme() != Some(&http::uri::Scheme::HTTPS) {
            return Ok(None);
        }
        let first = |names: &[&'static str]| {
            names.iter().find_map(|name| {
                env(name)
                    .filter(|value| !value.is_empty())
                    .map(|value| (*name, value))
            })
        };
        let Some((source_name, url)) = first(&PROXY_VARIABLES) else {
            return Ok(None);
        };
        let proxy = Self::from_match(
            Matcher::builder().https(url.clone()).build().intercept(base),
            source_name,
        )?;
        let no_proxy = first(&NO_PROXY_VARIABLES)
            .map(|(_, value)| value)
            .unwrap_or_default();
        if Matcher::builder()
            .https(url)
            .no(no_proxy)
            .build()
            .intercept(base)
            .is_none()
        {
            tracing::debug!("NO_PROXY names Marketo's host: calling it directly");
            return Ok(None);
        }
        Ok(Some(proxy))
    }

    fn from_match(
        intercept: Option<hyper_util::client::proxy::matcher::Intercept>,
        source_name: &'static str,
    ) -> Result<Self, EgressError> {
        let intercept = intercept.ok_or(EgressError { source_name })?;
        if intercept.uri().scheme() != Some(&http::uri::Scheme::HTTP) || intercept.uri().host().is_none() {
            return Err(EgressError { source_name });
        }
        Ok(Self {
            uri: intercept.uri().clone(),
            auth: intercept.basic_auth().cloned(),
            source_name,
        })
    }

    /// `host:port (from SOURCE)`, safe to log: no credentials.
    pub fn describe(&self) -> String {
        let host = self.uri.host().unwrap_or_default();
        let port = self.uri.port_u16().unwrap_or(80);
        let auth = if self.auth.is_some() {
            ", with credentials"
        } else {
            ""
        };
        format!("http://{host}:{port} (from {}{auth})", self.source_name)
    }
}

/// The connector under TLS: a TCP connection to Marketo, or a `CONNECT`
/// tunnel to it through the egress proxy.
#[derive(Clone)]
pub enum Egress {
    Direct(HttpConnector),
    Tunnel(Tunnel<HttpConnector>),
}

impl Egress {
    pub fn new(tcp: HttpConnector, proxy: Option<&EgressProxy>) -> Self {
        match proxy {
            None => Self::Direct(tcp),
            Some(proxy) => {
                let tunnel = Tunnel::new(proxy.uri.clone(), tcp);
                Self::Tunnel(match &proxy.auth {
                    Some(auth) => tunnel.with_auth(auth.clone()),
                    None => tunnel,
                })
            }
        }
    }
}

impl Service<Uri> for Egress {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Self::Direct(tcp) => tcp.poll_ready(cx).map_err(Into::into),
            Self::Tunnel(tunnel) => tunnel.poll_ready(cx).map_err(|error| tunnel_error(error).into()),
        }
    }

    fn call(&mut self, destination: Uri) -> Self::Future {
        match self {
            Self::Direct(tcp) => {
                let connecting = tcp.call(destination);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
            Self::Tunnel(tunnel) => {
                let tunnelling = tunnel.call(destination);
                Box::pin(async move { tunnelling.await.map_err(|error| tunnel_error(error).into()) })
            }
        }
    }
}

/// The egress proxy did not open a tunnel; the source says why.
#[derive(Debug, thiserror::Error)]
#[error("through the egress proxy")]
pub struct TunnelFailed(#[source] BoxError);

fn tunnel_error(error: impl Into<BoxError>) -> TunnelFailed {
    TunnelFailed(error.into())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    const MARKETO: &str = "https://123-abc-456.mktorest.com/";

    fn choose(configured: Option<&str>, base: &str, vars: &[(&str, &str)]) -> Option<String> {
        let configured = configured.map(Secret::from);
        EgressProxy::choose(configured.as_ref(), &base.parse().expect("uri"), env(vars))
            .expect("valid")
            .map(|proxy| proxy.describe())
    }

    #[test]
    fn reads_the_environment_as_curl_does() {
        assert_eq!(choose(None, MARKETO, &[]), None);
        assert_eq!(
            choose(None, MARKETO, &[("HTTPS_PROXY", "http://gw:3128")]).as_deref(),
            Some("http://gw:3128 (from HTTPS_PROXY)")
        );
        assert_eq!(
            choose(None, MARKETO, &[("https_proxy", "gw:8080")]).as_deref(),
            Some("http://gw:8080 (from https_proxy)")
        );
        assert_eq!(
            choose(None, MARKETO, &[("ALL_PROXY", "http://gw:1")]).as_deref(),
            Some("http://gw:1 (from ALL_PROXY)")
        );
        // An empty HTTPS_PROXY is unset, as for curl.
        assert_eq!(
            choose(
                None,
                MARKETO,
                &[("HTTPS_PROXY", ""), ("https_proxy", "http://gw:2")]
            )
            .as_deref(),
            Some("http://gw:2 (from https_proxy)")
        );
    }

    #[test]
    fn no_proxy_and_plain_http_go_direct() {
        let proxy = ("HTTPS_PROXY", "http://gw:3128");
        assert_eq!(
            choose(None, MARKETO, &[proxy, ("NO_PROXY", "mktorest.com")]),
            None
        );
        assert_eq!(
            choose(None, MARKETO, &[proxy, ("no_proxy", ".mktorest.com,10.0.0.0/8")]),
            None
        );
        assert!(choose(None, MARKETO, &[proxy, ("NO_PROXY", "example.com")]).is_some());
        assert_eq!(choose(None, "http://127.0.0.1:8081/", &[proxy]), None);
    }

    #[test]
    fn the_configured_proxy_wins_and_its_credentials_are_not_shown() {
        let described = choose(
            Some("http://user:s3cret@gw.internal:3128"),
            MARKETO,
            &[("HTTPS_PROXY", "http://other:1"), ("NO_PROXY", "mktorest.com")],
        )
        .expect("configured proxy");
        assert_eq!(
            described,
            "http://gw.internal:3128 (from marketo.egress_proxy, with credentials)"
        );
        assert!(!described.contains("s3cret"));
    }

    #[test]
    fn a_proxy_that_is_not_http_is_refused_by_name() {
        for url in ["socks5://gw:1080", "https://gw:443", "::not a url::"] {
            let configured = Secret::from(url);
            let error = EgressProxy::choose(Some(&configured), &MARKETO.parse().expect("uri"), env(&[]))
                .err()
                .unwrap_or_else(|| panic!("{url} accepted"));
            assert_eq!(
                error.to_string(),
                "marketo.egress_proxy is not an http:// proxy URL (host and port, optionally user:password@)"
            );
        }
        let error = EgressProxy::choose(
            None,
            &MARKETO.parse().expect("uri"),
            env(&[("HTTPS_PROXY", "socks5://user:pw@gw:1080")]),
        )
        .err()
        .expect("socks refused");
        assert!(error.to_string().starts_with("HTTPS_PROXY is not"));
        assert!(!error.to_string().contains("pw"));
    }
}

//! The Marketo base URL, checked once so that the upstream client can
//! build request URIs from it without looking again.

use std::fmt;
use std::str::FromStr;

use http::Uri;
use serde::de::{self, Deserialize, Deserializer, Visitor};

/// Scheme, host and optional path prefix of the Marketo REST API, e.g.
/// `https://123-ABC-456.mktorest.com`. Never has a query, a fragment or
/// user info. The default is empty and fails validation.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BaseUrl {
    uri: Uri,
    /// `""` or a path such as `/marketo`, without a trailing slash.
    path_prefix: String,
    /// `scheme://authority` plus the prefix.
    text: String,
}

/// Why a string is not a usable base URL. Messages leave the string out,
/// since it may have come from the environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaseUrlError {
    #[error("is not a URL")]
    Syntax,
    #[error("must start with http:// or https://")]
    Scheme,
    #[error("has no host")]
    NoHost,
    #[error("must not hold a user name or password; credentials go in client_id and client_secret")]
    UserInfo,
    #[error("must not have a query (?...)")]
    Query,
    #[error("must not have a fragment (#...)")]
    Fragment,
}

impl BaseUrl {
    /// `http` or `https`.
    pub fn scheme(&self) -> &str {
        self.uri.scheme_str().unwrap_or("")
    }

    /// `host` or `host:port`.
    pub fn authority(&self) -> &str {
        self.uri.authority().map_or("", |authority| authority.as_str())
    }

    /// The host alone.
    pub fn host(&self) -> &str {
        self.uri.host().unwrap_or("")
    }

    /// Path that every upstream path goes under: `""` or e.g. `/marketo`.
    pub fn path_prefix(&self) -> &str {
        &self.path_prefix
    }

    /// `scheme://authority` plus the path prefix, with no trailing slash.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn is_https(&self) -> bool {
        self.scheme() == "https"
    }

    /// True only for the default value, which no valid config holds.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }
}

impl FromStr for BaseUrl {
    type Err = BaseUrlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        // `Uri` drops a fragment silently, so look for one first.
        if text.contains('#') {
            return Err(BaseUrlError::Fragment);
        }
        let uri: Uri = text.parse().map_err(|_| BaseUrlError::Syntax)?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(BaseUrlError::Scheme);
        }
        let authority = uri.authority().ok_or(BaseUrlError::NoHost)?;
        if authority.as_str().contains('@') {
            return Err(BaseUrlError::UserInfo);
        }
        if authority.host().is_empty() {
            return Err(BaseUrlError::NoHost);
        }
        if uri.query().is_some() {
            return Err(BaseUrlError::Query);
        }
        let path_prefix = uri.path().trim_end_matches('/').to_owned();
        let text = format!("{}://{}{path_prefix}", uri.scheme_str().unwrap_or(""), authority);
        Ok(Self {
            uri,
            path_prefix,
            text,
        })
    }
}

impl<'de> Deserialize<'de> for BaseUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A visitor rather than `String::deserialize` and a parse after, so
        // that the error is raised inside the parser and gets its key path.
        struct BaseUrlVisitor;

        impl Visitor<'_> for BaseUrlVisitor {
            type Value = BaseUrl;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an http:// or https:// URL")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<BaseUrl, E> {
                text.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(BaseUrlVisitor)
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BaseUrl").field(&self.text).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marketo_url_splits_into_parts() {
        let url: BaseUrl = "https://123-ABC-456.mktorest.com".parse().unwrap();
        assert_eq!(url.scheme(), "https");
        assert_eq!(url.authority(), "123-ABC-456.mktorest.com");
        assert_eq!(url.host(), "123-ABC-456.mktorest.com");
        assert_eq!(url.path_prefix(), "");
        assert_eq!(url.as_str(), "https://123-ABC-456.mktorest.com");
        assert_eq!(url.to_string(), url.as_str());
        assert!(url.is_https());
    }

    #[test]
    fn port_and_prefix_are_kept_trailing_slash_is_not() {
        let url: BaseUrl = "http://127.0.0.1:9999/marketo/".parse().unwrap();
        assert_eq!(url.authority(), "127.0.0.1:9999");
        assert_eq!(url.host(), "127.0.0.1");
        assert_eq!(url.path_prefix(), "/marketo");
        assert_eq!(url.as_str(), "http://127.0.0.1:9999/marketo");
        assert!(!url.is_https());
    }

    #[test]
    fn unusable_urls_are_refused() {
        let cases = [
            ("ftp://host", BaseUrlError::Scheme),
            ("host.example.com", BaseUrlError::Scheme),
            ("/rest", BaseUrlError::Scheme),
            ("https://user:pw@host", BaseUrlError::UserInfo),
            ("https://host/?a=b", BaseUrlError::Query),
            ("https://host/#top", BaseUrlError::Fragment),
            ("https://:443", BaseUrlError::NoHost),
            ("https://ho st", BaseUrlError::Syntax),
        ];
        for (text, expected) in cases {
            assert_eq!(text.parse::<BaseUrl>().unwrap_err(), expected, "{text}");
        }
    }

    #[test]
    fn config_error_names_the_key_but_not_the_url() {
        #[derive(Debug, serde::Deserialize)]
        struct Marketo {
            #[allow(dead_code)]
            base_url: BaseUrl,
        }
        let err = serde_yaml_ng::from_str::<Marketo>("\nbase_url: https://u:hunter2@host\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("base_url: must not hold a user name"), "{err}");
        assert!(err.ends_with("at line 2 column 11"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn default_is_empty() {
        let url = BaseUrl::default();
        assert!(url.is_empty());
        assert_eq!(url.scheme(), "");
        assert_eq!(url.authority(), "");
    }
}

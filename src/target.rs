//! Which requests may be forwarded, and to what path.
//!
//! Only the target's path and query are ever used: an absolute-form URI
//! or a `Host` header never chooses where a call goes. Dot-segments are
//! resolved (`node-marketo-rest` sends bulk calls as `/rest/../bulk/v1/..`)
//! on a fixed placeholder host, so no spelling of a path can leave it, and
//! the result must lie under `/rest/` or `/bulk/`.
//!
//! Spellings that servers read in different ways are refused rather than
//! resolved: a `;` (Java servers take `/rest/..;/identity` as `..` plus a
//! path parameter, so it escapes where we saw none), an encoded `/` or `\`
//! and a raw `\` (one server splits there, another does not), and a
//! dot-segment written with `%2e` (resolved by some, not by others).
//! Marketo serves none of them; plain dot-segments are still resolved.

use url::Url;

/// The Marketo API a path belongs to, for metric labels and size limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// Lead Database: `/rest/v1/...`
    Rest,
    /// Assets: `/rest/asset/v1/...`
    Asset,
    /// Bulk extract and import: `/bulk/...`
    Bulk,
    /// `/identity/oauth/token`
    Identity,
}

impl Api {
    /// The APIs whose calls go to Marketo.
    pub const CALLED: [Self; 3] = [Self::Rest, Self::Asset, Self::Bulk];

    pub fn label(self) -> &'static str {
        match self {
            Self::Rest => "rest",
            Self::Asset => "asset",
            Self::Bulk => "bulk",
            Self::Identity => "identity",
        }
    }
}

/// A path the proxy may forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Normalised path, percent-encoded, starting with `/rest/` or `/bulk/`.
    pub path: String,
    /// The raw query without `?`, if any.
    pub query: Option<String>,
    pub api: Api,
}

impl Target {
    /// Bulk import paths accept bodies up to 10 MB: leads are imported
    /// with `POST /bulk/v1/leads.json`, everything else at `.../import.json`.
    pub fn is_bulk_import(&self) -> bool {
        self.api == Api::Bulk && (self.path == "/bulk/v1/leads.json" || self.path.ends_with("/import.json"))
    }

    /// Path and query as sent upstream (`Upstream::uri_for` builds the
    /// URI itself, without this copy).
    #[cfg(test)]
    fn path_and_query(&self) -> String {
        match &self.query {
            Some(query) => format!("{}?{}", self.path, query),
            None => self.path.clone(),
        }
    }
}

/// Why a path is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path is not a valid URL path")]
    Invalid,
    #[error("only /rest/ and /bulk/ paths are forwarded")]
    NotForwarded,
}

/// Placeholder host the path is resolved against; never contacted.
const PLACEHOLDER: &str = "http://upstream.invalid";

/// Resolves `path` (as received, percent-encoded) and checks it may be
/// forwarded. `query` is kept byte for byte.
pub fn normalise(path: &str, query: Option<&str>) -> Result<Target, PathError> {
    if !path.starts_with('/') || path.split('/').any(is_ambiguous_segment) {
        return Err(PathError::Invalid);
    }
    let path = if is_plain(path) {
        path.to_owned()
    } else {
        // Concatenating (not `join`ing) keeps `//host/...` a path, not an
        // authority.
        let url = Url::parse(&format!("{PLACEHOLDER}{path}")).map_err(|_| PathError::Invalid)?;
        if url.host_str() != Some("upstream.invalid") || url.port().is_some() || !url.username().is_empty() {
            return Err(PathError::Invalid);
        }
        url.path().to_owned()
    };
    let api = if path.starts_with("/rest/asset/") {
        Api::Asset
    } else if path.starts_with("/rest/") {
        Api::Rest
    } else if path.starts_with("/bulk/") {
        Api::Bulk
    } else {
        return Err(PathError::NotForwarded);
    };
    Ok(Target {
        path,
        query: query.filter(|query| !query.is_empty()).map(str::to_owned),
        api,
    })
}

/// A segment that servers may read differently: one with a `;` path
/// parameter, an encoded `/` or `\`, a raw `\`, or a dot-segment spelled
/// with `%2e`.
fn is_ambiguous_segment(segment: &str) -> bool {
    const ENCODED_SEPARATORS: [&str; 4] = ["%2f", "%2F", "%5c", "%5C"];
    const ENCODED_DOT_SEGMENTS: [&str; 4] = ["%2e", ".%2e", "%2e.", "%2e%2e"];
    segment.contains([';', '\\'])
        || ENCODED_SEPARATORS.iter().any(|encoded| segment.contains(encoded))
        || ENCODED_DOT_SEGMENTS
            .iter()
            .any(|dots| segment.eq_ignore_ascii_case(dots))
}

/// A path with nothing to resolve: no dot-segment, no percent-escape, no
/// backslash, no empty segment. Most paths are; they skip the URL parser.
fn is_plain(path: &str) -> bool {
    !path.contains("/.") && !path.contains("//") && !path.contains(['%', '\\', '#', '@'])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Input path, and the forwarded path and API or the refusal.
    type Case = (&'static str, Result<(&'static str, Api), PathError>);

    #[test]
    fn resolves_dot_segments_and_keeps_to_the_api() {
        let cases: &[Case] = &[
            ("/rest/v1/lead/1.json", Ok(("/rest/v1/lead/1.json", Api::Rest))),
            (
                "/rest/asset/v1/emails.json",
                Ok(("/rest/asset/v1/emails.json", Api::Asset)),
            ),
            (
                "/bulk/v1/leads/export/create.json",
                Ok(("/bulk/v1/leads/export/create.json", Api::Bulk)),
            ),
            (
                "/rest/../bulk/v1/leads/export/create.json",
                Ok(("/bulk/v1/leads/export/create.json", Api::Bulk)),
            ),
            ("/rest/./v1/./leads.json", Ok(("/rest/v1/leads.json", Api::Rest))),
            (
                "/rest/v1/x/../../v1/leads.json",
                Ok(("/rest/v1/leads.json", Api::Rest)),
            ),
            ("/rest/../../../../rest/v1/a", Ok(("/rest/v1/a", Api::Rest))),
            ("/rest/..", Err(PathError::NotForwarded)),
            ("/rest", Err(PathError::NotForwarded)),
            ("/", Err(PathError::NotForwarded)),
            ("/identity/oauth/token", Err(PathError::NotForwarded)),
            ("/rest/../identity/oauth/token", Err(PathError::NotForwarded)),
            ("/rest/../_sim/stats", Err(PathError::NotForwarded)),
            ("/restless/v1", Err(PathError::NotForwarded)),
            ("/bulkhead/v1", Err(PathError::NotForwarded)),
            ("rest/v1/lead/1.json", Err(PathError::Invalid)),
            // Escapes a server could read where we saw none: refused, not resolved.
            ("/rest/..;/identity/oauth/token", Err(PathError::Invalid)),
            ("/rest/v1;jsessionid=1/leads.json", Err(PathError::Invalid)),
            ("/rest/v1/leads.json;", Err(PathError::Invalid)),
            ("/rest/;/../bulk/v1/x", Err(PathError::Invalid)),
            (
                "/rest/v1%2f..%2f..%2fidentity/oauth/token",
                Err(PathError::Invalid),
            ),
            ("/rest/v1%2F..%2Fidentity", Err(PathError::Invalid)),
            ("/rest/v1%5c..%5cidentity", Err(PathError::Invalid)),
            ("/rest/v1%5C..%5Cidentity", Err(PathError::Invalid)),
            ("/rest/v1\\..\\identity", Err(PathError::Invalid)),
            ("/rest/%2e%2e/identity/oauth/token", Err(PathError::Invalid)),
            ("/rest/%2e%2e/bulk/v1/x", Err(PathError::Invalid)),
            ("/rest/%2E%2E/%2e%2E/bulk/v1/x", Err(PathError::Invalid)),
            ("/rest/.%2e/x", Err(PathError::Invalid)),
            ("/rest/%2E./x", Err(PathError::Invalid)),
            ("/rest/%2e/v1/leads.json", Err(PathError::Invalid)),
            ("/rest/v1/leads.json/%2E", Err(PathError::Invalid)),
            // An escaped dot inside a name is an ordinary character.
            ("/rest/v1/lead%2ejson", Ok(("/rest/v1/lead%2ejson", Api::Rest))),
            ("/rest/v1/%2e%2e%2e", Ok(("/rest/v1/%2e%2e%2e", Api::Rest))),
        ];
        for (input, expected) in cases {
            let got = normalise(input, None).map(|target| (target.path, target.api));
            let expected = expected.clone().map(|(path, api)| (path.to_owned(), api));
            assert_eq!(got, expected, "input {input}");
        }
    }

    #[test]
    fn never_reaches_another_host() {
        // Each would name another host if resolved as a URL reference.
        let cases = [
            "//evil.example/rest/v1/lead/1.json",
            "///evil.example/rest/v1/x",
            "/\\evil.example/rest/v1/x",
            "/rest/v1/..//evil.example/x",
            "/rest/@evil.example/v1/x",
            "/rest/v1/lead/1.json#@evil.example",
            "//user:pw@evil.example:443/rest/v1/x",
            "/rest/%2F%2Fevil.example/v1",
            "/rest/v1/http://evil.example/x",
        ];
        for input in cases {
            match normalise(input, None) {
                Ok(target) => {
                    let uri = format!("https://123-abc-456.mktorest.com{}", target.path_and_query());
                    let parsed = Url::parse(&uri).unwrap();
                    assert_eq!(
                        parsed.host_str(),
                        Some("123-abc-456.mktorest.com"),
                        "input {input} gave {uri}"
                    );
                    assert!(target.path.starts_with("/rest/") || target.path.starts_with("/bulk/"));
                }
                Err(error) => assert!(
                    matches!(error, PathError::NotForwarded | PathError::Invalid),
                    "input {input}"
                ),
            }
        }
    }

    #[test]
    fn keeps_the_query_byte_for_byte() {
        let target = normalise(
            "/rest/v1/leads.json",
            Some("filterType=email&filterValues=a%40b.c,d+e"),
        )
        .unwrap();
        assert_eq!(
            target.path_and_query(),
            "/rest/v1/leads.json?filterType=email&filterValues=a%40b.c,d+e"
        );
        assert_eq!(normalise("/rest/v1/leads.json", Some("")).unwrap().query, None);
    }

    #[test]
    fn knows_bulk_import_paths() {
        let import = |path| normalise(path, None).unwrap().is_bulk_import();
        assert!(import("/bulk/v1/leads.json"));
        assert!(import("/bulk/v1/customobjects/car_c/import.json"));
        assert!(import("/bulk/v1/program/1001/members/import.json"));
        assert!(!import("/bulk/v1/leads/export/create.json"));
        assert!(!import("/rest/v1/leads.json"));
    }
}

//! What is taken off a request before it goes to Marketo, and off an
//! answer before it goes back: hop-by-hop headers, the client's own
//! credentials, and every `access_token` parameter (query string,
//! urlencoded body, multipart field). The proxy adds its own token.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, header};

/// Headers that describe one connection, not the message (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// The header services send their API key in.
pub const API_KEY_HEADER: HeaderName = HeaderName::from_static("x-api-key");

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

/// Prepares a client's headers for Marketo: no hop-by-hop headers, no
/// client credentials, and nothing that describes the body as the client
/// framed it (the body is buffered and re-framed).
pub fn request_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(header::AUTHORIZATION);
    headers.remove(API_KEY_HEADER);
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::EXPECT);
    // Answers are peeked for Marketo's error envelope, which needs them
    // uncompressed.
    headers.remove(header::ACCEPT_ENCODING);
}

/// The value of the first `access_token` pair in a query or form body.
pub fn find_access_token(pairs: &[u8]) -> Option<String> {
    form_urlencoded::parse(pairs)
        .find(|(key, _)| key == "access_token")
        .map(|(_, value)| value.into_owned())
}

/// Drops every `access_token` pair from a query string, leaving every
/// other byte as it was.
pub fn strip_access_token_pairs(pairs: &str) -> String {
    String::from_utf8_lossy(&strip_access_token_bytes(pairs.as_bytes())).into_owned()
}

/// Drops every `access_token` pair from an urlencoded body, leaving every
/// other byte as it was (even bytes that are not UTF-8).
pub fn strip_access_token_bytes(pairs: &[u8]) -> Vec<u8> {
    let kept: Vec<&[u8]> = pairs
        .split(|byte| *byte == b'&')
        .filter(|pair| {
            let key = pair.split(|byte| *byte == b'=').next().unwrap_or_default();
            form_urlencoded::parse(key)
                .next()
                .is_none_or(|(key, _)| key != "access_token")
        })
        .collect();
    kept.join(&b'&')
}

/// The kind of body, from its `Content-Type`.
pub enum BodyKind {
    Form,
    Multipart { boundary: String },
    Other,
}

pub fn body_kind(headers: &HeaderMap) -> BodyKind {
    let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
    else {
        return BodyKind::Other;
    };
    let mut params = content_type.split(';').map(str::trim);
    let essence = params.next().unwrap_or_default().to_ascii_lowercase();
    match essence.as_str() {
        "application/x-www-form-urlencoded" => BodyKind::Form,
        "multipart/form-data" => params
            .filter_map(|param| param.split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("boundary"))
            .map(|(_, value)| BodyKind::Multipart {
                boundary: value.trim().trim_matches('"').to_owned(),
            })
            .unwrap_or(BodyKind::Other),
        _ => BodyKind::Other,
    }
}

/// Removes `access_token` form fields from a multipart body. Other parts
/// are kept byte for byte. Returns the body and the token found, if any.
pub fn strip_access_token_multipart(body: &Bytes, boundary: &str) -> (Bytes, Option<String>) {
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let starts = find_all(body, delimiter);
    if starts.len() < 2 {
        return (body.clone(), None);
    }
    let mut out = BytesMut::with_capacity(body.len());
    let mut token = None;
    out.extend_from_slice(&body[..starts[0]]);
    for window in starts.windows(2) {
        let part = &body[window[0]..window[1]];
        match access_token_part(&part[delimiter.len()..]) {
            Some(value) => token = token.or(Some(value)),
            None => out.extend_from_slice(part),
        }
    }
    if let Some(last) = starts.last() {
        out.extend_from_slice(&body[*last..]);
    }
    (out.freeze(), token)
}

/// If this part (after its delimiter) is the `access_token` field, its value.
fn access_token_part(part: &[u8]) -> Option<String> {
    let headers_end = find_all(part, b"\r\n\r\n").first().copied()?;
    let headers = std::str::from_utf8(&part[..headers_end]).ok()?;
    let is_token = headers.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("content-disposition:")
            && line.split(';').any(|param| {
                let param = param.trim();
                param == "name=\"access_token\"" || param == "name=access_token"
            })
    });
    if !is_token {
        return None;
    }
    let value = &part[headers_end + 4..];
    let value = value.strip_suffix(b"\r\n").unwrap_or(value);
    Some(String::from_utf8_lossy(value).into_owned())
}

fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return Vec::new();
    }
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, window)| *window == needle)
        .map(|(index, _)| index)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_go() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-trace"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-trace", HeaderValue::from_static("1"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn request_headers_lose_client_credentials() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client-key"),
        );
        headers.insert(API_KEY_HEADER, HeaderValue::from_static("client-key"));
        headers.insert(header::HOST, HeaderValue::from_static("evil.example"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        request_headers(&mut headers);
        assert_eq!(headers.len(), 1);
    }

    #[test]
    fn access_token_pairs_go_and_the_rest_stays_byte_for_byte() {
        let cases = [
            ("access_token=abc", ""),
            ("a=1&access_token=abc&b=%20x+y", "a=1&b=%20x+y"),
            ("access%5Ftoken=abc&b=2", "b=2"),
            ("access_token=1&access_token=2&c", "c"),
            (
                "filterType=email&filterValues=a%40b.c",
                "filterType=email&filterValues=a%40b.c",
            ),
            ("access_tokens=keep", "access_tokens=keep"),
        ];
        for (input, expected) in cases {
            assert_eq!(strip_access_token_pairs(input), expected, "input {input}");
        }
        assert_eq!(find_access_token(b"a=1&access_token=t%3Ak"), Some("t:k".into()));
        assert_eq!(
            strip_access_token_bytes(b"a=\xff\xfe&access_token=x&b=2"),
            b"a=\xff\xfe&b=2".to_vec(),
            "bytes that are not UTF-8 pass unchanged"
        );
    }

    #[test]
    fn multipart_access_token_field_goes() {
        let body = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"format\"\r\n\r\ncsv\r\n\
--XyZ\r\nContent-Disposition: form-data; name=\"access_token\"\r\n\r\nsecret-token\r\n\
--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"leads.csv\"\r\nContent-Type: text/csv\r\n\r\nemail\r\na@b.c\r\n\
--XyZ--\r\n",
        );
        let (stripped, token) = strip_access_token_multipart(&body, "XyZ");
        assert_eq!(token.as_deref(), Some("secret-token"));
        let expected = b"--XyZ\r\nContent-Disposition: form-data; name=\"format\"\r\n\r\ncsv\r\n\
--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"leads.csv\"\r\nContent-Type: text/csv\r\n\r\nemail\r\na@b.c\r\n\
--XyZ--\r\n";
        assert_eq!(&stripped[..], &expected[..]);
    }

    #[test]
    fn body_kind_reads_the_boundary() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=\"abc def\""),
        );
        assert!(matches!(body_kind(&headers), BodyKind::Multipart { boundary } if boundary == "abc def"));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded; charset=UTF-8"),
        );
        assert!(matches!(body_kind(&headers), BodyKind::Form));
    }
}

//! What is taken off a request before it goes to Marketo, and off an
//! answer before it goes back: hop-by-hop headers, the client's own
//! credentials, and every `access_token` parameter (query string,
//! urlencoded body, multipart field). The proxy adds its own token.
//!
//! Bodies are read before the caller is known, so every parse here is
//! linear in its input, whatever the client sends: multipart delimiters
//! are found with `memchr::memmem`, and a boundary RFC 2046 does not allow
//! (empty or over 70 characters) is refused before the body is looked at.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, header};
use memchr::memmem;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyKind {
    Form,
    Multipart { boundary: Boundary },
    Other,
}

/// A multipart boundary of 1 to [`MAX_BOUNDARY_CHARS`] characters, as RFC
/// 2046 requires. Only such a boundary is ever searched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boundary(String);

impl Boundary {
    pub fn new(boundary: &str) -> Result<Self, InvalidBoundary> {
        if (1..=MAX_BOUNDARY_CHARS).contains(&boundary.len()) {
            Ok(Self(boundary.to_owned()))
        } else {
            Err(InvalidBoundary)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub use crate::error::{InvalidBoundary, MAX_BOUNDARY_CHARS};

/// The kind of body its `Content-Type` announces; a multipart body with a
/// boundary RFC 2046 does not allow is an error, so it is refused as it is
/// rather than scanned.
pub fn body_kind(headers: &HeaderMap) -> Result<BodyKind, InvalidBoundary> {
    let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
    else {
        return Ok(BodyKind::Other);
    };
    let mut params = content_type.split(';').map(str::trim);
    let essence = params.next().unwrap_or_default().to_ascii_lowercase();
    match essence.as_str() {
        "application/x-www-form-urlencoded" => Ok(BodyKind::Form),
        "multipart/form-data" => match params
            .filter_map(|param| param.split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("boundary"))
        {
            Some((_, value)) => Ok(BodyKind::Multipart {
                boundary: Boundary::new(value.trim().trim_matches('"'))?,
            }),
            None => Ok(BodyKind::Other),
        },
        _ => Ok(BodyKind::Other),
    }
}

/// Removes `access_token` form fields from a multipart body. Other parts
/// are kept byte for byte. Returns the body and the token found, if any.
pub fn strip_access_token_multipart(body: &Bytes, boundary: &Boundary) -> (Bytes, Option<String>) {
    let starts = delimiter_starts(body, boundary);
    if starts.len() < 2 {
        return (body.clone(), None);
    }
    let dash_boundary = 2 + boundary.as_str().len();
    let mut out = BytesMut::with_capacity(body.len());
    let mut token = None;
    out.extend_from_slice(&body[..starts[0]]);
    for window in starts.windows(2) {
        let part = &body[window[0]..window[1]];
        match access_token_part(&part[dash_boundary..]) {
            Some(value) => token = token.or(Some(value)),
            None => out.extend_from_slice(part),
        }
    }
    if let Some(last) = starts.last() {
        out.extend_from_slice(&body[*last..]);
    }
    (out.freeze(), token)
}

/// Where each `--boundary` delimiter starts, in one pass: the first
/// anywhere (a preamble may come before it), then only those that begin a
/// line. RFC 2046 attaches the CRLF before a delimiter to it, so
/// `--boundary` mid-line, inside a header or a value, splits nothing here
/// either, and a field is seen whole as the server will see it.
fn delimiter_starts(body: &[u8], boundary: &Boundary) -> Vec<usize> {
    let delimiter = format!("\r\n--{}", boundary.as_str());
    let delimiter = delimiter.as_bytes();
    let dash_boundary = &delimiter[2..];
    let Some(first) = memmem::find(body, dash_boundary) else {
        return Vec::new();
    };
    let rest = first + dash_boundary.len();
    let mut starts = vec![first];
    starts.extend(memmem::find_iter(&body[rest..], delimiter).map(|at| rest + at + 2));
    starts
}

/// If this part (after its delimiter) is the `access_token` field, its value.
fn access_token_part(part: &[u8]) -> Option<String> {
    let headers_end = memmem::find(part, b"\r\n\r\n")?;
    // Lossy: a stray byte that is not UTF-8 must not hide the field's name.
    let headers = String::from_utf8_lossy(&part[..headers_end]);
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

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
        let (stripped, token) = strip_access_token_multipart(&body, &Boundary::new("XyZ").unwrap());
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
        assert_eq!(
            body_kind(&headers),
            Ok(BodyKind::Multipart {
                boundary: Boundary::new("abc def").unwrap()
            })
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded; charset=UTF-8"),
        );
        assert_eq!(body_kind(&headers), Ok(BodyKind::Form));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data"),
        );
        assert_eq!(
            body_kind(&headers),
            Ok(BodyKind::Other),
            "no boundary, nothing to search"
        );
    }

    fn multipart_content_type(boundary: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = format!("multipart/form-data; boundary=\"{boundary}\"");
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(&value).unwrap());
        headers
    }

    #[test]
    fn a_boundary_of_70_characters_is_used_and_one_of_71_is_refused() {
        let longest = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-.";
        assert_eq!(longest.len(), MAX_BOUNDARY_CHARS);
        let Ok(BodyKind::Multipart { boundary }) = body_kind(&multipart_content_type(longest)) else {
            panic!("a 70-character boundary is allowed");
        };
        let body = Bytes::from(format!(
            "--{longest}\r\nContent-Disposition: form-data; name=\"access_token\"\r\n\r\nt\r\n\
             --{longest}\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--{longest}--\r\n"
        ));
        let (stripped, token) = strip_access_token_multipart(&body, &boundary);
        assert_eq!(token.as_deref(), Some("t"));
        assert_eq!(
            stripped,
            format!(
                "--{longest}\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--{longest}--\r\n"
            )
        );

        for refused in [&format!("{longest}/"), "", &"b".repeat(20 * 1024)] {
            assert_eq!(
                body_kind(&multipart_content_type(refused)),
                Err(InvalidBoundary),
                "a boundary of {} characters",
                refused.len()
            );
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary="),
        );
        assert_eq!(body_kind(&headers), Err(InvalidBoundary));
    }

    #[test]
    fn a_delimiter_counts_only_at_the_start_of_a_line() {
        // `--XyZ` inside the token field's header and mid-line in another
        // field's value: neither splits a field, so the token is still seen.
        let body = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"access_token\"; x=\"--XyZ\"\r\n\r\nsecret\r\n\
--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\na --XyZ b\r\n\
--XyZ--\r\n",
        );
        let (stripped, token) = strip_access_token_multipart(&body, &Boundary::new("XyZ").unwrap());
        assert_eq!(token.as_deref(), Some("secret"));
        assert_eq!(
            &stripped[..],
            b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\na --XyZ b\r\n--XyZ--\r\n"
        );
    }

    /// The characters RFC 2046 allows in a boundary (space aside, which
    /// may not end one).
    const BCHARS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=?";

    /// Bytes that make parsing hard: line ends, dashes, the field name and
    /// header words, raw bytes, and (`None`) the boundary itself mid-line.
    fn tricky_bytes() -> impl Strategy<Value = Vec<Option<Vec<u8>>>> {
        let piece = prop_oneof![
            Just(Some(b"\r\n".to_vec())),
            Just(Some(b"\r".to_vec())),
            Just(Some(b"\n".to_vec())),
            Just(Some(b"\r\n\r\n".to_vec())),
            Just(Some(b"--".to_vec())),
            Just(Some(b"access_token".to_vec())),
            Just(Some(
                b"\r\nContent-Disposition: form-data; name=\"access_token\"\r\n".to_vec()
            )),
            Just(None),
            prop::collection::vec(any::<u8>(), 0..12).prop_map(Some),
        ];
        prop::collection::vec(piece, 0..8)
    }

    /// The pieces joined, each `None` written as ` --{boundary}`.
    fn render(pieces: &[Option<Vec<u8>>], boundary: &str) -> Vec<u8> {
        let mid_line = format!(" --{boundary}").into_bytes();
        pieces
            .iter()
            .flat_map(|piece| piece.as_deref().unwrap_or(&mid_line).iter().copied())
            .collect()
    }

    /// The headers of an `access_token` field, as clients spell them.
    const TOKEN_HEADERS: [&[u8]; 5] = [
        b"Content-Disposition: form-data; name=\"access_token\"",
        b"content-disposition: form-data; name=access_token",
        b"Content-Disposition: form-data; name=\"access_token\"; filename=\"t.txt\"\r\nContent-Type: text/plain",
        b"Content-Type: text/plain\r\nContent-Disposition: form-data;name=\"access_token\"",
        b"Content-Disposition: form-data; name=\"access_token\"\r\nX-Note: \xff\xfe",
    ];

    /// A field's headers, and whether they name it `access_token`.
    fn field_headers() -> impl Strategy<Value = (bool, Vec<u8>)> {
        let near_misses = prop::sample::select(vec![
            "access_tokens",
            "access_token_",
            "my_access_token",
            "access token",
            "",
        ]);
        let other_name = prop_oneof![near_misses.prop_map(str::to_owned), "[a-zA-Z0-9_ .-]{1,16}"]
            .prop_filter("another field", |name| !name.eq_ignore_ascii_case("access_token"));
        prop_oneof![
            (0..TOKEN_HEADERS.len()).prop_map(|index| (true, TOKEN_HEADERS[index].to_vec())),
            (other_name, any::<bool>()).prop_map(|(name, comment)| {
                let mut headers = format!("Content-Disposition: form-data; name=\"{name}\"").into_bytes();
                if comment {
                    // Named in another header: still not the field.
                    headers.extend_from_slice(b"\r\nX-Comment: name=\"access_token\"");
                }
                (false, headers)
            }),
        ]
    }

    /// A multipart body from its pieces, kept apart so the expected results
    /// can be written down without parsing.
    #[derive(Debug)]
    struct MultipartCase {
        boundary: String,
        preamble: Vec<u8>,
        /// Each field: is it an `access_token`, its bytes from its
        /// delimiter to the next, its value.
        fields: Vec<(bool, Vec<u8>, Vec<u8>)>,
        epilogue: Vec<u8>,
    }

    impl MultipartCase {
        fn body(&self, keep_tokens: bool) -> Vec<u8> {
            let mut body = self.preamble.clone();
            for (token, bytes, _) in &self.fields {
                if keep_tokens || !token {
                    body.extend_from_slice(bytes);
                }
            }
            body.extend_from_slice(format!("--{}--", self.boundary).as_bytes());
            body.extend_from_slice(&self.epilogue);
            body
        }

        /// A line starting with the boundary ends a field for every parser,
        /// so a field's content never holds one (RFC 2046 5.1.1).
        fn is_well_formed(&self) -> bool {
            let delimiter = format!("\r\n--{}", self.boundary).into_bytes();
            let holds = |bytes: &[u8]| bytes.windows(delimiter.len()).any(|window| window == delimiter);
            !self.fields.iter().any(|(_, _, value)| holds(value)) && !holds(&self.epilogue)
        }
    }

    fn multipart_case() -> impl Strategy<Value = MultipartCase> {
        let boundary = prop::collection::vec(prop::sample::select(BCHARS), 1..=MAX_BOUNDARY_CHARS)
            .prop_map(|bytes| String::from_utf8(bytes).unwrap());
        let field = (field_headers(), "[ \t]{0,2}", tricky_bytes());
        // No dash in the preamble, so the first delimiter is where it ends.
        let preamble = "([a-zA-Z0-9 ]{0,10}\r\n){0,2}";
        (
            boundary,
            preamble,
            prop::collection::vec(field, 0..6),
            tricky_bytes(),
        )
            .prop_map(|(boundary, preamble, fields, epilogue)| {
                let fields = fields
                    .into_iter()
                    .map(|((token, headers), padding, value)| {
                        let value = render(&value, &boundary);
                        let mut bytes = format!("--{boundary}{padding}\r\n").into_bytes();
                        bytes.extend_from_slice(&headers);
                        bytes.extend_from_slice(b"\r\n\r\n");
                        bytes.extend_from_slice(&value);
                        bytes.extend_from_slice(b"\r\n");
                        (token, bytes, value)
                    })
                    .collect();
                let epilogue = render(&epilogue, &boundary);
                MultipartCase {
                    boundary,
                    preamble: preamble.into_bytes(),
                    fields,
                    epilogue,
                }
            })
            .prop_filter("well-formed", MultipartCase::is_well_formed)
    }

    /// One urlencoded pair and whether it is an `access_token`; no `&` in
    /// either (it separates pairs).
    fn pair() -> impl Strategy<Value = (bool, Vec<u8>)> {
        let token_key = prop::sample::select(vec![
            "access_token",
            "access%5Ftoken",
            "access%5ftoken",
            "%61ccess_token",
            "access_toke%6E",
        ]);
        let other_key = prop_oneof![
            prop::sample::select(vec![
                "access_tokens",
                "access+token",
                "Access_Token",
                "access%20token",
                "_method"
            ])
            .prop_map(str::to_owned),
            "[a-zA-Z0-9_%+.]{0,12}",
        ]
        .prop_filter("another key", |key| {
            form_urlencoded::parse(key.as_bytes())
                .next()
                .is_none_or(|(key, _)| key != "access_token")
        });
        let value = prop::collection::vec(
            any::<u8>().prop_filter("not a separator", |byte| *byte != b'&'),
            0..12,
        );
        prop_oneof![
            (token_key, prop::option::of(value.clone())).prop_map(|(key, value)| (
                true,
                key.to_owned(),
                value
            )),
            (other_key, prop::option::of(value)).prop_map(|(key, value)| (false, key, value)),
        ]
        .prop_map(|(token, key, value)| {
            let mut pair = key.into_bytes();
            if let Some(value) = value {
                pair.push(b'=');
                pair.extend_from_slice(&value);
            }
            (token, pair)
        })
    }

    proptest! {
        /// Every `access_token` field goes, the first one's value is the
        /// token, and every other byte stays where it was.
        #[test]
        fn multipart_stripping_removes_exactly_the_access_token_fields(case in multipart_case()) {
            let boundary = Boundary::new(&case.boundary).unwrap();
            let (stripped, token) = strip_access_token_multipart(&Bytes::from(case.body(true)), &boundary);
            prop_assert_eq!(&stripped[..], &case.body(false)[..]);
            let first = case.fields.iter().find(|(token, ..)| *token);
            prop_assert_eq!(token, first.map(|(_, _, value)| String::from_utf8_lossy(value).into_owned()));
            prop_assert_eq!(strip_access_token_multipart(&stripped, &boundary).1, None);
        }

        /// Every `access_token` pair goes, however its name is escaped, and
        /// every other byte stays where it was; the pair is found exactly
        /// when there is one (the body is only rewritten then).
        #[test]
        fn urlencoded_stripping_removes_exactly_the_access_token_pairs(
            pairs in prop::collection::vec(pair(), 0..8),
        ) {
            let join = |keep_tokens: bool| {
                let kept: Vec<&[u8]> = pairs
                    .iter()
                    .filter(|(token, _)| keep_tokens || !token)
                    .map(|(_, pair)| pair.as_slice())
                    .collect();
                kept.join(&b'&')
            };
            let body = join(true);
            let stripped = strip_access_token_bytes(&body);
            prop_assert_eq!(&stripped, &join(false));
            prop_assert_eq!(find_access_token(&body).is_some(), pairs.iter().any(|(token, _)| *token));
            prop_assert_eq!(find_access_token(&stripped), None);
        }
    }
}

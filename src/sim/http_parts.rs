//! The simulator's ways with HTTP: reading bodies and parameters, and
//! writing Marketo's answers, envelopes and failures.

use super::*;

/// The answer an injected [`Failure`] gives instead of the call's own, and
/// the code the arrival is recorded under; `None` when it only pads the
/// call's own answer with a large header.
pub(super) fn injected_answer(request_id: &str, failure: Failure) -> Option<(Response<SimBody>, String)> {
    let Failure {
        code: error_code,
        http_status,
        body,
        header_bytes,
    } = failure;
    let status =
        http_status.map(|status| StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE));
    if let Some(body) = body {
        let mut response = Response::new(full(body));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json;charset=UTF-8"),
        );
        let recorded = match status {
            Some(status) => {
                *response.status_mut() = status;
                format!("http_{}", status.as_u16())
            }
            None => "body".into(),
        };
        return Some((response, recorded));
    }
    match (status, error_code) {
        (Some(status), _) => Some((
            error_response(request_id, status, status.as_str(), "Injected failure"),
            format!("http_{}", status.as_u16()),
        )),
        (None, Some(error_code)) => Some((
            envelope_error(request_id, &error_code, "Injected failure"),
            error_code,
        )),
        (None, None) if header_bytes.is_some() => None,
        (None, None) => Some((
            envelope_error(request_id, code::SYSTEM_ERROR, "Injected failure"),
            code::SYSTEM_ERROR.into(),
        )),
    }
}

pub(super) fn take_one(counter: &mut u32) -> bool {
    if *counter > 0 {
        *counter -= 1;
        true
    } else {
        false
    }
}

pub(super) async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, StatusCode> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(StatusCode::PAYLOAD_TOO_LARGE),
        Err(_) => Err(StatusCode::BAD_REQUEST),
    }
}

pub(super) fn query_params(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .map(|query| form_params(query.as_bytes()))
        .unwrap_or_default()
}

pub(super) fn form_params(body: &[u8]) -> BTreeMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

/// A multipart or other body that carries an `access_token` field.
pub(super) fn body_mentions_access_token(headers: &http::HeaderMap, body: &[u8]) -> bool {
    let multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("multipart/"));
    multipart && body.windows(14).any(|window| window == b"\"access_token\"")
}

pub(super) fn full(bytes: impl Into<Bytes>) -> SimBody {
    Full::new(bytes.into()).boxed()
}

pub(super) fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<SimBody> {
    json_response_with(status, serde_json::to_vec(value))
}

/// A JSON answer of bytes already written.
pub(super) fn json_response_with(status: StatusCode, body: serde_json::Result<Vec<u8>>) -> Response<SimBody> {
    let body = body.unwrap_or_default();
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    response
}

pub(super) fn envelope_error(request_id: &str, error_code: &str, message: &str) -> Response<SimBody> {
    error_response(request_id, StatusCode::OK, error_code, message)
}

pub(super) fn error_response(
    request_id: &str,
    status: StatusCode,
    error_code: &str,
    message: &str,
) -> Response<SimBody> {
    let body = marketo::error_body(request_id, error_code, message);
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    response
}

pub(super) fn identity_error(status: StatusCode, error: &str, description: &str) -> Response<SimBody> {
    json_response(
        status,
        &IdentityError {
            error: error.into(),
            error_description: description.into(),
        },
    )
}

/// Streams the CSV in chunks, as Marketo streams export files; or, when
/// the request names one range of bytes (`Range: bytes=…`), that part as
/// a 206, and a 416 when the file has no such bytes. Several ranges at once
/// get the whole file, as RFC 9110 allows.
pub(super) fn csv_response(rows: Vec<String>, range: Option<&HeaderValue>) -> Response<SimBody> {
    const ROWS_PER_CHUNK: usize = 256;
    let mut response = match range.map(|range| byte_range(range, &rows)) {
        None | Some(Err(Ranges::Several)) => {
            let chunks: Vec<Result<Frame<Bytes>, Infallible>> = rows
                .chunks(ROWS_PER_CHUNK)
                .map(|chunk| Ok(Frame::data(Bytes::from(chunk.concat()))))
                .collect();
            Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                chunks,
            ))))
        }
        Some(Ok((part, content_range))) => {
            let mut response = Response::new(full(part));
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            response
                .headers_mut()
                .insert(header::CONTENT_RANGE, content_range);
            response
        }
        Some(Err(Ranges::Unsatisfiable(content_range))) => {
            let mut response = Response::new(full(Bytes::new()));
            *response.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            response
                .headers_mut()
                .insert(header::CONTENT_RANGE, content_range);
            response
        }
    };
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv;charset=UTF-8"),
    );
    response
        .headers_mut()
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    response
}

/// Why a `Range` is not served as one part.
enum Ranges {
    Several,
    /// With the `Content-Range` that says the file's length.
    Unsatisfiable(HeaderValue),
}

/// The bytes of the file `rows` make that `range` names, with their
/// `Content-Range`.
fn byte_range(range: &HeaderValue, rows: &[String]) -> Result<(Bytes, HeaderValue), Ranges> {
    let file = rows.concat().into_bytes();
    let length = file.len() as u64;
    let unsatisfiable = || Ranges::Unsatisfiable(header_value(format!("bytes */{length}")));
    let ranges = range
        .to_str()
        .ok()
        .and_then(|range| http_range_header::parse_range_header(range).ok())
        .and_then(|parsed| parsed.validate(length).ok())
        .ok_or_else(unsatisfiable)?;
    let [part] = ranges.as_slice() else {
        return Err(Ranges::Several);
    };
    let (start, end) = (*part.start(), *part.end());
    let content_range = header_value(format!("bytes {start}-{end}/{length}"));
    Ok((
        Bytes::from(file).slice(start as usize..=end as usize),
        content_range,
    ))
}

/// A header of text written here (always visible ASCII).
fn header_value(text: String) -> HeaderValue {
    HeaderValue::try_from(text).unwrap_or(HeaderValue::from_static("?"))
}

//! The Marketo REST wire format: error codes, the `success:false` envelope,
//! the identity answer. Shared by the proxy (which reads and imitates it)
//! and the simulator (which speaks it).

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

/// Marketo's documented limits, per instance. The proxy's defaults and the
/// simulator's both come from here.
pub mod limits {
    use super::Duration;

    /// Calls in any rolling window of [`WINDOW`].
    pub const WINDOW_CALLS: u32 = 100;
    pub const WINDOW: Duration = Duration::from_secs(20);
    /// Calls in flight at once.
    pub const CONCURRENCY: u32 = 10;
    /// Calls a day (some subscriptions have other numbers).
    pub const DAILY_QUOTA: u64 = 50_000;
    /// Lifetime of an access token.
    pub const TOKEN_TTL: Duration = Duration::from_secs(3600);
    /// Longest URI Marketo accepts (HTTP 414 beyond).
    pub const MAX_URI_BYTES: usize = 8 * 1024;
    /// Largest request body Marketo accepts (HTTP 413 beyond).
    pub const MAX_BODY_BYTES: usize = 1024 * 1024;
    /// Largest body of a bulk import.
    pub const MAX_IMPORT_BODY_BYTES: usize = 10 * 1024 * 1024;
    /// Bulk extract file bytes a day.
    pub const EXPORT_DAILY_BYTES: u64 = 500 * 1024 * 1024;
    /// Bulk jobs of one queue in it at once, processing ones included.
    pub const BULK_QUEUE: u32 = 10;
}

/// Marketo error codes the proxy and the simulator act on. Marketo sends
/// them as strings.
pub mod code {
    pub const TOKEN_MISSING: &str = "600";
    pub const TOKEN_INVALID: &str = "601";
    pub const TOKEN_EXPIRED: &str = "602";
    pub const ACCESS_DENIED: &str = "603";
    pub const METHOD_NOT_SUPPORTED: &str = "605";
    pub const TIMED_OUT: &str = "604";
    pub const RATE_LIMITED: &str = "606";
    pub const QUOTA_REACHED: &str = "607";
    pub const UNAVAILABLE: &str = "608";
    pub const INVALID_JSON: &str = "609";
    pub const NOT_FOUND: &str = "610";
    pub const SYSTEM_ERROR: &str = "611";
    pub const CONCURRENCY_LIMITED: &str = "615";
    pub const TRANSIENT: &str = "713";
    pub const INVALID_VALUE: &str = "1003";
    pub const TOO_MANY_JOBS: &str = "1029";
}

/// Whether Marketo left a call with this error code out of its counts:
/// its error-code reference says an answer with 601, 602, 604, 605, 608 or
/// 611 "is not counted against your daily quota, or your rate limit".
pub fn is_uncounted(error_code: &str) -> bool {
    UNCOUNTED.contains(&error_code)
}

/// The codes of [`is_uncounted`].
pub const UNCOUNTED: [&str; 6] = [
    code::TOKEN_INVALID,
    code::TOKEN_EXPIRED,
    code::TIMED_OUT,
    code::METHOD_NOT_SUPPORTED,
    code::UNAVAILABLE,
    code::SYSTEM_ERROR,
];

/// One entry of the `errors` array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// A string in Marketo's answers; a number is accepted too.
    #[serde(deserialize_with = "code_as_string")]
    pub code: String,
    #[serde(default)]
    pub message: String,
}

fn code_as_string<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Code {
        Text(String),
        Number(u64),
    }
    Ok(match Code::deserialize(deserializer)? {
        Code::Text(text) => text,
        Code::Number(number) => number.to_string(),
    })
}

/// A Marketo code as a metric label: codes are short numbers; anything
/// else is `other`, so a strange answer cannot grow the label set.
pub fn code_label(code: &str) -> &str {
    if !code.is_empty() && code.len() <= 5 && code.bytes().all(|byte| byte.is_ascii_digit()) {
        code
    } else {
        "other"
    }
}

/// The part of a REST answer that says whether it worked. Bodies are much
/// larger than this; only these fields are read.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Envelope {
    #[serde(default)]
    pub success: bool,
    #[serde(default)]
    pub errors: Vec<ApiError>,
}

impl Envelope {
    /// The first error code, if the call failed.
    pub fn first_code(&self) -> Option<&str> {
        if self.success {
            None
        } else {
            self.errors.first().map(|error| error.code.as_str())
        }
    }
}

/// The answer of `/identity/oauth/token`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenAnswer {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: u64,
    pub scope: String,
}

/// An identity error answer (`invalid_client`, ...).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityError {
    pub error: String,
    pub error_description: String,
}

/// Marketo's count of one day's calls (`/rest/v1/stats/usage.json`) and
/// of its refusals for the window and concurrency (606 and 615 in
/// `/rest/v1/stats/errors.json`), and when they were read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketoUsage {
    pub date: NaiveDate,
    pub total: u64,
    /// `None` when the error report could not be read.
    #[serde(default)]
    pub refused: Option<u64>,
    /// The day's calls from outside the proxy, executed or refused, as
    /// the reader reckoned them from both reports.
    #[serde(default)]
    pub foreign: Option<u64>,
    pub read_at: DateTime<Utc>,
}

/// A `success:false` body with one error, as Marketo writes it.
pub fn error_body(request_id: &str, code: &str, message: &str) -> Bytes {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a> {
        request_id: &'a str,
        success: bool,
        errors: [ApiError; 1],
    }
    let body = Body {
        request_id,
        success: false,
        errors: [ApiError {
            code: code.to_owned(),
            message: message.to_owned(),
        }],
    };
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

/// A fresh access token in Marketo's shape (a UUID and a suffix naming
/// who issued it): 128 random bits.
pub fn new_access_token(suffix: &str) -> String {
    access_token(rand::random(), suffix)
}

/// `bytes` written as an access token in Marketo's shape: a UUID, then
/// `:suffix`.
pub fn access_token(bytes: [u8; 16], suffix: &str) -> String {
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}:{suffix}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A request id in Marketo's style (`e42b#14272d07d78`), with the time now.
pub fn request_id() -> String {
    request_id_at(chrono::Utc::now().timestamp_millis())
}

/// A request id in Marketo's style with the time `millis` (epoch ms):
/// Marketo's clock when it took the call.
pub fn request_id_at(millis: i64) -> String {
    let prefix: u16 = rand::random();
    format!("{prefix:x}#{millis:x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_marketo_shape() {
        let body = error_body(
            "a#1",
            code::RATE_LIMITED,
            "Max rate limit '100' exceeded with in '20' secs",
        );
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["success"], false);
        assert_eq!(value["requestId"], "a#1");
        assert_eq!(value["errors"][0]["code"], "606");
    }

    #[test]
    fn outcome_accepts_numeric_codes_and_missing_messages() {
        let outcome: Envelope = serde_json::from_str(r#"{"success":false,"errors":[{"code":606}]}"#).unwrap();
        assert_eq!(outcome.first_code(), Some("606"));
        assert_eq!(code_label("606"), "606");
        assert_eq!(code_label("<html>"), "other");
    }

    #[test]
    fn outcome_reads_the_first_error_code() {
        let outcome: Envelope = serde_json::from_str(
            r#"{"requestId":"x","success":false,"errors":[{"code":"601","message":"Access token invalid"}]}"#,
        )
        .unwrap();
        assert_eq!(outcome.first_code(), Some("601"));
        let ok: Envelope = serde_json::from_str(r#"{"requestId":"x","result":[],"success":true}"#).unwrap();
        assert_eq!(ok.first_code(), None);
    }
}

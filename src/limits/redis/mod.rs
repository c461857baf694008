//! Redis as the limits engine uses it: every shared count changes only
//! through a Lua script (one `.lua` file each under `scripts/`), and every
//! Redis error says whether Redis could not be reached or a script is
//! wrong.
//!
//! A script takes its arguments as one JSON object in `ARGV[1]`, built
//! from a typed Rust struct (see [`scripts`]), so neither side counts
//! positions; its keys are named in the file's first lines. Its reply is
//! decoded once, into the type the struct names.
//!
//! The difference between the two errors matters: an unreachable Redis
//! sends a replica to its fallback share of the limits until Redis is
//! back, while a failing script is a bug that a fallback would only hide:
//! it is logged and counted (`marketo_proxy_backend_script_errors_total`)
//! and the call it served waits and asks again.

pub mod client;
pub mod scripts;

use std::time::Duration;

use redis::ErrorKind;

/// Why a shared count could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// Known before anything is contacted; the text never holds the URL.
    #[error("state.redis.url is not usable: {0}")]
    Url(String),
    /// No answer within the timeout.
    #[error("Redis did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The connection failed or Redis cannot serve now (loading, a
    /// failover, read-only, out of memory).
    #[error("Redis is unreachable")]
    Unreachable(#[source] redis::RedisError),
    /// A script failed or answered what its reply type cannot hold: a bug.
    #[error("the Redis script {script} failed")]
    Script {
        script: &'static str,
        #[source]
        source: redis::RedisError,
    },
}

impl SharedError {
    /// Whether Redis could not be used at all, as opposed to a bug in what
    /// was asked of it: only the former sends a replica to its fallback.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Timeout(_) | Self::Unreachable(_))
    }

    /// Sorts an error of `script` into a bug or an unreachable Redis.
    pub fn of_script(script: &'static str, error: redis::RedisError) -> Self {
        if is_bug(&error) {
            Self::Script {
                script,
                source: error,
            }
        } else {
            Self::Unreachable(error)
        }
    }
}

/// Whether `error` comes from what was asked (a script that failed, a
/// reply of another shape, keys of several slots) rather than from Redis
/// being out of reach.
fn is_bug(error: &redis::RedisError) -> bool {
    match error.kind() {
        ErrorKind::TypeError | ErrorKind::CrossSlot | ErrorKind::ExecAbortError => true,
        // A Lua error is an `ERR` naming the script; other `ERR`s (too many
        // clients, a protected mode) are about Redis itself.
        ErrorKind::ResponseError => error
            .detail()
            .is_some_and(|detail| detail.contains("script") || detail.contains("Lua")),
        _ => error.code() == Some("WRONGTYPE"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_script_is_a_bug_and_a_broken_connection_is_not() {
        let lua: redis::RedisError = (
            ErrorKind::ResponseError,
            "An error was signalled by the server",
            "user_script:12: Script attempted to access nonexistent global variable 'x' script: 1f2e"
                .to_owned(),
        )
            .into();
        assert!(!SharedError::of_script("acquire", lua).is_unreachable());
        let reply: redis::RedisError = (ErrorKind::TypeError, "Response was of incompatible type").into();
        assert!(!SharedError::of_script("acquire", reply).is_unreachable());
        let reset: redis::RedisError = std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        assert!(SharedError::of_script("acquire", reset).is_unreachable());
        let loading: redis::RedisError = (ErrorKind::BusyLoadingError, "loading").into();
        assert!(SharedError::of_script("acquire", loading).is_unreachable());
        assert!(SharedError::Timeout(Duration::from_millis(500)).is_unreachable());
    }
}

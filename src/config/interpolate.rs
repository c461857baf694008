//! `${VAR}` placeholders in the config text, filled from the environment
//! before the YAML is parsed.
//!
//! `${VAR}` takes the variable and fails if it is unset; `${VAR:-default}`
//! takes the default when the variable is unset or empty; `$$` is a
//! literal `$`. Comments are left alone, so a commented-out line may name
//! a variable nobody sets.
//!
//! Substitution is textual, so that parse errors still point at the line
//! the operator wrote, but it knows enough YAML to keep a value a single
//! value: inside quotes the value is escaped, and a plain value with
//! characters YAML reads specially (`: `, ` #`, a leading `*` ...) is
//! quoted. Quote tracking is per line; quoted scalars that span lines are
//! not followed.
//!
//! Every value put in is remembered, so that error messages can be
//! scrubbed of them: any of them may be a secret.

use std::fmt::Write as _;

use super::ConfigError;

/// Values shorter than this are left in error messages. They cannot be
/// secrets worth the name, and replacing them would garble the message: a
/// weight of `1` would hit every `services[1]`.
const MIN_REDACTED_LEN: usize = 3;

const REDACTED: &str = "[redacted]";

/// The config text with placeholders filled, and what they were filled with.
pub(super) struct Expanded {
    pub(super) text: String,
    /// Longest first, so that a value containing another is replaced whole.
    values: Vec<String>,
}

impl Expanded {
    /// `message` with every substituted value replaced by `[redacted]`.
    pub(super) fn redact(&self, message: &str) -> String {
        self.values.iter().fold(message.to_owned(), |message, value| {
            message.replace(value.as_str(), REDACTED)
        })
    }

    /// The parser's message, redacted, keeping its "at line L column C"
    /// intact whatever the values were.
    pub(super) fn redact_yaml_error(&self, err: &serde_yaml_ng::Error) -> String {
        let message = err.to_string();
        if let Some(location) = err.location() {
            let suffix = format!(" at line {} column {}", location.line(), location.column());
            if let Some(body) = message.strip_suffix(&suffix) {
                return format!("{}{suffix}", self.redact(body));
            }
        }
        self.redact(&message)
    }

    /// `err` with its reason redacted; validation builds reasons from
    /// numbers and key names, but a number may have come from a variable.
    pub(super) fn redact_error(&self, err: ConfigError) -> ConfigError {
        match err {
            ConfigError::Invalid { key, reason } => ConfigError::Invalid {
                key,
                reason: self.redact(&reason),
            },
            other => other,
        }
    }
}

/// Fills every placeholder in `text` from `env`.
pub(super) fn expand(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Expanded, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut values = Vec::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        expand_line(line, index + 1, &env, &mut out, &mut values)?;
    }
    values.retain(|value| value.len() >= MIN_REDACTED_LEN);
    values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    values.dedup();
    Ok(Expanded { text: out, values })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Quote {
    Plain,
    Single,
    Double,
}

fn expand_line(
    line: &str,
    line_no: usize,
    env: &impl Fn(&str) -> Option<String>,
    out: &mut String,
    values: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let mut quote = Quote::Plain;
    let mut pos = 0;
    while let Some(c) = line[pos..].chars().next() {
        let rest = &line[pos + c.len_utf8()..];
        let mut step = c.len_utf8();
        match (quote, c) {
            (_, '$') if rest.starts_with('$') => {
                out.push('$');
                pos += 2;
                continue;
            }
            (_, '$') if rest.starts_with('{') => {
                let placeholder = Placeholder::parse(&line[pos..], line_no)?;
                let value = placeholder.resolve(env, line_no)?;
                let end = pos + placeholder.len;
                let slot = Slot::of(&line[..pos], &line[end..], quote);
                out.push_str(&slot.render(&value, placeholder.name, line_no)?);
                values.push(value);
                pos = end;
                continue;
            }
            (Quote::Plain, '#') if starts_comment(&line[..pos]) => {
                // Copied as written, placeholders and all.
                out.push_str(&line[pos..]);
                return Ok(());
            }
            (Quote::Plain, '"') if opens_scalar(&line[..pos]) => quote = Quote::Double,
            (Quote::Plain, '\'') if opens_scalar(&line[..pos]) => quote = Quote::Single,
            (Quote::Double, '\\') => step += rest.chars().next().map_or(0, char::len_utf8),
            (Quote::Double, '"') => quote = Quote::Plain,
            (Quote::Single, '\'') if rest.starts_with('\'') => step += 1,
            (Quote::Single, '\'') => quote = Quote::Plain,
            _ => {}
        }
        out.push_str(&line[pos..pos + step]);
        pos += step;
    }
    Ok(())
}

/// Whether a `#` after `before` starts a comment, rather than being part
/// of a value (`a#b`).
fn starts_comment(before: &str) -> bool {
    before.chars().next_back().is_none_or(char::is_whitespace)
}

/// Whether a quote after `before` starts a quoted scalar, rather than
/// being a character inside a plain one (`don't`).
fn opens_scalar(before: &str) -> bool {
    let trimmed = before.trim_end();
    trimmed.is_empty()
        || trimmed.ends_with(['[', '{', ','])
        || (trimmed.ends_with([':', '-', '?']) && trimmed.len() < before.len())
}

/// One `${NAME}` or `${NAME:-default}`.
struct Placeholder<'a> {
    name: &'a str,
    default: Option<&'a str>,
    /// Length in the text, `${` to `}` inclusive.
    len: usize,
}

impl<'a> Placeholder<'a> {
    /// Parses the placeholder at the start of `text`, which begins with `${`.
    fn parse(text: &'a str, line: usize) -> Result<Self, ConfigError> {
        let Some(close) = text.find('}') else {
            return Err(interpolation_error(
                line,
                "`${` has no closing `}` (write `$$` for a literal `$`)",
            ));
        };
        let inner = &text[2..close];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        if !is_var_name(name) {
            return Err(interpolation_error(
                line,
                "a placeholder needs a variable name of letters, digits and `_`, as in ${NAME} or ${NAME:-default}",
            ));
        }
        Ok(Self {
            name,
            default,
            len: close + 1,
        })
    }

    fn resolve(&self, env: &impl Fn(&str) -> Option<String>, line: usize) -> Result<String, ConfigError> {
        match (env(self.name), self.default) {
            (Some(value), Some(default)) if value.is_empty() => Ok(default.to_owned()),
            (Some(value), _) => Ok(value),
            (None, Some(default)) => Ok(default.to_owned()),
            (None, None) => Err(ConfigError::MissingVar {
                name: self.name.to_owned(),
                line,
            }),
        }
    }
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Where in the YAML a placeholder sits, which decides how its value is written.
enum Slot {
    DoubleQuoted,
    SingleQuoted,
    /// Unquoted. `whole`: the placeholder is the entire value of a key or a
    /// list item, so it may be quoted. `starts`: it begins the value.
    Plain {
        whole: bool,
        starts: bool,
    },
}

impl Slot {
    fn of(before: &str, after: &str, quote: Quote) -> Self {
        match quote {
            Quote::Double => Self::DoubleQuoted,
            Quote::Single => Self::SingleQuoted,
            Quote::Plain => {
                let starts = before.is_empty() || before.ends_with(char::is_whitespace);
                let after_key_or_dash = before.trim_end().ends_with([':', '-']);
                let after = after.trim_end();
                let nothing_after = after.is_empty()
                    || (after.starts_with(char::is_whitespace) && after.trim_start().starts_with('#'));
                Self::Plain {
                    whole: starts && after_key_or_dash && nothing_after,
                    starts,
                }
            }
        }
    }

    fn render(&self, value: &str, name: &str, line: usize) -> Result<String, ConfigError> {
        match *self {
            Self::DoubleQuoted => Ok(escape_double_quoted(value)),
            Self::SingleQuoted if value.chars().any(char::is_control) => Err(interpolation_error(
                line,
                &format!("the value of {name} holds control characters; put ${{{name}}} in double quotes"),
            )),
            Self::SingleQuoted => Ok(value.replace('\'', "''")),
            // Empty would read as null; an empty string gets a clear
            // "must not be empty" from validation instead.
            Self::Plain { whole: true, .. } if value.is_empty() => Ok("\"\"".to_owned()),
            Self::Plain { starts, .. } if is_plain_safe(value, starts) => Ok(value.to_owned()),
            Self::Plain { whole: true, .. } => Ok(format!("\"{}\"", escape_double_quoted(value))),
            Self::Plain { whole: false, .. } => Err(interpolation_error(
                line,
                &format!(
                    "the value of {name} holds characters YAML reads specially; put the whole value in double quotes"
                ),
            )),
        }
    }
}

/// Whether `value` reads back as the same string when written unquoted.
fn is_plain_safe(value: &str, starts_scalar: bool) -> bool {
    let bad_start = starts_scalar
        && (value.starts_with([
            '!', '&', '*', '{', '}', '[', ']', ',', '#', '|', '>', '\'', '"', '%', '@', '`',
        ]) || (value.starts_with(['-', '?', ':'])
            && value[1..].chars().next().is_none_or(char::is_whitespace)));
    !bad_start
        && value.trim() == value
        && !value.contains(": ")
        && !value.contains(" #")
        && !value.ends_with(':')
        && !value.chars().any(char::is_control)
}

fn escape_double_quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

fn interpolation_error(line: usize, reason: &str) -> ConfigError {
    ConfigError::Interpolation {
        line,
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("abc123".to_owned()),
            "EMPTY" => Some(String::new()),
            "HASHY" => Some("pa ss #word: *x".to_owned()),
            "QUOTY" => Some("it's \"q\"\\".to_owned()),
            "LINES" => Some("a\nb".to_owned()),
            _ => None,
        }
    }

    fn expand_text(text: &str) -> Result<String, ConfigError> {
        expand(text, env).map(|expanded| expanded.text)
    }

    /// Expands, parses as YAML and returns the string at `key`.
    fn value_of(text: &str, key: &str) -> String {
        let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&expand_text(text).unwrap()).unwrap();
        yaml[key].as_str().unwrap().to_owned()
    }

    #[test]
    fn set_variable_is_substituted() {
        assert_eq!(
            expand_text("a: ${KEY}\nb: x-${KEY}-y\n").unwrap(),
            "a: abc123\nb: x-abc123-y\n"
        );
    }

    #[test]
    fn default_is_used_when_unset_or_empty() {
        assert_eq!(expand_text("a: ${NOPE:-d1}").unwrap(), "a: d1");
        assert_eq!(expand_text("a: ${EMPTY:-d2}").unwrap(), "a: d2");
        assert_eq!(expand_text("a: ${KEY:-d3}").unwrap(), "a: abc123");
        assert_eq!(expand_text("a: ${NOPE:-}").unwrap(), "a: \"\"");
    }

    #[test]
    fn default_may_hold_colons_and_slashes() {
        assert_eq!(value_of("a: ${NOPE:-redis://h:6379/0}", "a"), "redis://h:6379/0");
    }

    #[test]
    fn set_but_empty_without_default_stays_empty() {
        assert_eq!(value_of("a: ${EMPTY}", "a"), "");
    }

    #[test]
    fn missing_variable_names_itself_and_its_line() {
        let err = expand_text("a: 1\n\nb: ${NOT_SET}\n").err().unwrap();
        assert!(
            matches!(&err, ConfigError::MissingVar { name, line: 3 } if name == "NOT_SET"),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("NOT_SET") && message.contains("line 3"),
            "{message}"
        );
    }

    #[test]
    fn double_dollar_is_a_literal_dollar() {
        assert_eq!(expand_text("a: p$$w$rd").unwrap(), "a: p$w$rd");
        assert_eq!(expand_text("a: $${KEY}").unwrap(), "a: ${KEY}");
    }

    #[test]
    fn comments_are_not_interpolated() {
        let text = "# uses ${NOT_SET}\na: ${KEY} # or ${ALSO_NOT_SET}\nb: x#${KEY}\n";
        assert_eq!(
            expand_text(text).unwrap(),
            "# uses ${NOT_SET}\na: abc123 # or ${ALSO_NOT_SET}\nb: x#abc123\n"
        );
    }

    #[test]
    fn malformed_placeholders_are_refused_with_their_line() {
        for text in [
            "a: 1\nb: ${KEY",
            "a: 1\nb: ${}",
            "a: 1\nb: ${1X}",
            "a: 1\nb: ${A B}",
        ] {
            let err = expand_text(text).err().unwrap();
            assert!(
                matches!(err, ConfigError::Interpolation { line: 2, .. }),
                "{text}: {err:?}"
            );
        }
    }

    #[test]
    fn special_plain_value_is_quoted_and_reads_back_whole() {
        assert_eq!(value_of("a: ${HASHY}", "a"), "pa ss #word: *x");
        assert_eq!(value_of("a: ${HASHY} # comment", "a"), "pa ss #word: *x");
        assert_eq!(value_of("a: ${QUOTY}", "a"), "it's \"q\"\\");
        assert_eq!(value_of("a: ${LINES}", "a"), "a\nb");
    }

    #[test]
    fn values_inside_quotes_are_escaped() {
        assert_eq!(value_of("a: \"<${QUOTY}>\"", "a"), "<it's \"q\"\\>");
        assert_eq!(value_of("a: '<${QUOTY}>'", "a"), "<it's \"q\"\\>");
        assert_eq!(value_of("a: \"${LINES}\"", "a"), "a\nb");
        assert_eq!(value_of("a: 'don''t ${KEY}'", "a"), "don't abc123");
    }

    #[test]
    fn apostrophe_inside_a_plain_value_is_not_a_quote() {
        assert_eq!(value_of("a: don't ${KEY}", "a"), "don't abc123");
    }

    #[test]
    fn special_value_inside_a_longer_plain_value_is_refused() {
        let err = expand_text("a: x-${HASHY}").err().unwrap();
        let message = err.to_string();
        assert!(
            message.contains("HASHY") && message.contains("line 1"),
            "{message}"
        );
        assert!(!message.contains("word"), "{message}");
    }

    #[test]
    fn numbers_stay_numbers() {
        let text = expand_text("a: ${NOPE:-100}").unwrap();
        let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(yaml["a"].as_u64(), Some(100));
    }

    #[test]
    fn redaction_replaces_every_value_but_keeps_short_ones() {
        let expanded = expand("a: ${KEY}\nb: ${NOPE:-7}\nc: ${NOPE:-abc1234}\n", env).unwrap();
        assert_eq!(
            expanded.redact("services[7]: abc1234 or abc123"),
            "services[7]: [redacted] or [redacted]"
        );
    }
}

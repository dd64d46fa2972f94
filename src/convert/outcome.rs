//! What an accumulator hands back to the conversion flow, and how an error the upstream
//! reported inside its stream maps to an HTTP status.
//!
//! Both accumulators (`chat`, `responses`) speak these types so that the conversion flow
//! can treat them alike: feed events, stop at [`Flow::Finished`], then call `finish`.

use serde::Deserialize;
use serde_json::Value;

/// Whether the accumulator wants more events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep feeding events.
    Continue,
    /// The terminal event was seen; the caller stops reading and calls `finish`.
    Finished,
}

/// Which event ended the stream, for the request log and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminal {
    /// Chat Completions `data: [DONE]`.
    Done,
    /// Chat Completions stream that ended cleanly without `[DONE]` after every choice had a
    /// `finish_reason` (D10).
    EndOfStream,
    /// Responses `response.completed`.
    Completed,
    /// Responses `response.incomplete` (answered with 200, B60).
    Incomplete,
}

impl Terminal {
    /// The name used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Terminal::Done => "done",
            Terminal::EndOfStream => "end_of_stream",
            Terminal::Completed => "completed",
            Terminal::Incomplete => "incomplete",
        }
    }
}

/// Token counts of a converted response, for the request log and metrics.
///
/// Chat Completions names them `prompt_tokens`/`completion_tokens`, Responses
/// `input_tokens`/`output_tokens`; both land here as input/output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// `prompt_tokens` / `input_tokens`.
    pub input: Option<u64>,
    /// `completion_tokens` / `output_tokens`.
    pub output: Option<u64>,
    /// `total_tokens`.
    pub total: Option<u64>,
    /// `prompt_tokens_details.cached_tokens` / `input_tokens_details.cached_tokens`.
    pub cached: Option<u64>,
    /// `completion_tokens_details.reasoning_tokens` / `output_tokens_details.reasoning_tokens`.
    pub reasoning: Option<u64>,
}

/// A successfully aggregated, non-streaming response body.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// The JSON body, ready to send with `content-type: application/json`.
    pub body: Vec<u8>,
    /// The event that ended the stream.
    pub terminal: Terminal,
    /// The token counts the upstream reported; `None` when it reported none.
    pub usage: Option<TokenUsage>,
}

/// An error the upstream reported inside its stream (`data: {"error": …}` on Chat
/// Completions, `error` events and `response.failed` on Responses), kept whole so the client
/// gets the upstream's own message, type, code and param (D11, D12).
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamStreamError {
    /// HTTP status the client gets (see [`status_for_error_code`]).
    pub status: u16,
    /// The upstream's `message`, or a generic one when it sent none.
    pub message: String,
    /// The upstream's `type`; when it sent none, the type that goes with `status`.
    pub error_type: String,
    /// `code` as the upstream sent it (string, number or null).
    pub code: Value,
    /// `param` as the upstream sent it; `null` when absent.
    pub param: Value,
}

/// Why a stream could not be aggregated.
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    /// An event's `data` was not valid JSON (D8, D27): a corrupt stream is never answered
    /// with a partial body.
    #[error("upstream sent an event whose data is not valid JSON: {0}")]
    InvalidJson(#[source] serde_json::Error),
    /// Valid JSON of the wrong shape (a chunk that is not an object, a terminal event
    /// without its `response` object, …).
    #[error("upstream sent a malformed event: {0}")]
    Malformed(String),
    /// The stream ended before its terminal event.
    #[error("upstream stream ended before {0}")]
    Truncated(&'static str),
    /// The upstream reported an error inside the stream.
    #[error("upstream reported an error in the stream: {}", .0.message)]
    Upstream(Box<UpstreamStreamError>),
}

/// Parses one event's `data` into `T`, validating its UTF-8 once: a `RawValue` borrowed from
/// bytes is validated again by serde_json, one pass per captured member, and one borrowed
/// from a `str` is not. Invalid UTF-8 anywhere is an error (D27), in a member that is
/// skipped too: serde_json checks only the strings it decodes.
pub fn parse_event_data<'a, T: Deserialize<'a>>(data: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(data) {
        Ok(text) => serde_json::from_str(text),
        // An I/O-kind error, not a "data" one (which callers take for valid JSON of the
        // wrong shape).
        Err(e) => Err(serde_json::Error::io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "invalid UTF-8 at byte {} of the event's data",
                e.valid_up_to()
            ),
        ))),
    }
}

/// Status and default `type` for an OpenAI error `code` (reference table B61), or `None` when
/// the code is not one we know.
pub fn known_error_code(code: &str) -> Option<(u16, &'static str)> {
    Some(match code {
        "insufficient_quota" | "rate_limit_exceeded" | "usage_not_included" => {
            (429, "rate_limit_error")
        }
        "server_is_overloaded" | "slow_down" => (503, "server_error"),
        "server_error" => (500, "server_error"),
        "vector_store_timeout" => (504, "server_error"),
        "invalid_prompt"
        | "invalid_image"
        | "invalid_image_format"
        | "invalid_base64_image"
        | "invalid_image_url"
        | "image_too_large"
        | "image_too_small"
        | "image_parse_error"
        | "image_content_policy_violation"
        | "invalid_image_mode"
        | "image_file_too_large"
        | "unsupported_image_media_type"
        | "empty_image_file"
        | "failed_to_download_image"
        | "image_file_not_found" => (400, "invalid_request_error"),
        _ => return None,
    })
}

/// Status and `type` for an error the upstream reported in its stream.
///
/// `code` is the upstream's `code` member as sent (a string, a number or null) and
/// `error_type` its `type` (either may be missing). In order:
/// 1. A known code decides (B61).
/// 2. A code that is an HTTP status (400–599, as a number or a string of digits) is that
///    status: OpenAI-compatible providers (OpenRouter, some gateways) put the status of the
///    failed upstream call there, and it says more than any guess would (`429` stays a rate
///    limit the client's retry logic recognises).
/// 3. A type or unknown code naming a rate limit (`rate_limit_error`, `rate_limit_exceeded`)
///    is 429, so SDK back-off applies even when the provider sent no code.
/// 4. An error that names itself server-side (`server_error` type, or a code or type
///    mentioning server, overload, timeout or internal) is 500, anything else
///    `failed_default` (D11).
///
/// `failed_default` is the status for an unknown code when nothing says otherwise: 500 for
/// `response.failed` (D12, a failed generation is the server's doing), 400 for `error`
/// events and chat `{"error": …}` frames.
pub fn status_for_error_code(
    code: &Value,
    error_type: Option<&str>,
    failed_default: u16,
) -> (u16, &'static str) {
    let code_text = match code {
        Value::String(s) => Some(s.as_str()),
        _ => None,
    };
    if let Some(known) = code_text.and_then(known_error_code) {
        return known;
    }
    if let Some(status) = http_status_code(code) {
        return (status, type_for_status(status));
    }
    let names_rate_limit = [code_text, error_type]
        .into_iter()
        .flatten()
        .any(|s| matches!(s, "rate_limit_error" | "rate_limit_exceeded"));
    if names_rate_limit {
        return (429, "rate_limit_error");
    }
    let server_side = [code_text, error_type].into_iter().flatten().any(|s| {
        let s = s.to_ascii_lowercase();
        s.contains("server")
            || s.contains("overload")
            || s.contains("timeout")
            || s.contains("internal")
    });
    if server_side || failed_default >= 500 {
        (
            if server_side { 500 } else { failed_default },
            "server_error",
        )
    } else {
        (failed_default, "invalid_request_error")
    }
}

/// A `code` that is an HTTP error status: a JSON integer, or a string of ASCII digits, in
/// 400–599.
fn http_status_code(code: &Value) -> Option<u16> {
    let number = match code {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok()?
        }
        _ => return None,
    };
    let status = u16::try_from(number).ok()?;
    (400..=599).contains(&status).then_some(status)
}

/// The OpenAI error `type` that goes with a status the upstream named by number.
fn type_for_status(status: u16) -> &'static str {
    match status {
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn known_codes_follow_the_reference_table() {
        assert_eq!(
            status_for_error_code(&json!("rate_limit_exceeded"), None, 400),
            (429, "rate_limit_error")
        );
        assert_eq!(
            status_for_error_code(&json!("server_is_overloaded"), None, 400),
            (503, "server_error")
        );
        assert_eq!(
            status_for_error_code(&json!("vector_store_timeout"), None, 400),
            (504, "server_error")
        );
        assert_eq!(
            status_for_error_code(&json!("invalid_prompt"), None, 500),
            (400, "invalid_request_error")
        );
    }

    #[test]
    fn unknown_codes_use_the_server_side_hint_then_the_default() {
        assert_eq!(
            status_for_error_code(&json!("mystery"), Some("server_error"), 400),
            (500, "server_error")
        );
        assert_eq!(
            status_for_error_code(&json!("internal_failure"), None, 400),
            (500, "server_error")
        );
        assert_eq!(
            status_for_error_code(&json!("mystery"), None, 400),
            (400, "invalid_request_error")
        );
        assert_eq!(
            status_for_error_code(&Value::Null, None, 500),
            (500, "server_error")
        );
    }

    #[test]
    fn http_status_codes_map_to_themselves() {
        for code in [json!(429), json!("429")] {
            assert_eq!(
                status_for_error_code(&code, None, 400),
                (429, "rate_limit_error"),
                "{code}"
            );
        }
        assert_eq!(
            status_for_error_code(&json!(502), None, 400),
            (502, "server_error")
        );
        assert_eq!(
            status_for_error_code(&json!("503"), Some("whatever"), 400),
            (503, "server_error")
        );
        assert_eq!(
            status_for_error_code(&json!(404), None, 500),
            (404, "invalid_request_error")
        );
        // Not HTTP-like: the usual rules apply.
        for code in [
            json!(200),
            json!(600),
            json!(-429),
            json!(429.5),
            json!("42x"),
        ] {
            assert_eq!(
                status_for_error_code(&code, None, 400),
                (400, "invalid_request_error"),
                "{code}"
            );
        }
    }

    #[test]
    fn rate_limit_types_without_a_code_are_429() {
        for ty in ["rate_limit_error", "rate_limit_exceeded"] {
            assert_eq!(
                status_for_error_code(&Value::Null, Some(ty), 400),
                (429, "rate_limit_error"),
                "{ty}"
            );
            assert_eq!(
                status_for_error_code(&Value::Null, Some(ty), 500),
                (429, "rate_limit_error"),
                "{ty} in response.failed"
            );
        }
    }
}

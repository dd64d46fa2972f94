//! The configuration file: raw JSON in, a fully validated [`Config`] out.
//!
//! Everything is checked before any port is bound (D22): a proxy that starts and then
//! fails on every request is worse than one that refuses to start with a precise message.
//! Errors name the file, the key path (`rules[1].listenPort`) and the problem; JSON syntax
//! errors carry the parser's line and column. Unknown keys are accepted so that a newer
//! config still loads on an older binary; they are reported as warnings.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::upstream::UpstreamUrl;

/// Default wait for upstream response headers and longest upstream silence (B2).
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 600;
/// Default cap on a request body the proxy has to read whole (D5).
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Default cap on the bytes of one aggregated upstream stream.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 256 * 1024 * 1024;

/// Default cap on one WebSocket message (D20).
pub const DEFAULT_MAX_WEBSOCKET_MESSAGE_BYTES: u64 = 64 * 1024 * 1024;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it was loaded from, for messages.
    pub source: PathBuf,
    pub rules: Vec<Rule>,
    /// Keys the file had that this version does not know, as key paths.
    pub unknown_keys: Vec<String>,
}

/// One listening port and where its traffic goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub listen: SocketAddr,
    pub upstream: UpstreamUrl,
    pub options: RuleOptions,
}

/// Per-rule behaviour; every rule carries its own resolved copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleOptions {
    /// D13: longest wait for response headers, and longest silence between upstream bytes.
    pub timeout: Duration,
    /// Whether non-streaming Chat Completions / Responses calls are converted.
    pub convert: bool,
    /// Once an aggregation has run this long, commit 200 and send a space every interval.
    pub keep_alive: Option<Duration>,
    pub max_request_body_bytes: u64,
    pub max_response_bytes: u64,
    /// Largest WebSocket message either side may send (D20); larger ones close with 1009.
    pub max_websocket_message_bytes: u64,
}

impl Default for RuleOptions {
    fn default() -> Self {
        RuleOptions {
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECONDS),
            convert: true,
            keep_alive: None,
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY_BYTES,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_websocket_message_bytes: DEFAULT_MAX_WEBSOCKET_MESSAGE_BYTES,
        }
    }
}

/// A config problem: which file, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct ConfigError {
    pub path: PathBuf,
    pub problem: String,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            problem: format!("cannot read config file: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if it had been read from `path`.
    pub fn parse(path: &Path, text: &[u8]) -> Result<Config, ConfigError> {
        let fail = |problem: String| ConfigError {
            path: path.to_path_buf(),
            problem,
        };
        let root: Value = serde_json::from_slice(text).map_err(|e| {
            fail(format!(
                "invalid JSON at line {} column {}: {}",
                e.line(),
                e.column(),
                strip_position(&e.to_string())
            ))
        })?;
        let root = root
            .as_object()
            .ok_or_else(|| fail("the top level must be a JSON object".into()))?;

        let mut unknown_keys = Vec::new();
        let mut defaults = RuleOptions::default();
        for (key, value) in root {
            match key.as_str() {
                "rules" => {}
                _ if apply_option(&mut defaults, key, value, key).map_err(&fail)? => {}
                _ => unknown_keys.push(key.clone()),
            }
        }

        let rules =
            match root.get("rules") {
                None => return Err(fail(
                    "`rules` is missing: add at least one {\"listenPort\", \"upstreamUrl\"} rule"
                        .into(),
                )),
                Some(Value::Array(rules)) if rules.is_empty() => {
                    return Err(fail(
                        "`rules` is empty: add at least one {\"listenPort\", \"upstreamUrl\"} rule"
                            .into(),
                    ))
                }
                Some(Value::Array(rules)) => rules,
                Some(other) => {
                    return Err(fail(format!(
                        "`rules` must be an array, found {}",
                        kind(other)
                    )))
                }
            };

        let mut parsed = Vec::with_capacity(rules.len());
        let mut seen: Vec<SocketAddr> = Vec::with_capacity(rules.len());
        for (i, rule) in rules.iter().enumerate() {
            let at = format!("rules[{i}]");
            let rule = rule
                .as_object()
                .ok_or_else(|| fail(format!("{at} must be an object, found {}", kind(rule))))?;
            let parsed_rule = parse_rule(rule, &at, &defaults, &mut unknown_keys).map_err(&fail)?;
            // The unspecified address covers every interface, so it clashes with any other
            // address on the same port; the OS would refuse the second bind anyway.
            let listen = parsed_rule.listen;
            if let Some(earlier) = seen.iter().position(|other| {
                other.port() == listen.port()
                    && (other.ip() == listen.ip()
                        || other.ip().is_unspecified()
                        || listen.ip().is_unspecified())
            }) {
                return Err(fail(format!(
                    "{at}.listenPort: {} is already used by rules[{earlier}]",
                    listen.port()
                )));
            }
            seen.push(listen);
            parsed.push(parsed_rule);
        }

        Ok(Config {
            source: path.to_path_buf(),
            rules: parsed,
            unknown_keys,
        })
    }
}

fn parse_rule(
    rule: &Map<String, Value>,
    at: &str,
    defaults: &RuleOptions,
    unknown_keys: &mut Vec<String>,
) -> Result<Rule, String> {
    let mut options = defaults.clone();
    for (key, value) in rule {
        let key_path = format!("{at}.{key}");
        match key.as_str() {
            "listenPort" | "listenAddress" | "upstreamUrl" => {}
            _ if apply_option(&mut options, key, value, &key_path)? => {}
            _ => unknown_keys.push(key_path),
        }
    }

    let port = match rule.get("listenPort") {
        None => return Err(format!("{at}.listenPort is missing")),
        Some(v) => match v.as_u64() {
            Some(p) if (1..=65535).contains(&p) => p as u16,
            _ if v.is_number() => return Err(format!("{at}.listenPort: {v} is outside 1-65535")),
            _ => {
                return Err(format!(
                    "{at}.listenPort must be a number, found {}",
                    kind(v)
                ))
            }
        },
    };
    let address = match rule.get("listenAddress") {
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some(Value::String(s)) => s
            .parse::<IpAddr>()
            .map_err(|_| format!("{at}.listenAddress: {s:?} is not an IP address"))?,
        Some(other) => {
            return Err(format!(
                "{at}.listenAddress must be a string, found {}",
                kind(other)
            ))
        }
    };
    let upstream = match rule.get("upstreamUrl") {
        None => return Err(format!("{at}.upstreamUrl is missing")),
        Some(Value::String(s)) => {
            UpstreamUrl::parse(s).map_err(|e| format!("{at}.upstreamUrl: {e}"))?
        }
        Some(other) => {
            return Err(format!(
                "{at}.upstreamUrl must be a string, found {}",
                kind(other)
            ))
        }
    };
    Ok(Rule {
        listen: SocketAddr::new(address, port),
        upstream,
        options,
    })
}

/// Applies a key that may appear both at the top level (the default for every rule) and
/// in a rule (an override). Returns `Ok(false)` when `key` is not such an option.
fn apply_option(
    options: &mut RuleOptions,
    key: &str,
    value: &Value,
    key_path: &str,
) -> Result<bool, String> {
    match key {
        "timeoutSeconds" => options.timeout = positive_seconds(value, key_path)?,
        "keepAliveSeconds" => {
            options.keep_alive = match value {
                Value::Null => None,
                v => Some(positive_seconds(v, key_path)?),
            }
        }
        "convert" => {
            options.convert = value
                .as_bool()
                .ok_or_else(|| format!("{key_path} must be true or false, found {}", kind(value)))?
        }
        "maxRequestBodyBytes" => {
            options.max_request_body_bytes = positive_integer(value, key_path)?
        }
        "maxResponseBytes" => options.max_response_bytes = positive_integer(value, key_path)?,
        "maxWebSocketMessageBytes" => {
            options.max_websocket_message_bytes = positive_integer(value, key_path)?
        }
        _ => return Ok(false),
    }
    Ok(true)
}

fn positive_integer(value: &Value, key_path: &str) -> Result<u64, String> {
    match value.as_u64() {
        Some(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "{key_path} must be a positive integer, found {value}"
        )),
    }
}

/// Seconds beyond a century are certainly a typo, and would overflow deadline arithmetic.
fn positive_seconds(value: &Value, key_path: &str) -> Result<Duration, String> {
    const CENTURY: u64 = 100 * 365 * 24 * 3600;
    match positive_integer(value, key_path)? {
        n if n <= CENTURY => Ok(Duration::from_secs(n)),
        n => Err(format!("{key_path}: {n} seconds is more than a century")),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// serde_json appends " at line X column Y"; the message already says where.
fn strip_position(message: &str) -> &str {
    message.find(" at line ").map_or(message, |i| &message[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("config.json"), text.as_bytes())
    }

    fn problem(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_overrides() {
        let config = parse(
            r#"{"rules":[{"listenPort":8080,"upstreamUrl":"https://api.openai.com"},
                {"listenPort":8081,"upstreamUrl":"http://127.0.0.1:9000/openai/","listenAddress":"127.0.0.1",
                 "timeoutSeconds":5,"convert":false,"keepAliveSeconds":20}],"future":1}"#,
        )
        .unwrap();
        assert_eq!(config.rules.len(), 2);
        assert_eq!(config.rules[0].options, RuleOptions::default());
        assert_eq!(config.rules[0].listen, "0.0.0.0:8080".parse().unwrap());
        let second = &config.rules[1];
        assert_eq!(second.listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(second.options.timeout, Duration::from_secs(5));
        assert!(!second.options.convert);
        assert_eq!(second.options.keep_alive, Some(Duration::from_secs(20)));
        assert_eq!(second.upstream.to_string(), "http://127.0.0.1:9000/openai");
        assert_eq!(config.unknown_keys, vec!["future".to_string()]);
    }

    #[test]
    fn top_level_options_are_rule_defaults() {
        let config =
            parse(r#"{"timeoutSeconds":7,"rules":[{"listenPort":1,"upstreamUrl":"http://a"}]}"#)
                .unwrap();
        assert_eq!(config.rules[0].options.timeout, Duration::from_secs(7));
    }

    #[test]
    fn each_problem_is_named() {
        assert!(problem("{").contains("invalid JSON at line 1 column 1"));
        assert!(problem("[]").contains("top level must be a JSON object"));
        assert!(problem("{}").contains("`rules` is missing"));
        assert!(problem(r#"{"rules":[]}"#).contains("`rules` is empty"));
        assert!(problem(r#"{"rules":[{"upstreamUrl":"http://a"}]}"#)
            .contains("rules[0].listenPort is missing"));
        assert!(
            problem(r#"{"rules":[{"listenPort":0,"upstreamUrl":"http://a"}]}"#)
                .contains("outside 1-65535")
        );
        assert!(
            problem(r#"{"rules":[{"listenPort":70000,"upstreamUrl":"http://a"}]}"#)
                .contains("outside 1-65535")
        );
        assert!(
            problem(r#"{"rules":[{"listenPort":"80","upstreamUrl":"http://a"}]}"#)
                .contains("must be a number")
        );
        assert!(
            problem(r#"{"rules":[{"listenPort":1,"upstreamUrl":"ftp://a"}]}"#)
                .contains("rules[0].upstreamUrl")
        );
        assert!(
            problem(r#"{"rules":[{"listenPort":1,"upstreamUrl":"/v1"}]}"#)
                .contains("absolute http or https URL")
        );
        assert!(problem(r#"{"rules":[{"listenPort":1}]}"#).contains("upstreamUrl is missing"));
        assert!(problem(
            r#"{"timeoutSeconds":0,"rules":[{"listenPort":1,"upstreamUrl":"http://a"}]}"#
        )
        .contains("timeoutSeconds must be a positive integer"));
        assert!(problem(
            r#"{"timeoutSeconds":-1,"rules":[{"listenPort":1,"upstreamUrl":"http://a"}]}"#
        )
        .contains("timeoutSeconds must be a positive integer"));
        assert!(problem(
            r#"{"timeoutSeconds":1.5,"rules":[{"listenPort":1,"upstreamUrl":"http://a"}]}"#
        )
        .contains("timeoutSeconds must be a positive integer"));
        assert!(problem(
            r#"{"rules":[{"listenPort":1,"upstreamUrl":"http://a"},{"listenPort":1,"upstreamUrl":"http://b"}]}"#
        )
        .contains("rules[1].listenPort: 1 is already used by rules[0]"));
        assert!(problem(
            r#"{"rules":[{"listenPort":1,"upstreamUrl":"http://a","listenAddress":"nope"}]}"#
        )
        .contains("not an IP address"));
    }

    #[test]
    fn same_port_on_different_addresses_is_allowed() {
        let config = parse(
            r#"{"rules":[{"listenPort":1,"upstreamUrl":"http://a","listenAddress":"127.0.0.1"},
                         {"listenPort":1,"upstreamUrl":"http://b","listenAddress":"127.0.0.2"}]}"#,
        );
        assert!(config.is_ok());
    }
}

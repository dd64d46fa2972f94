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

use std::fmt;

use http::{HeaderName, HeaderValue};
use serde_json::{Map, Value};

use crate::headers::HOP_BY_HOP;
use crate::upstream::UpstreamUrl;

/// Default wait for upstream response headers and longest upstream silence (B2).
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 600;
/// Default cap on a request body the proxy has to read whole (D5).
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Default cap on the bytes of one aggregated upstream stream.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 256 * 1024 * 1024;

/// Default limit on receiving a request head (slow-loris protection).
pub const DEFAULT_HEADER_READ_TIMEOUT_SECONDS: u64 = 30;

/// Default cap on one WebSocket message (D20).
pub const DEFAULT_MAX_WEBSOCKET_MESSAGE_BYTES: u64 = 64 * 1024 * 1024;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it was loaded from, for messages.
    pub source: PathBuf,
    /// One per listening port, in file order.
    pub rules: Vec<Rule>,
    /// Where the admin endpoints (`/metrics`, `/healthz`) listen; off when `None`.
    pub admin_listen: Option<SocketAddr>,
    /// Longest time a client may take to send a request head (and longest idle time of a
    /// kept-alive connection): slow-loris clients are closed after it.
    pub header_read_timeout: Duration,
    /// Keys the file had that this version does not know, as key paths.
    pub unknown_keys: Vec<String>,
}

/// A rule as far as it could be read: its address, and the whole rule when nothing else
/// in it was wrong.
struct ParsedRule {
    listen: SocketAddr,
    rule: Option<Rule>,
}

/// One listening port and where its traffic goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The address the rule listens on (`listenAddress`, `listenPort`).
    pub listen: SocketAddr,
    /// Where its requests go (`upstreamUrl`).
    pub upstream: UpstreamUrl,
    /// Its options, defaults already filled in.
    pub options: RuleOptions,
}

/// Per-rule behaviour; every rule carries its own resolved copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleOptions {
    /// D13: longest wait for response headers (counted from the request body's last frame),
    /// longest silence between upstream bytes, longest pause in a client's upload, and
    /// longest a WebSocket peer may take no byte of a message sent to it.
    pub timeout: Duration,
    /// Whether non-streaming Chat Completions / Responses calls are converted.
    pub convert: bool,
    /// Once an aggregation has run this long, commit 200 and send a space every interval.
    pub keep_alive: Option<Duration>,
    /// Cap on a request body the proxy must read whole to decide on conversion (D5);
    /// larger ones get 413. Bodies that are streamed through are not capped.
    pub max_request_body_bytes: u64,
    /// Cap on the (decoded) bytes of one upstream stream being aggregated: the whole answer
    /// is held in memory. A larger stream fails the conversion; it is never answered
    /// partially.
    pub max_response_bytes: u64,
    /// Largest WebSocket message either side may send (D20); larger ones close with 1009.
    pub max_websocket_message_bytes: u64,
    /// Headers set (or replaced) on every upstream request, e.g. an `authorization` key so
    /// clients need none. Values are marked sensitive and never logged.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Whether HTTPS upstreams may be spoken to in HTTP/2 (when they offer it). Off by
    /// default (D15: no hidden cap on upstream connections): one HTTP/2 connection carries
    /// every request to an upstream, and requests beyond the server's concurrent-stream
    /// limit wait for a stream, while over HTTP/1.1 each request in flight has a pooled
    /// connection of its own, as with the official SDKs, which speak HTTP/1.1.
    pub upstream_http2: bool,
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
            headers: Vec::new(),
            upstream_http2: false,
        }
    }
}

/// Everything wrong with a config file: which file, and each problem with its key path.
#[derive(Debug)]
pub struct ConfigError {
    /// The config file.
    pub path: PathBuf,
    /// One entry per problem, each naming its key path (or JSON line and column).
    pub problems: Vec<String>,
}

/// One line per problem, each naming the file.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {problem}", self.path.display())?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            problems: vec![format!("cannot read config file: {e}")],
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if it had been read from `path`, collecting every problem.
    pub fn parse(path: &Path, text: &[u8]) -> Result<Config, ConfigError> {
        Config::parse_with_env(path, text, &|name| std::env::var(name).ok())
    }

    /// As [`Config::parse`], with `${VAR}` references in header values resolved by `env`.
    pub fn parse_with_env(
        path: &Path,
        text: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let fail = |problem: String| ConfigError {
            path: path.to_path_buf(),
            problems: vec![problem],
        };
        // A byte order mark (Windows editors write one) is not JSON, but not a mistake either.
        let text = text.strip_prefix("\u{feff}".as_bytes()).unwrap_or(text);
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

        let mut check = Checker {
            problems: Vec::new(),
            unknown_keys: Vec::new(),
            env,
        };
        let mut defaults = RuleOptions::default();
        let mut admin_listen = None;
        let mut header_read_timeout = Duration::from_secs(DEFAULT_HEADER_READ_TIMEOUT_SECONDS);
        for (key, value) in root {
            match key.as_str() {
                "rules" => {}
                "adminListen" => admin_listen = check.socket_address(value, key),
                "headerReadTimeoutSeconds" => {
                    if let Some(t) = check.take(positive_seconds(value, key)) {
                        header_read_timeout = t;
                    }
                }
                _ if check.option(&mut defaults, key, value, key) => {}
                _ => check.unknown_keys.push(key.clone()),
            }
        }

        let no_rules = "add at least one {\"listenPort\", \"upstreamUrl\"} rule";
        let rules: &[Value] = match root.get("rules") {
            None => {
                check.problem(format!("`rules` is missing: {no_rules}"));
                &[]
            }
            Some(Value::Array(rules)) if rules.is_empty() => {
                check.problem(format!("`rules` is empty: {no_rules}"));
                &[]
            }
            Some(Value::Array(rules)) => rules,
            Some(other) => {
                check.problem(format!("`rules` must be an array, found {}", kind(other)));
                &[]
            }
        };

        let mut parsed: Vec<Rule> = Vec::with_capacity(rules.len());
        // Every rule's address that could be read, with its index: a rule with another
        // problem (a bad upstreamUrl, say) still takes part in the clash checks, so that one
        // `--check` lists every problem.
        let mut listens: Vec<(usize, SocketAddr)> = Vec::with_capacity(rules.len());
        // The unspecified address covers every interface, so it clashes with any other
        // address on the same port; the OS would refuse the second bind anyway.
        let clash = |a: SocketAddr, b: SocketAddr| {
            a.port() == b.port()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        };
        for (i, rule) in rules.iter().enumerate() {
            let at = format!("rules[{i}]");
            let Some(rule) = rule.as_object() else {
                check.problem(format!("{at} must be an object, found {}", kind(rule)));
                continue;
            };
            let Some(ParsedRule { listen, rule }) = check.rule(rule, &at, &defaults) else {
                continue;
            };
            if let Some(&(earlier, _)) = listens.iter().find(|(_, other)| clash(*other, listen)) {
                check.problem(format!(
                    "{at}.listenPort: {} is already used by rules[{earlier}]",
                    listen.port()
                ));
                continue;
            }
            listens.push((i, listen));
            parsed.extend(rule);
        }
        if let Some(admin) = admin_listen {
            if let Some(&(clash, _)) = listens.iter().find(|(_, listen)| clash(*listen, admin)) {
                check.problem(format!(
                    "adminListen: port {} is already used by rules[{clash}]",
                    admin.port()
                ));
            }
        }

        if !check.problems.is_empty() {
            return Err(ConfigError {
                path: path.to_path_buf(),
                problems: check.problems,
            });
        }
        Ok(Config {
            source: path.to_path_buf(),
            rules: parsed,
            admin_listen,
            header_read_timeout,
            unknown_keys: check.unknown_keys,
        })
    }
}

/// Walks the raw JSON, recording every problem instead of stopping at the first.
struct Checker<'a> {
    problems: Vec<String>,
    unknown_keys: Vec<String>,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Checker<'_> {
    fn problem(&mut self, problem: String) {
        self.problems.push(problem);
    }

    /// Records `result`'s error, if any, and hands back its value.
    fn take<T>(&mut self, result: Result<T, String>) -> Option<T> {
        result.map_err(|p| self.problem(p)).ok()
    }

    fn socket_address(&mut self, value: &Value, key_path: &str) -> Option<SocketAddr> {
        let result = match value {
            Value::String(s) => match s.parse::<SocketAddr>() {
                // Port 0 would listen on a port nobody can know from the config (D22).
                Ok(address) if address.port() == 0 => Err(format!(
                    "{key_path}: {s:?} has port 0; choose a port from 1 to 65535"
                )),
                Ok(address) => Ok(address),
                Err(_) => Err(format!(
                    "{key_path}: {s:?} is not an address:port such as \"127.0.0.1:9090\""
                )),
            },
            other => Err(format!(
                "{key_path} must be a string, found {}",
                kind(other)
            )),
        };
        self.take(result)
    }

    fn rule(
        &mut self,
        rule: &Map<String, Value>,
        at: &str,
        defaults: &RuleOptions,
    ) -> Option<ParsedRule> {
        let mut options = defaults.clone();
        for (key, value) in rule {
            let key_path = format!("{at}.{key}");
            match key.as_str() {
                "listenPort" | "listenAddress" | "upstreamUrl" => {}
                _ if self.option(&mut options, key, value, &key_path) => {}
                _ => self.unknown_keys.push(key_path),
            }
        }
        let port = self.take(listen_port(rule.get("listenPort"), at));
        let address = self.take(listen_address(rule.get("listenAddress"), at));
        let upstream = self.take(upstream_url(rule.get("upstreamUrl"), at));
        let listen = SocketAddr::new(address?, port?);
        Some(ParsedRule {
            listen,
            rule: upstream.map(|upstream| Rule {
                listen,
                upstream,
                options,
            }),
        })
    }

    /// Applies a key that may appear both at the top level (the default for every rule) and
    /// in a rule (an override). Returns `false` when `key` is not such an option.
    fn option(
        &mut self,
        options: &mut RuleOptions,
        key: &str,
        value: &Value,
        key_path: &str,
    ) -> bool {
        let result = match key {
            "timeoutSeconds" => positive_seconds(value, key_path).map(|v| options.timeout = v),
            "keepAliveSeconds" => match value {
                Value::Null => {
                    options.keep_alive = None;
                    Ok(())
                }
                v => positive_seconds(v, key_path).map(|v| options.keep_alive = Some(v)),
            },
            "convert" => value
                .as_bool()
                .map(|v| options.convert = v)
                .ok_or_else(|| format!("{key_path} must be true or false, found {}", kind(value))),
            "upstreamHttp2" => value
                .as_bool()
                .map(|v| options.upstream_http2 = v)
                .ok_or_else(|| format!("{key_path} must be true or false, found {}", kind(value))),
            "maxRequestBodyBytes" => {
                positive_integer(value, key_path).map(|v| options.max_request_body_bytes = v)
            }
            "maxResponseBytes" => {
                positive_integer(value, key_path).map(|v| options.max_response_bytes = v)
            }
            "maxWebSocketMessageBytes" => {
                positive_integer(value, key_path).map(|v| options.max_websocket_message_bytes = v)
            }
            "headers" => match headers(value, key_path, self.env) {
                Ok(v) => {
                    options.headers = v;
                    Ok(())
                }
                Err(problems) => {
                    self.problems.extend(problems);
                    Ok(())
                }
            },
            _ => return false,
        };
        self.take(result);
        true
    }
}

fn listen_port(value: Option<&Value>, at: &str) -> Result<u16, String> {
    match value {
        None => Err(format!("{at}.listenPort is missing")),
        Some(v) => match v.as_u64() {
            Some(p) if (1..=65535).contains(&p) => Ok(p as u16),
            _ if v.is_number() => Err(format!("{at}.listenPort: {v} is outside 1-65535")),
            _ => Err(format!(
                "{at}.listenPort must be a number, found {}",
                kind(v)
            )),
        },
    }
}

fn listen_address(value: Option<&Value>, at: &str) -> Result<IpAddr, String> {
    match value {
        None => Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        Some(Value::String(s)) => s
            .parse::<IpAddr>()
            .map_err(|_| format!("{at}.listenAddress: {s:?} is not an IP address")),
        Some(other) => Err(format!(
            "{at}.listenAddress must be a string, found {}",
            kind(other)
        )),
    }
}

fn upstream_url(value: Option<&Value>, at: &str) -> Result<UpstreamUrl, String> {
    match value {
        None => Err(format!("{at}.upstreamUrl is missing")),
        Some(Value::String(s)) => {
            UpstreamUrl::parse(s).map_err(|e| format!("{at}.upstreamUrl: {e}"))
        }
        Some(other) => Err(format!(
            "{at}.upstreamUrl must be a string, found {}",
            kind(other)
        )),
    }
}

/// `headers`: an object of header name → value set on every upstream request of the rule.
/// `${NAME}` in a value is replaced by the environment variable at load time, so secrets
/// stay out of the file; a missing variable is an error, never an empty credential.
fn headers(
    value: &Value,
    key_path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(HeaderName, HeaderValue)>, Vec<String>> {
    let Value::Object(map) = value else {
        return Err(vec![format!(
            "{key_path} must be an object of header names to values, found {}",
            kind(value)
        )]);
    };
    let mut out = Vec::with_capacity(map.len());
    let mut problems = Vec::new();
    for (name, raw) in map {
        match header(name, raw, &format!("{key_path}.{name}"), env) {
            Ok(pair) => out.push(pair),
            Err(problem) => problems.push(problem),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// One entry of a `headers` object.
fn header(
    name: &str,
    raw: &Value,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(HeaderName, HeaderValue), String> {
    let header = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{at}: {name:?} is not a valid header name"))?;
    // The body's framing is the proxy's to keep: a configured length would cut or stall
    // every request body.
    if HOP_BY_HOP.contains(&header)
        || header == http::header::HOST
        || header == http::header::CONTENT_LENGTH
    {
        return Err(format!(
            "{at}: {name} is managed by the proxy and cannot be set"
        ));
    }
    let Value::String(raw) = raw else {
        return Err(format!("{at} must be a string, found {}", kind(raw)));
    };
    let expanded = expand_env(raw, env)
        .map_err(|missing| format!("{at}: environment variable {missing} is not set"))?;
    let mut header_value = HeaderValue::from_str(&expanded)
        .map_err(|_| format!("{at}: the value contains characters not allowed in a header"))?;
    header_value.set_sensitive(true);
    Ok((header, header_value))
}

/// Replaces each `${NAME}` with the variable's value; `Err(NAME)` for the first missing one.
fn expand_env(raw: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        out.push_str(&env(name).ok_or_else(|| name.to_owned())?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
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
    fn upstream_http2_is_off_unless_turned_on() {
        let config = parse(
            r#"{"upstreamHttp2":true,"rules":[{"listenPort":1,"upstreamUrl":"https://a"},
                {"listenPort":2,"upstreamUrl":"https://b","upstreamHttp2":false}]}"#,
        )
        .unwrap();
        assert!(config.rules[0].options.upstream_http2);
        assert!(!config.rules[1].options.upstream_http2);
        assert!(!RuleOptions::default().upstream_http2);
        let config = parse(r#"{"rules":[{"listenPort":1,"upstreamUrl":"https://a"}]}"#).unwrap();
        assert!(!config.rules[0].options.upstream_http2);
        assert!(problem(
            r#"{"rules":[{"listenPort":1,"upstreamUrl":"https://a","upstreamHttp2":"no"}]}"#
        )
        .contains("rules[0].upstreamHttp2 must be true or false, found a string"));
    }

    #[test]
    fn a_byte_order_mark_is_skipped() {
        let config = parse("\u{feff}{\"rules\":[{\"listenPort\":1,\"upstreamUrl\":\"http://a\"}]}");
        assert_eq!(config.unwrap().rules.len(), 1);
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
    fn every_problem_is_listed_with_its_key_path() {
        let err = parse(
            r#"{"timeoutSeconds":0,"adminListen":"nope","rules":[{"listenPort":0,"upstreamUrl":"ftp://x"},
                {"upstreamUrl":"http://a","convert":"yes"}]}"#,
        )
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 6, "{text}");
        for needle in [
            "config.json: timeoutSeconds must be a positive integer",
            "config.json: adminListen:",
            "config.json: rules[0].listenPort: 0 is outside 1-65535",
            "config.json: rules[0].upstreamUrl:",
            "config.json: rules[1].convert must be true or false",
            "config.json: rules[1].listenPort is missing",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert_eq!(text.lines().count(), 6);
    }

    #[test]
    fn headers_expand_environment_variables_and_refuse_missing_ones() {
        let env = |name: &str| (name == "KEY").then(|| "sk-live".to_owned());
        let text = br#"{"headers":{"x-team":"a"},"rules":[{"listenPort":1,"upstreamUrl":"http://a",
            "headers":{"authorization":"Bearer ${KEY}","x-static":"v"}},{"listenPort":2,"upstreamUrl":"http://b"}]}"#;
        let config = Config::parse_with_env(Path::new("c.json"), text, &env).unwrap();
        let first: Vec<(&str, &[u8])> = config.rules[0]
            .options
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            first,
            vec![
                ("authorization", &b"Bearer sk-live"[..]),
                ("x-static", &b"v"[..])
            ]
        );
        assert!(config.rules[0].options.headers[0].1.is_sensitive());
        assert_eq!(
            config.rules[1].options.headers.len(),
            1,
            "top-level headers are the default"
        );

        let missing = br#"{"rules":[{"listenPort":1,"upstreamUrl":"http://a","headers":{"authorization":"Bearer ${NOPE}"}}]}"#;
        let err = Config::parse_with_env(Path::new("c.json"), missing, &env).unwrap_err();
        assert!(
            err.to_string()
                .contains("rules[0].headers.authorization: environment variable NOPE is not set"),
            "{err}"
        );
        for managed in ["connection", "Content-Length", "host"] {
            let text = format!(
                r#"{{"rules":[{{"listenPort":1,"upstreamUrl":"http://a","headers":{{"{managed}":"2"}}}}]}}"#
            );
            let err = Config::parse_with_env(Path::new("c.json"), text.as_bytes(), &env)
                .unwrap_err()
                .to_string();
            assert!(err.contains("is managed by the proxy"), "{managed}: {err}");
        }
    }

    #[test]
    fn admin_listen_is_validated_and_must_not_clash_with_a_rule() {
        let ok = parse(r#"{"adminListen":"127.0.0.1:9090","rules":[{"listenPort":1,"upstreamUrl":"http://a"}]}"#).unwrap();
        assert_eq!(ok.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        let clash = problem(
            r#"{"adminListen":"127.0.0.1:1","rules":[{"listenPort":1,"upstreamUrl":"http://a"}]}"#,
        );
        assert!(
            clash.contains("adminListen: port 1 is already used by rules[0]"),
            "{clash}"
        );
        let zero = problem(
            r#"{"adminListen":"127.0.0.1:0","rules":[{"listenPort":1,"upstreamUrl":"http://a"}]}"#,
        );
        assert!(
            zero.contains("adminListen: \"127.0.0.1:0\" has port 0"),
            "{zero}"
        );
    }

    /// One check lists every problem: a rule with a bad upstream still takes part in the
    /// port clash checks, each bad header is named, and a clash names the rule's own index.
    #[test]
    fn every_problem_is_listed_at_once() {
        let text = problem(
            r#"{"adminListen":"127.0.0.1:7","rules":[
                {"listenPort":5,"upstreamUrl":"ftp://x"},
                {"listenPort":5,"upstreamUrl":"http://a"},
                {"listenPort":7,"upstreamUrl":"http://b","headers":{"host":"h","x-ok":"v","bad name":"v"}}]}"#,
        );
        for needle in [
            "rules[0].upstreamUrl",
            "rules[1].listenPort: 5 is already used by rules[0]",
            "rules[2].headers.host: host is managed by the proxy",
            "rules[2].headers.bad name: \"bad name\" is not a valid header name",
            "adminListen: port 7 is already used by rules[2]",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
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

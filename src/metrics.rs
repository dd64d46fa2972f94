//! Prometheus metrics, exposed by the admin endpoint.
//!
//! `prometheus-client` (the Prometheus project's own Rust client) formats the exposition
//! text, so the output follows the OpenMetrics spec without hand-written formatting. Most
//! values are recorded in one place, when a request's access log is written; the rest where
//! only that code knows them (time to upstream headers, WebSocket sessions).
//!
//! Token counters follow the OpenTelemetry GenAI `gen_ai.client.token.usage` idea: one
//! series per token type (`input`, `output`, `total`, `cached`, `reasoning`).

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::route::Mode;

/// `mode` label values.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ModeLabel {
    /// Forwarded unchanged.
    passthrough,
    /// Sent upstream as a stream and answered with the aggregated body.
    convert,
    /// A WebSocket session.
    websocket,
}

impl From<Mode> for ModeLabel {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Passthrough => ModeLabel::passthrough,
            Mode::Convert => ModeLabel::convert,
            Mode::WebSocket => ModeLabel::websocket,
        }
    }
}

/// Labels of [`Metrics::requests`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The rule's listening port (`0` for a [`ProxyService`](crate::ProxyService) without a
    /// port label).
    pub port: u16,
    /// The mode the request ended up in.
    pub mode: ModeLabel,
    /// The response status class, from [`status_class`].
    pub status_class: &'static str,
}

/// Labels of [`Metrics::request_duration`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    /// The rule's listening port (`0` for a [`ProxyService`](crate::ProxyService) without a
    /// port label).
    pub port: u16,
    /// The mode the request ended up in.
    pub mode: ModeLabel,
}

/// Labels of the per-port series: [`Metrics::upstream_headers`], [`Metrics::in_flight`],
/// [`Metrics::websocket_sessions`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    /// The rule's listening port (`0` for a [`ProxyService`](crate::ProxyService) without a
    /// port label).
    pub port: u16,
}

/// Labels of [`Metrics::bytes`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// The rule's listening port (`0` for a [`ProxyService`](crate::ProxyService) without a
    /// port label).
    pub port: u16,
    /// The mode the request ended up in.
    pub mode: ModeLabel,
    /// `to_client` or `to_upstream`.
    pub direction: &'static str,
}

/// Labels of [`Metrics::tokens`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// The rule's listening port (`0` for a [`ProxyService`](crate::ProxyService) without a
    /// port label).
    pub port: u16,
    /// `input`, `output`, `total`, `cached`, `reasoning`.
    pub token_type: &'static str,
}

/// Labels of [`Metrics::terminal`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TerminalLabels {
    /// The rule's listening port (`0` for a [`ProxyService`](crate::ProxyService) without a
    /// port label).
    pub port: u16,
    /// `done`, `end_of_stream`, `completed`, `incomplete`.
    pub terminal: &'static str,
}

/// Labels of [`Metrics::upstream_errors`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The rule's listening port (`0` for a [`ProxyService`](crate::ProxyService) without a
    /// port label).
    pub port: u16,
    /// `connect`, `timeout`, `incomplete_stream`, `in_stream_error`, `stream_fallback`.
    pub kind: &'static str,
}

/// Every metric the proxy keeps.
pub struct Metrics {
    registry: Registry,
    /// Requests, counted when their log line is written
    /// (`openai_stream_proxy_requests_total`).
    pub requests: Family<RequestLabels, Counter>,
    /// Seconds from request to the end of the response body
    /// (`openai_stream_proxy_request_duration_seconds`).
    pub request_duration: Family<ModeLabels, Histogram>,
    /// Seconds from sending a request upstream to its response head
    /// (`openai_stream_proxy_upstream_time_to_headers_seconds`).
    pub upstream_headers: Family<PortLabels, Histogram>,
    /// Requests whose response body has not ended
    /// (`openai_stream_proxy_requests_in_flight`).
    pub in_flight: Family<PortLabels, Gauge>,
    /// Open proxied WebSocket sessions (`openai_stream_proxy_websocket_sessions_open`).
    pub websocket_sessions: Family<PortLabels, Gauge>,
    /// Bytes relayed, by direction (`openai_stream_proxy_body_bytes_total`). HTTP request
    /// bytes are the body bytes read from the client (whatever its framing) or the converted
    /// body; WebSocket bytes are message payloads, added when the session ends.
    pub bytes: Family<BytesLabels, Counter>,
    /// Token usage reported by converted responses, by token type
    /// (`openai_stream_proxy_converted_tokens_total`).
    pub tokens: Family<TokenLabels, Counter>,
    /// Converted streams by the event that ended them
    /// (`openai_stream_proxy_converted_terminal_total`).
    pub terminal: Family<TerminalLabels, Counter>,
    /// Upstream failures by kind (`openai_stream_proxy_upstream_errors_total`).
    pub upstream_errors: Family<ErrorLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn latency_histogram() -> Histogram {
    // 100 µs … about an hour (3,638 s): from a local passthrough to a reasoning model
    // thinking for minutes, past the default `timeoutSeconds` of 600 s.
    Histogram::new(exponential_buckets(0.0001, 2.5, 20))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("openai_stream_proxy");
        let requests = Family::default();
        registry.register(
            "requests",
            "Requests by rule port, mode and status class",
            requests.clone(),
        );
        let request_duration = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "request_duration",
            "Time from request to the end of the response body",
            Unit::Seconds,
            request_duration.clone(),
        );
        let upstream_headers = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "upstream_time_to_headers",
            "Time from sending a request upstream to its response headers",
            Unit::Seconds,
            upstream_headers.clone(),
        );
        let in_flight = Family::default();
        registry.register(
            "requests_in_flight",
            "Requests whose response has not ended",
            in_flight.clone(),
        );
        let websocket_sessions = Family::default();
        registry.register(
            "websocket_sessions_open",
            "Open proxied WebSocket sessions",
            websocket_sessions.clone(),
        );
        let bytes = Family::default();
        registry.register_with_unit(
            "body",
            "Body bytes relayed, by direction (request bytes as read from the client, or the converted body)",
            Unit::Bytes,
            bytes.clone(),
        );
        let tokens = Family::default();
        registry.register(
            "converted_tokens",
            "Token usage reported by converted responses, by token type (gen_ai.client.token.usage)",
            tokens.clone(),
        );
        let terminal = Family::default();
        registry.register(
            "converted_terminal",
            "Converted streams by the event that ended them",
            terminal.clone(),
        );
        let upstream_errors = Family::default();
        registry.register(
            "upstream_errors",
            "Upstream failures by kind",
            upstream_errors.clone(),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_headers,
            in_flight,
            websocket_sessions,
            bytes,
            tokens,
            terminal,
            upstream_errors,
        }
    }

    /// The process-wide metrics.
    pub fn global() -> &'static Metrics {
        static METRICS: OnceLock<Metrics> = OnceLock::new();
        METRICS.get_or_init(Metrics::new)
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Counts an upstream failure.
    pub fn upstream_error(&self, port: u16, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&ErrorLabels { port, kind })
            .inc();
    }
}

/// The metric handles of one rule port, resolved once: a request then records with a few
/// atomic operations instead of hashing label sets and locking the families.
#[derive(Clone)]
pub struct PortMetrics(Arc<PortHandles>);

struct PortHandles {
    /// By mode, then status class.
    requests: [[Counter; STATUS_CLASSES.len()]; MODES.len()],
    /// By mode.
    duration: [Histogram; MODES.len()],
    /// By mode, then direction (to client, to upstream).
    bytes: [[Counter; 2]; MODES.len()],
    in_flight: Gauge,
    upstream_headers: Histogram,
}

const MODES: [ModeLabel; 3] = [
    ModeLabel::passthrough,
    ModeLabel::convert,
    ModeLabel::websocket,
];
const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

impl std::fmt::Debug for PortMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PortMetrics")
    }
}

impl PortMetrics {
    /// Handles for `port` in the process-wide metrics.
    pub fn for_port(port: u16) -> PortMetrics {
        let m = Metrics::global();
        let requests = MODES.map(|mode| {
            STATUS_CLASSES.map(|status_class| {
                m.requests
                    .get_or_create(&RequestLabels {
                        port,
                        mode,
                        status_class,
                    })
                    .clone()
            })
        });
        let duration = MODES.map(|mode| {
            m.request_duration
                .get_or_create(&ModeLabels { port, mode })
                .clone()
        });
        let bytes = MODES.map(|mode| {
            ["to_client", "to_upstream"].map(|direction| {
                m.bytes
                    .get_or_create(&BytesLabels {
                        port,
                        mode,
                        direction,
                    })
                    .clone()
            })
        });
        PortMetrics(Arc::new(PortHandles {
            requests,
            duration,
            bytes,
            in_flight: m.in_flight.get_or_create(&PortLabels { port }).clone(),
            upstream_headers: m
                .upstream_headers
                .get_or_create(&PortLabels { port })
                .clone(),
        }))
    }

    /// A request arrived.
    pub fn request_started(&self) {
        self.0.in_flight.inc();
    }

    /// A request's response ended (or was dropped).
    pub fn request_finished(
        &self,
        mode: ModeLabel,
        status: u16,
        seconds: f64,
        to_client: u64,
        to_upstream: u64,
    ) {
        let m = mode as usize;
        self.0.in_flight.dec();
        self.0.requests[m][status_class_index(status)].inc();
        self.0.duration[m].observe(seconds);
        if to_client > 0 {
            self.0.bytes[m][0].inc_by(to_client);
        }
        if to_upstream > 0 {
            self.0.bytes[m][1].inc_by(to_upstream);
        }
    }

    /// The upstream answered with its response head after `seconds`.
    pub fn upstream_headers(&self, seconds: f64) {
        self.0.upstream_headers.observe(seconds);
    }
}

fn status_class_index(status: u16) -> usize {
    match status / 100 {
        1..=5 => usize::from(status / 100) - 1,
        _ => STATUS_CLASSES.len() - 1,
    }
}

/// `2xx`, `4xx`, … for a status code.
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call that ends just past the default `timeoutSeconds` (600 s) still lands in a
    /// finite bucket, not only in `+Inf`.
    #[test]
    fn latency_buckets_reach_past_the_default_timeout() {
        let histogram = latency_histogram();
        histogram.observe(700.0);
        let mut registry = Registry::default();
        registry.register("d", "d", histogram);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        // `d_bucket{le="…"} N` lines, the finite ones in rising order.
        let top = text
            .lines()
            .filter_map(|l| l.strip_prefix("d_bucket{le=\""))
            .filter_map(|l| l.split_once("\"} "))
            .filter_map(|(le, n)| Some((le.parse::<f64>().ok()?, n.parse::<u64>().ok()?)))
            .rfind(|(le, _)| le.is_finite());
        let (bound, count) = top.unwrap_or_else(|| panic!("no finite bucket: {text}"));
        assert!(bound >= 3600.0, "top finite bucket {bound} s");
        assert_eq!(count, 1, "{text}");
    }

    #[test]
    fn exposition_uses_prometheus_naming() {
        let metrics = Metrics::global();
        metrics
            .requests
            .get_or_create(&RequestLabels {
                port: 1,
                mode: ModeLabel::convert,
                status_class: "2xx",
            })
            .inc();
        metrics.upstream_error(1, "timeout");
        metrics
            .request_duration
            .get_or_create(&ModeLabels {
                port: 1,
                mode: ModeLabel::convert,
            })
            .observe(0.25);
        let text = metrics.encode();
        assert!(text.contains("openai_stream_proxy_requests_total{port=\"1\",mode=\"convert\",status_class=\"2xx\"}"), "{text}");
        assert!(
            text.contains("openai_stream_proxy_upstream_errors_total{port=\"1\",kind=\"timeout\"}"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE openai_stream_proxy_request_duration_seconds histogram"),
            "{text}"
        );
    }
}

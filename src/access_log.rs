//! One log line per request, written when its response body has ended (or was dropped), so
//! the line carries the real duration and byte count of a streamed body.
//!
//! Only the path is logged, never the query (some providers take keys in it), headers or
//! bodies.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::{HeaderValue, Method};

use crate::metrics::{Metrics, ModeLabel, PortMetrics, TerminalLabels, TokenLabels};
use crate::route::Mode;
use crate::upload::UploadProgress;

/// Conversion details for the log line.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConvertSummary {
    /// The event that ended the upstream stream, as named by
    /// [`Terminal::as_str`](crate::convert::outcome::Terminal::as_str); `None` when no stream
    /// was aggregated (the answer was relayed, or the conversion failed).
    pub terminal: Option<&'static str>,
    /// Input (prompt) tokens the upstream reported.
    pub input_tokens: Option<u64>,
    /// Output (completion) tokens the upstream reported.
    pub output_tokens: Option<u64>,
    /// Total tokens the upstream reported.
    pub total_tokens: Option<u64>,
    /// Cached input tokens; counted in metrics only, not written to the log line.
    pub cached_tokens: Option<u64>,
    /// Reasoning tokens; counted in metrics only, not written to the log line.
    pub reasoning_tokens: Option<u64>,
    /// Which fallback was used when the upstream refused the streaming form.
    pub fallback: Option<&'static str>,
}

impl ConvertSummary {
    /// What the line says of a conversion that took a refusal fallback and then did not
    /// aggregate a stream: its answer was relayed, or it failed.
    pub fn fallback_only(fallback: &'static str) -> Self {
        ConvertSummary {
            fallback: Some(fallback),
            ..ConvertSummary::default()
        }
    }
}

/// The pending log line of one request.
#[derive(Debug)]
pub struct AccessLog {
    port: u16,
    metrics: PortMetrics,
    method: Method,
    path: String,
    mode: Mode,
    status: u16,
    started: Instant,
    bytes: u64,
    /// Request bytes sent upstream when they are not the bytes read from the client (a
    /// converted body).
    request_bytes: Option<u64>,
    /// Request body bytes read from the client, as they are read.
    request_counter: Option<Arc<UploadProgress>>,
    /// The first upstream failure kind this request met (metric `upstream_errors`).
    upstream_error: Option<&'static str>,
    outcome: Outcome,
    convert: Option<ConvertSummary>,
    request_id: Option<HeaderValue>,
    upstream_request_id: Option<HeaderValue>,
    /// Filled by a conversion that finishes after its response was committed (keep-alive).
    convert_later: Option<Arc<OnceLock<ConvertSummary>>>,
}

#[derive(Debug)]
enum Outcome {
    Streaming,
    Complete,
    Failed(String),
}

impl AccessLog {
    /// Starts the line for a request that arrived at `started`. The request counts as in
    /// flight (metric) from now until the line is written.
    pub fn new(
        port: u16,
        metrics: PortMetrics,
        method: Method,
        path: &str,
        mode: Mode,
        started: Instant,
    ) -> Self {
        metrics.request_started();
        AccessLog {
            port,
            metrics,
            method,
            path: path.to_owned(),
            mode,
            status: 0,
            started,
            bytes: 0,
            request_bytes: None,
            request_counter: None,
            upstream_error: None,
            outcome: Outcome::Streaming,
            convert: None,
            request_id: None,
            upstream_request_id: None,
            convert_later: None,
        }
    }

    /// The status the client is answered with.
    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    /// The mode the request ended up in. A conversion candidate is logged as passthrough
    /// until its body is actually converted, so this is set late.
    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }

    /// The summary of a conversion that finished before its response was committed.
    pub fn set_convert(&mut self, summary: ConvertSummary) {
        self.convert = Some(summary);
    }

    /// The request's id (see [`request_id`](crate::request_id)).
    pub fn set_request_id(&mut self, id: HeaderValue) {
        self.request_id = Some(id);
    }

    /// The id the upstream gave the request (its `x-request-id` response header).
    pub fn set_upstream_request_id(&mut self, id: HeaderValue) {
        self.upstream_request_id = Some(id);
    }

    /// A slot for the summary of a conversion that is still running when its 200 is
    /// committed (keep-alive): the summary does not exist yet, so the line reads the slot
    /// when it is written. A summary given with [`Self::set_convert`] takes precedence.
    pub fn set_convert_later(&mut self, slot: Arc<OnceLock<ConvertSummary>>) {
        self.convert_later = Some(slot);
    }

    /// Request body bytes sent upstream, when they differ from the bytes read from the
    /// client (a converted body); takes precedence over [`Self::count_request_bytes`].
    pub fn set_request_bytes(&mut self, n: u64) {
        self.request_bytes = Some(n);
    }

    /// The progress of the request body read from the client (see
    /// [`UpstreamBody::track_upload`](crate::upstream::UpstreamBody::track_upload)), whose
    /// byte count is read when the line is written.
    pub fn count_request_bytes(&mut self, counter: Arc<UploadProgress>) {
        self.request_counter = Some(counter);
    }

    /// The request met an upstream failure of `kind` (`connect`, `timeout`,
    /// `incomplete_stream`, `in_stream_error`); counted once per request, the first kind
    /// given wins.
    pub fn set_upstream_error(&mut self, kind: &'static str) {
        self.upstream_error.get_or_insert(kind);
    }

    /// Counts response body bytes sent to the client.
    pub fn add_bytes(&mut self, n: u64) {
        self.bytes += n;
    }

    /// The response body ended normally (`outcome=complete`). A line written without this
    /// or [`Self::body_failed`] reports `client_closed`: the body was dropped before its end.
    pub fn body_complete(&mut self) {
        self.outcome = Outcome::Complete;
    }

    /// The response body failed mid-way (`outcome=upstream_failed`); `reason` becomes the
    /// line's `error`.
    pub fn body_failed(&mut self, reason: String) {
        self.outcome = Outcome::Failed(reason);
    }
}

impl AccessLog {
    fn record_metrics(&self, seconds: f64) {
        let port = self.port;
        let request_bytes = self
            .request_bytes
            .unwrap_or_else(|| self.request_counter.as_ref().map_or(0, |c| c.bytes()));
        self.metrics.request_finished(
            ModeLabel::from(self.mode),
            self.status,
            seconds,
            self.bytes,
            request_bytes,
        );
        let metrics = Metrics::global();
        if let Some(kind) = self.upstream_error {
            metrics.upstream_error(port, kind);
        }
        let Some(convert) = self.convert else { return };
        if let Some(terminal) = convert.terminal {
            metrics
                .terminal
                .get_or_create(&TerminalLabels { port, terminal })
                .inc();
        }
        let tokens = [
            ("input", convert.input_tokens),
            ("output", convert.output_tokens),
            ("total", convert.total_tokens),
            ("cached", convert.cached_tokens),
            ("reasoning", convert.reasoning_tokens),
        ];
        for (token_type, n) in tokens {
            if let Some(n) = n {
                metrics
                    .tokens
                    .get_or_create(&TokenLabels { port, token_type })
                    .inc_by(n);
            }
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let outcome = match &self.outcome {
            Outcome::Complete => "complete",
            // Dropped before the end: the client went away or the server shut the
            // connection.
            Outcome::Streaming => "client_closed",
            Outcome::Failed(_) => "upstream_failed",
        };
        let error = match &self.outcome {
            Outcome::Failed(reason) => Some(reason.as_str()),
            _ => None,
        };
        if self.convert.is_none() {
            self.convert = self
                .convert_later
                .as_ref()
                .and_then(|slot| slot.get().copied());
        }
        let convert = self.convert.unwrap_or_default();
        self.record_metrics(duration_ms / 1000.0);
        tracing::info!(
            target: "openai_stream_proxy::access",
            port = self.port,
            method = %self.method,
            path = %self.path,
            mode = %self.mode.as_str(),
            status = self.status,
            request_id = self.request_id.as_ref().and_then(|v| v.to_str().ok()).map(tracing::field::display),
            upstream_request_id = self.upstream_request_id.as_ref().and_then(|v| v.to_str().ok()).map(tracing::field::display),
            duration_ms = format_args!("{duration_ms:.2}"),
            bytes = self.bytes,
            outcome = %outcome,
            error = error.map(tracing::field::display),
            terminal = convert.terminal.map(tracing::field::display),
            input_tokens = convert.input_tokens,
            output_tokens = convert.output_tokens,
            total_tokens = convert.total_tokens,
            fallback = convert.fallback.map(tracing::field::display),
            "request"
        );
    }
}

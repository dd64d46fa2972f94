//! Reading an upstream event stream into an accumulator: content decoding, the idle
//! timeout between upstream bytes, the size cap, SSE parsing, and stopping at the terminal
//! event (B42: events after it are never read, and the upstream connection is released).

use std::future::poll_fn;
use std::ops::ControlFlow;
use std::pin::{pin, Pin};
use std::sync::Mutex;
use std::time::Duration;

use async_compression::tokio::bufread::{
    BrotliDecoder, DeflateDecoder, GzipDecoder, ZlibDecoder, ZstdDecoder,
};
use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;
use tokio_util::io::StreamReader;

use super::chat::ChatAccumulator;
use super::outcome::{Aggregate, AggregateError, Flow};
use super::request::Api;
use super::responses::ResponsesAccumulator;
use crate::body::IdleTimer;
use crate::sse::{SseError, SseParser};
use crate::upstream::UpstreamIncoming;

/// Either accumulator behind one interface.
pub enum Accumulator {
    /// A Chat Completions stream. Both are boxed: the future that aggregates holds this
    /// across awaits, and a pointer keeps that future small whichever API it serves.
    Chat(Box<ChatAccumulator>),
    /// A Responses stream.
    Responses(Box<ResponsesAccumulator>),
}

impl Accumulator {
    /// A fresh accumulator for `api`'s stream format.
    pub fn new(api: Api) -> Self {
        match api {
            Api::ChatCompletions => Accumulator::Chat(Box::default()),
            Api::Responses => Accumulator::Responses(Box::default()),
        }
    }

    /// Feeds one SSE event.
    pub fn push(&mut self, name: &[u8], data: &[u8]) -> Result<Flow, AggregateError> {
        match self {
            Accumulator::Chat(a) => a.push(name, data),
            Accumulator::Responses(a) => a.push(name, data),
        }
    }

    /// Builds the body after the terminal event or a clean end of stream.
    pub fn finish(self) -> Result<Aggregate, AggregateError> {
        match self {
            Accumulator::Chat(a) => (*a).finish(),
            Accumulator::Responses(a) => a.finish(),
        }
    }
}

/// The content codings a converted stream may arrive in (D4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// No content coding (`identity` or no `content-encoding`).
    Identity,
    /// `gzip` (or `x-gzip`).
    Gzip,
    /// `deflate`: zlib-wrapped or raw, told apart by the first bytes.
    Deflate,
    /// `br`.
    Brotli,
    /// `zstd`.
    Zstd,
}

impl Coding {
    /// Every coding we decode, in the order offered upstream.
    pub const ACCEPTED: &'static str = "gzip, deflate, br, zstd";

    /// Whether a client whose `accept-encoding` values are `client` can read a body in
    /// `coding` (a `content-encoding` name, any case).
    ///
    /// The converted leg asks the upstream for every coding we decode (D4), and what it does
    /// not stream (errors, JSON from a provider that ignores `stream`) is relayed; a relayed
    /// body in a coding the client did not offer is decoded first. The client's list follows
    /// RFC 9110 §12.5.3: `q=0` refuses a coding, `*` stands for every coding not named,
    /// `x-gzip` is `gzip`, and no `accept-encoding` at all means only `identity`.
    pub fn client_accepts<'a>(client: impl IntoIterator<Item = &'a [u8]>, coding: &str) -> bool {
        let coding = coding.trim().to_ascii_lowercase();
        let coding = if coding == "x-gzip" { "gzip" } else { &coding };
        if coding == "identity" {
            return true;
        }
        let mut star = None;
        for value in client {
            let Ok(value) = std::str::from_utf8(value) else {
                continue;
            };
            for item in value.split(',') {
                let mut pieces = item.split(';');
                let name = pieces.next().unwrap_or("").trim().to_ascii_lowercase();
                if name.is_empty() {
                    continue;
                }
                let refused = pieces.any(|p| {
                    let p = p.trim();
                    let Some(q) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) else {
                        return false;
                    };
                    q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
                });
                let name = if name == "x-gzip" { "gzip" } else { &name };
                if name == coding {
                    return !refused;
                }
                if name == "*" {
                    star = Some(!refused);
                }
            }
        }
        star.unwrap_or(false)
    }

    /// Parses a `content-encoding` value; `None` for codings we cannot decode.
    pub fn from_header(value: Option<&str>) -> Option<Coding> {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("identity") => Some(Coding::Identity),
            Some("gzip") | Some("x-gzip") => Some(Coding::Gzip),
            Some("deflate") => Some(Coding::Deflate),
            Some("br") => Some(Coding::Brotli),
            Some("zstd") => Some(Coding::Zstd),
            Some(_) => None,
        }
    }
}

/// Why reading the stream stopped without an aggregate.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The events could not be aggregated (corrupt, truncated, or an error the upstream
    /// reported in the stream).
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
    /// No upstream bytes for this long (the rule's timeout).
    #[error("upstream sent no data for {} s", .0.as_secs())]
    Idle(Duration),
    /// The stream, or one event in it, exceeded this many bytes (`maxResponseBytes`).
    #[error("upstream stream is larger than maxResponseBytes ({0} bytes)")]
    TooLarge(u64),
    /// The upstream body failed, or could not be decoded, in the middle of the stream.
    #[error("upstream connection failed in the middle of the stream: {0}")]
    Body(String),
}

/// Limits for one aggregation.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Longest silence between upstream bytes.
    pub idle: Duration,
    /// Cap on the decoded stream, in bytes.
    pub max_bytes: u64,
}

/// Reads `body` (already known to be an event stream in `coding`), after `prefix` bytes that
/// were read while sniffing, into `accumulator`.
pub async fn aggregate(
    prefix: Bytes,
    body: UpstreamIncoming,
    coding: Coding,
    mut accumulator: Accumulator,
    limits: StreamLimits,
) -> Result<Aggregate, StreamError> {
    let max_event = usize::try_from(limits.max_bytes).unwrap_or(usize::MAX);
    let mut feeder = Feeder {
        parser: SseParser::new(max_event),
        accumulator: &mut accumulator,
        seen: 0,
        limits,
    };
    let finished = match coding {
        Coding::Identity => feeder.read_frames(prefix, body).await?,
        _ => feeder.read_decoded(prefix, body, coding).await?,
    };
    if !finished {
        feeder.finish()?;
    }
    Ok(accumulator.finish()?)
}

struct Feeder<'a> {
    parser: SseParser,
    accumulator: &'a mut Accumulator,
    seen: u64,
    limits: StreamLimits,
}

impl Feeder<'_> {
    /// Feeds one chunk; `true` once the terminal event was seen.
    ///
    /// Only the bytes within `max_bytes` are parsed, and the limit is exceeded only if no
    /// terminal event is among them: bytes that follow the terminal event in the same read
    /// (blank lines, a `[DONE]` after `response.completed`) do not count, so the outcome does
    /// not depend on how the stream is cut into reads.
    fn feed(&mut self, chunk: &[u8]) -> Result<bool, StreamError> {
        let room = self.limits.max_bytes.saturating_sub(self.seen);
        let (within, over) = match usize::try_from(room) {
            Ok(room) if room < chunk.len() => (&chunk[..room], true),
            _ => (chunk, false),
        };
        self.seen += within.len() as u64;
        if self.parse(within)? {
            return Ok(true);
        }
        if over {
            return Err(StreamError::TooLarge(self.limits.max_bytes));
        }
        Ok(false)
    }

    fn parse(&mut self, chunk: &[u8]) -> Result<bool, StreamError> {
        let accumulator = &mut *self.accumulator;
        let mut sink =
            |event: crate::sse::SseEvent<'_>| match accumulator.push(event.name, event.data)? {
                Flow::Continue => Ok(ControlFlow::Continue(())),
                Flow::Finished => Ok(ControlFlow::Break(())),
            };
        match self.parser.push(chunk, &mut sink) {
            Ok(flow) => Ok(flow.is_break()),
            Err(e) => Err(sse_error(e, self.limits.max_bytes)),
        }
    }

    /// Clean end of stream: a final event without its blank line still counts (D10).
    fn finish(&mut self) -> Result<(), StreamError> {
        let accumulator = &mut *self.accumulator;
        let mut sink =
            |event: crate::sse::SseEvent<'_>| match accumulator.push(event.name, event.data)? {
                Flow::Continue => Ok(ControlFlow::Continue(())),
                Flow::Finished => Ok(ControlFlow::Break(())),
            };
        self.parser
            .finish(&mut sink)
            .map(|_| ())
            .map_err(|e| sse_error(e, self.limits.max_bytes))
    }

    /// Identity coding: body frames go to the parser without being copied.
    async fn read_frames(
        &mut self,
        prefix: Bytes,
        mut body: UpstreamIncoming,
    ) -> Result<bool, StreamError> {
        if !prefix.is_empty() && self.feed(&prefix)? {
            return Ok(true);
        }
        let mut idle = pin!(IdleTimer::new(self.limits.idle));
        loop {
            let frame = tokio::select! {
                frame = body.frame() => frame,
                limit = poll_fn(|cx| idle.as_mut().poll_expired(cx)) => return Err(StreamError::Idle(limit)),
            };
            idle.as_mut().touch();
            match frame {
                None => return Ok(false),
                Some(Err(e)) => return Err(StreamError::Body(crate::service::error_chain(&e))),
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        if self.feed(data)? {
                            // The body's terminator usually came with `[DONE]`: reading it
                            // lets the upstream connection serve again.
                            body.drain_for_reuse();
                            return Ok(true);
                        }
                    }
                }
            }
        }
    }

    /// Compressed coding: decoded through a reused buffer. The decoder reads the body through
    /// a borrow, so that after the terminal event the body is still here to be drained for
    /// reuse, as in [`read_frames`](Self::read_frames).
    async fn read_decoded(
        &mut self,
        prefix: Bytes,
        mut body: UpstreamIncoming,
        coding: Coding,
    ) -> Result<bool, StreamError> {
        let finished = self.decode_into_parser(prefix, &mut body, coding).await;
        if let Ok(true) = finished {
            body.drain_for_reuse();
        }
        finished
    }

    async fn decode_into_parser(
        &mut self,
        prefix: Bytes,
        body: &mut UpstreamIncoming,
        coding: Coding,
    ) -> Result<bool, StreamError> {
        let prefix = futures_util::stream::iter([Ok::<_, std::io::Error>(prefix)]);
        // When the upstream's bytes last arrived: bytes that decode to nothing yet (a flush
        // block, a header) are not silence (D13), though the decoder returns no output.
        let arrived: Mutex<Option<Instant>> = Mutex::new(None);
        // `&mut` a body is a body: the decoder reads through the borrow.
        let rest = futures_util::StreamExt::map(body.into_data_stream(), |r| {
            *arrived.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            r.map_err(std::io::Error::other)
        });
        let reader = StreamReader::new(futures_util::StreamExt::chain(prefix, rest));
        // Only `deflate` reads here (its first bytes), hence the idle limit.
        let mut decoder =
            match tokio::time::timeout(self.limits.idle, open_decoder(reader, coding)).await {
                Ok(decoder) => decoder,
                Err(_) => return Err(StreamError::Idle(self.limits.idle)),
            };
        let mut buffer = vec![0u8; 16 * 1024];
        let mut idle = pin!(IdleTimer::new(self.limits.idle));
        loop {
            let read = tokio::select! {
                read = decoder.read(&mut buffer) => read,
                limit = poll_fn(|cx| {
                    if let Some(at) = arrived.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        idle.as_mut().touch_at(at);
                    }
                    idle.as_mut().poll_expired(cx)
                }) => return Err(StreamError::Idle(limit)),
            };
            idle.as_mut().touch();
            match read {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    if self.feed(&buffer[..n])? {
                        return Ok(true);
                    }
                }
                Err(e) => return Err(StreamError::Body(e.to_string())),
            }
        }
    }
}

/// A decoder for `coding` over `reader`; `Identity` reads it as it is.
async fn open_decoder<'r, R>(reader: R, coding: Coding) -> Pin<Box<dyn AsyncRead + Send + 'r>>
where
    R: tokio::io::AsyncBufRead + Unpin + Send + 'r,
{
    // A gzip body may be several members (RFC 1952 §2.2) and a zstd one several frames, as
    // a server that compresses each flush on its own sends them: all are decoded, not
    // only the first, which would end the body early and look complete.
    match coding {
        Coding::Gzip => {
            let mut decoder = GzipDecoder::new(reader);
            decoder.multiple_members(true);
            Box::pin(decoder)
        }
        // `deflate` is zlib-wrapped by the RFC, raw deflate in some servers' practice.
        Coding::Deflate => Box::pin(DeflateOrZlib::new(reader).await),
        Coding::Brotli => Box::pin(BrotliDecoder::new(reader)),
        Coding::Zstd => {
            let mut decoder = ZstdDecoder::new(reader);
            decoder.multiple_members(true);
            Box::pin(decoder)
        }
        Coding::Identity => Box::pin(reader),
    }
}

/// What the start of a body in `coding` decodes to, at most `want` bytes: as far as the
/// bytes so far go (a body cut mid-way decodes up to the cut); a coding error ends it.
pub async fn decoded_start(data: &[u8], coding: Coding, want: usize) -> Vec<u8> {
    let mut decoder = open_decoder(data, coding).await;
    let mut out = vec![0u8; want];
    let mut filled = 0;
    while filled < want {
        match decoder.read(&mut out[filled..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => filled += n,
        }
    }
    out.truncate(filled);
    out
}

/// Decodes a whole body already in memory (an upstream error read to look inside it, or
/// a relayed answer that must become plain JSON), refusing more than `cap` decoded bytes so
/// a small compressed body cannot expand without bound.
pub async fn decode_whole(data: Bytes, coding: Coding, cap: u64) -> Result<Bytes, StreamError> {
    // An empty body decodes to itself: a `429` with `content-encoding: br` and no bytes is
    // the upstream's answer, not a corrupt one (the decoders call it a truncated stream).
    if coding == Coding::Identity || data.is_empty() {
        return Ok(data);
    }
    let decoder = open_decoder(&data[..], coding).await;
    let mut out = Vec::new();
    decoder
        .take(cap.saturating_add(1))
        .read_to_end(&mut out)
        .await
        .map_err(|e| StreamError::Body(format!("cannot decode the {coding:?} body: {e}")))?;
    if out.len() as u64 > cap {
        return Err(StreamError::TooLarge(cap));
    }
    Ok(Bytes::from(out))
}

fn sse_error(error: SseError<AggregateError>, limit: u64) -> StreamError {
    match error {
        SseError::Sink(e) => StreamError::Aggregate(e),
        SseError::EventTooLarge { .. } => StreamError::TooLarge(limit),
    }
}

/// Chooses zlib or raw deflate by peeking at the first two bytes (a zlib header has
/// CMF/FLG with `(CMF*256 + FLG) % 31 == 0` and compression method 8).
enum DeflateOrZlib<R: tokio::io::AsyncBufRead> {
    Zlib(ZlibDecoder<R>),
    Raw(DeflateDecoder<R>),
}

/// The two bytes [`DeflateOrZlib`] looks at, put back in front of the rest.
type Peeked<R> = tokio::io::Chain<std::io::Cursor<Vec<u8>>, R>;

impl<R: tokio::io::AsyncBufRead + Unpin + Send> DeflateOrZlib<Peeked<R>> {
    /// Reads the first two bytes, from as many body frames as they take (a body may send
    /// one byte first); a shorter body is taken for zlib, whose decoder then reports it.
    async fn new(mut reader: R) -> Self {
        use tokio::io::AsyncBufReadExt;
        let mut head = Vec::with_capacity(2);
        // Bounded: each pass takes at least one byte, or ends.
        while head.len() < 2 {
            match reader.fill_buf().await {
                Ok(buf) if !buf.is_empty() => {
                    let take = buf.len().min(2 - head.len());
                    head.extend_from_slice(&buf[..take]);
                    reader.consume(take);
                }
                // The end, or an error: the decoder then reports a truncated stream.
                _ => break,
            }
        }
        let zlib = match head[..] {
            [cmf, flg] => cmf & 0x0f == 8 && (u16::from(cmf) * 256 + u16::from(flg)) % 31 == 0,
            _ => true,
        };
        let reader = std::io::Cursor::new(head).chain(reader);
        if zlib {
            DeflateOrZlib::Zlib(ZlibDecoder::new(reader))
        } else {
            DeflateOrZlib::Raw(DeflateDecoder::new(reader))
        }
    }
}

impl<R: tokio::io::AsyncBufRead + Unpin> AsyncRead for DeflateOrZlib<R> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            DeflateOrZlib::Zlib(d) => std::pin::Pin::new(d).poll_read(cx, buf),
            DeflateOrZlib::Raw(d) => std::pin::Pin::new(d).poll_read(cx, buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(values: &[&str], coding: &str) -> bool {
        Coding::client_accepts(values.iter().map(|v| v.as_bytes()), coding)
    }

    #[test]
    fn client_accepts_follows_its_accept_encoding() {
        assert!(accepts(&[], "identity"));
        assert!(!accepts(&[], "gzip"));
        assert!(accepts(&["gzip"], "gzip"));
        assert!(accepts(&["gzip"], "GZIP"));
        assert!(accepts(&["x-gzip, compress"], "gzip"));
        assert!(accepts(&["deflate", "br;q=1.0, GZIP;q=0.5"], "gzip"));
        assert!(!accepts(&["br;q=1.0, GZIP;q=0.5"], "zstd"));
        assert!(accepts(&["*"], "zstd"));
        assert!(!accepts(&["*, br;q=0"], "br"));
        assert!(accepts(&["*, br;q=0"], "deflate"));
        assert!(!accepts(&["gzip;q=0, *;q=0"], "gzip"));
        assert!(!accepts(&["gzip; q=0.000"], "gzip"));
        assert!(!accepts(&["compress, sdch"], "br"));
    }
}

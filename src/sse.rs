//! Server-Sent Events: upstream body bytes in, events out.
//!
//! The proxy reads `text/event-stream` bodies chunk by chunk as the network hands them over, so
//! an event, a line, a `\r\n` pair, the byte-order mark or a multi-byte UTF-8 character can be
//! cut anywhere. The parser therefore works on bytes and never validates UTF-8: the JSON parser
//! downstream does that once, on whole values.
//!
//! Almost every upstream event is one `data:` line that arrives inside one chunk, so that case
//! costs no copy: the event handed to the callback borrows from the chunk. Bytes are copied only
//! when an event outlives the chunk it started in, or when several `data:` lines must be joined;
//! both copies go to buffers that are cleared, not freed, between events.
//!
//! The rules are WHATWG HTML's "event stream interpretation"
//! (<https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation>),
//! with one deliberate difference, described on [`SseParser::finish`].

use std::fmt;
use std::ops::ControlFlow;

use memchr::{memchr, memchr2};

/// The UTF-8 byte-order mark, which the UTF-8 decode that WHATWG prescribes strips once.
const BOM: &[u8; 3] = b"\xEF\xBB\xBF";

/// One dispatched event. Borrowed: valid only during the callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// Value of the event's last `event:` field; empty when the event had none.
    pub name: &'a [u8],
    /// The event's data: every `data:` line's value joined with `\n` (WHATWG).
    pub data: &'a [u8],
}

/// Why [`SseParser::push`] or [`SseParser::finish`] stopped early.
#[derive(Debug, PartialEq, Eq)]
pub enum SseError<E> {
    /// One event (its pending, not yet dispatched bytes) grew past the limit given to `new`.
    EventTooLarge {
        /// The `max_event_bytes` the parser was built with.
        limit: usize,
    },
    /// The callback returned an error; it is handed back unchanged.
    Sink(E),
}

impl<E: fmt::Display> fmt::Display for SseError<E> {
    /// A callback error is the caller's own error, so it is shown as it is, with nothing added.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EventTooLarge { limit } => write!(
                f,
                "server-sent event larger than the limit of {limit} bytes before it was complete"
            ),
            Self::Sink(e) => e.fmt(f),
        }
    }
}

impl<E: std::error::Error> std::error::Error for SseError<E> {
    /// Transparent for [`SseError::Sink`], matching `Display`, so a cause chain does not show the
    /// callback's error twice.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::EventTooLarge { .. } => None,
            Self::Sink(e) => e.source(),
        }
    }
}

/// The callback type of [`SseParser::push`] and [`SseParser::finish`], for private helpers.
type OnEvent<'f, E> = dyn FnMut(SseEvent<'_>) -> Result<ControlFlow<()>, E> + 'f;

/// Incremental event-stream parser for one upstream body.
///
/// After `push` or `finish` returned `Break` or an error, bytes have been skipped: the caller is
/// expected to stop feeding this stream. `finish` leaves the parser ready for a new stream.
#[derive(Debug)]
pub struct SseParser {
    max_event_bytes: usize,
    /// Start of a line whose end has not arrived yet.
    line: Vec<u8>,
    /// The current event's fields, once they have to outlive the chunk they came in.
    owned: Owned,
    bom: Bom,
    /// The previous chunk ended with `\r`: a `\n` opening the next one belongs to that line end.
    skip_lf: bool,
}

#[derive(Debug, Default)]
struct Owned {
    /// WHATWG's data buffer: every data value followed by `\n`, so empty means "no data field".
    data: Vec<u8>,
    /// WHATWG's event type buffer.
    name: Vec<u8>,
}

/// Whether the stream's start has been checked for a byte-order mark yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bom {
    /// This many leading bytes (less than 3) matched the mark; they are held back until the
    /// next byte says whether they are a mark or content.
    Matching(usize),
    Done,
}

impl SseParser {
    /// `max_event_bytes` bounds the memory one event may hold while it is incomplete.
    ///
    /// The bound is checked on every line against the event's data and name so far plus that
    /// line, whether those bytes are still in the chunk or already copied, so whether a stream
    /// fails does not depend on how the network happened to cut it.
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            max_event_bytes,
            line: Vec::new(),
            owned: Owned::default(),
            bom: Bom::Matching(0),
            skip_lf: false,
        }
    }

    /// Feed the next network chunk. Calls `on_event` for each event completed by this chunk, in order.
    /// If the callback returns Ok(ControlFlow::Break(())), stop at once (remaining bytes are ignored) and return Ok(ControlFlow::Break(())).
    ///
    /// Two things are settled here before the lines, because they may straddle chunks: WHATWG's
    /// "UTF-8 decode" strips one leading byte-order mark, and "a CRLF character pair" is one
    /// line end even when the CR ends one chunk and the LF starts the next.
    pub fn push<E>(
        &mut self,
        chunk: &[u8],
        on_event: &mut dyn FnMut(SseEvent<'_>) -> Result<ControlFlow<()>, E>,
    ) -> Result<ControlFlow<()>, SseError<E>> {
        let mut chunk = chunk;
        if let Bom::Matching(matched) = self.bom {
            let expected = &BOM[matched..];
            let n = expected.len().min(chunk.len());
            if chunk[..n] == expected[..n] {
                chunk = &chunk[n..];
                if matched + n < BOM.len() {
                    self.bom = Bom::Matching(matched + n);
                    return Ok(ControlFlow::Continue(()));
                }
                self.bom = Bom::Done;
            } else {
                self.bom = Bom::Done;
                // What was held back turned out to be the start of the first line.
                if self.feed(&BOM[..matched], on_event)?.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
        }
        if self.skip_lf && !chunk.is_empty() {
            self.skip_lf = false;
            if chunk[0] == b'\n' {
                chunk = &chunk[1..];
            }
        }
        self.feed(chunk, on_event)
    }

    /// Clean end of stream: an event that has data but was not yet closed by a blank line IS dispatched
    /// (a deliberate difference from WHATWG, which drops it: servers that omit the final blank line should not cost
    /// the client its answer). A trailing incomplete line counts as a complete line here.
    ///
    /// WHATWG: "Once the end of the file is reached, any pending data must be discarded. (If the
    /// file ends in the middle of an event, before the final empty line, the incomplete event is
    /// not dispatched.)" We dispatch it instead; an event with no data field is still dropped, as a
    /// blank line would drop it. Afterwards the parser is ready for a new stream.
    pub fn finish<E>(
        &mut self,
        on_event: &mut dyn FnMut(SseEvent<'_>) -> Result<ControlFlow<()>, E>,
    ) -> Result<ControlFlow<()>, SseError<E>> {
        let result = self.finish_inner(on_event);
        self.reset();
        result
    }

    fn finish_inner<E>(
        &mut self,
        on_event: &mut OnEvent<'_, E>,
    ) -> Result<ControlFlow<()>, SseError<E>> {
        if let Bom::Matching(matched) = self.bom {
            // A stream shorter than a mark: its bytes were content.
            self.bom = Bom::Done;
            if self.feed(&BOM[..matched], on_event)?.is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        let mut event = Pending::new(&mut self.owned);
        if !self.line.is_empty()
            && event
                .copied_line(&self.line, on_event)
                .map_err(SseError::Sink)?
                .is_break()
        {
            return Ok(ControlFlow::Break(()));
        }
        event.dispatch(on_event).map_err(SseError::Sink)
    }

    fn reset(&mut self) {
        self.line.clear();
        self.owned.data.clear();
        self.owned.name.clear();
        self.bom = Bom::Matching(0);
        self.skip_lf = false;
    }

    /// Splits `bytes` into lines and applies each one.
    ///
    /// WHATWG: "Lines must be separated by either a U+000D CARRIAGE RETURN U+000A LINE FEED (CRLF)
    /// character pair, a single U+000A LINE FEED (LF) character, or a single U+000D CARRIAGE
    /// RETURN (CR) character." Lines found whole in `bytes` are applied in place, so their values
    /// can be lent to the callback; only a line the previous chunk started, and the fields of an
    /// event still open when `bytes` ends, are copied.
    fn feed<E>(
        &mut self,
        bytes: &[u8],
        on_event: &mut OnEvent<'_, E>,
    ) -> Result<ControlFlow<()>, SseError<E>> {
        let limit = self.max_event_bytes;
        let Self {
            line: carried,
            owned,
            skip_lf,
            ..
        } = self;
        let mut event = Pending::new(owned);
        let mut pos = 0;

        if !carried.is_empty() {
            let Some(end) = memchr2(b'\n', b'\r', bytes) else {
                if event.size().saturating_add(carried.len() + bytes.len()) > limit {
                    return Err(too_large(carried, event.owned, limit));
                }
                carried.extend_from_slice(bytes);
                return Ok(ControlFlow::Continue(()));
            };
            if event.size().saturating_add(carried.len() + end) > limit {
                return Err(too_large(carried, event.owned, limit));
            }
            carried.extend_from_slice(&bytes[..end]);
            pos = after_line_end(bytes, end, skip_lf);
            let flow = event.copied_line(carried, on_event);
            carried.clear();
            if flow.map_err(SseError::Sink)?.is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }

        loop {
            let rest = &bytes[pos..];
            let Some(len) = memchr2(b'\n', b'\r', rest) else {
                if event.size().saturating_add(rest.len()) > limit {
                    return Err(too_large(carried, event.owned, limit));
                }
                event.keep();
                carried.extend_from_slice(rest);
                return Ok(ControlFlow::Continue(()));
            };
            if event.size().saturating_add(len) > limit {
                return Err(too_large(carried, event.owned, limit));
            }
            let line = &rest[..len];
            pos = after_line_end(bytes, pos + len, skip_lf);
            if event
                .borrowed_line(line, on_event)
                .map_err(SseError::Sink)?
                .is_break()
            {
                return Ok(ControlFlow::Break(()));
            }
        }
    }
}

/// Forgets the half-read event, so a caller that feeds on anyway does not resume it mid-line.
fn too_large<E>(carried: &mut Vec<u8>, owned: &mut Owned, limit: usize) -> SseError<E> {
    carried.clear();
    owned.data.clear();
    owned.name.clear();
    SseError::EventTooLarge { limit }
}

/// Where the next line starts, given the line end found at `end`.
fn after_line_end(bytes: &[u8], end: usize, skip_lf: &mut bool) -> usize {
    if bytes[end] != b'\r' {
        return end + 1;
    }
    match bytes.get(end + 1) {
        Some(b'\n') => end + 2,
        Some(_) => end + 1,
        None => {
            *skip_lf = true;
            end + 1
        }
    }
}

/// What one line means to the event being built.
enum Line<'l> {
    Blank,
    Data(&'l [u8]),
    Event(&'l [u8]),
    /// Comments, `id`, `retry` and unknown fields: nothing to do, as we never reconnect.
    Ignored,
}

/// WHATWG, for each line:
/// - "If the line is empty (a blank line): Dispatch the event."
/// - "If the line starts with a U+003A COLON character (:): Ignore the line."
/// - "If the line contains a U+003A COLON character (:): Collect the characters on the line
///   before the first U+003A COLON character (:), and let field be that string. Collect the
///   characters on the line after the first U+003A COLON character (:), and let value be that
///   string. If value starts with a U+0020 SPACE character, remove it from value."
/// - "Otherwise, the string is not empty but does not contain a U+003A COLON character (:):
///   Process the field using the steps described below, using the whole line as the field
///   name, and the empty string as the field value."
///
/// Only an empty line is blank: a line of spaces is a field named by those spaces.
fn classify(line: &[u8]) -> Line<'_> {
    if line.is_empty() {
        return Line::Blank;
    }
    let (field, value) = match memchr(b':', line) {
        Some(0) => return Line::Ignored,
        Some(colon) => {
            let value = &line[colon + 1..];
            (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
        }
        None => (line, &line[line.len()..]),
    };
    match field {
        b"data" => Line::Data(value),
        b"event" => Line::Event(value),
        _ => Line::Ignored,
    }
}

/// The event being built while one chunk is parsed: fields that came whole in the chunk are
/// borrowed from it, the rest live in [`Owned`].
struct Pending<'p, 'c> {
    owned: &'p mut Owned,
    /// The event's only data line so far, still in the chunk; `owned.data` is then empty.
    data: Option<&'c [u8]>,
    /// The event's last `event:` value, still in the chunk; it overrides `owned.name`.
    name: Option<&'c [u8]>,
}

impl<'p, 'c> Pending<'p, 'c> {
    fn new(owned: &'p mut Owned) -> Self {
        Self {
            owned,
            data: None,
            name: None,
        }
    }

    /// Bytes the event would hold if it were copied now, counted the same whether borrowed or
    /// not, so the size limit does not depend on chunk boundaries.
    fn size(&self) -> usize {
        let data = self.data.map_or(self.owned.data.len(), |d| d.len() + 1);
        let name = self.name.map_or(self.owned.name.len(), <[u8]>::len);
        data + name
    }

    /// A line that lies whole in the current chunk: values may be lent out.
    fn borrowed_line<E>(
        &mut self,
        line: &'c [u8],
        on_event: &mut OnEvent<'_, E>,
    ) -> Result<ControlFlow<()>, E> {
        match classify(line) {
            Line::Blank => return self.dispatch(on_event),
            Line::Data(value) => {
                if self.data.is_none() && self.owned.data.is_empty() {
                    self.data = Some(value);
                } else {
                    self.append_data(value);
                }
            }
            Line::Event(value) => self.name = Some(value),
            Line::Ignored => {}
        }
        Ok(ControlFlow::Continue(()))
    }

    /// A line assembled from several chunks: it is about to be cleared, so values are copied.
    fn copied_line<E>(
        &mut self,
        line: &[u8],
        on_event: &mut OnEvent<'_, E>,
    ) -> Result<ControlFlow<()>, E> {
        match classify(line) {
            Line::Blank => return self.dispatch(on_event),
            Line::Data(value) => self.append_data(value),
            Line::Event(value) => {
                self.name = None;
                self.owned.name.clear();
                self.owned.name.extend_from_slice(value);
            }
            Line::Ignored => {}
        }
        Ok(ControlFlow::Continue(()))
    }

    /// WHATWG, field "data": "Append the field value to the data buffer, then append a single
    /// U+000A LINE FEED (LF) character to the data buffer."
    fn append_data(&mut self, value: &[u8]) {
        let data = &mut self.owned.data;
        if let Some(first) = self.data.take() {
            data.extend_from_slice(first);
            data.push(b'\n');
        }
        data.extend_from_slice(value);
        data.push(b'\n');
    }

    /// Copies what is still borrowed, because the chunk ends before the event does.
    fn keep(&mut self) {
        if let Some(data) = self.data.take() {
            self.owned.data.extend_from_slice(data);
            self.owned.data.push(b'\n');
        }
        if let Some(name) = self.name.take() {
            self.owned.name.clear();
            self.owned.name.extend_from_slice(name);
        }
    }

    /// WHATWG, "dispatch the event" (the steps that matter without an `EventSource`):
    /// "If the data buffer is an empty string, set the data buffer and the event type buffer to
    /// the empty string and return." "If the data buffer's last character is a U+000A LINE FEED
    /// (LF) character, then remove the last character from the data buffer." Then fire the event
    /// and "set the data buffer and the event type buffer to the empty string."
    fn dispatch<E>(&mut self, on_event: &mut OnEvent<'_, E>) -> Result<ControlFlow<()>, E> {
        let data = match self.data {
            Some(data) => data,
            None => match self.owned.data.split_last() {
                Some((_newline, data)) => data,
                None => {
                    self.clear();
                    return Ok(ControlFlow::Continue(()));
                }
            },
        };
        let name = self.name.unwrap_or(&self.owned.name);
        let flow = on_event(SseEvent { name, data });
        self.clear();
        flow
    }

    fn clear(&mut self) {
        self.data = None;
        self.name = None;
        self.owned.data.clear();
        self.owned.name.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::convert::Infallible;
    use std::path::{Path, PathBuf};

    /// Recorded upstream bodies, read at run time; they are third-party data, never copied here.
    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/captured");

    const BIG: usize = usize::MAX;

    /// (name, data) of one event, owned so it outlives the callback.
    type Ev = (Vec<u8>, Vec<u8>);

    fn ev(name: &str, data: &str) -> Ev {
        (name.as_bytes().to_vec(), data.as_bytes().to_vec())
    }

    /// Feeds `chunks` then finishes; returns the events and how it ended.
    fn run(chunks: &[&[u8]], limit: usize) -> (Vec<Ev>, Result<(), SseError<Infallible>>) {
        let mut parser = SseParser::new(limit);
        let mut events = Vec::new();
        let mut sink = |e: SseEvent<'_>| -> Result<ControlFlow<()>, Infallible> {
            events.push((e.name.to_vec(), e.data.to_vec()));
            Ok(ControlFlow::Continue(()))
        };
        for chunk in chunks {
            if let Err(e) = parser.push(chunk, &mut sink) {
                return (events, Err(e));
            }
        }
        let end = parser.finish(&mut sink).map(|_| ());
        (events, end)
    }

    fn parse(chunks: &[&[u8]]) -> Vec<Ev> {
        let (events, end) = run(chunks, BIG);
        assert_eq!(end, Ok(()));
        events
    }

    /// Events dispatched by `push` alone, before `finish`.
    fn push_only(chunks: &[&[u8]]) -> Vec<Ev> {
        let mut parser = SseParser::new(BIG);
        let mut events = Vec::new();
        for chunk in chunks {
            let flow = parser.push(chunk, &mut |e: SseEvent<'_>| {
                events.push((e.name.to_vec(), e.data.to_vec()));
                Ok::<_, Infallible>(ControlFlow::Continue(()))
            });
            assert_eq!(flow, Ok(ControlFlow::Continue(())));
        }
        events
    }

    fn split_every(bytes: &[u8], size: usize) -> Vec<&[u8]> {
        bytes.chunks(size).collect()
    }

    /// Cuts `bytes` at the given offsets (any order, duplicates give empty chunks).
    fn split_at(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(bytes.len())).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for cut in cuts {
            chunks.push(bytes[start..cut].to_vec());
            start = cut;
        }
        chunks.push(bytes[start..].to_vec());
        chunks
    }

    /// Every way of cutting `bytes` in two, and one-byte chunks, must agree with the whole feed.
    fn assert_split_invariant(bytes: &[u8], expected: &[Ev]) {
        assert_eq!(parse(&[bytes]), expected, "whole");
        for cut in 0..=bytes.len() {
            let (a, b) = bytes.split_at(cut);
            assert_eq!(parse(&[a, b]), expected, "cut at {cut}");
        }
        assert_eq!(parse(&split_every(bytes, 1)), expected, "1-byte chunks");
    }

    /// Obviously correct, slow, whole-input reading of the same rules, to check the parser
    /// against.
    fn reference(stream: &[u8]) -> Vec<Ev> {
        let stream = stream.strip_prefix(BOM).unwrap_or(stream);
        let mut lines: Vec<Vec<u8>> = Vec::new();
        let mut current = Vec::new();
        let mut i = 0;
        while i < stream.len() {
            match stream[i] {
                b'\n' => lines.push(std::mem::take(&mut current)),
                b'\r' => {
                    lines.push(std::mem::take(&mut current));
                    if stream.get(i + 1) == Some(&b'\n') {
                        i += 1;
                    }
                }
                b => current.push(b),
            }
            i += 1;
        }
        if !current.is_empty() {
            lines.push(current);
        }
        // End of stream dispatches like one more blank line (our deviation from WHATWG).
        lines.push(Vec::new());

        let mut events = Vec::new();
        let mut data: Vec<u8> = Vec::new();
        let mut name: Vec<u8> = Vec::new();
        for line in lines {
            if line.is_empty() {
                if !data.is_empty() {
                    data.pop();
                    events.push((name.clone(), data.clone()));
                }
                data.clear();
                name.clear();
                continue;
            }
            if line[0] == b':' {
                continue;
            }
            let (field, mut value) = match line.iter().position(|&b| b == b':') {
                Some(c) => (line[..c].to_vec(), line[c + 1..].to_vec()),
                None => (line.clone(), Vec::new()),
            };
            if value.first() == Some(&b' ') {
                value.remove(0);
            }
            if field == b"data" {
                data.extend_from_slice(&value);
                data.push(b'\n');
            } else if field == b"event" {
                name = value;
            }
        }
        events
    }

    // ---- line ends ----

    #[test]
    fn lf_crlf_and_cr_all_end_lines() {
        let expected = vec![ev("", "a"), ev("", "b")];
        assert_split_invariant(b"data: a\n\ndata: b\n\n", &expected);
        assert_split_invariant(b"data: a\r\n\r\ndata: b\r\n\r\n", &expected);
        assert_split_invariant(b"data: a\r\rdata: b\r\r", &expected);
        assert_split_invariant(b"data: a\r\n\rdata: b\n\r\n", &expected);
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        // Were the `\n` a second line end, it would be a blank line dispatching "a" alone.
        let events = parse(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(events, vec![ev("", "a\nb")]);
    }

    #[test]
    fn cr_at_chunk_end_then_empty_chunk_then_lf() {
        let events = parse(&[b"data: a\r", b"", b"\ndata: b\n\n"]);
        assert_eq!(events, vec![ev("", "a\nb")]);
    }

    #[test]
    fn cr_cr_is_two_line_ends_even_when_split() {
        assert_eq!(
            parse(&[b"data: a\r", b"\rdata: b\n\n"]),
            vec![ev("", "a"), ev("", "b")]
        );
    }

    // ---- byte-order mark ----

    #[test]
    fn bom_at_start_is_skipped() {
        assert_split_invariant(b"\xEF\xBB\xBFdata: a\n\n", &[ev("", "a")]);
    }

    #[test]
    fn bom_split_across_first_chunks_is_skipped() {
        let events = parse(&[b"\xEF", b"\xBB", b"\xBF", b"data: a\n\n"]);
        assert_eq!(events, vec![ev("", "a")]);
        assert_eq!(parse(&[b"\xEF\xBB", b"\xBFdata: a\n\n"]), vec![ev("", "a")]);
    }

    #[test]
    fn only_one_bom_and_only_at_the_start_is_skipped() {
        // A second mark is part of the first line, so that line's field is not "data".
        assert_eq!(parse(&[b"\xEF\xBB\xBF\xEF\xBB\xBFdata: a\n\n"]), vec![]);
        assert_eq!(
            parse(&[b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"]),
            vec![ev("", "a")]
        );
    }

    #[test]
    fn partial_bom_is_content() {
        // "\xEF\xBB" then not "\xBF": the held bytes open the first line.
        assert_eq!(
            parse(&[b"\xEF", b"\xBB", b"data: a\n\ndata: b\n\n"]),
            vec![ev("", "b")]
        );
        assert_eq!(parse(&[b"\xEF\xBB:x\ndata: a"]), vec![ev("", "a")]);
        // A stream that is only a mark prefix: the bytes are a field line, nothing to dispatch.
        assert_eq!(parse(&[b"\xEF"]), vec![]);
    }

    // ---- fields ----

    #[test]
    fn comments_are_ignored() {
        let stream = b": OPENROUTER PROCESSING\n\n:\ndata: a\n: mid-event\ndata: b\n\n";
        assert_split_invariant(stream, &[ev("", "a\nb")]);
    }

    #[test]
    fn multi_line_data_is_joined_with_lf() {
        assert_split_invariant(b"data: a\ndata: b\ndata: c\n\n", &[ev("", "a\nb\nc")]);
        assert_split_invariant(b"data\ndata\n\n", &[ev("", "\n")]);
    }

    #[test]
    fn only_one_leading_space_is_removed() {
        assert_split_invariant(
            b"data:a\n\ndata:  b \n\nevent:x\ndata:\tc\n\n",
            &[ev("", "a"), ev("", " b "), ev("x", "\tc")],
        );
    }

    #[test]
    fn field_without_colon_has_empty_value() {
        assert_split_invariant(b"data\n\n", &[ev("", "")]);
        assert_split_invariant(b"event\ndata: a\n\n", &[ev("", "a")]);
        assert_split_invariant(b"dat\ndata: a\n\n", &[ev("", "a")]);
    }

    #[test]
    fn value_may_contain_colons() {
        assert_split_invariant(b"data: a: b:c\n\n", &[ev("", "a: b:c")]);
    }

    #[test]
    fn empty_data_is_still_an_event() {
        assert_split_invariant(b"data:\n\ndata: \n\n", &[ev("", ""), ev("", "")]);
    }

    #[test]
    fn events_without_data_are_not_dispatched() {
        assert_split_invariant(b"event: ping\n\nid: 7\n\nretry: 10\n\n\n\n", &[]);
    }

    #[test]
    fn whitespace_lines_are_fields_not_blank_lines() {
        assert_split_invariant(b"data: a\n \n\t\ndata: b\n\n", &[ev("", "a\nb")]);
        assert_split_invariant(b" data: a\n\n", &[]);
    }

    #[test]
    fn unknown_fields_and_case_variants_are_ignored() {
        assert_split_invariant(b"Data: x\nDATA: y\nfoo: z\ndata: a\n\n", &[ev("", "a")]);
    }

    #[test]
    fn last_event_field_wins_and_name_resets_after_dispatch() {
        assert_split_invariant(
            b"event: a\nevent: b\ndata: 1\n\ndata: 2\n\n",
            &[ev("b", "1"), ev("", "2")],
        );
    }

    #[test]
    fn name_resets_even_when_nothing_is_dispatched() {
        assert_split_invariant(b"event: lost\n\ndata: 1\n\n", &[ev("", "1")]);
    }

    #[test]
    fn bytes_are_not_utf8_checked_and_multibyte_chars_may_be_split() {
        let stream = "data: h\u{e9}llo \u{1F600}\n\n".as_bytes();
        assert_split_invariant(stream, &[ev("", "h\u{e9}llo \u{1F600}")]);
        assert_split_invariant(b"data: \xFF\xC3\n\n", &[(vec![], b"\xFF\xC3".to_vec())]);
    }

    // ---- end of stream ----

    #[test]
    fn finish_dispatches_an_unclosed_event_but_push_does_not() {
        for stream in [
            &b"event: e\ndata: a\n"[..],
            b"event: e\ndata: a",
            b"event: e\ndata: a\r",
        ] {
            assert_eq!(push_only(&[stream]), vec![], "{stream:?}");
            assert_eq!(push_only(&split_every(stream, 1)), vec![]);
            assert_split_invariant(stream, &[ev("e", "a")]);
        }
    }

    #[test]
    fn finish_with_trailing_partial_line_completes_it() {
        assert_split_invariant(b"data: a\ndata: b", &[ev("", "a\nb")]);
    }

    #[test]
    fn finish_with_nothing_pending_dispatches_nothing() {
        assert_eq!(parse(&[]), vec![]);
        assert_eq!(parse(&[b"data: a\n\n"]), vec![ev("", "a")]);
        assert_eq!(
            parse(&[b"data: a\n\n: trailing comment"]),
            vec![ev("", "a")]
        );
        assert_eq!(
            parse(&[b"data: a\n\nevent: only-a-name\n"]),
            vec![ev("", "a")]
        );
    }

    #[test]
    fn finish_resets_for_a_new_stream() {
        let mut parser = SseParser::new(BIG);
        let mut events = Vec::new();
        let mut sink = |e: SseEvent<'_>| {
            events.push((e.name.to_vec(), e.data.to_vec()));
            Ok::<_, Infallible>(ControlFlow::Continue(()))
        };
        assert!(parser.push(b"event: x\ndata: 1\r", &mut sink).is_ok());
        assert!(parser.finish(&mut sink).is_ok());
        assert!(parser.push(b"\xEF\xBB\xBF\ndata: 2\n\n", &mut sink).is_ok());
        assert!(parser.finish(&mut sink).is_ok());
        assert_eq!(events, vec![ev("x", "1"), ev("", "2")]);
    }

    // ---- control flow and errors ----

    #[test]
    fn break_stops_mid_chunk() {
        let mut parser = SseParser::new(BIG);
        let mut seen = Vec::new();
        let flow = parser.push(b"data: 1\n\ndata: 2\n\ndata: 3\n\n", &mut |e| {
            seen.push(e.data.to_vec());
            let flow = if e.data == b"2" {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            };
            Ok::<_, Infallible>(flow)
        });
        assert_eq!(flow, Ok(ControlFlow::Break(())));
        assert_eq!(seen, vec![b"1".to_vec(), b"2".to_vec()]);
    }

    #[test]
    fn break_from_a_line_carried_over_chunks() {
        let mut parser = SseParser::new(BIG);
        let mut seen = 0;
        let mut sink = |_: SseEvent<'_>| {
            seen += 1;
            Ok::<_, Infallible>(ControlFlow::Break(()))
        };
        assert_eq!(
            parser.push(b"data: 1\n", &mut sink),
            Ok(ControlFlow::Continue(()))
        );
        assert_eq!(
            parser.push(b"\ndata: 2\n\n", &mut sink),
            Ok(ControlFlow::Break(()))
        );
        assert_eq!(seen, 1);
    }

    #[test]
    fn break_from_finish() {
        let mut parser = SseParser::new(BIG);
        let mut sink = |_: SseEvent<'_>| Ok::<_, Infallible>(ControlFlow::Break(()));
        assert_eq!(
            parser.push(b"data: 1", &mut sink),
            Ok(ControlFlow::Continue(()))
        );
        assert_eq!(parser.finish(&mut sink), Ok(ControlFlow::Break(())));
    }

    #[test]
    fn callback_error_is_returned_as_sink() {
        let mut parser = SseParser::new(BIG);
        let mut calls = 0;
        let result = parser.push(b"data: 1\n\ndata: 2\n\n", &mut |e| {
            calls += 1;
            Err(format!("bad event {:?}", e.data))
        });
        assert_eq!(result, Err(SseError::Sink("bad event [49]".to_string())));
        assert_eq!(calls, 1);

        let mut parser = SseParser::new(BIG);
        let mut failing = |_: SseEvent<'_>| Err::<ControlFlow<()>, _>(7_u8);
        assert_eq!(
            parser.push(b"data: x", &mut failing),
            Ok(ControlFlow::Continue(()))
        );
        assert_eq!(parser.finish(&mut failing), Err(SseError::Sink(7)));
    }

    #[test]
    fn limit_exceeded_by_data_carried_between_chunks() {
        let (events, end) = run(
            &[b"data: 1\n\n", b"data: ", b"0123456789", b"0123456789"],
            16,
        );
        assert_eq!(events, vec![ev("", "1")]);
        assert_eq!(end, Err(SseError::EventTooLarge { limit: 16 }));
    }

    #[test]
    fn limit_counts_data_lines_already_joined() {
        let (events, end) = run(&[b"data: 0123\ndata: 4567\ndata: 89"], 14);
        assert_eq!(events, vec![]);
        assert_eq!(end, Err(SseError::EventTooLarge { limit: 14 }));
    }

    #[test]
    fn limit_is_the_same_however_the_stream_is_cut() {
        // 6 + 10 bytes: "data: " plus the value fits a limit of 16 exactly, one less does not.
        let stream = b"data: 0123456789\n\n";
        for limit in [15, 16] {
            let whole = run(&[stream], limit);
            for size in 1..stream.len() {
                assert_eq!(
                    run(&split_every(stream, size), limit),
                    whole,
                    "limit {limit}, size {size}"
                );
            }
        }
        assert_eq!(run(&[stream], 16), (vec![ev("", "0123456789")], Ok(())));
        assert_eq!(
            run(&[stream], 15),
            (vec![], Err(SseError::EventTooLarge { limit: 15 }))
        );
    }

    #[test]
    fn limit_bounds_an_endless_comment_line() {
        let mut parser = SseParser::new(100);
        let mut sink = |_: SseEvent<'_>| Ok::<_, Infallible>(ControlFlow::Continue(()));
        let mut result = Ok(ControlFlow::Continue(()));
        for _ in 0..100 {
            result = parser.push(b": keep-alive without end ", &mut sink);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(SseError::EventTooLarge { limit: 100 }));
        assert!(
            parser.line.capacity() <= 200,
            "pending bytes grew past the limit"
        );
    }

    #[test]
    fn errors_say_what_happened() {
        let too_large = SseError::<std::io::Error>::EventTooLarge { limit: 4096 };
        assert!(too_large.to_string().contains("4096"));
        assert!(std::error::Error::source(&too_large).is_none());
        let sink = SseError::Sink(std::io::Error::other("client went away"));
        assert_eq!(sink.to_string(), "client went away");
    }

    // ---- zero copy ----

    #[test]
    fn single_line_event_inside_a_chunk_borrows_from_it() {
        let chunk: &[u8] = b"event: delta\ndata: {\"a\":1}\n\ndata: {\"b\":2}\r\n\r\n";
        let range = chunk.as_ptr_range();
        let mut parser = SseParser::new(BIG);
        let mut seen = 0;
        let flow = parser.push(chunk, &mut |e| {
            seen += 1;
            assert!(range.contains(&e.data.as_ptr()), "data was copied");
            if !e.name.is_empty() {
                assert!(range.contains(&e.name.as_ptr()), "name was copied");
            }
            Ok::<_, Infallible>(ControlFlow::Continue(()))
        });
        assert_eq!(flow, Ok(ControlFlow::Continue(())));
        assert_eq!(seen, 2);
    }

    #[test]
    fn buffers_are_reused_between_split_events() {
        let mut parser = SseParser::new(BIG);
        let mut sink = |_: SseEvent<'_>| Ok::<_, Infallible>(ControlFlow::Continue(()));
        let mut first = None;
        for _ in 0..10 {
            assert!(parser
                .push(b"data: 0123456789\ndata: abc", &mut sink)
                .is_ok());
            let now = (parser.owned.data.as_ptr(), parser.line.as_ptr());
            assert_eq!(*first.get_or_insert(now), now);
            assert!(parser.push(b"def\n\n", &mut sink).is_ok());
        }
    }

    // ---- generated streams ----

    fn value() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            6 => b'a'..=b'z',
            1 => Just(b':'),
            1 => Just(b' '),
            1 => Just(0xEF),
            1 => any::<u8>().prop_filter("not a line end", |b| *b != b'\n' && *b != b'\r'),
        ];
        proptest::collection::vec(byte, 0..12)
    }

    fn field(name: &[u8], value: Vec<u8>, space: bool) -> Vec<u8> {
        let mut line = name.to_vec();
        line.push(b':');
        if space {
            line.push(b' ');
        }
        line.extend(value);
        line
    }

    fn line() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            6 => (value(), any::<bool>()).prop_map(|(v, s)| field(b"data", v, s)),
            4 => Just(Vec::new()),
            2 => (value(), any::<bool>()).prop_map(|(v, s)| field(b"event", v, s)),
            1 => (value(), any::<bool>()).prop_map(|(v, s)| field(b"id", v, s)),
            1 => value().prop_map(|v| field(b"", v, false)),
            1 => Just(b"data".to_vec()),
            1 => Just(b"event".to_vec()),
            1 => value(),
            1 => (1usize..4).prop_map(|n| vec![b' '; n]),
            1 => value().prop_map(|v| field(b" data", v, true)),
        ]
    }

    /// Lines with random line ends, maybe a whole or partial mark in front, and maybe no end on
    /// the last line.
    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let ending = prop_oneof![Just(&b"\n"[..]), Just(&b"\r\n"[..]), Just(&b"\r"[..])];
        (
            prop_oneof![
                Just(&b""[..]),
                Just(&BOM[..]),
                Just(&BOM[..1]),
                Just(&BOM[..2])
            ],
            proptest::collection::vec((line(), ending), 0..40),
            any::<bool>(),
        )
            .prop_map(|(start, lines, end_last)| {
                let mut bytes = start.to_vec();
                let count = lines.len();
                for (i, (line, ending)) in lines.into_iter().enumerate() {
                    bytes.extend(line);
                    if end_last || i + 1 < count {
                        bytes.extend_from_slice(ending);
                    }
                }
                bytes
            })
    }

    fn as_slices(chunks: &[Vec<u8>]) -> Vec<&[u8]> {
        chunks.iter().map(Vec::as_slice).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_chunking_gives_the_same_events(
            bytes in stream(),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..24),
        ) {
            let whole = parse(&[&bytes]);
            prop_assert_eq!(&whole, &reference(&bytes));
            let cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            let chunks = split_at(&bytes, &cuts);
            prop_assert_eq!(&parse(&as_slices(&chunks)), &whole);
            prop_assert_eq!(&parse(&split_every(&bytes, 1)), &whole);
        }

        #[test]
        fn the_limit_does_not_depend_on_chunking(
            bytes in stream(),
            limit in 0usize..48,
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..24),
        ) {
            let whole = run(&[&bytes], limit);
            let cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            let chunks = split_at(&bytes, &cuts);
            prop_assert_eq!(&run(&as_slices(&chunks), limit), &whole);
            prop_assert_eq!(&run(&split_every(&bytes, 1), limit), &whole);
            if whole.1.is_ok() {
                prop_assert_eq!(&whole.0, &reference(&bytes));
            }
        }
    }

    // ---- recorded upstream streams ----

    fn sse_files(dir: &Path, found: &mut Vec<PathBuf>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .path();
            if path.is_dir() {
                sse_files(&path, found);
            } else if path.extension().is_some_and(|x| x == "sse") {
                found.push(path);
            }
        }
    }

    /// Chunk sizes from 1 to 7 in a fixed pseudo-random order (xorshift), so failures replay.
    fn random_chunks(bytes: &[u8], mut seed: u64) -> Vec<&[u8]> {
        let mut chunks = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let size = (1 + seed % 7) as usize;
            let (chunk, tail) = rest.split_at(size.min(rest.len()));
            chunks.push(chunk);
            rest = tail;
        }
        chunks
    }

    #[test]
    fn recorded_streams_parse_the_same_however_they_are_cut() {
        let dir = Path::new(FIXTURES);
        if !dir.is_dir() {
            println!("skipped: ../shared/fixtures not found (third-party fixtures are not part of this repository)");
            return;
        }
        let mut files = Vec::new();
        sse_files(dir, &mut files);
        files.sort();
        assert!(!files.is_empty(), "no .sse files in {}", dir.display());
        for path in files {
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let file = path.display();
            let whole = parse(&[&bytes]);
            assert!(!whole.is_empty(), "{file}: no events");
            assert_eq!(
                whole,
                reference(&bytes),
                "{file}: differs from the reference"
            );
            for size in 1..=7 {
                assert_eq!(
                    parse(&split_every(&bytes, size)),
                    whole,
                    "{file}: {size}-byte chunks"
                );
            }
            for seed in 1..=4 {
                assert_eq!(
                    parse(&random_chunks(&bytes, seed)),
                    whole,
                    "{file}: seed {seed}"
                );
            }
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with("chat") {
                let last = whole.last().map(|(_, data)| data.as_slice());
                assert_eq!(
                    last,
                    Some(&b"[DONE]"[..]),
                    "{file}: does not end with [DONE]"
                );
            }
            if name.starts_with("responses") {
                assert!(
                    whole
                        .iter()
                        .all(|(name, data)| !name.is_empty() && data != b"[DONE]"),
                    "{file}: a Responses event without a name, or a [DONE]"
                );
            }
        }
    }
}

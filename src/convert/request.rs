//! Request classification and the surgical body rewrite of the convert flow.
//!
//! A request on a conversion path is turned into an upstream streaming request by editing only the
//! `stream` member (and, for Chat Completions, `stream_options.include_usage`) inside the client's
//! original bytes (D3). Everything else (whitespace, string escapes, number lexemes, key order,
//! duplicate keys) reaches the upstream byte for byte, because re-serialising a parsed value would
//! silently normalise things the upstream may care about (W14).
//!
//! Validation and member location happen in one pass: serde_json walks the top-level object and
//! hands out every value as a borrowed [`RawValue`], whose text points into the input. The byte span
//! of a value is therefore its pointer offset inside the input, and no second scanner can disagree
//! with the parser about where a member starts or ends.

use std::fmt;

use http::header::CONTENT_TYPE;
use http::{HeaderMap, Method};
use serde::de::{self, DeserializeSeed, Deserializer as _, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Which OpenAI API a conversion path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST …/chat/completions`.
    ChatCompletions,
    /// `POST …/responses`.
    Responses,
}

/// Looks only at the request head and says whether the request may be converted.
///
/// Conditions (B22 steps 1–3, B17, B29):
/// - the method is exactly `POST`;
/// - the raw path (query removed, every trailing `/` trimmed) ends with `/chat/completions` or
///   `/responses`. Matching is case-sensitive on the raw, percent-encoded path, and the leading
///   slash of the suffix is required, so `/v1/xresponses` and `/v1/responses/resp_1` do not match;
/// - there is exactly one `Content-Type` header and its media type is `application/json`
///   (case-insensitive, any parameters, surrounding whitespace allowed).
///
/// Several `Content-Type` headers make the request ambiguous (RFC 9110 allows only one, and two
/// servers could pick different ones), so such a request is passed through untouched rather than
/// guessed at: passthrough is always a correct answer, a conversion based on a guess may not be.
///
/// Returns `None` when the request must be passed through untouched.
pub fn conversion_candidate(
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
) -> Option<Api> {
    if method != Method::POST {
        return None;
    }
    let api = api_for_path(path_and_query)?;
    let mut content_types = headers.get_all(CONTENT_TYPE).iter();
    let content_type = content_types.next()?;
    if content_types.next().is_some() {
        return None;
    }
    is_json_media_type(content_type.as_bytes()).then_some(api)
}

/// Maps a raw request target to the API whose suffix it ends with (B17, B29).
fn api_for_path(path_and_query: &str) -> Option<Api> {
    let path = path_and_query
        .split_once('?')
        .map_or(path_and_query, |(path, _query)| path);
    let path = path.trim_end_matches('/');
    if path.ends_with("/responses") {
        Some(Api::Responses)
    } else if path.ends_with("/chat/completions") {
        Some(Api::ChatCompletions)
    } else {
        None
    }
}

/// True when a `Content-Type` value names `application/json`, ignoring parameters.
///
/// Works on bytes so that a header with obs-text in a parameter still classifies by its media
/// type; only the type/subtype is compared, so `application/json-seq` and `text/json` are not
/// JSON here (the upstream may treat them differently, and we only rewrite what we understand).
fn is_json_media_type(value: &[u8]) -> bool {
    let media_type = value.split(|&b| b == b';').next().unwrap_or_default();
    trim_http_whitespace(media_type).eq_ignore_ascii_case(b"application/json")
}

/// Trims HTTP optional whitespace (space and horizontal tab) from both ends.
fn trim_http_whitespace(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    bytes.get(start..end).unwrap_or_default()
}

/// The body decision once the body is read.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyDecision {
    /// Convert: send `body` upstream (the original with only the stream members edited).
    Convert {
        /// The rewritten request body.
        body: Vec<u8>,
    },
    /// Forward the client's original bytes unchanged; `reason` is a short static text for the
    /// debug log.
    Passthrough {
        /// Why the request is not converted.
        reason: &'static str,
    },
}

impl BodyDecision {
    fn passthrough(reason: &'static str) -> Self {
        BodyDecision::Passthrough { reason }
    }
}

/// Decides from the body whether to convert, and builds the upstream body when converting.
///
/// D1: convert only when the body is a JSON object with a `model` key (any value, `null`
/// included, B26) and `stream` absent, `false` or `null`; any other `stream` value is the
/// upstream's to validate, so it passes through. D2: a Responses request with
/// `"background": true` (the JSON boolean only) passes through, because background mode answers
/// at once by design. Invalid UTF-8, invalid JSON (trailing garbage included), a non-object and an
/// empty body pass through. So does a top-level key (or a key directly inside a Chat
/// `stream_options` object) holding a lone surrogate escape such as `"\ud800"`: it cannot be
/// unescaped to compare names, and passthrough lets the upstream judge it.
///
/// With duplicate keys, JSON parsers keep the last occurrence, so the decision uses the last
/// `stream` / `background`; the rewrite then edits *every* `stream` (and `stream_options`)
/// occurrence so that no upstream parser, whichever occurrence it keeps, sees a non-streaming
/// request.
///
/// Rewrite (D3): an existing member's value is replaced where it stands; a missing member is
/// inserted right after the last member's value (with a leading comma), or just before the `}`
/// of an empty object. The same applies to `include_usage` inside an object `stream_options`.
/// A `stream_options` that is not an object (`null`, an array, a string…) becomes
/// `{"include_usage":true}`. Responses requests never get `stream_options`.
pub fn decide(api: Api, body: &[u8]) -> BodyDecision {
    let Ok(text) = std::str::from_utf8(body) else {
        return BodyDecision::passthrough("invalid UTF-8");
    };
    match text.bytes().find(|b| !is_json_whitespace(*b)) {
        None => return BodyDecision::passthrough("empty body"),
        Some(b'{') => {}
        Some(_) => return BodyDecision::passthrough("not a JSON object"),
    }
    // The common streaming request, decided without the full parse.
    if plainly_streaming(text) {
        return BodyDecision::passthrough("stream is not false");
    }
    decide_by_parse(api, text)
}

/// [`decide`] for a UTF-8 body that starts with `{`, by a full parse.
fn decide_by_parse(api: Api, text: &str) -> BodyDecision {
    let Ok(members) = parse_object(text, 0) else {
        return BodyDecision::passthrough("invalid JSON");
    };

    if !members.iter().any(|m| m.key == Key::Model) {
        return BodyDecision::passthrough("no model");
    }
    if let Some(stream) = last_value(text, &members, Key::Stream) {
        if stream != "false" && stream != "null" {
            return BodyDecision::passthrough("stream is not false");
        }
    }
    if api == Api::Responses && last_value(text, &members, Key::Background) == Some("true") {
        return BodyDecision::passthrough("background response");
    }

    let Some(close) = text.bytes().rposition(|b| !is_json_whitespace(b)) else {
        return BodyDecision::passthrough("invalid JSON");
    };
    let object = ObjectLayout {
        members: &members,
        close,
    };
    let mut edits = Vec::new();
    set_member(&mut edits, &object, Key::Stream, "\"stream\":true");
    if api == Api::ChatCompletions && !rewrite_stream_options(&mut edits, text, &object) {
        return BodyDecision::passthrough("stream_options not parseable");
    }
    match apply_edits(text.as_bytes(), &mut edits) {
        Some(body) => BodyDecision::Convert { body },
        None => BodyDecision::passthrough("overlapping edits"),
    }
}

/// The Chat body for the retry after an upstream refused `stream_options`: the client's
/// bytes with `stream` set to `true` and every `stream_options` member removed, the client's
/// own included (the upstream refuses the member, whatever it holds). Everything else keeps
/// its bytes. `None` when the body is not a JSON object (never the case for a body that
/// `decide` converted).
///
/// A member is cut from the end of the previous member's value to the end of its own value
/// (separator, key and value); a leading run of removed members is cut from just after `{`
/// through the comma that follows the run, so no stray comma is left either way.
pub fn without_stream_options(body: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(body).ok()?;
    let open = text.bytes().position(|b| !is_json_whitespace(b))?;
    if text.as_bytes().get(open) != Some(&b'{') {
        return None;
    }
    let members = parse_object(text, 0).ok()?;
    let close = text.bytes().rposition(|b| !is_json_whitespace(b))?;
    let object = ObjectLayout {
        members: &members,
        close,
    };
    let removed = |m: &Member| m.key == Key::StreamOptions;
    let mut edits = Vec::new();
    let leading = members.iter().take_while(|m| removed(m)).count();
    if leading == members.len() {
        // Only `stream_options` members: `decide` would not have converted (no `model`).
        return None;
    }
    if leading > 0 {
        let after_run = members[leading - 1].end;
        let comma = after_run + text.get(after_run..)?.find(',')?;
        edits.push(Edit {
            start: open + 1,
            end: comma + 1,
            comma: false,
            text: "",
        });
    }
    for (i, member) in members.iter().enumerate().skip(leading) {
        if removed(member) {
            edits.push(Edit {
                start: members[i - 1].end,
                end: member.end,
                comma: false,
                text: "",
            });
        }
    }
    set_member(&mut edits, &object, Key::Stream, "\"stream\":true");
    apply_edits(text.as_bytes(), &mut edits)
}

/// JSON insignificant whitespace (RFC 8259 §2).
fn is_json_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Whether the top-level object (the body starts with `{` after whitespace) has a `model`
/// member and its last `stream` member is neither `false` nor `null`: for valid JSON, exactly
/// the bodies [`decide`] passes through as "stream is not false", found by one scan instead
/// of a full parse. `false` whenever unsure (a key with an escape, an unexpected byte), so
/// the full parse decides those. Invalid JSON may be answered `true`; it passes through all
/// the same, only the logged reason differs.
fn plainly_streaming(text: &str) -> bool {
    let b = text.as_bytes();
    let skip_ws = |mut i: usize| {
        while b.get(i).is_some_and(|&c| is_json_whitespace(c)) {
            i += 1;
        }
        i
    };
    let Some(open) = b.iter().position(|&c| c == b'{') else {
        return false;
    };
    let (mut model, mut stream) = (false, None);
    let mut i = open + 1;
    loop {
        i = skip_ws(i);
        if b.get(i) != Some(&b'"') {
            return false;
        }
        let key_start = i + 1;
        let Some(len) = memchr::memchr2(b'"', b'\\', &b[key_start..]) else {
            return false;
        };
        let key_end = key_start + len;
        if b[key_end] != b'"' {
            return false; // an escaped key: the full parse unescapes it
        }
        i = skip_ws(key_end + 1);
        if b.get(i) != Some(&b':') {
            return false;
        }
        let value_start = skip_ws(i + 1);
        let mut depth = 0usize;
        let mut j = value_start;
        let end = loop {
            match b.get(j) {
                None => return false,
                Some(b'"') => {
                    // Skip the string, escapes included.
                    j += 1;
                    loop {
                        let Some(n) = memchr::memchr2(b'"', b'\\', &b[j..]) else {
                            return false;
                        };
                        j += n;
                        if b[j] == b'"' {
                            break;
                        }
                        j += 2;
                        if j > b.len() {
                            return false;
                        }
                    }
                }
                Some(b'{' | b'[') => depth += 1,
                Some(&c @ (b'}' | b']')) if depth == 0 => {
                    if c == b']' {
                        return false;
                    }
                    break j;
                }
                Some(b'}' | b']') => depth -= 1,
                Some(b',') if depth == 0 => break j,
                Some(_) => {}
            }
            j += 1;
        };
        let mut value_end = end;
        while value_end > value_start && is_json_whitespace(b[value_end - 1]) {
            value_end -= 1;
        }
        match &b[key_start..key_end] {
            b"model" => model = true,
            b"stream" => stream = Some(&b[value_start..value_end]),
            _ => {}
        }
        if b[end] == b'}' {
            break;
        }
        i = end + 1;
    }
    model && stream.is_some_and(|v| !v.is_empty() && v != b"false" && v != b"null")
}

/// The member names this module cares about, recognised after unescaping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Model,
    Stream,
    StreamOptions,
    Background,
    IncludeUsage,
    Other,
}

impl Key {
    fn classify(name: &str) -> Self {
        match name {
            "model" => Key::Model,
            "stream" => Key::Stream,
            "stream_options" => Key::StreamOptions,
            "background" => Key::Background,
            "include_usage" => Key::IncludeUsage,
            _ => Key::Other,
        }
    }
}

/// One object member: its classified key and the byte span of its value in the whole body.
#[derive(Debug, Clone, Copy)]
struct Member {
    key: Key,
    start: usize,
    end: usize,
}

/// An object's members plus the byte index of its closing `}` in the whole body.
struct ObjectLayout<'m> {
    members: &'m [Member],
    close: usize,
}

/// Parses `text` as exactly one JSON object (nothing but whitespace may follow) and returns its
/// members with value spans shifted by `base`, so nested objects report positions in the body.
fn parse_object(text: &str, base: usize) -> Result<Vec<Member>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let raw_members = (&mut de).deserialize_map(MembersVisitor)?;
    de.end()?;
    raw_members
        .into_iter()
        .map(|(key, value)| {
            let (start, end) = span_in(text, value.get())
                .ok_or_else(|| de::Error::custom("value does not point into the input"))?;
            Ok(Member {
                key,
                start: base + start,
                end: base + end,
            })
        })
        .collect()
}

/// Byte span of `part` inside `whole`, when `part` is a borrowed slice of it.
///
/// Borrowed `RawValue`s from `Deserializer::from_str` always are; the bounds check keeps this
/// free of `unsafe` and turns any surprise into a passthrough instead of a wrong edit.
fn span_in(whole: &str, part: &str) -> Option<(usize, usize)> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    let same = whole.get(start..end)?;
    (same.as_ptr() == part.as_ptr()).then_some((start, end))
}

/// Visits one object, collecting `(key, raw value)` pairs in document order.
struct MembersVisitor;

impl<'de> Visitor<'de> for MembersVisitor {
    type Value = Vec<(Key, &'de RawValue)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::new();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let value: &'de RawValue = map.next_value()?;
            members.push((key, value));
        }
        Ok(members)
    }
}

/// Deserializes a member name straight into a [`Key`], unescaping without allocating when the
/// name has no escapes (`"str\u0065am"` is still `stream`).
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Key, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Key, E> {
        Ok(Key::classify(name))
    }

    fn visit_bytes<E: de::Error>(self, name: &[u8]) -> Result<Key, E> {
        Ok(std::str::from_utf8(name).map_or(Key::Other, Key::classify))
    }
}

/// Raw text of the last member named `key` (the one a last-wins parser would use).
fn last_value<'t>(text: &'t str, members: &[Member], key: Key) -> Option<&'t str> {
    let member = members.iter().rev().find(|m| m.key == key)?;
    text.get(member.start..member.end)
}

/// One splice into the original bytes: replace `start..end` with `text` (an insertion when
/// `start == end`), preceded by a `,` when `comma` is set (a member appended after another).
struct Edit {
    start: usize,
    end: usize,
    comma: bool,
    text: &'static str,
}

/// Sets every member named `key` to `true`, or inserts `key_and_true` when there is none.
fn set_member(
    edits: &mut Vec<Edit>,
    object: &ObjectLayout<'_>,
    key: Key,
    key_and_true: &'static str,
) {
    let mut found = false;
    for member in object.members.iter().filter(|m| m.key == key) {
        found = true;
        edits.push(Edit {
            start: member.start,
            end: member.end,
            comma: false,
            text: "true",
        });
    }
    if !found {
        push_insertion(edits, object, key_and_true);
    }
}

/// Appends a member as the last one of an object.
///
/// Inserting right after the last value (rather than just before `}`) keeps the client's
/// whitespace before the closing brace where it was; in an empty object the member goes just
/// before the `}`, so whitespace inside `{ }` stays too.
fn push_insertion(edits: &mut Vec<Edit>, object: &ObjectLayout<'_>, member: &'static str) {
    let (at, comma) = match object.members.last() {
        Some(last) => (last.end, true),
        None => (object.close, false),
    };
    edits.push(Edit {
        start: at,
        end: at,
        comma,
        text: member,
    });
}

const STREAM_OPTIONS_MEMBER: &str = "\"stream_options\":{\"include_usage\":true}";
const INCLUDE_USAGE_ONLY: &str = "{\"include_usage\":true}";

/// Chat only: forces `stream_options.include_usage` to `true` in every `stream_options`
/// occurrence (so the upstream sends the usage chunk the aggregated answer needs, B33), keeping
/// the client's other keys. Returns `false` when an object `stream_options` cannot be walked.
fn rewrite_stream_options(edits: &mut Vec<Edit>, text: &str, object: &ObjectLayout<'_>) -> bool {
    let mut found = false;
    for member in object
        .members
        .iter()
        .filter(|m| m.key == Key::StreamOptions)
    {
        found = true;
        let Some(value) = text.get(member.start..member.end) else {
            return false;
        };
        if !value.starts_with('{') {
            edits.push(Edit {
                start: member.start,
                end: member.end,
                comma: false,
                text: INCLUDE_USAGE_ONLY,
            });
            continue;
        }
        let Ok(inner) = parse_object(value, member.start) else {
            return false;
        };
        let inner_object = ObjectLayout {
            members: &inner,
            close: member.end - 1,
        };
        set_member(
            edits,
            &inner_object,
            Key::IncludeUsage,
            "\"include_usage\":true",
        );
    }
    if !found {
        push_insertion(edits, object, STREAM_OPTIONS_MEMBER);
    }
    true
}

/// Splices the edits into `input`. Edits are ordered by position (stable, so two insertions at
/// one point keep the order they were made in); overlapping edits would be a bug and yield
/// `None` rather than a corrupt body.
fn apply_edits(input: &[u8], edits: &mut [Edit]) -> Option<Vec<u8>> {
    edits.sort_by_key(|e| e.start);
    let extra: usize = edits.iter().map(|e| e.text.len() + 1).sum();
    let mut out = Vec::with_capacity(input.len() + extra);
    let mut cursor = 0;
    for edit in edits.iter() {
        out.extend_from_slice(input.get(cursor..edit.start)?);
        if edit.comma {
            out.push(b',');
        }
        out.extend_from_slice(edit.text.as_bytes());
        cursor = edit.end;
    }
    out.extend_from_slice(input.get(cursor..)?);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn headers(content_types: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for ct in content_types {
            map.append(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        }
        map
    }

    fn candidate(path: &str) -> Option<Api> {
        conversion_candidate(&Method::POST, path, &headers(&["application/json"]))
    }

    fn convert(api: Api, body: &str) -> String {
        match decide(api, body.as_bytes()) {
            BodyDecision::Convert { body } => String::from_utf8(body).unwrap(),
            other => panic!("expected Convert for {body:?}, got {other:?}"),
        }
    }

    fn chat(body: &str) -> String {
        convert(Api::ChatCompletions, body)
    }

    fn responses(body: &str) -> String {
        convert(Api::Responses, body)
    }

    fn reason(api: Api, body: &[u8]) -> &'static str {
        match decide(api, body) {
            BodyDecision::Passthrough { reason } => reason,
            other => panic!("expected Passthrough for {body:?}, got {other:?}"),
        }
    }

    // ---- conversion_candidate: paths ----

    #[test]
    fn paths_that_match() {
        assert_eq!(
            candidate("/v1/chat/completions"),
            Some(Api::ChatCompletions)
        );
        assert_eq!(candidate("/v1/responses"), Some(Api::Responses));
        assert_eq!(candidate("/responses"), Some(Api::Responses));
        assert_eq!(candidate("/chat/completions"), Some(Api::ChatCompletions));
        assert_eq!(candidate("/v1/responses/"), Some(Api::Responses));
        assert_eq!(candidate("/v1/responses//"), Some(Api::Responses));
        assert_eq!(candidate("/v1/responses?x=1"), Some(Api::Responses));
        assert_eq!(candidate("/v1/responses/?x=1/"), Some(Api::Responses));
        assert_eq!(
            candidate("/v1/chat/completions?a=b?c"),
            Some(Api::ChatCompletions)
        );
        assert_eq!(
            candidate("/x/v1/chat/completions"),
            Some(Api::ChatCompletions)
        );
        assert_eq!(candidate("/x/v1/responses"), Some(Api::Responses));
    }

    #[test]
    fn paths_that_do_not_match() {
        for path in [
            "/v1/xresponses",
            "/v1/responses/resp_1",
            "/v1/responses/input_tokens",
            "/v1/responses/compact",
            "/v1/responses/resp_1/cancel",
            "/v1/chat/completions/chatcmpl_1",
            "/v1/chat/xcompletions",
            "/v1/completions",
            "/v1/Responses",
            "/v1/CHAT/completions",
            "/v1/responses%2F",
            "/v1/models",
            "/",
            "",
            "responses",
            "/v1/models?next=/v1/responses",
        ] {
            assert_eq!(candidate(path), None, "{path}");
        }
    }

    #[test]
    fn only_post_is_a_candidate() {
        let h = headers(&["application/json"]);
        for method in [
            Method::GET,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::HEAD,
            Method::OPTIONS,
        ] {
            assert_eq!(conversion_candidate(&method, "/v1/responses", &h), None);
        }
        let lower_post = Method::from_bytes(b"post").unwrap();
        assert_eq!(conversion_candidate(&lower_post, "/v1/responses", &h), None);
    }

    // ---- conversion_candidate: content types ----

    fn with_ct(cts: &[&str]) -> Option<Api> {
        conversion_candidate(&Method::POST, "/v1/chat/completions", &headers(cts))
    }

    #[test]
    fn json_content_types() {
        for ct in [
            "application/json",
            "application/json; charset=utf-8",
            "application/json;charset=UTF-8",
            "Application/JSON",
            "APPLICATION/JSON; Charset=\"utf-8\"",
            "  application/json  ",
            "\tapplication/json\t; charset=utf-8",
            "application/json ;",
        ] {
            assert_eq!(with_ct(&[ct]), Some(Api::ChatCompletions), "{ct:?}");
        }
    }

    #[test]
    fn non_json_content_types() {
        for ct in [
            "text/plain",
            "application/json-seq",
            "text/json",
            "application/jsonl",
            "application/x-json",
            "application/vnd.api+json",
            "application /json",
            "application/json, text/plain",
            "",
            "multipart/form-data; boundary=x",
        ] {
            assert_eq!(with_ct(&[ct]), None, "{ct:?}");
        }
    }

    #[test]
    fn missing_content_type() {
        assert_eq!(with_ct(&[]), None);
    }

    #[test]
    fn non_ascii_parameter_still_classifies_by_media_type() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_bytes(b"application/json; x=\xe9").unwrap(),
        );
        assert_eq!(
            conversion_candidate(&Method::POST, "/v1/responses", &h),
            Some(Api::Responses)
        );
    }

    #[test]
    fn two_content_type_headers_pass_through() {
        // Ambiguous framing: we do not guess which one the upstream will honour.
        assert_eq!(with_ct(&["application/json", "application/json"]), None);
        assert_eq!(with_ct(&["application/json", "text/plain"]), None);
        assert_eq!(with_ct(&["text/plain", "application/json"]), None);
    }

    // ---- decide: stream values (D1) ----

    #[test]
    fn stream_absent_false_null_convert() {
        assert_eq!(
            responses(r#"{"model":"m"}"#),
            r#"{"model":"m","stream":true}"#
        );
        assert_eq!(
            responses(r#"{"model":"m","stream":false}"#),
            r#"{"model":"m","stream":true}"#
        );
        assert_eq!(
            responses(r#"{"stream":null,"model":"m"}"#),
            r#"{"stream":true,"model":"m"}"#
        );
    }

    #[test]
    fn other_stream_values_pass_through() {
        for value in [
            "true",
            "\"true\"",
            "\"false\"",
            "\"TRUE\"",
            "1",
            "0",
            "{}",
            "[]",
            "{\"a\":1}",
            "[false]",
            "\"\"",
            "0.0",
            "-1",
        ] {
            let body = format!(r#"{{"model":"m","stream":{value}}}"#);
            for api in [Api::ChatCompletions, Api::Responses] {
                assert_eq!(
                    reason(api, body.as_bytes()),
                    "stream is not false",
                    "{body}"
                );
            }
        }
    }

    #[test]
    fn stream_with_whitespace_around_value() {
        assert_eq!(
            responses("{\"model\":\"m\",\"stream\" :\n false \n}"),
            "{\"model\":\"m\",\"stream\" :\n true \n}"
        );
        assert_eq!(
            reason(Api::Responses, b"{\"model\":\"m\",\"stream\" : true }"),
            "stream is not false"
        );
    }

    // ---- decide: model ----

    #[test]
    fn model_null_counts_as_present() {
        assert_eq!(
            responses(r#"{"model":null}"#),
            r#"{"model":null,"stream":true}"#
        );
    }

    #[test]
    fn model_any_value_counts() {
        assert_eq!(
            responses(r#"{"model":{}}"#),
            r#"{"model":{},"stream":true}"#
        );
        assert_eq!(responses(r#"{"model":0}"#), r#"{"model":0,"stream":true}"#);
    }

    #[test]
    fn missing_model_passes_through() {
        assert_eq!(reason(Api::Responses, br#"{"input":"hi"}"#), "no model");
        assert_eq!(reason(Api::Responses, b"{}"), "no model");
        assert_eq!(
            reason(Api::ChatCompletions, br#"{"metadata":{"model":"m"}}"#),
            "no model"
        );
        assert_eq!(reason(Api::Responses, br#"{"Model":"m"}"#), "no model");
    }

    #[test]
    fn escaped_model_key_counts() {
        assert_eq!(
            responses(r#"{"mod\u0065l":"m"}"#),
            r#"{"mod\u0065l":"m","stream":true}"#
        );
    }

    // ---- decide: background (D2) ----

    #[test]
    fn background_true_passes_through_on_responses_only() {
        let body = br#"{"model":"m","background":true}"#;
        assert_eq!(reason(Api::Responses, body), "background response");
        // Chat has no background mode; the key is the upstream's business.
        assert_eq!(
            chat(r#"{"model":"m","background":true}"#),
            r#"{"model":"m","background":true,"stream":true,"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn background_false_or_odd_values_convert() {
        for value in ["false", "null", "\"true\"", "1", "{}"] {
            let body = format!(r#"{{"model":"m","background":{value}}}"#);
            assert_eq!(
                responses(&body),
                format!(r#"{{"model":"m","background":{value},"stream":true}}"#)
            );
        }
    }

    #[test]
    fn background_duplicates_use_last() {
        assert_eq!(
            reason(
                Api::Responses,
                br#"{"model":"m","background":false,"background":true}"#
            ),
            "background response"
        );
        assert_eq!(
            responses(r#"{"model":"m","background":true,"background":false}"#),
            r#"{"model":"m","background":true,"background":false,"stream":true}"#
        );
    }

    #[test]
    fn stream_true_wins_over_background_reason() {
        assert_eq!(
            reason(
                Api::Responses,
                br#"{"model":"m","stream":true,"background":true}"#
            ),
            "stream is not false"
        );
    }

    // ---- decide: not an object / invalid ----

    #[test]
    fn non_objects_pass_through() {
        for body in [
            "[]",
            "[{\"model\":\"m\"}]",
            "\"x\"",
            "1",
            "null",
            "true",
            " [ ] ",
        ] {
            assert_eq!(
                reason(Api::Responses, body.as_bytes()),
                "not a JSON object",
                "{body}"
            );
        }
    }

    #[test]
    fn empty_bodies_pass_through() {
        assert_eq!(reason(Api::Responses, b""), "empty body");
        assert_eq!(reason(Api::ChatCompletions, b" \r\n\t"), "empty body");
    }

    #[test]
    fn invalid_json_passes_through() {
        for body in [
            "{",
            "{\"model\":\"m\"",
            "{\"model\":\"m\",}",
            "{\"model\" \"m\"}",
            "{model:\"m\"}",
            "{\"model\":'m'}",
            "{\"model\":\"m\"}}",
            "{\"model\":\"m\"} x",
            "{\"model\":\"m\"} {}",
            "{\"model\":\"m\"}\u{0}",
            "{\"model\":01}",
            "{\"model\":\"m\",\"x\":NaN}",
            "{\"model\":\"\\x\"}",
            "{\"model\":\"m\" /* c */}",
            "{\"model\":\"m\",\"stream\":false,}",
            "{\"model\":\"a\tb\"}",
        ] {
            for api in [Api::ChatCompletions, Api::Responses] {
                assert_eq!(reason(api, body.as_bytes()), "invalid JSON", "{body:?}");
            }
        }
    }

    #[test]
    fn bom_is_not_json() {
        assert_eq!(
            reason(Api::Responses, "\u{feff}{\"model\":\"m\"}".as_bytes()),
            "not a JSON object"
        );
    }

    #[test]
    fn invalid_utf8_passes_through() {
        assert_eq!(
            reason(Api::Responses, b"{\"model\":\"\xff\"}"),
            "invalid UTF-8"
        );
        assert_eq!(
            reason(
                Api::ChatCompletions,
                b"{\"model\":\"m\",\"x\":\"\xc3\x28\"}"
            ),
            "invalid UTF-8"
        );
    }

    #[test]
    fn empty_object_with_model_only() {
        assert_eq!(
            chat(r#"{"model":"m"}"#),
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#
        );
    }

    // ---- decide: byte preservation ----

    #[test]
    fn whitespace_and_newlines_preserved() {
        let body = "\n\t {\r\n  \"model\" : \"gpt\" ,\n  \"input\":[ 1 , 2 ]\n}\n\n";
        assert_eq!(
            responses(body),
            "\n\t {\r\n  \"model\" : \"gpt\" ,\n  \"input\":[ 1 , 2 ],\"stream\":true\n}\n\n"
        );
        assert_eq!(
            chat(body),
            "\n\t {\r\n  \"model\" : \"gpt\" ,\n  \"input\":[ 1 , 2 ],\"stream\":true,\"stream_options\":{\"include_usage\":true}\n}\n\n"
        );
    }

    #[test]
    fn escapes_preserved() {
        let body = r#"{"model":"caf\u00e9","url":"a\/b","s":"\"\\\n\ud83d\ude00","raw":"é😀","lone":"\ud800"}"#;
        let out = responses(body);
        assert_eq!(
            out,
            format!("{},\"stream\":true}}", &body[..body.len() - 1])
        );
    }

    #[test]
    fn number_lexemes_preserved() {
        let body = r#"{"model":"m","temperature":1e-7,"seed":18446744073709551615,"big":123456789012345678901234567890,"f":1.0,"e":1E+2,"z":-0,"top_p":0.10000000000000000555,"stream":false}"#;
        let out = chat(body);
        assert_eq!(
            out,
            r#"{"model":"m","temperature":1e-7,"seed":18446744073709551615,"big":123456789012345678901234567890,"f":1.0,"e":1E+2,"z":-0,"top_p":0.10000000000000000555,"stream":true,"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn nested_stream_keys_untouched() {
        let body = r#"{"model":"m","metadata":{"stream":true,"stream_options":null},"tools":[{"stream":false}]}"#;
        assert_eq!(
            chat(body),
            r#"{"model":"m","metadata":{"stream":true,"stream_options":null},"tools":[{"stream":false}],"stream":true,"stream_options":{"include_usage":true}}"#
        );
        let body = r#"{"model":"m","input":"{\"stream\":true}"}"#;
        assert_eq!(
            responses(body),
            r#"{"model":"m","input":"{\"stream\":true}","stream":true}"#
        );
    }

    #[test]
    fn escaped_stream_key_recognised() {
        assert_eq!(
            responses(r#"{"model":"m","str\u0065am":false}"#),
            r#"{"model":"m","str\u0065am":true}"#
        );
        assert_eq!(
            reason(Api::Responses, br#"{"model":"m","\u0073tream":true}"#),
            "stream is not false"
        );
        assert_eq!(
            chat(r#"{"model":"m","stream\u005foptions":{"include\u005fusage":false}}"#),
            r#"{"model":"m","stream\u005foptions":{"include\u005fusage":true},"stream":true}"#
        );
    }

    #[test]
    fn similar_keys_are_not_stream() {
        assert_eq!(
            responses(r#"{"model":"m","Stream":true,"stream ":true,"streams":1}"#),
            r#"{"model":"m","Stream":true,"stream ":true,"streams":1,"stream":true}"#
        );
    }

    #[test]
    fn duplicate_stream_keys() {
        // Last one decides; every one is rewritten.
        assert_eq!(
            responses(r#"{"stream":true,"model":"m","stream":false}"#),
            r#"{"stream":true,"model":"m","stream":true}"#
        );
        assert_eq!(
            responses(r#"{"stream":"yes","model":"m","stream":null}"#),
            r#"{"stream":true,"model":"m","stream":true}"#
        );
        assert_eq!(
            reason(
                Api::Responses,
                br#"{"stream":false,"model":"m","stream":true}"#
            ),
            "stream is not false"
        );
    }

    #[test]
    fn duplicate_other_keys_kept() {
        assert_eq!(
            responses(r#"{"model":"a","model":"b","x":1,"x":2}"#),
            r#"{"model":"a","model":"b","x":1,"x":2,"stream":true}"#
        );
    }

    #[test]
    fn existing_stream_replaced_in_place_not_moved() {
        assert_eq!(
            responses(r#"{"stream":false,"model":"m","input":"x"}"#),
            r#"{"stream":true,"model":"m","input":"x"}"#
        );
    }

    #[test]
    fn insertion_into_empty_looking_trailing_whitespace() {
        assert_eq!(
            responses("{\"model\":\"m\"   }  "),
            "{\"model\":\"m\",\"stream\":true   }  "
        );
    }

    // ---- decide: stream_options (Chat) ----

    #[test]
    fn stream_options_absent() {
        assert_eq!(
            chat(r#"{"model":"m","stream":false}"#),
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn stream_options_null_or_not_object() {
        for value in [
            "null",
            "false",
            "true",
            "1",
            "\"x\"",
            "[]",
            "[{\"include_usage\":true}]",
        ] {
            let body = format!(r#"{{"model":"m","stream_options":{value},"n":1}}"#);
            assert_eq!(
                chat(&body),
                r#"{"model":"m","stream_options":{"include_usage":true},"n":1,"stream":true}"#,
                "{value}"
            );
        }
    }

    #[test]
    fn stream_options_empty_object() {
        assert_eq!(
            chat(r#"{"model":"m","stream_options":{}}"#),
            r#"{"model":"m","stream_options":{"include_usage":true},"stream":true}"#
        );
        assert_eq!(
            chat(r#"{"model":"m","stream_options":{ }}"#),
            r#"{"model":"m","stream_options":{ "include_usage":true},"stream":true}"#
        );
    }

    #[test]
    fn stream_options_other_keys_kept() {
        assert_eq!(
            chat(r#"{"model":"m","stream_options":{"include_obfuscation":false}}"#),
            r#"{"model":"m","stream_options":{"include_obfuscation":false,"include_usage":true},"stream":true}"#
        );
        assert_eq!(
            chat("{\"model\":\"m\",\"stream_options\":{ \"x\" : {\"include_usage\":false} , \"y\":1e5 \n}}"),
            "{\"model\":\"m\",\"stream_options\":{ \"x\" : {\"include_usage\":false} , \"y\":1e5,\"include_usage\":true \n},\"stream\":true}"
        );
    }

    #[test]
    fn stream_options_include_usage_forced_true() {
        for value in ["false", "true", "null", "\"no\"", "0", "{}"] {
            let body =
                format!(r#"{{"model":"m","stream_options":{{"include_usage" : {value}, "k":2}}}}"#);
            assert_eq!(
                chat(&body),
                r#"{"model":"m","stream_options":{"include_usage" : true, "k":2},"stream":true}"#
            );
        }
    }

    #[test]
    fn stream_options_duplicates_all_rewritten() {
        assert_eq!(
            chat(
                r#"{"model":"m","stream_options":null,"stream_options":{"include_usage":false,"include_usage":false},"stream_options":{"a":1}}"#
            ),
            r#"{"model":"m","stream_options":{"include_usage":true},"stream_options":{"include_usage":true,"include_usage":true},"stream_options":{"a":1,"include_usage":true},"stream":true}"#
        );
    }

    #[test]
    fn stream_options_as_last_member_with_stream_missing() {
        assert_eq!(
            chat(r#"{"model":"m","stream_options":{"include_obfuscation":true}}"#),
            r#"{"model":"m","stream_options":{"include_obfuscation":true,"include_usage":true},"stream":true}"#
        );
        assert_eq!(
            chat(r#"{"model":"m","stream_options":{}}"#),
            r#"{"model":"m","stream_options":{"include_usage":true},"stream":true}"#
        );
        assert_eq!(
            chat(r#"{"model":"m","stream_options":7}"#),
            r#"{"model":"m","stream_options":{"include_usage":true},"stream":true}"#
        );
    }

    #[test]
    fn responses_never_gets_stream_options() {
        assert_eq!(
            responses(r#"{"model":"m"}"#),
            r#"{"model":"m","stream":true}"#
        );
        // A client's Responses stream_options (include_obfuscation) is left exactly as sent.
        assert_eq!(
            responses(r#"{"model":"m","stream_options":{"include_obfuscation":false}}"#),
            r#"{"model":"m","stream_options":{"include_obfuscation":false},"stream":true}"#
        );
        assert_eq!(
            responses(r#"{"model":"m","stream_options":null}"#),
            r#"{"model":"m","stream_options":null,"stream":true}"#
        );
    }

    #[test]
    fn the_quick_streaming_check_agrees_with_the_full_parse() {
        let streaming = [
            r#"{"model":"m","stream":true}"#,
            r#" { "stream" : 1 , "model" : null } "#,
            r#"{"model":"m","stream":false,"stream":"yes"}"#,
            r#"{"model":"m","messages":[{"content":"}\"{[","stream":false}],"stream":{"a":[1]}}"#,
            r#"{"model":"m","stream":[false]}"#,
        ];
        let not_quick = [
            r#"{"model":"m","stream":false}"#,
            r#"{"model":"m","stream":null}"#,
            r#"{"model":"m","stream":true,"stream":false}"#,
            r#"{"model":"m","messages":[{"stream":true}]}"#,
            r#"{"model":"m","x":"\"stream\":true"}"#,
            r#"{"stream":true}"#,
            r#"{"m\u006fdel":"m","stream":true}"#,
            r#"{"model":"m","str\u0065am":false,"stream":true}"#,
            r#"{}"#,
        ];
        for body in streaming {
            assert!(plainly_streaming(body), "{body}");
            for api in [Api::ChatCompletions, Api::Responses] {
                assert_eq!(
                    decide_by_parse(api, body),
                    BodyDecision::passthrough("stream is not false"),
                    "{body}"
                );
            }
        }
        for body in not_quick {
            assert!(!plainly_streaming(body), "{body}");
        }
        // An escaped key is left to the full parse, which unescapes it.
        assert_eq!(
            decide(Api::ChatCompletions, br#"{"m\u006fdel":"m","stream":true}"#),
            BodyDecision::passthrough("stream is not false")
        );
    }

    #[test]
    fn key_with_lone_surrogate_passes_through() {
        // serde_json refuses to unescape such a key into a `str`; passthrough lets the upstream judge.
        assert_eq!(
            reason(Api::Responses, br#"{"model":"m","\ud800":1}"#),
            "invalid JSON"
        );
    }

    #[test]
    fn unwalkable_stream_options_passes_through() {
        // The outer walk skips nested keys without unescaping them; the inner walk cannot.
        let body = br#"{"model":"m","stream_options":{"\ud800":1}}"#;
        assert_eq!(
            reason(Api::ChatCompletions, body),
            "stream_options not parseable"
        );
        // Responses does not look inside stream_options.
        assert_eq!(
            responses(r#"{"model":"m","stream_options":{"\ud800":1}}"#),
            r#"{"model":"m","stream_options":{"\ud800":1},"stream":true}"#
        );
    }

    #[test]
    fn deep_nesting_is_fine() {
        let depth = 1000;
        let body = format!(
            r#"{{"model":"m","x":{}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let out = responses(&body);
        assert!(out.ends_with(r#"],"stream":true}"#));
    }

    #[test]
    fn rewritten_bodies_parse_as_expected() {
        let out =
            chat(r#"{"model":"m","stream_options":{"include_usage":false,"x":[1]},"stream":null}"#);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v,
            json!({"model":"m","stream_options":{"include_usage":true,"x":[1]},"stream":true})
        );
    }

    #[test]
    fn converted_body_is_not_converted_again() {
        let out = chat(r#"{"model":"m"}"#);
        assert_eq!(
            reason(Api::ChatCompletions, out.as_bytes()),
            "stream is not false"
        );
    }

    #[test]
    fn span_in_rejects_foreign_slices() {
        let whole = String::from("abcdef");
        let other = String::from("abc");
        assert_eq!(span_in(&whole, &whole[2..4]), Some((2, 4)));
        assert_eq!(span_in(&whole, &other), None);
    }

    // ---- property test ----

    /// A rendered member: its decoded key, its raw text, and its raw value text.
    #[derive(Debug, Clone)]
    struct RawMember {
        key: String,
        text: String,
    }

    fn ws() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => Just(String::new()),
            1 => Just(" ".to_string()),
            1 => Just("\n  ".to_string()),
            1 => Just("\t".to_string()),
            1 => Just("\r\n".to_string()),
            1 => Just("  \n\t ".to_string()),
        ]
    }

    /// A string literal built from pieces that include escapes which must survive untouched.
    fn string_lit() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("a"),
            Just("Z9"),
            Just("é"),
            Just("😀"),
            Just("\\u00e9"),
            Just("\\/"),
            Just("\\n"),
            Just("\\\""),
            Just("\\\\"),
            Just("\\ud83d\\ude00"),
            Just("stream"),
            Just("{\\\"stream\\\":true}"),
            Just(" "),
        ];
        prop::collection::vec(piece, 0..5).prop_map(|p| format!("\"{}\"", p.concat()))
    }

    fn number_lit() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("0".to_string()),
            Just("-0".to_string()),
            Just("1e-7".to_string()),
            Just("1E+2".to_string()),
            Just("18446744073709551615".to_string()),
            Just("123456789012345678901234567890".to_string()),
            Just("-12.50".to_string()),
            Just("0.10000000000000000555".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:?}")),
        ]
    }

    /// Renders a key with a random subset of its ASCII characters written as `\u00XX`.
    fn key_lit(key: &'static str) -> impl Strategy<Value = (String, String)> {
        prop::collection::vec(any::<bool>(), key.len()).prop_map(move |mask| {
            let mut lit = String::from("\"");
            for (c, escape) in key.chars().zip(mask) {
                if escape && c.is_ascii_alphanumeric() {
                    lit.push_str(&format!("\\u{:04x}", c as u32));
                } else {
                    lit.push(c);
                }
            }
            lit.push('"');
            (key.to_string(), lit)
        })
    }

    fn any_key() -> impl Strategy<Value = (String, String)> {
        prop_oneof![
            3 => key_lit("model"),
            3 => key_lit("stream"),
            3 => key_lit("stream_options"),
            2 => key_lit("background"),
            1 => key_lit("include_usage"),
            1 => key_lit("metadata"),
            1 => key_lit("input"),
            1 => key_lit("Stream"),
            1 => key_lit("x"),
        ]
    }

    fn json_value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            number_lit(),
            string_lit(),
        ];
        leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                (
                    ws(),
                    prop::collection::vec((inner.clone(), ws(), ws()), 0..4),
                    ws()
                )
                    .prop_map(|(open, items, close)| {
                        let items: Vec<String> = items
                            .into_iter()
                            .map(|(v, a, b)| format!("{a}{v}{b}"))
                            .collect();
                        format!("[{open}{}{close}]", items.join(","))
                    }),
                (
                    ws(),
                    prop::collection::vec((any_key(), inner, ws(), ws()), 0..4),
                    ws()
                )
                    .prop_map(|(open, members, close)| {
                        let members: Vec<String> = members
                            .into_iter()
                            .map(|((_, k), v, a, b)| format!("{k}{a}:{b}{v}"))
                            .collect();
                        format!("{{{open}{}{close}}}", members.join(" , "))
                    }),
            ]
        })
    }

    /// Values that hit the interesting branches often.
    fn member_value() -> impl Strategy<Value = String> {
        prop_oneof![
            2 => Just("true".to_string()),
            2 => Just("false".to_string()),
            2 => Just("null".to_string()),
            1 => Just("\"true\"".to_string()),
            1 => Just("{}".to_string()),
            1 => Just("{ }".to_string()),
            1 => Just("{\"include_usage\":false}".to_string()),
            1 => Just("{\"include_obfuscation\" : false}".to_string()),
            1 => Just("{\"x\":[1e-7],\"include_usage\":true,\"include_usage\":0}".to_string()),
            1 => Just("{\"include\\u005fusage\":null, \"y\":{\"include_usage\":false}\n}".to_string()),
            4 => json_value(),
        ]
    }

    fn member() -> impl Strategy<Value = RawMember> {
        (any_key(), member_value(), ws(), ws()).prop_map(|((key, lit), value, a, b)| RawMember {
            key,
            text: format!("{lit}{a}:{b}{value}"),
        })
    }

    fn document() -> impl Strategy<Value = (Vec<RawMember>, String)> {
        (
            ws(),
            ws(),
            prop::collection::vec((member(), ws(), ws()), 0..7),
            ws(),
            ws(),
        )
            .prop_map(|(lead, open, members, close, trail)| {
                let mut text = format!("{lead}{{{open}");
                for (i, (m, a, b)) in members.iter().enumerate() {
                    if i > 0 {
                        text.push_str(&format!("{a},{b}"));
                    }
                    text.push_str(&m.text);
                }
                text.push_str(&format!("{close}}}{trail}"));
                (members.into_iter().map(|(m, _, _)| m).collect(), text)
            })
    }

    fn expected_convert(api: Api, input: &Value) -> bool {
        let Some(map) = input.as_object() else {
            return false;
        };
        let stream_ok = matches!(
            map.get("stream"),
            None | Some(Value::Null) | Some(Value::Bool(false))
        );
        let background = map.get("background") == Some(&Value::Bool(true));
        map.contains_key("model") && stream_ok && !(api == Api::Responses && background)
    }

    fn expected_output(api: Api, input: &Value) -> Value {
        let mut expected = input.clone();
        if let Some(map) = expected.as_object_mut() {
            map.insert("stream".to_string(), Value::Bool(true));
            if api == Api::ChatCompletions {
                match map.get_mut("stream_options") {
                    Some(Value::Object(options)) => {
                        options.insert("include_usage".to_string(), Value::Bool(true));
                    }
                    _ => {
                        map.insert("stream_options".to_string(), json!({"include_usage": true}));
                    }
                }
            }
        }
        expected
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn rewrite_changes_only_stream_members((members, text) in document()) {
            let input: Value = serde_json::from_str(&text)
                .map_err(|e| TestCaseError::fail(format!("generator made invalid JSON {text:?}: {e}")))?;
            for api in [Api::ChatCompletions, Api::Responses] {
                let decision = decide(api, text.as_bytes());
                let should_convert = expected_convert(api, &input);
                let BodyDecision::Convert { body } = decision else {
                    prop_assert!(!should_convert, "{api:?} should convert {text:?}: {decision:?}");
                    continue;
                };
                prop_assert!(should_convert, "{api:?} should not convert {text:?}");
                let out = String::from_utf8(body).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let parsed: Value = serde_json::from_str(&out)
                    .map_err(|e| TestCaseError::fail(format!("output {out:?} does not parse: {e}")))?;
                prop_assert_eq!(&parsed, &expected_output(api, &input), "in {:?} out {:?}", text, out);

                // Leading/trailing whitespace of the document is kept.
                let lead = text.len() - text.trim_start().len();
                let trail = text.len() - text.trim_end().len();
                prop_assert_eq!(&out[..lead], &text[..lead]);
                prop_assert_eq!(&out[out.len() - trail..], &text[text.len() - trail..]);

                // Every member that is not edited keeps its raw text, in order.
                let mut cursor = 0;
                for m in &members {
                    let edited = m.key == "stream"
                        || (api == Api::ChatCompletions && m.key == "stream_options");
                    if edited {
                        continue;
                    }
                    let found = out[cursor..].find(&m.text);
                    prop_assert!(found.is_some(), "member {:?} missing/out of order in {:?}", m.text, out);
                    cursor += found.unwrap_or_default() + m.text.len();
                }

                // Every occurrence is edited, whichever one an upstream parser keeps.
                let out_members = parse_object(&out, 0)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                for m in &out_members {
                    let value = &out[m.start..m.end];
                    match m.key {
                        Key::Stream => prop_assert_eq!(value, "true"),
                        Key::StreamOptions if api == Api::ChatCompletions => {
                            let inner = parse_object(value, 0)
                                .map_err(|e| TestCaseError::fail(e.to_string()))?;
                            let usage: Vec<&str> = inner
                                .iter()
                                .filter(|i| i.key == Key::IncludeUsage)
                                .map(|i| &value[i.start..i.end])
                                .collect();
                            prop_assert!(!usage.is_empty() && usage.iter().all(|u| *u == "true"), "{}", value);
                        }
                        _ => {}
                    }
                }

                // The output is a streaming request: classifying it again passes it through.
                prop_assert_eq!(
                    decide(api, out.as_bytes()),
                    BodyDecision::Passthrough { reason: "stream is not false" }
                );
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = decide(Api::ChatCompletions, &bytes);
            let _ = decide(Api::Responses, &bytes);
        }

        #[test]
        fn arbitrary_paths_never_panic(path in "[/a-z?%.]{0,30}") {
            let h = headers(&["application/json"]);
            let _ = conversion_candidate(&Method::POST, &path, &h);
        }
    }

    #[test]
    fn retry_body_drops_every_stream_options_member() {
        let cut = |body: &str| {
            String::from_utf8(without_stream_options(body.as_bytes()).unwrap()).unwrap()
        };
        assert_eq!(
            cut(r#"{"model":"m","messages":[]}"#),
            r#"{"model":"m","messages":[],"stream":true}"#
        );
        assert_eq!(
            cut(r#"{"model":"m","stream_options":{"include_obfuscation":false},"stream":false}"#),
            r#"{"model":"m","stream":true}"#
        );
        assert_eq!(
            cut(r#"{"model":"m", "stream_options" : {"a":1}}"#),
            r#"{"model":"m","stream":true}"#
        );
        assert_eq!(
            cut("{ \"stream_options\":null ,\n \"stream_options\":{}, \"model\":\"m\",\"n\":1e-7}"),
            "{ \"model\":\"m\",\"n\":1e-7,\"stream\":true}"
        );
        assert_eq!(
            cut(r#"{"model":"m","stream_options":{},"x":[1],"str\u0065am_options":null,"y":2}"#),
            r#"{"model":"m","x":[1],"y":2,"stream":true}"#
        );
        assert!(without_stream_options(br#"[1]"#).is_none());
        assert!(without_stream_options(br#"{"stream_options":{}}"#).is_none());
    }
}

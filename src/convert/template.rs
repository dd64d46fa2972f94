//! Recognises an event that repeats the event before it byte for byte except inside a few JSON
//! string or number tokens, so that its one changing text is taken without parsing the event.
//!
//! Upstreams stream text as a run of chunks that differ only in the text they carry (and in
//! per-chunk padding such as OpenAI's `obfuscation`, or a Responses event's `sequence_number`):
//! `{"id":"…","object":"…",…,"choices":
//! [{"index":0,"delta":{"content":" fox"},"logprobs":null,"finish_reason":null}]}`. Parsing
//! such a chunk costs serde_json about 3 k instructions; comparing it with the one before and
//! scanning the changed string costs a few hundred.
//!
//! Soundness rests on JSON's grammar: a string token can be swapped for any other valid string
//! token, and a number token for any other valid number token, without changing how the rest
//! of the document parses. So an event made of the learned event's bytes with other valid
//! tokens of the same kind in the holes parses to the same members as the learned one, except
//! for the holes' values, and it is valid JSON when those tokens are valid (D27). A string is
//! taken only when serde_json decodes it; one it would not decode (an invalid escape, a lone
//! surrogate) makes the event go through the full parse, which reports the error or, in a
//! hole whose value is dropped and never decoded, accepts it.
//! Which values may vary, and what the accumulator does with them,
//! is the accumulator's business: it learns a template only from an event whose effect,
//! applied again, would change nothing but through the text hole.

use std::borrow::Cow;
use std::ops::Range;

/// The bytes of an event, with the tokens that may differ in the next events.
#[derive(Debug, Default)]
pub(crate) struct EventTemplate {
    /// The learned event's bytes. Both vectors are reused from one learned event to the next.
    bytes: Vec<u8>,
    /// Tokens in `bytes`, in order and disjoint. Empty when nothing is learned.
    holes: Vec<Hole>,
}

#[derive(Debug)]
struct Hole {
    /// The token: a string with its quotes, or a number.
    token: Range<usize>,
    kind: HoleKind,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum HoleKind {
    /// A string whose value a matching event delivers.
    Text,
    /// A string whose value is dropped.
    DroppedString,
    /// A number whose value is dropped.
    DroppedNumber,
}

impl EventTemplate {
    /// Forgets the learned event: the next events are parsed whole.
    pub(crate) fn clear(&mut self) {
        self.holes.clear();
    }

    /// Learns `data`, whose string token at `text` carries the value later events deliver and
    /// whose string or number tokens at `ignored` may differ too. Learns nothing, and says so,
    /// when a range is not such a token in `data` or the ranges overlap.
    pub(crate) fn learn(
        &mut self,
        data: &[u8],
        text: Range<usize>,
        ignored: &[Range<usize>],
    ) -> bool {
        self.holes.clear();
        self.holes.push(Hole {
            token: text,
            kind: HoleKind::Text,
        });
        self.holes.extend(ignored.iter().map(|token| Hole {
            token: token.clone(),
            kind: match data.get(token.start) {
                Some(b'"') => HoleKind::DroppedString,
                _ => HoleKind::DroppedNumber,
            },
        }));
        self.holes.sort_by_key(|hole| hole.token.start);
        let mut end = 0;
        for hole in &self.holes {
            let is_token = hole.token.start >= end
                && data
                    .get(hole.token.start..)
                    .and_then(|from| hole.kind.scan(from))
                    .is_some_and(|(len, _)| len == hole.token.len());
            if !is_token {
                self.holes.clear();
                return false;
            }
            end = hole.token.end;
        }
        self.bytes.clear();
        self.bytes.extend_from_slice(data);
        true
    }

    /// The text hole's value when `data` is the learned event with valid tokens of each
    /// hole's kind in its holes; `None` otherwise, and when nothing is learned.
    pub(crate) fn text_of<'a>(&self, data: &'a [u8]) -> Option<Cow<'a, str>> {
        if self.holes.is_empty() {
            return None;
        }
        let mut text = None;
        let mut learned_at = 0;
        let mut at = 0;
        for hole in &self.holes {
            let same = &self.bytes[learned_at..hole.token.start];
            if !data[at..].starts_with(same) {
                return None;
            }
            at += same.len();
            let (len, value) = hole.kind.scan(&data[at..])?;
            at += len;
            if hole.kind == HoleKind::Text {
                text = value;
            }
            learned_at = hole.token.end;
        }
        if data[at..] != self.bytes[learned_at..] {
            return None;
        }
        text
    }
}

impl HoleKind {
    /// The length of the token of this kind `data` starts with, and a text hole's value.
    fn scan(self, data: &[u8]) -> Option<(usize, Option<Cow<'_, str>>)> {
        match self {
            HoleKind::Text => string_token(data).map(|(len, value)| (len, Some(value))),
            HoleKind::DroppedString => string_token(data).map(|(len, _)| (len, None)),
            HoleKind::DroppedNumber => number_token(data).map(|len| (len, None)),
        }
    }
}

/// The length of the JSON number token `data` starts with (RFC 8259:
/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`), read as far as it goes, as a
/// parser does. `None` when `data` does not start with one, or when a fraction or exponent is
/// begun and not finished (`1.`, `1e`). What follows the token is the caller's to check: a
/// learned number is followed by whitespace, `,`, `}` or `]`, which the matching event must
/// repeat, so `01` (`0`, then `1`) is no match.
fn number_token(data: &[u8]) -> Option<usize> {
    let digits = |from: usize| {
        from + data.get(from..).map_or(0, |rest| {
            rest.iter().take_while(|b| b.is_ascii_digit()).count()
        })
    };
    let mut at = usize::from(data.first() == Some(&b'-'));
    at = match data.get(at)? {
        b'0' => at + 1,
        b'1'..=b'9' => digits(at + 1),
        _ => return None,
    };
    if data.get(at) == Some(&b'.') {
        let end = digits(at + 1);
        if end == at + 1 {
            return None;
        }
        at = end;
    }
    if matches!(data.get(at), Some(b'e' | b'E')) {
        at += 1;
        if matches!(data.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        let end = digits(at);
        if end == at {
            return None;
        }
        at = end;
    }
    Some(at)
}

/// The JSON string token `data` starts with: its length and its value. `None` when `data`
/// does not start with one serde_json decodes (unterminated, a control character, invalid
/// UTF-8, a bad escape, a lone surrogate); the caller then parses the event whole.
fn string_token(data: &[u8]) -> Option<(usize, Cow<'_, str>)> {
    if data.first() != Some(&b'"') {
        return None;
    }
    let mut from = 1;
    let mut escaped = false;
    let end = loop {
        let at = from + memchr::memchr2(b'"', b'\\', data.get(from..)?)?;
        if data[at] == b'"' {
            break at;
        }
        escaped = true;
        // The escaped character is never the closing quote; `\u` digits are neither quote
        // nor backslash, so the scan resumes after the character.
        from = at + 2;
    };
    let token = &data[..=end];
    if escaped {
        // Rare in text deltas (quotes, newlines): serde_json decodes and checks the escapes.
        let value: String = serde_json::from_slice(token).ok()?;
        return Some((token.len(), Cow::Owned(value)));
    }
    let inner = &data[1..end];
    if inner.iter().any(|&b| b < 0x20) {
        return None;
    }
    let value = std::str::from_utf8(inner).ok()?;
    Some((token.len(), Cow::Borrowed(value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEARNED: &[u8] = br#"{"id":"x","delta":{"content":"The"},"pad":"abc"}"#;

    fn token(data: &[u8], needle: &str) -> Range<usize> {
        let start = data
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .unwrap();
        start..start + needle.len()
    }

    fn learned() -> EventTemplate {
        let mut template = EventTemplate::default();
        assert!(template.learn(
            LEARNED,
            token(LEARNED, r#""The""#),
            &[token(LEARNED, r#""abc""#)],
        ));
        template
    }

    #[test]
    fn the_same_shape_gives_the_text_and_ignores_the_other_holes() {
        let template = learned();
        let text = template.text_of(br#"{"id":"x","delta":{"content":" quick"},"pad":"zz"}"#);
        assert_eq!(text.as_deref(), Some(" quick"));
        assert!(matches!(text, Some(Cow::Borrowed(_))));
        let text = template.text_of(br#"{"id":"x","delta":{"content":""},"pad":""}"#);
        assert_eq!(text.as_deref(), Some(""));
        assert_eq!(template.text_of(LEARNED).as_deref(), Some("The"));
    }

    #[test]
    fn escapes_and_unicode_are_decoded() {
        let template = learned();
        let data =
            r#"{"id":"x","delta":{"content":"a \"q\" \\ \n \u00e9 \ud83d\ude00 é"},"pad":"\""}"#;
        let text = template.text_of(data.as_bytes());
        assert_eq!(text.as_deref(), Some("a \"q\" \\ \n é 😀 é"));
    }

    #[test]
    fn any_other_byte_or_an_invalid_token_is_no_match() {
        let template = learned();
        for data in [
            // Another key, another value outside the holes, more or fewer bytes.
            &br#"{"id":"y","delta":{"content":"a"},"pad":"z"}"#[..],
            br#"{"id":"x","delta":{"contents":"a"},"pad":"z"}"#,
            br#"{"id":"x","delta":{"content":"a"},"pad":"z"} "#,
            br#"{"id":"x","delta":{"content":"a"},"pad":"z""#,
            br#"{"id":"x","delta":{"content":"a"},"pad":"z"}}"#,
            br#"{"id":"x","delta":{"content":"a"}}"#,
            // Not a string where the holes are.
            br#"{"id":"x","delta":{"content":1},"pad":"z"}"#,
            br#"{"id":"x","delta":{"content":null},"pad":"z"}"#,
            br#"{"id":"x","delta":{"content":"a"},"pad":["z"]}"#,
            // Invalid strings: a control character, a bad escape, a lone surrogate, bad
            // UTF-8, unterminated.
            b"{\"id\":\"x\",\"delta\":{\"content\":\"a\nb\"},\"pad\":\"z\"}",
            br#"{"id":"x","delta":{"content":"a\qb"},"pad":"z"}"#,
            br#"{"id":"x","delta":{"content":"\ud83d"},"pad":"z"}"#,
            b"{\"id\":\"x\",\"delta\":{\"content\":\"\xff\"},\"pad\":\"z\"}",
            br#"{"id":"x","delta":{"content":"a\"#,
            br#"{"id":"x","delta":{"content":"a"#,
            b"",
        ] {
            assert_eq!(
                template.text_of(data),
                None,
                "{}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn number_holes_take_any_number_and_only_numbers() {
        let data = br#"{"type":"d","sequence_number":12,"delta":"a","n":-1.5e3}"#;
        let mut template = EventTemplate::default();
        assert!(!template.learn(data, token(data, r#""a""#), &[token(data, "12,")]));
        assert!(!template.learn(data, token(data, r#""a""#), &[token(data, "1")]));
        assert!(template.learn(
            data,
            token(data, r#""a""#),
            &[token(data, "12"), token(data, "-1.5e3")]
        ));
        for (data, text) in [
            (
                &br#"{"type":"d","sequence_number":0,"delta":"bc","n":7}"#[..],
                Some("bc"),
            ),
            (
                br#"{"type":"d","sequence_number":123456789012345678901234567890,"delta":"","n":-0.25E+10}"#,
                Some(""),
            ),
            (br#"{"type":"d","sequence_number":01,"delta":"b","n":1}"#, None),
            (br#"{"type":"d","sequence_number":1.,"delta":"b","n":1}"#, None),
            (br#"{"type":"d","sequence_number":.5,"delta":"b","n":1}"#, None),
            (br#"{"type":"d","sequence_number":-,"delta":"b","n":1}"#, None),
            (br#"{"type":"d","sequence_number":1e,"delta":"b","n":1}"#, None),
            (br#"{"type":"d","sequence_number":1e+,"delta":"b","n":1}"#, None),
            (br#"{"type":"d","sequence_number":+1,"delta":"b","n":1}"#, None),
            (br#"{"type":"d","sequence_number":"1","delta":"b","n":1}"#, None),
            (br#"{"type":"d","sequence_number":null,"delta":"b","n":1}"#, None),
            (br#"{"type":"d","sequence_number":1,"delta":"b","n":1"#, None),
            (br#"{"type":"d","sequence_number":1,"delta":"b","n":1}x"#, None),
        ] {
            assert_eq!(
                template.text_of(data).as_deref(),
                text,
                "{}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn nothing_is_learned_from_ranges_that_are_not_string_tokens() {
        let mut template = EventTemplate::default();
        let id = token(LEARNED, r#""x""#);
        for (text, ignored) in [
            (token(LEARNED, r#"{"content""#), vec![]),
            (token(LEARNED, r#""The"}"#), vec![]),
            (id.clone(), vec![id.clone()]),
            (
                id.clone(),
                vec![Range {
                    start: 0,
                    end: LEARNED.len() + 1,
                }],
            ),
        ] {
            assert!(!template.learn(LEARNED, text, &ignored));
            assert_eq!(template.text_of(LEARNED), None);
        }
        assert!(template.learn(LEARNED, id, &[]));
        assert_eq!(template.text_of(LEARNED).as_deref(), Some("x"));
        template.clear();
        assert_eq!(template.text_of(LEARNED), None);
    }
}

//! Recognises an event that repeats the event before it byte for byte except inside a few JSON
//! string tokens, so that its one changing value is taken without parsing the event.
//!
//! Upstreams stream text as a run of chunks that differ only in the text they carry (and in
//! per-chunk padding such as OpenAI's `obfuscation`): `{"id":"…","object":"…",…,"choices":
//! [{"index":0,"delta":{"content":" fox"},"logprobs":null,"finish_reason":null}]}`. Parsing
//! such a chunk costs serde_json about 3 k instructions; comparing it with the one before and
//! scanning the changed string costs a few hundred.
//!
//! Soundness rests on JSON's grammar: a string token can be swapped for any other valid string
//! token without changing how the rest of the document parses. So an event made of the learned
//! event's bytes with other valid string tokens in the holes parses to the same members as the
//! learned one, except for the holes' values, and it is valid JSON when those tokens are valid
//! strings (D27). A token is taken only when serde_json decodes it; one it would not decode
//! (an invalid escape, a lone surrogate) makes the event go through the full parse, which
//! reports the error or, in a hole whose value is dropped and never decoded, accepts it.
//! Which values may vary, and what the accumulator does with them,
//! is the accumulator's business: it learns a template only from an event whose effect,
//! applied again, would change nothing but through the text hole.

use std::borrow::Cow;
use std::ops::Range;

/// The bytes of an event, with the string tokens that may differ in the next events.
#[derive(Default)]
pub(crate) struct EventTemplate {
    /// The learned event's bytes. Both vectors are reused from one learned event to the next.
    bytes: Vec<u8>,
    /// String tokens in `bytes`, in order and disjoint. Empty when nothing is learned.
    holes: Vec<Hole>,
}

struct Hole {
    /// The token, quotes included.
    token: Range<usize>,
    /// Its value is what a matching event delivers; the others' values are dropped.
    text: bool,
}

impl EventTemplate {
    /// Forgets the learned event: the next events are parsed whole.
    pub(crate) fn clear(&mut self) {
        self.holes.clear();
    }

    /// Learns `data`, whose string token at `text` carries the value later events deliver and
    /// whose string tokens at `ignored` may differ too. Learns nothing, and says so, when a
    /// range is not a string token in `data` or the ranges overlap.
    pub(crate) fn learn(
        &mut self,
        data: &[u8],
        text: Range<usize>,
        ignored: &[Range<usize>],
    ) -> bool {
        self.holes.clear();
        self.holes.push(Hole {
            token: text,
            text: true,
        });
        self.holes.extend(ignored.iter().map(|token| Hole {
            token: token.clone(),
            text: false,
        }));
        self.holes.sort_by_key(|hole| hole.token.start);
        let mut end = 0;
        for hole in &self.holes {
            let is_token = hole.token.start >= end
                && data
                    .get(hole.token.clone())
                    .and_then(string_token)
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

    /// The text hole's value when `data` is the learned event with valid string tokens in
    /// its holes; `None` otherwise, and when nothing is learned.
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
            let (len, value) = string_token(&data[at..])?;
            at += len;
            if hole.text {
                text = Some(value);
            }
            learned_at = hole.token.end;
        }
        if data[at..] != self.bytes[learned_at..] {
            return None;
        }
        text
    }
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

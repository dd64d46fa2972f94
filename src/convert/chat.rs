//! Chat Completions stream accumulator: turns the `chat.completion.chunk` events of an upstream
//! SSE stream into the one non-streaming `chat.completion` body the client asked for.
//!
//! # Rules (see `shared/spec`: decisions D6, D7, D10, D11, D25–D27; reference B43–B54; semantics §2.6)
//!
//! * `data: [DONE]` ends the stream. Empty data is skipped (D27); any other data must be JSON
//!   (D27: a corrupt stream is never answered with a partial body).
//! * An object with a truthy top-level `error` is an in-stream error (D11), never a 200.
//! * A chunk is aggregated when it has a `choices` array, whatever its `object` (D26), or when
//!   its `object` is `chat.completion.chunk` (B45). Anything else (`{}` keep-alives) is ignored.
//! * Top-level fields and choice extras keep their last non-null value (D7, D25); at the top
//!   level an empty string or `0` never replaces a real value (Azure's prompt-filter chunk, D26).
//!   A key that was only ever null is left out, except `system_fingerprint` (null by default,
//!   as in the SDK's snapshot and the expected bodies).
//! * Deltas merge by D6: identity keys (`role`, `id`, `type`, `index`, `name`, `call_id`) are set
//!   once, strings concatenate, numbers are replaced, arrays of objects with `index` merge by the
//!   index *value*, other arrays append, `null` never erases.
//! * The body has the non-streaming shape (D7): `content`/`refusal` null when never streamed,
//!   `annotations` `[]`, `tool_calls` only when non-empty and without `index`, `logprobs` and
//!   `finish_reason` always present, no `obfuscation`.
//!
//! # Performance
//!
//! Each event is parsed once by serde_json into small borrowed structures: the members the
//! accumulator does not need yet are captured as `&RawValue` (validated, not allocated), strings
//! without escapes are borrowed from the event bytes. Text is appended to owned `String`s,
//! logprob entries are moved into a `Vec`, repeated top-level values (`id`, `model`, `created`,
//! …) are compared byte-wise and not re-allocated. Streams repeat the members before `choices`
//! byte for byte in every chunk: an event that starts with the same ones as the chunk before is
//! parsed without them (`SharedPrefix`). A chunk that repeats the last one parsed byte for
//! byte but for its text (and `obfuscation`) is not parsed at all: its text is appended where
//! the last one's went (`Repeat`, `EventTemplate`); most chunks of a text or tool-argument
//! stream are such repeats. A message's members are found by a scan, not a hash.
//! [`ChatAccumulator::finish`] writes the body member by member into one buffer, without
//! building a map of it first; captured strings without escapes are copied as they are.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::outcome::{
    parse_event_data, status_for_error_code, Aggregate, AggregateError, Flow, Terminal, TokenUsage,
    UpstreamStreamError,
};
use super::template::EventTemplate;

/// Aggregates one Chat Completions stream. Feed every SSE event to [`push`](Self::push) until it
/// returns [`Flow::Finished`] (or the stream ends cleanly), then call [`finish`](Self::finish).
#[derive(Default)]
pub struct ChatAccumulator {
    /// Top-level fields other than `choices`, `object`, `obfuscation` and `error`.
    top: LastNonNull,
    /// Choices keyed by the value of their `index` (B49), so output is sorted by index and
    /// out-of-order or interleaved choices (n > 1) land in the right place.
    choices: BTreeMap<u64, ChoiceState>,
    /// How many chunks were aggregated; `[DONE]` without any is not an answer.
    chunks: u64,
    /// `[DONE]` was seen.
    done: bool,
    /// The leading members the last chunk shares with the next ones, skipped when they repeat.
    prefix: SharedPrefix,
    /// The last chunk parsed, when the chunks that repeat it with other text need no parse.
    repeat: Repeat,
    /// Tests compare the accumulator with and without its shortcuts (the shared prefix and
    /// the templates).
    #[cfg(test)]
    parse_every_chunk_whole: bool,
}

/// The top-level members a chunk starts with, up to the last one before `choices`
/// (`{"id":…,"object":…,"created":…,"model":…,"system_fingerprint":…,`). Streams repeat them
/// byte for byte in every chunk, and they are most of a text chunk's bytes.
///
/// When an event starts with exactly these bytes, only `{` and the rest of it are parsed. That
/// is sound: the skipped bytes were parsed in this very position before (so they are valid
/// here too, D27), and applying their members again would change nothing, since keeping the
/// last non-null value is idempotent. That holds only while no other member of a chunk
/// repeats one of their keys, so a chunk with such a repeat clears the prefix.
#[derive(Default)]
struct SharedPrefix {
    /// From `{` through the comma after the last member before `choices`; empty when the
    /// next chunk must be parsed whole.
    bytes: Vec<u8>,
    /// The keys of the fields in `bytes`.
    keys: Vec<String>,
    /// `bytes` hold `"object":"chat.completion.chunk"`.
    chunk_object: bool,
    /// `{` followed by the rest of the event being parsed; reused.
    scratch: String,
}

impl ChatAccumulator {
    /// An accumulator that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// One SSE event: `name` is the `event:` field (empty if none; Chat ignores it, B43), `data`
    /// the event's data bytes.
    pub fn push(&mut self, name: &[u8], data: &[u8]) -> Result<Flow, AggregateError> {
        let _ = name;
        if self.done {
            // The caller stops at `Finished` (B42); anything after it is not part of the answer.
            return Ok(Flow::Finished);
        }
        let trimmed = data.trim_ascii();
        if trimmed.is_empty() {
            return Ok(Flow::Continue);
        }
        if trimmed == b"[DONE]" {
            self.done = true;
            return Ok(Flow::Finished);
        }
        // From here on the untrimmed bytes, as the SDK's `json.loads` reads them: `trim_ascii`
        // also strips form feeds, which JSON does not count as whitespace (D27).
        if let Some(text) = self.repeat.template.text_of(data) {
            if self.repeat.append(&mut self.choices, &text) {
                self.chunks += 1;
                return Ok(Flow::Continue);
            }
        }
        // Learned again below when this chunk qualifies as a template.
        self.repeat.template.clear();
        if let Some(flow) = self.push_after_prefix(data)? {
            return Ok(flow);
        }
        let chunk = parse_event_data::<ChunkDe<'_>>(data).map_err(|e| {
            // Valid JSON of the wrong shape (not an object, `choices` not an array, …) is
            // malformed; anything else is a corrupt stream.
            if e.is_data() {
                AggregateError::Malformed(e.to_string())
            } else {
                AggregateError::InvalidJson(e)
            }
        })?;
        let prefix = SharedPrefix::of(data, &chunk);
        let candidate = RepeatCandidate::of(&chunk, data, 0);
        let counted = self.apply_chunk(chunk, false)?;
        if counted {
            let scratch = std::mem::take(&mut self.prefix.scratch);
            self.prefix = prefix;
            self.prefix.scratch = scratch;
            self.learn(data, candidate);
        }
        Ok(Flow::Continue)
    }

    /// Parses only what follows the shared prefix when `data` starts with it; `None` when the
    /// event must be parsed whole (no prefix, another start, or a parse error, which the
    /// whole parse then reports with its position in the event).
    fn push_after_prefix(&mut self, data: &[u8]) -> Result<Option<Flow>, AggregateError> {
        let skip = self.prefix.bytes.len();
        if skip == 0 || !data.starts_with(&self.prefix.bytes) {
            return Ok(None);
        }
        #[cfg(test)]
        if self.parse_every_chunk_whole {
            return Ok(None);
        }
        // The prefix ends with an ASCII comma, so the rest is UTF-8 if the event is. A member
        // must follow that comma (`{"id":"x",}` is not JSON, though `{}` is).
        let Ok(rest) = std::str::from_utf8(&data[skip..]) else {
            return Ok(None);
        };
        if !rest
            .trim_start_matches([' ', '\t', '\n', '\r'])
            .starts_with('"')
        {
            return Ok(None);
        }
        let mut scratch = std::mem::take(&mut self.prefix.scratch);
        scratch.clear();
        scratch.push('{');
        scratch.push_str(rest);
        let applied = match serde_json::from_str::<ChunkDe<'_>>(&scratch) {
            Ok(chunk) => {
                let repeats = chunk
                    .fields
                    .iter()
                    .any(|(key, ..)| self.prefix.keys.iter().any(|k| k == key.as_str()));
                // `scratch` is `{` and what follows the prefix in `data`.
                let candidate = RepeatCandidate::of(&chunk, scratch.as_bytes(), skip - 1);
                let applied = self.apply_chunk(chunk, true);
                if repeats {
                    self.prefix.bytes.clear();
                }
                if let Ok(true) = applied {
                    self.learn(data, candidate);
                }
                Some(applied)
            }
            Err(_) => None,
        };
        self.prefix.scratch = scratch;
        match applied {
            Some(applied) => applied.map(|_| Some(Flow::Continue)),
            None => Ok(None),
        }
    }

    /// Learns `data`, a chunk just applied, as the template of the chunks that repeat it with
    /// other text, when `candidate` found its one text and the text's slot is a string.
    fn learn(&mut self, data: &[u8], candidate: Option<RepeatCandidate<'_>>) {
        #[cfg(test)]
        if self.parse_every_chunk_whole {
            return;
        }
        let Some(candidate) = candidate else {
            return;
        };
        let Some(state) = self.choices.get(&candidate.choice) else {
            return;
        };
        let choice = candidate.choice;
        let target = match &candidate.goes_to {
            GoesTo::Member(key) => state
                .message
                .0
                .iter()
                .position(|(k, _)| k == key)
                .map(|position| TextTarget::Member { choice, position }),
            GoesTo::ToolArguments => state
                .tool_calls
                .last
                .map(|call| TextTarget::ToolArguments { choice, call }),
        };
        let Some(target) = target else {
            return;
        };
        if text_slot(&mut self.choices, target).is_some()
            && self
                .repeat
                .template
                .learn(data, candidate.text, &candidate.padding)
        {
            self.repeat.target = Some(target);
        }
    }

    /// Applies a parsed chunk; `false` when it was not one to aggregate (B45, D26).
    /// `after_prefix`: the chunk was parsed without the shared prefix.
    fn apply_chunk(
        &mut self,
        chunk: ChunkDe<'_>,
        after_prefix: bool,
    ) -> Result<bool, AggregateError> {
        if let Some(error) = chunk.error {
            let error: Value = sub(error).map_err(AggregateError::InvalidJson)?;
            if truthy(&error) {
                return Err(AggregateError::Upstream(Box::new(upstream_error(error))));
            }
        }
        // The last `object` decides; the prefix's counts when the rest has none.
        let is_chunk_object = if after_prefix && chunk.object.is_none() {
            self.prefix.chunk_object
        } else {
            chunk.is_chunk_object
        };
        if chunk.choices.is_none() && !is_chunk_object {
            return Ok(false);
        }
        self.chunks += 1;
        for (key, value, after_choices) in chunk.fields {
            self.top.set(key, value, true, after_choices);
        }
        for choice in chunk.choices.into_iter().flatten() {
            self.apply_choice(choice)
                .map_err(AggregateError::InvalidJson)?;
        }
        Ok(true)
    }

    /// Builds the body. Called after `push` returned [`Flow::Finished`], or at a clean end of
    /// the upstream stream (D10: accepted without `[DONE]` only when every choice finished).
    pub fn finish(self) -> Result<Aggregate, AggregateError> {
        let terminal = if self.done {
            if self.chunks == 0 {
                return Err(AggregateError::Truncated("any chunk"));
            }
            if self.choices.is_empty() {
                return Err(AggregateError::Malformed(
                    "the stream ended without any choice".to_owned(),
                ));
            }
            Terminal::Done
        } else if !self.choices.is_empty()
            && self.choices.values().all(|c| c.finish_reason.is_some())
        {
            Terminal::EndOfStream
        } else {
            return Err(AggregateError::Truncated("data: [DONE]"));
        };

        let mut id = None;
        let mut created = None;
        let mut model = None;
        let mut usage = None;
        let mut fingerprint = None;
        let mut before = Vec::new();
        let mut after = Vec::new();
        for (key, raw, after_choices) in &self.top.entries {
            match key.as_str() {
                "id" => id = Some(&**raw),
                "created" => created = Some(&**raw),
                "model" => model = Some(&**raw),
                "usage" => usage = Some(sub::<Value>(raw).map_err(AggregateError::InvalidJson)?),
                "system_fingerprint" => fingerprint = Some(&**raw),
                _ if *after_choices => after.push((key.as_str(), &**raw)),
                _ => before.push((key.as_str(), &**raw)),
            }
        }
        let token_usage = usage.as_ref().and_then(token_usage);

        // Key order mimics OpenAI's non-streaming body; keys a provider put after `choices`
        // (e.g. `moderation`) stay after it. Every key is written once: the top-level keys are
        // distinct, and none of them is `object` or `choices`.
        let estimate = self
            .top
            .entries
            .iter()
            .map(|(key, raw, _)| key.len() + raw.get().len() + 4)
            .sum::<usize>()
            + self
                .choices
                .values()
                .map(ChoiceState::size_hint)
                .sum::<usize>()
            + 64;
        let mut out = Vec::with_capacity(estimate);
        let written = (|| {
            let mut body = ObjectWriter::new(&mut out);
            if let Some(raw) = id {
                body.raw("id", raw)?;
            }
            body.value("object", "chat.completion")?;
            if let Some(raw) = created {
                body.raw("created", raw)?;
            }
            if let Some(raw) = model {
                body.raw("model", raw)?;
            }
            for (key, raw) in before {
                body.raw(key, raw)?;
            }
            let list = body.key("choices")?;
            list.push(b'[');
            for (n, (index, choice)) in self.choices.into_iter().enumerate() {
                if n > 0 {
                    list.push(b',');
                }
                choice.write(index, list)?;
            }
            list.push(b']');
            if let Some(usage) = &usage {
                body.value("usage", usage)?;
            }
            // The SDK's snapshot always has `system_fingerprint` (null by default), and so do
            // the expected bodies.
            match fingerprint {
                Some(raw) => body.raw("system_fingerprint", raw)?,
                None => body.value("system_fingerprint", &Value::Null)?,
            }
            for (key, raw) in after {
                body.raw(key, raw)?;
            }
            body.end();
            Ok::<_, serde_json::Error>(())
        })();
        written.map_err(AggregateError::InvalidJson)?;
        let body = out;
        Ok(Aggregate {
            body,
            terminal,
            usage: token_usage,
        })
    }

    fn apply_choice(&mut self, choice: ChoiceDe<'_>) -> Result<(), serde_json::Error> {
        // B49: a choice without a usable integer index cannot be placed, so it is dropped.
        let Some(index) = choice.index.and_then(parse_index) else {
            return Ok(());
        };
        let state = self.choices.entry(index).or_default();
        if let Some(delta) = choice.delta {
            for (key, value) in delta.0 {
                if key.0 == "tool_calls" {
                    state.tool_calls.apply(value)?;
                } else {
                    merge_member(&mut state.message, key, value)?;
                }
            }
        }
        if let Some(reason) = choice.finish_reason {
            // Last truthy value: the usage chunk or another choice's chunk never resets it.
            let s = reason.get();
            let changed = state.finish_reason.as_ref().map(|r| r.get()) != Some(s);
            if changed && !matches!(s, "null" | "\"\"" | "false") {
                state.finish_reason = Some(reason.to_owned());
            }
        }
        if let Some(logprobs) = choice.logprobs {
            state
                .logprobs
                .get_or_insert_with(Logprobs::default)
                .apply(logprobs);
        }
        for (key, value) in choice.extras {
            state.extras.set(key, value, false, false);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Chunks that repeat the one before with other text
// ---------------------------------------------------------------------------------------------

/// A text stream is a run of chunks equal byte for byte but for the text they carry (and
/// `obfuscation` padding). Such a chunk, applied again, would change nothing but by appending
/// its text: every other member of it keeps its last value, is set once, or is replaced by
/// the same value. So a chunk that matches the template of the last one parsed needs no
/// parse: its text is appended where the learned chunk's went.
#[derive(Default)]
struct Repeat {
    /// Empty unless the last chunk parsed was learned.
    template: EventTemplate,
    /// Where the learned chunk's text went; `None` only before anything is learned.
    target: Option<TextTarget>,
    /// Chunks taken through the template.
    #[cfg(test)]
    appended: u64,
}

#[derive(Clone, Copy)]
enum TextTarget {
    /// A member of a choice's message (`content`, `refusal`, `reasoning_content`, …), by its
    /// position in the [`MemberList`].
    Member { choice: u64, position: usize },
    /// `function.arguments` of a tool call, by its position in [`ToolCalls::calls`].
    ToolArguments { choice: u64, call: usize },
}

impl Repeat {
    /// Appends a repeated chunk's text; `false` when the target is gone (it never is: the
    /// state only changes through chunks parsed whole, which learn a template or clear it).
    fn append(&mut self, choices: &mut BTreeMap<u64, ChoiceState>, text: &str) -> bool {
        let Some(acc) = self.target.and_then(|target| text_slot(choices, target)) else {
            return false;
        };
        acc.push_str(text);
        #[cfg(test)]
        {
            self.appended += 1;
        }
        true
    }
}

/// The accumulated text `target` names, while it is a string (a slot of another type keeps
/// what it has, D6, so a text never goes there). Learning and appending both look it up here,
/// so a learned target is one the append finds.
fn text_slot(choices: &mut BTreeMap<u64, ChoiceState>, target: TextTarget) -> Option<&mut String> {
    let slot = match target {
        TextTarget::Member { choice, position } => choices
            .get_mut(&choice)?
            .message
            .0
            .get_mut(position)
            .map(|(_, value)| value),
        TextTarget::ToolArguments { choice, call } => choices
            .get_mut(&choice)?
            .tool_calls
            .calls
            .get_mut(call)?
            .fields
            .get_mut("function")?
            .get_mut("arguments"),
    };
    match slot {
        Some(Value::String(acc)) => Some(acc),
        _ => None,
    }
}

/// Where a parsed chunk's one appended text lies and where it goes, when the chunk qualifies
/// as a template: one choice without logprobs whose delta has exactly one text (a string
/// member other than the identity keys, or the `arguments` of a single tool-call fragment
/// made of an `index` and a `function` with only `arguments`) and otherwise only nulls,
/// identity keys, numbers and booleans. The choice's other members and the top-level ones
/// may be anything: each keeps its last value, so applying it again changes nothing.
struct RepeatCandidate<'a> {
    choice: u64,
    goes_to: GoesTo<'a>,
    /// The text's string token in the event's data.
    text: std::ops::Range<usize>,
    /// The `obfuscation` string tokens in the event's data.
    padding: Vec<std::ops::Range<usize>>,
}

enum GoesTo<'a> {
    Member(Cow<'a, str>),
    ToolArguments,
}

impl<'a> RepeatCandidate<'a> {
    /// `parsed`: the text `chunk` was parsed from, which starts `shift` bytes into the event's
    /// data.
    fn of(chunk: &ChunkDe<'a>, parsed: &[u8], shift: usize) -> Option<Self> {
        let range = |raw: &RawValue| {
            let start = raw.get().as_ptr() as usize - parsed.as_ptr() as usize + shift;
            start..start + raw.get().len()
        };
        let [choice] = chunk.choices.as_deref()? else {
            return None;
        };
        if choice.logprobs.is_some() {
            return None;
        }
        let index = choice.index.and_then(parse_index)?;
        let mut found = None;
        for (key, value) in &choice.delta.as_ref()?.0 {
            let s = value.get();
            if s == "null" || is_identity(key.as_str()) {
                continue;
            }
            let text = match (key.as_str(), s.as_bytes()[0]) {
                ("tool_calls", b'[') => (tool_arguments(value)?, GoesTo::ToolArguments),
                ("tool_calls", _) => return None,
                // Borrowed from the event unless the key has escapes.
                (_, b'"') => (*value, GoesTo::Member(key.0.clone())),
                (_, b'-' | b'0'..=b'9' | b't' | b'f') => continue,
                _ => return None,
            };
            if found.replace(text).is_some() {
                return None;
            }
        }
        let (text, goes_to) = found?;
        Some(RepeatCandidate {
            choice: index,
            goes_to,
            text: range(text),
            padding: chunk
                .padding
                .iter()
                .filter(|raw| raw.get().starts_with('"'))
                .map(|raw| range(raw))
                .collect(),
        })
    }
}

/// The `arguments` string of a tool-call list that is a single fragment with an `index` and
/// a `function` holding only `arguments`: the shape argument streams repeat.
fn tool_arguments(list: &RawValue) -> Option<&RawValue> {
    let fragments: Vec<&RawValue> = sub(list).ok()?;
    let [fragment] = fragments[..] else {
        return None;
    };
    let members: Members<'_> = sub(fragment).ok()?;
    let mut indexed = None;
    let mut arguments = None;
    for (key, value) in members.0 {
        match key.as_str() {
            // A repeated key is merged twice (`function`) or read once (`index`): no template.
            "index" if indexed.is_none() => indexed = Some(parse_index(value).is_some()),
            "function" if arguments.is_none() => {
                let function: Members<'_> = sub(value).ok()?;
                let [(key, value)] = &function.0[..] else {
                    return None;
                };
                if key.as_str() != "arguments" || !value.get().starts_with('"') {
                    return None;
                }
                arguments = Some(*value);
            }
            _ => return None,
        }
    }
    arguments.filter(|_| indexed == Some(true))
}

// ---------------------------------------------------------------------------------------------
// Accumulated state
// ---------------------------------------------------------------------------------------------

/// Keys that keep their last non-null value (top-level fields, D7; choice extras, D25), stored
/// as the upstream's raw JSON so repeated identical values cost a byte comparison, not an
/// allocation, and number lexemes are kept.
#[derive(Default)]
struct LastNonNull {
    /// `(key, value, first stored after the chunk's `choices` key)` in first-seen order.
    entries: Vec<(String, Box<RawValue>, bool)>,
    /// Filled only past [`LastNonNull::SCAN`] keys: a chunk has a handful (`id`, `object`,
    /// `created`, `model`, `system_fingerprint`, `usage`, …), which a scan finds faster
    /// than SipHash hashes one, and this runs for every key of every chunk.
    by_key: HashMap<String, usize>,
}

impl LastNonNull {
    /// Keys looked up by scanning `entries`.
    const SCAN: usize = 16;

    fn position(&self, key: &str) -> Option<usize> {
        if self.entries.len() <= Self::SCAN {
            self.entries.iter().position(|(k, ..)| k == key)
        } else {
            self.by_key.get(key).copied()
        }
    }

    /// `keep_real`: an empty string or `0` never replaces a stored value (D26: Azure's
    /// prompt-filter chunk has `id: ""` and `created: 0`).
    fn set(&mut self, key: Text<'_>, value: &RawValue, keep_real: bool, after_choices: bool) {
        let s = value.get();
        if s == "null" {
            return;
        }
        if let Some(i) = self.position(key.as_str()) {
            let slot = &mut self.entries[i].1;
            if slot.get() != s && !(keep_real && matches!(s, "\"\"" | "0")) {
                *slot = value.to_owned();
            }
            return;
        }
        self.entries
            .push((key.0.into_owned(), value.to_owned(), after_choices));
        if self.entries.len() > Self::SCAN {
            if self.by_key.is_empty() {
                for (i, (k, ..)) in self.entries.iter().enumerate() {
                    self.by_key.insert(k.clone(), i);
                }
            } else if let Some((k, ..)) = self.entries.last() {
                self.by_key.insert(k.clone(), self.entries.len() - 1);
            }
        }
    }
}

impl SharedPrefix {
    /// The prefix `chunk`, parsed whole from `data`, shares with the chunks after it: its
    /// bytes up to the last field before `choices` and the comma after it. None (empty) when
    /// there is no such field, a key repeats within the chunk, or an `error` comes before
    /// `choices`: this chunk's later `error` may hide it (the last one decides), but a chunk
    /// that repeats only the prefix's must report it, so it must be parsed.
    fn of(data: &[u8], chunk: &ChunkDe<'_>) -> Self {
        let none = SharedPrefix::default();
        if chunk.choices.is_none() || chunk.objects_repeat || chunk.error_before_choices {
            return none;
        }
        let before: Vec<&(Text<'_>, &RawValue, bool)> =
            chunk.fields.iter().filter(|(.., after)| !after).collect();
        let Some((_, last, _)) = before.last() else {
            return none;
        };
        let repeats = chunk.fields.iter().enumerate().any(|(i, (key, ..))| {
            chunk.fields[..i]
                .iter()
                .any(|(k, ..)| k.as_str() == key.as_str())
        });
        if repeats {
            return none;
        }
        let end = end_in(data, last);
        let Some(comma) = data
            .get(end..)
            .and_then(|rest| rest.iter().position(|b| !b.is_ascii_whitespace()))
            .map(|i| end + i)
            .filter(|&i| data[i] == b',')
        else {
            return none;
        };
        let len = comma + 1;
        SharedPrefix {
            bytes: data[..len].to_vec(),
            keys: before.iter().map(|(k, ..)| k.as_str().to_owned()).collect(),
            chunk_object: chunk.is_chunk_object
                && chunk.object.is_some_and(|raw| end_in(data, raw) <= len),
            scratch: String::new(),
        }
    }
}

/// Where `raw`, a value borrowed from `data`, ends in it.
fn end_in(data: &[u8], raw: &RawValue) -> usize {
    raw.get().as_ptr() as usize - data.as_ptr() as usize + raw.get().len()
}

/// One choice as it accumulates.
#[derive(Default)]
struct ChoiceState {
    /// Merged delta members other than `tool_calls`, in first-seen order.
    message: MemberList,
    tool_calls: ToolCalls,
    /// Last truthy `finish_reason`.
    finish_reason: Option<Box<RawValue>>,
    /// `None` until a chunk carries non-null `logprobs`.
    logprobs: Option<Logprobs>,
    /// Choice-level keys other than `index`, `delta`, `finish_reason`, `logprobs` (D25).
    extras: LastNonNull,
}

impl ChoiceState {
    /// About how many bytes [`write`](Self::write) produces, so the body is allocated once in
    /// the common case (text answers).
    fn size_hint(&self) -> usize {
        let members: usize = self
            .message
            .0
            .iter()
            .map(|(key, value)| {
                key.len()
                    + match value {
                        Value::String(text) => text.len() + 8,
                        _ => 32,
                    }
            })
            .sum();
        members + 160
    }

    /// Writes the choice in the non-streaming shape. Every key is written once: the message's
    /// members are distinct and never `tool_calls` (those go to [`ToolCalls`]), and the extras
    /// never repeat a key of the choice (the chunk's visitor takes those apart).
    fn write(self, index: u64, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        let mut role = None;
        let mut content = None;
        let mut refusal = None;
        let mut annotations = None;
        let mut rest = Vec::new();
        for (key, value) in self.message.0 {
            match key.as_str() {
                "role" => role = Some(value),
                "content" => content = Some(value),
                "refusal" => refusal = Some(value),
                "annotations" => annotations = Some(value),
                _ if value.is_null() => {}
                _ => rest.push((key, value)),
            }
        }
        let role = match role {
            Some(Value::String(s)) if s.is_empty() => Value::from("assistant"),
            Some(v) if !v.is_null() => v,
            _ => Value::from("assistant"),
        };

        let mut choice = ObjectWriter::new(out);
        choice.value("index", &index)?;
        let mut message = ObjectWriter::new(choice.key("message")?);
        message.value("role", &role)?;
        message.value("content", content.as_ref().unwrap_or(&Value::Null))?;
        message.value("refusal", refusal.as_ref().unwrap_or(&Value::Null))?;
        match annotations {
            Some(v) if !v.is_null() => message.value("annotations", &v)?,
            _ => message.value("annotations", &[(); 0])?,
        }
        if let Some(calls) = self.tool_calls.into_value() {
            message.value("tool_calls", &calls)?;
        }
        for (key, value) in &rest {
            message.value(key, value)?;
        }
        message.end();
        match self.logprobs {
            Some(logprobs) => choice.value("logprobs", &logprobs.into_value())?,
            None => choice.value("logprobs", &Value::Null)?,
        }
        match &self.finish_reason {
            Some(raw) => choice.raw("finish_reason", raw)?,
            None => choice.value("finish_reason", &Value::Null)?,
        }
        for (key, raw, _) in &self.extras.entries {
            choice.raw(key, raw)?;
        }
        choice.end();
        Ok(())
    }
}

/// A delta's merged members in first-seen order, found by a scan: a message has a handful
/// (`role`, `content`, `refusal`, …) and is looked up for every delta, where hashing each key
/// cost more than comparing it.
#[derive(Default)]
struct MemberList(Vec<(String, Value)>);

/// Where [`merge_member`] finds and adds members: a message's [`MemberList`], or a nested
/// object's map.
trait MemberSlots {
    fn slot(&mut self, key: &str) -> Option<&mut Value>;
    fn add(&mut self, key: String, value: Value);
}

impl MemberSlots for MemberList {
    fn slot(&mut self, key: &str) -> Option<&mut Value> {
        self.0.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    fn add(&mut self, key: String, value: Value) {
        self.0.push((key, value));
    }
}

impl MemberSlots for Map<String, Value> {
    fn slot(&mut self, key: &str) -> Option<&mut Value> {
        self.get_mut(key)
    }
    fn add(&mut self, key: String, value: Value) {
        self.insert(key, value);
    }
}

/// Writes a JSON object member by member, in the order given, straight into the body: no
/// map is built (and hashed, and dropped) only to be serialised once.
struct ObjectWriter<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> ObjectWriter<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        ObjectWriter { out, empty: true }
    }

    /// Writes `key` and its colon; the value is then written into the returned buffer.
    fn key(&mut self, key: &str) -> Result<&mut Vec<u8>, serde_json::Error> {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        serde_json::to_writer(&mut *self.out, key)?;
        self.out.push(b':');
        Ok(self.out)
    }

    fn value<T: serde::Serialize + ?Sized>(
        &mut self,
        key: &str,
        value: &T,
    ) -> Result<(), serde_json::Error> {
        serde_json::to_writer(self.key(key)?, value)
    }

    /// A captured upstream value, written as serde_json would write it once parsed. A string
    /// without escapes ([`plain_string`]) is those very bytes (it has no quote, backslash or
    /// control character to escape, and a raw value has no surrounding whitespace), so it is
    /// copied; anything else goes through a parse, which drops whitespace and rewrites escapes.
    fn raw(&mut self, key: &str, raw: &RawValue) -> Result<(), serde_json::Error> {
        let out = self.key(key)?;
        if plain_string(raw).is_some() {
            out.extend_from_slice(raw.get().as_bytes());
            Ok(())
        } else {
            serde_json::to_writer(out, &sub::<Value>(raw)?)
        }
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

/// `choices[].logprobs`: `content` and `refusal` token lists are appended (entries moved, not
/// cloned); a `logprobs: null` chunk (the finish chunk) changes nothing. As in the SDKs, the
/// first `logprobs` object is taken as it is (`"content": []` stays `[]`), and a later one
/// extends a list only with tokens, so an empty list never turns a `null` into `[]`.
#[derive(Default)]
struct Logprobs {
    content: Option<Vec<Value>>,
    refusal: Option<Vec<Value>>,
    extras: Map<String, Value>,
    /// Whether an object has been applied yet.
    started: bool,
}

impl Logprobs {
    fn apply(&mut self, value: Value) {
        // A non-object `logprobs` has no place in the body's shape; it is ignored.
        let Value::Object(members) = value else {
            return;
        };
        let first = !std::mem::replace(&mut self.started, true);
        for (key, value) in members {
            match (key.as_str(), value) {
                ("content", Value::Array(items)) if first || !items.is_empty() => {
                    self.content.get_or_insert_with(Vec::new).extend(items)
                }
                ("refusal", Value::Array(items)) if first || !items.is_empty() => {
                    self.refusal.get_or_insert_with(Vec::new).extend(items)
                }
                ("content" | "refusal", _) | (_, Value::Null) => {}
                (_, value) => {
                    self.extras.insert(key, value);
                }
            }
        }
    }

    fn into_value(self) -> Value {
        let mut out = Map::new();
        out.insert(
            "content".to_owned(),
            self.content.map_or(Value::Null, Value::Array),
        );
        out.insert(
            "refusal".to_owned(),
            self.refusal.map_or(Value::Null, Value::Array),
        );
        out.extend(self.extras);
        Value::Object(out)
    }
}

/// `message.tool_calls` fragments.
///
/// Matched by the value of `index`, not its position (servers skip or reorder indexes). A
/// fragment whose new `id` differs from the one its index already holds starts a new call
/// (servers that reuse index 0 for every call). A fragment without `index` goes to the call
/// with its `id`, else to the call touched last. No `arguments` fragment is ever dropped.
#[derive(Default)]
struct ToolCalls {
    /// In creation order; sorted by `index` (stable) only when the body is built.
    calls: Vec<ToolCall>,
    /// Index value → the newest call holding it.
    latest: HashMap<u64, usize>,
    /// The call the last fragment went to.
    last: Option<usize>,
}

struct ToolCall {
    /// Sort key: the call's `index` (an un-indexed call sorts right after the call before it).
    key: u64,
    /// Merged members, without the streaming-only `index`.
    fields: Map<String, Value>,
}

impl ToolCall {
    fn id(&self) -> Option<&str> {
        self.fields
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }
}

impl ToolCalls {
    fn apply(&mut self, raw: &RawValue) -> Result<(), serde_json::Error> {
        let s = raw.get();
        let fragments: Vec<&RawValue> = if s.starts_with('[') {
            sub(raw)?
        } else if s.starts_with('{') {
            // A bare object instead of a one-element list: still a fragment, keep it.
            vec![raw]
        } else {
            return Ok(());
        };
        for fragment in fragments {
            if fragment.get().starts_with('{') {
                self.apply_fragment(sub(fragment)?)?;
            }
        }
        Ok(())
    }

    fn apply_fragment(&mut self, fragment: Members<'_>) -> Result<(), serde_json::Error> {
        let index = fragment
            .0
            .iter()
            .find(|(k, _)| k.0 == "index")
            .and_then(|(_, v)| parse_index(v));
        let id: Option<Text<'_>> = match fragment.0.iter().find(|(k, _)| k.0 == "id") {
            Some((_, v)) if v.get().starts_with('"') => {
                Some(sub::<Text<'_>>(v)?).filter(|t| !t.0.is_empty())
            }
            _ => None,
        };
        let id = id.as_ref().map(Text::as_str);
        let pos = match index {
            Some(index) => match self.latest.get(&index) {
                Some(&p) if !differs(self.calls[p].id(), id) => p,
                _ => {
                    let p = self.create(index);
                    self.latest.insert(index, p);
                    p
                }
            },
            None => {
                let by_id = id.and_then(|id| self.calls.iter().rposition(|c| c.id() == Some(id)));
                match (by_id, self.last) {
                    (Some(p), _) => p,
                    (None, Some(p)) if !differs(self.calls[p].id(), id) => p,
                    (None, last) => {
                        let key = last.map_or(0, |p| self.calls[p].key);
                        self.create(key)
                    }
                }
            }
        };
        self.last = Some(pos);
        let fields = &mut self.calls[pos].fields;
        for (key, value) in fragment.0 {
            if key.0 != "index" {
                merge_member(fields, key, value)?;
            }
        }
        Ok(())
    }

    fn create(&mut self, key: u64) -> usize {
        self.calls.push(ToolCall {
            key,
            fields: Map::new(),
        });
        self.calls.len() - 1
    }

    fn into_value(mut self) -> Option<Value> {
        if self.calls.is_empty() {
            return None;
        }
        self.calls.sort_by_key(|c| c.key);
        let calls = self
            .calls
            .into_iter()
            .map(|mut call| {
                // The non-streaming shape requires `type`; some providers only send `function`.
                if !call.fields.contains_key("type") && call.fields.contains_key("function") {
                    call.fields
                        .insert("type".to_owned(), Value::from("function"));
                }
                Value::Object(call.fields)
            })
            .collect();
        Some(Value::Array(calls))
    }
}

/// Both ids known and different: a different call.
fn differs(current: Option<&str>, new: Option<&str>) -> bool {
    matches!((current, new), (Some(a), Some(b)) if a != b)
}

// ---------------------------------------------------------------------------------------------
// Generic delta merge (D6)
// ---------------------------------------------------------------------------------------------

/// Keys set once at any depth (D6): the first non-empty value wins.
fn is_identity(key: &str) -> bool {
    matches!(key, "role" | "id" | "type" | "index" | "name" | "call_id")
}

/// Merges one member of a delta object into `target` (D6). `null` never erases.
fn merge_member(
    target: &mut impl MemberSlots,
    key: Text<'_>,
    value: &RawValue,
) -> Result<(), serde_json::Error> {
    if value.get() == "null" {
        return Ok(());
    }
    match target.slot(key.as_str()) {
        Some(slot) if !slot.is_null() => merge_value(slot, key.as_str(), value),
        Some(slot) => {
            *slot = build(value)?;
            Ok(())
        }
        None => {
            target.add(key.0.into_owned(), build(value)?);
            Ok(())
        }
    }
}

/// Merges a non-null delta value into a non-null accumulated one.
fn merge_value(slot: &mut Value, key: &str, value: &RawValue) -> Result<(), serde_json::Error> {
    let s = value.get();
    if is_identity(key) {
        // Set once; an empty string is "not set yet" (a later non-empty value fills it).
        if matches!(slot, Value::String(cur) if cur.is_empty()) && s.starts_with('"') && s != "\"\""
        {
            *slot = build(value)?;
        }
        return Ok(());
    }
    match slot {
        Value::String(acc) if s.starts_with('"') => match plain_string(value) {
            Some(text) => acc.push_str(text),
            None => acc.push_str(sub::<Text<'_>>(value)?.as_str()),
        },
        Value::Object(acc) if s.starts_with('{') => {
            let members: Members<'_> = sub(value)?;
            for (k, v) in members.0 {
                merge_member(acc, k, v)?;
            }
        }
        Value::Array(acc) if s.starts_with('[') => merge_array(acc, sub(value)?)?,
        // Numbers and booleans are replaced (D6: never summed).
        Value::Number(_) | Value::Bool(_) | Value::Null => *slot = build(value)?,
        // A type change: keep what was accumulated rather than discard streamed text.
        _ => {}
    }
    Ok(())
}

/// Arrays: objects carrying an integer `index` merge into the entry with the same index value;
/// everything else is appended (annotations, content parts, …).
fn merge_array(acc: &mut Vec<Value>, items: Vec<&RawValue>) -> Result<(), serde_json::Error> {
    for item in items {
        if !item.get().starts_with('{') {
            acc.push(build(item)?);
            continue;
        }
        let members: Members<'_> = sub(item)?;
        let index = members
            .0
            .iter()
            .find(|(k, _)| k.0 == "index")
            .and_then(|(_, v)| parse_index(v));
        let target = index.and_then(|index| {
            // Newest first: a fragment almost always continues the latest entry.
            acc.iter_mut().rev().find_map(|entry| match entry {
                Value::Object(obj) if obj.get("index").and_then(value_index) == Some(index) => {
                    Some(obj)
                }
                _ => None,
            })
        });
        match target {
            Some(obj) => {
                for (k, v) in members.0 {
                    merge_member(obj, k, v)?;
                }
            }
            None => {
                let mut obj = Map::new();
                for (k, v) in members.0 {
                    obj.insert(k.0.into_owned(), build(v)?);
                }
                acc.push(Value::Object(obj));
            }
        }
    }
    Ok(())
}

/// A first value for a key. Arrays go through [`merge_array`] so that fragments sharing an
/// index within the very first list are merged too.
fn build(value: &RawValue) -> Result<Value, serde_json::Error> {
    if value.get().starts_with('[') {
        let mut acc = Vec::new();
        merge_array(&mut acc, sub(value)?)?;
        return Ok(Value::Array(acc));
    }
    if let Some(text) = plain_string(value) {
        return Ok(Value::String(text.to_owned()));
    }
    sub(value)
}

/// The text of a captured string that has no escapes: its bytes between the quotes, with no
/// second parse. A streamed text delta is almost always one.
fn plain_string(value: &RawValue) -> Option<&str> {
    let inner = value.get().strip_prefix('"')?.strip_suffix('"')?;
    memchr::memchr(b'\\', inner.as_bytes())
        .is_none()
        .then_some(inner)
}

/// Parses a captured member. It was validated when the event was parsed, so this only fails
/// if serde_json disagrees with itself. Internal helpers return the small `serde_json::Error`;
/// `push` and `finish` map it to [`AggregateError::InvalidJson`].
fn sub<'a, T: Deserialize<'a>>(value: &'a RawValue) -> Result<T, serde_json::Error> {
    serde_json::from_str(value.get())
}

/// An integer index, or a string holding one (B49 accepts `"0"`).
fn parse_index(value: &RawValue) -> Option<u64> {
    let s = value.get();
    let digits = s
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn value_index(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok()
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and usage
// ---------------------------------------------------------------------------------------------

/// Python truthiness, which is what the SDK applies to `error` (semantics §1).
pub(crate) fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// D11: the upstream's message, type, code and param, and a status from the B61 table.
fn upstream_error(error: Value) -> UpstreamStreamError {
    let (message, error_type, code, param) = match error {
        Value::Object(mut obj) => {
            let message = match obj.swap_remove("message") {
                Some(Value::String(s)) => s,
                Some(v) if !v.is_null() => v.to_string(),
                _ => "upstream reported an error in the stream".to_owned(),
            };
            let error_type = match obj.swap_remove("type") {
                Some(Value::String(s)) if !s.is_empty() => Some(s),
                _ => None,
            };
            let code = obj.swap_remove("code").unwrap_or(Value::Null);
            let param = obj.swap_remove("param").unwrap_or(Value::Null);
            (message, error_type, code, param)
        }
        Value::String(s) => (s, None, Value::Null, Value::Null),
        other => (other.to_string(), None, Value::Null, Value::Null),
    };
    let (status, default_type) = status_for_error_code(&code, error_type.as_deref(), 400);
    UpstreamStreamError {
        status,
        message,
        error_type: error_type.unwrap_or_else(|| default_type.to_owned()),
        code,
        param,
    }
}

fn token_usage(usage: &Value) -> Option<TokenUsage> {
    let usage = usage.as_object()?;
    let count = |v: Option<&Value>| v.and_then(Value::as_u64);
    Some(TokenUsage {
        input: count(usage.get("prompt_tokens")),
        output: count(usage.get("completion_tokens")),
        total: count(usage.get("total_tokens")),
        cached: count(
            usage
                .get("prompt_tokens_details")
                .and_then(|d| d.get("cached_tokens")),
        ),
        reasoning: count(
            usage
                .get("completion_tokens_details")
                .and_then(|d| d.get("reasoning_tokens")),
        ),
    })
}

// ---------------------------------------------------------------------------------------------
// Borrowed event shapes (hand-written visitors: no `flatten`/`untagged`, which lose number
// lexemes under `arbitrary_precision`)
// ---------------------------------------------------------------------------------------------

/// A string borrowed from the event bytes unless it contains escapes.
struct Text<'a>(Cow<'a, str>);

impl Text<'_> {
    fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// The members of a JSON object, values captured unparsed.
struct Members<'a>(Vec<(Text<'a>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(key) = map.next_key::<Text<'de>>()? {
                    members.push((key, map.next_value::<&'de RawValue>()?));
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// One event's JSON object.
struct ChunkDe<'a> {
    /// `None` when absent or null.
    choices: Option<Vec<ChoiceDe<'a>>>,
    /// The last `error` member's value.
    error: Option<&'a RawValue>,
    /// An `error` member came before `choices`.
    error_before_choices: bool,
    /// `object == "chat.completion.chunk"`.
    is_chunk_object: bool,
    /// The last `object` member's value, for where it lies in the event.
    object: Option<&'a RawValue>,
    /// `object` came more than once.
    objects_repeat: bool,
    /// The `obfuscation` values.
    padding: Vec<&'a RawValue>,
    /// Other members: `(key, value, came after the `choices` key)`.
    fields: Vec<(Text<'a>, &'a RawValue, bool)>,
}

impl<'de> Deserialize<'de> for ChunkDe<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ChunkVisitor;
        impl<'de> Visitor<'de> for ChunkVisitor {
            type Value = ChunkDe<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a chat.completion.chunk object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut chunk = ChunkDe {
                    choices: None,
                    error: None,
                    error_before_choices: false,
                    is_chunk_object: false,
                    object: None,
                    objects_repeat: false,
                    padding: Vec::new(),
                    fields: Vec::new(),
                };
                let mut seen_choices = false;
                while let Some(key) = map.next_key::<Text<'de>>()? {
                    match key.as_str() {
                        "choices" => {
                            chunk.choices = map.next_value()?;
                            seen_choices = true;
                        }
                        "error" => {
                            chunk.error = Some(map.next_value()?);
                            chunk.error_before_choices |= !seen_choices;
                        }
                        "object" => {
                            let object: &RawValue = map.next_value()?;
                            chunk.is_chunk_object = object.get() == "\"chat.completion.chunk\"";
                            chunk.objects_repeat |= chunk.object.is_some();
                            chunk.object = Some(object);
                        }
                        // Chunk-only padding (D7), left out of the body. Captured rather than
                        // skipped so that its bytes are still validated (D27), and so that an
                        // event template knows where it lies.
                        "obfuscation" => chunk.padding.push(map.next_value()?),
                        _ => {
                            let value = map.next_value()?;
                            chunk.fields.push((key, value, seen_choices));
                        }
                    }
                }
                Ok(chunk)
            }
        }
        deserializer.deserialize_map(ChunkVisitor)
    }
}

/// One entry of a chunk's `choices`.
struct ChoiceDe<'a> {
    index: Option<&'a RawValue>,
    /// `None` when absent or null.
    delta: Option<Members<'a>>,
    finish_reason: Option<&'a RawValue>,
    /// Parsed straight into values: its token entries are moved into the accumulated list.
    logprobs: Option<Value>,
    extras: Vec<(Text<'a>, &'a RawValue)>,
}

impl<'de> Deserialize<'de> for ChoiceDe<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ChoiceVisitor;
        impl<'de> Visitor<'de> for ChoiceVisitor {
            type Value = ChoiceDe<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a choice object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut choice = ChoiceDe {
                    index: None,
                    delta: None,
                    finish_reason: None,
                    logprobs: None,
                    extras: Vec::new(),
                };
                while let Some(key) = map.next_key::<Text<'de>>()? {
                    match key.as_str() {
                        "index" => choice.index = Some(map.next_value()?),
                        "delta" => choice.delta = map.next_value()?,
                        "finish_reason" => choice.finish_reason = Some(map.next_value()?),
                        "logprobs" => choice.logprobs = map.next_value()?,
                        // A non-standard choice-level `message` would clash with the merged
                        // message (B52); it is validated and dropped.
                        "message" => {
                            map.next_value::<&'de RawValue>()?;
                        }
                        _ => {
                            let value = map.next_value()?;
                            choice.extras.push((key, value));
                        }
                    }
                }
                Ok(choice)
            }
        }
        deserializer.deserialize_map(ChoiceVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures");

    // ----- TEST SUPPORT ONLY -------------------------------------------------------------------
    // A minimal SSE splitter so the fixture files can be fed to the accumulator. It is not the
    // proxy's SSE parser (that lives elsewhere): it splits on blank lines, joins `data:` lines
    // with `\n`, keeps `event:`, and ignores comments and other fields.
    fn split_events(body: &str) -> Vec<(String, String)> {
        let body = body.replace("\r\n", "\n");
        let mut events = Vec::new();
        for block in body.split("\n\n") {
            let mut name = String::new();
            let mut data: Vec<&str> = Vec::new();
            let mut any = false;
            for line in block.lines() {
                if line.is_empty() || line.starts_with(':') {
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "data" => {
                        data.push(value);
                        any = true;
                    }
                    "event" => {
                        name = value.to_owned();
                        any = true;
                    }
                    _ => {}
                }
            }
            if any {
                events.push((name, data.join("\n")));
            }
        }
        events
    }
    // ----- end of test support -----------------------------------------------------------------

    fn aggregate_file(path: &Path) -> Aggregate {
        let body = std::fs::read_to_string(path).unwrap();
        let mut acc = ChatAccumulator::new();
        let mut finished = false;
        for (name, data) in split_events(&body) {
            assert!(!finished, "{}: event after [DONE]", path.display());
            finished = acc.push(name.as_bytes(), data.as_bytes()).unwrap() == Flow::Finished;
        }
        assert!(finished, "{}: no [DONE]", path.display());
        acc.finish().unwrap()
    }

    #[test]
    fn fixtures_match_expected_bodies() {
        let root = Path::new(FIXTURES);
        if !root.is_dir() {
            println!("skipped: ../shared/fixtures not found (third-party fixtures are not part of this repository)");
            return;
        }
        let mut checked = 0;
        for dir in ["captured", "captured/sdk-divergent"] {
            let mut paths: Vec<_> = std::fs::read_dir(root.join(dir))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    name.starts_with("chat_") && name.ends_with(".sse")
                })
                .collect();
            paths.sort();
            for sse in paths {
                let agg = aggregate_file(&sse);
                assert_eq!(agg.terminal, Terminal::Done);
                let got: Value = serde_json::from_slice(&agg.body).unwrap();
                let expected: Value =
                    serde_json::from_slice(&std::fs::read(sse.with_extension("json")).unwrap())
                        .unwrap();
                assert_eq!(got, expected, "{}", sse.display());
                let text = String::from_utf8(agg.body).unwrap();
                assert!(!text.contains("\"obfuscation\""), "{}", sse.display());
                checked += 1;
            }
        }
        assert!(checked >= 11, "only {checked} chat fixtures found");

        let agg = aggregate_file(&root.join("reference/chat_completions_sse.txt"));
        let got: Value = serde_json::from_slice(&agg.body).unwrap();
        let choice = &got["choices"][0];
        assert_eq!(
            choice["message"]["content"],
            "Hello! How can I help you today?"
        );
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(got["object"], "chat.completion");
        assert_eq!(got["usage"]["total_tokens"], json!(20));
        assert_eq!(got["usage"]["input_tokens"], json!(7));
        assert_eq!(got["usage"]["claude_cache_creation_5_m_tokens"], json!(0));
        assert_eq!(got["usage"]["input_tokens_details"], Value::Null);
        assert_eq!(
            agg.usage,
            Some(TokenUsage {
                input: Some(7),
                output: Some(13),
                total: Some(20),
                cached: Some(0),
                reasoning: Some(0),
            })
        );
    }

    // ----- synthetic streams (written for these tests) -----------------------------------------

    fn feed(events: &[&str]) -> (ChatAccumulator, Flow) {
        let mut acc = ChatAccumulator::new();
        let mut flow = Flow::Continue;
        for e in events {
            flow = acc.push(b"", e.as_bytes()).unwrap();
        }
        (acc, flow)
    }

    fn run(events: &[&str]) -> Value {
        let (acc, flow) = feed(events);
        assert_eq!(flow, Flow::Finished);
        let agg = acc.finish().unwrap();
        assert_eq!(agg.terminal, Terminal::Done);
        serde_json::from_slice(&agg.body).unwrap()
    }

    fn msg(body: &Value, choice: usize) -> &Value {
        &body["choices"][choice]["message"]
    }

    #[test]
    fn plain_text_has_non_streaming_shape() {
        let body = run(&[
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"obfuscation":"xx"}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"Hi "},"finish_reason":null}],"obfuscation":"y"}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"there \"x\""},"finish_reason":"stop"}]}"#,
            "[DONE]",
        ]);
        assert_eq!(
            body,
            json!({
                "id": "c1", "object": "chat.completion", "created": 7, "model": "m",
                "choices": [{"index": 0,
                    "message": {"role": "assistant", "content": "Hi there \"x\"", "refusal": null, "annotations": []},
                    "logprobs": null, "finish_reason": "stop"}],
                "system_fingerprint": null
            })
        );
    }

    #[test]
    fn repeated_role_is_set_once() {
        let body = run(&[
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"a"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"b"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"c"},"finish_reason":"stop"}]}"#,
            "[DONE]",
        ]);
        assert_eq!(msg(&body, 0)["role"], "assistant");
        assert_eq!(msg(&body, 0)["content"], "abc");
    }

    #[test]
    fn repeated_tool_call_id_is_set_once_and_index_is_stripped() {
        let body = run(&[
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_q","type":"function","function":{"name":"lookup","arguments":""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_q","type":"function","function":{"name":"lookup","arguments":"{\"k\":"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_q","function":{"arguments":"1}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            "[DONE]",
        ]);
        let m = msg(&body, 0);
        assert_eq!(m["content"], Value::Null);
        assert_eq!(m["refusal"], Value::Null);
        assert_eq!(
            m["tool_calls"],
            json!([{"id": "call_q", "type": "function", "function": {"name": "lookup", "arguments": "{\"k\":1}"}}])
        );
    }

    #[test]
    fn tool_calls_merge_by_index_value_out_of_order_and_gapped() {
        let body = run(&[
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":5,"id":"c5","type":"function","function":{"name":"five","arguments":"["}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":2,"id":"c2","type":"function","function":{"name":"two","arguments":"{"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":5,"function":{"arguments":"]"}},{"index":2,"function":{"arguments":"}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            "[DONE]",
        ]);
        assert_eq!(
            msg(&body, 0)["tool_calls"],
            json!([
                {"id": "c2", "type": "function", "function": {"name": "two", "arguments": "{}"}},
                {"id": "c5", "type": "function", "function": {"name": "five", "arguments": "[]"}}
            ])
        );
    }

    #[test]
    fn reused_index_with_new_id_starts_a_new_call() {
        let body = run(&[
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"a","type":"function","function":{"name":"f","arguments":"{\"x\":1}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"b","type":"function","function":{"name":"g","arguments":"{\"y\":"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"2}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            "[DONE]",
        ]);
        assert_eq!(
            msg(&body, 0)["tool_calls"],
            json!([
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{\"y\":2}"}}
            ])
        );
    }

    #[test]
    fn fragments_without_index_follow_id_then_last_call() {
        let body = run(&[
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"id":"p","type":"function","function":{"name":"f","arguments":"AB"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"function":{"arguments":"C"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"id":"q","type":"function","function":{"name":"g","arguments":"1"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"id":"p","function":{"arguments":"D"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"function":{"arguments":"E"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            "[DONE]",
        ]);
        assert_eq!(
            msg(&body, 0)["tool_calls"],
            json!([
                {"id": "p", "type": "function", "function": {"name": "f", "arguments": "ABCDE"}},
                {"id": "q", "type": "function", "function": {"name": "g", "arguments": "1"}}
            ])
        );
    }

    #[test]
    fn two_choices_interleaved_out_of_order() {
        let body = run(&[
            r#"{"choices":[{"index":1,"delta":{"role":"assistant","content":"B1"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"A1"}}]}"#,
            r#"{"choices":[{"index":1,"delta":{"content":"B2"},"finish_reason":"length"},{"index":0,"delta":{"content":"A2"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"choices":[{"index":1,"delta":{},"finish_reason":null}]}"#,
            "[DONE]",
        ]);
        assert_eq!(body["choices"][0]["index"], json!(0));
        assert_eq!(msg(&body, 0)["content"], "A1A2");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["choices"][1]["index"], json!(1));
        assert_eq!(msg(&body, 1)["content"], "B1B2");
        assert_eq!(body["choices"][1]["finish_reason"], "length");
    }

    #[test]
    fn null_never_erases_and_numbers_are_replaced() {
        let body = run(&[
            r#"{"id":"z","model":"m","choices":[{"index":0,"delta":{"content":"keep","reasoning_content":"r1","audio":{"id":"au","expires_at":100,"transcript":"t1"}},"extra_score":3}]}"#,
            r#"{"id":null,"model":null,"choices":[{"index":0,"delta":{"content":null,"reasoning_content":null,"audio":{"id":"au","expires_at":-1.9361264946837764e-7,"transcript":"t2"}},"extra_score":null,"logprobs":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":" this"},"finish_reason":"stop"}]}"#,
            "[DONE]",
        ]);
        assert_eq!(body["id"], "z");
        assert_eq!(body["model"], "m");
        let m = msg(&body, 0);
        assert_eq!(m["content"], "keep this");
        assert_eq!(m["reasoning_content"], "r1");
        assert_eq!(m["audio"]["id"], "au");
        assert_eq!(m["audio"]["transcript"], "t1t2");
        assert_eq!(
            m["audio"]["expires_at"].to_string(),
            "-1.9361264946837764e-7"
        );
        assert_eq!(body["choices"][0]["extra_score"], json!(3));
        assert_eq!(body["choices"][0]["logprobs"], Value::Null);
        // The number lexeme is kept verbatim.
        let (acc, _) = feed(&[
            r#"{"choices":[{"index":0,"delta":{"x":1},"finish_reason":"stop","s":1.50}]}"#,
            r#"{"choices":[{"index":0,"delta":{"x":-1.9361264946837764e-7}}]}"#,
            "[DONE]",
        ]);
        let text = String::from_utf8(acc.finish().unwrap().body).unwrap();
        assert!(text.contains("\"x\":-1.9361264946837764e-7"), "{text}");
        assert!(text.contains("\"s\":1.50"), "{text}");
    }

    #[test]
    fn error_frame_becomes_upstream_error() {
        let mut acc = ChatAccumulator::new();
        acc.push(
            b"",
            br#"{"choices":[{"index":0,"delta":{"content":"partial"}}]}"#,
        )
        .unwrap();
        let err = acc
            .push(
                b"",
                br#"{"error":{"message":"slow down please","type":"requests","code":"rate_limit_exceeded"}}"#,
            )
            .unwrap_err();
        match err {
            AggregateError::Upstream(e) => {
                assert_eq!(e.status, 429);
                assert_eq!(e.message, "slow down please");
                assert_eq!(e.error_type, "requests");
                assert_eq!(e.code, json!("rate_limit_exceeded"));
                assert_eq!(e.param, Value::Null);
            }
            other => panic!("{other:?}"),
        }

        let err = ChatAccumulator::new()
            .push(
                b"",
                br#"{"error":{"message":"boom","code":"weird","param":"p"}}"#,
            )
            .unwrap_err();
        let AggregateError::Upstream(e) = err else {
            panic!("{err:?}")
        };
        assert_eq!(
            (e.status, e.error_type.as_str()),
            (400, "invalid_request_error")
        );
        assert_eq!(e.param, json!("p"));

        let err = ChatAccumulator::new()
            .push(b"", br#"{"error":{"message":"provider down","code":502}}"#)
            .unwrap_err();
        let AggregateError::Upstream(e) = err else {
            panic!("{err:?}")
        };
        assert_eq!((e.status, e.error_type.as_str()), (502, "server_error"));
        assert_eq!(e.code, json!(502));

        for frame in [
            r#"{"error":{"message":"slow","code":429}}"#,
            r#"{"error":{"message":"slow","code":"429"}}"#,
            r#"{"error":{"message":"slow","type":"rate_limit_error"}}"#,
            r#"{"error":{"message":"slow","type":"rate_limit_exceeded","code":null}}"#,
        ] {
            let err = ChatAccumulator::new()
                .push(b"", frame.as_bytes())
                .unwrap_err();
            let AggregateError::Upstream(e) = err else {
                panic!("{err:?}")
            };
            assert_eq!(e.status, 429, "{frame}");
        }

        let err = ChatAccumulator::new()
            .push(b"", br#"{"error":"just text"}"#)
            .unwrap_err();
        let AggregateError::Upstream(e) = err else {
            panic!("{err:?}")
        };
        assert_eq!(e.message, "just text");
        assert_eq!(e.status, 400);

        // A falsy `error` is not an error.
        let (acc, _) = feed(&[
            r#"{"error":null,"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":"stop"}]}"#,
            "[DONE]",
        ]);
        let body: Value = serde_json::from_slice(&acc.finish().unwrap().body).unwrap();
        assert!(body.get("error").is_none());
    }

    /// The body of `events` and the accumulator's prefix afterwards, plus the body of the same
    /// events parsed whole: event `i` gets `i` spaces after its `{`, so no event starts with
    /// the previous one's prefix. Whitespace between members changes nothing in the body.
    fn with_and_without_prefix(events: &[&str]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let body = |events: &[String]| {
            let mut acc = ChatAccumulator::new();
            for e in events {
                acc.push(b"", e.as_bytes()).unwrap();
            }
            let prefix = acc.prefix.bytes.clone();
            (acc.finish().unwrap().body, prefix)
        };
        let (skipping, prefix) = body(&events.iter().map(|e| e.to_string()).collect::<Vec<_>>());
        let spaced: Vec<String> = events
            .iter()
            .enumerate()
            .map(|(i, e)| match e.strip_prefix('{') {
                Some(rest) => format!("{{{}{rest}", " ".repeat(i)),
                None => e.to_string(),
            })
            .collect();
        let (whole, _) = body(&spaced);
        (skipping, whole, prefix)
    }

    #[test]
    fn the_shared_prefix_is_skipped_and_changes_nothing() {
        let (skipping, whole, prefix) = with_and_without_prefix(&[
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
            // Another model from here: parsed whole once, then the new prefix is skipped.
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m2","choices":[{"index":0,"delta":{"content":" there"},"finish_reason":null}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m2","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            // No `choices`: counted through the prefix's `object`.
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m2","usage":{"total_tokens":3}}"#,
            "[DONE]",
        ]);
        assert_eq!(
            String::from_utf8(skipping).unwrap(),
            String::from_utf8(whole).unwrap()
        );
        assert_eq!(
            prefix,
            br#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m2","#
        );
    }

    #[test]
    fn a_key_repeated_after_the_prefix_stops_the_skipping() {
        let events = [
            r#"{"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"a"}}]}"#,
            // `model` again after `choices`: the last value wins in this chunk…
            r#"{"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"b"}}],"model":"late"}"#,
            // …and here, where it comes only in the prefix, `m` is the last value again.
            r#"{"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"c"},"finish_reason":"stop"}]}"#,
            "[DONE]",
        ];
        let (skipping, whole, _) = with_and_without_prefix(&events);
        assert_eq!(skipping, whole);
        let body: Value = serde_json::from_slice(&skipping).unwrap();
        assert_eq!(body["model"], "m");
        assert_eq!(msg(&body, 0)["content"], "abc");

        // A key repeated within the prefix's own chunk: no prefix at all.
        let (skipping, whole, prefix) = with_and_without_prefix(&[
            r#"{"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"a"}}],"model":"late"}"#,
            r#"{"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"b"},"finish_reason":"stop"}]}"#,
            "[DONE]",
        ]);
        assert_eq!(skipping, whole);
        assert!(!prefix.is_empty(), "the second chunk has no repeat");
        let body: Value = serde_json::from_slice(&skipping).unwrap();
        assert_eq!(body["model"], "m");
    }

    #[test]
    fn an_event_is_as_valid_with_the_prefix_skipped_as_whole() {
        let first = r#"{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"a"}}]}"#;
        for bad in [
            // The prefix (`{"id":"c1",`) then `}`: a trailing comma, though `{}` alone is JSON.
            r#"{"id":"c1",}"#,
            r#"{"id":"c1", }"#,
            r#"{"id":"c1","object":"chat.completion.chunk",}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"b"}}]"#,
            r#"{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"b"}}]}x"#,
            r#"{"id":"c1","object":"chat.completion.chunk","choices":{"index":0}}"#,
        ] {
            let mut acc = ChatAccumulator::new();
            acc.push(b"", first.as_bytes()).unwrap();
            assert_eq!(acc.prefix.bytes, br#"{"id":"c1","#);
            let got = acc.push(b"", bad.as_bytes()).unwrap_err().to_string();
            // The same error, at the same position in the event.
            assert_eq!(got, error_parsed_whole(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn an_error_before_choices_is_never_skipped() {
        let mut acc = ChatAccumulator::new();
        // The last `error` decides: this chunk has none that counts.
        acc.push(
            b"",
            br#"{"id":"a","error":{"message":"boom"},"model":"m","choices":[{"index":0,"delta":{"content":"x"}}],"error":null}"#,
        )
        .unwrap();
        assert!(acc.prefix.bytes.is_empty());
        // This one does.
        let bad = br#"{"id":"a","error":{"message":"boom"},"model":"m","choices":[{"index":0,"delta":{"content":"y"}}]}"#;
        let got = acc.push(b"", bad).unwrap_err().to_string();
        assert_eq!(got, error_parsed_whole(bad));
        assert!(got.contains("boom"), "{got}");
    }

    #[test]
    fn a_repeated_object_key_gives_no_prefix() {
        // The last `object` decides whether a chunk without `choices` counts.
        let (skipping, whole, prefix) = with_and_without_prefix(&[
            r#"{"object":"chat.completion.chunk","id":"c1","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":"stop"}],"object":"x"}"#,
            r#"{"object":"chat.completion.chunk","id":"c1","usage":{"total_tokens":1}}"#,
            "[DONE]",
        ]);
        assert!(prefix.is_empty());
        assert_eq!(skipping, whole);
        let body: Value = serde_json::from_slice(&skipping).unwrap();
        assert_eq!(body["usage"]["total_tokens"], 1);
    }

    #[test]
    fn invalid_json_and_malformed_events() {
        let mut acc = ChatAccumulator::new();
        assert!(matches!(
            acc.push(b"", b"{\"choices\":[").unwrap_err(),
            AggregateError::InvalidJson(_)
        ));
        assert!(matches!(
            ChatAccumulator::new().push(b"", b"hello").unwrap_err(),
            AggregateError::InvalidJson(_)
        ));
        assert!(matches!(
            ChatAccumulator::new().push(b"", b"[1,2]").unwrap_err(),
            AggregateError::Malformed(_)
        ));
        assert!(matches!(
            ChatAccumulator::new().push(b"", b"42").unwrap_err(),
            AggregateError::Malformed(_)
        ));
        assert!(matches!(
            ChatAccumulator::new()
                .push(b"", br#"{"choices":{"index":0}}"#)
                .unwrap_err(),
            AggregateError::Malformed(_)
        ));
        // Invalid UTF-8 inside an ignored member is still a corrupt stream (D27).
        assert!(matches!(
            ChatAccumulator::new()
                .push(b"", b"{\"obfuscation\":\"\xff\",\"choices\":[]}")
                .unwrap_err(),
            AggregateError::InvalidJson(_)
        ));
    }

    #[test]
    fn empty_data_and_keepalives_are_skipped() {
        let body = run(&[
            "",
            "  \n",
            "{}",
            r#"{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}]}"#,
            "  [DONE]\n",
        ]);
        assert_eq!(msg(&body, 0)["content"], "x");
    }

    #[test]
    fn missing_done_is_accepted_only_when_every_choice_finished() {
        let (acc, flow) = feed(&[
            r#"{"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":"stop"},{"index":1,"delta":{"content":"b"},"finish_reason":"stop"}]}"#,
        ]);
        assert_eq!(flow, Flow::Continue);
        assert_eq!(acc.finish().unwrap().terminal, Terminal::EndOfStream);

        let (acc, _) = feed(&[
            r#"{"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":"stop"},{"index":1,"delta":{"content":"b"}}]}"#,
        ]);
        assert!(matches!(
            acc.finish(),
            Err(AggregateError::Truncated("data: [DONE]"))
        ));

        let (acc, _) = feed(&[r#"{"choices":[{"index":0,"delta":{"content":"a"}}]}"#]);
        assert!(matches!(
            acc.finish(),
            Err(AggregateError::Truncated("data: [DONE]"))
        ));
        assert!(matches!(
            ChatAccumulator::new().finish(),
            Err(AggregateError::Truncated("data: [DONE]"))
        ));
    }

    #[test]
    fn done_without_chunks_or_choices_is_not_an_answer() {
        let (acc, flow) = feed(&["[DONE]"]);
        assert_eq!(flow, Flow::Finished);
        assert!(matches!(
            acc.finish(),
            Err(AggregateError::Truncated("any chunk"))
        ));
        let (acc, _) = feed(&[r#"{"choices":[],"usage":{"total_tokens":1}}"#, "[DONE]"]);
        assert!(matches!(acc.finish(), Err(AggregateError::Malformed(_))));
    }

    #[test]
    fn azure_prompt_filter_chunk_is_lifted_and_yields_identity() {
        let body = run(&[
            r#"{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false}}}]}"#,
            r#"{"choices":[{"content_filter_results":{},"delta":{"role":"assistant","content":""},"finish_reason":null,"index":0}],"created":1700,"id":"chatcmpl-real","model":"gpt-x","object":"chat.completion.chunk","system_fingerprint":"fp"}"#,
            r#"{"choices":[{"content_filter_results":{"hate":{"filtered":false}},"delta":{"content":"ok"},"finish_reason":null,"index":0}],"created":1700,"id":"chatcmpl-real","model":"gpt-x","object":"chat.completion.chunk","system_fingerprint":"fp"}"#,
            r#"{"choices":[{"content_filter_results":{},"delta":{},"finish_reason":"stop","index":0}],"created":0,"id":"","model":"gpt-x","object":"chat.completion.chunk","system_fingerprint":"fp"}"#,
            "[DONE]",
        ]);
        assert_eq!(body["id"], "chatcmpl-real");
        assert_eq!(body["created"], json!(1700));
        assert_eq!(body["model"], "gpt-x");
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(
            body["prompt_filter_results"][0]["content_filter_results"]["hate"]["filtered"],
            json!(false)
        );
        assert_eq!(msg(&body, 0)["content"], "ok");
        // D25: last non-null choice extra.
        assert_eq!(body["choices"][0]["content_filter_results"], json!({}));
    }

    #[test]
    fn annotations_split_across_deltas_are_appended() {
        let body = run(&[
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"See ","annotations":[{"type":"url_citation","url_citation":{"url":"https://a.example","title":"A"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"both.","annotations":[{"type":"url_citation","url_citation":{"url":"https://b.example","title":"B"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            "[DONE]",
        ]);
        let urls: Vec<_> = msg(&body, 0)["annotations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["url_citation"]["url"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(urls, ["https://a.example", "https://b.example"]);
    }

    #[test]
    fn logprobs_are_appended() {
        let body = run(&[
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":{"content":[],"refusal":null}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Yo"},"logprobs":{"content":[{"token":"Yo","logprob":-0.5,"bytes":[89,111],"top_logprobs":[]}],"refusal":null}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"!"},"logprobs":{"content":[{"token":"!","logprob":-3.3809047e-05,"bytes":[33],"top_logprobs":[]}],"refusal":null}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}"#,
            "[DONE]",
        ]);
        let lp = &body["choices"][0]["logprobs"];
        assert_eq!(lp["refusal"], Value::Null);
        let tokens: Vec<_> = lp["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["token"].as_str().unwrap())
            .collect();
        assert_eq!(tokens, ["Yo", "!"]);
        // The upstream's number lexeme is kept (not re-formatted through f64).
        assert_eq!(lp["content"][1]["logprob"].to_string(), "-3.3809047e-05");
    }

    /// The SDKs take the first `logprobs` whole and later extend a list only with tokens:
    /// an empty `refusal` list after a `null` one stays `null`, as in the non-streamed body,
    /// while the first chunk's empty `content` list stays `[]`.
    #[test]
    fn an_empty_logprobs_list_after_null_stays_null() {
        let body = run(&[
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":{"content":[],"refusal":null}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Yo"},"logprobs":{"content":[{"token":"Yo","logprob":-0.5,"bytes":[89,111],"top_logprobs":[]}],"refusal":[]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}"#,
            "[DONE]",
        ]);
        let lp = &body["choices"][0]["logprobs"];
        assert_eq!(lp["refusal"], Value::Null, "{lp}");
        assert_eq!(lp["content"].as_array().unwrap().len(), 1);
        let body = run(&[
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":{"content":[],"refusal":null}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}"#,
            "[DONE]",
        ]);
        assert_eq!(
            body["choices"][0]["logprobs"]["content"],
            serde_json::json!([])
        );
    }

    /// A form feed is not JSON whitespace: data wrapped in one is invalid JSON (D27), as the
    /// SDK's `json.loads` and the Responses path say; JSON's own whitespace is fine.
    #[test]
    fn a_form_feed_around_the_data_is_invalid_json() {
        for data in [&b"\x0c{\"choices\":[]}"[..], b"{\"choices\":[]}\x0c"] {
            assert!(
                matches!(
                    ChatAccumulator::new().push(b"", data),
                    Err(AggregateError::InvalidJson(_))
                ),
                "{data:?}"
            );
        }
        let mut acc = ChatAccumulator::new();
        assert!(acc.push(b"", b" \t{\"choices\":[]}\r\n ").is_ok());
    }

    #[test]
    fn obfuscation_and_tool_call_index_are_absent() {
        let (acc, _) = feed(&[
            r#"{"id":"o","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"t","type":"function","function":{"name":"n","arguments":""}}]}}],"obfuscation":"abc"}"#,
            r#"{"id":"o","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}],"obfuscation":"de"}"#,
            r#"{"id":"o","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}],"obfuscation":"f"}"#,
            "[DONE]",
        ]);
        let text = String::from_utf8(acc.finish().unwrap().body).unwrap();
        assert!(!text.contains("obfuscation"), "{text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        let call = &msg(&body, 0)["tool_calls"][0];
        assert!(call.get("index").is_none());
        assert_eq!(call["function"]["arguments"], "{}");
        assert_eq!(msg(&body, 0)["content"], Value::Null);
    }

    #[test]
    fn no_tool_calls_key_without_tool_calls() {
        let body = run(&[
            r#"{"choices":[{"index":0,"delta":{"content":"x","tool_calls":null},"finish_reason":"stop"}]}"#,
            "[DONE]",
        ]);
        assert!(msg(&body, 0).get("tool_calls").is_none());
    }

    #[test]
    fn usage_survives_later_null_usage() {
        let (acc, _) = feed(&[
            r#"{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}],"usage":null}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":1},"completion_tokens_details":{"reasoning_tokens":0}}}"#,
            r#"{"choices":[],"usage":null,"moderation":{"flagged":false}}"#,
            "[DONE]",
        ]);
        let agg = acc.finish().unwrap();
        assert_eq!(
            agg.usage,
            Some(TokenUsage {
                input: Some(5),
                output: Some(2),
                total: Some(7),
                cached: Some(1),
                reasoning: Some(0),
            })
        );
        let body: Value = serde_json::from_slice(&agg.body).unwrap();
        assert_eq!(body["usage"]["total_tokens"], json!(7));
        assert_eq!(body["moderation"], json!({"flagged": false}));
    }

    #[test]
    fn choice_index_rules() {
        // B49: a string index is accepted, a missing one drops the choice.
        let body = run(&[
            r#"{"choices":[{"index":"0","delta":{"content":"a"}},{"delta":{"content":"lost"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"b"},"finish_reason":"stop"}]}"#,
            "[DONE]",
        ]);
        assert_eq!(body["choices"].as_array().unwrap().len(), 1);
        assert_eq!(msg(&body, 0)["content"], "ab");
    }

    #[test]
    fn unknown_indexed_arrays_merge_by_index_and_strings_concatenate() {
        let body = run(&[
            r#"{"choices":[{"index":0,"delta":{"reasoning_details":[{"index":0,"type":"reasoning.text","text":"th"}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"reasoning_details":[{"index":0,"type":"reasoning.text","text":"ink"},{"index":1,"type":"reasoning.encrypted","data":"zz"}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"done"},"finish_reason":"stop"}]}"#,
            "[DONE]",
        ]);
        assert_eq!(
            msg(&body, 0)["reasoning_details"],
            json!([
                {"index": 0, "type": "reasoning.text", "text": "think"},
                {"index": 1, "type": "reasoning.encrypted", "data": "zz"}
            ])
        );
    }

    #[test]
    fn top_level_keys_keep_their_last_value_past_the_scanned_few() {
        let mut acc = ChatAccumulator::new();
        let extra: Vec<String> = (0..20).map(|i| format!("\"k{i}\":{i}")).collect();
        let first = format!(
            r#"{{"id":"c","object":"chat.completion.chunk",{},"choices":[{{"index":0,"delta":{{"content":"a"}},"finish_reason":null}}]}}"#,
            extra.join(",")
        );
        acc.push(b"", first.as_bytes()).unwrap();
        acc.push(
            b"",
            br#"{"id":"c","object":"chat.completion.chunk","k18":"last","k3":null,"k20":true,"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
        )
        .unwrap();
        acc.push(b"", b"[DONE]").unwrap();
        let body: Value = serde_json::from_slice(&acc.finish().unwrap().body).unwrap();
        assert_eq!(
            (&body["k18"], &body["k3"], &body["k19"]),
            (&json!("last"), &json!(3), &json!(19))
        );
        assert_eq!(body["k20"], true);
        let keys: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let at = |k: &str| keys.iter().position(|x| *x == k).unwrap();
        assert!(at("k0") < at("k17") && at("k17") < at("k18") && at("k19") < at("k20"));
    }

    #[test]
    fn pushes_after_done_are_ignored() {
        let mut acc = ChatAccumulator::new();
        acc.push(
            b"",
            br#"{"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":"stop"}]}"#,
        )
        .unwrap();
        assert_eq!(acc.push(b"", b"[DONE]").unwrap(), Flow::Finished);
        assert_eq!(acc.push(b"", b"garbage").unwrap(), Flow::Finished);
        assert_eq!(acc.finish().unwrap().terminal, Terminal::Done);
    }

    // ----- chunks that repeat the one before --------------------------------------------------

    /// The outcome of `events` aggregated as the proxy does and with every chunk parsed whole
    /// (errors as text), and how many chunks the templates took.
    fn with_and_without_templates(events: &[String]) -> (String, String, u64) {
        let run = |whole: bool| {
            let mut acc = ChatAccumulator::new();
            acc.parse_every_chunk_whole = whole;
            let mut outcome = Ok(());
            for e in events {
                if let Err(e) = acc.push(b"", e.as_bytes()) {
                    outcome = Err(e.to_string());
                    break;
                }
            }
            let appended = acc.repeat.appended;
            let outcome = outcome.and_then(|()| {
                acc.finish()
                    .map(|agg| String::from_utf8(agg.body).unwrap())
                    .map_err(|e| e.to_string())
            });
            (outcome.unwrap_or_else(|e| format!("error: {e}")), appended)
        };
        let (taken, appended) = run(false);
        let (parsed, never) = run(true);
        assert_eq!(never, 0);
        (taken, parsed, appended)
    }

    const HEAD: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","#;

    fn chunk(choices: &str, after: &str) -> String {
        format!(r#"{HEAD}"choices":[{choices}]{after}}}"#)
    }

    fn text_chunk(key: &str, text: &str, padding: &str) -> String {
        let text = serde_json::to_string(text).unwrap();
        chunk(
            &format!(
                r#"{{"index":0,"delta":{{"content":null,"{key}":{text}}},"logprobs":null,"finish_reason":null}}"#
            ),
            &format!(r#","usage":null,"obfuscation":"{padding}""#),
        )
    }

    fn arguments_chunk(index: u32, text: &str) -> String {
        let text = serde_json::to_string(text).unwrap();
        chunk(
            &format!(
                r#"{{"index":0,"delta":{{"tool_calls":[{{"index":{index},"function":{{"arguments":{text}}}}}]}}}}"#
            ),
            "",
        )
    }

    #[test]
    fn repeated_chunks_take_the_template_and_change_nothing() {
        let events = vec![
            chunk(
                r#"{"index":0,"delta":{"role":"assistant","content":"","refusal":null}}"#,
                "",
            ),
            text_chunk("reasoning_content", "Let me", "ab"),
            text_chunk("reasoning_content", " think: \"quotes\"\n", "abcd"),
            text_chunk("reasoning_content", " é 😀 \u{1}", ""),
            text_chunk("content", "The", "x"),
            text_chunk("content", "", "xy"),
            text_chunk("content", " fox", "xyz"),
            text_chunk("refusal", "No", "x"),
            text_chunk("refusal", "pe", "x"),
            chunk(
                r#"{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]}}"#,
                "",
            ),
            arguments_chunk(0, "{\"a\""),
            arguments_chunk(0, ":1}"),
            chunk(
                r#"{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_2","type":"function","function":{"name":"g","arguments":""}}]}}"#,
                "",
            ),
            arguments_chunk(1, "{}"),
            arguments_chunk(1, ""),
            // Index 0 again: parsed, learned, then taken.
            arguments_chunk(0, " "),
            arguments_chunk(0, " "),
            // A second choice, interleaved: every chunk is parsed.
            chunk(r#"{"index":1,"delta":{"content":"b"}}"#, ""),
            chunk(r#"{"index":0,"delta":{"content":"a"}}"#, ""),
            chunk(r#"{"index":1,"delta":{"content":"b"}}"#, ""),
            chunk(r#"{"index":0,"delta":{"content":"a"}}"#, ""),
            chunk(r#"{"index":0,"delta":{},"finish_reason":"stop"}"#, ""),
            chunk(r#"{"index":1,"delta":{},"finish_reason":"stop"}"#, ""),
            chunk("", r#","usage":{"total_tokens":3}"#),
            "[DONE]".to_owned(),
        ];
        let (taken, parsed, appended) = with_and_without_templates(&events);
        assert_eq!(taken, parsed);
        assert_eq!(appended, 8);
        let body: Value = serde_json::from_str(&taken).unwrap();
        let message = msg(&body, 0);
        assert_eq!(
            message["reasoning_content"],
            "Let me think: \"quotes\"\n é 😀 \u{1}"
        );
        assert_eq!(message["content"], "The foxaa");
        assert_eq!(message["refusal"], "Nope");
        assert_eq!(
            message["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}  "
        );
        assert_eq!(message["tool_calls"][1]["function"]["arguments"], "{}");
    }

    #[test]
    fn chunks_whose_other_members_would_change_again_are_not_learned() {
        for choices in [
            // Two texts, logprobs, an object or an array in the delta, two choices, a
            // fragment with an id or a name, two fragments.
            r#"{"index":0,"delta":{"content":"a","reasoning_content":"b"}}"#,
            r#"{"index":0,"delta":{"content":"a"},"logprobs":{"content":[{"token":"a"}]}}"#,
            r#"{"index":0,"delta":{"content":"a","audio":{"data":"x"}}}"#,
            r#"{"index":0,"delta":{"content":"a","annotations":[{"t":1}]}}"#,
            r#"{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"a"}}"#,
            r#"{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c","function":{"arguments":"a"}}]}}"#,
            r#"{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":"a"}}]}}"#,
            r#"{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"a"}},{"index":1,"function":{"arguments":"a"}}]}}"#,
            r#"{"index":0,"delta":{"tool_calls":[{"function":{"arguments":"a"}}]}}"#,
            r#"{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"a"},"function":{"arguments":"b"}}]}}"#,
            r#"{"index":0,"delta":{"tool_calls":[{"index":0,"index":0,"function":{"arguments":"a"}}]}}"#,
        ] {
            let second = chunk(choices, "");
            let events = [second.clone(), second.clone(), second, "[DONE]".to_owned()];
            let (taken, parsed, appended) = with_and_without_templates(&events);
            assert_eq!(taken, parsed);
            assert_eq!(appended, 0, "{}", events[0]);
        }
        // Nulls, identity keys, numbers and booleans beside the text are fine.
        let events = [
            chunk(
                r#"{"index":0,"delta":{"role":"assistant","content":"a","n":1,"b":true,"x":null},"x":2}"#,
                "",
            ),
            chunk(
                r#"{"index":0,"delta":{"role":"assistant","content":"b","n":1,"b":true,"x":null},"x":2}"#,
                "",
            ),
            "[DONE]".to_owned(),
        ];
        let (taken, parsed, appended) = with_and_without_templates(&events);
        assert_eq!((taken, appended), (parsed, 1));
    }

    #[test]
    fn an_invalid_repeated_chunk_fails_as_it_would_parsed_whole() {
        let learned = text_chunk("content", "The", "x");
        for bad in [
            learned.replace("The", "a\u{1}b"),
            learned.replace("The", r"a\qb"),
            learned.replace("The", r"\ud83d"),
            learned.replace("The", r"a\"),
        ] {
            let mut acc = ChatAccumulator::new();
            acc.push(b"", learned.as_bytes()).unwrap();
            acc.push(b"", learned.as_bytes()).unwrap();
            assert_eq!(acc.repeat.appended, 1);
            let got = acc.push(b"", bad.as_bytes()).unwrap_err().to_string();
            assert_eq!(got, error_parsed_whole(bad.as_bytes()), "{bad}");
        }
        let mut bad = learned.clone().into_bytes();
        let at = learned.find("The").unwrap();
        bad[at] = 0xff;
        let mut acc = ChatAccumulator::new();
        acc.push(b"", learned.as_bytes()).unwrap();
        let got = acc.push(b"", &bad).unwrap_err().to_string();
        assert_eq!(got, error_parsed_whole(&bad));
    }

    /// What an accumulator that has seen nothing says of `bad`.
    fn error_parsed_whole(bad: &[u8]) -> String {
        ChatAccumulator::new()
            .push(b"", bad)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn fixture_text_streams_take_the_template() {
        let root = Path::new(FIXTURES).join("captured");
        if !root.is_dir() {
            println!("skipped: ../shared/fixtures not found (third-party fixtures are not part of this repository)");
            return;
        }
        for (name, least) in [
            ("chat_real_plain_usage.sse", 10),
            ("chat_real_tool_obfuscation.sse", 4),
            ("chat_real_deepseek_reasoning.sse", 10),
        ] {
            let body = std::fs::read_to_string(root.join(name)).unwrap();
            let events: Vec<String> = split_events(&body).into_iter().map(|(_, d)| d).collect();
            let (taken, parsed, appended) = with_and_without_templates(&events);
            assert_eq!(taken, parsed, "{name}");
            assert!(appended >= least, "{name}: {appended} chunks taken");
        }
    }

    /// A string as JSON, each character written as itself or as a `\u` escape (surrogate
    /// pairs beyond the BMP), as `escape` says.
    fn json_string(text: &str, escape: &[bool]) -> String {
        let mut out = String::from("\"");
        for (i, c) in text.chars().enumerate() {
            let plain = serde_json::to_string(&c.to_string()).unwrap();
            if escape.get(i).copied().unwrap_or(false) {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            } else {
                out.push_str(&plain[1..plain.len() - 1]);
            }
        }
        out.push('"');
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 1000, ..Default::default() })]

        /// Whatever the texts, their escapes and the order of the kinds of chunk, the body is
        /// the one the parse of every chunk gives.
        #[test]
        fn templates_never_change_the_body(
            steps in proptest::collection::vec(
                (0u8..8, ".{0,6}", proptest::collection::vec(proptest::bool::ANY, 6), "[a-z]{0,3}"),
                1..40,
            )
        ) {
            let mut events = vec![chunk(
                r#"{"index":0,"delta":{"role":"assistant","content":""}}"#,
                "",
            )];
            for (kind, text, escape, padding) in &steps {
                let text = json_string(text, escape);
                events.push(match kind {
                    0 | 1 => chunk(
                        &format!(r#"{{"index":0,"delta":{{"content":{text}}},"finish_reason":null}}"#),
                        &format!(r#","obfuscation":"{padding}""#),
                    ),
                    2 => chunk(&format!(r#"{{"index":0,"delta":{{"reasoning":{text}}}}}"#), ""),
                    3 => chunk(
                        &format!(r#"{{"index":0,"delta":{{"tool_calls":[{{"index":0,"function":{{"arguments":{text}}}}}]}}}}"#),
                        "",
                    ),
                    4 => chunk(
                        &format!(r#"{{"index":1,"delta":{{"content":{text}}}}}"#),
                        "",
                    ),
                    // An error where the shared prefix lies, which a later `error: null`
                    // may hide, and padding after `choices`.
                    5 => {
                        let error = if padding.is_empty() { "null" } else { r#"{"message":"boom"}"# };
                        let hidden = if escape[0] { r#","error":null"# } else { "" };
                        format!(
                            r#"{{"id":"c1","error":{error},"model":"m","choices":[{{"index":0,"delta":{{"content":{text}}}}}]{hidden},"obfuscation":"{padding}"}}"#
                        )
                    }
                    // Padding where the shared prefix lies.
                    6 => format!(
                        r#"{HEAD}"obfuscation":"{padding}","choices":[{{"index":0,"delta":{{"content":{text}}}}}]}}"#
                    ),
                    _ => chunk(
                        &format!(r#"{{"index":0,"delta":{{"tool_calls":[{{"index":0,"id":"call_{padding}","function":{{"name":"f","arguments":{text}}}}}]}}}}"#),
                        "",
                    ),
                });
            }
            events.push(chunk(r#"{"index":0,"delta":{},"finish_reason":"stop"}"#, ""));
            events.push("[DONE]".to_owned());
            let (taken, parsed, _) = with_and_without_templates(&events);
            proptest::prop_assert_eq!(taken, parsed);
        }
    }
}

//! Aggregates an upstream Responses API event stream into the one JSON body that the
//! non-streaming `POST /v1/responses` call would have returned.
//!
//! The terminal event's `response` object *is* the non-streaming body (B56, semantics §3.2), so
//! the normal path copies its bytes verbatim: key order, whitespace, string escapes and number
//! lexemes all stay the upstream's. Only two repairs touch the body:
//!
//! * **Output fallback** (D9, B57): when the terminal `output` is missing, `null` or `[]` but
//!   items were streamed, `output` is filled from the `response.output_item.done` items, and for
//!   items that never got a `done`, from items rebuilt out of `output_item.added`,
//!   `content_part.*` and the `*.delta` / `*.done` events (semantics §3.3).
//! * **Usage fallback**: when the terminal `usage` is missing or `null` while an earlier
//!   lifecycle event (`response.created`, `response.in_progress`, …) carried one.
//!
//! Both repairs splice the new values into the terminal object's raw entries, so every other
//! member still goes out byte for byte.
//!
//! Errors: `response.failed` and `error` events become [`AggregateError::Upstream`] with the
//! upstream's own message, type, code and param (D11, D12); any event whose data is not JSON
//! makes the whole stream corrupt (D8, D27), whether or not the event is used.
//!
//! Cost model (the accumulator sits on the hot path of every converted Responses call): each
//! event's data is parsed once by a hand-written visitor that keeps only the handful of fields
//! this module reads, as borrowed strings or borrowed [`RawValue`] slices; everything else is
//! skipped without building a `Value` tree. A text delta that repeats the last one parsed byte
//! for byte but for its text, `sequence_number` and `obfuscation` is not parsed at all (`Repeat`,
//! `EventTemplate`). Delta text is appended to owned `String`s (amortised
//! O(n)) and dropped as soon as the item's authoritative `output_item.done` arrives. Items are
//! kept in a `BTreeMap` keyed by `output_index`, so an absurd index from the upstream costs one
//! map entry, never an allocation sized by the index. `finish` serialises at most once.

// `AggregateError` (shared, in `outcome.rs`) carries a whole `UpstreamStreamError`, ~200 bytes;
// every fallible function here returns it. Boxing belongs in `outcome.rs`, not in one module.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::outcome::{
    parse_event_data, status_for_error_code, Aggregate, AggregateError, Flow, Terminal, TokenUsage,
    UpstreamStreamError,
};
use super::template::EventTemplate;

/// What [`AggregateError::Truncated`] says when the stream ends without a terminal event.
const TERMINAL_EXPECTED: &str = "a terminal response event";

/// Message for a `response.failed` whose `error` is missing or null (D12): the client must
/// still learn that generation failed, not get a 200 with a failed Response (B63 replaced).
const FAILED_WITHOUT_ERROR: &str =
    "The upstream reported the response as failed without giving an error";

/// Message for a `response.failed` whose `error` has no usable `message` (B62).
const FAILED_DEFAULT_MESSAGE: &str = "Upstream response failed";

/// Message for an `error` event without a usable `message`.
const ERROR_EVENT_DEFAULT_MESSAGE: &str = "Upstream reported an error in the stream";

/// Item-status events (`response.<kind>.<status>`, semantics §3.1) whose only effect is the
/// item's `status` when the item has to be rebuilt.
const STATUS_EVENT_KINDS: &[&str] = &[
    "web_search_call",
    "file_search_call",
    "code_interpreter_call",
    "image_generation_call",
    "mcp_call",
    "mcp_list_tools",
];
const STATUS_EVENT_STATES: &[&str] = &[
    "in_progress",
    "searching",
    "interpreting",
    "generating",
    "completed",
    "failed",
];

/// Accumulates one Responses API event stream; see the module docs.
///
/// Not thread-safe and not reusable: one accumulator per upstream stream.
#[derive(Debug, Default)]
pub struct ResponsesAccumulator {
    /// Set by the first terminal event; later events are not even parsed.
    ending: Option<Ending>,
    /// `data: [DONE]` was seen (some compatible providers send it; OpenAI does not).
    done_marker: bool,
    /// Streamed items by `output_index`, only needed for the output fallback.
    items: BTreeMap<u64, ItemSlot>,
    /// `item.id` → `output_index`, to place events that carry `item_id` but no `output_index`.
    ids: HashMap<String, u64>,
    /// The last non-null `usage` of an earlier lifecycle event's `response`.
    earlier_usage: Option<Box<RawValue>>,
    /// The first `output_item.added/done` that could not be placed. It only matters when the
    /// fallback needs the items: then the rebuilt output would silently miss an item (D27).
    unplaced_item: Option<String>,
    /// The ids of `output_item.added` items that could not be placed (`None`: no id). Such
    /// an item is not missing if a placed `output_item.done` has its id.
    unplaced_added: Vec<Option<String>>,
    /// A delta/part event could not be placed; matters only if some item must be rebuilt.
    unplaced_delta: bool,
    /// The last event parsed, when it is a text delta that the next ones repeat but for
    /// their text: those need no parse.
    repeat: Repeat,
    /// Tests compare the accumulator with and without its templates.
    #[cfg(test)]
    parse_every_event_whole: bool,
}

/// Text streams as `*.delta` events (message text, reasoning text and summaries, tool-call
/// arguments, input and code) equal byte for byte but for their `delta`, `sequence_number` and
/// `obfuscation`. Such an event, applied again, changes nothing but by appending its text
/// (its item and part exist, its kinds are set once, and it has no logprobs to append), so
/// one that matches the template of the last event parsed has its text appended to the same
/// place, unparsed.
#[derive(Debug, Default)]
struct Repeat {
    /// Empty unless the last event parsed was learned.
    template: EventTemplate,
    /// Where the learned delta's text went; `None` only before anything is learned.
    target: Option<DeltaTarget>,
    /// Events taken through the template.
    #[cfg(test)]
    appended: u64,
}

#[derive(Debug)]
enum Ending {
    /// `response.completed` / `response.incomplete`: the `response` object's bytes, copied
    /// once out of the event data.
    Response { terminal: Terminal, body: Vec<u8> },
    /// `response.failed`, already turned into the client's error.
    Failed(UpstreamStreamError),
}

impl ResponsesAccumulator {
    /// An accumulator that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// One SSE event: `name` = the `event:` field (empty if none), `data` = the event's data
    /// bytes.
    ///
    /// Returns [`Flow::Finished`] on the first terminal event (or `data: [DONE]`), after which
    /// further events are ignored unparsed; the caller then calls [`Self::finish`].
    pub fn push(&mut self, name: &[u8], data: &[u8]) -> Result<Flow, AggregateError> {
        if self.ending.is_some() || self.done_marker {
            return Ok(Flow::Finished);
        }
        let trimmed = data.trim_ascii();
        if trimmed.is_empty() {
            // `event: ping` or `id: 5` alone: nothing to parse (D27).
            return Ok(Flow::Continue);
        }
        if trimmed == b"[DONE]" {
            // Not part of the Responses protocol, but a clear end of stream; `finish` decides
            // whether a terminal event came before it.
            self.done_marker = true;
            return Ok(Flow::Finished);
        }
        // The untrimmed bytes, as the parse below reads them: `trim_ascii` also strips form
        // feeds, which JSON does not count as whitespace.
        if let Some(text) = self.repeat.template.text_of(data) {
            if self.append_repeated(&text) {
                return Ok(Flow::Continue);
            }
        }
        // Learned again below when this event qualifies as a template.
        self.repeat.template.clear();
        let event = parse_event(data)?;
        let name = std::str::from_utf8(name).unwrap_or("").trim();
        // D8: the JSON `type` decides; the SSE `event:` name is only a fallback.
        let json_type = event.ty.as_deref().filter(|t| !t.is_empty());
        let ty = json_type.unwrap_or(name);

        match ty {
            "response.completed" => self.complete(Terminal::Completed, &event),
            "response.incomplete" => self.complete(Terminal::Incomplete, &event),
            "response.failed" => self.fail(&event),
            "error" => Err(AggregateError::Upstream(Box::new(error_event(
                &event, None,
            )))),
            "keepalive" => Ok(Flow::Continue),
            // `event: error` whose JSON `type` is not an event type is an error payload that
            // names its own error type (`{"type":"server_error","message":…}`).
            _ if name == "error" && !ty.starts_with("response.") => Err(AggregateError::Upstream(
                Box::new(error_event(&event, json_type)),
            )),
            // Neither a type nor a name, but a truthy `error` member (as the SDK tests it): a
            // chat-style error frame that a compatible provider sent on a Responses stream
            // (D11). `"error": false`, `""` or `{}` is no error.
            "" if event.error.is_some_and(|raw| {
                serde_json::from_str::<Value>(raw.get()).is_ok_and(|v| super::chat::truthy(&v))
            }) =>
            {
                Err(AggregateError::Upstream(Box::new(error_event(
                    &event, None,
                ))))
            }
            _ => {
                if ty.starts_with("response.") {
                    self.note_lifecycle_usage(&event);
                }
                self.item_event(ty, &event);
                // Only by the JSON `type`: the template does not compare the `event:` name, which
                // decides when there is none.
                if let Some(ty) = json_type {
                    self.learn(data, ty, &event);
                }
                Ok(Flow::Continue)
            }
        }
    }

    /// Builds the body after [`Flow::Finished`] or at a clean end of the upstream stream.
    pub fn finish(mut self) -> Result<Aggregate, AggregateError> {
        let (terminal, body) = match self.ending.take() {
            None => return Err(AggregateError::Truncated(TERMINAL_EXPECTED)),
            Some(Ending::Failed(error)) => return Err(AggregateError::Upstream(Box::new(error))),
            Some(Ending::Response { terminal, body }) => (terminal, body),
        };
        let object: RawObject<'_> = serde_json::from_slice(&body)
            .map_err(|e| malformed(format!("terminal response object: {e}")))?;

        let terminal_usage = object.get("usage").filter(|raw| !is_null(raw));
        let patch_usage = terminal_usage.is_none() && self.earlier_usage.is_some();
        let usage = terminal_usage
            .or(self.earlier_usage.as_deref())
            .and_then(token_usage);
        let output_missing = object.get("output").is_none_or(is_null_or_empty_array);
        let unplaced = match &self.unplaced_item {
            _ if !output_missing => None,
            Some(what) => Some(what.as_str()),
            None if self.added_items_missing() => {
                Some("response.output_item.added without a usable output_index")
            }
            None => None,
        };
        if let Some(what) = unplaced {
            // The output must come from the streamed items and one of them has no place:
            // answering without it would be a silently incomplete body (D27).
            return Err(malformed(format!(
                "{what}; the response's output has to be rebuilt from the streamed items"
            )));
        }
        let fill_output = output_missing && self.items.values().any(ItemSlot::yields_item);

        if !fill_output && !patch_usage {
            drop(object);
            return Ok(Aggregate {
                body,
                terminal,
                usage,
            });
        }
        if fill_output && self.unplaced_delta && self.items.values().any(|s| s.done.is_none()) {
            // Some item is rebuilt from its deltas and a delta had no place: its text could
            // be the one missing.
            return Err(malformed(
                "an item event without a usable output_index or item_id, while the \
                 response's output has to be rebuilt from the streamed events"
                    .to_owned(),
            ));
        }

        let mut out = Vec::with_capacity(body.len() + self.items.len() * 256);
        out.push(b'{');
        let (mut wrote_output, mut wrote_usage) = (false, false);
        let mut items = Some(self.items);
        let earlier_usage = self.earlier_usage.as_deref();
        for (key, raw) in &object.entries {
            let key = key.as_ref();
            if fill_output && key == "output" {
                // Duplicate keys: the replacement goes where the first one stood.
                if !wrote_output {
                    write_key(&mut out, key)?;
                    write_output(&mut out, items.take().unwrap_or_default())?;
                    wrote_output = true;
                }
            } else if patch_usage && key == "usage" {
                if let (false, Some(usage)) = (wrote_usage, earlier_usage) {
                    write_key(&mut out, key)?;
                    out.extend_from_slice(usage.get().as_bytes());
                    wrote_usage = true;
                }
            } else {
                write_key(&mut out, key)?;
                out.extend_from_slice(raw.get().as_bytes());
            }
        }
        if fill_output && !wrote_output {
            write_key(&mut out, "output")?;
            write_output(&mut out, items.take().unwrap_or_default())?;
        }
        if let (true, false, Some(usage)) = (patch_usage, wrote_usage, earlier_usage) {
            write_key(&mut out, "usage")?;
            out.extend_from_slice(usage.get().as_bytes());
        }
        out.push(b'}');
        Ok(Aggregate {
            body: out,
            terminal,
            usage,
        })
    }

    fn complete(&mut self, terminal: Terminal, event: &Event<'_>) -> Result<Flow, AggregateError> {
        let response = terminal_response(event)?;
        self.ending = Some(Ending::Response {
            terminal,
            body: response.get().as_bytes().to_vec(),
        });
        Ok(Flow::Finished)
    }

    fn fail(&mut self, event: &Event<'_>) -> Result<Flow, AggregateError> {
        let error_member = match (terminal_response(event), event.error) {
            (Ok(response), _) => {
                let object: RawObject<'_> = serde_json::from_str(response.get())
                    .map_err(|e| malformed(format!("response.failed response: {e}")))?;
                object.get("error")
            }
            // No `response`, but the error beside it (some compatible servers): the client
            // still gets the upstream's own error (D12), not a 502 about the event's shape.
            (Err(_), Some(error)) if !is_null(error) => Some(error),
            (Err(e), _) => return Err(e),
        };
        let error = match error_member.filter(|raw| !is_null(raw)) {
            Some(raw) => {
                let parts = ErrorParts::from_error_member(raw);
                parts.build(500, FAILED_DEFAULT_MESSAGE)
            }
            None => UpstreamStreamError {
                status: 500,
                message: FAILED_WITHOUT_ERROR.to_owned(),
                error_type: "server_error".to_owned(),
                code: Value::Null,
                param: Value::Null,
            },
        };
        self.ending = Some(Ending::Failed(error));
        Ok(Flow::Finished)
    }

    /// Remembers the `usage` of a non-terminal lifecycle event, for a terminal event that
    /// lacks one. Lifecycle events are a handful per stream, so the second look at their
    /// `response` (a skim of its top-level members) is cheap.
    fn note_lifecycle_usage(&mut self, event: &Event<'_>) {
        let Some(response) = event.response.filter(|raw| is_object(raw)) else {
            return;
        };
        if !may_carry_usage(response.get().as_bytes()) {
            return;
        }
        let Ok(object) = serde_json::from_str::<RawObject<'_>>(response.get()) else {
            return;
        };
        if let Some(usage) = object.get("usage").filter(|raw| is_object(raw)) {
            self.earlier_usage = Some(usage.to_owned());
        }
    }

    /// Records what an item-building event contributes to a possible output rebuild.
    fn item_event(&mut self, ty: &str, event: &Event<'_>) {
        let Some(kind) = ty.strip_prefix("response.") else {
            return;
        };
        match kind {
            "output_item.added" | "output_item.done" => self.output_item(kind, event),
            "content_part.added"
            | "content_part.done"
            | "reasoning_summary_part.added"
            | "reasoning_summary_part.done" => {
                // Message content parts and reasoning summary parts differ only in which
                // index names them and which list of the item they fill.
                let summary = kind.starts_with("reasoning");
                let raw_index = if summary {
                    event.summary_index
                } else {
                    event.content_index
                };
                let Some(index) = sub_index(raw_index) else {
                    self.unplaced_delta = true;
                    return;
                };
                let Some(part) = event.part.filter(|raw| is_object(raw)) else {
                    return;
                };
                let item_type = if summary { "reasoning" } else { "message" };
                if let Some(slot) = self.slot(event, item_type) {
                    let parts = if summary {
                        &mut slot.summary
                    } else {
                        &mut slot.content
                    };
                    let state = parts.entry(index).or_default();
                    let part = Some(part.to_owned());
                    if kind.ends_with("added") {
                        state.added = part;
                    } else {
                        state.done = part;
                    }
                }
            }
            "output_text.delta" | "output_text.done" => {
                let done = kind.ends_with("done");
                let text = if done { &event.text } else { &event.delta };
                let logprobs = event.logprobs;
                self.with_part(
                    event,
                    event.content_index,
                    Parts::Content,
                    "message",
                    |part| {
                        part.kind.get_or_insert("output_text");
                        if let Some(text) = text {
                            part.set_or_append_text(text, done);
                        }
                        match logprobs {
                            Some(raw) if done => part.logprobs_done = Some(raw.to_owned()),
                            Some(raw) if !is_null_or_empty_array(raw) => {
                                part.logprobs.push(raw.to_owned())
                            }
                            _ => {}
                        }
                    },
                );
            }
            "refusal.delta" | "refusal.done" => {
                let done = kind.ends_with("done");
                let text = if done { &event.refusal } else { &event.delta };
                self.with_part(
                    event,
                    event.content_index,
                    Parts::Content,
                    "message",
                    |part| {
                        part.kind.get_or_insert("refusal");
                        if let Some(text) = text {
                            let refusal = part.refusal.get_or_insert_with(String::new);
                            if done {
                                refusal.clear();
                            }
                            refusal.push_str(text);
                        }
                    },
                );
            }
            "output_text.annotation.added" => {
                let Some(annotation) = event.annotation else {
                    return;
                };
                let index = event.annotation_index.map(|raw| raw.get().parse::<u64>());
                self.with_part(
                    event,
                    event.content_index,
                    Parts::Content,
                    "message",
                    |part| {
                        part.kind.get_or_insert("output_text");
                        let index = match index {
                            Some(Ok(i)) => i,
                            // No index: the next one; a bad index: unplaceable, dropped.
                            None => part
                                .annotations
                                .last_key_value()
                                .map_or(0, |(i, _)| i.saturating_add(1)),
                            Some(Err(_)) => return,
                        };
                        part.annotations.insert(index, annotation.to_owned());
                    },
                );
            }
            "reasoning_summary_text.delta"
            | "reasoning_summary_text.done"
            | "reasoning_text.delta"
            | "reasoning_text.done" => {
                // Summary text and reasoning text fill different lists of a reasoning item.
                let done = kind.ends_with("done");
                let text = if done { &event.text } else { &event.delta };
                let (index, parts, part_type) = if kind.starts_with("reasoning_summary") {
                    (event.summary_index, Parts::Summary, "summary_text")
                } else {
                    (event.content_index, Parts::Content, "reasoning_text")
                };
                self.with_part(event, index, parts, "reasoning", |part| {
                    part.kind.get_or_insert(part_type);
                    if let Some(text) = text {
                        part.set_or_append_text(text, done);
                    }
                });
            }
            "function_call_arguments.delta" | "function_call_arguments.done" => {
                self.item_text(event, kind, "function_call", "arguments", &event.arguments);
            }
            "mcp_call_arguments.delta" | "mcp_call_arguments.done" => {
                self.item_text(event, kind, "mcp_call", "arguments", &event.arguments);
            }
            "custom_tool_call_input.delta" | "custom_tool_call_input.done" => {
                self.item_text(event, kind, "custom_tool_call", "input", &event.input);
            }
            "code_interpreter_call_code.delta" | "code_interpreter_call_code.done" => {
                // `code` is the code text here (on `error` events it is an error code).
                let code = event.code.and_then(raw_string).map(Cow::Owned);
                self.item_text(event, kind, "code_interpreter_call", "code", &code);
            }
            _ => {
                // Status events: `response.<kind>.<status>`.
                let Some((item_kind, state)) = kind.split_once('.') else {
                    return;
                };
                let item_kind = STATUS_EVENT_KINDS.iter().find(|k| **k == item_kind);
                let state = STATUS_EVENT_STATES.iter().find(|s| **s == state);
                if let (Some(item_kind), Some(state)) = (item_kind, state) {
                    if let Some(slot) = self.slot(event, item_kind) {
                        slot.status = Some(*state);
                    }
                }
            }
        }
    }

    /// Whether an `output_item.added` that had no place lacks a placed `done` with its id
    /// (then its content would be missing from a rebuilt output). Only looked at when the
    /// output is rebuilt, so the done items' ids are read only then.
    fn added_items_missing(&self) -> bool {
        if self.unplaced_added.is_empty() {
            return false;
        }
        let placed: Vec<String> = self
            .items
            .values()
            .filter_map(|slot| slot.done.as_deref())
            .filter_map(|raw| serde_json::from_str::<RawObject<'_>>(raw.get()).ok())
            .filter_map(|object| object.get("id").and_then(raw_string))
            .collect();
        self.unplaced_added
            .iter()
            .any(|id| id.as_ref().is_none_or(|id| !placed.contains(id)))
    }

    fn output_item(&mut self, kind: &str, event: &Event<'_>) {
        let Some(item) = event.item.filter(|raw| is_object(raw)) else {
            self.unplaced_item = Some(format!("response.{kind} without an item object"));
            return;
        };
        // Only `added` items are skimmed for their id (small: content still empty); a `done`
        // item is stored as raw bytes and never looked into.
        let id = if kind == "output_item.added" {
            serde_json::from_str::<RawObject<'_>>(item.get())
                .ok()
                .and_then(|o| o.get("id").and_then(raw_string))
        } else {
            None
        };
        let index = match event.output_index {
            Some(raw) => raw.get().parse::<u64>().ok(),
            None => event
                .item_id
                .as_deref()
                .or(id.as_deref())
                .and_then(|id| self.ids.get(id).copied()),
        };
        let Some(index) = index else {
            if kind == "output_item.added" {
                // Not an error yet: its `done` may come with a place (B58 asks that of the
                // done event only).
                self.unplaced_added.push(id);
            } else {
                self.unplaced_item = Some(format!("response.{kind} without a usable output_index"));
            }
            return;
        };
        let slot = self.items.entry(index).or_default();
        if kind == "output_item.done" {
            // Authoritative (B57): a later done for the same index overwrites, and the
            // rebuild state is dropped because it can no longer be needed.
            *slot = ItemSlot {
                done: Some(item.to_owned()),
                ..ItemSlot::default()
            };
        } else if slot.done.is_none() {
            slot.added = Some(item.to_owned());
            if let Some(id) = id {
                self.ids.insert(id, index);
            }
        }
    }

    /// The `output_index` of the item an event is about: its own, or its `item_id`'s.
    fn output_index(&self, event: &Event<'_>) -> Option<u64> {
        match event.output_index {
            Some(raw) => raw.get().parse::<u64>().ok(),
            None => event
                .item_id
                .as_deref()
                .and_then(|id| self.ids.get(id).copied()),
        }
    }

    /// The slot an item event belongs to, or `None` when the event cannot be placed or its
    /// item is already done (then the event cannot change the answer).
    fn slot(&mut self, event: &Event<'_>, kind: &'static str) -> Option<&mut ItemSlot> {
        let Some(index) = self.output_index(event) else {
            self.unplaced_delta = true;
            return None;
        };
        let slot = self.items.entry(index).or_default();
        if slot.done.is_some() {
            return None;
        }
        slot.kind.get_or_insert(kind);
        if slot.id.is_none() {
            slot.id = event.item_id.as_deref().map(str::to_owned);
        }
        Some(slot)
    }

    /// Appends a repeated delta's text where the learned one's went; `false` when that part or
    /// item is gone or done (it never is: the state only changes through events parsed whole,
    /// which learn a template or clear it).
    fn append_repeated(&mut self, text: &str) -> bool {
        let Some(target) = self.repeat.target else {
            return false;
        };
        let Some(acc) = self.delta_text(target) else {
            return false;
        };
        acc.push_str(text);
        #[cfg(test)]
        {
            self.repeat.appended += 1;
        }
        true
    }

    /// The accumulated text a delta went to, while its item and part are not done.
    fn delta_text(&mut self, target: DeltaTarget) -> Option<&mut String> {
        match target {
            DeltaTarget::Part { item, parts, part } => {
                let slot = self
                    .items
                    .get_mut(&item)
                    .filter(|slot| slot.done.is_none())?;
                let map = match parts {
                    Parts::Content => &mut slot.content,
                    Parts::Summary => &mut slot.summary,
                };
                map.get_mut(&part)
                    .filter(|part| part.done.is_none())?
                    .text
                    .as_mut()
            }
            DeltaTarget::ItemText { item, field } => self
                .items
                .get_mut(&item)
                .filter(|slot| slot.done.is_none())?
                .texts
                .get_mut(field),
        }
    }

    /// Learns `data`, a text delta of type `ty` just applied, as the template of the deltas
    /// that repeat it with other text: when it has neither logprobs to append nor a
    /// `response`, its text has no escapes (so its token's place in `data` is known), and the
    /// text went to an item and part that are not done. `sequence_number` and `obfuscation`
    /// may differ.
    fn learn(&mut self, data: &[u8], ty: &str, event: &Event<'_>) {
        let Some(goes_to) = DeltaPlace::of(ty) else {
            return;
        };
        #[cfg(test)]
        if self.parse_every_event_whole {
            return;
        }
        if event.response.is_some()
            || event
                .logprobs
                .is_some_and(|raw| !is_null_or_empty_array(raw))
        {
            return;
        }
        let Some(Cow::Borrowed(text)) = &event.delta else {
            return;
        };
        let base = data.as_ptr() as usize;
        let Some(start) = (text.as_ptr() as usize).checked_sub(base + 1) else {
            return;
        };
        let token = start..start + text.len() + 2;
        let place = |raw: &RawValue| {
            let start = raw.get().as_ptr() as usize - base;
            start..start + raw.get().len()
        };
        let mut ignored = [0..0, 0..0];
        let mut holes = 0;
        for raw in [event.sequence_number, event.obfuscation]
            .into_iter()
            .flatten()
        {
            if raw
                .get()
                .starts_with(['"', '-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9'])
            {
                ignored[holes] = place(raw);
                holes += 1;
            }
        }
        let Some(item) = self.output_index(event) else {
            return;
        };
        let target = match goes_to {
            DeltaPlace::Part(parts) => {
                let index = match parts {
                    Parts::Content => event.content_index,
                    Parts::Summary => event.summary_index,
                };
                let Some(part) = sub_index(index) else {
                    return;
                };
                DeltaTarget::Part { item, parts, part }
            }
            DeltaPlace::ItemText(field) => DeltaTarget::ItemText { item, field },
        };
        if self.delta_text(target).is_some()
            && self.repeat.template.learn(data, token, &ignored[..holes])
        {
            self.repeat.target = Some(target);
        }
    }

    fn with_part(
        &mut self,
        event: &Event<'_>,
        sub_index_raw: Option<&RawValue>,
        parts: Parts,
        item_kind: &'static str,
        update: impl FnOnce(&mut PartState),
    ) {
        let Some(index) = sub_index(sub_index_raw) else {
            self.unplaced_delta = true;
            return;
        };
        if let Some(slot) = self.slot(event, item_kind) {
            let map = match parts {
                Parts::Content => &mut slot.content,
                Parts::Summary => &mut slot.summary,
            };
            let part = map.entry(index).or_default();
            if part.done.is_none() {
                update(part);
            }
        }
    }

    /// `arguments` / `input` / `code` of a tool-call item: deltas append, `.done` replaces.
    fn item_text(
        &mut self,
        event: &Event<'_>,
        kind: &str,
        item_kind: &'static str,
        field: &'static str,
        done_value: &Option<Cow<'_, str>>,
    ) {
        let done = kind.ends_with("done");
        let text = if done { done_value } else { &event.delta };
        if let Some(slot) = self.slot(event, item_kind) {
            let Some(text) = text else {
                return;
            };
            let target = slot.texts.entry(field).or_default();
            if done {
                target.clear();
            }
            target.push_str(text);
        }
    }
}

/// The text deltas a template may stand for: where `item_event` puts each one's text.
#[derive(Clone, Copy)]
enum DeltaPlace {
    /// The text of a content or summary part of the item.
    Part(Parts),
    /// A text field of a tool-call item.
    ItemText(&'static str),
}

impl DeltaPlace {
    fn of(ty: &str) -> Option<Self> {
        Some(match ty.strip_prefix("response.")? {
            "output_text.delta" | "reasoning_text.delta" => DeltaPlace::Part(Parts::Content),
            "reasoning_summary_text.delta" => DeltaPlace::Part(Parts::Summary),
            "function_call_arguments.delta" | "mcp_call_arguments.delta" => {
                DeltaPlace::ItemText("arguments")
            }
            "custom_tool_call_input.delta" => DeltaPlace::ItemText("input"),
            "code_interpreter_call_code.delta" => DeltaPlace::ItemText("code"),
            _ => return None,
        })
    }
}

/// Where a learned delta's text went.
#[derive(Debug, Clone, Copy)]
enum DeltaTarget {
    Part { item: u64, parts: Parts, part: u64 },
    ItemText { item: u64, field: &'static str },
}

#[derive(Debug, Clone, Copy)]
enum Parts {
    Content,
    Summary,
}

/// `content_index` / `summary_index`: absent means 0 (lenient towards compatible providers
/// that omit it on single-part items); present but not a non-negative integer is unplaceable.
fn sub_index(raw: Option<&RawValue>) -> Option<u64> {
    match raw {
        None => Some(0),
        Some(raw) => raw.get().parse::<u64>().ok(),
    }
}

/// Whether a `response` object's bytes may hold a `usage` that is not null, found without
/// parsing them: lifecycle events carry the whole response (instructions, tools, …) and
/// almost always `"usage":null`.
///
/// Of JSON's escapes only `\uXXXX` can stand for a letter, so without `\u` in the bytes a
/// `usage` key is spelt `"usage"`, followed by a colon. That spelling can also occur inside
/// a string only next to an escaped quote (`say \"usage": 1` as a key, say), which at worst
/// makes this answer "may" for nothing; a real key is never missed. So when every occurrence
/// is followed by `null` there is nothing to remember. Instructions with line breaks (`\n`)
/// are the common case this keeps cheap.
fn may_carry_usage(response: &[u8]) -> bool {
    if memchr::memmem::find(response, b"\\u").is_some() {
        return true;
    }
    memchr::memmem::find_iter(response, b"\"usage\"").any(|at| {
        let after = response[at + 7..].trim_ascii_start();
        match after.strip_prefix(b":") {
            Some(value) => !value.trim_ascii_start().starts_with(b"null"),
            // A string value `"usage"`, not a key.
            None => false,
        }
    })
}

fn terminal_response<'a>(event: &Event<'a>) -> Result<&'a RawValue, AggregateError> {
    event
        .response
        .filter(|raw| is_object(raw))
        .ok_or_else(|| malformed("terminal event without a response object".to_owned()))
}

fn malformed(what: String) -> AggregateError {
    AggregateError::Malformed(what)
}

/// Parses one event's data, telling a corrupt stream (invalid JSON → `InvalidJson`) apart from
/// valid JSON of the wrong shape (not an object → `Malformed`, B58).
fn parse_event(data: &[u8]) -> Result<Event<'_>, AggregateError> {
    match parse_event_data::<Event<'_>>(data) {
        Ok(event) => Ok(event),
        Err(e) if e.is_data() => {
            // The visitor only rejects a non-object; check the rest is JSON at all (this path
            // is never taken by a well-formed stream, so the second pass costs nothing).
            match serde_json::from_slice::<IgnoredAny>(data) {
                Err(syntax) => Err(AggregateError::InvalidJson(syntax)),
                Ok(_) => Err(malformed(format!("event data is not a JSON object: {e}"))),
            }
        }
        Err(e) => Err(AggregateError::InvalidJson(e)),
    }
}

// ------------------------------------------------------------------------------------------
// Error payloads
// ------------------------------------------------------------------------------------------

/// The members of an upstream error payload, borrowed from the event data.
#[derive(Default)]
struct ErrorParts<'a> {
    code: Option<&'a RawValue>,
    message: Option<&'a RawValue>,
    error_type: Option<Cow<'a, str>>,
    param: Option<&'a RawValue>,
    /// `error` was a bare string: that string is the message.
    bare_message: Option<String>,
}

impl<'a> ErrorParts<'a> {
    /// From an `error` member: an object with `code`/`message`/`type`/`param`, or a bare
    /// string taken as the message. Anything else carries nothing usable.
    fn from_error_member(raw: &'a RawValue) -> Self {
        if is_object(raw) {
            if let Ok(object) = serde_json::from_str::<RawObject<'a>>(raw.get()) {
                return Self {
                    code: object.get("code"),
                    message: object.get("message"),
                    error_type: object.get("type").and_then(raw_string).map(Cow::Owned),
                    param: object.get("param"),
                    bare_message: None,
                };
            }
        }
        Self {
            bare_message: raw_string(raw),
            ..Self::default()
        }
    }

    fn build(self, default_status: u16, default_message: &str) -> UpstreamStreamError {
        let code = self.code.map_or(Value::Null, raw_to_value);
        let error_type = self.error_type.filter(|t| !t.is_empty());
        let (status, mapped_type) =
            status_for_error_code(&code, error_type.as_deref(), default_status);
        let message = self
            .bare_message
            .or_else(|| self.message.and_then(message_text))
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| default_message.to_owned());
        UpstreamStreamError {
            status,
            message,
            // The upstream's own type wins over the mapping (B62).
            error_type: error_type.map_or_else(|| mapped_type.to_owned(), Cow::into_owned),
            code,
            param: self.param.map_or(Value::Null, raw_to_value),
        }
    }
}

/// An `error` event (D11): the payload sits at the top level (`{type:"error", code, message,
/// param}`, OpenAI) or under `error` (other providers); top-level members fill what a nested
/// object lacks. `own_type` is the JSON `type` when it names the error rather than the event.
fn error_event(event: &Event<'_>, own_type: Option<&str>) -> UpstreamStreamError {
    let mut parts = event
        .error
        .map(ErrorParts::from_error_member)
        .unwrap_or_default();
    parts.code = parts.code.or(event.code);
    parts.message = parts.message.or(event.message);
    parts.param = parts.param.or(event.param);
    if parts.error_type.is_none() {
        parts.error_type = own_type.map(|t| Cow::Owned(t.to_owned()));
    }
    parts.build(400, ERROR_EVENT_DEFAULT_MESSAGE)
}

fn message_text(raw: &RawValue) -> Option<String> {
    if is_null(raw) {
        None
    } else {
        // A non-string message is shown as the JSON it is rather than dropped.
        raw_string(raw).or_else(|| Some(raw.get().to_owned()))
    }
}

// ------------------------------------------------------------------------------------------
// Output rebuild
// ------------------------------------------------------------------------------------------

/// Everything seen about one output item. Once `done` is set the rest is cleared and stays
/// empty: the done item is authoritative (semantics §3.3).
#[derive(Debug, Default)]
struct ItemSlot {
    done: Option<Box<RawValue>>,
    added: Option<Box<RawValue>>,
    /// `item_id` of the item's events, for an item rebuilt without `output_item.added`.
    id: Option<String>,
    /// Item type implied by the first event, for an item rebuilt without `added`.
    kind: Option<&'static str>,
    status: Option<&'static str>,
    /// `arguments` / `input` / `code`.
    texts: BTreeMap<&'static str, String>,
    content: BTreeMap<u64, PartState>,
    summary: BTreeMap<u64, PartState>,
}

/// One content or summary part of an item being rebuilt.
#[derive(Debug, Default)]
struct PartState {
    /// `content_part.done` / `reasoning_summary_part.done`: authoritative for the part.
    done: Option<Box<RawValue>>,
    added: Option<Box<RawValue>>,
    kind: Option<&'static str>,
    text: Option<String>,
    refusal: Option<String>,
    annotations: BTreeMap<u64, Box<RawValue>>,
    /// Non-empty `logprobs` arrays of the text deltas, concatenated at the end.
    logprobs: Vec<Box<RawValue>>,
    /// `output_text.done.logprobs`, which replaces the delta ones.
    logprobs_done: Option<Box<RawValue>>,
}

impl PartState {
    fn set_or_append_text(&mut self, text: &str, replace: bool) {
        let target = self.text.get_or_insert_with(String::new);
        if replace {
            target.clear();
        }
        target.push_str(text);
    }

    /// The rebuilt part; `existing` is the entry at the same index in the `added` item.
    fn into_value(self, existing: Option<Value>) -> Result<Value, AggregateError> {
        if let Some(done) = &self.done {
            let mut part = raw_to_value_checked(done)?;
            // OpenAI's `content_part.done` carries `"logprobs": []` even when the text had
            // logprobs (captured: 9 in `output_text.done` and in the final item, none in the
            // part), so the part alone would drop them.
            if let Some(slot) = part
                .get_mut("logprobs")
                .filter(|v| v.as_array().is_some_and(Vec::is_empty))
            {
                if let Some(logprobs) = self.text_logprobs()? {
                    *slot = logprobs;
                }
            }
            return Ok(part);
        }
        let logprobs = self.text_logprobs()?;
        let base = match self
            .added
            .as_deref()
            .map(raw_to_value_checked)
            .transpose()?
        {
            Some(Value::Object(map)) => Some(map),
            _ => match existing {
                Some(Value::Object(map)) => Some(map),
                _ => None,
            },
        };
        let mut part = base.unwrap_or_else(|| default_part(self.kind.unwrap_or("output_text")));
        if let Some(text) = self.text {
            part.insert("text".to_owned(), Value::String(text));
        }
        if let Some(refusal) = self.refusal {
            part.insert("refusal".to_owned(), Value::String(refusal));
        }
        if !self.annotations.is_empty() {
            let mut merged = indexed(part.get_mut("annotations").map(Value::take));
            for (index, raw) in self.annotations {
                merged.insert(index, raw_to_value_checked(&raw)?);
            }
            part.insert(
                "annotations".to_owned(),
                Value::Array(merged.into_values().collect()),
            );
        }
        if let Some(logprobs) = logprobs {
            part.insert("logprobs".to_owned(), logprobs);
        }
        Ok(Value::Object(part))
    }

    /// The text's logprobs: `output_text.done`'s, else the deltas' concatenated; `None` when
    /// neither had any.
    fn text_logprobs(&self) -> Result<Option<Value>, AggregateError> {
        if let Some(raw) = &self.logprobs_done {
            return raw_to_value_checked(raw).map(Some);
        }
        if self.logprobs.is_empty() {
            return Ok(None);
        }
        let mut all = Vec::new();
        for raw in &self.logprobs {
            if let Value::Array(chunk) = raw_to_value_checked(raw)? {
                all.extend(chunk);
            }
        }
        Ok(Some(Value::Array(all)))
    }
}

fn default_part(kind: &str) -> Map<String, Value> {
    let mut part = Map::new();
    part.insert("type".to_owned(), Value::String(kind.to_owned()));
    match kind {
        "refusal" => {
            part.insert("refusal".to_owned(), Value::String(String::new()));
        }
        "output_text" => {
            part.insert("annotations".to_owned(), Value::Array(Vec::new()));
            part.insert("text".to_owned(), Value::String(String::new()));
        }
        _ => {
            part.insert("text".to_owned(), Value::String(String::new()));
        }
    }
    part
}

/// An array member as index → entry, so parts can be overlaid by their upstream index
/// without a `Vec` sized by that index.
fn indexed(value: Option<Value>) -> BTreeMap<u64, Value> {
    match value {
        Some(Value::Array(entries)) => (0u64..).zip(entries).collect(),
        _ => BTreeMap::new(),
    }
}

enum BuiltItem {
    Raw(Box<RawValue>),
    Rebuilt(Value),
}

impl ItemSlot {
    /// Whether this slot produces an output item: a done or added item, or at least an event
    /// that tells which kind of item it was.
    fn yields_item(&self) -> bool {
        self.done.is_some() || self.added.is_some() || self.kind.is_some()
    }

    fn into_item(self) -> Result<Option<BuiltItem>, AggregateError> {
        if let Some(done) = self.done {
            return Ok(Some(BuiltItem::Raw(done)));
        }
        let mut item = match self
            .added
            .as_deref()
            .map(raw_to_value_checked)
            .transpose()?
        {
            Some(Value::Object(map)) => map,
            _ => match self.kind {
                Some(kind) => default_item(kind, self.id),
                None => return Ok(None),
            },
        };
        if let Some(status) = self.status {
            item.insert("status".to_owned(), Value::String(status.to_owned()));
        }
        for (field, text) in self.texts {
            item.insert(field.to_owned(), Value::String(text));
        }
        merge_parts(&mut item, "content", self.content)?;
        merge_parts(&mut item, "summary", self.summary)?;
        Ok(Some(BuiltItem::Rebuilt(Value::Object(item))))
    }
}

fn default_item(kind: &str, id: Option<String>) -> Map<String, Value> {
    let mut item = Map::new();
    if let Some(id) = id {
        item.insert("id".to_owned(), Value::String(id));
    }
    item.insert("type".to_owned(), Value::String(kind.to_owned()));
    match kind {
        "message" => {
            item.insert("role".to_owned(), Value::String("assistant".to_owned()));
            item.insert("content".to_owned(), Value::Array(Vec::new()));
        }
        "reasoning" => {
            item.insert("summary".to_owned(), Value::Array(Vec::new()));
        }
        _ => {}
    }
    item
}

fn merge_parts(
    item: &mut Map<String, Value>,
    key: &str,
    parts: BTreeMap<u64, PartState>,
) -> Result<(), AggregateError> {
    if parts.is_empty() {
        return Ok(());
    }
    let mut merged = indexed(item.get_mut(key).map(Value::take));
    for (index, part) in parts {
        let existing = merged.remove(&index);
        merged.insert(index, part.into_value(existing)?);
    }
    // `insert` keeps the key's position when it already exists (preserve_order).
    item.insert(key.to_owned(), Value::Array(merged.into_values().collect()));
    Ok(())
}

/// Writes `[item, …]` in `output_index` order: done items as their raw bytes, rebuilt ones
/// serialised (the only serialisation `finish` does).
fn write_output(out: &mut Vec<u8>, items: BTreeMap<u64, ItemSlot>) -> Result<(), AggregateError> {
    out.push(b'[');
    let mut first = true;
    for slot in items.into_values() {
        let Some(item) = slot.into_item()? else {
            continue;
        };
        if !first {
            out.push(b',');
        }
        first = false;
        match item {
            BuiltItem::Raw(raw) => out.extend_from_slice(raw.get().as_bytes()),
            BuiltItem::Rebuilt(value) => serde_json::to_writer(&mut *out, &value)
                .map_err(|e| malformed(format!("rebuilt output item: {e}")))?,
        }
    }
    out.push(b']');
    Ok(())
}

/// Writes `,"key":` (without the comma for the first member).
fn write_key(out: &mut Vec<u8>, key: &str) -> Result<(), AggregateError> {
    if out.len() > 1 {
        out.push(b',');
    }
    serde_json::to_writer(&mut *out, key).map_err(|e| malformed(format!("key {key:?}: {e}")))?;
    out.push(b':');
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Usage
// ------------------------------------------------------------------------------------------

fn token_usage(raw: &RawValue) -> Option<TokenUsage> {
    let usage = serde_json::from_str::<RawObject<'_>>(raw.get()).ok()?;
    let detail = |member: &str, key: &str| {
        let details = serde_json::from_str::<RawObject<'_>>(usage.get(member)?.get()).ok()?;
        count(details.get(key))
    };
    Some(TokenUsage {
        input: count(usage.get("input_tokens")),
        output: count(usage.get("output_tokens")),
        total: count(usage.get("total_tokens")),
        cached: detail("input_tokens_details", "cached_tokens"),
        reasoning: detail("output_tokens_details", "reasoning_tokens"),
    })
}

/// A token count as the upstream wrote it; anything but a non-negative integer is "unknown".
fn count(raw: Option<&RawValue>) -> Option<u64> {
    raw?.get().parse().ok()
}

// ------------------------------------------------------------------------------------------
// Raw JSON helpers
// ------------------------------------------------------------------------------------------

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

fn is_object(raw: &RawValue) -> bool {
    raw.get().starts_with('{')
}

fn is_null_or_empty_array(raw: &RawValue) -> bool {
    let text = raw.get();
    text == "null"
        || text
            .strip_prefix('[')
            .is_some_and(|rest| rest.trim_start().starts_with(']'))
}

fn raw_string(raw: &RawValue) -> Option<String> {
    if raw.get().starts_with('"') {
        serde_json::from_str(raw.get()).ok()
    } else {
        None
    }
}

/// For members copied into the client's error (`code`, `param`): already validated JSON.
fn raw_to_value(raw: &RawValue) -> Value {
    serde_json::from_str(raw.get()).unwrap_or(Value::Null)
}

fn raw_to_value_checked(raw: &RawValue) -> Result<Value, AggregateError> {
    serde_json::from_str(raw.get()).map_err(|e| malformed(format!("streamed item: {e}")))
}

// ------------------------------------------------------------------------------------------
// Deserialisation: one pass per event, borrowed fields only
// ------------------------------------------------------------------------------------------

/// The fields of any Responses event this module reads. Hand-written rather than derived so
/// that a field of an unexpected type (a number where a string was expected) in an event we
/// don't use is skipped instead of failing the stream, and a repeated key keeps its last value
/// like every JSON object reader, instead of "duplicate field".
#[derive(Default)]
struct Event<'a> {
    ty: Option<Cow<'a, str>>,
    response: Option<&'a RawValue>,
    item: Option<&'a RawValue>,
    part: Option<&'a RawValue>,
    annotation: Option<&'a RawValue>,
    output_index: Option<&'a RawValue>,
    content_index: Option<&'a RawValue>,
    summary_index: Option<&'a RawValue>,
    annotation_index: Option<&'a RawValue>,
    item_id: Option<Cow<'a, str>>,
    delta: Option<Cow<'a, str>>,
    text: Option<Cow<'a, str>>,
    refusal: Option<Cow<'a, str>>,
    arguments: Option<Cow<'a, str>>,
    input: Option<Cow<'a, str>>,
    /// Error code on `error` events, code text on `code_interpreter_call_code.done`.
    code: Option<&'a RawValue>,
    message: Option<&'a RawValue>,
    param: Option<&'a RawValue>,
    error: Option<&'a RawValue>,
    logprobs: Option<&'a RawValue>,
    /// Read only for where they lie, by the event templates.
    sequence_number: Option<&'a RawValue>,
    obfuscation: Option<&'a RawValue>,
}

enum Field {
    Type,
    Response,
    Item,
    Part,
    Annotation,
    OutputIndex,
    ContentIndex,
    SummaryIndex,
    AnnotationIndex,
    ItemId,
    Delta,
    Text,
    Refusal,
    Arguments,
    Input,
    Code,
    Message,
    Param,
    Error,
    Logprobs,
    SequenceNumber,
    Obfuscation,
    Other,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl Visitor<'_> for FieldVisitor {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Field, E> {
                Ok(match name {
                    "type" => Field::Type,
                    "response" => Field::Response,
                    "item" => Field::Item,
                    "part" => Field::Part,
                    "annotation" => Field::Annotation,
                    "output_index" => Field::OutputIndex,
                    "content_index" => Field::ContentIndex,
                    "summary_index" => Field::SummaryIndex,
                    "annotation_index" => Field::AnnotationIndex,
                    "item_id" => Field::ItemId,
                    "delta" => Field::Delta,
                    "text" => Field::Text,
                    "refusal" => Field::Refusal,
                    "arguments" => Field::Arguments,
                    "input" => Field::Input,
                    "code" => Field::Code,
                    "message" => Field::Message,
                    "param" => Field::Param,
                    "error" => Field::Error,
                    "logprobs" => Field::Logprobs,
                    "sequence_number" => Field::SequenceNumber,
                    "obfuscation" => Field::Obfuscation,
                    _ => Field::Other,
                })
            }
        }
        deserializer.deserialize_identifier(FieldVisitor)
    }
}

impl<'de> Deserialize<'de> for Event<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EventVisitor;
        impl<'de> Visitor<'de> for EventVisitor {
            type Value = Event<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Event<'de>, A::Error> {
                let mut ev = Event::default();
                while let Some(field) = map.next_key::<Field>()? {
                    match field {
                        Field::Type => ev.ty = map.next_value::<Text<'de>>()?.0,
                        Field::Response => ev.response = map.next_value()?,
                        Field::Item => ev.item = map.next_value()?,
                        Field::Part => ev.part = map.next_value()?,
                        Field::Annotation => ev.annotation = map.next_value()?,
                        Field::OutputIndex => ev.output_index = map.next_value()?,
                        Field::ContentIndex => ev.content_index = map.next_value()?,
                        Field::SummaryIndex => ev.summary_index = map.next_value()?,
                        Field::AnnotationIndex => ev.annotation_index = map.next_value()?,
                        Field::ItemId => ev.item_id = map.next_value::<Text<'de>>()?.0,
                        Field::Delta => ev.delta = map.next_value::<Text<'de>>()?.0,
                        Field::Text => ev.text = map.next_value::<Text<'de>>()?.0,
                        Field::Refusal => ev.refusal = map.next_value::<Text<'de>>()?.0,
                        Field::Arguments => ev.arguments = map.next_value::<Text<'de>>()?.0,
                        Field::Input => ev.input = map.next_value::<Text<'de>>()?.0,
                        Field::Code => ev.code = map.next_value()?,
                        Field::Message => ev.message = map.next_value()?,
                        Field::Param => ev.param = map.next_value()?,
                        Field::Error => ev.error = map.next_value()?,
                        Field::Logprobs => ev.logprobs = map.next_value()?,
                        Field::SequenceNumber => ev.sequence_number = map.next_value()?,
                        Field::Obfuscation => ev.obfuscation = map.next_value()?,
                        Field::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(ev)
            }
        }
        deserializer.deserialize_map(EventVisitor)
    }
}

/// A string borrowed from the input when it has no escapes; any other JSON value is skipped
/// and reads as `None`. Goes through `deserialize_any` but never looks at numbers, so the
/// `arbitrary_precision` number representation (a private map) is simply skipped.
struct Text<'a>(Option<Cow<'a, str>>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Some(Cow::Owned(v))))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Text<'de>, E> {
                Ok(Text(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Text<'de>, E> {
                Ok(Text(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Text<'de>, E> {
                Ok(Text(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Text<'de>, E> {
                Ok(Text(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Text<'de>, E> {
                Ok(Text(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Text<'de>, E> {
                Ok(Text(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Text<'de>, D::Error> {
                Text::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text<'de>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text<'de>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
        }
        deserializer.deserialize_any(TextVisitor)
    }
}

/// A JSON object's members in order, as (key, raw value) borrowed from the input: lets
/// `finish` look at `output` and `usage` and re-emit every other member byte for byte.
struct RawObject<'a> {
    entries: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> RawObject<'a> {
    /// The last member named `key` (repeated keys: last wins, as JSON readers do).
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }
}

impl<'de> Deserialize<'de> for RawObject<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RawObjectVisitor;
        impl<'de> Visitor<'de> for RawObjectVisitor {
            type Value = RawObject<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawObject<'de>, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    if let Some(key) = key {
                        entries.push((key, value));
                    }
                }
                Ok(RawObject { entries })
            }
        }
        deserializer.deserialize_map(RawObjectVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::{Path, PathBuf};

    /// Third-party fixtures, read at run time only (never embedded or copied).
    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures");

    fn fixtures() -> Option<PathBuf> {
        let dir = Path::new(FIXTURES);
        if dir.is_dir() {
            Some(dir.to_path_buf())
        } else {
            println!(
                "skipped: ../shared/fixtures not found (third-party fixtures are not part of this repository)"
            );
            None
        }
    }

    // --- TEST SUPPORT ONLY -------------------------------------------------------------
    // A minimal SSE splitter so the tests can feed whole recorded bodies. It is not the
    // proxy's SSE parser (that lives elsewhere): blank lines end events, `event:` and `data:`
    // are the only fields read, multi-line data is joined with `\n`, comments are skipped,
    // and a final event without a blank line still counts.
    fn split_sse(text: &str) -> Vec<(String, String)> {
        let mut events = Vec::new();
        let mut name = String::new();
        let mut data: Option<String> = None;
        let mut flush = |name: &mut String, data: &mut Option<String>| {
            if data.is_some() || !name.is_empty() {
                events.push((std::mem::take(name), data.take().unwrap_or_default()));
            }
        };
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.is_empty() {
                flush(&mut name, &mut data);
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "event" => name = value.to_owned(),
                "data" => match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_owned()),
                },
                _ => {}
            }
        }
        flush(&mut name, &mut data);
        events
    }
    // --- end of test support -----------------------------------------------------------

    fn run<N: AsRef<str>, D: AsRef<str>>(events: &[(N, D)]) -> Result<Aggregate, AggregateError> {
        let mut acc = ResponsesAccumulator::new();
        for (name, data) in events {
            if acc.push(name.as_ref().as_bytes(), data.as_ref().as_bytes())? == Flow::Finished {
                break;
            }
        }
        acc.finish()
    }

    /// Data-only events (no `event:` name), built from JSON values.
    fn data_only(values: &[Value]) -> Vec<(String, String)> {
        values
            .iter()
            .map(|v| (String::new(), v.to_string()))
            .collect()
    }

    fn body(aggregate: &Aggregate) -> Value {
        serde_json::from_slice(&aggregate.body).unwrap()
    }

    fn upstream(result: Result<Aggregate, AggregateError>) -> UpstreamStreamError {
        match result {
            Err(AggregateError::Upstream(e)) => *e,
            other => panic!("expected an upstream error, got {other:?}"),
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// An event with neither a type nor a name is an error only when its `error` member is
    /// truthy, as the SDK tests it: `false`, `""`, `{}`, `[]`, `0` or `null` are no error
    /// and the stream goes on to its answer; a truthy one is the upstream's error.
    #[test]
    fn an_untyped_event_with_a_falsy_error_is_no_error() {
        let completed = r#"{"type":"response.completed","response":{"id":"r","object":"response","status":"completed","output":[]}}"#;
        for falsy in ["false", "\"\"", "{}", "[]", "0", "null"] {
            let untyped = format!(r#"{{"error":{falsy}}}"#);
            let result = run(&[("", untyped.as_str()), ("", completed)]);
            let aggregate = result.unwrap_or_else(|e| panic!("{falsy}: {e:?}"));
            assert_eq!(body(&aggregate)["id"], "r", "{falsy}");
        }
        let error = upstream(run(&[
            ("", r#"{"error":{"message":"boom","type":"server_error"}}"#),
            ("", completed),
        ]));
        assert_eq!(error.message, "boom");
    }

    fn response(status: &str, output: Value, usage: Value) -> Value {
        json!({"id": "resp_syn", "object": "response", "status": status,
               "model": "m-1", "output": output, "usage": usage})
    }

    fn usage_json(input: u64, output: u64) -> Value {
        json!({"input_tokens": input, "input_tokens_details": {"cached_tokens": 1},
               "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 2},
               "total_tokens": input + output})
    }

    fn message_item(id: &str, text: &str) -> Value {
        json!({"id": id, "type": "message", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "annotations": [], "text": text}]})
    }

    // ---------------------------------------------------------------- fixtures

    fn captured_streams(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("captured"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.starts_with("responses_") && name.ends_with(".sse")
            })
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no responses fixtures found");
        files
    }

    fn expected_for(sse: &Path) -> Value {
        serde_json::from_slice(&std::fs::read(sse.with_extension("json")).unwrap()).unwrap()
    }

    #[test]
    fn captured_fixtures_match_expected_bodies() {
        let Some(dir) = fixtures() else { return };
        for sse in captured_streams(&dir) {
            let text = std::fs::read_to_string(&sse).unwrap();
            let aggregate = run(&split_sse(&text)).unwrap_or_else(|e| panic!("{sse:?}: {e}"));
            assert_eq!(body(&aggregate), expected_for(&sse), "{sse:?}");
            assert_eq!(aggregate.terminal, Terminal::Completed, "{sse:?}");
            assert!(aggregate.usage.and_then(|u| u.total).is_some(), "{sse:?}");
            // Non-empty output: the completed object's bytes, untouched.
            assert!(
                contains(text.as_bytes(), &aggregate.body),
                "{sse:?} not verbatim"
            );
        }
    }

    /// Rewrites the terminal event of a recorded stream (at run time) with `output: []`.
    fn with_empty_terminal_output(events: &mut [(String, String)]) {
        let last = events
            .iter_mut()
            .rev()
            .find(|(_, d)| d.contains("\"response.completed\""))
            .unwrap();
        let mut value: Value = serde_json::from_str(&last.1).unwrap();
        value["response"]["output"] = json!([]);
        last.1 = value.to_string();
    }

    #[test]
    fn captured_fixtures_rebuild_empty_output_from_done_items() {
        let Some(dir) = fixtures() else { return };
        for sse in captured_streams(&dir) {
            let mut events = split_sse(&std::fs::read_to_string(&sse).unwrap());
            with_empty_terminal_output(&mut events);
            let (mut got, mut want) = (body(&run(&events).unwrap()), expected_for(&sse));
            // The upstream re-encrypts a reasoning item between its `output_item.done` and the
            // completed `output` (real data): the done item's copy is what a rebuild can have.
            for value in [&mut got, &mut want] {
                for item in value["output"].as_array_mut().unwrap() {
                    item.as_object_mut().unwrap().remove("encrypted_content");
                }
            }
            assert_eq!(got, want, "{sse:?}");
        }
    }

    #[test]
    fn captured_fixtures_rebuild_output_from_deltas() {
        let Some(dir) = fixtures() else { return };
        // With and without the parts' own done events (which carry no logprobs).
        let runs = captured_streams(&dir)
            .into_iter()
            .flat_map(|sse| [(sse.clone(), false), (sse, true)]);
        for (sse, keep_part_done) in runs {
            let mut events = split_sse(&std::fs::read_to_string(&sse).unwrap());
            events.retain(|(_, d)| {
                !d.contains("\"response.output_item.done\"")
                    && (keep_part_done
                        || !d.contains("\"response.content_part.done\"")
                            && !d.contains("\"response.reasoning_summary_part.done\""))
            });
            with_empty_terminal_output(&mut events);
            let got = body(&run(&events).unwrap());
            let want = expected_for(&sse);
            let (got, want) = (
                got["output"].as_array().unwrap(),
                want["output"].as_array().unwrap(),
            );
            assert_eq!(got.len(), want.len(), "{sse:?}");
            for (g, w) in got.iter().zip(want) {
                for key in ["id", "type", "role", "name", "call_id", "arguments"] {
                    assert_eq!(g.get(key), w.get(key), "{sse:?} {key}");
                }
                for list in ["content", "summary"] {
                    let texts = |v: &Value| -> Vec<Value> {
                        v.get(list)
                            .and_then(Value::as_array)
                            .map(|a| a.iter().map(|p| p["text"].clone()).collect())
                            .unwrap_or_default()
                    };
                    // Reasoning `content` is absent from the done items; only compare
                    // lists the expected body has.
                    if w.get(list)
                        .is_some_and(|l| l.as_array().is_some_and(|a| !a.is_empty()))
                    {
                        assert_eq!(texts(g), texts(w), "{sse:?} {list}");
                    }
                }
                if w["type"] == "message" {
                    for (gp, wp) in g["content"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .zip(w["content"].as_array().unwrap())
                    {
                        assert_eq!(gp["annotations"], wp["annotations"], "{sse:?}");
                        // The tokens only: the final body rounds the numbers that the
                        // text events carry in full.
                        let tokens = |part: &Value| -> Vec<Value> {
                            part["logprobs"]
                                .as_array()
                                .map(|l| l.iter().map(|p| p["token"].clone()).collect())
                                .unwrap_or_default()
                        };
                        assert_eq!(tokens(gp), tokens(wp), "{sse:?} {keep_part_done}");
                    }
                }
                if w["type"] == "web_search_call" {
                    assert_eq!(g["status"], w["status"], "{sse:?}");
                }
            }
        }
    }

    #[test]
    fn reference_completed_stream_is_answered_verbatim() {
        let Some(dir) = fixtures() else { return };
        let text = std::fs::read_to_string(dir.join("reference/responses_sse.txt")).unwrap();
        let events = split_sse(&text);
        let completed = events
            .iter()
            .find(|(n, _)| n == "response.completed")
            .unwrap();
        let completed: Value = serde_json::from_str(&completed.1).unwrap();
        let aggregate = run(&events).unwrap();
        assert_eq!(aggregate.terminal, Terminal::Completed);
        assert_eq!(body(&aggregate), completed["response"]);
        assert!(contains(text.as_bytes(), &aggregate.body));
        assert_eq!(
            aggregate.usage,
            Some(TokenUsage {
                input: Some(7),
                output: Some(13),
                total: Some(20),
                cached: Some(0),
                reasoning: Some(0)
            })
        );
    }

    #[test]
    fn reference_failed_stream_is_an_upstream_error() {
        let Some(dir) = fixtures() else { return };
        let text = std::fs::read_to_string(dir.join("reference/responses_failed_sse.txt")).unwrap();
        let error = upstream(run(&split_sse(&text)));
        assert_eq!(error.status, 500);
        assert_eq!(error.message, "upstream failed");
        assert_eq!(error.code, json!("server_error"));
        assert_eq!(error.error_type, "server_error");
        assert_eq!(error.param, Value::Null);
    }

    #[test]
    fn reference_incomplete_stream_fills_output_from_done_item() {
        let Some(dir) = fixtures() else { return };
        let text =
            std::fs::read_to_string(dir.join("reference/responses_incomplete_sse.txt")).unwrap();
        let events = split_sse(&text);
        let done: Value = serde_json::from_str(&events[0].1).unwrap();
        let aggregate = run(&events).unwrap();
        assert_eq!(aggregate.terminal, Terminal::Incomplete);
        let got = body(&aggregate);
        assert_eq!(got["status"], "incomplete");
        assert_eq!(got["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(got["output"], json!([done["item"]]));
        // `output` keeps its position among the keys.
        let keys: Vec<&String> = got.as_object().unwrap().keys().collect();
        assert_eq!(keys.last().map(|k| k.as_str()), Some("output"));
        assert_eq!(aggregate.usage, None);
    }

    // ---------------------------------------------------------------- synthetic streams

    #[test]
    fn type_only_in_json_without_event_names() {
        let item = message_item("msg_1", "Hi there");
        let events = data_only(&[
            json!({"type": "response.created", "response": response("in_progress", json!([]), Value::Null)}),
            json!({"type": "response.output_item.added", "output_index": 0,
                   "item": {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
            json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "item_id": "msg_1", "delta": "Hi"}),
            json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
            json!({"type": "response.completed", "response": response("completed", json!([item]), usage_json(3, 4))}),
        ]);
        let aggregate = run(&events).unwrap();
        assert_eq!(aggregate.terminal, Terminal::Completed);
        assert_eq!(
            body(&aggregate),
            response("completed", json!([item]), usage_json(3, 4))
        );
        assert_eq!(
            aggregate.usage,
            Some(TokenUsage {
                input: Some(3),
                output: Some(4),
                total: Some(7),
                cached: Some(1),
                reasoning: Some(2)
            })
        );
    }

    #[test]
    fn type_only_in_event_name() {
        let events = [
            (
                "response.created",
                r#"{"response":{"id":"r","output":[],"usage":null}}"#,
            ),
            (
                "response.output_item.done",
                r#"{"output_index":0,"item":{"id":"m","type":"message","content":[]}}"#,
            ),
            (
                "response.incomplete",
                r#"{"response":{"id":"r","status":"incomplete","output":[]}}"#,
            ),
        ];
        let aggregate = run(&events).unwrap();
        assert_eq!(aggregate.terminal, Terminal::Incomplete);
        assert_eq!(
            body(&aggregate),
            json!({"id": "r", "status": "incomplete", "output": [{"id": "m", "type": "message", "content": []}]})
        );
    }

    #[test]
    fn json_type_wins_over_event_name() {
        let events = [
            (
                "response.completed",
                r#"{"type":"response.in_progress","response":{"id":"r","output":[]}}"#,
            ),
            (
                "",
                r#"{"type":"response.completed","response":{"id":"r2","output":[]}}"#,
            ),
        ];
        assert_eq!(body(&run(&events).unwrap())["id"], "r2");
    }

    #[test]
    fn verbatim_body_keeps_bytes_numbers_and_escapes() {
        let raw = r#"{ "id":"r\u00e9", "temperature":1.000, "big":123456789012345678901234567890, "output":[ {"type":"message"} ], "usage":{"input_tokens":1} }"#;
        let data =
            format!(r#"{{"type":"response.completed","response":{raw},"sequence_number":9}}"#);
        let aggregate = run(&[("", data.as_str())]).unwrap();
        assert_eq!(aggregate.body, raw.as_bytes());
        assert_eq!(aggregate.usage.map(|u| u.input), Some(Some(1)));
    }

    #[test]
    fn empty_output_is_rebuilt_from_done_items_in_output_index_order() {
        let a = message_item("msg_a", "first");
        let b = json!({"id": "fc_b", "type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"});
        for output in [json!([]), Value::Null] {
            let events = data_only(&[
                json!({"type": "response.output_item.done", "output_index": 1, "item": b}),
                json!({"type": "response.output_item.done", "output_index": 0, "item": {"stale": true}}),
                json!({"type": "response.output_item.done", "output_index": 0, "item": a}),
                json!({"type": "response.completed", "response": response("completed", output, usage_json(1, 1))}),
            ]);
            let got = body(&run(&events).unwrap());
            assert_eq!(got, response("completed", json!([a, b]), usage_json(1, 1)));
            let keys: Vec<&str> = got
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(keys, ["id", "object", "status", "model", "output", "usage"]);
        }
    }

    #[test]
    fn missing_output_key_is_appended() {
        let a = message_item("msg_a", "x");
        let events = data_only(&[
            json!({"type": "response.output_item.done", "output_index": 0, "item": a}),
            json!({"type": "response.completed", "response": {"id": "r", "status": "completed", "usage": null}}),
        ]);
        let got = body(&run(&events).unwrap());
        let keys: Vec<&str> = got
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["id", "status", "usage", "output"]);
        assert_eq!(got["output"], json!([a]));
    }

    #[test]
    fn empty_output_without_streamed_items_stays_as_sent() {
        let raw = r#"{"id":"r","output":[],"usage":null}"#;
        let data = format!(r#"{{"type":"response.completed","response":{raw}}}"#);
        let aggregate = run(&[("", data)]).unwrap();
        assert_eq!(aggregate.body, raw.as_bytes());
        assert_eq!(aggregate.usage, None);
    }

    #[test]
    fn message_text_is_rebuilt_from_deltas_alone() {
        // No output_item.added, no content_part events: only deltas.
        let events = data_only(&[
            json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "item_id": "msg_x", "delta": "Hel"}),
            json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "item_id": "msg_x", "delta": "lo \"\u{e9}\""}),
            json!({"type": "response.completed", "response": response("completed", json!([]), Value::Null)}),
        ]);
        let got = body(&run(&events).unwrap());
        assert_eq!(
            got["output"],
            json!([{"id": "msg_x", "type": "message", "role": "assistant",
                    "content": [{"type": "output_text", "annotations": [], "text": "Hello \"\u{e9}\""}]}])
        );
    }

    #[test]
    fn function_call_arguments_are_rebuilt_from_deltas() {
        let events = data_only(&[
            json!({"type": "response.output_item.added", "output_index": 0,
                   "item": {"id": "fc_1", "type": "function_call", "status": "in_progress", "arguments": "", "call_id": "call_9", "name": "lookup"}}),
            json!({"type": "response.function_call_arguments.delta", "output_index": 0, "item_id": "fc_1", "delta": "{\"q\":"}),
            json!({"type": "response.function_call_arguments.delta", "item_id": "fc_1", "delta": "\"x\"}"}),
            json!({"type": "response.completed", "response": response("completed", json!([]), Value::Null)}),
        ]);
        let got = body(&run(&events).unwrap());
        assert_eq!(
            got["output"],
            json!([{"id": "fc_1", "type": "function_call", "status": "in_progress",
                    "arguments": "{\"q\":\"x\"}", "call_id": "call_9", "name": "lookup"}])
        );
    }

    #[test]
    fn function_call_arguments_done_replaces_deltas() {
        let events = data_only(&[
            json!({"type": "response.function_call_arguments.delta", "output_index": 0, "item_id": "fc_1", "delta": "{\"q\""}),
            json!({"type": "response.function_call_arguments.done", "output_index": 0, "item_id": "fc_1", "arguments": "{\"q\":1}"}),
            json!({"type": "response.completed", "response": response("completed", json!([]), Value::Null)}),
        ]);
        let got = body(&run(&events).unwrap());
        assert_eq!(
            got["output"],
            json!([{"id": "fc_1", "type": "function_call", "arguments": "{\"q\":1}"}])
        );
    }

    #[test]
    fn reasoning_summary_is_rebuilt_from_parts_and_deltas() {
        let events = data_only(&[
            json!({"type": "response.output_item.added", "output_index": 0,
                   "item": {"id": "rs_1", "type": "reasoning", "summary": []}}),
            json!({"type": "response.reasoning_summary_part.added", "output_index": 0, "item_id": "rs_1", "summary_index": 0,
                   "part": {"type": "summary_text", "text": ""}}),
            json!({"type": "response.reasoning_summary_text.delta", "output_index": 0, "item_id": "rs_1", "summary_index": 0, "delta": "Think"}),
            json!({"type": "response.reasoning_summary_text.delta", "output_index": 0, "item_id": "rs_1", "summary_index": 0, "delta": "ing"}),
            // Second part only by deltas.
            json!({"type": "response.reasoning_summary_text.delta", "output_index": 0, "item_id": "rs_1", "summary_index": 1, "delta": "More"}),
            json!({"type": "response.output_text.delta", "output_index": 1, "content_index": 0, "item_id": "msg_2", "delta": "Answer"}),
            json!({"type": "response.completed", "response": response("completed", json!([]), Value::Null)}),
        ]);
        let got = body(&run(&events).unwrap());
        assert_eq!(
            got["output"],
            json!([
                {"id": "rs_1", "type": "reasoning",
                 "summary": [{"type": "summary_text", "text": "Thinking"}, {"type": "summary_text", "text": "More"}]},
                {"id": "msg_2", "type": "message", "role": "assistant",
                 "content": [{"type": "output_text", "annotations": [], "text": "Answer"}]}
            ])
        );
    }

    #[test]
    fn refusal_and_annotations_are_rebuilt() {
        let events = data_only(&[
            json!({"type": "response.output_item.added", "output_index": 0,
                   "item": {"id": "msg_r", "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
            json!({"type": "response.content_part.added", "output_index": 0, "item_id": "msg_r", "content_index": 0,
                   "part": {"type": "refusal", "refusal": ""}}),
            json!({"type": "response.refusal.delta", "output_index": 0, "item_id": "msg_r", "content_index": 0, "delta": "I can't"}),
            json!({"type": "response.refusal.delta", "output_index": 0, "item_id": "msg_r", "content_index": 0, "delta": " help."}),
            json!({"type": "response.output_text.delta", "output_index": 0, "item_id": "msg_r", "content_index": 1, "delta": "See"}),
            json!({"type": "response.output_text.annotation.added", "output_index": 0, "item_id": "msg_r", "content_index": 1,
                   "annotation_index": 1, "annotation": {"type": "url_citation", "url": "b"}}),
            json!({"type": "response.output_text.annotation.added", "output_index": 0, "item_id": "msg_r", "content_index": 1,
                   "annotation_index": 0, "annotation": {"type": "url_citation", "url": "a"}}),
            json!({"type": "response.completed", "response": response("completed", json!([]), Value::Null)}),
        ]);
        let got = body(&run(&events).unwrap());
        assert_eq!(
            got["output"],
            json!([{"id": "msg_r", "type": "message", "status": "in_progress", "role": "assistant", "content": [
                {"type": "refusal", "refusal": "I can't help."},
                {"type": "output_text", "annotations": [{"type": "url_citation", "url": "a"}, {"type": "url_citation", "url": "b"}], "text": "See"}
            ]}])
        );
    }

    #[test]
    fn done_items_win_over_deltas_and_mix_with_rebuilt_items() {
        let done = message_item("msg_0", "final text");
        let events = data_only(&[
            json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "item_id": "msg_0", "delta": "partial"}),
            json!({"type": "response.output_item.done", "output_index": 0, "item": done}),
            json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "item_id": "msg_0", "delta": "late"}),
            json!({"type": "response.web_search_call.in_progress", "output_index": 1, "item_id": "ws_1"}),
            json!({"type": "response.web_search_call.completed", "output_index": 1, "item_id": "ws_1"}),
            json!({"type": "response.incomplete", "response": response("incomplete", json!([]), Value::Null)}),
        ]);
        let got = body(&run(&events).unwrap());
        assert_eq!(
            got["output"],
            json!([done, {"id": "ws_1", "type": "web_search_call", "status": "completed"}])
        );
    }

    #[test]
    fn huge_output_index_does_not_allocate_by_index() {
        let item = message_item("msg_big", "far away");
        let events = data_only(&[
            json!({"type": "response.output_item.done", "output_index": 1_000_000_000_000u64, "item": item}),
            json!({"type": "response.output_text.delta", "output_index": 999_999_999_999u64,
                   "content_index": 1_000_000_000_000u64, "item_id": "m", "delta": "x"}),
            json!({"type": "response.output_text.annotation.added", "output_index": 999_999_999_999u64, "content_index": 1_000_000_000_000u64,
                   "annotation_index": 1_000_000_000_000u64, "annotation": {"type": "url_citation"}}),
            json!({"type": "response.completed", "response": response("completed", json!([]), Value::Null)}),
        ]);
        let got = body(&run(&events).unwrap());
        let output = got["output"].as_array().unwrap();
        assert_eq!(output.len(), 2);
        assert_eq!(output[0]["content"][0]["text"], "x");
        assert_eq!(
            output[0]["content"][0]["annotations"],
            json!([{"type": "url_citation"}])
        );
        assert_eq!(output[1], item);
    }

    #[test]
    fn failed_with_known_code_uses_the_code_table() {
        let events = data_only(&[
            json!({"type": "response.failed", "response": {"id": "r", "status": "failed",
            "error": {"code": "rate_limit_exceeded", "message": "slow down", "param": "model"}, "output": []}}),
        ]);
        let error = upstream(run(&events));
        assert_eq!(
            error,
            UpstreamStreamError {
                status: 429,
                message: "slow down".into(),
                error_type: "rate_limit_error".into(),
                code: json!("rate_limit_exceeded"),
                param: json!("model"),
            }
        );
    }

    #[test]
    fn failed_with_unknown_code_is_500() {
        let events = data_only(&[json!({"type": "response.failed", "response": {"id": "r",
            "error": {"code": "something_new", "message": "nope"}}})]);
        let error = upstream(run(&events));
        assert_eq!(
            (error.status, error.error_type.as_str()),
            (500, "server_error")
        );
        assert_eq!(error.code, json!("something_new"));
        assert_eq!(error.param, Value::Null);
        // An upstream `type` wins over the mapping.
        let events = data_only(&[json!({"type": "response.failed", "response": {"id": "r",
            "error": {"code": "invalid_prompt", "message": "bad", "type": "custom_type"}}})]);
        let error = upstream(run(&events));
        assert_eq!(
            (error.status, error.error_type.as_str()),
            (400, "custom_type")
        );
    }

    #[test]
    fn failed_with_null_or_missing_error_is_500_with_a_clear_message() {
        for response in [
            json!({"id": "r", "status": "failed", "error": null}),
            json!({"id": "r", "status": "failed"}),
        ] {
            let error = upstream(run(&data_only(&[
                json!({"type": "response.failed", "response": response}),
            ])));
            assert_eq!(error.status, 500);
            assert_eq!(error.message, FAILED_WITHOUT_ERROR);
            assert_eq!(error.error_type, "server_error");
            assert_eq!((error.code, error.param), (Value::Null, Value::Null));
        }
    }

    #[test]
    fn failed_without_a_response_uses_the_error_beside_it() {
        let error = upstream(run(&data_only(&[json!({
            "type": "response.failed",
            "error": {"code": "server_error", "message": "boom"}
        })])));
        assert_eq!((error.status, error.message.as_str()), (500, "boom"));
        assert_eq!(error.code, json!("server_error"));
        // Neither a response nor an error: the event is malformed, as before.
        assert!(matches!(
            run(&data_only(&[json!({"type": "response.failed"})])),
            Err(AggregateError::Malformed(_))
        ));
    }

    #[test]
    fn failed_returns_finished_and_finish_reports_it() {
        let mut acc = ResponsesAccumulator::new();
        let data = json!({"type": "response.failed", "response": {"error": {"code": "server_error", "message": "x"}}});
        assert_eq!(
            acc.push(b"", data.to_string().as_bytes()).unwrap(),
            Flow::Finished
        );
        assert_eq!(upstream(acc.finish()).status, 500);
    }

    #[test]
    fn error_events_become_upstream_errors() {
        // OpenAI: payload at the top level.
        let top = json!({"type": "error", "code": "invalid_prompt", "message": "Bad prompt", "param": null, "sequence_number": 3});
        let error = upstream(run(&data_only(&[top])));
        assert_eq!(
            error,
            UpstreamStreamError {
                status: 400,
                message: "Bad prompt".into(),
                error_type: "invalid_request_error".into(),
                code: json!("invalid_prompt"),
                param: Value::Null,
            }
        );
        // Nested under `error`, recognised by the event name only.
        let nested =
            r#"{"error":{"type":"server_error","code":"boom","message":"Overloaded","param":"x"}}"#;
        let error = upstream(run(&[("error", nested)]));
        assert_eq!(
            (
                error.status,
                error.error_type.as_str(),
                error.message.as_str()
            ),
            (500, "server_error", "Overloaded")
        );
        assert_eq!((error.code, error.param), (json!("boom"), json!("x")));
        // Unknown code, no hint: 400.
        let error = upstream(run(&data_only(&[
            json!({"type": "error", "code": 42, "message": "odd"}),
        ])));
        assert_eq!((error.status, error.code), (400, json!(42)));
        // Error returned from push directly, even mid-stream.
        let mut acc = ResponsesAccumulator::new();
        assert!(matches!(
            acc.push(b"error", br#"{"message":"m"}"#),
            Err(AggregateError::Upstream(_))
        ));
    }

    #[test]
    fn invalid_json_in_an_unused_event_is_a_corrupt_stream() {
        let events = [
            (
                "response.created",
                r#"{"type":"response.created","response":{"id":"r"}}"#.to_owned(),
            ),
            (
                "response.output_text.delta",
                r#"{"type":"response.output_text.delta","delta":"x""#.to_owned(),
            ),
            (
                "response.completed",
                json!({"type": "response.completed", "response": {"id": "r", "output": []}})
                    .to_string(),
            ),
        ];
        assert!(matches!(run(&events), Err(AggregateError::InvalidJson(_))));
        assert!(matches!(
            run(&[("x", "not json")]),
            Err(AggregateError::InvalidJson(_))
        ));
        assert!(matches!(
            run(&[("x", "{} trailing")]),
            Err(AggregateError::InvalidJson(_))
        ));
    }

    #[test]
    fn non_object_data_and_terminal_without_response_are_malformed() {
        assert!(matches!(
            run(&[("x", "[1,2]")]),
            Err(AggregateError::Malformed(_))
        ));
        assert!(matches!(
            run(&[("x", "12")]),
            Err(AggregateError::Malformed(_))
        ));
        for data in [
            r#"{"type":"response.completed"}"#,
            r#"{"type":"response.completed","response":"x"}"#,
            r#"{"type":"response.failed","response":null}"#,
        ] {
            assert!(
                matches!(run(&[("", data)]), Err(AggregateError::Malformed(_))),
                "{data}"
            );
        }
    }

    #[test]
    fn fields_of_unexpected_types_in_unused_events_are_tolerated() {
        let events = [
            (
                "",
                r#"{"type":"response.something_new","delta":5,"item_id":{"a":[1]},"output_index":"x","type_extra":1e400}"#,
            ),
            (
                "",
                r#"{"type":"response.completed","type":"response.completed","response":{"id":"r","output":[1]}}"#,
            ),
        ];
        assert_eq!(run(&events).unwrap().body, br#"{"id":"r","output":[1]}"#);
    }

    #[test]
    fn missing_terminal_event_is_truncated() {
        let events = data_only(&[
            json!({"type": "response.created", "response": {"id": "r", "output": []}}),
            json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "x"}),
        ]);
        assert!(matches!(
            run(&events),
            Err(AggregateError::Truncated(TERMINAL_EXPECTED))
        ));
        // `[DONE]` ends the stream; without a terminal event before it, still truncated.
        let mut acc = ResponsesAccumulator::new();
        assert_eq!(acc.push(b"", b" [DONE]\n").unwrap(), Flow::Finished);
        assert_eq!(
            acc.push(b"", br#"{"type":"response.completed","response":{}}"#)
                .unwrap(),
            Flow::Finished
        );
        assert!(matches!(acc.finish(), Err(AggregateError::Truncated(_))));
    }

    #[test]
    fn only_a_null_usage_skips_the_lifecycle_skim() {
        for (response, may) in [
            (r#"{"id":"r","usage":null}"#, false),
            (r#"{"id":"r","usage" : null,"x":{"usage":null}}"#, false),
            (r#"{"id":"r","tools":[{"name":"usage"}]}"#, false),
            (r#"{"id":"r"}"#, false),
            (r#"{"id":"r","usage":{"input_tokens":1}}"#, true),
            (r#"{"id":"r","usage":null,"meta":{"usage":3}}"#, true),
            (r#"{"id":"r","usage": {}}"#, true),
            // A `\u` escape anywhere: the key could be spelt `"\u0075sage"`, so look.
            (r#"{"id":"r","\u0075sage":{"input_tokens":1}}"#, true),
            (r#"{"id":"r","instructions":"\u00e9","usage":null}"#, true),
            // Other escapes cannot spell a letter.
            (
                r#"{"id":"r","instructions":"a\nb\t\"c\"\\","usage":null}"#,
                false,
            ),
            (
                r#"{"id":"r","instructions":"a\nb","usage":{"input_tokens":1}}"#,
                true,
            ),
            // `"usage"` next to escaped quotes, inside strings: never taken for the key.
            (
                r#"{"id":"r","instructions":"say \"usage\": 1","usage":null}"#,
                false,
            ),
            (r#"{"id":"r","note":"say \"usage","usage":null}"#, false),
            // ... or taken for one whose value is not null: a look for nothing, never a miss.
            (r#"{"id":"r","say \"usage":1,"usage":null}"#, true),
        ] {
            assert_eq!(may_carry_usage(response.as_bytes()), may, "{response}");
        }
        // Escaped, the key is still found and remembered.
        let events = [
            r#"{"type":"response.in_progress","response":{"\u0075sage":{"input_tokens":4,"output_tokens":1,"total_tokens":5}}}"#.to_owned(),
            r#"{"type":"response.completed","response":{"id":"r","output":[1]}}"#.to_owned(),
        ];
        let mut acc = ResponsesAccumulator::default();
        for e in &events {
            acc.push(b"", e.as_bytes()).unwrap();
        }
        assert_eq!(acc.finish().unwrap().usage.and_then(|u| u.total), Some(5));
    }

    #[test]
    fn usage_is_patched_from_an_earlier_lifecycle_event() {
        let earlier = usage_json(10, 5);
        let events = data_only(&[
            json!({"type": "response.created", "response": response("in_progress", json!([]), Value::Null)}),
            json!({"type": "response.in_progress", "response": response("in_progress", json!([]), earlier.clone())}),
            json!({"type": "response.in_progress", "response": response("in_progress", json!([]), Value::Null)}),
            json!({"type": "response.completed", "response": response("completed", json!([message_item("m", "t")]), Value::Null)}),
        ]);
        let aggregate = run(&events).unwrap();
        assert_eq!(
            body(&aggregate),
            response(
                "completed",
                json!([message_item("m", "t")]),
                earlier.clone()
            )
        );
        assert_eq!(
            aggregate.usage,
            Some(TokenUsage {
                input: Some(10),
                output: Some(5),
                total: Some(15),
                cached: Some(1),
                reasoning: Some(2)
            })
        );
        // Missing `usage` key: appended.
        let events = data_only(&[
            json!({"type": "response.in_progress", "response": {"usage": earlier}}),
            json!({"type": "response.completed", "response": {"id": "r", "output": [1]}}),
        ]);
        assert_eq!(
            body(&run(&events).unwrap()),
            json!({"id": "r", "output": [1], "usage": earlier})
        );
        // The terminal's own usage is never replaced.
        let events = data_only(&[
            json!({"type": "response.in_progress", "response": {"usage": earlier}}),
            json!({"type": "response.completed", "response": {"id": "r", "output": [1], "usage": usage_json(1, 1)}}),
        ]);
        assert_eq!(run(&events).unwrap().usage.and_then(|u| u.total), Some(2));
    }

    #[test]
    fn keepalive_empty_data_and_unknown_events_are_ignored() {
        let mut acc = ResponsesAccumulator::new();
        assert_eq!(
            acc.push(b"keepalive", br#"{"type":"keepalive","sequence_number":4}"#)
                .unwrap(),
            Flow::Continue
        );
        assert_eq!(acc.push(b"ping", b"").unwrap(), Flow::Continue);
        assert_eq!(acc.push(b"", b"  \n ").unwrap(), Flow::Continue);
        assert_eq!(
            acc.push(b"", br#"{"type":"response.future_thing","x":1}"#)
                .unwrap(),
            Flow::Continue
        );
        assert_eq!(
            acc.push(b"", br#"{"no_type":true}"#).unwrap(),
            Flow::Continue
        );
        let done = acc.push(
            b"",
            br#"{"type":"response.completed","response":{"id":"r","output":[{}]}}"#,
        );
        assert_eq!(done.unwrap(), Flow::Finished);
        assert_eq!(acc.finish().unwrap().body, br#"{"id":"r","output":[{}]}"#);
    }

    #[test]
    fn events_after_the_terminal_are_not_needed() {
        let mut acc = ResponsesAccumulator::new();
        let completed = br#"{"type":"response.completed","response":{"id":"first","output":[1]}}"#;
        assert_eq!(acc.push(b"", completed).unwrap(), Flow::Finished);
        // Neither a second terminal, an error nor garbage changes the answer.
        assert_eq!(
            acc.push(
                b"",
                br#"{"type":"response.completed","response":{"id":"second"}}"#
            )
            .unwrap(),
            Flow::Finished
        );
        assert_eq!(
            acc.push(b"error", br#"{"type":"error","message":"late"}"#)
                .unwrap(),
            Flow::Finished
        );
        assert_eq!(acc.push(b"", b"{not json").unwrap(), Flow::Finished);
        assert_eq!(
            acc.finish().unwrap().body,
            br#"{"id":"first","output":[1]}"#
        );
    }

    #[test]
    fn unplaceable_item_events_fail_only_when_the_rebuild_needs_them() {
        let bad_done =
            json!({"type": "response.output_item.done", "item": {"id": "m", "type": "message"}});
        // Terminal output present: the odd event cannot change the answer.
        let events = data_only(&[
            bad_done.clone(),
            json!({"type": "response.completed", "response": {"output": [1]}}),
        ]);
        assert!(run(&events).is_ok());
        // Output must be rebuilt: the item would silently go missing.
        let events = data_only(&[
            bad_done,
            json!({"type": "response.output_item.done", "output_index": 1, "item": {"id": "n"}}),
            json!({"type": "response.completed", "response": {"output": []}}),
        ]);
        assert!(matches!(run(&events), Err(AggregateError::Malformed(_))));
        let events = data_only(&[
            json!({"type": "response.output_item.done", "output_index": -1, "item": {"id": "m"}}),
            json!({"type": "response.completed", "response": {"output": null}}),
        ]);
        assert!(matches!(run(&events), Err(AggregateError::Malformed(_))));
        // An `added` without a place whose done item has one (by id): nothing is missing.
        let added = json!({"type": "response.output_item.added",
                           "item": {"id": "m", "type": "message", "content": []}});
        let events = data_only(&[
            added.clone(),
            json!({"type": "response.output_item.done", "output_index": 0,
                   "item": {"id": "m", "type": "message", "status": "completed"}}),
            json!({"type": "response.completed", "response": {"output": []}}),
        ]);
        assert_eq!(
            body(&run(&events).unwrap())["output"],
            json!([{"id": "m", "type": "message", "status": "completed"}])
        );
        // Without that done item (or with another id), the item would go missing.
        for done_id in [None, Some("other")] {
            let mut events = vec![added.clone()];
            if let Some(id) = done_id {
                events.push(
                    json!({"type": "response.output_item.done", "output_index": 0,
                                   "item": {"id": id}}),
                );
            }
            events.push(json!({"type": "response.completed", "response": {"output": []}}));
            let error = run(&data_only(&events)).err();
            assert!(
                matches!(&error, Some(AggregateError::Malformed(m)) if m.contains("output_item.added")),
                "{done_id:?}: {error:?}"
            );
        }
        // A delta without a place only matters when some item is rebuilt from deltas.
        let events = data_only(&[
            json!({"type": "response.output_text.delta", "delta": "lost"}),
            json!({"type": "response.output_item.done", "output_index": 0, "item": {"id": "m"}}),
            json!({"type": "response.completed", "response": {"output": []}}),
        ]);
        assert_eq!(body(&run(&events).unwrap())["output"], json!([{"id": "m"}]));
        let events = data_only(&[
            json!({"type": "response.output_text.delta", "delta": "lost"}),
            json!({"type": "response.output_text.delta", "output_index": 0, "delta": "kept"}),
            json!({"type": "response.completed", "response": {"output": []}}),
        ]);
        assert!(matches!(run(&events), Err(AggregateError::Malformed(_))));
    }

    #[test]
    fn logprobs_are_collected_for_rebuilt_text() {
        let events = data_only(&[
            json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "a",
                   "logprobs": [{"token": "a", "logprob": -0.000012345678901234567}]}),
            json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "b",
                   "logprobs": [{"token": "b", "logprob": -1.5e-7}]}),
            json!({"type": "response.completed", "response": {"output": []}}),
        ]);
        let aggregate = run(&events).unwrap();
        let text = String::from_utf8(aggregate.body.clone()).unwrap();
        assert!(text.contains("-1.5e-7"), "{text}");
        assert_eq!(
            body(&aggregate)["output"][0]["content"][0]["logprobs"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }

    /// OpenAI's `content_part.done` has `"logprobs": []` while `output_text.done` (and the
    /// final item) hold the text's logprobs; a part rebuilt from it keeps them.
    #[test]
    fn a_done_part_without_logprobs_takes_the_texts() {
        let logprob = json!([{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}]);
        let part = json!({"type": "output_text", "annotations": [], "logprobs": [], "text": "a"});
        let events = |text_done: Value| {
            data_only(&[
                json!({"type": "response.output_item.added", "output_index": 0,
                       "item": {"id": "m", "type": "message", "role": "assistant", "content": []}}),
                json!({"type": "response.output_text.delta", "item_id": "m", "output_index": 0,
                       "content_index": 0, "delta": "a", "logprobs": logprob}),
                text_done,
                json!({"type": "response.content_part.done", "item_id": "m", "output_index": 0,
                       "content_index": 0, "part": part}),
                json!({"type": "response.completed", "response": {"output": []}}),
            ])
        };
        let content = |events: Vec<(String, String)>| {
            body(&run(&events).unwrap())["output"][0]["content"][0].clone()
        };
        let done = json!({"type": "response.output_text.done", "item_id": "m", "output_index": 0,
                          "content_index": 0, "text": "a", "logprobs": logprob});
        let mut expected = part.clone();
        expected["logprobs"] = logprob.clone();
        assert_eq!(content(events(done)), expected);
        // Without `output_text.done`, the deltas' logprobs.
        let keepalive = json!({"type": "keepalive"});
        assert_eq!(content(events(keepalive)), expected);
        // `"logprobs": null` on the done text is no list: the deltas' stand.
        let null = json!({"type": "response.output_text.done", "item_id": "m", "output_index": 0,
                          "content_index": 0, "text": "a", "logprobs": null});
        assert_eq!(content(events(null)), expected);
    }

    // --- deltas that repeat the one before ----------------------------------------------

    /// The outcome of `events` aggregated as the proxy does and with every event parsed whole
    /// (errors as text), and how many events the templates took.
    fn with_and_without_templates(events: &[(String, String)]) -> (String, String, u64) {
        let outcome = |whole: bool| {
            let mut acc = ResponsesAccumulator::new();
            acc.parse_every_event_whole = whole;
            let mut failed = None;
            for (name, data) in events {
                match acc.push(name.as_bytes(), data.as_bytes()) {
                    Ok(Flow::Finished) => break,
                    Ok(Flow::Continue) => {}
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            let appended = acc.repeat.appended;
            let text = match failed {
                Some(e) => format!("error: {e}"),
                None => match acc.finish() {
                    Ok(agg) => String::from_utf8(agg.body).unwrap(),
                    Err(e) => format!("error: {e}"),
                },
            };
            (text, appended)
        };
        let (taken, appended) = outcome(false);
        let (parsed, never) = outcome(true);
        assert_eq!(never, 0);
        (taken, parsed, appended)
    }

    /// An `output_text.delta` event as OpenAI writes them; `text` is JSON already.
    fn text_delta(output: u32, content: u32, sequence: &str, text: &str, tail: &str) -> String {
        format!(
            r#"{{"type":"response.output_text.delta","sequence_number":{sequence},"item_id":"msg_{output}","output_index":{output},"content_index":{content},"delta":{text}{tail}}}"#
        )
    }

    fn completed_without_output() -> (String, String) {
        (
            "response.completed".to_owned(),
            json!({"type": "response.completed", "sequence_number": 99,
                   "response": response("completed", json!([]), Value::Null)})
            .to_string(),
        )
    }

    fn named(data: Vec<String>) -> Vec<(String, String)> {
        data.into_iter()
            .map(|d| ("response.output_text.delta".to_owned(), d))
            .collect()
    }

    #[test]
    fn repeated_text_deltas_take_the_template_and_change_nothing() {
        let mut events = named(vec![
            text_delta(
                0,
                0,
                "1",
                r#""The""#,
                r#","logprobs":[],"obfuscation":"ab""#,
            ),
            text_delta(
                0,
                0,
                "2",
                r#"" quick""#,
                r#","logprobs":[],"obfuscation":"abcd""#,
            ),
            text_delta(0, 0, "30", r#""""#, r#","logprobs":[],"obfuscation":"""#),
            text_delta(
                0,
                0,
                "-4e2",
                r#"" \"fox\"""#,
                r#","logprobs":[],"obfuscation":"x""#,
            ),
            text_delta(
                0,
                0,
                "5",
                r#"" \"jumps\"""#,
                r#","logprobs":[],"obfuscation":"x""#,
            ),
            text_delta(
                0,
                0,
                "6",
                r#"" over""#,
                r#","logprobs":[],"obfuscation":"x""#,
            ),
            // Logprobs to append: parsed, and not a template.
            text_delta(0, 0, "7", r#"" the""#, r#","logprobs":[{"token":" the"}]"#),
            text_delta(0, 0, "8", r#"" the""#, r#","logprobs":[{"token":" the"}]"#),
            // Escaped text parsed whole: not a template (its token's place is unknown).
            text_delta(0, 0, "8", r#""\u0020""#, ""),
            text_delta(0, 0, "8", r#""\u0020""#, ""),
            // Another part, then another item.
            text_delta(0, 1, "9", r#""b""#, ""),
            text_delta(0, 1, "10", r#""c""#, ""),
            text_delta(1, 0, "11", r#""d""#, ""),
            text_delta(1, 0, "12", r#""e""#, ""),
            text_delta(0, 0, "13", r#"" dog""#, ""),
            text_delta(0, 0, "14", r#""!""#, ""),
        ]);
        events.push(completed_without_output());
        let (taken, parsed, appended) = with_and_without_templates(&events);
        assert_eq!(taken, parsed);
        assert_eq!(appended, 8);
        let body: Value = serde_json::from_str(&taken).unwrap();
        assert_eq!(
            body["output"][0]["content"][0]["text"],
            "The quick \"fox\" \"jumps\" over the the   dog!"
        );
        assert_eq!(body["output"][0]["content"][1]["text"], "bc");
        assert_eq!(body["output"][1]["content"][0]["text"], "de");
    }

    #[test]
    fn a_delta_after_its_part_is_done_is_not_taken() {
        let part_done =
            json!({"type": "response.content_part.done", "output_index": 0, "content_index": 0,
                               "part": {"type": "output_text", "text": "final", "annotations": []}})
            .to_string();
        let item_done = json!({"type": "response.output_item.done", "output_index": 0,
                               "item": message_item("msg_0", "done text")})
        .to_string();
        for done in [part_done, item_done] {
            let delta = |n: &str| text_delta(0, 0, n, r#""a""#, "");
            let mut events = named(vec![
                delta("1"),
                delta("2"),
                done.clone(),
                delta("3"),
                delta("4"),
            ]);
            events.push(completed_without_output());
            let (taken, parsed, appended) = with_and_without_templates(&events);
            assert_eq!(taken, parsed);
            assert_eq!(appended, 1, "{done}");
            // Nor is one learned: it would only be refused at every repeat.
            let mut acc = ResponsesAccumulator::new();
            for (name, data) in &events[..4] {
                acc.push(name.as_bytes(), data.as_bytes()).unwrap();
            }
            assert!(acc
                .repeat
                .template
                .text_of(events[4].1.as_bytes())
                .is_none());
        }
    }

    #[test]
    fn an_invalid_repeated_delta_fails_as_it_would_parsed_whole() {
        let learned = text_delta(0, 0, "1", r#""The""#, r#","obfuscation":"ab""#);
        for bad in [
            learned.replace("The", "a\u{1}b"),
            learned.replace("The", r"a\qb"),
            learned.replace("The", r"\ud83d"),
            learned.replace(r#""sequence_number":1"#, r#""sequence_number":01"#),
            learned.replace(r#""sequence_number":1"#, r#""sequence_number":1."#),
            learned.replace(r#""ab""#, r#""a\qb""#),
        ] {
            let mut events = named(vec![learned.clone(), learned.clone(), bad.clone()]);
            events.push(completed_without_output());
            let (taken, parsed, appended) = with_and_without_templates(&events);
            assert_eq!(appended, 1, "{bad}");
            assert_eq!(taken, parsed, "{bad}");
            assert!(taken.starts_with("error: "), "{bad}: {taken}");
        }
    }

    #[test]
    fn captured_text_streams_take_the_template() {
        let Some(dir) = fixtures() else { return };
        let mut taken_in_all = 0;
        for sse in captured_streams(&dir) {
            let mut events = split_sse(&std::fs::read_to_string(&sse).unwrap());
            // Without the events that replace streamed text, the body is built from deltas.
            events.retain(|(_, d)| {
                ["content_part.done", "output_text.done", "output_item.done"]
                    .iter()
                    .all(|ty| !d.contains(&format!("\"response.{ty}\"")))
            });
            with_empty_terminal_output(&mut events);
            let (taken, parsed, appended) = with_and_without_templates(&events);
            assert_eq!(taken, parsed, "{sse:?}");
            taken_in_all += appended;
        }
        assert!(taken_in_all >= 20, "{taken_in_all} deltas taken");
    }

    #[test]
    fn every_kind_of_text_delta_takes_the_template() {
        for (ty, item_type, index, field) in [
            (
                "reasoning_summary_text.delta",
                "reasoning",
                r#""summary_index":1,"#,
                "summary",
            ),
            (
                "reasoning_text.delta",
                "reasoning",
                r#""content_index":0,"#,
                "content",
            ),
            (
                "function_call_arguments.delta",
                "function_call",
                "",
                "arguments",
            ),
            ("mcp_call_arguments.delta", "mcp_call", "", "arguments"),
            (
                "custom_tool_call_input.delta",
                "custom_tool_call",
                "",
                "input",
            ),
            (
                "code_interpreter_call_code.delta",
                "code_interpreter_call",
                "",
                "code",
            ),
        ] {
            let delta = |n: u32, text: &str| {
                format!(
                    r#"{{"type":"response.{ty}","sequence_number":{n},"item_id":"it","output_index":0,{index}"delta":"{text}","obfuscation":"{}"}}"#,
                    "x".repeat(n as usize)
                )
            };
            let mut events: Vec<(String, String)> = [(1, "a"), (2, "b"), (3, ""), (4, "cd")]
                .iter()
                .map(|&(n, text)| (String::new(), delta(n, text)))
                .collect();
            events.push(completed_without_output());
            let (taken, parsed, appended) = with_and_without_templates(&events);
            assert_eq!(taken, parsed, "{ty}");
            assert_eq!(appended, 3, "{ty}");
            let body: Value = serde_json::from_str(&taken).unwrap();
            let item = &body["output"][0];
            assert_eq!(item["type"], item_type, "{ty}");
            let text = match &item[field] {
                Value::Array(parts) => parts[0]["text"].clone(),
                other => other.clone(),
            };
            assert_eq!(text, "abcd", "{ty}: {item}");
        }
    }

    #[test]
    fn a_delta_typed_by_its_event_name_alone_is_not_learned() {
        let data =
            |text: &str| format!(r#"{{"output_index":0,"content_index":0,"delta":"{text}"}}"#);
        for second in [
            "error",
            "response.completed",
            "keepalive",
            "response.refusal.delta",
            "",
        ] {
            let mut events = vec![
                ("response.output_text.delta".to_owned(), data("a")),
                ("response.output_text.delta".to_owned(), data("b")),
                (second.to_owned(), data("c")),
            ];
            events.push(completed_without_output());
            let (taken, parsed, appended) = with_and_without_templates(&events);
            assert_eq!(taken, parsed, "{second}");
            assert_eq!(appended, 0, "{second}");
        }
    }

    #[test]
    fn a_form_feed_around_a_repeated_delta_is_invalid_as_whole() {
        let learned = text_delta(0, 0, "1", r#""a""#, "");
        for bad in [format!("{learned}\u{c}"), format!("\u{c}{learned}")] {
            let mut events = named(vec![learned.clone(), bad]);
            events.push(completed_without_output());
            let (taken, parsed, _) = with_and_without_templates(&events);
            assert_eq!(taken, parsed);
            assert!(taken.starts_with("error: "), "{taken}");
        }
    }

    #[test]
    fn padding_and_sequence_numbers_must_be_json() {
        // Captured to know where they lie, they are validated as a parser reads them: not
        // UTF-8 is not JSON (RFC 8259 §8.1), as in a chat chunk's `obfuscation`.
        let mut event = text_delta(0, 0, "1", r#""a""#, r#","obfuscation":"xx""#).into_bytes();
        let at = event.len() - 3;
        event[at] = 0xff;
        let mut acc = ResponsesAccumulator::new();
        assert!(matches!(
            acc.push(b"", &event),
            Err(AggregateError::InvalidJson(_))
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 500, ..Default::default() })]

        /// Whatever the texts, numbers, padding and the order of the events, the body is the
        /// one the parse of every event gives.
        #[test]
        fn templates_never_change_the_body(
            steps in proptest::collection::vec(
                (0u8..15, ".{0,4}", 0u8..6, "[a-z]{0,3}", 0u8..5, 0u8..8),
                1..40,
            )
        ) {
            // Items 0 and 3 are announced, so that events placed by `item_id` alone find them.
            let mut events = vec![
                (
                    String::new(),
                    json!({"type": "response.output_item.added", "output_index": 0,
                           "item": {"type": "message", "id": "msg_0", "role": "assistant", "content": []}})
                    .to_string(),
                ),
                (
                    String::new(),
                    json!({"type": "response.output_item.added", "output_index": 3,
                           "item": {"type": "function_call", "id": "fc_3", "call_id": "c", "name": "f", "arguments": ""}})
                    .to_string(),
                ),
            ];
            for (kind, text, number, padding, name, edge) in &steps {
                let text = serde_json::to_string(text).unwrap();
                let sequence = ["7", "-0", "12.5", "1e3", "-2.5E-3", "123456789012345678901234567890"]
                    [usize::from(*number)];
                let tail = format!(r#","logprobs":[],"obfuscation":"{padding}""#);
                let data = match kind {
                    0..=2 => text_delta(0, 0, sequence, &text, &tail),
                    3 => text_delta(0, 1, sequence, &text, ""),
                    4 => text_delta(1, 0, sequence, &text, &tail),
                    5 => text_delta(0, 0, sequence, &text, r#","logprobs":[{"token":"x"}]"#),
                    6 => json!({"type": "response.content_part.done", "output_index": 1, "content_index": 0,
                                "part": {"type": "output_text", "text": padding, "annotations": []}})
                    .to_string(),
                    7 => format!(
                        r#"{{"type":"response.output_text.delta","item_id":"msg_0","content_index":0,"delta":{text}}}"#
                    ),
                    8 => format!(
                        r#"{{"type":"response.reasoning_summary_text.delta","output_index":2,"summary_index":0,"delta":{text},"sequence_number":{sequence}}}"#
                    ),
                    9 => format!(
                        r#"{{"type":"response.function_call_arguments.delta","output_index":3,"delta":{text},"sequence_number":{sequence}{tail}}}"#
                    ),
                    10 => format!(
                        r#"{{"type":"response.reasoning_text.delta","output_index":2,"content_index":0,"delta":{text},"sequence_number":{sequence}}}"#
                    ),
                    11 => format!(
                        r#"{{"type":"response.function_call_arguments.delta","item_id":"fc_3","delta":{text}}}"#
                    ),
                    // Parts and items that end while their deltas repeat.
                    12 => json!({"type": "response.reasoning_summary_part.done", "output_index": 2, "summary_index": 0,
                                 "part": {"type": "summary_text", "text": padding}})
                    .to_string(),
                    13 => json!({"type": "response.output_item.done", "output_index": 3,
                                 "item": {"type": "function_call", "id": "fc_3", "call_id": "c", "name": "f", "arguments": padding}})
                    .to_string(),
                    // Typed by the event name alone.
                    _ => format!(r#"{{"output_index":0,"content_index":0,"delta":{text}}}"#),
                };
                // Rarely, so that most streams run to their end.
                let edge = match edge {
                    7 => "\u{c}",
                    6 => " ",
                    _ => "",
                };
                let name = ["", "response.output_text.delta", "error", "keepalive", "response.refusal.delta"]
                    [usize::from(*name)];
                events.push((name.to_owned(), format!("{data}{edge}")));
            }
            events.push(completed_without_output());
            let (taken, parsed, _) = with_and_without_templates(&events);
            proptest::prop_assert_eq!(taken, parsed);
        }
    }
}

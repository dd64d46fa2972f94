//! Synthetic OpenAI event streams, shared by the mock upstream (`examples/bench_upstream.rs`)
//! and the Criterion aggregation benchmark (`benches/aggregate.rs`) through `#[path]`.
//!
//! The shapes follow what the real APIs send: a Chat Completions stream is a role chunk,
//! one chunk per content delta, a finish chunk, a usage chunk and `data: [DONE]`; a
//! Responses stream is `response.created` … `response.output_text.delta` × N …
//! `response.completed`. When `ts` is given, each delta carries `"x_ts":<unix nanos>` as
//! its first key so that a client can measure the one-way delay of every event.
#![allow(dead_code)]

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    Chat,
    Responses,
}

const WORDS: &[&str] = &[
    "The",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " the",
    " lazy",
    " dog",
    ".",
    " It",
    " was",
    " a",
    " bright",
    " cold",
    " day",
    " in",
    " April",
    ",",
    " and",
    " the",
    " clocks",
    " were",
    " striking",
    " thirteen",
    ".",
];
const FILLER: &[u8] =
    b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor ";

const CHAT_PREFIX: &str = r#""id":"chatcmpl-BENCH0000000000000000000000001","object":"chat.completion.chunk","created":1727346168,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd","#;
const RESP_ID: &str = "resp_67e554a21aa88191b65876ac5e5bbe0406c52f0e511c76ed";
const MSG_ID: &str = "msg_67e554a28bec8191b56d3e2331eff88006c52f0e511c76ed";

/// The text of delta `i`: a natural word when `delta_bytes` is 0, else exactly that many
/// JSON-safe ASCII bytes.
pub fn delta_text(i: usize, delta_bytes: usize) -> String {
    if delta_bytes == 0 {
        return WORDS[i % WORDS.len()].to_string();
    }
    let start = (i * 7) % FILLER.len();
    (0..delta_bytes)
        .map(|k| FILLER[(start + k) % FILLER.len()] as char)
        .collect()
}

fn ts_field(ts: Option<u128>) -> String {
    ts.map(|t| format!("\"x_ts\":{t},")).unwrap_or_default()
}

/// Everything before the first delta.
pub fn head(api: Api) -> Vec<u8> {
    match api {
        Api::Chat => format!(
            "data: {{{CHAT_PREFIX}\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
        )
        .into_bytes(),
        Api::Responses => {
            let resp = response_object("in_progress", "[]", "null");
            format!(
                "event: response.created\ndata: {{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{resp}}}\n\n\
                 event: response.in_progress\ndata: {{\"type\":\"response.in_progress\",\"sequence_number\":1,\"response\":{resp}}}\n\n\
                 event: response.output_item.added\ndata: {{\"type\":\"response.output_item.added\",\"sequence_number\":2,\"output_index\":0,\"item\":{{\"type\":\"message\",\"id\":\"{MSG_ID}\",\"status\":\"in_progress\",\"role\":\"assistant\",\"content\":[]}}}}\n\n\
                 event: response.content_part.added\ndata: {{\"type\":\"response.content_part.added\",\"sequence_number\":3,\"item_id\":\"{MSG_ID}\",\"output_index\":0,\"content_index\":0,\"part\":{{\"type\":\"output_text\",\"text\":\"\",\"annotations\":[]}}}}\n\n"
            )
            .into_bytes()
        }
    }
}

/// Delta event `i` carrying `text`.
pub fn delta(api: Api, i: usize, text: &str, ts: Option<u128>) -> Vec<u8> {
    let ts = ts_field(ts);
    match api {
        Api::Chat => format!(
            "data: {{{ts}{CHAT_PREFIX}\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
        )
        .into_bytes(),
        Api::Responses => format!(
            "event: response.output_text.delta\ndata: {{{ts}\"type\":\"response.output_text.delta\",\"sequence_number\":{},\"item_id\":\"{MSG_ID}\",\"output_index\":0,\"content_index\":0,\"delta\":\"{text}\",\"logprobs\":[]}}\n\n",
            i + 4
        )
        .into_bytes(),
    }
}

/// Everything after the last of `events` deltas whose concatenation is `full_text`.
pub fn tail(api: Api, events: usize, full_text: &str) -> Vec<u8> {
    match api {
        Api::Chat => format!(
            "data: {{{CHAT_PREFIX}\"choices\":[{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"stop\"}}]}}\n\n\
             data: {{{CHAT_PREFIX}\"choices\":[],\"usage\":{{\"prompt_tokens\":14,\"completion_tokens\":{events},\"total_tokens\":{},\"completion_tokens_details\":{{\"reasoning_tokens\":0}}}}}}\n\n\
             data: [DONE]\n\n",
            events + 14
        )
        .into_bytes(),
        Api::Responses => {
            let seq = events + 4;
            let part = format!("{{\"type\":\"output_text\",\"text\":\"{full_text}\",\"annotations\":[]}}");
            let item = format!(
                "{{\"type\":\"message\",\"id\":\"{MSG_ID}\",\"status\":\"completed\",\"role\":\"assistant\",\"content\":[{part}]}}"
            );
            let usage = format!(
                "{{\"input_tokens\":278,\"input_tokens_details\":{{\"cached_tokens\":0}},\"output_tokens\":{events},\"output_tokens_details\":{{\"reasoning_tokens\":0}},\"total_tokens\":{}}}",
                events + 278
            );
            let resp = response_object("completed", &format!("[{item}]"), &usage);
            format!(
                "event: response.output_text.done\ndata: {{\"type\":\"response.output_text.done\",\"sequence_number\":{},\"item_id\":\"{MSG_ID}\",\"output_index\":0,\"content_index\":0,\"text\":\"{full_text}\",\"logprobs\":[]}}\n\n\
                 event: response.content_part.done\ndata: {{\"type\":\"response.content_part.done\",\"sequence_number\":{},\"item_id\":\"{MSG_ID}\",\"output_index\":0,\"content_index\":0,\"part\":{part}}}\n\n\
                 event: response.output_item.done\ndata: {{\"type\":\"response.output_item.done\",\"sequence_number\":{},\"output_index\":0,\"item\":{item}}}\n\n\
                 event: response.completed\ndata: {{\"type\":\"response.completed\",\"sequence_number\":{},\"response\":{resp}}}\n\n",
                seq,
                seq + 1,
                seq + 2,
                seq + 3
            )
            .into_bytes()
        }
    }
}

fn response_object(status: &str, output: &str, usage: &str) -> String {
    format!(
        "{{\"id\":\"{RESP_ID}\",\"object\":\"response\",\"created_at\":1743082658,\"status\":\"{status}\",\"error\":null,\"incomplete_details\":null,\"instructions\":null,\"max_output_tokens\":null,\"model\":\"gpt-4o-2024-08-06\",\"output\":{output},\"parallel_tool_calls\":true,\"previous_response_id\":null,\"reasoning\":{{\"effort\":null,\"summary\":null}},\"store\":true,\"temperature\":1.0,\"text\":{{\"format\":{{\"type\":\"text\"}}}},\"tool_choice\":\"auto\",\"tools\":[],\"top_p\":1.0,\"truncation\":\"disabled\",\"usage\":{usage},\"user\":null,\"metadata\":{{}}}}"
    )
}

/// A whole stream of `events` deltas, without timestamps.
pub fn full_stream(api: Api, events: usize, delta_bytes: usize) -> Vec<u8> {
    let mut out = head(api);
    let mut text = String::new();
    for i in 0..events {
        let t = delta_text(i, delta_bytes);
        out.extend_from_slice(&delta(api, i, &t, None));
        text.push_str(&t);
    }
    out.extend_from_slice(&tail(api, events, &text));
    out
}

/// The concatenated text of `events` deltas.
pub fn full_text(events: usize, delta_bytes: usize) -> String {
    (0..events).map(|i| delta_text(i, delta_bytes)).collect()
}

/// The non-streaming body an upstream would answer (Chat Completions only; used when the
/// mock is asked without `stream: true`).
pub fn chat_completion_json(events: usize, delta_bytes: usize) -> Vec<u8> {
    let text = full_text(events, delta_bytes);
    format!(
        "{{\"id\":\"chatcmpl-BENCH0000000000000000000000001\",\"object\":\"chat.completion\",\"created\":1727346168,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{text}\",\"refusal\":null}},\"logprobs\":null,\"finish_reason\":\"stop\"}}],\"usage\":{{\"prompt_tokens\":14,\"completion_tokens\":{events},\"total_tokens\":{}}},\"system_fingerprint\":\"fp_5050236cbd\"}}",
        events + 14
    )
    .into_bytes()
}

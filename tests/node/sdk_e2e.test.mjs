// End-to-end suite driven by the official `openai` Node SDK (npm), run by `node --test`.
//
//     openai (Node) ──> openai-stream-proxy (the binary) ──> mock upstream (replays SSE bytes)
//
// A non-streaming `client.chat.completions.create(...)` / `client.responses.create(...)` through
// the proxy must give the same object as the Node SDK's own stream helpers
// (`client.chat.completions.stream(...)` → `finalChatCompletion()`,
// `client.responses.stream(...)` → `finalResponse()`) run directly against the mock on the same
// bytes, after the normalisation written out below (`normaliseChatPair`, `normaliseResponsePair`).
// Where the Node helper is not a valid oracle (it throws, or accumulates differently from the
// proxy's documented rules), the proxy's body is compared with the fixture's `NAME.json` or with
// this file's hand-written expectation instead. Streaming calls must come through unchanged.
//
// The mock upstream is the Python suite's `tests/sdk/mock_upstream.py`, launched as a subprocess
// through its command-line entry (stdlib only). The recorded streams live in
// `../shared/fixtures/` (third-party data, read at test time, never copied here); without that
// folder those tests are skipped with a message. The synthetic streams below are this suite's
// own and always run.
//
// Environment: OSP_BINARY (the proxy; default target/debug/openai-stream-proxy), OSP_FIXTURES_DIR
// (default <repo>/../shared/fixtures), PYTHON (default python3). Run via scripts/node-e2e.sh.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

import OpenAI from 'openai';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const FIXTURES = path.resolve(process.env.OSP_FIXTURES_DIR || path.join(REPO, '..', 'shared', 'fixtures'));
const HAVE_FIXTURES = isDir(FIXTURES);
const SKIP_NO_FIXTURES =
  'skipped: ../shared/fixtures not found (third-party fixtures are not part of this repository)';
const BINARY = path.resolve(process.env.OSP_BINARY || path.join(REPO, 'target', 'debug', 'openai-stream-proxy'));
const PYTHON = process.env.PYTHON || 'python3';
const MOCK_SCRIPT = path.join(REPO, 'tests', 'sdk', 'mock_upstream.py');

const READY_TIMEOUT_MS = 10_000;
const CLIENT_TIMEOUT_MS = 30_000;
const TEST_TIMEOUT_MS = 60_000;
const PROXY_UPSTREAM_TIMEOUT_SECONDS = 20;
const MODEL = 'gpt-4o';
const MESSAGES = [{ role: 'user', content: 'hi' }];
const INPUT = 'hi';

function isDir(p) {
  try {
    return fs.statSync(p).isDirectory();
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Fixture discovery (at load time, so every file is its own test)
// ---------------------------------------------------------------------------------------------

/** Fixture paths relative to FIXTURES: files in `dir` whose name matches `re`, sorted. */
function fixtures(dir, re) {
  if (!HAVE_FIXTURES || !isDir(path.join(FIXTURES, dir))) return [];
  return fs
    .readdirSync(path.join(FIXTURES, dir))
    .filter((n) => re.test(n))
    .sort()
    .map((n) => `${dir}/${n}`);
}

const CHAT_TOP = fixtures('captured', /^chat_real_.*\.sse$/);
const CHAT_DIVERGENT = fixtures('captured/sdk-divergent', /^chat_real_.*\.sse$/);
const CHAT_REFERENCE = fixtures('reference', /^chat_completions_sse\.txt$/);
const RESPONSES_TOP = fixtures('captured', /^responses_real_.*\.sse$/);
const RESPONSES_REFERENCE_OK = fixtures('reference', /^responses_sse\.txt$/);
const RESPONSES_REFERENCE_ALL = fixtures('reference', /^responses_.*\.txt$/);

/**
 * Recorded chat streams on which openai-node's helper is NOT a valid oracle: where it differs,
 * the fixture's NAME.json is the oracle. To keep the rest of node's result useful (and so that a
 * documented divergence cannot hide another one), the normalised results must differ at exactly
 * the listed paths, and the proxy's body must equal NAME.json. Every other stream in captured/,
 * captured/sdk-divergent/ and reference/ must equal node's result after normalisation.
 */
const NODE_DIVERGES_CHAT = {
  // A `moderation` chunk after the usage chunk carries `usage: null`. Node Object.assigns every
  // chunk's top-level keys (spec §2.8), so its final `usage` is null; the proxy keeps the last
  // non-null usage (D7).
  chat_real_moderation_after_usage: {
    reason: "node keeps the last chunk's `usage: null`",
    paths: ['$.usage'],
  },
  // `annotations` arrive split over several deltas without `index`. Node Object.assigns delta
  // keys it does not know, so only the last delta's annotations survive; the proxy appends them.
  chat_real_openrouter_annotations: {
    reason: "node keeps only the last delta's `annotations`",
    paths: ['$.choices[0].message.annotations'],
  },
};

const fixtureName = (f) => path.basename(f).replace(/\.(sse|txt)$/, '');
const expectedJsonPath = (f) => path.join(FIXTURES, f.replace(/\.(sse|txt)$/, '.json'));
const hasExpectedJson = (f) => fs.existsSync(expectedJsonPath(f));
const readExpectedJson = (f) => JSON.parse(fs.readFileSync(expectedJsonPath(f), 'utf8'));

// ---------------------------------------------------------------------------------------------
// This suite's own synthetic streams (hand-written here; no third-party content)
// ---------------------------------------------------------------------------------------------

/** frames: [eventName | null, JSON value | ': comment' string]. */
function sse(frames, { crlf = false, done = false } = {}) {
  const nl = crlf ? '\r\n' : '\n';
  let out = '';
  for (const [event, data] of frames) {
    if (typeof data === 'string' && data.startsWith(':')) {
      out += data + nl;
      continue;
    }
    if (event) out += `event: ${event}${nl}`;
    out += `data: ${JSON.stringify(data)}${nl}${nl}`;
  }
  if (done) out += `data: [DONE]${nl}${nl}`;
  return Buffer.from(out, 'utf8');
}

const SYNTH_CREATED = 1723456789;
const SYNTH_MODEL = 'node-synth-mini';

function chatChunk(id, choices, extra = {}) {
  return {
    id,
    object: 'chat.completion.chunk',
    created: SYNTH_CREATED,
    model: SYNTH_MODEL,
    system_fingerprint: 'fp_node_synth',
    choices,
    ...extra,
  };
}

const delta = (index, d, finish = null, logprobs = null) => ({ index, delta: d, logprobs, finish_reason: finish });

const CHAT_USAGE = {
  prompt_tokens: 13,
  completion_tokens: 21,
  total_tokens: 34,
  prompt_tokens_details: { cached_tokens: 0, audio_tokens: 0 },
  completion_tokens_details: { reasoning_tokens: 0, audio_tokens: 0 },
};

function chatBody(id, choices, extra = {}) {
  return {
    id,
    object: 'chat.completion',
    created: SYNTH_CREATED,
    model: SYNTH_MODEL,
    system_fingerprint: 'fp_node_synth',
    choices,
    usage: CHAT_USAGE,
    ...extra,
  };
}

const assistant = (content, extra = {}) => ({ role: 'assistant', content, refusal: null, annotations: [], ...extra });

/**
 * name -> { bytes, expected (the exact body the proxy must answer with), nodeDiverges (only
 * where openai-node's helper is not a valid oracle: why, and the paths where it differs) }.
 */
function synthChat() {
  const s = {};

  // 1. Plain text with multi-byte UTF-8 (incl. a 4-byte emoji), finish `stop`, then a usage
  //    chunk with `choices: []`.
  {
    const id = 'chatcmpl-node-synth-plain';
    const pieces = ['Grüße ', 'aus ', 'Kiel — ', '🌊 und ', 'ahoi!'];
    const frames = [[null, chatChunk(id, [delta(0, { role: 'assistant', content: '', refusal: null })])]];
    for (const p of pieces) frames.push([null, chatChunk(id, [delta(0, { content: p })])]);
    frames.push([null, chatChunk(id, [delta(0, {}, 'stop')])]);
    frames.push([null, chatChunk(id, [], { usage: CHAT_USAGE })]);
    s.chat_plain_usage = {
      bytes: sse(frames, { done: true }),
      expected: chatBody(id, [{ index: 0, message: assistant(pieces.join('')), logprobs: null, finish_reason: 'stop' }]),
    };
  }

  // 2. Two parallel tool calls (index 0 then 1, arguments streamed), CRLF line endings, usage on
  //    the finish chunk.
  {
    const id = 'chatcmpl-node-synth-tools';
    const a0 = ['{"city"', ':"Lübeck"', ',"unit":"c"}'];
    const a1 = ['{"ci', 'ty":"Flensburg"}'];
    const call = (index, cid, name) => ({ index, id: cid, type: 'function', function: { name, arguments: '' } });
    const frames = [
      [null, chatChunk(id, [delta(0, { role: 'assistant', content: null, tool_calls: [call(0, 'call_node_synth_a', 'get_weather')] })])],
      ...a0.map((a) => [null, chatChunk(id, [delta(0, { tool_calls: [{ index: 0, function: { arguments: a } }] })])]),
      [null, chatChunk(id, [delta(0, { tool_calls: [call(1, 'call_node_synth_b', 'get_weather')] })])],
      ...a1.map((a) => [null, chatChunk(id, [delta(0, { tool_calls: [{ index: 1, function: { arguments: a } }] })])]),
      [null, chatChunk(id, [delta(0, {}, 'tool_calls')], { usage: CHAT_USAGE })],
    ];
    const done = (cid, args) => ({ id: cid, type: 'function', function: { name: 'get_weather', arguments: args.join('') } });
    s.chat_parallel_tools_crlf = {
      bytes: sse(frames, { crlf: true, done: true }),
      expected: chatBody(id, [
        {
          index: 0,
          message: assistant(null, { tool_calls: [done('call_node_synth_a', a0), done('call_node_synth_b', a1)] }),
          logprobs: null,
          finish_reason: 'tool_calls',
        },
      ]),
    };
  }

  // 3. Two choices interleaved, SSE comment lines between events, logprobs on choice 1 (content
  //    tokens appended across chunks), trailing usage chunk.
  {
    const id = 'chatcmpl-node-synth-two';
    const lp = (token, logprob) => ({ token, logprob, bytes: [...Buffer.from(token, 'utf8')], top_logprobs: [] });
    const t = [lp('Nord', -0.25), lp('see', -0.5), lp('!', -0.125)];
    const frames = [
      [null, ': synthetic keep-alive'],
      [null, chatChunk(id, [delta(1, { role: 'assistant', content: '' }, null, { content: [], refusal: null })])],
      [null, chatChunk(id, [delta(0, { role: 'assistant', content: '' })])],
      [null, chatChunk(id, [delta(0, { content: 'Ost' })])],
      [null, chatChunk(id, [delta(1, { content: 'Nord' }, null, { content: [t[0]], refusal: null })])],
      [null, ': another comment'],
      [null, chatChunk(id, [delta(1, { content: 'see' }, null, { content: [t[1]], refusal: null })])],
      [null, chatChunk(id, [delta(0, { content: 'see' })])],
      [null, chatChunk(id, [delta(1, { content: '!' }, null, { content: [t[2]], refusal: null })])],
      [null, chatChunk(id, [delta(0, {}, 'stop')])],
      [null, chatChunk(id, [delta(1, {}, 'stop')])],
      [null, chatChunk(id, [], { usage: CHAT_USAGE })],
    ];
    s.chat_two_choices_logprobs = {
      bytes: sse(frames, { done: true }),
      expected: chatBody(id, [
        { index: 0, message: assistant('Ostsee'), logprobs: null, finish_reason: 'stop' },
        { index: 1, message: assistant('Nordsee!'), logprobs: { content: t, refusal: null }, finish_reason: 'stop' },
      ]),
    };
  }

  // 4. `finish_reason: "length"`: openai-python's helper raises here; openai-node's plain
  //    `.stream()` does not (it only rejects unfinished turns for parse helpers / tool runners).
  {
    const id = 'chatcmpl-node-synth-length';
    const frames = [
      [null, chatChunk(id, [delta(0, { role: 'assistant', content: 'Es war ' })])],
      [null, chatChunk(id, [delta(0, { content: 'einmal' })])],
      [null, chatChunk(id, [delta(0, {}, 'length')])],
      [null, chatChunk(id, [], { usage: CHAT_USAGE })],
    ];
    s.chat_length = {
      bytes: sse(frames, { done: true }),
      expected: chatBody(id, [{ index: 0, message: assistant('Es war einmal'), logprobs: null, finish_reason: 'length' }]),
    };
  }

  // 5. 2026-style wire format: `usage: null` and `system_fingerprint: null` on every chunk, an
  //    `obfuscation` key, and one more chunk AFTER the usage chunk that again says `usage: null`.
  //    The proxy keeps the last non-null usage (D7); node's Object.assign ends with null, so node
  //    is not the oracle here: the hand-written body is.
  {
    const id = 'chatcmpl-node-synth-late-null';
    const chunk = (choices, extra = {}) =>
      chatChunk(id, choices, { system_fingerprint: null, service_tier: 'default', usage: null, obfuscation: 'x1', ...extra });
    const frames = [
      [null, chunk([delta(0, { role: 'assistant', content: '', refusal: null })])],
      [null, chunk([delta(0, { content: 'Moin' })])],
      [null, chunk([delta(0, {}, 'stop')])],
      [null, chunk([], { usage: CHAT_USAGE })],
      [null, chunk([])],
    ];
    s.chat_late_null_usage = {
      bytes: sse(frames, { done: true }),
      expected: chatBody(id, [{ index: 0, message: assistant('Moin'), logprobs: null, finish_reason: 'stop' }], {
        system_fingerprint: null,
        service_tier: 'default',
      }),
      nodeDiverges: { reason: "node keeps the last chunk's `usage: null`", paths: ['$.usage'] },
    };
  }

  // 6. DeepSeek-style `reasoning_content` deltas, then content (the reasoning deltas become
  //    null once content starts). The proxy concatenates the reasoning text; node keeps the last
  //    delta's value (null), so normalisation rule (5) checks that key against this body.
  {
    const id = 'chatcmpl-node-synth-reasoning';
    const thoughts = ['Wind ', 'aus ', 'Westen, ', 'also…'];
    const answer = ['Segel ', 'setzen.'];
    const frames = [
      [null, chatChunk(id, [delta(0, { role: 'assistant', content: null, reasoning_content: '' })])],
      ...thoughts.map((t) => [null, chatChunk(id, [delta(0, { content: null, reasoning_content: t })])]),
      ...answer.map((a) => [null, chatChunk(id, [delta(0, { content: a, reasoning_content: null })])]),
      [null, chatChunk(id, [delta(0, { content: '', reasoning_content: null }, 'stop')], { usage: CHAT_USAGE })],
    ];
    s.chat_reasoning_content = {
      bytes: sse(frames, { done: true }),
      expected: chatBody(id, [
        {
          index: 0,
          message: assistant(answer.join(''), { reasoning_content: thoughts.join('') }),
          logprobs: null,
          finish_reason: 'stop',
        },
      ]),
    };
  }
  return s;
}

function synthResponses() {
  const s = {};
  const usage = {
    input_tokens: 9,
    input_tokens_details: { cached_tokens: 0 },
    output_tokens: 12,
    output_tokens_details: { reasoning_tokens: 0 },
    total_tokens: 21,
  };
  const base = (id, status, output, use) => ({
    id,
    object: 'response',
    created_at: SYNTH_CREATED,
    status,
    error: null,
    incomplete_details: null,
    instructions: null,
    max_output_tokens: null,
    model: SYNTH_MODEL,
    output,
    parallel_tool_calls: true,
    previous_response_id: null,
    reasoning: { effort: null, summary: null },
    store: false,
    temperature: 1.0,
    text: { format: { type: 'text' } },
    tool_choice: 'auto',
    tools: [],
    top_p: 1.0,
    truncation: 'disabled',
    usage: use,
    user: null,
    metadata: {},
  });
  const withSeq = (events) => events.map((ev, i) => [ev.type, { type: ev.type, sequence_number: i, ...ev }]);

  // Message text with multi-byte deltas.
  const messageEvents = (rid, mid, pieces) => {
    const text = pieces.join('');
    const part = { type: 'output_text', text, annotations: [], logprobs: [] };
    const item = { id: mid, type: 'message', status: 'completed', role: 'assistant', content: [part] };
    const events = [
      { type: 'response.output_item.added', output_index: 0, item: { ...item, status: 'in_progress', content: [] } },
      {
        type: 'response.content_part.added',
        item_id: mid,
        output_index: 0,
        content_index: 0,
        part: { ...part, text: '' },
      },
      ...pieces.map((d) => ({
        type: 'response.output_text.delta',
        item_id: mid,
        output_index: 0,
        content_index: 0,
        delta: d,
        logprobs: [],
      })),
      { type: 'response.output_text.done', item_id: mid, output_index: 0, content_index: 0, text, logprobs: [] },
      { type: 'response.content_part.done', item_id: mid, output_index: 0, content_index: 0, part },
      { type: 'response.output_item.done', output_index: 0, item },
    ];
    return { item, events };
  };

  // 1. A message with text deltas.
  {
    const rid = 'resp_node_synth_text';
    const { item, events } = messageEvents(rid, 'msg_node_synth_1', ['Leuchtturm ', 'in ', 'Sicht — ', '⚓ ', 'gleich da.']);
    const completed = base(rid, 'completed', [item], usage);
    const all = [
      { type: 'response.created', response: base(rid, 'in_progress', [], null) },
      { type: 'response.in_progress', response: base(rid, 'in_progress', [], null) },
      ...events,
      { type: 'response.completed', response: completed },
    ];
    s.responses_text = { bytes: sse(withSeq(all)), expected: completed };
  }

  // 2. A function call with argument deltas, CRLF line endings, an SSE comment.
  {
    const rid = 'resp_node_synth_fn';
    const fid = 'fc_node_synth_1';
    const args = ['{"port":', '"Rostock",', '"berth":7}'];
    const item = {
      id: fid,
      type: 'function_call',
      status: 'completed',
      call_id: 'call_node_synth_fn',
      name: 'book_berth',
      arguments: args.join(''),
    };
    const completed = base(rid, 'completed', [item], usage);
    const all = [
      { type: 'response.created', response: base(rid, 'in_progress', [], null) },
      { type: 'response.output_item.added', output_index: 0, item: { ...item, status: 'in_progress', arguments: '' } },
      ...args.map((d) => ({ type: 'response.function_call_arguments.delta', item_id: fid, output_index: 0, delta: d })),
      { type: 'response.function_call_arguments.done', item_id: fid, output_index: 0, arguments: args.join('') },
      { type: 'response.output_item.done', output_index: 0, item },
      { type: 'response.completed', response: completed },
    ];
    const frames = withSeq(all);
    frames.splice(2, 0, [null, ': synthetic keep-alive']);
    s.responses_function_call_crlf = { bytes: sse(frames, { crlf: true }), expected: completed };
  }

  // 3. `response.completed` WITHOUT an `output` key: both the proxy (D9) and node (it fills a
  //    missing/null output from the `output_item.done` items) rebuild it.
  {
    const rid = 'resp_node_synth_no_output';
    const { item, events } = messageEvents(rid, 'msg_node_synth_3', ['Ebbe ', 'um ', '14 Uhr.']);
    const completedWire = base(rid, 'completed', [item], usage);
    delete completedWire.output;
    const all = [
      { type: 'response.created', response: base(rid, 'in_progress', [], null) },
      ...events,
      { type: 'response.completed', response: completedWire },
    ];
    s.responses_completed_without_output = {
      bytes: sse(withSeq(all)),
      expected: base(rid, 'completed', [item], usage),
    };
  }

  // 4. `response.completed` with `output: []` although an item was streamed: the proxy rebuilds
  //    it from `output_item.done` (D9); node only fills a missing/null output and keeps `[]`, so
  //    node is not the oracle here: the hand-written body is.
  {
    const rid = 'resp_node_synth_empty_output';
    const { item, events } = messageEvents(rid, 'msg_node_synth_4', ['Flut ', 'um ', '20 Uhr.']);
    const all = [
      { type: 'response.created', response: base(rid, 'in_progress', [], null) },
      ...events,
      { type: 'response.completed', response: base(rid, 'completed', [], usage) },
    ];
    s.responses_completed_empty_output = {
      bytes: sse(withSeq(all)),
      expected: base(rid, 'completed', [item], usage),
      nodeDiverges: { reason: 'node keeps the terminal `output: []`', paths: ['$.output', '$.output_text'] },
    };
  }
  return s;
}

const SYNTH_CHAT = synthChat();
const SYNTH_RESPONSES = synthResponses();

// ---------------------------------------------------------------------------------------------
// Processes: the mock upstream (Python, stdlib only) and the proxy binary
// ---------------------------------------------------------------------------------------------

const PROXY_ENV_DROP = new Set([
  'HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy', 'ALL_PROXY', 'all_proxy', 'NO_PROXY', 'no_proxy',
  'LOG_LEVEL', 'RUST_LOG',
]);

/** Resolves with the first line matching `pred`, rejects on exit or after `ms`. */
function waitForLine(child, stream, pred, ms, log) {
  return new Promise((resolve, reject) => {
    const rl = readline.createInterface({ input: stream });
    let settled = false;
    const finish = (fn, value) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      child.off('exit', onExit);
      fn(value);
    };
    const timer = setTimeout(() => finish(reject, new Error(`no ready line within ${ms} ms`)), ms);
    const onExit = (code, signal) => finish(reject, new Error(`exited early (code ${code}, signal ${signal})`));
    child.on('exit', onExit);
    rl.on('line', (raw) => {
      // Keep draining for the whole run: a full pipe would block the child's logging.
      const line = raw.replace(/\x1b\[[0-9;]*m/g, '');
      log.push(line);
      if (!settled && pred(line)) finish(resolve, line);
    });
  });
}

async function stopChild(child) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
  await exited;
  clearTimeout(timer);
}

class MockUpstream {
  constructor(workdir) {
    this.workdir = workdir;
    this.recordsPath = path.join(workdir, 'mock-records.jsonl');
    this.log = [];
  }

  async start() {
    const inline = path.join(this.workdir, 'inline');
    fs.mkdirSync(inline);
    for (const [name, { bytes }] of Object.entries({ ...SYNTH_CHAT, ...SYNTH_RESPONSES })) {
      fs.writeFileSync(path.join(inline, name), bytes);
    }
    const args = [MOCK_SCRIPT, '--inline-dir', inline, '--records', this.recordsPath];
    if (HAVE_FIXTURES) args.push('--fixtures', FIXTURES);
    // stdin stays an open pipe: the mock exits when it closes, so it cannot outlive this process.
    this.child = spawn(PYTHON, args, { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, PYTHONDONTWRITEBYTECODE: '1' } });
    this.child.on('error', (e) => this.log.push(`spawn error: ${e.message}`));
    readline.createInterface({ input: this.child.stderr }).on('line', (l) => this.log.push(l));
    const out = [];
    try {
      const line = await waitForLine(this.child, this.child.stdout, (l) => l.startsWith('{'), READY_TIMEOUT_MS, out);
      this.url = JSON.parse(line).url;
    } catch (e) {
      await this.stop();
      throw new Error(`mock upstream (${PYTHON} ${MOCK_SCRIPT}) did not start: ${e.message}\n${[...out, ...this.log].join('\n')}`);
    }
    return this;
  }

  /** Every request the mock received with `x-mock-request-id: rid`, oldest first. */
  requestsFor(rid) {
    const text = fs.existsSync(this.recordsPath) ? fs.readFileSync(this.recordsPath, 'utf8') : '';
    return text
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l))
      .filter((r) => r.request_id === rid)
      .map((r) => ({ ...r, body: Buffer.from(r.body_base64, 'base64') }));
  }

  oneRequest(rid) {
    const seen = this.requestsFor(rid);
    assert.equal(seen.length, 1, `the mock upstream saw ${seen.length} requests for one call`);
    return seen[0];
  }

  async stop() {
    if (!this.child) return;
    this.child.stdin.end();
    await stopChild(this.child);
  }
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

class ProxyProcess {
  constructor(upstreamUrl, workdir) {
    this.upstreamUrl = upstreamUrl;
    this.workdir = workdir;
    this.log = [];
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  async start() {
    if (!fs.existsSync(BINARY)) throw new Error(`proxy binary not found: ${BINARY} (build it, or set OSP_BINARY)`);
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !PROXY_ENV_DROP.has(k)));
    Object.assign(env, { RUST_LOG: 'info', NO_COLOR: '1' });
    const problems = [];
    for (let attempt = 0; attempt < 5; attempt++) {
      // The free port may be taken between the probe and the proxy's bind: retry on "in use".
      this.port = await freePort();
      const config = path.join(this.workdir, `proxy-config-${attempt}.json`);
      fs.writeFileSync(
        config,
        JSON.stringify({
          timeoutSeconds: PROXY_UPSTREAM_TIMEOUT_SECONDS,
          rules: [{ listenPort: this.port, listenAddress: '127.0.0.1', upstreamUrl: this.upstreamUrl }],
        }),
      );
      this.log = [];
      const child = spawn(BINARY, ['-c', config], { stdio: ['ignore', 'ignore', 'pipe'], env, cwd: this.workdir });
      child.on('error', (e) => this.log.push(`spawn error: ${e.message}`));
      try {
        await waitForLine(child, child.stderr, (l) => l.includes('proxy rule'), READY_TIMEOUT_MS, this.log);
        this.child = child;
        return this;
      } catch (e) {
        await stopChild(child);
        const log = this.log.join('\n');
        problems.push(`attempt ${attempt} (port ${this.port}): ${e.message}\n${log}`);
        if (!/in use/i.test(log)) break;
      }
    }
    throw new Error(`the proxy did not report 'proxy rule' within ${READY_TIMEOUT_MS} ms:\n${problems.join('\n')}`);
  }

  /** Stops the proxy; returns its exit code if it had died on its own, else null. */
  async stop() {
    if (!this.child) return null;
    const died = this.child.exitCode ?? this.child.signalCode;
    await stopChild(this.child);
    return died;
  }
}

// ---------------------------------------------------------------------------------------------
// Session: one mock, one proxy, two clients (direct to the mock, and through the proxy)
// ---------------------------------------------------------------------------------------------

const session = {};
/** Raw JSON answers the SDK received, by x-mock-request-id (SSE answers are not recorded). */
const rawBodies = new Map();

/** A fetch that keeps a copy of every non-SSE answer so the raw body can be checked too. */
async function recordingFetch(url, init) {
  const response = await fetch(url, init);
  const rid = new Headers(init?.headers).get('x-mock-request-id');
  const type = response.headers.get('content-type') || '';
  if (rid && !type.startsWith('text/event-stream')) {
    rawBodies.set(rid, { status: response.status, contentType: type, text: await response.clone().text() });
  }
  return response;
}

function client(baseURL) {
  return new OpenAI({
    baseURL,
    apiKey: 'sk-dummy-for-tests',
    maxRetries: 0,
    timeout: CLIENT_TIMEOUT_MS,
    fetch: recordingFetch,
  });
}

before(async () => {
  session.workdir = fs.mkdtempSync(path.join(os.tmpdir(), 'osp-node-e2e-'));
  session.mock = await new MockUpstream(session.workdir).start();
  session.proxy = await new ProxyProcess(session.mock.url, session.workdir).start();
  session.direct = client(`${session.mock.url}/v1`);
  session.viaProxy = client(`${session.proxy.url}/v1`);
});

after(async () => {
  let died = null;
  try {
    died = await session.proxy?.stop();
  } finally {
    await session.mock?.stop();
    if (session.workdir) fs.rmSync(session.workdir, { recursive: true, force: true });
  }
  if (died !== null && died !== undefined) {
    throw new Error(`the proxy exited by itself during the run (${died}):\n${session.proxy.log.join('\n')}`);
  }
});

/** A request id for the mock's records, and the request options that select `fixture`. */
function selecting(fixture) {
  const rid = randomUUID().replaceAll('-', '');
  return { rid, options: { headers: { 'x-mock-fixture': fixture, 'x-mock-request-id': rid } } };
}

// ---------------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------------

/** A plain JSON value: drops `undefined`, non-enumerable keys (`_request_id`) and prototypes. */
const plain = (v) => JSON.parse(JSON.stringify(v));

/** Paths where two JSON values differ. */
function diff(a, b, at = '$') {
  const isObj = (x) => x !== null && typeof x === 'object' && !Array.isArray(x);
  if (isObj(a) && isObj(b)) {
    const out = [];
    for (const k of [...new Set([...Object.keys(a), ...Object.keys(b)])].sort()) {
      if (!(k in a)) out.push(`${at}.${k}: missing on the left, right has ${JSON.stringify(b[k]).slice(0, 200)}`);
      else if (!(k in b)) out.push(`${at}.${k}: missing on the right, left has ${JSON.stringify(a[k]).slice(0, 200)}`);
      else out.push(...diff(a[k], b[k], `${at}.${k}`));
    }
    return out;
  }
  if (Array.isArray(a) && Array.isArray(b)) {
    if (a.length !== b.length) return [`${at}: list length ${a.length} != ${b.length}`];
    return a.flatMap((x, i) => diff(x, b[i], `${at}[${i}]`));
  }
  if (a !== b) return [`${at}: ${JSON.stringify(a)?.slice(0, 200)} != ${JSON.stringify(b)?.slice(0, 200)}`];
  return [];
}

function assertSame(actual, expected, what) {
  const d = diff(actual, expected);
  assert.ok(d.length === 0, `${what} differ (left = proxy, right = expected):\n  ${d.slice(0, 30).join('\n  ')}`);
}

/** Message keys openai-node's chat accumulator merges field by field (spec §2.8). */
const NODE_MERGED_MESSAGE_KEYS = new Set(['role', 'content', 'refusal', 'tool_calls', 'function_call', 'audio']);

/**
 * Normalises the proxy's completion (as `chat.completions.create` returned it) and openai-node's
 * `finalChatCompletion()` for the same bytes, so that only real differences remain. Each rule is
 * a documented difference between openai-node's accumulator and the proxy's rules (spec §2.8,
 * §2.6, §5), applied to BOTH sides. Returns [proxy, node, extras]; `extras` are the proxy's
 * values that rule (5) took out, for `checkExtras` to compare with the expected body.
 */
function normaliseChatPair(proxyCompletion, nodeCompletion) {
  const p = plain(proxyCompletion);
  const n = plain(nodeCompletion);
  // (1) Top-level keys: null ≡ absent. Node's final object has `system_fingerprint` only when it
  //     is truthy, and it copies every chunk's keys (so `service_tier: null` from one late chunk
  //     stays); the proxy keeps each key's last non-null value and drops keys that were only
  //     ever null, except `system_fingerprint`, which it always answers (D7; §5: declared
  //     fields absent vs null are equal). A null on one side against a VALUE on the other is
  //     still a difference (e.g. node's `usage: null` after a moderation chunk).
  for (const d of [p, n]) for (const k of Object.keys(d)) if (d[k] === null) delete d[k];
  const extras = [];
  for (const [i, [pc, nc]] of [...zipChoices(p, n)].entries()) {
    for (const [side, c] of [['proxy', pc], ['node', nc]]) {
      if (!c?.message) continue;
      const m = c.message;
      // (2) `message.parsed`: node adds `parsed: null` (SDK-only, spec §5); the API and the proxy
      //     never send it.
      delete m.parsed;
      // (3) `message.annotations`: node only has the key when a delta carried it; the proxy, like
      //     the non-streaming API, answers `annotations: []` (§2.6). Absent ≡ null ≡ [].
      if (m.annotations == null) m.annotations = [];
      // (4) `tool_calls[].function.parsed_arguments`: SDK-only (§5). (`tool_calls[].index` needs
      //     no rule: node drops it, as the proxy does.)
      for (const call of m.tool_calls ?? []) if (call.function) delete call.function.parsed_arguments;
      // (5) Any other message key (DeepSeek's `reasoning_content`, provider extras): node
      //     Object.assigns it from each delta, so the LAST delta's value wins, null included,
      //     while the proxy concatenates strings and otherwise keeps the last non-null value
      //     (§2.6, D6). Node is no oracle for these keys: they leave both sides here, and the
      //     proxy's values are checked against NAME.json / the hand-written body instead.
      for (const k of Object.keys(m)) {
        if (NODE_MERGED_MESSAGE_KEYS.has(k) || k === 'annotations') continue;
        if (side === 'proxy') extras.push({ choice: i, key: k, value: m[k] });
        delete m[k];
      }
    }
  }
  return [p, n, extras];
}

/** Rule (5)'s message keys, as the proxy answered them, against the expected body. */
function checkExtras(extras, expected, what) {
  for (const { choice, key, value } of extras) {
    assert.ok(expected, `choice ${choice} has \`${key}\`, which node cannot check, and ${what} is missing`);
    assertSame(value, expected.choices?.[choice]?.message?.[key], `choices[${choice}].message.${key} vs ${what}`);
  }
}

/** Node is not the oracle: the normalised results must differ at exactly `paths`. */
function assertDivergesOnlyAt(p, n, { reason, paths }) {
  const at = diff(p, n).map((line) => line.slice(0, line.indexOf(':')));
  assert.deepEqual(at, paths, `node's result should differ from the proxy's only at ${paths} (${reason})`);
}

function* zipChoices(a, b) {
  const len = Math.max(a.choices?.length ?? 0, b.choices?.length ?? 0);
  for (let i = 0; i < len; i++) yield [a.choices?.[i], b.choices?.[i]];
}

/**
 * The same for the Responses API: `responses.create` through the proxy vs `finalResponse()`.
 * Both sides went through the Node SDK, which adds the convenience `output_text` to each.
 */
function normaliseResponsePair(proxyResponse, nodeResponse) {
  const p = plain(proxyResponse);
  const n = plain(nodeResponse);
  for (const d of [p, n]) {
    // (1) `output_parsed`: node's `finalResponse()` adds it (null without a text format); it is
    //     SDK-only, like `parsed` in spec §5, and `responses.create` does not add it.
    delete d.output_parsed;
    for (const item of d.output ?? []) {
      // (2) `function_call.parsed_arguments` and `output_text.parsed`: SDK-only fields added by
      //     node's parse step (spec §5); the API and the proxy never send them.
      delete item.parsed_arguments;
      for (const part of Array.isArray(item.content) ? item.content : []) if (part) delete part.parsed;
    }
  }
  return [p, n];
}

/** What the proxy's raw chat body must satisfy before any SDK parsing (spec §5). */
function checkChatRawBody(body) {
  assert.equal(body.object, 'chat.completion');
  assert.ok(!('obfuscation' in body), '`obfuscation` must not reach the body');
  for (const choice of body.choices) {
    const m = choice.message;
    assert.ok('refusal' in m, `choice ${choice.index}: \`refusal\` is missing`);
    assert.ok(!('parsed' in m), '`parsed` must not reach the body');
    for (const call of m.tool_calls ?? []) {
      assert.ok(!('index' in call), 'tool_calls[].index must not reach the body');
      assert.ok(!('parsed_arguments' in (call.function ?? {})), '`parsed_arguments` must not reach the body');
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Calls
// ---------------------------------------------------------------------------------------------

/** `chat.completions.create` (non-streaming) through the proxy; checks what the upstream got. */
async function proxyChat(fixture) {
  const { rid, options } = selecting(fixture);
  const { data, response } = await session.viaProxy.chat.completions
    .create({ model: MODEL, messages: MESSAGES }, options)
    .withResponse();
  assert.equal(response.status, 200);
  assert.equal(response.headers.get('content-type').split(';')[0].trim(), 'application/json');
  const upstream = session.mock.oneRequest(rid).json;
  assert.equal(upstream.stream, true, 'the proxy must ask the upstream for a stream');
  assert.equal(
    upstream.stream_options?.include_usage,
    true,
    `chat must get stream_options.include_usage: true, upstream got ${JSON.stringify(upstream.stream_options)}`,
  );
  assert.equal(upstream.model, MODEL);
  assert.deepEqual(upstream.messages, MESSAGES);
  const raw = rawBodies.get(rid);
  assert.ok(raw, 'the raw body was not recorded');
  return { completion: data, body: JSON.parse(raw.text) };
}

/** `responses.create` (non-streaming) through the proxy; checks what the upstream got. */
async function proxyResponses(fixture) {
  const { rid, options } = selecting(fixture);
  const { data, response } = await session.viaProxy.responses.create({ model: MODEL, input: INPUT }, options).withResponse();
  assert.equal(response.status, 200);
  assert.equal(response.headers.get('content-type').split(';')[0].trim(), 'application/json');
  const upstream = session.mock.oneRequest(rid).json;
  assert.equal(upstream.stream, true, 'the proxy must ask the upstream for a stream');
  assert.ok(!('stream_options' in upstream), 'Responses calls must not get stream_options');
  assert.equal(upstream.model, MODEL);
  assert.equal(upstream.input, INPUT);
  const raw = rawBodies.get(rid);
  assert.ok(raw, 'the raw body was not recorded');
  return { response: data, body: JSON.parse(raw.text) };
}

/** openai-node's own accumulation, run directly against the mock. */
async function nodeChatOracle(fixture) {
  const { options } = selecting(fixture);
  const stream = session.direct.chat.completions.stream({ model: MODEL, messages: MESSAGES }, options);
  return stream.finalChatCompletion();
}

async function nodeResponsesOracle(fixture) {
  const { options } = selecting(fixture);
  const stream = session.direct.responses.stream({ model: MODEL, input: INPUT }, options);
  return stream.finalResponse();
}

/** Streams through `client`; returns the parsed items and the request body the upstream got. */
async function streamItems(client, fixture, kind) {
  const { rid, options } = selecting(fixture);
  const stream =
    kind === 'chat'
      ? await client.chat.completions.create({ model: MODEL, messages: MESSAGES, stream: true }, options)
      : await client.responses.create({ model: MODEL, input: INPUT, stream: true }, options);
  const items = [];
  for await (const item of stream) items.push(plain(item));
  return { items, upstream: session.mock.oneRequest(rid) };
}

/** The raw streamed answer through the proxy. */
async function rawStream(fixture, kind) {
  const { options } = selecting(fixture);
  const res =
    kind === 'chat'
      ? await session.viaProxy.chat.completions.create({ model: MODEL, messages: MESSAGES, stream: true }, options).asResponse()
      : await session.viaProxy.responses.create({ model: MODEL, input: INPUT, stream: true }, options).asResponse();
  return { status: res.status, contentType: res.headers.get('content-type') || '', bytes: Buffer.from(await res.arrayBuffer()) };
}

async function checkStreamingPassthrough(fixture, kind, sourceBytes) {
  const through = await streamItems(session.viaProxy, fixture, kind);
  const straight = await streamItems(session.direct, fixture, kind);
  assert.ok(through.items.length > 0, 'nothing came through');
  assert.equal(through.items.length, straight.items.length);
  assertSame(through.items, straight.items, `streamed ${kind === 'chat' ? 'chunks' : 'events'}`);
  assert.equal(through.upstream.json.stream, true, 'the upstream must see `stream: true`');
  assert.ok(
    through.upstream.body.equals(straight.upstream.body),
    'a streaming request body must reach the upstream unchanged',
  );
  const raw = await rawStream(fixture, kind);
  assert.equal(raw.status, 200);
  assert.ok(raw.contentType.startsWith('text/event-stream'), `content-type ${raw.contentType}`);
  assert.ok(
    raw.bytes.equals(sourceBytes),
    `streamed bytes differ from the upstream's: ${raw.bytes.length} vs ${sourceBytes.length} bytes`,
  );
}

/** Registers one skipped test per group when the shared fixtures are absent. */
function fixtureTests(label, list, fn) {
  if (!HAVE_FIXTURES) {
    test(`${label}: no shared fixtures`, { skip: SKIP_NO_FIXTURES }, () => {});
    return;
  }
  test(`${label}: fixtures found`, () => {
    assert.ok(list.length > 0, `${FIXTURES} exists but holds no fixture for ${label}`);
  });
  for (const f of list) test(`${label}: ${fixtureName(f)}`, { timeout: TEST_TIMEOUT_MS }, () => fn(f));
}

// ---------------------------------------------------------------------------------------------
// Chat Completions
// ---------------------------------------------------------------------------------------------

describe('chat.completions', () => {
  fixtureTests('create == node stream helper', [...CHAT_TOP, ...CHAT_DIVERGENT, ...CHAT_REFERENCE], async (f) => {
    const { completion, body } = await proxyChat(f);
    checkChatRawBody(body);
    const expected = hasExpectedJson(f) ? readExpectedJson(f) : null;
    let oracle;
    try {
      oracle = await nodeChatOracle(f);
    } catch (e) {
      // Where node's helper throws it has no result: NAME.json is the oracle.
      assert.ok(expected, `node's helper threw (${e.message}) and there is no NAME.json`);
      assertSame(body, expected, `raw JSON bodies (node's helper threw: ${e.message})`);
      return;
    }
    const [p, n, extras] = normaliseChatPair(completion, oracle);
    checkExtras(extras, expected, 'NAME.json');
    const diverges = NODE_DIVERGES_CHAT[fixtureName(f)];
    if (diverges) {
      assertDivergesOnlyAt(p, n, diverges);
      assertSame(body, expected, `raw JSON bodies (${diverges.reason}, so NAME.json is the oracle)`);
    } else {
      assertSame(p, n, 'completions (after normalisation)');
    }
  });

  fixtureTests('raw body == NAME.json', [...CHAT_TOP, ...CHAT_DIVERGENT], async (f) => {
    const { body } = await proxyChat(f);
    checkChatRawBody(body);
    assertSame(body, readExpectedJson(f), 'raw JSON bodies');
  });

  fixtureTests('streaming passthrough', [...CHAT_TOP, ...CHAT_DIVERGENT, ...CHAT_REFERENCE], (f) =>
    checkStreamingPassthrough(f, 'chat', fs.readFileSync(path.join(FIXTURES, f))),
  );

  test('create({stream: false}) is converted as well (D1)', { timeout: TEST_TIMEOUT_MS }, async () => {
    const { rid, options } = selecting('inline:chat_plain_usage');
    const completion = await session.viaProxy.chat.completions.create({ model: MODEL, messages: MESSAGES, stream: false }, options);
    assert.equal(session.mock.oneRequest(rid).json.stream, true, 'the upstream must see `stream: true`');
    assertSame(plain(completion), SYNTH_CHAT.chat_plain_usage.expected, 'completions');
  });

  for (const [name, s] of Object.entries(SYNTH_CHAT)) {
    const against = s.nodeDiverges ? 'expected body' : 'node stream helper';
    test(`synthetic ${name}: create == ${against}`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const fixture = `inline:${name}`;
      const { completion, body } = await proxyChat(fixture);
      checkChatRawBody(body);
      assertSame(body, s.expected, 'raw JSON bodies');
      const [p, n, extras] = normaliseChatPair(completion, await nodeChatOracle(fixture));
      checkExtras(extras, s.expected, 'the expected body');
      if (s.nodeDiverges) assertDivergesOnlyAt(p, n, s.nodeDiverges);
      else assertSame(p, n, 'completions (after normalisation)');
    });
    test(`synthetic ${name}: streaming passthrough`, { timeout: TEST_TIMEOUT_MS }, () =>
      checkStreamingPassthrough(`inline:${name}`, 'chat', s.bytes),
    );
  }
});

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

describe('responses', () => {
  fixtureTests('create == node stream helper', [...RESPONSES_TOP, ...RESPONSES_REFERENCE_OK], async (f) => {
    const { response, body } = await proxyResponses(f);
    let oracle;
    try {
      oracle = await nodeResponsesOracle(f);
    } catch (e) {
      // Where node's helper throws it has no result: NAME.json is the oracle.
      assert.ok(hasExpectedJson(f), `node's helper threw (${e.message}) and there is no NAME.json`);
      assertSame(body, readExpectedJson(f), `raw JSON bodies (node's helper threw: ${e.message})`);
      return;
    }
    const [p, n] = normaliseResponsePair(response, oracle);
    assertSame(p, n, 'responses (after normalisation)');
  });

  fixtureTests('raw body == NAME.json', RESPONSES_TOP, async (f) => {
    const { body } = await proxyResponses(f);
    assert.equal(body.object, 'response');
    assertSame(body, readExpectedJson(f), 'raw JSON bodies');
  });

  fixtureTests('streaming passthrough', [...RESPONSES_TOP, ...RESPONSES_REFERENCE_ALL], (f) =>
    checkStreamingPassthrough(f, 'responses', fs.readFileSync(path.join(FIXTURES, f))),
  );

  test('create({stream: false}) is converted as well (D1)', { timeout: TEST_TIMEOUT_MS }, async () => {
    const { rid, options } = selecting('inline:responses_text');
    const response = await session.viaProxy.responses.create({ model: MODEL, input: INPUT, stream: false }, options);
    assert.equal(session.mock.oneRequest(rid).json.stream, true, 'the upstream must see `stream: true`');
    const { output_text: outputText, ...rest } = plain(response);
    assertSame(rest, SYNTH_RESPONSES.responses_text.expected, 'responses');
    assert.equal(outputText, SYNTH_RESPONSES.responses_text.expected.output[0].content[0].text);
  });

  for (const [name, s] of Object.entries(SYNTH_RESPONSES)) {
    const against = s.nodeDiverges ? 'expected body' : 'node stream helper';
    test(`synthetic ${name}: create == ${against}`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const fixture = `inline:${name}`;
      const { response, body } = await proxyResponses(fixture);
      assertSame(body, s.expected, 'raw JSON bodies');
      const [p, n] = normaliseResponsePair(response, await nodeResponsesOracle(fixture));
      if (s.nodeDiverges) assertDivergesOnlyAt(p, n, s.nodeDiverges);
      else assertSame(p, n, 'responses (after normalisation)');
    });
    test(`synthetic ${name}: streaming passthrough`, { timeout: TEST_TIMEOUT_MS }, () =>
      checkStreamingPassthrough(`inline:${name}`, 'responses', s.bytes),
    );
  }
});

//! WebSocket memory bounds through the real binary (issue 8): a 100 MiB message to a
//! reader that does not read keeps the proxy's peak memory to a few messages' worth.
//!
//! tungstenite assembles every message whole, so the floor is one message per direction;
//! the proxy adds at most one read ahead while a send is pending (see `src/websocket.rs`).
//! The peak resident set (`VmHWM` in `/proc/<pid>/status`) is Linux only.

#![cfg(target_os = "linux")]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::daemon::{config, start, TempDir};
use support::WAIT;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

const MIB: usize = 1 << 20;
/// The message size issue 8 names.
const MESSAGE: usize = 100 * MIB;
/// Messages the upstream tries to send to the stalled client.
const MESSAGES: usize = 3;

/// The tests here hold several hundred MiB each (in the proxy and in this process): one
/// at a time, on a machine other work shares.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Both test ends and the proxy accept messages a little over 100 MiB.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MESSAGE + MIB))
        .max_frame_size(Some(MESSAGE + MIB))
}

/// A field of `/proc/<pid>/status` in KiB (`VmHWM`, `VmRSS`).
fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Message `i`: `MESSAGE` bytes, its number in the first and the last byte.
fn message(i: usize) -> Message {
    let mut data = vec![0u8; MESSAGE];
    data[0] = i as u8;
    data[MESSAGE - 1] = i as u8;
    Message::binary(data)
}

/// An upstream that sends [`MESSAGES`] messages as fast as the proxy takes them, counting
/// the sends that completed, then waits for the client's close.
async fn sending_upstream(sent: watch::Sender<usize>) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let accepted = tokio::select! {
            _ = stop_rx => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { return };
        let Ok(mut ws) =
            tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await
        else {
            return;
        };
        for i in 0..MESSAGES {
            if ws.send(message(i)).await.is_err() {
                return;
            }
            sent.send_replace(i + 1);
        }
        while let Some(Ok(_)) = ws.next().await {}
    });
    (addr, stop_tx)
}

/// An upstream that reads nothing until `resume` fires, then reads [`MESSAGES`] messages,
/// checking each, and reports how many arrived intact.
async fn stalled_upstream(
    mut resume: watch::Receiver<bool>,
    received: oneshot::Sender<usize>,
) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let accepted = tokio::select! {
            _ = stop_rx => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { return };
        let Ok(mut ws) =
            tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await
        else {
            return;
        };
        if resume.wait_for(|go| *go).await.is_err() {
            return;
        }
        let mut intact = 0;
        for i in 0..MESSAGES {
            match ws.next().await {
                Some(Ok(Message::Binary(data)))
                    if data.len() == MESSAGE
                        && (data[0], data[MESSAGE - 1]) == (i as u8, i as u8) =>
                {
                    intact += 1
                }
                _ => break,
            }
        }
        let _ = received.send(intact);
        while let Some(Ok(_)) = ws.next().await {}
    });
    (addr, stop_tx)
}

type Client = tokio_tungstenite::WebSocketStream<TcpStream>;

/// The binary in front of `upstream` with a 101 MiB message limit, and a client session
/// through it; returns the daemon's RSS right after start-up too.
async fn daemon_and_client(
    tag: &str,
    upstream: SocketAddr,
) -> (TempDir, support::daemon::Daemon, u64, Client) {
    let dir = TempDir::new(tag);
    let port = support::daemon::free_port();
    let rule = format!(
        r#"{{"listenPort": {port}, "listenAddress": "127.0.0.1", "upstreamUrl": "http://{upstream}", "maxWebSocketMessageBytes": {}}}"#,
        MESSAGE + MIB
    );
    let path = dir.write("config.json", &config(&[rule]));
    let daemon = start(&dir, &path, 1).await;
    let baseline_kib = status_kib(daemon.pid(), "VmRSS");

    let request = format!("ws://127.0.0.1:{port}/v1/realtime")
        .into_client_request()
        .unwrap();
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config())),
    )
    .await
    .expect("handshake timed out")
    .unwrap_or_else(|e| panic!("upgrade refused: {e}\n{}", daemon.dump()));
    (dir, daemon, baseline_kib, ws)
}

/// The bound on the proxy's peak RSS: three messages (one being sent, one read ahead,
/// one's worth of buffer growth) plus the process itself.
const BOUND_KIB: u64 = ((3 * MESSAGE + 64 * MIB) / 1024) as u64;

/// Waits until `count` is above zero and has not moved for a second.
async fn wait_throttled(count: &mut watch::Receiver<usize>, daemon: &support::daemon::Daemon) {
    let started = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(1), count.changed()).await {
            Err(_) if *count.borrow() > 0 => return,
            Err(_) => {}
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("the sender ended\n{}", daemon.dump()),
        }
        assert!(
            started.elapsed() < WAIT * 6,
            "the sender was never throttled (sent {})",
            *count.borrow()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_message_to_a_stalled_reader_keeps_the_proxy_memory_bounded() {
    let _one = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let (sent_tx, mut sent_rx) = watch::channel(0usize);
    let (upstream, _stop) = sending_upstream(sent_tx).await;
    let (_dir, mut daemon, baseline_kib, mut ws) = daemon_and_client("ws-100mib", upstream).await;
    let pid = daemon.pid();

    // The client reads nothing. The upstream gets its first message out (the proxy takes
    // it whole, being unable to forward a part), then is throttled: wait until its count
    // has not moved for a second.
    let stall_started = Instant::now();
    wait_throttled(&mut sent_rx, &daemon).await;
    let sent_at_stall = *sent_rx.borrow();
    let stalled_hwm_kib = status_kib(pid, "VmHWM");
    eprintln!(
        "100 MiB: upstream throttled after {sent_at_stall} of {MESSAGES} messages in {:?}; \
         proxy RSS {} MiB at start, peak {} MiB while stalled",
        stall_started.elapsed(),
        baseline_kib / 1024,
        stalled_hwm_kib / 1024
    );
    assert!(
        sent_at_stall < MESSAGES,
        "the proxy took all {MESSAGES} messages of 100 MiB for a client that reads nothing"
    );

    // The client reads: every message arrives whole and in order.
    for i in 0..MESSAGES {
        match tokio::time::timeout(WAIT * 3, ws.next()).await {
            Ok(Some(Ok(Message::Binary(data)))) => {
                assert_eq!(data.len(), MESSAGE, "message {i}");
                assert_eq!(
                    (data[0], data[MESSAGE - 1]),
                    (i as u8, i as u8),
                    "message {i}"
                );
            }
            other => panic!(
                "message {i}: {:?}",
                other.map(|o| o.map(|r| r.map(|m| m.len())))
            ),
        }
    }
    let peak_kib = status_kib(pid, "VmHWM");
    let bound_kib = BOUND_KIB;
    eprintln!(
        "100 MiB: {MESSAGES} messages delivered; proxy peak RSS {} MiB (bound {} MiB); test took {:?}",
        peak_kib / 1024,
        bound_kib / 1024,
        started.elapsed()
    );
    assert!(
        peak_kib < bound_kib,
        "proxy peak RSS {} MiB exceeds {} MiB: it queued more than a message or two",
        peak_kib / 1024,
        bound_kib / 1024
    );
    ws.close(None).await.unwrap();
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_message_to_a_stalled_upstream_keeps_the_proxy_memory_bounded() {
    let _one = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let (resume_tx, resume_rx) = watch::channel(false);
    let (received_tx, received_rx) = oneshot::channel();
    let (upstream, _stop) = stalled_upstream(resume_rx, received_tx).await;
    let (_dir, mut daemon, baseline_kib, ws) = daemon_and_client("ws-100mib-up", upstream).await;
    let pid = daemon.pid();

    let (sent_tx, mut sent_rx) = watch::channel(0usize);
    let client = tokio::spawn(async move {
        let mut ws = ws;
        for i in 0..MESSAGES {
            ws.send(message(i)).await.unwrap();
            sent_tx.send_replace(i + 1);
        }
        ws
    });
    let stall_started = Instant::now();
    wait_throttled(&mut sent_rx, &daemon).await;
    let sent_at_stall = *sent_rx.borrow();
    let stalled_hwm_kib = status_kib(pid, "VmHWM");
    eprintln!(
        "100 MiB up: client throttled after {sent_at_stall} of {MESSAGES} messages in {:?}; \
         proxy RSS {} MiB at start, peak {} MiB while stalled",
        stall_started.elapsed(),
        baseline_kib / 1024,
        stalled_hwm_kib / 1024
    );
    assert!(
        sent_at_stall < MESSAGES,
        "the proxy took all {MESSAGES} messages of 100 MiB for an upstream that reads nothing"
    );

    resume_tx.send_replace(true);
    let intact = tokio::time::timeout(WAIT * 6, received_rx)
        .await
        .expect("the upstream did not receive everything in time")
        .expect("upstream gone");
    assert_eq!(intact, MESSAGES);
    let mut ws = tokio::time::timeout(WAIT, client)
        .await
        .expect("the client did not finish sending")
        .unwrap();
    let peak_kib = status_kib(pid, "VmHWM");
    eprintln!(
        "100 MiB up: {MESSAGES} messages delivered; proxy peak RSS {} MiB (bound {} MiB); test took {:?}",
        peak_kib / 1024,
        BOUND_KIB / 1024,
        started.elapsed()
    );
    assert!(
        peak_kib < BOUND_KIB,
        "proxy peak RSS {} MiB exceeds {} MiB: it queued more than a message or two",
        peak_kib / 1024,
        BOUND_KIB / 1024
    );
    ws.close(None).await.unwrap();
    daemon.stop().await;
}

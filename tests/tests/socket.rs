//! End-to-end: strangers on the socket. Garbage, absurd lengths, invalid MessagePack,
//! unknown requests, requests before the handshake, silent clients and half frames each get
//! an error frame or a closed connection, allocate nothing big, and never stop the daemon
//! from serving everyone else.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use dw_tests::TestDaemon;
use protocol::frame::{encode, read_frame, FrameError};
use protocol::message::{ClientMessage, ErrorKind, ServerMessage};

fn running_daemon() -> TestDaemon {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    daemon
}

fn connect(daemon: &TestDaemon) -> UnixStream {
    let stream = UnixStream::connect(&daemon.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
}

fn hello() -> Vec<u8> {
    encode(&ClientMessage::Hello {
        protocol_version: protocol::PROTOCOL_VERSION,
        client_version: "test".into(),
    })
    .unwrap()
}

/// Connects and completes the handshake.
fn greeted(daemon: &TestDaemon) -> UnixStream {
    let mut stream = connect(daemon);
    stream.write_all(&hello()).unwrap();
    assert!(matches!(
        read_frame::<ServerMessage>(&mut stream).unwrap(),
        ServerMessage::Welcome { .. }
    ));
    stream
}

/// The daemon's answer to what was sent: an error frame, or the connection closed.
fn answer(stream: &mut UnixStream) -> Option<ServerMessage> {
    match read_frame::<ServerMessage>(stream) {
        Ok(message) => Some(message),
        Err(FrameError::Closed) => None,
        Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
        Err(other) => panic!("neither an answer nor a clean close: {other}"),
    }
}

fn assert_bad_request(message: Option<ServerMessage>, needle: &str) {
    match message {
        Some(ServerMessage::Error {
            kind: ErrorKind::BadRequest,
            message,
        }) => assert!(message.contains(needle), "{message}"),
        other => panic!("expected a bad-request error mentioning {needle:?}, got {other:?}"),
    }
}

fn still_serving(daemon: &TestDaemon) {
    daemon.dwctl(&["ping"]).assert_code(0);
}

fn rss(daemon: &TestDaemon) -> u64 {
    daemon.status()["memory"]["rss_bytes"].as_u64().unwrap()
}

#[test]
fn random_bytes_get_an_error_or_a_close_and_the_daemon_serves_on() {
    let daemon = running_daemon();
    let mut seed = 0x2545F4914F6CDD1Du64;
    for _ in 0..20 {
        let mut stream = connect(&daemon);
        let garbage: Vec<u8> = (0..257)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = stream.write_all(&garbage);
        let _ = answer(&mut stream);
    }
    still_serving(&daemon);
}

#[test]
fn a_length_prefix_of_4_gib_is_refused_without_allocating_it() {
    let daemon = running_daemon();
    let before = rss(&daemon);
    let mut stream = connect(&daemon);
    stream.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert_bad_request(answer(&mut stream), "exceeds the limit of 1048576 bytes");
    let mut greeted_stream = greeted(&daemon);
    greeted_stream.write_all(&[0xFF, 0xFF, 0xFF, 0xF0]).unwrap();
    assert_bad_request(answer(&mut greeted_stream), "exceeds the limit");
    assert!(
        rss(&daemon) < before + (64 << 20),
        "the daemon allocated for the announced length"
    );
    still_serving(&daemon);
}

#[test]
fn a_frame_of_valid_length_holding_invalid_messagepack_is_a_bad_request() {
    let daemon = running_daemon();
    let mut stream = greeted(&daemon);
    let mut frame = 6u32.to_be_bytes().to_vec();
    frame.extend_from_slice(&[0xc1, 0xc1, 0xc1, 0xc1, 0xc1, 0xc1]);
    stream.write_all(&frame).unwrap();
    assert_bad_request(answer(&mut stream), "malformed message");
    still_serving(&daemon);
}

#[test]
fn a_valid_frame_of_an_unknown_request_is_a_bad_request_naming_it() {
    #[derive(serde::Serialize)]
    enum Future {
        #[serde(rename = "teleport")]
        Teleport { to: String },
    }
    let daemon = running_daemon();
    let mut stream = greeted(&daemon);
    stream
        .write_all(&encode(&Future::Teleport { to: "mars".into() }).unwrap())
        .unwrap();
    assert_bad_request(answer(&mut stream), "teleport");
    still_serving(&daemon);
}

#[test]
fn a_request_before_the_handshake_is_refused() {
    let daemon = running_daemon();
    let mut stream = connect(&daemon);
    stream
        .write_all(&encode(&ClientMessage::Status).unwrap())
        .unwrap();
    assert_bad_request(answer(&mut stream), "expected a hello first, got status");
    still_serving(&daemon);
}

#[test]
fn a_client_that_connects_and_says_nothing_blocks_nobody() {
    let daemon = running_daemon();
    let silent: Vec<UnixStream> = (0..8).map(|_| connect(&daemon)).collect();
    still_serving(&daemon);
    daemon.run_example(&[]).assert_code(0);
    drop(silent);
    still_serving(&daemon);
}

#[test]
fn half_a_frame_then_a_hang_up_leaves_the_daemon_serving() {
    let daemon = running_daemon();
    for greet in [false, true] {
        let mut stream = if greet {
            greeted(&daemon)
        } else {
            connect(&daemon)
        };
        let frame = encode(&ClientMessage::Ping).unwrap();
        stream.write_all(&frame[..frame.len() / 2]).unwrap();
        drop(stream);
    }
    let mut stream = connect(&daemon);
    stream.write_all(&100u32.to_be_bytes()).unwrap();
    stream.write_all(&[0x80; 10]).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    still_serving(&daemon);
}

// Idle connections cannot take every descriptor: past the cap a client is told so, and the
// daemon goes on serving once they close.
#[test]
fn connections_past_the_cap_are_refused_and_the_daemon_keeps_serving() {
    let daemon = running_daemon();
    // dwd::server::MAX_CONNECTIONS
    let idle: Vec<UnixStream> = (0..256).map(|_| connect(&daemon)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = connect(&daemon);
    match answer(&mut extra) {
        Some(ServerMessage::Refused { message }) => {
            assert!(message.contains("256 connections already"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    daemon.dwctl(&["ping"]).assert_code(0);
}

// A client that goes quiet after the handshake is closed after the handshake's deadline.
#[test]
fn a_client_silent_after_the_handshake_is_closed() {
    let daemon = running_daemon();
    let mut stream = greeted(&daemon);
    let started = std::time::Instant::now();
    assert!(answer(&mut stream).is_none());
    assert!(started.elapsed() < Duration::from_secs(14));
}

/// The daemon's resident memory in bytes.
fn resident_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

// Half-sent frames cannot add up: a hundred clients each holding all but the last byte of
// a 1 MiB frame make the daemon hold at most dwd::server::FRAME_MEMORY_BYTES (32 MiB) of
// them; the rest wait, unallocated, and small requests (a ping) are answered at once.
#[test]
fn half_sent_frames_from_many_clients_hold_a_bounded_amount_of_memory() {
    let daemon = running_daemon();
    let pid = daemon.pid().unwrap();
    let before = resident_bytes(pid);
    let frame_len: u32 = 1 << 20;
    let (streams, senders): (Vec<_>, Vec<_>) = (0..100)
        .map(|_| {
            let stream = greeted(&daemon);
            let mut writer = stream.try_clone().unwrap();
            let sender = std::thread::spawn(move || {
                let _ = writer.write_all(&frame_len.to_be_bytes());
                // All but the last byte; writes past what the daemon reads just wait.
                let _ = writer.write_all(&vec![0x90u8; frame_len as usize - 1]);
            });
            (stream, sender)
        })
        .unzip();
    std::thread::sleep(Duration::from_secs(3));
    let grown = resident_bytes(pid).saturating_sub(before);
    assert!(grown < 64 << 20, "the daemon grew by {grown} bytes");
    let started = std::time::Instant::now();
    daemon.dwctl(&["ping"]).assert_code(0);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "ping waited {:?}",
        started.elapsed()
    );
    for stream in &streams {
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    for sender in senders {
        sender.join().unwrap();
    }
}

//! RFC 6455 framing against a real node, byte for byte: what a client library would
//! never send gets the close code the RFC and docs/protocol.md name.

mod common;

use common::*;
use fanout_testkit::RawWs;

const MASK: Option<[u8; 4]> = Some([0x37, 0xfa, 0x21, 0x3d]);
const TEXT: u8 = 1;
const BINARY: u8 = 2;
const CONTINUATION: u8 = 0;
const CLOSE: u8 = 8;
const PING: u8 = 9;
const PONG: u8 = 10;

async fn raw(node: &fanout_edge::Node) -> RawWs {
    let mut ws = RawWs::connect(node.local_addr(), &format!("/ws?token={}", token("1", &[]))).await;
    let hello = ws.next().await.expect("connected");
    assert!(String::from_utf8_lossy(&hello.payload).contains("connected"));
    ws
}

#[tokio::test]
async fn unmasked_frames_are_protocol_errors() {
    let node = start(None, &[]).await;
    for opcode in [TEXT, BINARY, PING] {
        let mut ws = raw(&node).await;
        ws.send_frame(true, opcode, br#"{"type":"ping","id":1}"#, None)
            .await;
        assert_eq!(ws.close_code().await, Some(1002), "opcode {opcode}");
    }
    // The same frame masked is answered.
    let mut ws = raw(&node).await;
    ws.send_frame(true, TEXT, br#"{"type":"ping","id":1}"#, MASK)
        .await;
    let pong = ws.next().await.unwrap();
    assert_eq!(pong.payload, br#"{"type":"pong","id":1}"#);
    node.shutdown().await;
}

#[tokio::test]
async fn control_frames_over_125_bytes_are_protocol_errors() {
    let node = start(None, &[]).await;
    for opcode in [PING, PONG, CLOSE] {
        let mut ws = raw(&node).await;
        let mut payload = vec![b'a'; 126];
        if opcode == CLOSE {
            payload[..2].copy_from_slice(&1000u16.to_be_bytes());
        }
        ws.send_frame(true, opcode, &payload, MASK).await;
        assert_eq!(ws.close_code().await, Some(1002), "opcode {opcode}");
    }
    // 125 bytes is fine: a ping is answered with a pong of the same payload.
    let mut ws = raw(&node).await;
    ws.send_frame(true, PING, &[b'p'; 125], MASK).await;
    let pong = ws.next().await.unwrap();
    assert_eq!((pong.opcode, pong.payload.len()), (PONG, 125));
    node.shutdown().await;
}

#[tokio::test]
async fn invalid_utf8_closes_1007_whole_or_fragmented() {
    let node = start(None, &[]).await;
    let mut ws = raw(&node).await;
    ws.send_frame(true, TEXT, b"{\"type\":\"ping\",\"id\":\"\xff\"}", MASK)
        .await;
    assert_eq!(ws.close_code().await, Some(1007));

    let mut ws = raw(&node).await;
    ws.send_frame(false, TEXT, b"{\"type\":\"ping\",", MASK)
        .await;
    ws.send_frame(true, CONTINUATION, b"\"id\":\"\xc3\x28\"}", MASK)
        .await;
    assert_eq!(ws.close_code().await, Some(1007));

    // A character split across two fragments is valid once reassembled.
    let mut ws = raw(&node).await;
    let frame = "{\"type\":\"ping\",\"id\":\"é\"}".as_bytes();
    let cut = frame.iter().position(|&b| b == 0xc3).unwrap() + 1;
    ws.send_frame(false, TEXT, &frame[..cut], MASK).await;
    ws.send_frame(true, CONTINUATION, &frame[cut..], MASK).await;
    let pong = ws.next().await.unwrap();
    assert_eq!(pong.payload, "{\"type\":\"pong\",\"id\":\"é\"}".as_bytes());

    // A close frame whose reason is not UTF-8.
    let mut ws = raw(&node).await;
    ws.send_frame(true, CLOSE, b"\x03\xe8\xff", MASK).await;
    assert_eq!(ws.close_code().await, Some(1007));
    node.shutdown().await;
}

#[tokio::test]
async fn fragment_sequence_errors_close_1002() {
    let node = start(None, &[]).await;
    let mut ws = raw(&node).await;
    ws.send_frame(true, CONTINUATION, b"x", MASK).await;
    assert_eq!(ws.close_code().await, Some(1002));
    let mut ws = raw(&node).await;
    ws.send_frame(false, TEXT, b"{", MASK).await;
    ws.send_frame(true, TEXT, b"{}", MASK).await;
    assert_eq!(ws.close_code().await, Some(1002));
    node.shutdown().await;
}

#[tokio::test]
async fn client_close_codes_are_echoed_as_docs_protocol_md_says() {
    let node = start(None, &[]).await;
    // Codes a client may send (1000-1003, 1007-1011, 3000-4999) are echoed.
    for code in [1000u16, 1001, 1003, 1007, 1011, 3000, 4999] {
        let mut ws = raw(&node).await;
        ws.send_frame(true, CLOSE, &code.to_be_bytes(), MASK).await;
        assert_eq!(ws.close_code().await, Some(code), "code {code}");
    }
    // Reserved or server-only codes get 1002.
    for code in [999u16, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 2000, 5000] {
        let mut ws = raw(&node).await;
        ws.send_frame(true, CLOSE, &code.to_be_bytes(), MASK).await;
        assert_eq!(ws.close_code().await, Some(1002), "code {code}");
    }
    // An empty close is answered with 1000; a 1-byte payload is malformed.
    let mut ws = raw(&node).await;
    ws.send_frame(true, CLOSE, b"", MASK).await;
    assert_eq!(ws.close_code().await, Some(1000));
    let mut ws = raw(&node).await;
    ws.send_frame(true, CLOSE, b"\x03", MASK).await;
    assert_eq!(ws.close_code().await, Some(1002));
    node.shutdown().await;
}

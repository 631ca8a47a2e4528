//! A WebSocket peer that writes frames byte for byte — unmasked, oversized control
//! frames, invalid UTF-8, odd fragments — which a well-behaved client library refuses
//! to send. For testing how the server answers protocol violations.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

pub struct RawWs {
    stream: TcpStream,
    /// Bytes read past what was parsed.
    buf: Vec<u8>,
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl RawWs {
    /// Upgrades `path_and_query` (e.g. `/ws?token=…`) on `addr`; panics unless the
    /// server answers 101.
    pub async fn connect(addr: std::net::SocketAddr, path_and_query: &str) -> RawWs {
        Self::connect_with_rcvbuf(addr, path_and_query, None).await
    }

    /// The same, with the socket's receive buffer set to `rcvbuf` bytes first (a
    /// client whose kernel holds little, so that what it reads is what it takes).
    pub async fn connect_with_rcvbuf(
        addr: std::net::SocketAddr,
        path_and_query: &str,
        rcvbuf: Option<u32>,
    ) -> RawWs {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        if let Some(size) = rcvbuf {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        let mut stream = socket.connect(addr).await.expect("connect");
        let request = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .expect("handshake within 10 s")
                .expect("read");
            assert!(n > 0, "connection closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        buf.drain(..end);
        RawWs { stream, buf }
    }

    /// Writes bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        // The server may close first; what it says is read after.
        let _ = self.stream.write_all(bytes).await;
    }

    /// Writes one frame; `mask` = None sends it unmasked.
    pub async fn send_frame(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: &[u8],
        mask: Option<[u8; 4]>,
    ) {
        self.send_raw(&frame(fin, opcode, payload, mask)).await;
    }

    /// The next frame from the server, or `None` when the connection ends first.
    pub async fn next(&mut self) -> Option<RawFrame> {
        loop {
            if let Some((f, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return Some(f);
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("a frame within 10 s")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads up to `max` bytes as they come (frames unparsed); 0 when the connection
    /// ended.
    pub async fn read_raw(&mut self, max: usize) -> usize {
        if !self.buf.is_empty() {
            let n = self.buf.len().min(max);
            self.buf.drain(..n);
            return n;
        }
        let mut chunk = vec![0u8; max];
        tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("bytes within 10 s")
            .unwrap_or(0)
    }

    /// Reads until the close frame; its code (`None` if the connection ended without).
    pub async fn close_code(&mut self) -> Option<u16> {
        while let Some(f) = self.next().await {
            if f.opcode == 8 {
                return f.close_code();
            }
        }
        None
    }
}

/// The bytes of one frame (masked with `mask` when given).
pub fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![(fin as u8) << 7 | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n < 65536 => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

fn parse(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (fin, opcode) = (buf[0] & 0x80 != 0, buf[0] & 0x0f);
    let (len, mut at) = match buf[1] & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    // Server frames are not masked; skip a key if one is there anyway.
    if buf[1] & 0x80 != 0 {
        at += 4;
    }
    let payload = buf.get(at..at + len)?.to_vec();
    Some((
        RawFrame {
            fin,
            opcode,
            payload,
        },
        at + len,
    ))
}

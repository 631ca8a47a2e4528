//! An event-stream client for tests, written from the HTML standard's parsing rules
//! (not from the server's code): HTTP/1.1 over a plain socket, chunked bodies, `event`,
//! `data` (joined by line breaks), `id` (kept across events, as a browser keeps its
//! last event id), `retry` and comments.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One dispatched event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// `message` when the stream named none.
    pub event: String,
    /// The stream's last event id when this event was dispatched.
    pub last_id: String,
    /// Whether this event carried an `id:` field itself.
    pub has_id: bool,
    pub data: String,
}

impl SseEvent {
    /// `data` as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| {
            panic!("event {} data is not JSON ({e}): {}", self.event, self.data)
        })
    }
}

/// A response to `GET` on an event stream (or its refusal).
pub struct SseClient {
    reader: BufReader<TcpStream>,
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    chunked: bool,
    /// What is left of the current chunk.
    chunk_left: usize,
    /// What is left of a body of known length.
    length_left: Option<usize>,
    /// Decoded body bytes not parsed yet.
    pending: Vec<u8>,
    ended: bool,
    last_id: String,
    /// The last `retry:` value, in ms.
    pub retry: Option<u64>,
    /// Comment lines seen (heartbeats).
    pub comments: usize,
}

impl SseClient {
    /// Sends `GET path` with `headers` and reads the response head.
    pub async fn connect(
        addr: std::net::SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<SseClient> {
        let mut stream = TcpStream::connect(addr).await?;
        let mut req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        within(reader.read_line(&mut status_line)).await?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            within(reader.read_line(&mut line)).await?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        let length_left = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok());
        Ok(SseClient {
            reader,
            status,
            headers,
            chunked,
            chunk_left: 0,
            length_left,
            pending: Vec::new(),
            ended: false,
            last_id: String::new(),
            retry: None,
            comments: 0,
        })
    }

    /// The value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The whole body (for a refusal, which is not a stream).
    pub async fn body(mut self) -> String {
        let mut out = Vec::new();
        while let Some(bytes) = self.read_body().await {
            out.extend_from_slice(&bytes);
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The next event; `None` once the stream has ended. Panics after 15 s without one.
    pub async fn next(&mut self) -> Option<SseEvent> {
        tokio::time::timeout(Duration::from_secs(15), self.next_event())
            .await
            .expect("an event (or the stream's end) within 15 s")
    }

    /// The next event, which must exist.
    pub async fn recv(&mut self) -> SseEvent {
        self.next().await.expect("the stream ended")
    }

    /// The next event if one comes within `wait`.
    pub async fn try_next(&mut self, wait: Duration) -> Option<SseEvent> {
        tokio::time::timeout(wait, self.next_event())
            .await
            .ok()
            .flatten()
    }

    /// The last event id, as a browser would send it back in `Last-Event-ID`.
    pub fn last_event_id(&self) -> &str {
        &self.last_id
    }

    async fn next_event(&mut self) -> Option<SseEvent> {
        let (mut event, mut data, mut has_id): (Option<String>, Option<String>, bool) =
            (None, None, false);
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                // Dispatch (an event with no data is not dispatched).
                if let Some(data) = data.take() {
                    return Some(SseEvent {
                        event: event.take().unwrap_or_else(|| "message".into()),
                        last_id: self.last_id.clone(),
                        has_id,
                        data,
                    });
                }
                event = None;
                has_id = false;
                continue;
            }
            if line.starts_with(':') {
                self.comments += 1;
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()),
                None => (line.clone(), String::new()),
            };
            match field.as_str() {
                "event" => event = Some(value),
                "data" => match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(&value);
                    }
                    None => data = Some(value),
                },
                "id" if !value.contains('\0') => {
                    self.last_id = value;
                    has_id = true;
                }
                "retry" => self.retry = value.parse().ok().or(self.retry),
                _ => {}
            }
        }
    }

    /// The next line of the body (CR, LF or CRLF ended); `None` at the end.
    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n' || b == b'\r') {
                let line: Vec<u8> = self.pending.drain(..i).collect();
                let cr = self.pending[0] == b'\r';
                self.pending.remove(0);
                if cr {
                    if self.pending.is_empty() && !self.ended {
                        // A CR at a read boundary: its LF may follow.
                        if let Some(more) = self.read_body().await {
                            self.pending.extend_from_slice(&more);
                        }
                    }
                    if self.pending.first() == Some(&b'\n') {
                        self.pending.remove(0);
                    }
                }
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            let more = self.read_body().await?;
            self.pending.extend_from_slice(&more);
        }
    }

    /// The next piece of the decoded body; `None` at its end.
    async fn read_body(&mut self) -> Option<Vec<u8>> {
        if self.ended {
            return None;
        }
        if !self.chunked {
            if self.length_left == Some(0) {
                self.ended = true;
                return None;
            }
            let mut buf = vec![0u8; self.length_left.unwrap_or(16 * 1024).min(16 * 1024)];
            let n = self.reader.read(&mut buf).await.ok()?;
            if n == 0 {
                self.ended = true;
                return None;
            }
            buf.truncate(n);
            if let Some(left) = &mut self.length_left {
                *left -= n;
            }
            return Some(buf);
        }
        if self.chunk_left == 0 {
            let mut size = String::new();
            self.reader.read_line(&mut size).await.ok()?;
            if size.trim().is_empty() {
                // The CRLF after the previous chunk.
                size.clear();
                self.reader.read_line(&mut size).await.ok()?;
            }
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                self.ended = true;
                return None;
            }
            self.chunk_left = n;
        }
        let mut buf = vec![0u8; self.chunk_left.min(16 * 1024)];
        let n = self.reader.read(&mut buf).await.ok()?;
        if n == 0 {
            self.ended = true;
            return None;
        }
        buf.truncate(n);
        self.chunk_left -= n;
        Some(buf)
    }
}

async fn within<T>(f: impl std::future::Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .map_err(|_| std::io::Error::other("no response head within 10 s"))?
}

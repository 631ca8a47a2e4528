//! The event-stream client: `GET …/sse?channel=…` with hyper's HTTP/1 client, over
//! the same spread of source addresses as the WebSocket clients. The body is parsed
//! as it arrives — an event may be split across body frames, and one frame may hold
//! many events — and each event's `data`, the very JSON of a WebSocket frame, goes
//! through the same accounting ([`client::account`]) as a WebSocket text frame.

use std::sync::Arc;

use anyhow::bail;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::{self, now_us, Seen, Shared, Target};

/// The longest line the parser holds while waiting for its end: far above any message
/// the tool publishes (`--payload` is at most 1 MiB), low enough that a stream which
/// never ends its line cannot eat the machine's memory.
const MAX_LINE: usize = 8 << 20;

/// How much of a refusal's body is read to report it.
const MAX_REFUSAL: usize = 64 << 10;

/// One dispatched event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `event:`; `message` when the event named none, as a browser has it.
    pub kind: String,
    /// The `data:` lines, joined by `\n`.
    pub data: Vec<u8>,
    /// `id:`, when this event carried one.
    pub id: Option<String>,
}

impl Event {
    fn clear(&mut self) {
        self.kind.clear();
        self.data.clear();
        self.id = None;
    }
}

/// An incremental `text/event-stream` parser (the HTML standard's rules): lines end in
/// LF, CRLF or CR; `:` starts a comment; a blank line dispatches the event, if it has
/// data. The event's buffers are reused, so that a steady stream does not allocate per
/// event.
#[derive(Default)]
pub struct Parser {
    /// Bytes received and not parsed yet, from `pos` on.
    buf: Vec<u8>,
    pos: usize,
    /// The last line ended in CR: an LF first in the next bytes belongs to that end.
    after_cr: bool,
    /// Bytes after the last line end (what `MAX_LINE` bounds).
    partial: usize,
    /// Fields seen since the last blank line.
    building: Event,
    has_data: bool,
    /// The event `advance` dispatched last.
    ready: Event,
    /// The last `retry:` value, ms.
    pub retry: Option<u64>,
    /// Comment lines seen (heartbeats).
    pub comments: u64,
}

impl Parser {
    /// Appends received bytes.
    pub fn push(&mut self, chunk: &[u8]) -> anyhow::Result<()> {
        self.partial = match chunk.iter().rposition(|&b| b == b'\n' || b == b'\r') {
            Some(end) => chunk.len() - end - 1,
            None => self.partial + chunk.len(),
        };
        if self.partial > MAX_LINE {
            bail!("an event-stream line longer than {MAX_LINE} bytes");
        }
        if self.pos == self.buf.len() {
            // All parsed: start over rather than move the tail.
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(chunk);
        Ok(())
    }

    /// Parses up to the next dispatched event, which [`Parser::event`] then returns;
    /// `false` when the bytes so far hold no complete event.
    pub fn advance(&mut self) -> bool {
        loop {
            if self.after_cr && self.pos < self.buf.len() {
                self.after_cr = false;
                if self.buf[self.pos] == b'\n' {
                    self.pos += 1;
                }
            }
            let rest = &self.buf[self.pos..];
            let Some(len) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                // Keep only the unfinished line.
                self.buf.drain(..self.pos);
                self.pos = 0;
                return false;
            };
            self.after_cr = rest[len] == b'\r';
            let (start, end) = (self.pos, self.pos + len);
            self.pos = end + 1;
            if start == end {
                if self.dispatch() {
                    return true;
                }
                continue;
            }
            let line = &self.buf[start..end];
            if line[0] == b':' {
                self.comments += 1;
                continue;
            }
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &b""[..]),
            };
            match field {
                b"event" => {
                    self.building.kind.clear();
                    self.building.kind.push_str(&String::from_utf8_lossy(value));
                }
                b"data" => {
                    if self.has_data {
                        self.building.data.push(b'\n');
                    }
                    self.building.data.extend_from_slice(value);
                    self.has_data = true;
                }
                b"id" if !value.contains(&0) => {
                    self.building.id = Some(String::from_utf8_lossy(value).into_owned());
                }
                b"retry" => {
                    if let Some(ms) = std::str::from_utf8(value)
                        .ok()
                        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|v| v.parse().ok())
                    {
                        self.retry = Some(ms);
                    }
                }
                _ => {}
            }
        }
    }

    /// A blank line: the event goes out if it has data, and the next one starts.
    fn dispatch(&mut self) -> bool {
        let has_data = std::mem::take(&mut self.has_data);
        if !has_data {
            self.building.clear();
            return false;
        }
        std::mem::swap(&mut self.ready, &mut self.building);
        self.building.clear();
        if self.ready.kind.is_empty() {
            self.ready.kind.push_str("message");
        }
        true
    }

    /// The event the last successful [`Parser::advance`] dispatched.
    pub fn event(&self) -> &Event {
        &self.ready
    }
}

/// An open event stream.
pub struct Stream {
    body: Incoming,
    parser: Parser,
    /// When the last body frame arrived (µs): the receive time of the events in it.
    at: u64,
    /// Held so that the connection is not closed for want of requests to send.
    _sender: SendRequest<Empty<Bytes>>,
    _conn: Task,
}

/// The connection's task, aborted when dropped (with its stream, or on a refusal):
/// that closes the socket at once.
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a `close` event says.
#[derive(Deserialize)]
struct Close {
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    reason: Option<String>,
}

fn close_reason(data: &[u8]) -> String {
    match serde_json::from_slice::<Close>(data) {
        Ok(c) => format!(
            "closed: {} {}",
            c.code.map_or("?".into(), |c| c.to_string()),
            c.reason.unwrap_or_default()
        ),
        Err(_) => format!("closed: {}", String::from_utf8_lossy(data)),
    }
}

/// `%XX` for every byte of `s` but the unreserved ones and `:` (which a query may hold
/// as it is, and which every channel name has).
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Opens client `i`'s stream on `channel` (the token as `Authorization: Bearer`) and
/// reads until its `subscribed` event. The caller bounds the wait.
pub async fn open(target: &Target, i: usize, token: &str, channel: &str) -> anyhow::Result<Stream> {
    let path = target.sse_path()?;
    let sep = if path.contains('?') { '&' } else { '?' };
    let uri = format!("{path}{sep}channel={}", query_escape(channel));
    let tcp = target.tcp(i).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    let conn = Task(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let req = hyper::Request::get(uri)
        .header(HOST, target.host())
        .header(ACCEPT, "text/event-stream")
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let event_stream = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if status != StatusCode::OK || !event_stream {
        let body = match Limited::new(resp.into_body(), MAX_REFUSAL).collect().await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            Err(e) => format!("(body unread: {e})"),
        };
        bail!("event stream refused: HTTP {status}: {body}");
    }
    let mut stream = Stream {
        body: resp.into_body(),
        parser: Parser::default(),
        at: 0,
        _sender: sender,
        _conn: conn,
    };
    loop {
        while stream.parser.advance() {
            let e = stream.parser.event();
            match e.kind.as_str() {
                "subscribed" => return Ok(stream),
                "error" => bail!(
                    "subscribe {channel} refused: {}",
                    String::from_utf8_lossy(&e.data)
                ),
                "close" => bail!("closed before subscribed: {}", close_reason(&e.data)),
                _ => {}
            }
        }
        if !stream.fill().await? {
            bail!("the stream ended before subscribed");
        }
    }
}

impl Stream {
    /// Reads one body frame into the parser; `false` at the end of the body.
    async fn fill(&mut self) -> anyhow::Result<bool> {
        loop {
            let Some(frame) = self.body.frame().await else {
                return Ok(false);
            };
            // Trailers carry no events.
            if let Ok(data) = frame?.into_data() {
                self.at = now_us();
                self.parser.push(&data)?;
                return Ok(true);
            }
        }
    }

    /// Reads until `stop` (or the stream ends), accounting every event's data as
    /// [`client::receive`] accounts a WebSocket text frame.
    pub async fn receive(mut self, i: usize, shared: Arc<Shared>, stop: CancellationToken) -> Seen {
        let mut seen = Seen::default();
        loop {
            while self.parser.advance() {
                let e = self.parser.event();
                if e.kind == "close" {
                    seen.closed = Some(close_reason(&e.data));
                    return seen;
                }
                client::account(&e.data, self.at, i, &shared, &mut seen);
            }
            let filled = tokio::select! {
                biased;
                _ = stop.cancelled() => return seen,
                f = self.fill() => f,
            };
            match filled {
                Ok(true) => {}
                Ok(false) => {
                    seen.closed = Some("the stream ended without a close event".into());
                    return seen;
                }
                Err(e) => {
                    seen.closed = Some(format!("{e:#}"));
                    return seen;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` one after the other; the events dispatched, as (kind, data, id).
    fn parse(chunks: &[&[u8]]) -> (Vec<(String, String, Option<String>)>, Parser) {
        let mut p = Parser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c).unwrap();
            while p.advance() {
                let e = p.event();
                out.push((
                    e.kind.clone(),
                    String::from_utf8(e.data.clone()).unwrap(),
                    e.id.clone(),
                ));
            }
        }
        (out, p)
    }

    fn ev(kind: &str, data: &str, id: Option<&str>) -> (String, String, Option<String>) {
        (kind.into(), data.into(), id.map(Into::into))
    }

    /// What the edge writes: retry, events with and without ids, a heartbeat, the end.
    const STREAM: &str = "retry: 1500\n\n\
        event: connected\ndata: {\"type\":\"connected\"}\n\n\
        id: ,\nevent: subscribed\ndata: {\"type\":\"subscribed\"}\n\n\
        : ping\n\n\
        id: 1:e1\nevent: message\ndata: {\"type\":\"message\",\"data\":{\"seq\":0}}\n\n\
        event: close\ndata: {\"type\":\"close\",\"code\":1000,\"reason\":\"\"}\n\n";

    fn expected() -> Vec<(String, String, Option<String>)> {
        vec![
            ev("connected", r#"{"type":"connected"}"#, None),
            ev("subscribed", r#"{"type":"subscribed"}"#, Some(",")),
            ev(
                "message",
                r#"{"type":"message","data":{"seq":0}}"#,
                Some("1:e1"),
            ),
            ev("close", r#"{"type":"close","code":1000,"reason":""}"#, None),
        ]
    }

    #[test]
    fn several_events_in_one_chunk() {
        let (events, p) = parse(&[STREAM.as_bytes()]);
        assert_eq!(events, expected());
        assert_eq!(p.retry, Some(1500));
        assert_eq!(p.comments, 1);
    }

    #[test]
    fn events_split_across_chunks_at_every_byte() {
        // One byte at a time, and every two-way split: the same events.
        let bytes: Vec<&[u8]> = STREAM.as_bytes().chunks(1).collect();
        assert_eq!(parse(&bytes).0, expected());
        for at in 0..STREAM.len() {
            let (a, b) = STREAM.as_bytes().split_at(at);
            assert_eq!(parse(&[a, b]).0, expected(), "split at {at}");
        }
    }

    #[test]
    fn crlf_and_cr_line_ends_even_split_between_chunks() {
        let crlf = STREAM.replace('\n', "\r\n");
        let (events, p) = parse(&[crlf.as_bytes()]);
        assert_eq!(events, expected());
        assert_eq!((p.retry, p.comments), (Some(1500), 1));
        // A CR ending one chunk and its LF starting the next: one line end, not two.
        for at in 0..crlf.len() {
            let (a, b) = crlf.as_bytes().split_at(at);
            assert_eq!(parse(&[a, b]).0, expected(), "split at {at}");
        }
        let cr = STREAM.replace('\n', "\r");
        assert_eq!(parse(&[cr.as_bytes()]).0, expected());
    }

    #[test]
    fn comments_data_lines_and_fields_follow_the_standard() {
        let (events, p) = parse(&[
            b": a comment\n:another\n",
            // Two data lines join with a line break; no `event:` is `message`; a field
            // with no colon is a field with an empty value; unknown fields are skipped.
            b"data: a\ndata:b\nfoo: bar\n\n",
            // No data: nothing is dispatched, and its `event:` does not carry over.
            b"event: lone\n\n",
            b"data\n\n",
            // A bad retry is ignored.
            b"retry: 12x\n\n",
        ]);
        assert_eq!(
            events,
            vec![ev("message", "a\nb", None), ev("message", "", None)]
        );
        assert_eq!((p.comments, p.retry), (2, None));
    }

    #[test]
    fn a_line_without_end_is_bounded() {
        let mut p = Parser::default();
        let big = vec![b'x'; MAX_LINE / 2 + 1];
        p.push(b"data: ").unwrap();
        p.push(&big).unwrap();
        assert!(!p.advance());
        assert!(p.push(&big).is_err());
        // A line that ends is fine, however long it was.
        let mut p = Parser::default();
        p.push(&big).unwrap();
        p.push(b"\n").unwrap();
        p.push(&big).unwrap();
    }

    #[test]
    fn channel_names_are_escaped_for_the_query() {
        assert_eq!(query_escape("loadtest:broadcast"), "loadtest:broadcast");
        assert_eq!(query_escape("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}

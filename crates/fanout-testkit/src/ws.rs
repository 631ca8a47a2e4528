//! A WebSocket client for tests, with timeouts on every wait.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const WAIT: Duration = Duration::from_secs(10);

/// What arrived.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Frame(Value),
    /// A text frame serde_json will not parse into a `Value` (e.g. nested deeper than
    /// its limit of 128), as received.
    Raw(String),
    Closed {
        code: Option<u16>,
        reason: String,
    },
}

pub struct WsClient {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    msgpack: bool,
    pings: usize,
    set_cookie: Vec<String>,
}

impl WsClient {
    /// Connects to `url` (e.g. `ws://127.0.0.1:port/ws?token=…`).
    pub async fn connect(url: &str) -> Result<WsClient, String> {
        Self::connect_with(url, &[]).await
    }

    /// Connects with extra request headers (`Authorization`, `Origin`,
    /// `Sec-WebSocket-Protocol` …).
    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Result<WsClient, String> {
        let mut request = url.into_client_request().map_err(|e| e.to_string())?;
        let mut msgpack = false;
        for (name, value) in headers {
            if name.eq_ignore_ascii_case("sec-websocket-protocol") && value.contains("msgpack") {
                msgpack = true;
            }
            request.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|e| e.to_string())?,
                HeaderValue::from_str(value).map_err(|e| e.to_string())?,
            );
        }
        let config = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let (stream, response) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::connect_async_with_config(request, Some(config), false),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let set_cookie = response
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect();
        Ok(WsClient {
            stream,
            msgpack,
            pings: 0,
            set_cookie,
        })
    }

    /// Sends a JSON frame (MessagePack when connected with `fanout.msgpack`).
    pub async fn send(&mut self, frame: Value) {
        let msg = if self.msgpack {
            Message::Binary(rmp_serde::to_vec_named(&frame).expect("encode").into())
        } else {
            Message::Text(frame.to_string().into())
        };
        self.stream.send(msg).await.expect("send frame");
    }

    /// Sends raw text (for malformed-input tests).
    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.stream
            .send(Message::Text(text.into().into()))
            .await
            .expect("send text");
    }

    /// Sends a raw binary frame.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        self.stream
            .send(Message::Binary(bytes.into()))
            .await
            .map_err(|e| e.to_string())
    }

    /// Sends a WebSocket ping, reading nothing.
    pub async fn send_ping(&mut self, payload: &[u8]) -> Result<(), String> {
        self.stream
            .send(Message::Ping(payload.to_vec().into()))
            .await
            .map_err(|e| e.to_string())
    }

    /// The next frame or close, within `WAIT`.
    pub async fn next(&mut self) -> Incoming {
        self.next_within(WAIT)
            .await
            .unwrap_or_else(|| panic!("nothing arrived within {WAIT:?}"))
    }

    /// The next frame or close, or `None` if nothing arrives within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Incoming> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .ok()?;
            match msg {
                None => {
                    return Some(Incoming::Closed {
                        code: None,
                        reason: "stream ended".into(),
                    })
                }
                Some(Err(e)) => {
                    return Some(Incoming::Closed {
                        code: None,
                        reason: e.to_string(),
                    })
                }
                Some(Ok(Message::Text(t))) => {
                    return Some(match serde_json::from_str(&t) {
                        Ok(v) => Incoming::Frame(v),
                        Err(_) => Incoming::Raw(t.to_string()),
                    })
                }
                Some(Ok(Message::Binary(b))) => {
                    return Some(Incoming::Frame(
                        rmp_serde::from_slice(&b).expect("server sent invalid MessagePack"),
                    ))
                }
                Some(Ok(Message::Close(frame))) => {
                    return Some(Incoming::Closed {
                        code: frame.as_ref().map(|f| u16::from(f.code)),
                        reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    })
                }
                Some(Ok(Message::Ping(_))) => {
                    // tungstenite answers with a pong on the next read or write.
                    self.pings += 1;
                    continue;
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The `Set-Cookie` headers of the upgrade response (a load balancer's affinity
    /// cookie), as `name=value` without attributes.
    pub fn cookies(&self) -> Vec<String> {
        self.set_cookie
            .iter()
            .map(|c| c.split(';').next().unwrap_or_default().trim().to_string())
            .collect()
    }

    /// WebSocket pings received from the server so far.
    pub fn pings(&self) -> usize {
        self.pings
    }

    /// The next frame, which must not be a close.
    pub async fn recv(&mut self) -> Value {
        match self.next().await {
            Incoming::Frame(v) => v,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// The next frame, which must have `"type": ty`.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        let v = self.recv().await;
        assert_eq!(v["type"], ty, "expected a `{ty}` frame, got {v}");
        v
    }

    /// Waits for the close frame and returns its code.
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match self.next().await {
                Incoming::Closed { code, .. } => return code,
                Incoming::Frame(_) | Incoming::Raw(_) => continue,
            }
        }
    }

    /// Sends `subscribe` and returns the reply (`subscribed` or `error`).
    pub async fn subscribe(&mut self, id: u64, channel: &str) -> Value {
        self.send(serde_json::json!({"type":"subscribe","id":id,"channel":channel}))
            .await;
        self.recv().await
    }

    /// Sends a close frame with `code` (any number, valid or not) and no reason.
    pub async fn send_close(&mut self, code: u16) {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        let _ = self.stream.send(Message::Close(Some(frame))).await;
    }

    /// Closes the connection from the client side.
    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }

    /// Stops reading entirely but keeps the socket open (a "slow consumer").
    pub fn into_inner(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.stream
    }
}

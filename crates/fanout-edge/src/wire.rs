//! A WebSocket connection's socket, shared by its reader and its writer without a lock,
//! and kept small while idle:
//!
//! - [`Input`] reads client frames with fastwebsockets, but holds its reader (and the
//!   8 KiB buffer fastwebsockets allocates for it) only while the client is sending: when
//!   every byte read has been consumed as frames, the reader is dropped, and the next
//!   one is made when the socket is readable again. An idle connection holds no read
//!   buffer.
//! - [`Output`] writes a burst of frames with one `writev`: fastwebsockets formats each
//!   header, the payloads are the shared frame bytes themselves (never copied). Only
//!   what the socket does not take at once is copied, into a buffer that exists only
//!   until it is flushed. An idle connection holds no write buffer.

pub mod framing;

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketError, WebSocketRead};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

/// Frames written with one `writev`, at most.
pub const BURST: usize = 64;

/// Bytes read into a reader's buffer per read call, at most.
const READ_CHUNK: usize = 8192;

/// The socket and what its reader has been handed.
struct Socket {
    tcp: TcpStream,
    /// Bytes handed to readers, in all.
    delivered: AtomicU64,
}

/// Splits an upgraded connection. `pre_read`: bytes hyper read past the handshake (a
/// client that sent frames before it saw the 101).
pub fn split(tcp: TcpStream, pre_read: Bytes, max_message_size: usize) -> (Input, Output) {
    let socket = Arc::new(Socket {
        tcp,
        delivered: AtomicU64::new(0),
    });
    (
        Input {
            socket: socket.clone(),
            reader: None,
            consumed: 0,
            pre_read_len: pre_read.len() as u64,
            pre_read,
            max_message_size,
        },
        Output {
            socket,
            pending: None,
            written: 0,
        },
    )
}

/// The source a reader reads from: the socket, counted.
struct Source {
    socket: Arc<Socket>,
    pre_read: Bytes,
}

impl AsyncRead for Source {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.pre_read.is_empty() {
            let n = this.pre_read.len().min(buf.remaining());
            buf.put_slice(&this.pre_read[..n]);
            this.pre_read.advance(n);
            this.socket.delivered.fetch_add(n as u64, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(this.socket.tcp.poll_read_ready(cx))?;
            let room = buf.initialize_unfilled_to(buf.remaining().min(READ_CHUNK));
            match this.socket.tcp.try_read(room) {
                Ok(n) => {
                    buf.advance(n);
                    this.socket.delivered.fetch_add(n as u64, Ordering::Relaxed);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale: poll_read_ready waits again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// The reading side.
pub struct Input {
    socket: Arc<Socket>,
    /// Boxed: made along with its buffer, and an idle connection holds neither.
    reader: Option<Box<WebSocketRead<Source>>>,
    /// Bytes of the frames readers returned, in all.
    consumed: u64,
    /// Bytes hyper read ahead, handed over (and counted) by the first reader: it is
    /// kept until they all were.
    pre_read_len: u64,
    pre_read: Bytes,
    max_message_size: usize,
}

impl Input {
    /// The next client frame. Control frames are not answered here (auto-pong and
    /// auto-close are off): the session does, through the writer.
    pub async fn read_frame(&mut self) -> Result<Received, WebSocketError> {
        if self.reader.is_none() {
            if self.pre_read.is_empty() {
                // Wait without a buffer, until a byte (or the end) is there: readiness
                // alone stays set until a read would block, so `readable()` would not
                // wait at all after a reader drained the socket.
                std::future::poll_fn(|cx| {
                    let mut byte = [0u8; 1];
                    self.socket.tcp.poll_peek(cx, &mut ReadBuf::new(&mut byte))
                })
                .await?;
            }
            let source = Source {
                socket: self.socket.clone(),
                pre_read: std::mem::take(&mut self.pre_read),
            };
            let (mut r, _) =
                fastwebsockets::after_handshake_split(source, tokio::io::sink(), Role::Server);
            r.set_auto_close(false);
            r.set_auto_pong(false);
            // fastwebsockets refuses frames of `max` bytes or more: allow the limit.
            r.set_max_message_size(self.max_message_size + 1);
            self.reader = Some(Box::new(r));
        }
        let reader = self.reader.as_mut().expect("made above");
        let mut nothing_to_send = |_| std::future::ready(Ok::<(), io::Error>(()));
        let mut frame = reader.read_frame(&mut nothing_to_send).await?;
        // The header as the client sent it (masked); a client that used a longer length
        // encoding than needed is under-counted, and just keeps its reader.
        let mut head = [0u8; 16];
        self.consumed += (frame.fmt_head(&mut head) + frame.payload.len()) as u64;
        let received = Received {
            masked: head[1] & 0x80 != 0,
            fin: frame.fin,
            opcode: frame.opcode,
            payload: match frame.payload {
                Payload::Bytes(b) => b,
                other => BytesMut::from(&other[..]),
            },
        };
        let delivered = self.socket.delivered.load(Ordering::Relaxed);
        if self.consumed == delivered && delivered >= self.pre_read_len {
            // Everything read is consumed: the buffer is empty, let it go.
            self.reader = None;
        }
        Ok(received)
    }

    /// After the node closed the connection: reads and discards what the client still
    /// sends until it closes too (or `within` passes), so that closing the socket with
    /// unread bytes does not reset the connection — a reset can make the client lose
    /// the close frame and its code.
    pub async fn drain(&mut self, within: Duration) {
        self.reader = None;
        let socket = &self.socket;
        let discard = async {
            let mut buf = [0u8; 1024];
            loop {
                if socket.tcp.readable().await.is_err() {
                    return;
                }
                match socket.tcp.try_read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        };
        // Boxed: the buffer lives only while draining, not in every session's task.
        let _ = tokio::time::timeout(within, Box::pin(discard)).await;
    }

    /// Whether a reader (and its buffer) is held now.
    #[cfg(test)]
    pub fn holds_buffer(&self) -> bool {
        self.reader.is_some()
    }
}

/// A client frame (unmasked).
pub struct Received {
    /// Whether the client masked it (RFC 6455 §5.1: a client must).
    pub masked: bool,
    pub fin: bool,
    pub opcode: OpCode,
    pub payload: BytesMut,
}

/// One frame to write.
pub struct Out<'a> {
    pub opcode: OpCode,
    pub payload: &'a [u8],
}

/// The writing side.
pub struct Output {
    socket: Arc<Socket>,
    /// What the socket did not take yet; empty (unallocated) unless it pushes back.
    /// What the socket takes is advanced past, so an interrupted flush resumes where
    /// it stopped.
    /// (Boxed: the writer's task, which every connection has, carries one word.)
    pending: Option<Box<BytesMut>>,
    /// Bytes handed to the socket, in all.
    written: u64,
}

impl Output {
    /// Writes `frames` without waiting: with one `writev` straight from their bytes
    /// when nothing is pending, and keeps (copies) only what the socket did not take.
    /// Call [`Output::flush`] after.
    pub fn write(&mut self, frames: &[Out<'_>]) -> io::Result<()> {
        debug_assert!(frames.len() <= BURST);
        let mut heads = [[0u8; 16]; BURST];
        let mut head_lens = [0usize; BURST];
        for (i, f) in frames.iter().enumerate() {
            let mut frame = Frame::new(true, f.opcode, None, Payload::Borrowed(f.payload));
            head_lens[i] = frame.fmt_head(&mut heads[i]);
        }
        if let Some(pending) = self.pending.as_mut() {
            // Behind earlier bytes: queue after them.
            for (i, f) in frames.iter().enumerate() {
                pending.extend_from_slice(&heads[i][..head_lens[i]]);
                pending.extend_from_slice(f.payload);
            }
            return Ok(());
        }
        let mut slices = [IoSlice::new(&[]); BURST * 2];
        let mut total = 0;
        for (i, f) in frames.iter().enumerate() {
            slices[2 * i] = IoSlice::new(&heads[i][..head_lens[i]]);
            slices[2 * i + 1] = IoSlice::new(f.payload);
            total += head_lens[i] + f.payload.len();
        }
        let written = match self
            .socket
            .tcp
            .try_write_vectored(&slices[..frames.len() * 2])
        {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        self.written += written as u64;
        if written < total {
            // Keep the rest, in order.
            let pending = self
                .pending
                .insert(Box::new(BytesMut::with_capacity(total - written)));
            let mut skip = written;
            for s in &slices[..frames.len() * 2] {
                if skip >= s.len() {
                    skip -= s.len();
                } else {
                    pending.extend_from_slice(&s[skip..]);
                    skip = 0;
                }
            }
        }
        Ok(())
    }

    /// Waits until everything written has gone to the socket, then lets the buffer go.
    /// Cancel-safe: dropped midway, it has lost nothing, and the next call goes on.
    /// (Polled by hand, so that the future is a few words, not a readiness waiter.)
    pub async fn flush(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(pending) = self.pending.as_mut() {
            if pending.is_empty() {
                // All taken: let the buffer go.
                self.pending = None;
                break;
            }
            ready!(self.socket.tcp.poll_write_ready(cx))?;
            match self.socket.tcp.try_write(pending) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    pending.advance(n);
                    self.written += n as u64;
                }
                // Readiness was stale: poll_write_ready waits again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// How far the client has taken what was written: a number that grows whenever it
    /// does. On Linux, the bytes the peer acknowledged (handed to the socket, less what
    /// the kernel still holds unacknowledged), which moves as soon as the client reads
    /// — unlike write readiness, which the kernel signals only once half its send
    /// buffer has drained. Elsewhere, the bytes the socket took.
    pub fn progress(&self) -> u64 {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let mut unacked: libc::c_int = 0;
            // SAFETY: TIOCOUTQ writes one int (the bytes in the send queue) to the
            // pointer, which is valid for the call; the fd is this socket's, open.
            let rc = unsafe {
                libc::ioctl(
                    self.socket.tcp.as_raw_fd(),
                    libc::TIOCOUTQ,
                    &mut unacked as *mut libc::c_int,
                )
            };
            if rc == 0 && unacked >= 0 {
                return self.written.saturating_sub(unacked as u64);
            }
        }
        self.written
    }

    /// Whether everything written has gone to the socket.
    pub fn is_flushed(&self) -> bool {
        self.pending.is_none()
    }

    /// Writes one control or data frame and flushes.
    pub async fn send(&mut self, opcode: OpCode, payload: &[u8]) -> io::Result<()> {
        self.write(&[Out { opcode, payload }])?;
        self.flush().await
    }

    /// Sends FIN after the close frame: the client reads to the end, answers, closes.
    pub fn shutdown_write(&self) {
        let _ = socket2::SockRef::from(&self.socket.tcp).shutdown(std::net::Shutdown::Write);
    }

    /// Bytes waiting for the socket.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (server, client)
    }

    /// A masked client frame.
    fn client_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut f = Frame::new(
            true,
            opcode,
            Some([1, 2, 3, 4]),
            Payload::Owned(payload.to_vec()),
        );
        f.mask();
        let mut head = [0u8; 16];
        let n = f.fmt_head(&mut head);
        let mut out = head[..n].to_vec();
        out.extend_from_slice(&f.payload);
        out
    }

    #[tokio::test]
    async fn an_idle_input_holds_no_buffer_and_pipelined_frames_are_all_read() {
        let (server, mut client) = pair().await;
        let (mut input, _output) = split(server, Bytes::new(), 1 << 20);
        // Two frames in one segment, the second with a 2-byte length.
        let big = vec![b'x'; 300];
        let mut bytes = client_frame(OpCode::Text, b"one");
        bytes.extend(client_frame(OpCode::Text, &big));
        client.write_all(&bytes).await.unwrap();
        let f = input.read_frame().await.unwrap();
        assert_eq!(&f.payload[..], b"one");
        assert!(input.holds_buffer(), "the second frame is still buffered");
        let f = input.read_frame().await.unwrap();
        assert_eq!(&f.payload[..], &big[..]);
        assert!(!input.holds_buffer(), "all consumed: the buffer is let go");
        // Waiting for the next frame takes no reader either.
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), input.read_frame());
        assert!(waiting.await.is_err());
        assert!(!input.holds_buffer(), "an idle wait holds no buffer");
        // And the next frame is read by a new reader.
        client
            .write_all(&client_frame(OpCode::Ping, b"p"))
            .await
            .unwrap();
        let f = input.read_frame().await.unwrap();
        assert_eq!(f.opcode, OpCode::Ping);
        assert_eq!(&f.payload[..], b"p");
        assert!(!input.holds_buffer());
    }

    #[tokio::test]
    async fn a_frame_split_across_segments_is_reassembled() {
        let (server, mut client) = pair().await;
        let (mut input, _output) = split(server, Bytes::new(), 1 << 20);
        let bytes = client_frame(OpCode::Binary, &[7u8; 70_000]);
        let reading = tokio::spawn(async move {
            let f = input.read_frame().await.unwrap();
            (f.payload.len(), input.holds_buffer())
        });
        for chunk in bytes.chunks(1000) {
            client.write_all(chunk).await.unwrap();
            tokio::task::yield_now().await;
        }
        assert_eq!(reading.await.unwrap(), (70_000, false));
    }

    #[tokio::test]
    async fn bytes_read_ahead_by_hyper_come_first() {
        let (server, mut client) = pair().await;
        let mut early = client_frame(OpCode::Text, b"early");
        let later = early.split_off(3);
        let (mut input, _output) = split(server, Bytes::from(early), 1 << 20);
        client.write_all(&later).await.unwrap();
        assert_eq!(&input.read_frame().await.unwrap().payload[..], b"early");
        assert!(
            !input.holds_buffer(),
            "read ahead or not, an idle input holds none"
        );
        client
            .write_all(&client_frame(OpCode::Text, b"next"))
            .await
            .unwrap();
        assert_eq!(&input.read_frame().await.unwrap().payload[..], b"next");
        // Read ahead: a whole frame and part of the next.
        let (server, mut client) = pair().await;
        let mut ahead = client_frame(OpCode::Text, b"a");
        let mut second = client_frame(OpCode::Text, b"bb");
        let rest = second.split_off(4);
        ahead.extend(second);
        let (mut input, _output) = split(server, Bytes::from(ahead), 1 << 20);
        assert_eq!(&input.read_frame().await.unwrap().payload[..], b"a");
        assert!(input.holds_buffer(), "part of the next frame is buffered");
        client.write_all(&rest).await.unwrap();
        assert_eq!(&input.read_frame().await.unwrap().payload[..], b"bb");
        assert!(!input.holds_buffer());
    }

    /// The bytes `frames` make on the wire.
    fn encoded(frames: &[Out<'_>]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for f in frames {
            let mut frame = Frame::new(true, f.opcode, None, Payload::Borrowed(f.payload));
            let mut head = [0u8; 16];
            let n = frame.fmt_head(&mut head);
            bytes.extend_from_slice(&head[..n]);
            bytes.extend_from_slice(f.payload);
        }
        bytes
    }

    #[tokio::test]
    async fn a_burst_goes_out_in_order_and_what_the_socket_refuses_waits() {
        let (server, mut client) = pair().await;
        let (_input, mut output) = split(server, Bytes::new(), 1 << 20);
        let big = vec![b'y'; 64 * 1024];
        let frames: Vec<Vec<u8>> = (0..BURST).map(|i| format!("{i}:").into_bytes()).collect();
        let mut burst: Vec<Out<'_>> = frames
            .iter()
            .map(|p| Out {
                opcode: OpCode::Text,
                payload: p,
            })
            .collect();
        burst[BURST - 1].payload = &big;
        // Fill the socket until it pushes back, without anyone reading.
        let mut rounds = 0;
        while output.pending() == 0 {
            output.write(&burst).unwrap();
            rounds += 1;
            assert!(rounds < 10_000, "the socket never pushed back");
        }
        assert!(output.pending() > 0);
        // Then more than the kernel's buffers hold, so a flush has to stop midway.
        let huge = vec![b'z'; 32 << 20];
        let tail = [Out {
            opcode: OpCode::Binary,
            payload: &huge,
        }];
        output.write(&tail).unwrap();
        let expected = {
            let mut all = encoded(&burst).repeat(rounds);
            all.extend(encoded(&tail));
            all
        };
        // The client reads half, then stops a while: the flush, interrupted midway,
        // must go on from where it stopped, not start over.
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; expected.len()];
            let half = expected.len() / 2;
            client.read_exact(&mut got[..half]).await.unwrap();
            go_rx.await.unwrap();
            client.read_exact(&mut got[half..]).await.unwrap();
            assert!(got == expected, "bytes differ");
        });
        let interrupted = tokio::time::timeout(Duration::from_millis(300), output.flush()).await;
        assert!(
            interrupted.is_err(),
            "the flush cannot end before the client reads"
        );
        go_tx.send(()).unwrap();
        output.flush().await.unwrap();
        assert_eq!(output.pending(), 0);
        assert!(output.pending.is_none(), "the buffer is let go");
        reader.await.unwrap();
    }
}

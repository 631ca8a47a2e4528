//! How a connection is told to close, from anywhere — the hub (a slow consumer), the
//! admin API, a drain, its own reader — and how its two tasks wait for that. It knows
//! nothing of sockets, channels or the broker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use fanout_protocol::CloseCode;
use futures_util::task::AtomicWaker;

/// How a connection is told to close, from anywhere (hub, admin API, drain, its own
/// reader). The first close asked for wins.
///
/// Not a `CancellationToken`: a child token allocates a tree node per connection, and
/// its wait future is nine words, which both of a connection's tasks would carry. The
/// node reaches every connection through its session registry instead.
#[derive(Default)]
pub struct Control {
    close: OnceLock<(u16, String)>,
    cancelled: AtomicBool,
    /// The connection's reader and writer, each waiting for the cancel.
    reader: AtomicWaker,
    writer: AtomicWaker,
}

/// Which of a connection's two tasks waits.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    Reader,
    Writer,
}

impl Control {
    pub fn new() -> Control {
        Control::default()
    }

    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.reader.wake();
        self.writer.wake();
    }

    /// Closes the connection with a close frame carrying `code`.
    pub fn close(&self, code: CloseCode) {
        self.close_raw(code.code(), code.reason().to_string());
    }

    /// Closes with any code and reason (used to echo a client's close frame).
    pub fn close_raw(&self, code: u16, reason: String) {
        if self.close.set((code, reason)).is_ok() {
            self.cancel();
        }
    }

    /// Ends the connection without a close frame (the peer is gone).
    pub fn abort(&self) {
        self.cancel();
    }

    /// The close code asked for, if any.
    #[cfg(test)]
    pub fn code(&self) -> Option<CloseCode> {
        self.close.get().and_then(|(c, _)| CloseCode::from_u16(*c))
    }

    /// The close frame to send, if any.
    pub fn close_frame(&self) -> Option<&(u16, String)> {
        self.close.get()
    }

    /// Resolves once the connection is closed or aborted. One waiter per side.
    pub fn cancelled(&self, side: Side) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| self.poll_cancelled(side, cx))
    }

    /// [`Control::cancelled`], polled by hand (a stream body has no future to hold).
    pub fn poll_cancelled(
        &self,
        side: Side,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.is_cancelled() {
            return std::task::Poll::Ready(());
        }
        match side {
            Side::Reader => self.reader.register(cx.waker()),
            Side::Writer => self.writer.register(cx.waker()),
        }
        // A cancel between the check and the registration is seen here.
        if self.is_cancelled() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }
}

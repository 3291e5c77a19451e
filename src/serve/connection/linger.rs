//! The end of a connection hyper closed with the client's bytes still unread in its socket: the
//! kernel would answer the close with a reset, and a reset throws away what the socket has not
//! sent yet (the end of the last response, for a client that reads it slowly).

use std::io;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::serve::transport::{SocketReach, Transport};

use super::Stage;

/// How long the input of a connection hyper closed is read and dropped, waiting for its client
/// to close its end.
const LINGER: Duration = Duration::from_secs(2);

/// A connection hyper closed (its writing shut down: the end of stream follows what the socket
/// still holds) with bytes of the client's still unread (a peek, one system call as the
/// connection ends: tokio's readiness may not have seen them yet), a pipelined request say:
/// they are read and dropped until the client closes its end (it has the whole response, and
/// `Connection: close`), for at most [`LINGER`], or until the cut. Only then is the socket
/// closed, with nothing unread, so the kernel sends the rest of the response, then its end,
/// instead of a reset.
///
/// Never after an HTTP/1 upgrade: the handler may still own the read half, and waiting for
/// the socket's readiness here would take its place as the reader to wake.
pub(super) async fn linger<T: Transport>(
    socket: &SocketReach<T>,
    stage: &mut watch::Receiver<Stage>,
) {
    let stream = socket.get();
    let until = Instant::now() + LINGER;
    let mut scratch = vec![0; 4096];
    loop {
        tokio::select! {
            ready = std::future::poll_fn(|cx| stream.poll_read_ready(cx)) => {
                if ready.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(until) => return,
            _ = stage.wait_for(|s| *s == Stage::Cut) => return,
        }
        match stream.try_read(&mut scratch) {
            // The client closed its end: nothing is left to reset the connection.
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

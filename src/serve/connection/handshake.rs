//! The TLS handshake of a fresh connection, bounded by its timeout and by the drain.

use tokio::sync::watch;
use tokio::time::Instant;

use crate::serve::conn_io::ConnIo;
use crate::serve::tower::ConnWatch;
use crate::serve::transport::Transport;

use super::{Settings, Stage, after};

/// The TLS handshake of a fresh connection, bounded by the handshake timeout, and, once the
/// drain started, by the connection's idle grace (it has sent no request yet); cut at the
/// deadline.
pub(super) async fn handshake<T: Transport>(
    acceptor: &tokio_rustls::TlsAcceptor,
    io: ConnIo<T>,
    watch: &ConnWatch,
    stage: &mut watch::Receiver<Stage>,
    settings: Settings,
) -> Option<tokio_rustls::server::TlsStream<ConnIo<T>>> {
    let drained = async {
        let grace_until = loop {
            let now = *stage.borrow_and_update();
            match now {
                Stage::Draining { grace_until } => break grace_until,
                Stage::Cut => break Instant::now(),
                Stage::Serving | Stage::Announced => {}
            }
            if stage.changed().await.is_err() {
                break Instant::now();
            }
        };
        tokio::time::sleep_until(grace_until.min(after(watch.last_active(), settings.idle_grace)))
            .await;
    };
    tokio::select! {
        accepted = tokio::time::timeout(settings.tls_handshake_timeout, acceptor.accept(io)) => {
            match accepted {
                Ok(Ok(stream)) => Some(stream),
                Ok(Err(error)) => {
                    tracing::debug!(target: "finale", peer = %watch.peer, %error, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(target: "finale", peer = %watch.peer, "TLS handshake timed out");
                    None
                }
            }
        }
        () = drained => None,
    }
}

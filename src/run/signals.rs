//! Receiving the configured signals on the supervisor's own runtime.

use std::io;

use crate::signal::Signal;

/// A stream of one kind of signal.
pub(crate) struct Listener {
    signal: Signal,
    #[cfg(unix)]
    inner: tokio::signal::unix::Signal,
    #[cfg(windows)]
    inner: WindowsListener,
}

#[cfg(windows)]
enum WindowsListener {
    CtrlC(tokio::signal::windows::CtrlC),
    Close(
        tokio::signal::windows::CtrlClose,
        tokio::signal::windows::CtrlShutdown,
    ),
}

impl Listener {
    /// Installs the process-wide handler for `signal` (once per process; tokio never uninstalls it).
    pub(crate) fn new(signal: Signal) -> io::Result<Option<Self>> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal as unix_signal};
            let kind = match signal {
                Signal::Terminate => SignalKind::terminate(),
                Signal::Interrupt => SignalKind::interrupt(),
                Signal::Quit => SignalKind::quit(),
                Signal::Hangup => SignalKind::hangup(),
                Signal::User1 => SignalKind::user_defined1(),
                Signal::User2 => SignalKind::user_defined2(),
            };
            Ok(Some(Self {
                signal,
                inner: unix_signal(kind)?,
            }))
        }
        #[cfg(windows)]
        {
            use tokio::signal::windows;
            let inner = match signal {
                Signal::Interrupt => WindowsListener::CtrlC(windows::ctrl_c()?),
                Signal::Terminate => {
                    WindowsListener::Close(windows::ctrl_close()?, windows::ctrl_shutdown()?)
                }
                _ => return Ok(None),
            };
            Ok(Some(Self { signal, inner }))
        }
        #[cfg(not(any(unix, windows)))]
        {
            let _ = signal;
            Ok(None)
        }
    }

    /// Waits for the next delivery. Returns `None` if the stream ended.
    pub(crate) async fn recv(&mut self) -> Option<Signal> {
        #[cfg(unix)]
        {
            self.inner.recv().await.map(|()| self.signal)
        }
        #[cfg(windows)]
        {
            match &mut self.inner {
                WindowsListener::CtrlC(c) => c.recv().await.map(|()| self.signal),
                WindowsListener::Close(c, s) => tokio::select! {
                    r = c.recv() => r.map(|()| self.signal),
                    r = s.recv() => r.map(|()| self.signal),
                },
            }
        }
    }
}

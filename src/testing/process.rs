//! [`Process`]: a service as a child process, real signals sent to it by PID, and how it exited.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{self, BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[cfg(unix)]
use crate::signal::Signal;

/// Variables of the test's own environment that change what finale does in the child: its
/// settings, the orchestrator detection (which picks the drain delay) and systemd's protocol.
const INHERITED_PREFIXES: &[&str] = &["FINALE_"];
const INHERITED: &[&str] = &[
    "KUBERNETES_SERVICE_HOST",
    "ECS_CONTAINER_METADATA_URI",
    "ECS_CONTAINER_METADATA_URI_V4",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// How long the lines still in the pipes may take once the process has ended.
const LAST_LINES: Duration = Duration::from_secs(2);

/// A service under test as a child process: its stdout and stderr read line by line, real
/// signals sent to it by PID, and a bounded wait for its exit.
///
/// Both streams are read, since loggers differ on where they write: tracing-subscriber's
/// `fmt()` writes to stdout unless given `.with_writer(std::io::stderr)`, and a report printed
/// with `eprintln!` goes to stderr. [`wait_for`](Process::wait_for) finds a line in either.
///
/// Every wait is bounded, and the child is killed (by its PID, while it is still this process's
/// child) when a wait fails and when the `Process` is dropped, so a failing test never leaves it
/// behind. The methods block the calling thread: call them from a plain `#[test]`, or from
/// `spawn_blocking`.
///
/// # Examples
///
/// ```no_run
/// use std::process::Command;
/// use std::time::Duration;
/// use finale::Signal;
/// use finale::testing::Process;
///
/// # fn main() -> std::io::Result<()> {
/// // In a test of your crate: env!("CARGO_BIN_EXE_my-service").
/// let mut command = Command::new("target/debug/my-service");
/// command.env("RUST_LOG", "info");
/// let mut service = Process::spawn(command)?;
/// service.wait_for("started: ready", Duration::from_secs(10));
/// service.signal(Signal::Terminate);
/// let exit = service.wait_exit(Duration::from_secs(30));
/// assert_eq!(exit.code(), Some(0), "{}", exit.output());
/// assert!(exit.report().contains("shutdown after signal SIGTERM: clean"), "{}", exit.output());
/// assert!(exit.elapsed < Duration::from_secs(1), "{exit}");
/// # Ok(())
/// # }
/// ```
///
/// # Testing a binary-only service
///
/// A service with no library target (everything in `src/main.rs`) is tested from the outside:
/// an integration test in `tests/` gets the path of the binary cargo built for it from
/// `env!("CARGO_BIN_EXE_<name>")`, starts it on a free port, waits for its "listening" line,
/// drives it over the network and sends it a real signal. No `finale::testing::Run` is needed
/// (that one runs a service registered in-process, from a library's `register(&finale)`).
///
/// ```ignore
/// // tests/shutdown.rs of a package whose binary is `my-service`
/// use std::process::Command;
/// use std::time::Duration;
/// use finale::{Signal, testing::Process};
///
/// #[test]
/// fn sigterm_drains_and_exits_clean() {
///     let mut command = Command::new(env!("CARGO_BIN_EXE_my-service"));
///     command.env("BIND_ADDRESS", "127.0.0.1:0").env("RUST_LOG", "info");
///     let mut service = Process::spawn(command).unwrap();
///     // The service logs the address it bound (port 0: the kernel's choice).
///     let line = service.wait_for("listening on ", Duration::from_secs(30));
///     let addr = line.rsplit("listening on ").next().unwrap().trim().to_owned();
///     // ... requests to `addr` ...
///     service.signal(Signal::Terminate);
///     let exit = service.wait_exit(Duration::from_secs(30));
///     assert_eq!(exit.code(), Some(0), "{}", exit.output());
///     assert!(exit.report().contains(": clean, exit code 0"), "{}", exit.report());
/// }
/// ```
///
/// `tests/binary_service.rs` in finale's own repository follows this pattern with the
/// `axum_service` example, a binary-only service; since an example is not a `[[bin]]`, cargo
/// sets no `CARGO_BIN_EXE_` variable for it, and the test finds its path with a helper of its
/// own instead.
pub struct Process {
    label: String,
    child: Child,
    spawned: Instant,
    signalled: Option<Instant>,
    lines: mpsc::Receiver<(Stream, String)>,
    seen: Vec<(Stream, String)>,
    reaped: bool,
}

/// Which of the child's streams a line came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stream {
    Stdout,
    Stderr,
}

/// Reads `pipe` line by line into `tx` on a thread of its own, until it closes; bytes that are
/// not UTF-8 become U+FFFD.
fn read_lines(
    stream: Stream,
    pipe: impl io::Read + Send + 'static,
    tx: mpsc::Sender<(Stream, String)>,
) -> io::Result<()> {
    let name = match stream {
        Stream::Stdout => "finale-testing-stdout",
        Stream::Stderr => "finale-testing-stderr",
    };
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            // Bytes, decoded lossily: a line that is not UTF-8 must not stop the reader, which
            // would close the pipe (the child's next write fails) and lose every later line.
            let mut pipe = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match pipe.read_until(b'\n', &mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
                let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if tx
                    .send((stream, plain(&String::from_utf8_lossy(line))))
                    .is_err()
                {
                    break;
                }
            }
        })
        .map(drop)
}

/// The lines of one stream, or of both in the order they arrived.
fn joined(seen: &[(Stream, String)], only: Option<Stream>) -> String {
    let lines: Vec<&str> = seen
        .iter()
        .filter(|(s, _)| only.is_none_or(|only| *s == only))
        .map(|(_, line)| line.as_str())
        .collect();
    lines.join("\n")
}

impl Process {
    /// Starts `command` with stdin on the null device and stdout and stderr read line by line
    /// (ANSI colour sequences removed).
    ///
    /// The variables of the test's own environment that would change what finale does in the
    /// child are not passed on, unless `command` sets them itself: every `FINALE_*` setting,
    /// `KUBERNETES_SERVICE_HOST` and `ECS_CONTAINER_METADATA_URI[_V4]` (which would pick the
    /// orchestrator's drain delay when the tests run in a pod), and systemd's `NOTIFY_SOCKET`,
    /// `WATCHDOG_*` and `LISTEN_*`.
    ///
    /// # Errors
    ///
    /// What [`Command::spawn`] returns (the program is missing, say).
    pub fn spawn(mut command: Command) -> io::Result<Self> {
        let label = describe(&command);
        let set: Vec<_> = command.get_envs().map(|(k, _)| k.to_owned()).collect();
        for key in withheld(std::env::vars_os().map(|(k, _)| k), &set) {
            command.env_remove(key);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        // The channel disconnects once both pipes have closed.
        let (tx, lines) = mpsc::channel();
        let readers = read_lines(Stream::Stdout, stdout, tx.clone())
            .and_then(|()| read_lines(Stream::Stderr, stderr, tx));
        if let Err(e) = readers {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(Self {
            label,
            child,
            spawned,
            signalled: None,
            lines,
            seen: Vec::new(),
            reaped: false,
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits, at most `within`, for a line of stdout or stderr containing `needle`, and returns
    /// it.
    ///
    /// # Panics
    ///
    /// If no such line comes within `within`, or the process ends first: the child is killed
    /// and the message holds everything it wrote.
    pub fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        self.wait_until(&format!("{needle:?}"), within, |line| line.contains(needle))
    }

    /// Waits, at most `within`, for a line of stdout or stderr for which `matches` holds, and
    /// returns it.
    /// `what` describes the line for the panic message.
    ///
    /// # Panics
    ///
    /// As [`wait_for`](Process::wait_for).
    pub fn wait_until(
        &mut self,
        what: &str,
        within: Duration,
        mut matches: impl FnMut(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((stream, line)) => {
                    let found = matches(&line);
                    self.seen.push((stream, line));
                    if found {
                        return self.seen.last().map(|(_, l)| l.clone()).unwrap_or_default();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.fail(&format!("no line with {what} within {within:?}"))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.reap(deadline);
                    self.fail(&format!(
                        "ended ({}) after {:?} without a line with {what}",
                        status.map_or_else(|| "output closed".to_owned(), |s| s.to_string()),
                        self.spawned.elapsed()
                    ))
                }
            }
        }
    }

    /// Sends the real `signal` to the child, by its PID (with the system's `kill` utility: no
    /// unsafe code, no libc). [`wait_exit`](Process::wait_exit) then measures from here.
    ///
    /// # Panics
    ///
    /// If `kill` fails: the child is killed and the message holds everything it wrote.
    #[cfg(unix)]
    #[cfg_attr(docsrs, doc(cfg(unix)))]
    pub fn signal(&mut self, signal: Signal) {
        self.signals(&[signal]);
    }

    /// Sends several real signals back to back, from one shell: microseconds apart, as when
    /// an operator's Ctrl-C meets the platform's `SIGTERM`.
    ///
    /// # Panics
    ///
    /// As [`signal`](Process::signal).
    #[cfg(unix)]
    #[cfg_attr(docsrs, doc(cfg(unix)))]
    pub fn signals(&mut self, signals: &[Signal]) {
        // `SIGTERM` -> `kill -s TERM $1`
        let script: Vec<String> = signals
            .iter()
            .map(|s| format!("kill -s {} \"$1\"", &s.as_str()[3..]))
            .collect();
        let sent = Command::new("sh")
            .args(["-c", &script.join(" && "), "sh", &self.pid().to_string()])
            .stdin(Stdio::null())
            .status();
        self.signalled = Some(Instant::now());
        match sent {
            Ok(status) if status.success() => {}
            other => self.fail(&format!("sending {signals:?} failed: {other:?}")),
        }
    }

    /// Waits for the exit, at most `within` after the last [`signal`](Process::signal) (or the
    /// spawn, if none was sent); a child still running then is killed, and
    /// [`Exit::status`] is `None`.
    ///
    /// The exit is seen when the child's stdout and stderr close, so it is measured at once; a
    /// child that left a process of its own holding one of them is seen at the end of the
    /// window.
    pub fn wait_exit(mut self, within: Duration) -> Exit {
        let since = self.signalled.unwrap_or(self.spawned);
        let deadline = since + within;
        // Every line until the pipe closes with the process, or the window ends.
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => break,
            }
        }
        let status = self.reap(deadline);
        let elapsed = since.elapsed();
        self.kill();
        // Lines a surviving process of the child still writes, bounded.
        let last = Instant::now() + LAST_LINES;
        while let Ok(line) = self
            .lines
            .recv_timeout(last.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        let seen = std::mem::take(&mut self.seen);
        Exit {
            status,
            elapsed,
            stdout: joined(&seen, Some(Stream::Stdout)),
            stderr: joined(&seen, Some(Stream::Stderr)),
            output: joined(&seen, None),
        }
    }

    /// The exit status once the child has ended, waiting at most until `deadline`.
    fn reap(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.reaped = true;
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    // Polling a condition, bounded: its stderr closed, so the process is ending;
                    // its status follows within microseconds.
                    std::thread::sleep(Duration::from_millis(1));
                }
                _ => return None,
            }
        }
    }

    /// Kills the child by its PID (unless it was reaped: the PID may be someone else's now).
    fn kill(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
    }

    fn fail(&mut self, why: &str) -> ! {
        self.kill();
        let last = Instant::now() + LAST_LINES / 4;
        while let Ok(line) = self
            .lines
            .recv_timeout(last.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        panic!(
            "[{}] {why}\n--- its stdout and stderr ---\n{}",
            self.label,
            joined(&self.seen, None)
        );
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // A failing assertion must not leave the child behind.
        self.kill();
    }
}

impl fmt::Debug for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Process")
            .field("label", &self.label)
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

/// How a [`Process`] ended, as the test observed it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Exit {
    /// `None`: still running at the end of the window, then killed by the test.
    pub status: Option<ExitStatus>,
    /// From the last signal sent (or the spawn) to the observed exit (or the end of the window).
    pub elapsed: Duration,
    /// Everything the child wrote to stdout, one line per line, colours removed.
    pub stdout: String,
    /// Everything the child wrote to stderr, one line per line, colours removed.
    pub stderr: String,
    output: String,
}

impl Exit {
    /// The exit code; `None` if the child was killed by a signal or was still running.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Everything the child wrote to stdout and stderr, in the order the test read it (the
    /// order between the two streams is only as exact as the pipes make it).
    pub fn output(&self) -> &str {
        &self.output
    }

    /// The last [`ShutdownReport`](crate::ShutdownReport) the child wrote with its `Display`
    /// to stderr (`eprintln!("{report}")`) or, if stderr has none, to stdout (`println!`):
    /// the line starting with `finale: shutdown after` and the indented lines that follow it
    /// on the same stream, so lines the other stream wrote meanwhile do not cut it short.
    /// Empty if there is none.
    pub fn report(&self) -> String {
        let report = last_report(&self.stderr);
        if report.is_empty() {
            last_report(&self.stdout)
        } else {
            report
        }
    }
}

/// The last report in one stream's lines.
fn last_report(stream: &str) -> String {
    let mut report = Vec::new();
    let mut inside = false;
    for line in stream.lines() {
        if line.starts_with("finale: shutdown after") {
            report.clear();
            inside = true;
            report.push(line);
        } else if inside && line.starts_with("  ") {
            report.push(line);
        } else {
            inside = false;
        }
    }
    report.join("\n")
}

/// "exit code 0 after 12ms", "killed by signal 9 after 3s", "still running after 30s".
impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(status) = self.status else {
            return write!(
                f,
                "still running after {:?}, killed by the test",
                self.elapsed
            );
        };
        if let Some(code) = status.code() {
            return write!(f, "exit code {code} after {:?}", self.elapsed);
        }
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            if let Some(signal) = status.signal() {
                return write!(f, "killed by signal {signal} after {:?}", self.elapsed);
            }
        }
        write!(f, "{status} after {:?}", self.elapsed)
    }
}

/// The variables of `inherited` that finale reads and the command does not set itself.
fn withheld(inherited: impl Iterator<Item = OsString>, set: &[OsString]) -> Vec<OsString> {
    inherited
        .filter(|key| {
            let name = key.to_string_lossy();
            let read_by_finale = INHERITED.contains(&&*name)
                || INHERITED_PREFIXES.iter().any(|p| name.starts_with(p));
            read_by_finale && !set.contains(key)
        })
        .collect()
}

/// The program's name and the variables the command sets, for messages.
fn describe(command: &Command) -> String {
    let program = std::path::Path::new(command.get_program())
        .file_name()
        .unwrap_or_else(|| command.get_program())
        .to_string_lossy()
        .into_owned();
    let mut out = program;
    for arg in command.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    let env: Vec<String> = command
        .get_envs()
        .filter_map(|(k, v)| v.map(|v| format!("{}={}", show(k), show(v))))
        .collect();
    if !env.is_empty() {
        out.push_str(" (");
        out.push_str(&env.join(" "));
        out.push(')');
    }
    out
}

fn show(s: &OsStr) -> std::borrow::Cow<'_, str> {
    s.to_string_lossy()
}

/// Removes ANSI escape sequences, should the child colour its output anyway.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[test]
    fn a_real_signal_by_pid_and_the_exit_code() {
        // The child's own sleeps only keep it alive; the test waits on its lines and its exit.
        let mut child = Process::spawn(sh("trap 'echo bye >&2; exit 3' TERM; echo ready >&2; \
             while :; do sleep 1 >/dev/null 2>&1 & wait $!; done"))
        .unwrap();
        assert_eq!(child.wait_for("ready", Duration::from_secs(10)), "ready");
        child.signal(Signal::Terminate);
        let exit = child.wait_exit(Duration::from_secs(10));
        assert_eq!(exit.code(), Some(3), "{exit}: {}", exit.stderr);
        assert_eq!(exit.stderr, "ready\nbye");
        assert!(exit.elapsed < Duration::from_secs(5), "{exit}");
    }

    #[test]
    fn a_child_still_running_at_the_end_of_the_window_is_killed() {
        let child = Process::spawn(sh("echo up >&2; exec sleep 30")).unwrap();
        let exit = child.wait_exit(Duration::from_millis(200));
        assert!(exit.status.is_none(), "{exit}");
        assert!(exit.to_string().starts_with("still running"), "{exit}");
        assert_eq!(exit.stderr, "up");
    }

    #[test]
    fn the_test_environment_does_not_leak_into_the_child() {
        let inherited = [
            "PATH",
            "FINALE_TOTAL_BUDGET",
            "FINALE_DRAIN_DELAY",
            "KUBERNETES_SERVICE_HOST",
        ]
        .map(OsString::from);
        let set = [OsString::from("FINALE_DRAIN_DELAY")];
        assert_eq!(
            withheld(inherited.into_iter(), &set),
            ["FINALE_TOTAL_BUDGET", "KUBERNETES_SERVICE_HOST"].map(OsString::from)
        );
        // And what the command sets does reach the child.
        let mut command = sh("echo \"[$FINALE_DRAIN_DELAY]\" >&2");
        command.env("FINALE_DRAIN_DELAY", "1s");
        let exit = Process::spawn(command)
            .unwrap()
            .wait_exit(Duration::from_secs(10));
        assert_eq!(exit.code(), Some(0));
        assert_eq!(exit.stderr, "[1s]");
    }

    #[test]
    fn the_last_report_and_plain_lines() {
        let exit = Process::spawn(sh("printf '\\033[32mINFO\\033[0m starting\\n' >&2; \
             echo 'finale: shutdown after signal SIGTERM: clean, exit code 0, 1.0ms' >&2; \
             echo '  announce   completed' >&2; echo 'after' >&2"))
        .unwrap()
        .wait_exit(Duration::from_secs(10));
        assert!(
            exit.stderr.starts_with("INFO starting\n"),
            "{}",
            exit.stderr
        );
        assert_eq!(
            exit.report(),
            "finale: shutdown after signal SIGTERM: clean, exit code 0, 1.0ms\n  announce   completed"
        );
    }

    #[test]
    fn a_line_on_stdout_is_found_too() {
        // tracing-subscriber's `fmt()` writes to stdout by default.
        let mut child =
            Process::spawn(sh("echo 'INFO started: ready'; echo warm >&2; echo done")).unwrap();
        assert_eq!(
            child.wait_for("started: ready", Duration::from_secs(10)),
            "INFO started: ready"
        );
        let exit = child.wait_exit(Duration::from_secs(10));
        assert_eq!(exit.code(), Some(0), "{exit}");
        assert_eq!(exit.stdout, "INFO started: ready\ndone");
        assert_eq!(exit.stderr, "warm");
        assert!(exit.output().contains("warm"), "{}", exit.output());
    }

    #[test]
    fn a_line_that_is_not_utf8_is_read_lossily_and_the_lines_after_it_too() {
        // Printed with `printf '%b'` octal escapes: 0xff is never valid UTF-8.
        let mut child = Process::spawn(sh("printf 'bad \\377 byte\\n'; echo after; \
             printf 'err \\377\\n' >&2; echo 'later' >&2; echo ready >&2; \
             echo last; echo 'last err' >&2"))
        .unwrap();
        child.wait_for("ready", Duration::from_secs(10));
        let exit = child.wait_exit(Duration::from_secs(10));
        assert_eq!(exit.code(), Some(0), "{exit}: {}", exit.output());
        assert_eq!(exit.stdout, "bad \u{fffd} byte\nafter\nlast");
        assert_eq!(exit.stderr, "err \u{fffd}\nlater\nready\nlast err");
    }

    #[test]
    fn the_report_is_read_from_its_stream_whatever_the_other_wrote_between() {
        let header = "finale: shutdown after signal SIGTERM: clean, exit code 0, 1.0ms";
        let exit = Exit {
            status: None,
            elapsed: Duration::ZERO,
            stdout: "INFO a log line".to_owned(),
            stderr: format!("{header}\n  announce   completed\n  drain      completed"),
            // The two pipes read in this order.
            output: format!(
                "{header}\nINFO a log line\n  announce   completed\n  drain      completed"
            ),
        };
        assert_eq!(
            exit.report(),
            format!("{header}\n  announce   completed\n  drain      completed")
        );
        // A report printed to stdout is found there.
        let exit = Exit {
            stdout: exit.stderr.clone(),
            stderr: "WARN something".to_owned(),
            ..exit
        };
        assert!(
            exit.report().ends_with("drain      completed"),
            "{}",
            exit.report()
        );
    }

    #[test]
    #[should_panic(expected = "without a line with \"ready\"")]
    fn a_line_that_never_comes_fails_with_what_the_child_wrote() {
        let mut child = Process::spawn(sh("echo 'address in use' >&2; exit 3")).unwrap();
        child.wait_for("ready", Duration::from_secs(10));
    }
}

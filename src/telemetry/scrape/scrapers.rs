//! What the endpoint learns of its scrapers: who scrapes, how often, at which phase, and which
//! scrapes were answered in full. The server writes it, the final-scrape stage waits on it.
//!
//! # Who is one scraper
//!
//! A scraper is first a keep-alive connection (Prometheus keeps one per target), so two
//! Prometheus servers on one host with the same version stay apart. A new connection from the
//! address and `User-Agent` of a scraper whose connection has closed continues that scraper
//! (Prometheus reconnected), so its interval and phase are not lost, but only if the scrape
//! lands where that scraper's phase puts it:
//!
//! - not sooner after its last scrape than its `X-Prometheus-Scrape-Timeout-Seconds` (a
//!   scraper's timeout is at most its interval), and
//! - once its interval is known, within [`slack`] of one of its predicted times.
//!
//! Of several such scrapers, the one whose predicted time is nearest (or, before any interval
//! is known, the one seen least recently) is continued. Otherwise the scrape starts a new
//! scraper. So two Prometheus servers behind one address (a proxy or NAT that opens a new
//! connection per scrape) stay apart when their offsets differ by more than the slack, or by
//! more than their timeout's worth of time before their intervals are learned. What cannot be
//! told apart: two scrapers that send the same `User-Agent` from one address, on new
//! connections, at the same instants to within a few milliseconds, and without the timeout
//! header; they are one scraper to the model.
//!
//! Each scraper has an identity of its own (not its slot in the model), so that a scrape by a
//! scraper that took a forgotten one's slot never counts for the forgotten one.
//!
//! # The prediction
//!
//! Prometheus scrapes a target at a fixed offset within its interval, so the next scrape starts
//! at `last + k × interval`, the interval being the median of the gaps between the last scrapes
//! seen (or the declared one before two scrapes were seen). It ends one scrape duration (the
//! last one seen) later.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::state::lock;

/// Gaps kept per scraper to learn its interval.
const GAPS: usize = 5;
/// Scrapers remembered; past this, a closed one seen least recently makes room. Open
/// connections are never forgotten (each is a file descriptor the process holds anyway).
const SCRAPERS: usize = 64;
/// Answered scrapes kept for the stage to read.
const ANSWERED: usize = 64;

/// How far a scrape may start from its predicted time and still be the one predicted: a tenth
/// of the interval, at most [`SLACK`]. A scrape due this much before the Telemetry phase began
/// that has not come is still waited for; one predicted to end within this much of the stage's
/// deadline is not (it would likely miss it).
pub(crate) fn slack(interval: Duration) -> Duration {
    (interval / 10).min(SLACK)
}

/// The most [`slack`] allows.
const SLACK: Duration = Duration::from_millis(100);

/// A request the server read: one scrape.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub(crate) conn: u64,
    pub(crate) peer: SocketAddr,
    pub(crate) user_agent: Option<String>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) at: Instant,
}

/// A scrape answered in full.
#[derive(Clone, Debug)]
pub(crate) struct Answered {
    pub(crate) scraper: u64,
    pub(crate) peer: SocketAddr,
    pub(crate) user_agent: Option<String>,
    pub(crate) started: Instant,
    pub(crate) ended: Instant,
    pub(crate) samples: u64,
}

#[derive(Debug)]
pub(crate) struct Scraper {
    /// Its identity, never reused.
    pub(crate) id: u64,
    ip: IpAddr,
    pub(crate) peer: SocketAddr,
    pub(crate) user_agent: Option<String>,
    conn: Option<u64>,
    starts: VecDeque<Instant>,
    last_duration: Duration,
    timeout: Option<Duration>,
}

impl Scraper {
    /// `peer (user agent)`, for the report.
    pub(crate) fn label(&self) -> String {
        format!(
            "{} ({})",
            self.peer,
            self.user_agent.as_deref().unwrap_or("no user agent")
        )
    }

    /// The median gap between its last scrapes, if it was seen twice.
    pub(crate) fn interval(&self) -> Option<Duration> {
        let mut gaps: Vec<Duration> = self
            .starts
            .iter()
            .zip(self.starts.iter().skip(1))
            .map(|(a, b)| b.saturating_duration_since(*a))
            .filter(|g| !g.is_zero())
            .collect();
        if gaps.is_empty() {
            return None;
        }
        gaps.sort_unstable();
        Some(gaps[gaps.len() / 2])
    }

    pub(crate) fn last_start(&self) -> Option<Instant> {
        self.starts.back().copied()
    }

    /// How far a new connection's scrape at `at` lands from this closed scraper's phase, if it
    /// may be this scraper at all (see the module docs); `Duration::ZERO` before its interval
    /// is known.
    fn phase_error(&self, at: Instant) -> Option<Duration> {
        let last = self.last_start()?;
        let gap = at.saturating_duration_since(last);
        if gap.is_zero() || self.timeout.is_some_and(|t| gap < t) {
            return None;
        }
        let Some(interval) = self.interval() else {
            return Some(Duration::ZERO);
        };
        let n = gap.as_nanos() % interval.as_nanos();
        let off = Duration::from_nanos(u64::try_from(n).ok()?);
        let error = off.min(interval - off);
        (error <= slack(interval)).then_some(error)
    }

    /// Whether it scraped recently at `now`: within two intervals and its timeout.
    pub(crate) fn is_recent(&self, now: Instant, interval: Duration) -> bool {
        self.last_start().is_some_and(|last| {
            now.saturating_duration_since(last)
                <= interval * 2 + self.timeout.unwrap_or(Duration::ZERO)
        })
    }

    /// When its next scrape should have been answered, if it starts at `after` or later: the
    /// first one due after `after`, or one due up to [`slack`] before `after` that has not come
    /// yet (a scrape a little late is still to come, not past).
    pub(crate) fn next_end(&self, after: Instant, interval: Duration) -> Option<Instant> {
        let last = self.last_start()?;
        if interval.is_zero() {
            return None;
        }
        let since = after.saturating_duration_since(last);
        let mut k = since.as_nanos() / interval.as_nanos() + 1;
        // Due `k - 1` intervals after the last one seen, it would have started by `after`; it
        // has not, so it is late: if only a little, it is the one to wait for.
        if k > 1 {
            let overdue = since.saturating_sub(interval.checked_mul(u32::try_from(k - 1).ok()?)?);
            if overdue <= slack(interval) {
                k -= 1;
            }
        }
        let k = u32::try_from(k).ok()?;
        Some(last + interval.checked_mul(k)? + self.last_duration)
    }
}

/// Why a wait ended without what it waited for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    Deadline,
    Stopped,
}

#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub(crate) scrapers: Vec<Scraper>,
    pub(crate) answered: VecDeque<Answered>,
    next_id: u64,
}

/// The model, shared by the server's connections and the stage.
#[derive(Debug, Default)]
pub(crate) struct Scrapers {
    seen: Mutex<Seen>,
    changed: Condvar,
}

impl Scrapers {
    /// A scrape arrived; returns its scraper's identity.
    pub(crate) fn started(&self, req: &Request) -> u64 {
        let mut seen = lock(&self.seen);
        let index = seen
            .scrapers
            .iter()
            .position(|s| s.conn == Some(req.conn))
            .or_else(|| {
                // A reconnect: the closed scraper of this address and agent whose phase puts
                // a scrape here, the nearest; before intervals are known, the least recent.
                seen.scrapers
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| {
                        s.conn.is_none() && s.ip == req.peer.ip() && s.user_agent == req.user_agent
                    })
                    .filter_map(|(i, s)| Some((s.phase_error(req.at)?, s.last_start(), i)))
                    .min()
                    .map(|(_, _, i)| i)
            });
        let index = match index {
            Some(i) => i,
            None => {
                seen.next_id += 1;
                let fresh = Scraper {
                    id: seen.next_id,
                    ip: req.peer.ip(),
                    peer: req.peer,
                    user_agent: req.user_agent.clone(),
                    conn: None,
                    starts: VecDeque::with_capacity(GAPS + 1),
                    last_duration: Duration::ZERO,
                    timeout: None,
                };
                // Bounded: past `SCRAPERS`, the closed scraper seen least recently makes room
                // (curl sessions, probes). Its slot is reused, not its identity: the new one's
                // scrapes never count for the old one.
                let reuse = (seen.scrapers.len() >= SCRAPERS)
                    .then(|| {
                        seen.scrapers
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.conn.is_none())
                            .min_by_key(|(_, s)| s.last_start())
                            .map(|(i, _)| i)
                    })
                    .flatten();
                match reuse {
                    Some(i) => {
                        seen.scrapers[i] = fresh;
                        i
                    }
                    None => {
                        seen.scrapers.push(fresh);
                        seen.scrapers.len() - 1
                    }
                }
            }
        };
        let s = &mut seen.scrapers[index];
        s.conn = Some(req.conn);
        s.peer = req.peer;
        s.timeout = req.timeout.or(s.timeout);
        if s.starts.len() > GAPS {
            s.starts.pop_front();
        }
        s.starts.push_back(req.at);
        s.id
    }

    /// The scrape `req` of scraper `id` was written in full at `ended`.
    pub(crate) fn answered(&self, id: u64, req: &Request, ended: Instant, samples: u64) {
        let mut seen = lock(&self.seen);
        if let Some(s) = seen.scrapers.iter_mut().find(|s| s.id == id) {
            s.last_duration = ended.saturating_duration_since(req.at);
        }
        if seen.answered.len() == ANSWERED {
            seen.answered.pop_front();
        }
        seen.answered.push_back(Answered {
            scraper: id,
            peer: req.peer,
            user_agent: req.user_agent.clone(),
            started: req.at,
            ended,
            samples,
        });
        drop(seen);
        self.changed.notify_all();
    }

    /// Connection `conn` closed.
    pub(crate) fn closed(&self, conn: u64) {
        let mut seen = lock(&self.seen);
        for s in seen.scrapers.iter_mut().filter(|s| s.conn == Some(conn)) {
            s.conn = None;
        }
    }

    /// Reads the model.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&lock(&self.seen))
    }

    /// Wakes the waiters, so that they look at their `stop` again. Under the lock, so that a
    /// waiter that checked `stop` before it changed is already waiting when this notifies.
    pub(crate) fn wake(&self) {
        drop(lock(&self.seen));
        self.changed.notify_all();
    }

    /// Blocks until `done` holds, `stop` says so (checked on each [`wake`](Self::wake)) or
    /// `deadline` passes; returns what `done` returned, or why it ended without.
    pub(crate) fn wait_until<T>(
        &self,
        deadline: Instant,
        stop: &dyn Fn() -> bool,
        mut done: impl FnMut(&Seen) -> Option<T>,
    ) -> Result<T, Ended> {
        let mut seen = lock(&self.seen);
        loop {
            if let Some(value) = done(&seen) {
                return Ok(value);
            }
            if stop() {
                return Err(Ended::Stopped);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Ended::Deadline);
            }
            seen = self
                .changed
                .wait_timeout(seen, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(conn: u64, port: u16, ua: &str, at: Instant) -> Request {
        Request {
            conn,
            peer: SocketAddr::from(([127, 0, 0, 1], port)),
            user_agent: Some(ua.to_owned()),
            timeout: Some(Duration::from_millis(500)),
            at,
        }
    }

    #[test]
    fn learns_interval_and_phase_and_predicts_the_next_scrape() {
        let model = Scrapers::default();
        let t = Instant::now();
        let s = Duration::from_secs(1);
        for k in 0..4 {
            let r = req(1, 5000, "Prometheus/2.42.0", t + s * k);
            let i = model.started(&r);
            model.answered(i, &r, r.at + Duration::from_millis(3), 10);
        }
        model.read(|seen| {
            assert_eq!(seen.scrapers.len(), 1);
            let sc = &seen.scrapers[0];
            assert_eq!(sc.interval(), Some(s));
            // The trigger 300 ms after the last scrape: the next starts 700 ms later.
            let next = sc.next_end(t + s * 3 + Duration::from_millis(300), s);
            assert_eq!(next, Some(t + s * 4 + Duration::from_millis(3)));
            // Long after: the phase holds.
            let next = sc.next_end(t + s * 10 + Duration::from_millis(999), s);
            assert_eq!(next, Some(t + s * 11 + Duration::from_millis(3)));
        });
    }

    #[test]
    fn a_scrape_a_little_late_at_the_phase_start_is_still_to_come() {
        let model = Scrapers::default();
        let t = Instant::now();
        let s = Duration::from_secs(1);
        for k in 0..4 {
            let r = req(1, 5000, "Prometheus/2.42.0", t + s * k);
            let i = model.started(&r);
            model.answered(i, &r, r.at + Duration::from_millis(3), 10);
        }
        model.read(|seen| {
            let sc = &seen.scrapers[0];
            // Due at 4 s, not come by 4.02 s: that one, not the one at 5 s.
            let next = sc.next_end(t + Duration::from_millis(4020), s);
            assert_eq!(next, Some(t + s * 4 + Duration::from_millis(3)));
            // Not come by 4.2 s (past the 100 ms slack): the one at 5 s.
            let next = sc.next_end(t + Duration::from_millis(4200), s);
            assert_eq!(next, Some(t + s * 5 + Duration::from_millis(3)));
        });
    }

    #[test]
    fn two_scrapers_on_one_host_stay_apart_and_a_reconnect_continues_one() {
        let model = Scrapers::default();
        let t = Instant::now();
        let a = model.started(&req(1, 5000, "Prometheus/2.42.0", t));
        let b = model.started(&req(2, 5001, "Prometheus/2.42.0", t));
        assert_ne!(a, b);
        model.closed(1);
        let again = model.started(&req(
            3,
            5002,
            "Prometheus/2.42.0",
            t + Duration::from_secs(1),
        ));
        assert_eq!(again, a);
        model.read(|seen| assert_eq!(seen.scrapers.len(), 2));
    }

    #[test]
    fn two_scrapers_behind_one_address_stay_apart_by_their_phase() {
        let model = Scrapers::default();
        let t = Instant::now();
        let s = Duration::from_secs(3);
        let mut conn = 0;
        let mut ids = [Vec::new(), Vec::new()];
        // A at 0, B 5 ms later, every 3 s, a new connection each (a proxy), one agent.
        for k in 0..4 {
            for (who, off) in [(0, 0), (1, 5)] {
                conn += 1;
                let r = req(conn, 7000, "Prometheus/2.42.0", t + s * k + ms(off));
                let id = model.started(&r);
                model.answered(id, &r, r.at + ms(1), 1);
                model.closed(conn);
                ids[who].push(id);
            }
        }
        assert!(ids[0].iter().all(|&i| i == ids[0][0]), "{ids:?}");
        assert!(ids[1].iter().all(|&i| i == ids[1][0]), "{ids:?}");
        assert_ne!(ids[0][0], ids[1][0]);
        model.read(|seen| {
            assert!(seen.scrapers.iter().all(|sc| sc.interval() == Some(s)));
        });
        // A scrape off both phases is someone else.
        let r = req(99, 7000, "Prometheus/2.42.0", t + s * 4 + ms(1500));
        let id = model.started(&r);
        assert!(!ids.iter().flatten().any(|&i| i == id));
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn one_off_clients_do_not_grow_the_model_without_bound() {
        let model = Scrapers::default();
        let t = Instant::now();
        for conn in 0..1000u64 {
            model.started(&req(conn, 6000, &format!("curl/{conn}"), t));
            model.closed(conn);
        }
        model.read(|seen| assert_eq!(seen.scrapers.len(), SCRAPERS));
    }
}

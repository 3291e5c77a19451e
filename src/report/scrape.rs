//! The final scrape's line in the report: when the last scrape came and who made it, or why the
//! stage did not wait for one (feature `prometheus`; the types exist without it, the list is
//! then empty).

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// What the final-scrape stage of one metrics endpoint did (feature `prometheus`): see
/// [`ShutdownReport::final_scrapes`](crate::ShutdownReport::final_scrapes).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct FinalScrape {
    /// The stage's name, as its Telemetry hook (`final-scrape` unless renamed).
    pub stage: Cow<'static, str>,
    /// How long the stage waited.
    pub waited: Duration,
    /// Whether the final scrape came, or why the stage did not wait for one.
    pub outcome: ScrapeOutcome,
    /// The scrapes that started after the Telemetry phase began and whose answer was written in
    /// full while the stage waited, first first.
    pub scrapes: Vec<ScrapeSeen>,
}

/// One scrape answered in full after the Telemetry phase began.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScrapeSeen {
    /// When the request arrived, after the shutdown's trigger.
    pub at: Duration,
    /// From the request to the last byte of the answer written.
    pub duration: Duration,
    /// The scraper's address.
    pub peer: SocketAddr,
    /// Its `User-Agent` (`Prometheus/2.42.0`), if it sent one.
    pub user_agent: Option<String>,
    /// The samples the answer carried (its lines that are neither comments nor empty).
    pub samples: u64,
}

/// How the final-scrape stage ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScrapeOutcome {
    /// A scrape that started after the Telemetry phase began was answered in full (by every
    /// scraper waited for, under [`ScrapePolicy::Every`](crate::prometheus::ScrapePolicy::Every)).
    Scraped,
    /// No scrape was ever seen: nobody scrapes this endpoint, so the stage did not wait.
    NoScraperSeen,
    /// Scrapes were seen, but too few to learn an interval (and none was declared), so the
    /// stage did not wait.
    IntervalUnknown,
    /// The next scrape was predicted to end after the stage's deadline, so the stage did not
    /// wait. Both instants are after the trigger.
    TooLate {
        /// When the next scrape was predicted to end.
        predicted: Duration,
        /// The stage's deadline.
        deadline: Duration,
    },
    /// The stage waited until its deadline and the scrapes it waited for were not answered
    /// in full (none came, or one stalled mid-body): the scrapers named here.
    Missed {
        /// The scrapers still waited for, as `peer (user agent)`.
        waiting_for: Vec<String>,
    },
    /// A second signal came before the final scrape did: the stage stopped waiting at once (or
    /// did not start to), leaving the escalation's short budget to the later stages.
    Escalated,
}

impl ScrapeOutcome {
    /// The snake-case name, as in the JSON report.
    pub fn as_str(&self) -> &'static str {
        match self {
            ScrapeOutcome::Scraped => "scraped",
            ScrapeOutcome::NoScraperSeen => "no_scraper_seen",
            ScrapeOutcome::IntervalUnknown => "interval_unknown",
            ScrapeOutcome::TooLate { .. } => "too_late",
            ScrapeOutcome::Missed { .. } => "missed",
            ScrapeOutcome::Escalated => "escalated",
        }
    }
}

impl fmt::Display for ScrapeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScrapeOutcome::Scraped => f.write_str("scraped"),
            ScrapeOutcome::NoScraperSeen => f.write_str("did not wait: no scrape was ever seen"),
            ScrapeOutcome::IntervalUnknown => f.write_str(
                "did not wait: too few scrapes to learn the interval, and none was declared",
            ),
            ScrapeOutcome::TooLate {
                predicted,
                deadline,
            } => write!(
                f,
                "did not wait: the next scrape would end {:.3}s after the trigger, after the \
                 stage's deadline at {:.3}s",
                predicted.as_secs_f64(),
                deadline.as_secs_f64()
            ),
            ScrapeOutcome::Missed { waiting_for } => write!(
                f,
                "missed: not answered in full by the deadline: {}",
                if waiting_for.is_empty() {
                    "no scrape came".to_owned()
                } else {
                    waiting_for.join(", ")
                }
            ),
            ScrapeOutcome::Escalated => {
                f.write_str("stopped waiting: a second signal came before the final scrape")
            }
        }
    }
}

impl fmt::Display for ScrapeSeen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "at {:.3}s by {} ({}), {} samples in {:.1}ms",
            self.at.as_secs_f64(),
            self.peer,
            self.user_agent.as_deref().unwrap_or("no user agent"),
            self.samples,
            self.duration.as_secs_f64() * 1000.0
        )
    }
}

impl fmt::Display for FinalScrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}, waited {:.1}ms",
            self.stage,
            self.outcome,
            self.waited.as_secs_f64() * 1000.0
        )?;
        if let Some(first) = self.scrapes.first() {
            write!(f, "; first {first}")?;
        }
        if self.scrapes.len() > 1 {
            write!(f, " (+{} more)", self.scrapes.len() - 1)?;
        }
        Ok(())
    }
}

/// Two lines for the report's tests: a scrape that came, and a stage that did not wait.
#[cfg(test)]
pub(crate) fn samples() -> Vec<FinalScrape> {
    vec![
        FinalScrape {
            stage: Cow::Borrowed("final-scrape"),
            waited: Duration::from_millis(412),
            outcome: ScrapeOutcome::Scraped,
            scrapes: vec![ScrapeSeen {
                at: Duration::from_millis(905),
                duration: Duration::from_millis(2),
                peer: SocketAddr::from(([10, 0, 0, 7], 51234)),
                user_agent: Some("Prometheus/2.42.0".to_owned()),
                samples: 143,
            }],
        },
        FinalScrape {
            stage: Cow::Borrowed("second"),
            waited: Duration::ZERO,
            outcome: ScrapeOutcome::TooLate {
                predicted: Duration::from_secs(14),
                deadline: Duration::from_millis(2400),
            },
            scrapes: Vec::new(),
        },
    ]
}

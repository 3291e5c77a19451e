//! The final-scrape stage: in the Telemetry phase, wait until a scrape that started after the
//! phase began has been answered in full, if the next scrape is predicted to come in time.
//!
//! The wait itself blocks a plain thread (a `Condvar` on the scrapers' model), so the same code
//! runs in the Telemetry hook (on a thread of its own, waited for on the user's runtime) and in
//! the supervisor's takeover of a wedged runtime; a `Handoff` makes it run once.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::report::{FinalScrape, ScrapeOutcome, ScrapeSeen};
use crate::state::lock;

use super::ScrapePolicy;
use super::scrapers::{Ended, Scrapers, Seen, slack};

/// How the stage waits.
#[derive(Clone, Debug)]
pub(crate) struct Wait {
    pub(crate) stage: Cow<'static, str>,
    pub(crate) policy: ScrapePolicy,
    pub(crate) expected_interval: Option<Duration>,
}

/// The stage's result, read by the report.
pub(crate) type Outcome = Arc<Mutex<Option<FinalScrape>>>;

/// Waits, from `start` (the Telemetry phase's beginning) until `deadline` at the latest, for
/// the final scrape. `trigger` is the shutdown's trigger, for the report's times.
pub(crate) fn final_scrape(
    scrapers: &Scrapers,
    wait: &Wait,
    trigger: Instant,
    start: Instant,
    deadline: Instant,
    stop: &dyn Fn() -> bool,
) -> FinalScrape {
    let after_trigger = |t: Instant| t.saturating_duration_since(trigger);
    let expected = if stop() {
        Err(ScrapeOutcome::Escalated)
    } else {
        scrapers.read(|seen| expect(seen, wait, start, deadline))
    };
    let outcome = match expected {
        Err(ScrapeOutcome::TooLate { predicted, .. }) => ScrapeOutcome::TooLate {
            // `expect` counts from `start`; the report counts from the trigger.
            predicted: after_trigger(start + predicted),
            deadline: after_trigger(deadline),
        },
        Err(why) => why,
        Ok(waiting_for) => {
            let result = scrapers.wait_until(deadline, stop, |seen| {
                let pending = pending(seen, wait.policy, &waiting_for, start);
                pending.is_empty().then_some(())
            });
            match result {
                Ok(()) => ScrapeOutcome::Scraped,
                Err(Ended::Stopped) => ScrapeOutcome::Escalated,
                Err(Ended::Deadline) => ScrapeOutcome::Missed {
                    waiting_for: scrapers.read(|seen| {
                        pending(seen, wait.policy, &waiting_for, start)
                            .into_iter()
                            .map(|(_, label)| label)
                            .collect()
                    }),
                },
            }
        }
    };
    let scrapes = scrapers.read(|seen| {
        seen.answered
            .iter()
            .filter(|a| a.started >= start)
            .map(|a| ScrapeSeen {
                at: after_trigger(a.started),
                duration: a.ended.saturating_duration_since(a.started),
                peer: a.peer,
                user_agent: a.user_agent.clone(),
                samples: a.samples,
            })
            .collect()
    });
    FinalScrape {
        stage: wait.stage.clone(),
        waited: start.elapsed(),
        outcome,
        scrapes,
    }
}

/// A scraper waited for: its identity and its label for the report.
type Awaited = (u64, String);

/// The scrapers to wait for, or why not to wait. A `TooLate` here counts from `start`.
fn expect(
    seen: &Seen,
    wait: &Wait,
    start: Instant,
    deadline: Instant,
) -> Result<Vec<Awaited>, ScrapeOutcome> {
    let mut unknown = false;
    let mut earliest: Option<Instant> = None;
    let mut fitting = Vec::new();
    for s in &seen.scrapers {
        let Some(interval) = s.interval().or(wait.expected_interval) else {
            unknown = true;
            continue;
        };
        if !s.is_recent(start, interval) {
            continue;
        }
        let Some(end) = s.next_end(start, interval) else {
            continue;
        };
        earliest = Some(earliest.map_or(end, |e| e.min(end)));
        // With room for it to be a little late: one that would end at the deadline exactly
        // is likely to miss it.
        if end + slack(interval) <= deadline {
            fitting.push((s.id, s.label()));
        }
    }
    if !fitting.is_empty() {
        return Ok(fitting);
    }
    if let Some(end) = earliest {
        return Err(ScrapeOutcome::TooLate {
            predicted: end.saturating_duration_since(start),
            deadline: deadline.saturating_duration_since(start),
        });
    }
    Err(if unknown {
        ScrapeOutcome::IntervalUnknown
    } else {
        ScrapeOutcome::NoScraperSeen
    })
}

/// Of the scrapers waited for, those without a scrape that started at `start` or later and was
/// answered in full; under [`ScrapePolicy::Any`] one such scrape, by anyone, is enough.
fn pending(
    seen: &Seen,
    policy: ScrapePolicy,
    waiting_for: &[Awaited],
    start: Instant,
) -> Vec<Awaited> {
    let mut answered = seen.answered.iter().filter(|a| a.started >= start);
    match policy {
        ScrapePolicy::Any => {
            if answered.next().is_some() {
                Vec::new()
            } else {
                waiting_for.to_vec()
            }
        }
        ScrapePolicy::Every => {
            let done: Vec<u64> = answered.map(|a| a.scraper).collect();
            waiting_for
                .iter()
                .filter(|(id, _)| !done.contains(id))
                .cloned()
                .collect()
        }
    }
}

/// What the supervisor's takeover says of the stage: delivered only if the final scrape came.
/// Not waiting (nobody scrapes, the next scrape too late) is no failure of the hook, but no
/// delivery either.
pub(crate) fn delivered(outcome: &Outcome) -> Result<(), String> {
    match &*lock(outcome) {
        Some(r) if r.outcome == ScrapeOutcome::Scraped => Ok(()),
        Some(r) => Err(r.to_string()),
        None => Err("the stage did not run".to_owned()),
    }
}

/// Stores `result` for the report; returns the hook's verdict: only a missed scrape fails.
pub(crate) fn conclude(outcome: &Outcome, result: FinalScrape) -> Result<(), String> {
    let verdict = match &result.outcome {
        ScrapeOutcome::Missed { .. } => Err(result.to_string()),
        _ => Ok(()),
    };
    if verdict.is_ok() {
        tracing::info!(target: "finale", "final scrape: {result}");
    } else {
        tracing::warn!(target: "finale", "final scrape: {result}");
    }
    *lock(outcome) = Some(result);
    verdict
}

/// What the planner says at start about the scrape: the grace period must hold the drain, one
/// scrape interval, the scrape's timeout and the safety margin; the stage's share of the
/// Telemetry reserve must hold one interval and the timeout. Each misfit is one message.
pub(crate) fn plan(
    budget: &crate::Budget,
    usable_at_telemetry: Duration,
    interval: Duration,
    timeout: Duration,
) -> Vec<String> {
    let mut misfits = Vec::new();
    if let Some(grace) = budget.grace_period {
        let needed = budget.drain_delay.max()
            + budget.drain_timeout
            + interval
            + timeout
            + budget.safety_margin;
        if needed > grace {
            misfits.push(format!(
                "the grace period {grace:?} cannot hold the drain delay {:?} + drain {:?} + one \
                 scrape interval {interval:?} + the scrape timeout {timeout:?} + the safety \
                 margin {:?} = {needed:?}: the final scrape may not come before the platform \
                 kills the process",
                budget.drain_delay.max(),
                budget.drain_timeout,
                budget.safety_margin
            ));
        }
    }
    if usable_at_telemetry < interval + timeout {
        misfits.push(format!(
            "the final-scrape stage may wait at most {usable_at_telemetry:?} of the telemetry \
             reserve {:?}, less than one scrape interval {interval:?} + the scrape timeout \
             {timeout:?}: it waits only when the next scrape is predicted to land in time; \
             raise the telemetry reserve",
            budget.telemetry_reserve
        ));
    }
    misfits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::scrape::scrapers::Request;
    use std::net::SocketAddr;

    fn wait(policy: ScrapePolicy) -> Wait {
        Wait {
            stage: Cow::Borrowed("final-scrape"),
            policy,
            expected_interval: None,
        }
    }

    fn never() -> bool {
        false
    }

    fn scrape(model: &Scrapers, conn: u64, at: Instant) {
        let r = Request {
            conn,
            peer: SocketAddr::from(([127, 0, 0, 1], 4000 + conn as u16)),
            user_agent: Some("Prometheus/2.42.0".to_owned()),
            timeout: None,
            at,
        };
        let i = model.started(&r);
        model.answered(i, &r, at, 3);
    }

    #[test]
    fn no_wait_without_a_scraper_or_when_the_next_scrape_is_too_late() {
        let model = Scrapers::default();
        let now = Instant::now();
        let r = final_scrape(&model, &wait(ScrapePolicy::Any), now, now, now, &never);
        assert_eq!(r.outcome, ScrapeOutcome::NoScraperSeen);

        // Scraped every 10 s, last 1 s ago: the next comes in 9 s, the deadline is in 2 s.
        let base = now - Duration::from_secs(21);
        for k in 0..3 {
            scrape(&model, 1, base + Duration::from_secs(10 * k));
        }
        let start = Instant::now();
        let r = final_scrape(
            &model,
            &wait(ScrapePolicy::Any),
            start,
            start,
            start + Duration::from_secs(2),
            &never,
        );
        assert!(
            matches!(r.outcome, ScrapeOutcome::TooLate { predicted, deadline }
                if predicted > Duration::from_secs(8) && deadline == Duration::from_secs(2)),
            "{r}"
        );
        assert!(r.waited < Duration::from_secs(1));
    }

    #[test]
    fn a_scrape_predicted_at_the_deadline_exactly_is_not_waited_for() {
        let model = Scrapers::default();
        let now = Instant::now();
        let s = Duration::from_secs(1);
        // Scraped every second, last 500 ms ago: the next ends 500 ms from now.
        let base = now - Duration::from_millis(2500);
        for k in 0..3 {
            scrape(&model, 1, base + s * k);
        }
        let at = |d: u64| now + Duration::from_millis(d);
        let r = final_scrape(&model, &wait(ScrapePolicy::Any), now, now, at(500), &never);
        assert!(matches!(r.outcome, ScrapeOutcome::TooLate { .. }), "{r}");
        // With the slack (100 ms at a 1 s interval) it waits; a stop ends the wait at once.
        let r = final_scrape(&model, &wait(ScrapePolicy::Any), now, now, at(600), &|| {
            true
        });
        assert_eq!(r.outcome, ScrapeOutcome::Escalated, "{r}");
    }

    #[test]
    fn a_scraper_seen_once_has_no_interval_unless_one_is_declared() {
        let model = Scrapers::default();
        let now = Instant::now();
        scrape(&model, 1, now - Duration::from_millis(500));
        let r = final_scrape(&model, &wait(ScrapePolicy::Any), now, now, now, &never);
        assert_eq!(r.outcome, ScrapeOutcome::IntervalUnknown);
        let mut declared = wait(ScrapePolicy::Any);
        declared.expected_interval = Some(Duration::from_secs(60));
        let r = final_scrape(
            &model,
            &declared,
            now,
            now,
            now + Duration::from_secs(1),
            &never,
        );
        assert!(matches!(r.outcome, ScrapeOutcome::TooLate { .. }), "{r}");
    }

    #[test]
    fn the_planner_warns_when_the_grace_period_or_the_share_is_short() {
        let mut budget = crate::config::BudgetSettings::default()
            .resolve(&[], crate::config::Environment::Local)
            .unwrap();
        budget.grace_period = Some(Duration::from_secs(30));
        let fits = plan(
            &budget,
            Duration::from_secs(20),
            Duration::from_secs(15),
            Duration::from_secs(1),
        );
        assert!(fits.iter().all(|m| !m.contains("grace period")), "{fits:?}");
        let misfits = plan(
            &budget,
            Duration::from_secs(2),
            Duration::from_secs(60),
            Duration::from_secs(10),
        );
        assert_eq!(misfits.len(), 2, "{misfits:?}");
        assert!(misfits[0].contains("grace period 30s"));
        assert!(misfits[1].contains("raise the telemetry reserve"));
    }
}

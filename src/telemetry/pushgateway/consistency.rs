//! What the Pushgateway would refuse: the rendered metrics compared with what it holds for the
//! other groups (its `GET /api/v1/metrics`).
//!
//! The Pushgateway checks each push against everything it holds and refuses the whole push
//! (`400`) if the result cannot be exposed consistently. As found with Pushgateway 1.5, two
//! things make it refuse a push that is fine on its own:
//!
//! - a metric that another group holds with another type (`… is not a COUNTER`); an untyped
//!   metric counts as a type of its own;
//! - a series with the same name and labels, grouping labels included, as one another group
//!   holds (`… was collected before with the same name and label values`): a group
//!   `{job="a"}` pushing `m{instance="x"}` while the group `{job="a",instance="x"}` holds `m`;
//! - a name that a histogram or summary of the other side derives (`… collides with
//!   previously collected histogram named …`): a histogram `x` owns `x_bucket`, `x_count` and
//!   `x_sum`, a summary `x` owns `x_count` and `x_sum`, and no metric of another name may be
//!   called so, whichever side holds the histogram.
//!
//! Different help texts are not refused (the Pushgateway exposes one of them), so they are not
//! reported here. A label with an empty value is the same as no label, on both sides.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

/// A series' labels, without those whose value is empty.
type Labels = BTreeMap<String, String>;

/// One metric of the push that the Pushgateway would refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Clash {
    /// The metric family's name.
    pub(super) metric: String,
    /// The other group's grouping labels, as `{job="…",…}`.
    pub(super) group: String,
    pub(super) kind: ClashKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ClashKind {
    /// The other group holds the metric with another type (lower case, as in the text format).
    Type { here: String, there: String },
    /// The other group holds a series with the same labels (as `{…}`).
    Series { labels: String },
    /// One of the two is a histogram or summary, and the other's name is one that it derives
    /// (`_bucket`, `_count`, `_sum`).
    Derived {
        /// Our metric's type.
        here: String,
        /// The other group's metric, and its type.
        there: String,
        there_kind: String,
    },
}

impl fmt::Display for Clash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Clash {
            metric,
            group,
            kind,
        } = self;
        match kind {
            ClashKind::Type { here, there } => write!(
                f,
                "the Pushgateway holds {metric} as a {there} for the group {group}, and this \
                 push has it as a {here}: it refuses every push of this group (400) until one \
                 of the two changes"
            ),
            ClashKind::Derived {
                here,
                there,
                there_kind,
            } => write!(
                f,
                "the Pushgateway holds the {there_kind} {there} for the group {group}, and this \
                 push has a {here} {metric}: the names of a histogram's or summary's \
                 _bucket, _count and _sum series are its own, so it refuses every push of \
                 this group (400) until one of the two is renamed"
            ),
            ClashKind::Series { labels } => write!(
                f,
                "the Pushgateway holds the series {metric}{labels} for the group {group} \
                 already: it refuses a push of the same series from this group (400); a \
                 grouping label or a metric label must tell the two apart"
            ),
        }
    }
}

/// A metric family of the rendered text: its type and its series' labels (grouping labels
/// added, `le` and `quantile` left out, as the Pushgateway's API lists them).
struct Family {
    kind: String,
    series: HashSet<Labels>,
}

/// Compares the rendered `text` that would be pushed to the group `ours` (job first) with the
/// Pushgateway's answer to `GET /api/v1/metrics`.
///
/// # Errors
///
/// The answer is not the API's JSON; says what is wrong with it.
pub(super) fn clashes(
    text: &str,
    ours: &[(String, String)],
    api: &[u8],
) -> Result<Vec<Clash>, String> {
    let families = families(text, ours);
    let answer: serde_json::Value =
        serde_json::from_slice(api).map_err(|e| format!("not JSON: {e}"))?;
    let groups = answer
        .get("data")
        .and_then(|d| d.as_array())
        .ok_or("no `data` list of groups")?;
    let own: Labels = non_empty(ours.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut found = Vec::new();
    for group in groups {
        let Some(entries) = group.as_object() else {
            continue;
        };
        let labels = labels_of(entries.get("labels"));
        // Our own group is replaced (PUT) or updated (POST) by the push: no clash with itself.
        if labels == own {
            continue;
        }
        for (name, held) in entries {
            let Some(there) = held.get("type").and_then(|t| t.as_str()) else {
                continue;
            };
            let there = there.to_ascii_lowercase();
            // Ours is named like a series of their histogram or summary.
            for derived in derived_names(name, &there) {
                if let Some(family) = families.get(&derived) {
                    found.push(Clash {
                        metric: derived,
                        group: shown(&labels),
                        kind: ClashKind::Derived {
                            here: family.kind.clone(),
                            there: name.clone(),
                            there_kind: there.clone(),
                        },
                    });
                }
            }
            let Some(family) = families.get(name) else {
                continue;
            };
            if there != family.kind {
                found.push(Clash {
                    metric: name.clone(),
                    group: shown(&labels),
                    kind: ClashKind::Type {
                        here: family.kind.clone(),
                        there,
                    },
                });
                continue;
            }
            let series = held.get("metrics").and_then(|m| m.as_array());
            for metric in series.into_iter().flatten() {
                let series = labels_of(metric.get("labels"));
                if family.series.contains(&series) {
                    found.push(Clash {
                        metric: name.clone(),
                        group: shown(&labels),
                        kind: ClashKind::Series {
                            labels: shown(&series),
                        },
                    });
                }
            }
        }
        // Theirs is named like a series of our histogram or summary.
        for (name, family) in &families {
            for derived in derived_names(name, &family.kind) {
                let held = entries.get(&derived).and_then(|held| held.get("type"));
                if let Some(there) = held.and_then(|t| t.as_str()) {
                    found.push(Clash {
                        metric: name.clone(),
                        group: shown(&labels),
                        kind: ClashKind::Derived {
                            here: family.kind.clone(),
                            there: derived,
                            there_kind: there.to_ascii_lowercase(),
                        },
                    });
                }
            }
        }
    }
    Ok(found)
}

/// The names a metric family `name` of type `kind` owns besides its own: a histogram's
/// `_bucket`, `_count` and `_sum`, a summary's `_count` and `_sum`.
fn derived_names(name: &str, kind: &str) -> Vec<String> {
    let suffixes: &[&str] = match kind {
        "histogram" => &["_bucket", "_count", "_sum"],
        "summary" => &["_count", "_sum"],
        _ => &[],
    };
    suffixes.iter().map(|s| format!("{name}{s}")).collect()
}

fn labels_of(value: Option<&serde_json::Value>) -> Labels {
    let Some(object) = value.and_then(|v| v.as_object()) else {
        return Labels::new();
    };
    non_empty(
        object
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?))),
    )
}

fn non_empty<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Labels {
    pairs
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// `{a="1",b="2"}`.
fn shown(labels: &Labels) -> String {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={:?}", v)).collect();
    format!("{{{}}}", pairs.join(","))
}

/// The metric families of a text exposition, each series with the group's labels applied the
/// Pushgateway's way (a grouping label replaces a metric label of the same name).
fn families(text: &str, ours: &[(String, String)]) -> HashMap<String, Family> {
    let mut families: HashMap<String, Family> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            if let (Some("TYPE"), Some(name), Some(kind)) =
                (words.next(), words.next(), words.next())
            {
                families.entry(name.to_owned()).or_insert_with(|| Family {
                    kind: kind.to_ascii_lowercase(),
                    series: HashSet::new(),
                });
                current = Some(name.to_owned());
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let Some((name, mut labels)) = sample(line) else {
            continue;
        };
        let family = current
            .as_deref()
            .filter(|f| belongs(name, f, families.get(*f).map(|f| f.kind.as_str())))
            .unwrap_or(name)
            .to_owned();
        let family = families.entry(family).or_insert_with(|| Family {
            kind: "untyped".to_owned(),
            series: HashSet::new(),
        });
        match family.kind.as_str() {
            "histogram" => {
                labels.remove("le");
            }
            "summary" => {
                labels.remove("quantile");
            }
            _ => {}
        }
        for (k, v) in ours {
            labels.insert(k.clone(), v.clone());
        }
        labels.retain(|_, v| !v.is_empty());
        family.series.insert(labels);
    }
    families
}

/// Whether the sample `name` is part of the family `family` of type `kind`.
fn belongs(name: &str, family: &str, kind: Option<&str>) -> bool {
    if name == family {
        return true;
    }
    let Some(suffix) = name.strip_prefix(family) else {
        return false;
    };
    match kind {
        Some("histogram") => matches!(suffix, "_bucket" | "_sum" | "_count"),
        Some("summary") => matches!(suffix, "_sum" | "_count"),
        _ => false,
    }
}

/// A sample line's name and labels: `name{a="1",b="x\"y"} 3`.
fn sample(line: &str) -> Option<(&str, Labels)> {
    let end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let (name, rest) = line.split_at(end);
    let mut labels = Labels::new();
    let Some(mut rest) = rest.strip_prefix('{') else {
        return Some((name, labels));
    };
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if rest.starts_with('}') || rest.is_empty() {
            return Some((name, labels));
        }
        let (key, after) = rest.split_once('=')?;
        let after = after.strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let close = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        rest = &after[close + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// The shape of Pushgateway 1.5's answer, trimmed.
    const HELD: &str = r#"{"status":"success","data":[
        {"labels":{"job":"other"},"last_push_successful":true,
         "m":{"time_stamp":"t","type":"GAUGE","metrics":[{"labels":{"instance":"","job":"other"},"value":"1"}]},
         "push_time_seconds":{"type":"GAUGE","help":"h","metrics":[{"labels":{"instance":"","job":"other"},"value":"1"}]}},
        {"labels":{"job":"svc","instance":"x"},
         "h":{"type":"HISTOGRAM","metrics":[{"buckets":{"+Inf":"2"},"count":"2","sum":"3","labels":{"instance":"x","job":"svc","path":"/a \"b\""}}]}},
        {"labels":{"job":"svc"},
         "m":{"type":"COUNTER","metrics":[{"labels":{"job":"svc","instance":""},"value":"1"}]}}
    ]}"#;

    #[test]
    fn a_type_held_by_another_group_is_found() {
        let text = "# HELP m Other help.\n# TYPE m counter\nm 3\n";
        let found = clashes(text, &group(&[("job", "svc")]), HELD.as_bytes()).unwrap();
        assert_eq!(
            found,
            [Clash {
                metric: "m".to_owned(),
                group: r#"{job="other"}"#.to_owned(),
                kind: ClashKind::Type {
                    here: "counter".to_owned(),
                    there: "gauge".to_owned()
                }
            }]
        );
        let shown = found[0].to_string();
        assert!(
            shown.contains("m as a gauge for the group {job=\"other\"}"),
            "{shown}"
        );
        // An untyped sample is a type of its own; the same type is no clash.
        let found = clashes("m 3\n", &group(&[("job", "j")]), HELD.as_bytes()).unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        let found = clashes(
            "# TYPE m gauge\nm 3\n",
            &group(&[("job", "j")]),
            HELD.as_bytes(),
        );
        assert_eq!(found.unwrap().len(), 1, "the counter of {{job=\"svc\"}}");
    }

    #[test]
    fn a_series_held_by_another_group_is_found() {
        // The group {job="svc"} pushes h{instance="x"}: the same series as the group
        // {job="svc",instance="x"} holds, buckets aside.
        let text = "# TYPE h histogram\n\
                    h_bucket{path=\"/a \\\"b\\\"\",instance=\"x\",le=\"1\"} 1\n\
                    h_bucket{path=\"/a \\\"b\\\"\",instance=\"x\",le=\"+Inf\"} 2\n\
                    h_sum{path=\"/a \\\"b\\\"\",instance=\"x\"} 3\n\
                    h_count{path=\"/a \\\"b\\\"\",instance=\"x\"} 2\n";
        let found = clashes(text, &group(&[("job", "svc")]), HELD.as_bytes()).unwrap();
        assert_eq!(
            found,
            [Clash {
                metric: "h".to_owned(),
                group: r#"{instance="x",job="svc"}"#.to_owned(),
                kind: ClashKind::Series {
                    labels: r#"{instance="x",job="svc",path="/a \"b\""}"#.to_owned()
                }
            }]
        );
        // A grouping label replaces the metric's own: {job="svc",instance="y"} is apart.
        let ours = group(&[("job", "svc"), ("instance", "y")]);
        assert_eq!(clashes(text, &ours, HELD.as_bytes()).unwrap(), []);
        // Our own group is not compared with itself.
        let ours = group(&[("job", "svc"), ("instance", "x")]);
        assert_eq!(clashes(text, &ours, HELD.as_bytes()).unwrap(), []);
    }

    #[test]
    fn a_name_a_histogram_or_summary_derives_is_found_both_ways() {
        // The group {job="svc",instance="x"} holds the histogram h.
        let ours = group(&[("job", "j")]);
        let found = clashes("# TYPE h_count gauge\nh_count 1\n", &ours, HELD.as_bytes());
        assert_eq!(
            found.unwrap(),
            [Clash {
                metric: "h_count".to_owned(),
                group: r#"{instance="x",job="svc"}"#.to_owned(),
                kind: ClashKind::Derived {
                    here: "gauge".to_owned(),
                    there: "h".to_owned(),
                    there_kind: "histogram".to_owned()
                }
            }]
        );
        // Ours a summary s whose s_sum another group holds as a gauge.
        let summary = "# TYPE s summary\ns_sum 1\ns_count 1\n";
        let held = r#"{"data":[{"labels":{"job":"o"},"s_sum":{"type":"GAUGE","metrics":[]}}]}"#;
        let found = clashes(summary, &ours, held.as_bytes()).unwrap();
        assert_eq!(
            found,
            [Clash {
                metric: "s".to_owned(),
                group: r#"{job="o"}"#.to_owned(),
                kind: ClashKind::Derived {
                    here: "summary".to_owned(),
                    there: "s_sum".to_owned(),
                    there_kind: "gauge".to_owned()
                }
            }]
        );
        assert!(
            found[0]
                .to_string()
                .starts_with("the Pushgateway holds the gauge s_sum for the group {job=\"o\"}, and this push has a summary s:"),
            "{}",
            found[0]
        );
        // A summary owns no _bucket; a histogram does.
        let text = "# TYPE m_bucket gauge\nm_bucket 1\n";
        let held = r#"{"data":[{"labels":{"job":"o"},"m":{"type":"SUMMARY","metrics":[]}}]}"#;
        assert_eq!(clashes(text, &ours, held.as_bytes()).unwrap(), []);
        let held = r#"{"data":[{"labels":{"job":"o"},"m":{"type":"HISTOGRAM","metrics":[]}}]}"#;
        assert_eq!(clashes(text, &ours, held.as_bytes()).unwrap().len(), 1);
    }

    #[test]
    fn an_answer_that_is_not_the_api_says_so() {
        assert!(clashes("", &[], b"ok").unwrap_err().starts_with("not JSON"));
        assert!(clashes("", &[], b"{}").is_err());
    }

    #[test]
    fn sample_lines_parse_with_escapes() {
        let (name, labels) = sample(r#"a_total{x="1",y="q\"\\\n"} 3"#).unwrap();
        assert_eq!(name, "a_total");
        assert_eq!(labels["x"], "1");
        assert_eq!(labels["y"], "q\"\\\n");
        assert_eq!(sample("b 1").unwrap(), ("b", Labels::new()));
    }
}

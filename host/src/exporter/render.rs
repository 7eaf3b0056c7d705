//! The Prometheus adapter over the front: one [`Front::observe`] per scrape (the numbers
//! `ctl status` and `ctl plugins` show, and the histograms), written as metric families —
//! the classic text format (`text/plain; version=0.0.4`) by default, OpenMetrics when the
//! scraper's `Accept` asks for it. Nothing here counts: it only names and writes.
//!
//! Names follow Prometheus conventions: the `plugind_` prefix, base units (`_seconds`,
//! `_bytes`), counters ending in `_total` (the encoders add it to the names below).

use std::{collections::BTreeSet, fmt};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

use crate::{
    front::{CircuitState, InstanceState, InstanceStatus, Observation},
    metrics::{Distribution, publishes},
    outcomes::OutcomeKind,
};

/// The label that names an instance. Not `instance`: Prometheus gives every scraped series
/// its target's `instance` label and would rename ours `exported_instance`.
pub const INSTANCE: &str = "plugin_instance";

/// The formats a scrape may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The classic text format 0.0.4 (what `promtool check metrics` reads).
    Text,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it names it, else text.
    pub fn accepting(accept: Option<&str>) -> Self {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Text,
        }
    }

    /// Its `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Text => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Writes `observation` in `format`.
pub fn render(observation: Observation, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Families(observation)));
    let mut out = String::with_capacity(16 * 1024);
    let written = match format {
        Format::Text => prometheus_client::encoding::prometheus_text::encode(&mut out, &registry),
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
    };
    // Writing to a String fails only if a value's formatting does, which none of ours does.
    written.expect("metrics are written to memory");
    out
}

/// One scrape's observation, as a collector.
#[derive(Debug)]
struct Families(Observation);

/// Writes one family: its descriptor, then each of its samples.
fn family(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl FnOnce(&mut MetricEncoder<'_>) -> fmt::Result,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    samples(&mut metric)
}

fn counter(m: &mut MetricEncoder<'_>, labels: &[(&str, &str)], value: u64) -> fmt::Result {
    m.encode_family(&labels)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

fn gauge(m: &mut MetricEncoder<'_>, labels: &[(&str, &str)], value: u64) -> fmt::Result {
    m.encode_family(&labels)?.encode_gauge(&value)
}

fn histogram(m: &mut MetricEncoder<'_>, labels: &[(&str, &str)], d: &Distribution) -> fmt::Result {
    let buckets: Vec<(f64, u64)> = d
        .buckets
        .iter()
        .map(|(le, n)| (d.scale.base(*le), *n))
        .collect();
    m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
        d.scale.base(d.sum),
        d.count,
        &buckets,
        None,
    )
}

/// Per instance: one sample of `value` labelled with its name.
fn each(
    instances: &[InstanceStatus],
    m: &mut MetricEncoder<'_>,
    write: fn(&mut MetricEncoder<'_>, &[(&str, &str)], &InstanceStatus) -> fmt::Result,
) -> fmt::Result {
    for i in instances {
        write(m, &[(INSTANCE, i.name.as_str())], i)?;
    }
    Ok(())
}

impl Collector for Families {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        let o = &self.0;
        let status = &o.status;
        let list = &status.instances;
        use MetricType::{Counter, Gauge, Histogram};

        family(
            &mut e,
            "plugind_build_info",
            "The daemon's version (always 1).",
            Gauge,
            |m| gauge(m, &[("version", status.version)], 1),
        )?;
        family(
            &mut e,
            "plugind_uptime_seconds",
            "Seconds since the daemon started.",
            Gauge,
            |m| m.encode_gauge(&status.uptime.as_secs_f64()),
        )?;

        // Per instance.
        family(
            &mut e,
            "plugind_instance_info",
            "The plugin and version an instance runs (always 1; empty version: none runs).",
            Gauge,
            |m| {
                for i in list {
                    gauge(
                        m,
                        &[
                            (INSTANCE, &i.name),
                            ("plugin", &i.plugin),
                            ("version", &i.version),
                        ],
                        1,
                    )?;
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "plugind_instance_state",
            "1 for the state an instance is in (running, paused, stopped, failed, quarantined, disabled, removed), 0 for the others.",
            Gauge,
            |m| {
                for i in list {
                    for state in InstanceState::ALL {
                        gauge(
                            m,
                            &[(INSTANCE, &i.name), ("state", state.name())],
                            u64::from(i.state == state),
                        )?;
                    }
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "plugind_instance_generation",
            "The plugin generation running (0: none).",
            Gauge,
            |m| each(list, m, |m, l, i| gauge(m, l, u64::from(i.generation))),
        )?;
        family(
            &mut e,
            "plugind_handed_out",
            "Delivery attempts handed to an instance's plugin.",
            Counter,
            |m| each(list, m, |m, l, i| counter(m, l, i.handed_out)),
        )?;
        family(
            &mut e,
            "plugind_outcomes",
            "Attempts by how they ended: ack, retry, reject, timeout, panic, crash (charged at start), error, dropped.",
            Counter,
            |m| {
                for i in list {
                    for kind in OutcomeKind::ALL {
                        counter(
                            m,
                            &[(INSTANCE, &i.name), ("kind", kind.name())],
                            i.outcomes.get(kind),
                        )?;
                    }
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "plugind_failures_charged",
            "Failures charged to deliveries (the circuit excuses some).",
            Counter,
            |m| each(list, m, |m, l, i| counter(m, l, i.failures)),
        )?;
        family(
            &mut e,
            "plugind_dead_lettered",
            "Deliveries dead-lettered.",
            Counter,
            |m| each(list, m, |m, l, i| counter(m, l, i.dead_lettered)),
        )?;
        family(
            &mut e,
            "plugind_in_flight",
            "Hand-offs leased to an instance's actor (in its mailbox or in a call).",
            Gauge,
            |m| each(list, m, |m, l, i| gauge(m, l, i.in_flight)),
        )?;
        family(
            &mut e,
            "plugind_deferred",
            "Deferred attempts outstanding: tokens taken and not yet settled or expired (part of in_flight).",
            Gauge,
            |m| each(list, m, |m, l, i| gauge(m, l, i.deferred)),
        )?;
        family(
            &mut e,
            "plugind_queue_depth",
            "Deliveries waiting for their turn (the backlog less what is in flight).",
            Gauge,
            |m| each(list, m, |m, l, i| gauge(m, l, i.queue_depth())),
        )?;
        family(
            &mut e,
            "plugind_backlog_messages",
            "Deliveries waiting or in flight.",
            Gauge,
            |m| each(list, m, |m, l, i| gauge(m, l, i.backlog)),
        )?;
        family(
            &mut e,
            "plugind_backlog_bytes",
            "Payload bytes of the deliveries waiting or in flight.",
            Gauge,
            |m| each(list, m, |m, l, i| gauge(m, l, i.backlog_bytes)),
        )?;
        family(
            &mut e,
            "plugind_backlog_limit_bytes",
            "The instance's max_backlog (publishes past it are refused).",
            Gauge,
            |m| each(list, m, |m, l, i| gauge(m, l, i.max_backlog)),
        )?;
        family(
            &mut e,
            "plugind_circuit_state",
            "1 for the state an instance's circuit is in (closed, open, half-open, paused), 0 for the others.",
            Gauge,
            |m| {
                for i in list {
                    for state in CircuitState::ALL {
                        gauge(
                            m,
                            &[(INSTANCE, &i.name), ("state", state.name())],
                            u64::from(i.circuit == state),
                        )?;
                    }
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "plugind_handle_duration_seconds",
            "How long an instance's handle calls took.",
            Histogram,
            |m| {
                for (name, h) in &o.histograms {
                    histogram(m, &[(INSTANCE, name)], &h.handle)?;
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "plugind_publish_to_settle_seconds",
            "From the publish to the end of the call that acked or rejected it.",
            Histogram,
            |m| {
                for (name, h) in &o.histograms {
                    histogram(m, &[(INSTANCE, name)], &h.settle)?;
                }
                Ok(())
            },
        )?;

        // Daemon-wide.
        let (accepted, refused) = publishes();
        family(
            &mut e,
            "plugind_publishes_accepted",
            "Messages the API accepted.",
            Counter,
            |m| counter(m, &[], accepted),
        )?;
        family(
            &mut e,
            "plugind_publishes_refused",
            "Messages the API refused, by gRPC status code.",
            Counter,
            |m| {
                for (code, n) in &refused {
                    counter(m, &[("code", code)], *n)?;
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "plugind_unrouted",
            "Publishes that matched no instance.",
            Counter,
            |m| counter(m, &[], status.unrouted),
        )?;
        let ledger = &status.ledger.commits;
        family(
            &mut e,
            "plugind_ledger_commits",
            "Ledger transactions committed.",
            Counter,
            |m| counter(m, &[], ledger.commits),
        )?;
        family(
            &mut e,
            "plugind_ledger_fsyncs",
            "Log fsyncs that made publishes durable.",
            Counter,
            |m| counter(m, &[], ledger.fsyncs),
        )?;
        family(
            &mut e,
            "plugind_ledger_commit_duration_seconds",
            "Commit latency (build and commit, written to the OS).",
            Histogram,
            |m| histogram(m, &[], &ledger.commit_latency),
        )?;
        family(
            &mut e,
            "plugind_ledger_fsync_duration_seconds",
            "Latency of the log fsyncs.",
            Histogram,
            |m| histogram(m, &[], &ledger.fsync_latency),
        )?;
        family(
            &mut e,
            "plugind_ledger_commit_records",
            "Records per commit (the group commit's batch size).",
            Histogram,
            |m| histogram(m, &[], &ledger.batch_records),
        )?;
        family(
            &mut e,
            "plugind_ledger_checkpoints",
            "Checkpoints: passive (the syncer's) and restart (the writer's, to restart a full log).",
            Counter,
            |m| {
                counter(m, &[("kind", "passive")], ledger.checkpoints)?;
                counter(m, &[("kind", "restart")], ledger.log_restarts)
            },
        )?;
        family(
            &mut e,
            "plugind_ledger_bytes",
            "Bytes the ledger takes on disk (database and log).",
            Gauge,
            |m| gauge(m, &[], ledger.bytes),
        )?;
        family(
            &mut e,
            "plugind_ledger_reserve_bytes",
            "Bytes kept free for settlements on a full disk (0: a full disk took them).",
            Gauge,
            |m| gauge(m, &[], ledger.reserve_bytes),
        )?;
        family(
            &mut e,
            "plugind_events",
            "Events (hot plug, configuration, dead letters, circuits) by kind.",
            Counter,
            |m| {
                for (kind, n) in &o.events {
                    counter(m, &[("kind", kind)], *n)?;
                }
                Ok(())
            },
        )?;
        let loaded: BTreeSet<&std::path::Path> =
            list.iter().filter_map(|i| i.library.as_deref()).collect();
        let loaded_bytes: u64 = loaded
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        family(
            &mut e,
            "plugind_libraries_loaded",
            "Plugin libraries a running generation uses.",
            Gauge,
            |m| gauge(m, &[], loaded.len() as u64),
        )?;
        family(
            &mut e,
            "plugind_libraries_loaded_bytes",
            "Their file sizes.",
            Gauge,
            |m| gauge(m, &[], loaded_bytes),
        )?;
        family(
            &mut e,
            "plugind_libraries_retained",
            "Libraries still mapped after their unload (a hung call, or code that cannot be unloaded).",
            Gauge,
            |m| gauge(m, &[], o.retained.len() as u64),
        )?;
        family(
            &mut e,
            "plugind_libraries_retained_bytes",
            "Their sizes.",
            Gauge,
            |m| gauge(m, &[], o.retained.iter().map(|r| r.size).sum()),
        )?;
        family(
            &mut e,
            "plugind_watch_subscribers",
            "Watch streams open now.",
            Gauge,
            |m| gauge(m, &[], o.watchers),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_the_scraper_asks_for_it() {
        assert_eq!(Format::accepting(None), Format::Text);
        assert_eq!(Format::accepting(Some("*/*")), Format::Text);
        assert_eq!(
            Format::accepting(Some("text/plain;version=0.0.4;q=0.3,*/*;q=0.2")),
            Format::Text
        );
        // What Prometheus 2.x sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,\
            application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::accepting(Some(prometheus)), Format::OpenMetrics);
        assert!(
            Format::Text
                .content_type()
                .starts_with("text/plain; version=0.0.4")
        );
    }
}

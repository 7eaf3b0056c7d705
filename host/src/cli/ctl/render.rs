//! What `plugind ctl` prints: readable text, or the JSON objects of `--json`.

use std::{fmt::Write as _, time::Duration};

use crate::{
    control::pb,
    front::{DeliveryStage, InstanceState},
};

/// `2026-11-26 03:04:05.123` (UTC) from Unix ms.
pub(super) fn time(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_owned()
}

pub(super) fn status_json(s: &pb::StatusResponse) -> serde_json::Value {
    let ledger = s.ledger.clone().unwrap_or_default();
    serde_json::json!({
        "version": s.version, "pid": s.pid, "uptime_ms": s.uptime_ms,
        "config": s.config_path, "config_sha256": s.config_sha256, "durability": s.durability,
        "unrouted": s.unrouted,
        "ledger": {"accepted": ledger.accepted, "acked": ledger.acked,
            "dead_lettered": ledger.dead_lettered, "commits": ledger.commits,
            "fsyncs": ledger.fsyncs, "commit_us": ledger.commit_us,
            "lost": ledger.lost.map(|l| serde_json::json!({
                "first_id": l.first_id, "last_id": l.last_id,
            }))},
        "instances": s.instances.iter().map(|i| serde_json::json!({
            "name": i.name, "state": i.state, "backlog": i.backlog, "in_flight": i.in_flight,
            "calling": i.calling,
        })).collect::<Vec<_>>(),
    })
}

pub(super) fn status_text(s: &pb::StatusResponse) -> String {
    let ledger = s.ledger.clone().unwrap_or_default();
    let mut out = format!(
        "plugind {}, pid {}, up {}, durability {}\nconfig {} (sha256 {})\n",
        s.version,
        s.pid,
        humantime::format_duration(Duration::from_secs(s.uptime_ms / 1000)),
        s.durability,
        s.config_path,
        &s.config_sha256.get(..12).unwrap_or_default(),
    );
    let _ = writeln!(
        out,
        "ledger: {} accepted, {} acked, {} dead-lettered; {} commits, {} fsyncs{}",
        ledger.accepted,
        ledger.acked,
        ledger.dead_lettered,
        ledger.commits,
        ledger.fsyncs,
        ledger
            .commit_us
            .get(1)
            .map(|p99| format!(", commit p99 {p99} µs"))
            .unwrap_or_default()
    );
    if let Some(lost) = ledger.lost {
        let _ = writeln!(
            out,
            "LOST at start: messages with ids {} to {} were answered OK and the ledger no longer \
             holds them (its write-ahead log was damaged or cut short; see the daemon's log)",
            lost.first_id, lost.last_id
        );
    }
    if s.unrouted > 0 {
        let _ = writeln!(
            out,
            "unrouted: {} publishes since start matched no instance (not stored)",
            s.unrouted
        );
    }
    let _ = writeln!(
        out,
        "{:<24} {:<12} {:>9} {:>7} {:>7}",
        "INSTANCE", "STATE", "BACKLOG", "HANDED", "CALLING"
    );
    for i in &s.instances {
        let _ = writeln!(
            out,
            "{:<24} {:<12} {:>9} {:>7} {:>7}",
            i.name, i.state, i.backlog, i.in_flight, i.calling
        );
    }
    out
}

pub(super) fn instances_json(r: &pb::InstancesResponse) -> serde_json::Value {
    serde_json::json!({
        "instances": r.instances.iter().map(|i| serde_json::json!({
            "name": i.name, "state": i.state, "plugin": i.plugin, "version": i.version,
            "generation": i.generation, "draining": i.draining, "library": i.library,
            "sha256": i.sha256, "queue_depth": i.queue_depth, "backlog": i.backlog,
            "backlog_bytes": i.backlog_bytes, "in_flight": i.in_flight, "calling": i.calling,
            "deferred": i.deferred, "acked": i.acked, "failures": i.failures, "dead_lettered": i.dead_lettered,
            "dead_letters": i.dead_letters, "circuit": i.circuit, "paused": i.paused,
            "hung": i.hung, "last_error": i.last_error, "topics": i.topics,
            "topics_known": i.topics_known,
            "subscription": (!i.subscription.is_empty()).then_some(&i.subscription),
            "handed_out": i.handed_out, "outcomes": i.outcomes, "max_backlog": i.max_backlog,
        })).collect::<Vec<_>>(),
        "retained": r.retained.iter().map(|l| serde_json::json!({
            "plugin": l.plugin, "version": l.version, "origin": l.origin, "size": l.size,
        })).collect::<Vec<_>>(),
    })
}

pub(super) fn instances_text(r: &pb::InstancesResponse) -> String {
    // HANDED: deliveries leased to its actor (queued in its mailbox or in a call); CALLING:
    // calls in progress; DEAD: its dead letters kept now (`ctl dead-letters --instance`).
    let mut out = format!(
        "{:<20} {:<11} {:<24} {:>4} {:>7} {:>7} {:>6} {:>7} {:>8} {:>6} {:<9}\n",
        "INSTANCE",
        "STATE",
        "PLUGIN",
        "GEN",
        "QUEUE",
        "BACKLOG",
        "HANDED",
        "CALLING",
        "DEFERRED",
        "DEAD",
        "CIRCUIT"
    );
    for i in &r.instances {
        let plugin = if i.version.is_empty() {
            i.plugin.clone()
        } else {
            format!("{} {}", i.plugin, i.version)
        };
        let generation = if i.draining.is_empty() {
            i.generation.to_string()
        } else {
            format!("{}+{}", i.generation, i.draining.len())
        };
        let _ = writeln!(
            out,
            "{:<20} {:<11} {:<24} {:>4} {:>7} {:>7} {:>6} {:>7} {:>8} {:>6} {:<9}{}",
            i.name,
            i.state,
            plugin,
            generation,
            i.queue_depth,
            i.backlog,
            i.in_flight,
            i.calling,
            i.deferred,
            i.dead_letters,
            i.circuit,
            if i.hung { " HUNG" } else { "" }
        );
        if !i.last_error.is_empty() {
            let _ = writeln!(out, "    last error: {}", i.last_error);
        }
        for note in notes(i) {
            let _ = writeln!(out, "    {note}");
        }
    }
    if !r.retained.is_empty() {
        let _ = writeln!(
            out,
            "retained libraries (still mapped after their generation retired): {}",
            r.retained.len()
        );
    }
    out
}

/// What an operator should know about an instance beyond its row.
fn notes(i: &pb::InstanceDetail) -> Vec<String> {
    let mut notes = Vec::new();
    if i.subscription.is_empty() {
        notes.push(format!(
            "its subscription ended (no table in plugins.toml): {} deliveries wait; `plugind \
             ctl forget {}` drops them",
            i.backlog, i.name
        ));
    } else if !i.topics_known {
        notes.push(
            "nothing is routed to it yet: it takes its topics from its plugin's library, which \
             has never been loaded"
                .to_owned(),
        );
    } else if i.state.parse() != Ok(InstanceState::Running) && i.backlog > 0 {
        notes.push(format!(
            "{} deliveries wait for it (routed to it while it does not run)",
            i.backlog
        ));
    }
    if i.paused {
        notes.push("paused by an operator: `plugind ctl resume` hands it work again".to_owned());
    }
    notes
}

pub(super) fn message_json(m: &pb::ShowMessageResponse) -> serde_json::Value {
    serde_json::json!({
        "id": m.id, "topic": m.topic, "published_ms": m.published_ms,
        "headers": m.headers.iter().map(|h| [&h.name, &h.value]).collect::<Vec<_>>(),
        "payload_size": m.payload_size,
        "payload_preview": String::from_utf8_lossy(&m.payload_preview),
        "deliveries": m.deliveries.iter().map(|d| serde_json::json!({
            "instance": d.instance, "state": d.state, "deliveries": d.deliveries,
            "failures": d.failures, "last_reason": d.last_reason,
            "attempts": d.attempts.iter().map(|a| serde_json::json!({
                "number": a.number, "started_ms": a.started_ms, "ended_ms": a.ended_ms,
                "result": a.result,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

pub(super) fn message_text(m: &pb::ShowMessageResponse) -> String {
    let mut out = format!(
        "message {} on {}, published {}\n",
        m.id,
        m.topic,
        time(m.published_ms)
    );
    for h in &m.headers {
        let _ = writeln!(out, "  {}: {}", h.name, h.value);
    }
    let more = if (m.payload_preview.len() as u64) < m.payload_size {
        "…"
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "payload ({} bytes): {:?}{more}",
        m.payload_size,
        String::from_utf8_lossy(&m.payload_preview)
    );
    if m.deliveries.is_empty() {
        let _ = writeln!(out, "no delivery waits or failed (acked, or never routed)");
    }
    for d in &m.deliveries {
        let plural = |n: u32, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let counts = if d.state.parse() == Ok(DeliveryStage::DeadLettered)
            && d.last_reason.starts_with("rejected")
        {
            // A reject is the plugin's verdict, not a failure: no failure count to show.
            format!(
                " after {}: {}",
                plural(d.deliveries, "delivery"),
                d.last_reason
            )
        } else {
            format!(
                ", {}, {}{}",
                plural(d.deliveries, "delivery"),
                plural(d.failures, "failure"),
                if d.last_reason.is_empty() {
                    String::new()
                } else {
                    format!(", last: {}", d.last_reason)
                }
            )
        };
        let _ = writeln!(out, "{}: {}{counts}", d.instance, d.state.replace('_', " "),);
        for a in &d.attempts {
            let _ = writeln!(
                out,
                "  attempt {} at {}: {}",
                a.number,
                time(a.started_ms),
                a.result
            );
        }
    }
    out
}

pub(super) fn reload_json(r: &pb::ReloadResponse) -> serde_json::Value {
    serde_json::json!({
        "config_sha256": r.config_sha256,
        "changes": r.changes.iter()
            .map(|c| (c.instance.clone(), serde_json::Value::from(c.change.clone())))
            .collect::<serde_json::Map<_, _>>(),
        "restart_required": r.restart_required,
        "failures": r.failures.iter().map(|f| serde_json::json!({
            "instance": f.instance, "error": f.error,
        })).collect::<Vec<_>>(),
    })
}

pub(super) fn reload_text(r: &pb::ReloadResponse) -> String {
    let changed: Vec<String> = r
        .changes
        .iter()
        .filter(|c| c.change != "unchanged")
        .map(|c| {
            let done = match c.change.as_str() {
                "start" => "started",
                "stop" => "stopped",
                "reinstantiate" => "instantiated anew",
                "update" => "updated",
                other => other,
            };
            format!("{} {done}", c.instance)
        })
        .collect();
    let mut out = format!(
        "applied (config sha256 {}): {}\n",
        r.config_sha256.get(..12).unwrap_or_default(),
        if changed.is_empty() {
            "nothing changed".to_owned()
        } else {
            changed.join(", ")
        }
    );
    for key in &r.restart_required {
        let _ = writeln!(
            out,
            "[host] {key} changed: it takes effect at the next start"
        );
    }
    for f in &r.failures {
        let _ = writeln!(out, "{}: not running: {}", f.instance, f.error);
    }
    out
}

pub(super) fn dead_letters_json(r: &pb::DeadLettersResponse) -> serde_json::Value {
    serde_json::json!({
        "dead_letters": r.dead_letters.iter().map(|d| serde_json::json!({
            "id": d.id, "instance": d.instance, "topic": d.topic, "at_ms": d.at_ms,
            "deliveries": d.deliveries, "failures": d.failures, "reason": d.reason,
        })).collect::<Vec<_>>(),
        "next": (!r.next_instance.is_empty() || r.next_id > 0)
            .then(|| format!("{}/{}", r.next_id, r.next_instance)),
    })
}

pub(super) fn dead_letters_text(r: &pb::DeadLettersResponse) -> String {
    if r.dead_letters.is_empty() {
        return "no dead letters\n".to_owned();
    }
    let mut out = format!(
        "{:>10} {:<20} {:<24} {:>8}  REASON\n",
        "ID", "INSTANCE", "TOPIC", "FAILURES"
    );
    for d in &r.dead_letters {
        let _ = writeln!(
            out,
            "{:>10} {:<20} {:<24} {:>8}  {}",
            d.id, d.instance, d.topic, d.failures, d.reason
        );
    }
    if !r.next_instance.is_empty() || r.next_id > 0 {
        let _ = writeln!(out, "more: --after {}/{}", r.next_id, r.next_instance);
    }
    out
}

//! The broker's metrics, in the Prometheus text format (the `prometheus-client` crate encodes
//! them), served at `metrics.path` (`/metrics`). Nothing here is on the hot path: the figures
//! are the atomics the broker bumps anyway ([`crate::stats`], the guard's and the
//! authenticator's counters), read once per scrape into a snapshot that is then encoded.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering;

use crate::state::Shared;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One series: name (without `wsmb_`), help, labels, value, and whether it is a counter.
#[derive(Debug, Clone)]
struct Series {
    name: &'static str,
    help: &'static str,
    labels: Vec<(&'static str, String)>,
    value: i64,
    counter: bool,
}

/// What one scrape read.
#[derive(Debug, Default)]
struct Snapshot(Vec<Series>);

impl Snapshot {
    fn counter(&mut self, name: &'static str, help: &'static str, value: u64) {
        self.labelled(name, help, Vec::new(), value, true);
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, value: u64) {
        self.labelled(name, help, Vec::new(), value, false);
    }

    fn labelled(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: Vec<(&'static str, String)>,
        value: u64,
        counter: bool,
    ) {
        self.signed(
            name,
            help,
            labels,
            i64::try_from(value).unwrap_or(i64::MAX),
            counter,
        );
    }

    fn signed(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: Vec<(&'static str, String)>,
        value: i64,
        counter: bool,
    ) {
        self.0.push(Series {
            name,
            help,
            labels,
            value,
            counter,
        });
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut i = 0;
        while i < self.0.len() {
            // The series of one family are next to each other.
            let first = &self.0[i];
            let kind = if first.counter {
                ConstCounter::new(0u64).metric_type()
            } else {
                ConstGauge::new(0i64).metric_type()
            };
            let mut family = encoder.encode_descriptor(first.name, first.help, None, kind)?;
            while i < self.0.len() && self.0[i].name == first.name {
                let s = &self.0[i];
                let labels: Vec<(&str, &str)> =
                    s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let series = family.encode_family(&labels)?;
                if s.counter {
                    ConstCounter::new(s.value.max(0) as u64).encode(series)?;
                } else {
                    ConstGauge::new(s.value).encode(series)?;
                }
                i += 1;
            }
        }
        Ok(())
    }
}

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// The metrics of the broker now, as Prometheus text.
pub fn render(shared: &Shared) -> String {
    let mut s = Snapshot::default();
    let st = &shared.stats;
    s.gauge(
        "connections_open",
        "Open connections (WebSocket and HTTP)",
        load(&st.connections_open),
    );
    s.counter(
        "connections",
        "Connections accepted since start",
        load(&st.connections_total),
    );
    let g = &shared.guard.stats;
    for (reason, v) in [
        ("sessions_full", load(&st.connections_refused)),
        ("banned", load(&g.refused_banned)),
        ("per_address", load(&g.refused_per_address)),
        ("pending_full", load(&g.refused_pending)),
    ] {
        s.labelled(
            "connections_refused",
            "Connections refused, by reason",
            vec![("reason", reason.into())],
            v,
            true,
        );
    }
    let a = &shared.auth.stats;
    for (outcome, v) in [("ok", load(&a.accepted)), ("failed", load(&a.rejected))] {
        s.labelled(
            "authentications",
            "Credential checks, by outcome",
            vec![("outcome", outcome.into())],
            v,
            true,
        );
    }
    s.counter(
        "auth_bans",
        "Addresses banned after failed logins",
        load(&g.bans),
    );
    s.counter(
        "http_requests_limited",
        "HTTP API requests answered 429 (server.http_requests_per_second)",
        load(&g.http_limited),
    );
    s.counter(
        "messages_paced",
        "Messages slowed down by server.messages_per_second_per_user",
        load(&g.messages_paced),
    );
    s.counter(
        "messages_in",
        "send-message frames accepted for routing",
        load(&st.messages_in),
    );
    s.counter(
        "messages_out",
        "Messages handed to receivers (one per receiver), live or from the store",
        load(&st.deliveries),
    );
    s.counter(
        "messages_unrouted",
        "Messages that reached no receiver and were not stored",
        load(&st.unrouted),
    );
    s.counter(
        "messages_expired",
        "Stored messages expired undelivered",
        load(&st.expired),
    );
    s.counter(
        "messages_redelivered",
        "Stored messages handed out again (disconnect, ack timeout)",
        load(&st.redelivered),
    );
    s.counter(
        "frames_rejected",
        "Frames answered with an error",
        load(&st.rejected_frames),
    );
    for (action, v) in [
        ("disconnected", load(&st.slow_consumers)),
        ("write_timeout", load(&st.write_timeouts)),
        ("dead_peer", load(&st.dead_peers)),
    ] {
        s.labelled(
            "slow_receivers",
            "Receivers dropped: full queue, write deadline, silence",
            vec![("action", action.into())],
            v,
            true,
        );
    }
    s.counter(
        "reload_failures",
        "Reloads of users or permissions that failed",
        load(&st.reload_failures),
    );
    let (receivers, channels) = shared.engine.totals();
    s.gauge(
        "receivers",
        "Receivers registered on channels",
        receivers as u64,
    );
    s.gauge("channels", "Channels with receivers", channels as u64);
    let store = shared.engine.store();
    s.gauge(
        "stored_messages",
        "Messages in the store waiting for a receiver or an acknowledgement",
        store.map_or(0, |st| st.stored() as u64),
    );
    s.gauge(
        "storage_up",
        "1 when the database answers (always 1 with the memory backend)",
        u64::from(store.is_none_or(|st| st.health().is_ok())),
    );
    if let Some(sms) = &shared.sms {
        for m in sms.metrics() {
            s.signed(m.name, m.help, m.labels, m.value, m.counter);
        }
    }
    let mut registry = Registry::with_prefix("wsmb");
    registry.register_collector(Box::new(s));
    let mut out = String::new();
    if prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

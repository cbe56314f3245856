//! The broker's metrics, in the Prometheus text format (the `prometheus-client` crate encodes
//! them), served at `metrics.path` (`/metrics`). Nothing here is on the hot path: the figures
//! are the atomics the broker bumps anyway ([`crate::stats`], the guard's and the
//! authenticator's counters), read once per scrape into a snapshot that is then encoded.

use std::sync::atomic::Ordering;

use wsmb_common::metrics::Snapshot;

use crate::state::Shared;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = wsmb_common::metrics::CONTENT_TYPE;

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
        load(&st.connections_open) as i64,
    );
    s.counter(
        "connections",
        "Connections accepted since start",
        load(&st.connections_total),
    );
    let g = &shared.guard.stats;
    s.counters_by(
        "connections_refused",
        "Connections refused, by reason",
        &Vec::new(),
        "reason",
        [
            ("sessions_full", load(&st.connections_refused)),
            ("banned", load(&g.refused_banned)),
            ("per_address", load(&g.refused_per_address)),
            ("pending_full", load(&g.refused_pending)),
        ],
    );
    let a = &shared.auth.stats;
    s.counters_by(
        "authentications",
        "Credential checks, by outcome",
        &Vec::new(),
        "outcome",
        [("ok", load(&a.accepted)), ("failed", load(&a.rejected))],
    );
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
    s.counters_by(
        "slow_receivers",
        "Receivers dropped: full queue, write deadline, silence",
        &Vec::new(),
        "action",
        [
            ("disconnected", load(&st.slow_consumers)),
            ("write_timeout", load(&st.write_timeouts)),
            ("dead_peer", load(&st.dead_peers)),
        ],
    );
    s.counter(
        "reload_failures",
        "Reloads of users or permissions that failed",
        load(&st.reload_failures),
    );
    let (receivers, channels) = shared.engine.totals();
    s.gauge(
        "receivers",
        "Receivers registered on channels",
        receivers as i64,
    );
    s.gauge("channels", "Channels with receivers", channels as i64);
    let chans = shared.engine.channels();
    let label = |name: &str| vec![("channel", name.to_owned())];
    type Pick = fn(&crate::stats::ChannelCounters) -> &std::sync::atomic::AtomicU64;
    let per_channel: [(&str, &str, Pick); 5] = [
        (
            "channel_messages_in",
            "Messages published on the channel",
            |c| &c.messages_in,
        ),
        (
            "channel_messages_out",
            "Copies handed to the channel's receivers",
            |c| &c.deliveries,
        ),
        (
            "channel_messages_unrouted",
            "Messages on the channel that reached no receiver and were not stored",
            |c| &c.unrouted,
        ),
        (
            "channel_messages_expired",
            "Stored messages of the channel that expired undelivered",
            |c| &c.expired,
        ),
        (
            "channel_messages_redelivered",
            "Stored messages of the channel handed out again",
            |c| &c.redelivered,
        ),
    ];
    for (name, help, pick) in per_channel {
        for c in &chans {
            s.counter_with(name, help, label(&c.name), load(pick(&c.counters)));
        }
    }
    for c in &chans {
        s.gauge_with(
            "channel_receivers",
            "Receivers registered on the channel",
            label(&c.name),
            c.receivers as i64,
        );
    }
    for c in chans.iter().filter(|_| shared.engine.store().is_some()) {
        s.gauge_with(
            "channel_stored_messages",
            "Messages stored for the channel (its queue: waiting for a receiver or an acknowledgement)",
            label(&c.name),
            c.stored as i64,
        );
    }
    let store = shared.engine.store();
    s.gauge(
        "stored_messages",
        "Messages in the store waiting for a receiver or an acknowledgement",
        store.map_or(0, |st| st.stored() as i64),
    );
    s.gauge(
        "storage_up",
        "1 when the database answers (always 1 with the memory backend)",
        i64::from(store.is_none_or(|st| st.health().is_ok())),
    );
    if let Some(sms) = &shared.sms {
        sms.metrics(&mut s);
    }
    s.render("wsmb")
}

//! The status page (`status.path`, `/status` by default): what an operator whose OTPs stop
//! arriving looks at first. One HTML page with its stylesheet and script (`status/` beside
//! this file, compiled in: no build step, no external assets, works offline), and the JSON
//! figures the script reads every few seconds (`<path>/data`): the broker, its channels with
//! receivers and queues, the gateway agents with their modems, the last SMS and the recent
//! failures, and messages per minute over the last hour (sampled here into
//! [`crate::stats::History`]). Served to any broker user (HTTP Basic, like the metrics); the
//! SMS listings only to users who may read message states (`[permissions]`: receive on the
//! status channel). Message texts are never shown, and numbers only in part.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::auth::permissions::Action;
use crate::http;
use crate::sms::model::{Message, State, iso};
use crate::state::Shared;
use crate::stats::{Figures, HISTORY_SERIES};

const PAGE: &str = include_str!("status/index.html");
const SCRIPT: &str = include_str!("status/app.js");
const STYLE: &str = include_str!("status/app.css");

/// Messages in the "last messages" list.
const LAST_MESSAGES: usize = 20;
/// Failures in the "recent failures" list.
const LAST_FAILURES: usize = 10;

/// What the page is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asset {
    /// The HTML page.
    Page,
    /// Its script.
    Script,
    /// Its stylesheet.
    Style,
    /// The figures (JSON).
    Data,
}

/// The asset `path` asks for, when it is under the configured `base` (`status.path`).
pub fn asset(base: &str, path: &str) -> Option<Asset> {
    if base.is_empty() {
        return None;
    }
    let rest = path.strip_prefix(base)?;
    match rest {
        "" | "/" => Some(Asset::Page),
        "/app.js" => Some(Asset::Script),
        "/app.css" => Some(Asset::Style),
        "/data" => Some(Asset::Data),
        _ => None,
    }
}

/// Headers of every answer: nothing cached, nothing but this origin's own script, style and
/// figures, never framed.
const HEADERS: &str = "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
    X-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\nContent-Security-Policy: \
    default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
    img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\n";

/// The answer to `method` on `asset` for the authenticated `user`.
pub async fn answer(shared: &Shared, asset: Asset, method: &str, user: &str) -> Vec<u8> {
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return http::text_response(
            405,
            "Method Not Allowed",
            "Allow: GET, HEAD\r\n",
            "use GET",
            false,
        );
    }
    let (kind, body) = match asset {
        Asset::Page => (
            "text/html; charset=utf-8",
            PAGE.replace("{{BASE}}", &shared.config.status.path),
        ),
        Asset::Script => ("text/javascript; charset=utf-8", SCRIPT.to_owned()),
        Asset::Style => ("text/css; charset=utf-8", STYLE.to_owned()),
        Asset::Data => ("application/json", data(shared, user).await.to_string()),
    };
    http::response(200, "OK", kind, HEADERS, &body, head_only)
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The figures the chart follows, now (see [`HISTORY_SERIES`]).
fn figures(shared: &Shared) -> Figures {
    let (sent, failed) = shared.sms.as_ref().map_or((0, 0), |s| s.sent_and_failed());
    [
        shared.stats.messages_in.load(Ordering::Relaxed),
        shared.stats.deliveries.load(Ordering::Relaxed),
        sent,
        failed,
    ]
}

/// Samples the figures at start and at the start of every minute until shutdown.
pub fn spawn_sampler(shared: &Arc<Shared>) {
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        loop {
            let now = now_secs();
            shared.history.record(now.div_euclid(60), figures(&shared));
            // Just past the next minute's start.
            let wait = Duration::from_millis((60 - now.rem_euclid(60)) as u64 * 1000 + 50);
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    });
}

/// `+628123456789` as `+628•••••6789`: enough to recognise, not enough to collect (at least
/// three characters and 40 % hidden).
fn masked(phone: &str) -> String {
    let chars: Vec<char> = phone.chars().collect();
    let n = chars.len();
    let keep = n.saturating_sub((n * 4 / 10).max(3));
    let tail = (keep / 2).min(4);
    let head = keep - tail;
    let mut out: String = chars[..head].iter().collect();
    out.push_str(&"•".repeat(n - keep));
    out.extend(&chars[n - tail..]);
    out
}

/// A message on the page: no text, numbers masked.
fn row(m: &Message) -> Value {
    let updated = m.states.values().copied().max().unwrap_or(m.created_ms);
    json!({
        "id": m.id,
        "user": m.owner,
        "state": m.state().as_str(),
        "createdAt": iso(m.created_ms),
        "updatedAt": iso(updated),
        "gateway": m.device,
        "recipients": m.recipients.iter().map(|r| json!({
            "phone": masked(&r.phone),
            "state": r.state.as_str(),
            "error": r.error,
            "modem": r.modem,
            "heldBack": r.held,
        })).collect::<Vec<_>>(),
    })
}

/// The figures the page shows.
pub async fn data(shared: &Shared, user: &str) -> Value {
    let now = now_secs();
    let broker = shared.health();
    let channels: Vec<Value> = shared
        .engine
        .channels()
        .iter()
        .map(|c| {
            let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            json!({
                "name": c.name,
                "receivers": c.receivers,
                "stored": c.stored,
                "in": n(&c.counters.messages_in),
                "out": n(&c.counters.deliveries),
                "unrouted": n(&c.counters.unrouted),
                "expired": n(&c.counters.expired),
                "redelivered": n(&c.counters.redelivered),
            })
        })
        .collect();
    let per = shared
        .history
        .per_minute(now.div_euclid(60), figures(shared));
    let series: serde_json::Map<String, Value> = HISTORY_SERIES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let v: Vec<u64> = per.buckets.iter().map(|b| b[i]).collect();
            ((*name).to_owned(), json!(v))
        })
        .collect();
    let sms = match &shared.sms {
        None => Value::Null,
        Some(sms) => {
            let c = sms.config();
            let may_read = shared.auth.allows(user, Action::Receive, &c.status_channel);
            let (messages, failures, error) = if may_read {
                match (
                    sms.recent(None, LAST_MESSAGES).await,
                    sms.recent(Some(State::Failed), LAST_FAILURES).await,
                ) {
                    (Ok(m), Ok(f)) => (
                        json!(m.iter().map(row).collect::<Vec<_>>()),
                        json!(f.iter().map(row).collect::<Vec<_>>()),
                        Value::Null,
                    ),
                    (Err(e), _) | (_, Err(e)) => (Value::Null, Value::Null, json!(e.message)),
                }
            } else {
                (
                    Value::Null,
                    Value::Null,
                    json!(format!(
                        "user {user:?} may not read message states (receive on {:?}, \
                         [permissions])",
                        c.status_channel
                    )),
                )
            };
            json!({
                "health": sms.health().await,
                "gateways": sms.devices(),
                "messages": messages,
                "failures": failures,
                "listError": error,
            })
        }
    };
    json!({
        "now": iso(now * 1000),
        "user": user,
        "broker": broker,
        "channels": channels,
        "chart": {
            "firstMinute": iso(per.first_minute * 60_000),
            "stepSeconds": 60,
            "series": series,
        },
        "sms": sms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_masks() {
        assert_eq!(asset("/status", "/status"), Some(Asset::Page));
        assert_eq!(asset("/status", "/status/"), Some(Asset::Page));
        assert_eq!(asset("/status", "/status/data"), Some(Asset::Data));
        assert_eq!(asset("/status", "/status/app.js"), Some(Asset::Script));
        assert_eq!(asset("/status", "/statusx"), None);
        assert_eq!(asset("/status", "/status/../metrics"), None);
        assert_eq!(asset("", "/status"), None);
        assert_eq!(masked("+628123456789"), "+628•••••6789");
        assert_eq!(masked("08123456789"), "0812••••789");
        assert_eq!(masked("12345"), "1•••5");
        assert_eq!(masked("12"), "••");
        assert_eq!(masked(""), "");
        assert_eq!(masked("+62€12345678"), "+62€••••5678");
    }
}

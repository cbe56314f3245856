//! Webhooks: the signed calls, the rules for URLs, and the durable outbox with its deliverer.
//!
//! - **Signature.** `X-Timestamp` is the Unix time in seconds; `X-Signature` is the hex
//!   HMAC-SHA256, keyed with the UTF-8 bytes of the signing key, over the raw body bytes
//!   followed by the timestamp string (SMSGate's scheme, so its receivers' checks work).
//! - **Durable.** A call is a document of the service's table, written in the same
//!   transaction as the state change that causes it. It is deleted only after a 2xx answer;
//!   other answers, timeouts and connection errors schedule it again after a delay that doubles
//!   from `webhook_retry_initial` up to `webhook_retry_max`; after `webhook_give_up_after` it is
//!   kept as failed (shown in `GET /webhooks`) and logged. A restart finds what is left.
//! - **Never in the way.** Calls run in their own tasks (at most [`IN_FLIGHT`] at once), each
//!   with the `webhook_timeout` deadline; message flow only writes the document.
//! - **URLs.** `https://` only, except loopback and `webhook_http_hosts`; redirects are not
//!   followed (a 3xx is a failure, with its `Location` in the error).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wsmb_common::problem::{Over, Problem, Say, human};

use super::model::Webhook;
use super::now_ms;
use super::store::{Doc, DocStore, Kind, Query, Write};
use crate::config::SmsConfig;
use crate::storage::DbError;

/// Most webhook calls in flight at once.
pub const IN_FLIGHT: usize = 8;

/// One queued call (the outbox document's body).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Call {
    hook: String,
    url: String,
    event: String,
    body: String,
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    last_error: Option<String>,
}

/// Pending and given-up calls of one webhook.
#[derive(Debug, Clone, Default)]
pub struct HookStats {
    /// Calls waiting for a 2xx.
    pub pending: usize,
    /// Calls given up.
    pub failed: usize,
    /// The last error of any of them.
    pub last_error: Option<String>,
}

/// The `X-Signature` of `body` sent at `timestamp`.
pub fn sign(key: &str, body: &[u8], timestamp: &str) -> String {
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()) else {
        return String::new();
    };
    mac.update(body);
    mac.update(timestamp.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The webhook outbox and its deliverer.
pub struct Deliverer {
    /// The configured key, or the one kept in the database once it has been read (the broker
    /// starts while the database is down; calls wait for the key like they wait for the outbox).
    key: tokio::sync::OnceCell<String>,
    store: Arc<DocStore>,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    initial: Duration,
    max: Duration,
    give_up: Duration,
    http_hosts: Vec<String>,
    wake: Notify,
    in_flight: Mutex<HashSet<String>>,
    /// Endpoints that failed, by webhook id (logged once, reminded, cleared on success).
    failing: Mutex<HashMap<String, Endpoint>>,
    /// Calls answered with a 2xx.
    pub delivered: std::sync::atomic::AtomicU64,
    /// Attempts that failed (each is retried, or given up).
    pub failed_attempts: std::sync::atomic::AtomicU64,
    /// Calls given up after `webhook_give_up_after`.
    pub given_up: std::sync::atomic::AtomicU64,
}

fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Most endpoints whose failures are followed at once (one per webhook; far more than a
/// deployment has).
const MAX_FAILING: usize = 1024;

/// What the log knows of an endpoint that failed.
#[derive(Debug, Default)]
struct Endpoint {
    problem: Problem,
    /// When it last answered 2xx.
    last_ok: Option<Instant>,
}

impl Deliverer {
    /// A call to webhook `hook`'s endpoint started at `started` failed for `err`: how loud to
    /// say so. A failure of a call that started before the endpoint last answered 2xx is old
    /// news (calls run side by side), not the start of a new problem.
    fn endpoint_failed(&self, hook: &str, started: Instant, err: &str) -> Say {
        let mut m = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        if !m.contains_key(hook) {
            if m.len() >= MAX_FAILING {
                // Forget the endpoints that are well; past that, say nothing more.
                m.retain(|_, e| e.problem.ongoing());
                if m.len() >= MAX_FAILING {
                    return Say::Quiet;
                }
            }
            m.insert(hook.to_owned(), Endpoint::default());
        }
        let Some(e) = m.get_mut(hook) else {
            return Say::Quiet;
        };
        if e.last_ok.is_some_and(|ok| ok > started) {
            return Say::Quiet;
        }
        e.problem.occurred(err)
    }

    /// A call to webhook `hook`'s endpoint was answered 2xx: the end of its problem, if it had
    /// one.
    fn endpoint_ok(&self, hook: &str) -> Option<Over> {
        let mut m = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.get_mut(hook)?;
        e.last_ok = Some(Instant::now());
        e.problem.cleared()
    }

    /// A deliverer signing with the configured key, or the one kept in `store`.
    pub fn new(cfg: &SmsConfig, store: Arc<DocStore>) -> anyhow::Result<Arc<Self>> {
        let tls = wsmb_common::tls::client_config(&cfg.webhook_ca_file, "sms.webhook_ca_file")
            .map_err(|e| anyhow::anyhow!(e))?;
        let key = tokio::sync::OnceCell::new_with(
            (!cfg.webhook_signing_key.is_empty()).then(|| cfg.webhook_signing_key.clone()),
        );
        Ok(Arc::new(Deliverer {
            key,
            store,
            tls: Arc::new(tls),
            timeout: cfg.webhook_timeout,
            initial: cfg.webhook_retry_initial,
            max: cfg.webhook_retry_max,
            give_up: cfg.webhook_give_up_after,
            http_hosts: cfg.webhook_http_hosts.clone(),
            wake: Notify::new(),
            in_flight: Mutex::new(HashSet::new()),
            failing: Mutex::new(HashMap::new()),
            delivered: Default::default(),
            failed_attempts: Default::default(),
            given_up: Default::default(),
        }))
    }

    /// The signing key: the configured one, else the one kept in the database (made and kept
    /// there the first time).
    pub async fn key(&self) -> Result<&str, DbError> {
        self.key
            .get_or_try_init(|| stored_key(&self.store))
            .await
            .map(String::as_str)
    }

    /// Whether `url` may be registered; why not.
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("url {url:?} is not a valid URL: {e}"))?;
        let host = uri
            .host()
            .ok_or_else(|| format!("url {url:?} has no host"))?;
        match uri.scheme_str() {
            Some("https") => Ok(()),
            Some("http")
                if is_loopback(host)
                    || self.http_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) =>
            {
                Ok(())
            }
            Some("http") => Err(format!(
                "url {url:?}: webhooks must use https:// (plain http:// only on loopback or on the \
                 hosts of sms.webhook_http_hosts)"
            )),
            _ => Err(format!("url {url:?} must start with https://")),
        }
    }

    /// The outbox document of one call of `hook` for an event, signed when it is sent.
    pub fn call(
        &self,
        owner: &str,
        hook: &Webhook,
        event_id: &str,
        device: &str,
        payload: Value,
        now: i64,
    ) -> Write {
        let body = json!({
            "deviceId": device,
            "event": hook.event,
            "id": event_id,
            "payload": payload,
            "webhookId": hook.id,
        });
        let call = Call {
            hook: hook.id.clone(),
            url: hook.url.clone(),
            event: hook.event.clone(),
            body: body.to_string(),
            attempts: 0,
            last_error: None,
        };
        Write::Put(Doc {
            kind: Kind::Outbox,
            id: format!("{event_id}.{}", hook.id),
            owner: owner.to_owned(),
            created: now,
            state: "pending".into(),
            due: now.max(1),
            body: serde_json::to_string(&call).unwrap_or_default(),
        })
    }

    /// New calls are queued: look now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn calls_of(owner: &str) -> Query {
        Query {
            kind: Kind::Outbox,
            owner: Some(owner.to_owned()),
            state: None,
            from: None,
            to: None,
            limit: 10_000,
            offset: 0,
            newest_first: true,
        }
    }

    /// Per webhook of `owner`: pending and given-up calls.
    pub async fn stats(&self, owner: &str) -> Result<HashMap<String, HookStats>, DbError> {
        let mut out: HashMap<String, HookStats> = HashMap::new();
        for d in self.store.list(&Self::calls_of(owner)).await? {
            let Ok(c) = serde_json::from_str::<Call>(&d.body) else {
                continue;
            };
            let s = out.entry(c.hook).or_default();
            if d.state == "failed" {
                s.failed += 1;
            } else {
                s.pending += 1;
            }
            if s.last_error.is_none() {
                s.last_error = c.last_error;
            }
        }
        Ok(out)
    }

    /// Deletes the queued calls of a webhook that is deleted.
    pub async fn forget(&self, owner: &str, hook: &str) -> Result<(), DbError> {
        let writes: Vec<Write> = self
            .store
            .list(&Self::calls_of(owner))
            .await?
            .into_iter()
            .filter(|d| serde_json::from_str::<Call>(&d.body).is_ok_and(|c| c.hook == hook))
            .map(|d| Write::Delete(Kind::Outbox, d.id))
            .collect();
        self.store.apply(writes).await.map(|_| ())
    }

    /// Delivers due calls until `shutdown`. A call cut short by the shutdown stays in the
    /// outbox and is made again after the restart (a receiver may then see an event twice: the
    /// body's `id` tells it so).
    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = me.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                me.round(&shutdown).await;
            }
        });
    }

    /// Starts the due calls that are not in flight, up to [`IN_FLIGHT`].
    async fn round(self: &Arc<Self>, shutdown: &CancellationToken) {
        let room = IN_FLIGHT.saturating_sub(self.flying().len());
        if room == 0 {
            return;
        }
        let due = match self.store.due(Kind::Outbox, now_ms(), IN_FLIGHT * 2).await {
            Ok(d) => d,
            Err(e) => {
                debug!("webhook outbox: {e}");
                return;
            }
        };
        let mut started = 0;
        for d in due {
            if started >= room {
                break;
            }
            if !self.flying().insert(d.id.clone()) {
                continue;
            }
            started += 1;
            let m = Arc::clone(self);
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let id = d.id.clone();
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = m.attempt(d) => {}
                }
                m.flying().remove(&id);
                m.wake();
            });
        }
    }

    fn flying(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One attempt of one call, and what it leaves in the outbox.
    async fn attempt(&self, d: Doc) {
        // The list of due calls was read before this call was marked in flight: an attempt
        // that finished in between has deleted it (or moved it on). Read it again, so that an
        // endpoint never gets the same call twice from one broker.
        let mut d = match self.store.get(Kind::Outbox, &d.id).await {
            Ok(Some(now)) if now.state != "failed" && now.due > 0 && now.due <= now_ms() => now,
            Ok(_) => return,
            Err(e) => {
                debug!("webhook outbox: {e}");
                return;
            }
        };
        let Ok(mut call) = serde_json::from_str::<Call>(&d.body) else {
            let _ = self
                .store
                .apply(vec![Write::Delete(Kind::Outbox, d.id)])
                .await;
            return;
        };
        let key = match self.key().await {
            Ok(k) => k,
            Err(e) => {
                debug!("webhook call waits for the signing key: {e}");
                return;
            }
        };
        let ts = (now_ms() / 1000).to_string();
        let sig = sign(key, call.body.as_bytes(), &ts);
        let started = Instant::now();
        let result = post(
            &call.url,
            Bytes::from(call.body.clone()),
            &ts,
            &sig,
            Arc::clone(&self.tls),
            self.timeout,
        )
        .await;
        let now = now_ms();
        call.attempts += 1;
        let write = match result {
            Ok(status) if (200..300).contains(&status) => {
                self.delivered
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                debug!(call = %d.id, event = %call.event, status, "webhook delivered");
                if let Some(over) = self.endpoint_ok(&call.hook) {
                    info!(
                        webhook = %call.hook, url = %call.url,
                        "webhook endpoint answers again, after {} ({} failed attempt(s))",
                        human(over.lasted),
                        over.count
                    );
                }
                Write::Delete(Kind::Outbox, d.id.clone())
            }
            other => {
                let err = match other {
                    Ok(status) => format!("HTTP {status}"),
                    Err(e) => e,
                };
                let age = Duration::from_millis((now - d.created).max(0) as u64);
                call.last_error = Some(err.clone());
                self.failed_attempts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if age >= self.give_up {
                    self.given_up
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    warn!(
                        webhook = %call.hook, url = %call.url, event = %call.event,
                        "webhook call given up after {} attempt(s) over {age:?} \
                         (sms.webhook_give_up_after): {err}",
                        call.attempts
                    );
                    d.state = "failed".into();
                    d.due = 0;
                } else {
                    let shift = call.attempts.saturating_sub(1).min(20);
                    let delay = self.initial.saturating_mul(1u32 << shift).min(self.max);
                    match self.endpoint_failed(&call.hook, started, &err) {
                        Say::Start => warn!(
                            webhook = %call.hook, url = %call.url, event = %call.event,
                            "webhook endpoint failing: {err}; its calls are kept and retried \
                             with growing delays for up to {} (sms.webhook_give_up_after): \
                             check that the URL answers a POST with 2xx within \
                             sms.webhook_timeout (the endpoint server's log says why not)",
                            human(self.give_up)
                        ),
                        Say::Remind { since, count } => warn!(
                            webhook = %call.hook, url = %call.url,
                            "webhook endpoint still failing after {} ({count} failed \
                             attempt(s)): {err}",
                            human(since)
                        ),
                        Say::Quiet => debug!(
                            call = %d.id, attempts = call.attempts,
                            "webhook call failed: {err}; next in {delay:?}"
                        ),
                    }
                    d.due = now + delay.as_millis() as i64;
                }
                d.body = serde_json::to_string(&call).unwrap_or_default();
                Write::Put(d.clone())
            }
        };
        // The call may have been deleted meanwhile (its webhook was): do not bring it back.
        if matches!(write, Write::Put(_))
            && self
                .store
                .get(Kind::Outbox, &d.id)
                .await
                .ok()
                .flatten()
                .is_none()
        {
            return;
        }
        if let Err(e) = self.store.apply(vec![write]).await {
            warn!("webhook outbox: cannot record the call's outcome: {e}");
        }
    }
}

/// The signing key kept in the database; a new one is made and kept there when there is none.
async fn stored_key(store: &DocStore) -> Result<String, DbError> {
    const ID: &str = "webhook_signing_key";
    if let Some(d) = store.get(Kind::Setting, ID).await? {
        return Ok(d.body);
    }
    let doc = Doc {
        kind: Kind::Setting,
        id: ID.into(),
        owner: String::new(),
        created: now_ms(),
        state: String::new(),
        due: 0,
        body: super::random_hex(32),
    };
    store.apply(vec![Write::Insert(doc.clone())]).await?;
    // Another broker on the same database may have made one first: theirs is the one kept.
    let key = store
        .get(Kind::Setting, ID)
        .await?
        .map_or(doc.body, |d| d.body);
    if store.durable() {
        info!("webhook signing key made and kept (`wsmb-broker webhook-key` shows it)");
    } else {
        warn!(
            "webhook signing key made for this run only (storage.backend = \"memory\"); set \
             sms.webhook_signing_key or WSMB_WEBHOOK_KEY to keep one"
        );
    }
    Ok(key)
}

/// POSTs `body` to `url` with the signature headers; the HTTP status, or why there is none.
/// One connection per call, HTTP/1.1, no redirects, everything within `timeout`.
async fn post(
    url: &str,
    body: Bytes,
    ts: &str,
    sig: &str,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<u16, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or("no host")?.to_owned();
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| host.clone());
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("wsmb-broker/", env!("CARGO_PKG_VERSION")),
        )
        .header("X-Timestamp", ts)
        .header("X-Signature", sig)
        .body(http_body_util::Full::new(body))
        .map_err(|e| format!("request: {e}"))?;
    let work = async {
        let tcp = tokio::net::TcpStream::connect((bare.as_str(), port))
            .await
            .map_err(|e| format!("connect to {bare}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        if https {
            let name = rustls_pki_types::ServerName::try_from(bare.clone())
                .map_err(|e| format!("TLS name {bare:?}: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            exchange(hyper_util::rt::TokioIo::new(tls), req).await
        } else {
            exchange(hyper_util::rt::TokioIo::new(tcp), req).await
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer within {timeout:?} (sms.webhook_timeout)"
            ))
        })
}

async fn exchange<I>(io: I, req: hyper::Request<http_body_util::Full<Bytes>>) -> Result<u16, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(conn);
    let resp = sender.send_request(req).await;
    driver.abort();
    let resp = resp.map_err(|e| format!("HTTP: {e}"))?;
    let status = resp.status().as_u16();
    if (300..400).contains(&status) {
        let to = resp
            .headers()
            .get(hyper::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?");
        return Err(format!(
            "HTTP {status} redirect to {to} (redirects are not followed)"
        ));
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_of_body_then_timestamp() {
        // printf '%s' '{"a":1}1700000000' | openssl dgst -sha256 -hmac k
        assert_eq!(
            sign("k", br#"{"a":1}"#, "1700000000"),
            "863b3ca22f830ea9a313aa1f225e62edf8b5f12937b1ed0de39156638a94b26a"
        );
    }
}

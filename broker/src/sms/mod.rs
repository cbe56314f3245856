//! The SMS service: what the broker knows about SMS beyond moving frames. It turns a message
//! accepted by the HTTP API into jobs on the jobs channel (one per recipient, in the agents'
//! existing job format), tracks the jobs applications send over WebSocket the same way, reads
//! the agents' status events to move each message through `Pending`, `Processed`, `Sent`,
//! `Delivered`, `Failed` or `Cancelled`, knows the connected gateways and their modems, and
//! queues the webhook calls those changes cause ([`webhooks`]).
//!
//! It sits beside the delivery engine, above it: it publishes through [`Engine::publish`] like
//! any sender, and the session layer (`conn`, `api`) calls it; it imports neither. States are
//! kept in the storage backend's database ([`store`]), or in memory with the memory backend.
//!
//! - [`model`]: states, the message document, the API's JSON shapes, request validation.
//! - [`store`]: the `<prefix>sms` table.
//! - [`webhooks`]: signatures, URL rules, the durable outbox and its deliverer.

pub mod model;
pub mod store;
pub mod webhooks;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wsmb_common::problem::{Problem, Say};
use wsmb_protocol::ResponseCode;
use wsmb_protocol::sms::{InboxMessage, JobItem, Status, StatusEvent, parse_jobs};

use crate::config::{Config, SmsConfig};
use crate::delivery::{Engine, Publish};
use crate::storage::DbError;
use crate::ws::Text;
use model::{Message, Recipient, SendRequest, Source, State, Webhook, WebhookRequest};
use store::{Doc, DocStore, Kind, Query, Write};

/// The connection id the service publishes as (no session has it).
const SERVICE_CONN: u64 = 0;

/// How long WebSocket jobs go untracked after the database failed to record some.
const TRACKING_PAUSE_MS: i64 = 5_000;

/// The `deviceId` of `system:ping` calls: they come from the broker, not from a gateway.
const PING_DEVICE: &str = "broker";

/// An API error: the HTTP status and what is wrong, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What is wrong and how to fix it.
    pub message: String,
    /// `Retry-After` seconds (503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A 400.
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            retry_after: None,
        }
    }

    fn status(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn unavailable(message: impl Into<String>, retry_after: u64) -> ApiError {
        ApiError {
            status: 503,
            message: message.into(),
            retry_after: Some(retry_after),
        }
    }

    fn db(e: DbError) -> ApiError {
        // Once per outage, not per request: the database's own line says more.
        static PROBLEM: Mutex<Option<Problem>> = Mutex::new(None);
        let say = PROBLEM
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Problem::default)
            .occurred("database");
        match say {
            Say::Quiet => debug!("SMS service: database error: {e}"),
            _ => warn!(
                "SMS service: the message store is unavailable: {e}; HTTP API requests that \
                 need it answer 503 with Retry-After until it is back (check the database: \
                 storage.url)"
            ),
        }
        ApiError::unavailable(format!("the message store is unavailable: {e}"), 5)
    }
}

/// Most modems kept per gateway, and the longest text kept from what an agent says about
/// them (names, reasons, errors): an agent cannot make the broker's memory grow.
const MAX_MODEMS: usize = 64;
const MAX_TEXT: usize = 256;

/// `s` cut to [`MAX_TEXT`] bytes (on a character boundary).
fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// A modem of a gateway, as its last `modem` event or heartbeat described it.
#[derive(Debug, Clone, Default)]
struct ModemInfo {
    state: String,
    reason: Option<String>,
    at_ms: i64,
    signal_dbm: Option<i32>,
    operator: Option<String>,
    /// From heartbeats only.
    beat: Option<ModemBeat>,
}

/// What heartbeats add about a modem.
#[derive(Debug, Clone, Default)]
struct ModemBeat {
    /// Its place in the heartbeat's list, the agent's `[[modem]]` order (1-based): the
    /// `simNumber` that picks it.
    position: usize,
    registration: Option<String>,
    sent: u64,
    failed: u64,
    retried: u64,
    last_error: Option<String>,
    last_sent: Option<u64>,
}

/// The agent's last heartbeat.
#[derive(Debug, Clone, Default)]
struct Beat {
    at_ms: i64,
    version: String,
    interval: u64,
    uptime: u64,
    queued: u64,
    unpublished: u64,
}

/// A gateway agent (by its broker user).
#[derive(Debug, Clone, Default)]
struct Device {
    conns: BTreeSet<u64>,
    first_ms: i64,
    last_ms: i64,
    modems: BTreeMap<String, ModemInfo>,
    last_sms_ms: Option<i64>,
    beat: Option<Beat>,
}

impl Device {
    /// The entry of modem `name`; None past [`MAX_MODEMS`] others.
    fn modem(&mut self, name: &str) -> Option<&mut ModemInfo> {
        let name = bounded(name);
        if !self.modems.contains_key(&name) && self.modems.len() >= MAX_MODEMS {
            return None;
        }
        Some(self.modems.entry(name).or_default())
    }

    /// Whether the heartbeats stopped: none for three intervals while connected.
    fn beat_late(&self, now: i64) -> Option<i64> {
        let b = self.beat.as_ref()?;
        let age = (now - b.at_ms).max(0) / 1000;
        (b.interval > 0 && !self.conns.is_empty() && age > 3 * b.interval as i64).then_some(age)
    }
}

/// Listing filters of `GET /messages`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this state.
    pub state: Option<State>,
    /// Created at or after (epoch ms).
    pub from: Option<i64>,
    /// Created before (epoch ms).
    pub to: Option<i64>,
    /// Most messages (default 50, at most 500).
    pub limit: usize,
    /// Skipped first.
    pub offset: usize,
    /// Oldest first (`sort=created_at`); newest first by default.
    pub oldest_first: bool,
}

impl ListFilter {
    /// The store's query for this listing of `kind`.
    fn query(&self, kind: Kind, owner: Option<&str>, state: Option<String>) -> Query {
        Query {
            kind,
            owner: owner.map(str::to_owned),
            state,
            from: self.from,
            to: self.to,
            limit: self.limit,
            offset: self.offset,
            newest_first: !self.oldest_first,
        }
    }
}

/// The service's counters (atomics; the HTTP statuses behind a lock: not a hot path).
#[derive(Debug, Default)]
struct Counters {
    api_requests: Mutex<BTreeMap<u16, u64>>,
    accepted: AtomicU64,
    tracked: AtomicU64,
    sent: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    received: AtomicU64,
}

/// The SMS service.
pub struct Service {
    cfg: SmsConfig,
    store: Arc<DocStore>,
    engine: Arc<Engine>,
    /// Serialises read-modify-write of message documents.
    lock: tokio::sync::Mutex<()>,
    devices: Mutex<BTreeMap<String, Device>>,
    /// Message states kept (checked against `max_messages`)...
    messages: AtomicUsize,
    /// ...once counted in the database.
    counted: AtomicBool,
    /// Until when (epoch ms) WebSocket jobs are not tracked: the database just failed.
    untracked_until: AtomicI64,
    seq: AtomicU64,
    seq_prefix: String,
    hooks: Arc<webhooks::Deliverer>,
    counters: Counters,
}

/// Epoch milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn fingerprint(owner: &str, text: &str, numbers: &[String]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for part in std::iter::once(owner)
        .chain(std::iter::once(text))
        .chain(numbers.iter().map(String::as_str))
    {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    if getrandom::fill(&mut b).is_err() {
        // Never reached on Linux; still unique enough for an id (not used for the key).
        let t = now_ms().to_be_bytes();
        for (i, x) in b.iter_mut().enumerate() {
            *x = t[i % 8] ^ (i as u8);
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn message_doc(m: &Message) -> Doc {
    let pending = m.state() == State::Pending;
    Doc {
        kind: Kind::Message,
        id: m.id.clone(),
        owner: m.owner.clone(),
        created: m.created_ms,
        state: m.state().as_str().into(),
        // A pending message with an expiry is due then (it fails as expired unless a gateway
        // took it).
        due: match (pending, m.expires_at) {
            (true, Some(e)) => (e as i64).saturating_mul(1000),
            _ => 0,
        },
        body: serde_json::to_string(m).unwrap_or_default(),
    }
}

fn parse_message(d: &Doc) -> Option<Message> {
    serde_json::from_str(&d.body).ok()
}

impl Service {
    /// Opens the service's store, resolves the webhook signing key and starts its background
    /// work (webhook deliveries, expiry of pending messages, retention) until `shutdown`.
    pub async fn start(
        config: &Config,
        engine: Arc<Engine>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Service>> {
        let cfg = config.sms.clone();
        let store = Arc::new(DocStore::open(&config.storage).await.map_err(|e| {
            anyhow::anyhow!("the SMS service cannot open its table (<prefix>sms): {e}")
        })?);
        if !store.durable() {
            warn!(
                "SMS service: storage.backend = \"memory\": message states, webhooks and pending \
                 webhook calls are kept in memory only and lost at restart"
            );
        }
        let hooks = webhooks::Deliverer::new(&cfg, Arc::clone(&store))?;
        let svc = Arc::new(Service {
            cfg,
            store,
            engine,
            lock: tokio::sync::Mutex::new(()),
            devices: Mutex::new(BTreeMap::new()),
            messages: AtomicUsize::new(0),
            counted: AtomicBool::new(false),
            untracked_until: AtomicI64::new(0),
            seq: AtomicU64::new(1),
            seq_prefix: random_hex(4),
            hooks: Arc::clone(&hooks),
            counters: Counters::default(),
        });
        // What the service reads at start: the signing key and the number of messages kept. A
        // database that is down now does not stop the broker (the message store copes too): the
        // sweeper tries again every second, and requests meanwhile get 503.
        match tokio::time::timeout(Duration::from_secs(5), svc.prepare()).await {
            Ok(Ok(())) => info!(
                "SMS service: HTTP API under {}, jobs on {:?}, status on {:?}, {} message(s) \
                 kept",
                crate::config::API_PREFIX,
                svc.cfg.jobs_channel,
                svc.cfg.status_channel,
                svc.messages.load(Ordering::Relaxed)
            ),
            Ok(Err(e)) => warn!(
                "SMS service: its database does not answer ({e}); the HTTP API answers 503 until \
                 it does"
            ),
            Err(_) => warn!(
                "SMS service: its database does not answer within 5 s; the HTTP API answers 503 \
                 until it does"
            ),
        }
        hooks.spawn(shutdown.clone());
        spawn_pinger(&svc, shutdown.clone());
        spawn_sweeper(&svc, shutdown);
        Ok(svc)
    }

    /// Reads what the service needs from its database once: the signing key (made and kept
    /// when there is none) and the number of messages kept.
    async fn prepare(&self) -> Result<(), DbError> {
        self.hooks.key().await?;
        if !self.counted.load(Ordering::Acquire) {
            let n = self.store.count(Kind::Message, None).await?;
            self.messages.store(n, Ordering::Relaxed);
            self.counted.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// The configuration in force.
    pub fn config(&self) -> &SmsConfig {
        &self.cfg
    }

    fn next_event_id(&self) -> String {
        format!(
            "{}-{}",
            self.seq_prefix,
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    // ---- messages -------------------------------------------------------------------------

    /// `POST /messages`: validates, stores (Pending), publishes the jobs. Returns the HTTP
    /// status (202 new, 200 a repeat of a known id) and the state.
    pub async fn send(
        &self,
        owner: &str,
        frame_id: String,
        req: SendRequest,
        skip_validation: bool,
    ) -> Result<(u16, Value), ApiError> {
        let now = now_ms();
        let text = self.validate_text(&req)?;
        let numbers = self.validate_numbers(&req, skip_validation)?;
        let expires_at = self.validate_expiry(&req, now)?;
        let priority = match req.priority {
            None => 0,
            Some(p) if (-128..=127).contains(&p) => p as i32,
            Some(p) => return Err(ApiError::bad(format!("priority = {p} must be -128 to 127"))),
        };
        let max_sim = wsmb_protocol::sms::MAX_SIM;
        let sim = match req.sim_number {
            None => None,
            Some(n) if (1..=max_sim as i64).contains(&n) => Some(n as u8),
            Some(n) => {
                return Err(ApiError::bad(format!(
                    "simNumber = {n}: it picks the gateway's modem by position (1 for the first \
                     [[modem]] of wsmb-agent's configuration, 2 for the second, ... up to \
                     {max_sim}); leave it out to let the gateway pick"
                )));
            }
        };
        if let Some(d) = req.device_id.as_deref().filter(|d| !d.is_empty()) {
            self.check_device(d)?;
        }
        if req.is_encrypted {
            return Err(ApiError::bad(
                "isEncrypted messages are not supported: send the text in clear over HTTPS",
            ));
        }
        let id = match req.id.as_deref().map(str::trim) {
            None | Some("") => random_hex(11),
            Some(id) if id.len() > model::MAX_ID || id.chars().any(char::is_control) => {
                return Err(ApiError::bad(format!(
                    "id must be 1 to {} characters without control characters",
                    model::MAX_ID
                )));
            }
            Some(id) => id.to_owned(),
        };
        let fp = fingerprint(owner, &text, &numbers);
        self.prepare().await.map_err(ApiError::db)?;
        if self.messages.load(Ordering::Relaxed) >= self.cfg.max_messages {
            // Full; a repeat of a message kept is still answered.
            if let Some(k) = self.get(owner, &id).await? {
                if k.fingerprint == fp {
                    return Ok((200, self.view(&k)));
                }
            }
            return Err(ApiError::unavailable(
                format!(
                    "the broker keeps {} message states, its limit (sms.max_messages); older ones \
                     age out after sms.keep",
                    self.cfg.max_messages
                ),
                60,
            ));
        }
        let jobs: Vec<String> = if numbers.len() == 1 {
            vec![id.clone()]
        } else {
            (1..=numbers.len()).map(|i| format!("{id}/{i}")).collect()
        };
        let mut msg = Message {
            id: id.clone(),
            owner: owner.to_owned(),
            source: Source::Api,
            device: None,
            created_ms: now,
            expires_at,
            frame_id: frame_id.clone(),
            fingerprint: fp.clone(),
            recipients: numbers
                .iter()
                .zip(&jobs)
                .map(|(n, j)| Recipient::pending(n, j))
                .collect(),
            states: BTreeMap::new(),
        };
        msg.note_state(now);
        let inserted = self
            .store
            .apply(vec![Write::Insert(message_doc(&msg))])
            .await
            .map_err(ApiError::db)?;
        if inserted.first() != Some(&true) {
            let known = self.get(owner, &id).await?;
            return match known {
                Some(k) if k.fingerprint == fp => Ok((200, self.view(&k))),
                _ => Err(ApiError::status(
                    409,
                    format!(
                        "the id {id:?} is already used by another message; use a new id (a \
                         repeated id with the same text and numbers is not sent again)"
                    ),
                )),
            };
        }
        self.messages.fetch_add(1, Ordering::Relaxed);
        let now_s = (now / 1000) as u64;
        let items: Vec<JobItem<'_>> = numbers
            .iter()
            .zip(&jobs)
            .map(|(n, j)| JobItem {
                id: j,
                time: now_s,
                receiver: n,
                message: &text,
                expiration: expires_at,
                priority,
                delivery_report: Some(req.with_delivery_report),
                sim,
            })
            .collect();
        let frame = wsmb_protocol::frames::send_message(&self.cfg.jobs_channel, &items);
        let outcome = match Text::new(Bytes::from(frame)) {
            Ok(frame) => {
                self.engine
                    .publish(Publish {
                        sender: SERVICE_CONN,
                        channel: &self.cfg.jobs_channel,
                        message_id: frame_id,
                        frame,
                        limit: 1,
                        expires_at,
                        report: None,
                    })
                    .await
                    .outcome()
                    .await
            }
            Err(_) => crate::delivery::Outcome {
                code: ResponseCode::InvalidData,
                receivers: 0,
                stored: None,
                reason: Some("internal: the job frame is not UTF-8".into()),
            },
        };
        if outcome.code != ResponseCode::Accepted {
            // Not queued: forget it, so that the client may retry with the same id.
            let _ = self
                .store
                .apply(vec![Write::Delete(Kind::Message, id.clone())])
                .await;
            self.messages.fetch_sub(1, Ordering::Relaxed);
            let why = match outcome.code {
                ResponseCode::NoReceiver | ResponseCode::ReceiversBusy => format!(
                    "no gateway agent is connected to take the message (channel {:?}), and \
                     storage.backend = \"memory\" keeps nothing for later; retry when an agent \
                     is connected, or use a durable backend",
                    self.cfg.jobs_channel
                ),
                _ => outcome
                    .reason
                    .unwrap_or_else(|| format!("refused ({:?})", outcome.code)),
            };
            info!(message = %id, "SMS not queued: {why}");
            return Err(ApiError::unavailable(why, 30));
        }
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        debug!(message = %id, recipients = numbers.len(), "SMS accepted");
        Ok((202, self.view(&msg)))
    }

    /// A `deviceId` can be honoured only when it names the one gateway there is: the broker
    /// hands each job to whichever agent on the jobs channel is free, it cannot pick one.
    fn check_device(&self, id: &str) -> Result<(), ApiError> {
        let d = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let known = d.contains_key(id);
        if known && d.len() == 1 {
            return Ok(());
        }
        Err(ApiError::bad(if known {
            format!(
                "deviceId {id:?} cannot be honoured: {} gateways are known and the broker gives \
                 each message to whichever is free; leave deviceId out (route numbers to modems \
                 with the agents' [[route]] sections)",
                d.len()
            )
        } else {
            format!(
                "deviceId {id:?} is not a known gateway (GET /devices lists them); leave it out"
            )
        }))
    }

    fn validate_text(&self, req: &SendRequest) -> Result<String, ApiError> {
        if req.data_message.is_some() || req.mms_message.is_some() {
            return Err(ApiError::bad(
                "dataMessage and mmsMessage are not supported: send a textMessage",
            ));
        }
        let text = match (&req.text_message, &req.message) {
            (Some(t), _) => t.text.clone(),
            (None, Some(m)) => m.clone(),
            (None, None) => {
                return Err(ApiError::bad(
                    "the message has no text: send {\"textMessage\": {\"text\": \"...\"}}",
                ));
            }
        };
        if text.trim().is_empty() {
            return Err(ApiError::bad("the message text is empty"));
        }
        let parts = wsmb_protocol::segments::plan(&text)
            .map(|p| p.parts.len())
            .map_err(|e| ApiError::bad(e.to_string()))?;
        if parts > self.cfg.max_parts as usize {
            return Err(ApiError::bad(format!(
                "the text needs {parts} SMS parts; at most {} are allowed (sms.max_parts); \
                 shorten it",
                self.cfg.max_parts
            )));
        }
        Ok(text)
    }

    fn validate_numbers(
        &self,
        req: &SendRequest,
        skip_validation: bool,
    ) -> Result<Vec<String>, ApiError> {
        if req.phone_numbers.is_empty() {
            return Err(ApiError::bad(
                "phoneNumbers is empty: give at least one number, e.g. [\"+628123456789\"]",
            ));
        }
        if req.phone_numbers.len() > self.cfg.max_recipients {
            return Err(ApiError::bad(format!(
                "{} phone numbers; at most {} per message (sms.max_recipients)",
                req.phone_numbers.len(),
                self.cfg.max_recipients
            )));
        }
        let mut out: Vec<String> = Vec::with_capacity(req.phone_numbers.len());
        for n in &req.phone_numbers {
            let n = if skip_validation {
                let t = n.trim();
                if t.is_empty() || t.len() > 32 || t.chars().any(char::is_control) {
                    return Err(ApiError::bad(format!("{n:?} is not a phone number")));
                }
                t.to_owned()
            } else {
                model::e164(n).map_err(ApiError::bad)?
            };
            if !out.contains(&n) {
                out.push(n);
            }
        }
        Ok(out)
    }

    fn validate_expiry(&self, req: &SendRequest, now: i64) -> Result<Option<u64>, ApiError> {
        match (req.ttl, &req.valid_until) {
            (Some(_), Some(_)) => Err(ApiError::bad(
                "ttl and validUntil are mutually exclusive: give one of them",
            )),
            (Some(t), None) if t <= 0 => Err(ApiError::bad(format!(
                "ttl = {t} must be a positive number of seconds"
            ))),
            (Some(t), None) => Ok(Some((now / 1000) as u64 + t as u64)),
            (None, Some(v)) => {
                let ms = model::parse_iso(v).ok_or_else(|| {
                    ApiError::bad(format!(
                        "validUntil = {v:?} is not an ISO 8601 time such as \
                         2026-12-02T10:00:00+00:00"
                    ))
                })?;
                if ms <= now {
                    return Err(ApiError::bad(format!("validUntil = {v:?} is in the past")));
                }
                Ok(Some((ms / 1000) as u64))
            }
            (None, None) => Ok(None),
        }
    }

    /// One message of `owner`.
    pub async fn get(&self, owner: &str, id: &str) -> Result<Option<Message>, ApiError> {
        let doc = self
            .store
            .get(Kind::Message, id)
            .await
            .map_err(ApiError::db)?;
        Ok(doc
            .as_ref()
            .and_then(parse_message)
            .filter(|m| m.owner == owner))
    }

    /// The last `limit` messages of every user, newest first (only those in `state`); for the
    /// status page.
    pub async fn recent(
        &self,
        state: Option<State>,
        limit: usize,
    ) -> Result<Vec<Message>, ApiError> {
        let f = ListFilter {
            state,
            limit,
            ..ListFilter::default()
        };
        let docs = self
            .store
            .list(&f.query(Kind::Message, None, state.map(|s| s.as_str().to_owned())))
            .await
            .map_err(ApiError::db)?;
        Ok(docs.iter().filter_map(parse_message).collect())
    }

    /// SMS sent and failed (per recipient) since start.
    pub fn sent_and_failed(&self) -> (u64, u64) {
        (
            self.counters.sent.load(Ordering::Relaxed),
            self.counters.failed.load(Ordering::Relaxed),
        )
    }

    /// `GET /messages`.
    pub async fn list(&self, owner: &str, f: &ListFilter) -> Result<Vec<Value>, ApiError> {
        let state = f.state.map(|s| s.as_str().to_owned());
        let docs = self
            .store
            .list(&f.query(Kind::Message, Some(owner), state))
            .await
            .map_err(ApiError::db)?;
        Ok(docs
            .iter()
            .filter_map(parse_message)
            .map(|m| self.view(&m))
            .collect())
    }

    /// The API's view of `m` ([`Message::view`]) with, while it waits (`Pending` or
    /// `Processed`), `waiting`: what it waits for as the broker knows it now (no agent
    /// connected, the gateway's modems down), so that a message stuck in `Pending` says why.
    pub fn view(&self, m: &Message) -> Value {
        let mut v = m.view();
        if let (Some(w), Some(o)) = (self.waiting(m), v.as_object_mut()) {
            o.insert("waiting".into(), Value::String(w));
        }
        v
    }

    fn waiting(&self, m: &Message) -> Option<String> {
        let state = m.state();
        // Asked of the engine before the devices are locked: no lock is held across the two.
        let receivers = match state {
            State::Pending => self.engine.receivers(&self.cfg.jobs_channel),
            _ => 0,
        };
        let d = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let seen = |dev: &Device| model::iso(dev.last_ms);
        match state {
            State::Pending => {
                if receivers > 0 {
                    return None;
                }
                let agents = match d.iter().max_by_key(|(_, dev)| dev.last_ms) {
                    Some((id, dev)) => format!(
                        "no gateway agent is connected (the last, {id}, was seen at {})",
                        seen(dev)
                    ),
                    None => "no gateway agent has connected since the broker started".to_owned(),
                };
                let unless = match m.expires_at {
                    Some(_) => ", unless it expires first",
                    None => "",
                };
                Some(format!(
                    "{agents}; the message goes out when one connects{unless}"
                ))
            }
            State::Processed => {
                let (id, dev) = d.get_key_value(m.device.as_deref()?)?;
                if dev.conns.is_empty() {
                    return Some(format!(
                        "gateway {id} has it but is not connected (last seen at {}): it sends \
                         while away and reports when it is back",
                        seen(dev)
                    ));
                }
                if dev.modems.is_empty() || dev.modems.values().any(|x| x.state == "ready") {
                    return None;
                }
                let down: Vec<String> = dev
                    .modems
                    .iter()
                    .map(|(name, x)| match &x.reason {
                        Some(r) => format!("{name} {} ({r})", x.state),
                        None => format!("{name} {}", x.state),
                    })
                    .collect();
                Some(format!(
                    "no modem of gateway {id} is ready: {}",
                    down.join(", ")
                ))
            }
            _ => None,
        }
    }

    /// `DELETE /messages/{id}`: cancels a message no gateway has taken yet.
    pub async fn cancel(&self, owner: &str, id: &str) -> Result<Value, ApiError> {
        let _g = self.lock.lock().await;
        let Some(mut m) = self.get(owner, id).await? else {
            return Err(not_found("message", id));
        };
        let st = m.state();
        if st == State::Cancelled {
            return Ok(m.view());
        }
        if m.recipients.iter().any(|r| r.state != State::Pending) {
            return Err(ApiError::status(
                409,
                format!(
                    "the message is {} (a gateway has taken it): it can no longer be cancelled",
                    st.as_str()
                ),
            ));
        }
        let withdrawn = self
            .engine
            .withdraw(&m.frame_id)
            .await
            .map_err(|e| ApiError::unavailable(format!("cannot cancel now: {e}"), 5))?;
        if !withdrawn {
            return Err(ApiError::status(
                409,
                "the message has been handed to a gateway agent already: it can no longer be \
                 cancelled",
            ));
        }
        let now = now_ms();
        for r in &mut m.recipients {
            r.state = State::Cancelled;
        }
        m.note_state(now);
        self.store
            .apply(vec![Write::Put(message_doc(&m))])
            .await
            .map_err(ApiError::db)?;
        info!(message = %id, "SMS cancelled");
        Ok(m.view())
    }

    // ---- what the session layer tells the service ------------------------------------------

    /// A `send-message` on the jobs channel from `owner` over WebSocket: its jobs are tracked
    /// (before they are routed) under their ids.
    pub async fn track_jobs(&self, owner: &str, frame_id: &str, frame: &str) {
        let now = now_ms();
        if now < self.untracked_until.load(Ordering::Relaxed) {
            return;
        }
        let Ok((_, items)) = parse_jobs(frame) else {
            return;
        };
        let mut writes = Vec::new();
        for job in items.into_iter().flatten() {
            let Some(id) = job.id.filter(|i| i.len() <= model::MAX_ID) else {
                continue;
            };
            if self.messages.load(Ordering::Relaxed) + writes.len() >= self.cfg.max_messages {
                warn!("sms.max_messages reached: WebSocket jobs are routed but not tracked");
                break;
            }
            let mut m = Message {
                id: id.clone(),
                owner: owner.to_owned(),
                source: Source::Ws,
                device: None,
                created_ms: now,
                expires_at: job.expiration,
                frame_id: frame_id.to_owned(),
                fingerprint: String::new(),
                recipients: vec![Recipient::pending(job.receiver.unwrap_or_default(), id)],
                states: BTreeMap::new(),
            };
            m.note_state(now);
            writes.push(Write::Insert(message_doc(&m)));
        }
        if writes.is_empty() {
            return;
        }
        match self.store.apply(writes).await {
            Ok(r) => {
                let n = r.iter().filter(|x| **x).count();
                self.messages.fetch_add(n, Ordering::Relaxed);
                self.counters.tracked.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => {
                // The jobs are routed anyway; while the database is down, do not make every
                // frame on the jobs channel wait for it to fail again.
                self.untracked_until
                    .store(now + TRACKING_PAUSE_MS, Ordering::Relaxed);
                warn!(
                    "SMS service: cannot track WebSocket jobs (their states and webhooks): {e}; \
                     not trying for {} s",
                    TRACKING_PAUSE_MS / 1000
                );
            }
        }
    }

    /// A gateway agent (`user`, connection `conn`) receives on the jobs channel.
    pub fn agent_online(&self, user: &str, conn: u64) {
        let now = now_ms();
        let mut d = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let dev = d.entry(user.to_owned()).or_insert_with(|| Device {
            first_ms: now,
            ..Device::default()
        });
        dev.conns.insert(conn);
        dev.last_ms = now;
    }

    /// Connection `conn` no longer receives on the jobs channel.
    pub fn agent_offline(&self, conn: u64) {
        let now = now_ms();
        let mut d = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        for dev in d.values_mut() {
            if dev.conns.remove(&conn) {
                dev.last_ms = now;
            }
        }
    }

    /// A frame the agent `device` published on the status channel: each status event moves
    /// its message on, and queues the webhooks it causes, in one transaction, before the frame
    /// is acknowledged. An error means nothing was recorded: the frame must be refused so that
    /// the agent sends it again (events are idempotent: a repeated one changes nothing).
    pub async fn ingest(&self, device: &str, frame: &str) -> Result<(), DbError> {
        let events: Vec<StatusEvent> = data_items(frame);
        let now = now_ms();
        self.note_device(device, &events, now);
        let events: Vec<StatusEvent> = events
            .into_iter()
            .filter(|e| !matches!(e.status, Status::Modem | Status::Heartbeat) && !e.id.is_empty())
            .collect();
        if events.is_empty() {
            return Ok(());
        }
        let _g = self.lock.lock().await;
        let mut changed: HashMap<String, Message> = HashMap::new();
        let mut fired: Vec<(String, &'static str, Value)> = Vec::new();
        for e in &events {
            let Some(msg_id) = self.load_for(&e.id, &mut changed).await? else {
                debug!(job = %e.id, "status event for a job the SMS service does not know");
                continue;
            };
            let Some(m) = changed.get_mut(&msg_id) else {
                continue;
            };
            if let Some((event, payload)) = apply_event(m, e, device) {
                let c = match event {
                    "sms:sent" => &self.counters.sent,
                    "sms:delivered" => &self.counters.delivered,
                    _ => &self.counters.failed,
                };
                c.fetch_add(1, Ordering::Relaxed);
                fired.push((msg_id.clone(), event, payload));
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        let mut writes: Vec<Write> = Vec::new();
        for m in changed.values_mut() {
            m.note_state(now);
            writes.push(Write::Put(message_doc(m)));
        }
        let mut hooks_by_owner: HashMap<String, Vec<Webhook>> = HashMap::new();
        for (msg_id, event, payload) in fired {
            let Some(m) = changed.get(&msg_id) else {
                continue;
            };
            if !hooks_by_owner.contains_key(&m.owner) {
                let hooks = self.webhooks_of(&m.owner).await?;
                hooks_by_owner.insert(m.owner.clone(), hooks);
            }
            for h in hooks_by_owner.get(&m.owner).into_iter().flatten() {
                if h.event != event || h.device_id.as_deref().is_some_and(|d| d != device) {
                    continue;
                }
                writes.push(self.hooks.call(
                    &m.owner,
                    h,
                    &self.next_event_id(),
                    device,
                    payload.clone(),
                    now,
                ));
            }
        }
        let calls = writes
            .iter()
            .any(|w| matches!(w, Write::Put(d) if d.kind == Kind::Outbox));
        self.store.apply(writes).await?;
        if calls {
            self.hooks.wake();
        }
        Ok(())
    }

    /// What status events tell about the gateway `device` itself: it is alive, its modems'
    /// states, its last SMS.
    fn note_device(&self, device: &str, events: &[StatusEvent], now: i64) {
        let mut d = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let dev = d.entry(device.to_owned()).or_insert_with(|| Device {
            first_ms: now,
            ..Device::default()
        });
        dev.last_ms = now;
        for e in events {
            if e.status == Status::Modem {
                let name = e.id.strip_prefix("modem:").unwrap_or(&e.id);
                let Some(m) = dev.modem(name) else {
                    continue;
                };
                m.state = bounded(e.modem_state.as_deref().unwrap_or_default());
                m.reason = e.reason.as_deref().map(bounded);
                m.at_ms = now;
                if e.signal_dbm.is_some() {
                    m.signal_dbm = e.signal_dbm;
                }
                if let Some(o) = &e.operator {
                    m.operator = Some(bounded(o));
                }
            } else if let (Status::Heartbeat, Some(h)) = (e.status, &e.agent) {
                dev.beat = Some(Beat {
                    at_ms: now,
                    version: bounded(&h.version),
                    interval: h.interval,
                    uptime: h.uptime,
                    queued: h.queued,
                    unpublished: h.unpublished,
                });
                // The heartbeat lists every modem: one no longer configured goes.
                let listed: BTreeSet<String> = h.modems.iter().map(|m| bounded(&m.name)).collect();
                dev.modems.retain(|name, _| listed.contains(name));
                for (i, mh) in h.modems.iter().enumerate() {
                    let Some(m) = dev.modem(&mh.name) else {
                        break;
                    };
                    m.state = bounded(&mh.state);
                    m.reason = mh.reason.as_deref().map(bounded);
                    m.at_ms = now;
                    m.signal_dbm = mh.signal_dbm;
                    m.operator = mh.operator.as_deref().map(bounded);
                    m.beat = Some(ModemBeat {
                        position: i + 1,
                        registration: mh.registration.as_deref().map(bounded),
                        sent: mh.sent,
                        failed: mh.failed,
                        retried: mh.retried,
                        last_error: mh.last_error.as_deref().map(bounded),
                        last_sent: mh.last_sent,
                    });
                }
            } else if e.status == Status::Sent {
                dev.last_sms_ms = Some(now);
            }
        }
    }

    /// A frame the agent `device` published on the inbox channel: each received SMS is kept
    /// (once: its id is the agent's) for `GET /inbox` and calls the `sms:received` webhooks of
    /// every user, in one transaction, before the frame is acknowledged. An error means nothing
    /// was kept: the frame must be refused so that the agent sends it again.
    pub async fn ingest_inbox(&self, device: &str, frame: &str) -> Result<(), DbError> {
        let received: Vec<InboxMessage> = data_items(frame)
            .into_iter()
            .filter(|m: &InboxMessage| !m.id.is_empty() && m.id.len() <= model::MAX_ID)
            .collect();
        if received.is_empty() {
            return Ok(());
        }
        // Bounded like message states: past sms.max_messages kept, refused (the agent keeps
        // them and sends them again) until old ones age out after sms.keep.
        let kept = self.store.count(Kind::Inbox, None).await?;
        if kept >= self.cfg.max_messages {
            return Err(DbError(format!(
                "{kept} received SMS are kept, the limit (sms.max_messages); older ones age out \
                 after sms.keep"
            )));
        }
        let now = now_ms();
        let hooks = self.hooks_for("sms:received").await?;
        let _g = self.lock.lock().await;
        for m in received {
            let sim = self.sim_number(device, m.modem.as_deref());
            let view = model::inbox_view(&m, device, sim);
            let doc = Doc {
                kind: Kind::Inbox,
                id: m.id.clone(),
                owner: String::new(),
                created: now,
                state: String::new(),
                due: 0,
                body: view.to_string(),
            };
            // A frame sent again (the agent did not hear the answer) changes nothing; the
            // message and its webhook calls are kept together or not at all.
            if self.store.get(Kind::Inbox, &m.id).await?.is_some() {
                continue;
            }
            let payload = json!({"messageId": m.id, "message": m.message, "phoneNumber": m.sender,
                "simNumber": sim, "receivedAt": model::received_at(&m), "partial": m.partial});
            let mut writes = vec![Write::Insert(doc)];
            writes.extend(
                hooks
                    .iter()
                    .filter(|(_, h)| h.device_id.as_deref().is_none_or(|d| d == device))
                    .map(|(owner, h)| {
                        self.hooks.call(
                            owner,
                            h,
                            &self.next_event_id(),
                            device,
                            payload.clone(),
                            now,
                        )
                    }),
            );
            let calls = writes.len() > 1;
            self.store.apply(writes).await?;
            self.counters.received.fetch_add(1, Ordering::Relaxed);
            if calls {
                self.hooks.wake();
            }
        }
        Ok(())
    }

    /// The webhooks of every user registered for `event`, with their owners.
    async fn hooks_for(&self, event: &str) -> Result<Vec<(String, Webhook)>, DbError> {
        let q = Query {
            kind: Kind::Webhook,
            owner: None,
            state: Some(event.to_owned()),
            from: None,
            to: None,
            limit: 10_000,
            offset: 0,
            newest_first: false,
        };
        Ok(self
            .store
            .list(&q)
            .await?
            .into_iter()
            .filter_map(|d| Some((d.owner.clone(), serde_json::from_str(&d.body).ok()?)))
            .collect())
    }

    /// `GET /inbox`: received SMS, newest first (every user sees them: they came to the
    /// gateway, not to a user).
    pub async fn inbox(&self, f: &ListFilter) -> Result<Vec<Value>, ApiError> {
        let docs = self
            .store
            .list(&f.query(Kind::Inbox, None, None))
            .await
            .map_err(ApiError::db)?;
        Ok(docs
            .iter()
            .filter_map(|d| serde_json::from_str(&d.body).ok())
            .collect())
    }

    /// The message a job id belongs to, loaded into `changed` for this batch.
    async fn load_for(
        &self,
        job: &str,
        changed: &mut HashMap<String, Message>,
    ) -> Result<Option<String>, DbError> {
        let mut candidates = vec![job.to_owned()];
        if let Some((base, n)) = job.rsplit_once('/') {
            if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
                candidates.push(base.to_owned());
            }
        }
        for c in candidates {
            if let Some(m) = changed.get(&c) {
                if m.recipients.iter().any(|r| r.job == job) {
                    return Ok(Some(c));
                }
                continue;
            }
            if let Some(m) = self
                .store
                .get(Kind::Message, &c)
                .await?
                .as_ref()
                .and_then(parse_message)
            {
                if m.recipients.iter().any(|r| r.job == job) {
                    changed.insert(c.clone(), m);
                    return Ok(Some(c));
                }
            }
        }
        Ok(None)
    }

    // ---- webhooks --------------------------------------------------------------------------

    async fn webhooks_of(&self, owner: &str) -> Result<Vec<Webhook>, DbError> {
        let q = Query {
            kind: Kind::Webhook,
            owner: Some(owner.to_owned()),
            state: None,
            from: None,
            to: None,
            limit: self.cfg.max_webhooks,
            offset: 0,
            newest_first: false,
        };
        Ok(self
            .store
            .list(&q)
            .await?
            .iter()
            .filter_map(|d| serde_json::from_str(&d.body).ok())
            .collect())
    }

    /// `GET /webhooks`, with each webhook's pending and given-up calls.
    pub async fn list_webhooks(&self, owner: &str) -> Result<Vec<Value>, ApiError> {
        let hooks = self.webhooks_of(owner).await.map_err(ApiError::db)?;
        let stats = self.hooks.stats(owner).await.map_err(ApiError::db)?;
        Ok(hooks
            .iter()
            .map(|h| {
                let s = stats.get(&h.id).cloned().unwrap_or_default();
                json!({
                    "id": h.id,
                    "url": h.url,
                    "event": h.event,
                    "deviceId": h.device_id,
                    "pendingDeliveries": s.pending,
                    "failedDeliveries": s.failed,
                    "lastError": s.last_error,
                })
            })
            .collect())
    }

    /// `POST /webhooks`.
    pub async fn add_webhook(&self, owner: &str, req: WebhookRequest) -> Result<Value, ApiError> {
        if !model::EVENTS.contains(&req.event.as_str()) {
            return Err(ApiError::bad(format!(
                "event {:?} is not one of {}",
                req.event,
                model::EVENTS.join(", ")
            )));
        }
        self.hooks.check_url(&req.url).map_err(ApiError::bad)?;
        let id = match req.id.as_deref().map(str::trim) {
            None | Some("") => random_hex(11),
            Some(i) if i.len() > model::MAX_ID || i.chars().any(char::is_control) => {
                return Err(ApiError::bad(format!(
                    "id must be 1 to {} characters",
                    model::MAX_ID
                )));
            }
            Some(i) => i.to_owned(),
        };
        let existing = self
            .store
            .get(Kind::Webhook, &id)
            .await
            .map_err(ApiError::db)?;
        match &existing {
            Some(d) if d.owner != owner => {
                return Err(ApiError::status(
                    409,
                    format!("the webhook id {id:?} is taken"),
                ));
            }
            None => {
                let n = self
                    .store
                    .count(Kind::Webhook, Some(owner))
                    .await
                    .map_err(ApiError::db)?;
                if n >= self.cfg.max_webhooks {
                    return Err(ApiError::bad(format!(
                        "{n} webhooks are registered, the limit (sms.max_webhooks); delete one \
                         first"
                    )));
                }
            }
            Some(_) => {}
        }
        let h = Webhook {
            id: id.clone(),
            url: req.url,
            event: req.event,
            device_id: req.device_id.filter(|d| !d.is_empty()),
        };
        let doc = Doc {
            kind: Kind::Webhook,
            id,
            owner: owner.to_owned(),
            created: now_ms(),
            state: h.event.clone(),
            due: 0,
            body: serde_json::to_string(&h).unwrap_or_default(),
        };
        self.store
            .apply(vec![Write::Put(doc)])
            .await
            .map_err(ApiError::db)?;
        info!(webhook = %h.id, event = %h.event, url = %h.url, "webhook registered");
        Ok(json!({"id": h.id, "url": h.url, "event": h.event, "deviceId": h.device_id}))
    }

    /// `DELETE /webhooks/{id}` (its queued calls go too).
    pub async fn delete_webhook(&self, owner: &str, id: &str) -> Result<(), ApiError> {
        let existing = self
            .store
            .get(Kind::Webhook, id)
            .await
            .map_err(ApiError::db)?;
        if existing.is_none_or(|d| d.owner != owner) {
            return Err(not_found("webhook", id));
        }
        self.hooks.forget(owner, id).await.map_err(ApiError::db)?;
        self.store
            .apply(vec![Write::Delete(Kind::Webhook, id.to_owned())])
            .await
            .map_err(ApiError::db)?;
        info!(webhook = %id, "webhook deleted");
        Ok(())
    }

    /// Queues a `system:ping` call for every webhook registered for it.
    async fn ping_webhooks(&self) -> Result<(), DbError> {
        let hooks = self.hooks_for("system:ping").await?;
        if hooks.is_empty() {
            return Ok(());
        }
        let payload = json!({"health": self.health().await});
        let now = now_ms();
        let writes: Vec<Write> = hooks
            .iter()
            .map(|(owner, h)| {
                self.hooks.call(
                    owner,
                    h,
                    &self.next_event_id(),
                    PING_DEVICE,
                    payload.clone(),
                    now,
                )
            })
            .collect();
        self.store.apply(writes).await?;
        self.hooks.wake();
        Ok(())
    }

    /// The webhook signing key in force (see [`webhooks::Deliverer::key`]).
    pub async fn signing_key(&self) -> Result<&str, DbError> {
        self.hooks.key().await
    }

    /// An HTTP API request was answered with `status`.
    pub fn count_request(&self, status: u16) {
        *self
            .counters
            .api_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(status)
            .or_default() += 1;
    }

    /// The service's metrics now: API requests by status, messages by outcome, webhook calls,
    /// and each gateway with its modems (state, signal).
    pub fn metrics(&self, s: &mut wsmb_common::metrics::Snapshot) {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (status, v) in c
            .api_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            s.counter_with(
                "http_api_requests",
                "HTTP SMS API requests, by status",
                vec![("status", status.to_string())],
                *v,
            );
        }
        s.counters_by(
            "sms",
            "SMS: accepted by the API, tracked from WebSocket, sent, delivered, failed (per \
             recipient), received",
            &Vec::new(),
            "event",
            [
                ("accepted", n(&c.accepted)),
                ("tracked", n(&c.tracked)),
                ("sent", n(&c.sent)),
                ("delivered", n(&c.delivered)),
                ("failed", n(&c.failed)),
                ("received", n(&c.received)),
            ],
        );
        let h = &self.hooks;
        s.counters_by(
            "webhook_calls",
            "Webhook calls: delivered (2xx), failed attempts (retried), given up",
            &Vec::new(),
            "outcome",
            [
                ("delivered", n(&h.delivered)),
                ("failed_attempt", n(&h.failed_attempts)),
                ("given_up", n(&h.given_up)),
            ],
        );
        let now = now_ms();
        let d = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        for (id, dev) in d.iter() {
            s.gauge_with(
                "gateway_connected",
                "1 when the gateway agent is connected",
                vec![("gateway", id.clone())],
                i64::from(!dev.conns.is_empty()),
            );
        }
        for (id, dev) in d.iter() {
            s.gauge_with(
                "gateway_last_seen_seconds",
                "Seconds since the gateway agent was last heard from",
                vec![("gateway", id.clone())],
                ((now - dev.last_ms) / 1000).max(0),
            );
        }
        let modems = || {
            d.iter().flat_map(|(id, dev)| {
                dev.modems.iter().map(move |(name, m)| {
                    (vec![("gateway", id.clone()), ("modem", name.clone())], m)
                })
            })
        };
        for (labels, m) in modems() {
            s.gauge_with(
                "modem_ready",
                "1 when the modem is ready to send (as its agent last said)",
                labels,
                i64::from(m.state == "ready"),
            );
        }
        for (id, dev) in d.iter() {
            if let Some(b) = &dev.beat {
                s.gauge_with(
                    "gateway_heartbeat_age_seconds",
                    "Seconds since the gateway agent's last heartbeat",
                    vec![("gateway", id.clone())],
                    ((now - b.at_ms) / 1000).max(0),
                );
            }
        }
        for (id, dev) in d.iter() {
            if let Some(b) = &dev.beat {
                s.gauge_with(
                    "gateway_queued_jobs",
                    "Jobs the gateway agent holds, not finished (its last heartbeat)",
                    vec![("gateway", id.clone())],
                    i64::try_from(b.queued).unwrap_or(i64::MAX),
                );
            }
        }
        for (labels, m) in modems() {
            if let Some(b) = &m.beat {
                let registered = wsmb_protocol::sms::is_registered(b.registration.as_deref());
                s.gauge_with(
                    "modem_registered",
                    "1 when the modem is registered on a network (home or roaming)",
                    labels,
                    i64::from(registered),
                );
            }
        }
        for (mut labels, m) in modems() {
            // Words as labels of a constant 1 (the Prometheus "info" idiom).
            let b = m.beat.clone().unwrap_or_default();
            labels.push(("operator", m.operator.clone().unwrap_or_default()));
            labels.push(("registration", b.registration.unwrap_or_default()));
            labels.push(("last_error", b.last_error.unwrap_or_default()));
            s.gauge_with(
                "modem_info",
                "The modem's operator, registration and last error (as its agent last said)",
                labels,
                1,
            );
        }
        for (labels, m) in modems() {
            if let Some(b) = &m.beat {
                s.counters_by(
                    "modem_sms",
                    "Jobs through the modem since its agent started: sent, failed, retried",
                    &labels,
                    "outcome",
                    [
                        ("sent", b.sent),
                        ("failed", b.failed),
                        ("retried", b.retried),
                    ],
                );
            }
        }
        for (labels, m) in modems() {
            if let Some(dbm) = m.signal_dbm {
                s.gauge_with(
                    "modem_signal_dbm",
                    "Signal of the modem, dBm (as its agent last said)",
                    labels,
                    i64::from(dbm),
                );
            }
        }
    }

    // ---- devices and health ----------------------------------------------------------------

    /// The position of `device`'s modem `modem` among its modems (the `simNumber` that picks
    /// it), when a heartbeat told it.
    fn sim_number(&self, device: &str, modem: Option<&str>) -> Option<usize> {
        let d = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let m = d.get(device)?.modems.get(&bounded(modem?))?;
        m.beat.as_ref().map(|b| b.position)
    }

    /// `GET /devices`: the gateway agents seen since the broker started.
    pub fn devices(&self) -> Vec<Value> {
        let now = now_ms();
        let d = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        d.iter()
            .map(|(id, dev)| {
                let modems: Vec<Value> = dev
                    .modems
                    .iter()
                    .map(|(name, m)| {
                        let mut v = json!({"name": name, "state": m.state, "reason": m.reason,
                               "signalDbm": m.signal_dbm, "operator": m.operator,
                               "updatedAt": model::iso(m.at_ms)});
                        if let (Some(b), Some(o)) = (&m.beat, v.as_object_mut()) {
                            o.extend([
                                ("simNumber".to_owned(), json!(b.position)),
                                ("registration".to_owned(), json!(b.registration)),
                                ("sent".to_owned(), json!(b.sent)),
                                ("failed".to_owned(), json!(b.failed)),
                                ("retried".to_owned(), json!(b.retried)),
                                ("lastError".to_owned(), json!(b.last_error)),
                                (
                                    "lastSentAt".to_owned(),
                                    json!(b.last_sent.map(|t| model::iso(t as i64 * 1000))),
                                ),
                            ]);
                        }
                        v
                    })
                    .collect();
                let mut v = json!({
                    "id": id,
                    "name": id,
                    "connected": !dev.conns.is_empty(),
                    "createdAt": model::iso(dev.first_ms),
                    "updatedAt": model::iso(dev.last_ms),
                    "lastSeen": model::iso(dev.last_ms),
                    "lastSmsAt": dev.last_sms_ms.map(model::iso),
                    "modems": modems,
                });
                if let (Some(b), Some(o)) = (&dev.beat, v.as_object_mut()) {
                    o.insert(
                        "agent".to_owned(),
                        json!({
                            "version": b.version,
                            "heartbeatAt": model::iso(b.at_ms),
                            "heartbeatInterval": b.interval,
                            "heartbeatLate": dev.beat_late(now).is_some(),
                            "uptime": b.uptime,
                            "queued": b.queued,
                            "unpublished": b.unpublished,
                        }),
                    );
                }
                v
            })
            .collect()
    }

    /// `GET /health`: storage, agents connected, modems ready.
    pub async fn health(&self) -> Value {
        let storage = match self.store.ping().await {
            Ok(()) if self.store.durable() => ("pass", "the message store answers".to_owned()),
            Ok(()) => ("warn", "memory only: states are lost at restart".to_owned()),
            Err(e) => ("fail", format!("the message store does not answer: {e}")),
        };
        let (agents, modems_ready, modems) = {
            let d = self.devices.lock().unwrap_or_else(|p| p.into_inner());
            let online: Vec<&Device> = d.values().filter(|x| !x.conns.is_empty()).collect();
            let ready = online
                .iter()
                .flat_map(|x| x.modems.values())
                .filter(|m| m.state == "ready")
                .count();
            let all = online.iter().map(|x| x.modems.len()).sum::<usize>();
            (online.len(), ready, all)
        };
        let receivers = self.engine.receivers(&self.cfg.jobs_channel);
        let late: Vec<String> = {
            let now = now_ms();
            let d = self.devices.lock().unwrap_or_else(|p| p.into_inner());
            d.iter()
                .filter_map(|(id, dev)| {
                    dev.beat_late(now)
                        .map(|age| format!("{id} (last heartbeat {age} s ago)"))
                })
                .collect()
        };
        let agents_check = if receivers > 0 && !late.is_empty() {
            (
                "warn",
                format!(
                    "connected but silent: {}; the agent may be stuck, check its log \
                     (journalctl -u wsmb-agent)",
                    late.join(", ")
                ),
            )
        } else if receivers > 0 {
            ("pass", format!("{receivers} agent connection(s) take jobs"))
        } else {
            (
                "warn",
                "no gateway agent is connected: messages wait".to_owned(),
            )
        };
        let modems_check = if modems_ready > 0 {
            ("pass", format!("{modems_ready} of {modems} modem(s) ready"))
        } else if agents == 0 {
            ("warn", "no agent, so no modem, is connected".to_owned())
        } else if modems == 0 {
            ("pass", "no modem state reported yet".to_owned())
        } else {
            ("warn", format!("none of {modems} modem(s) is ready"))
        };
        let checks = [
            ("storage", storage),
            ("agents", agents_check),
            ("modems", modems_check),
        ];
        let status = if checks.iter().any(|(_, (s, _))| *s == "fail") {
            "fail"
        } else if checks.iter().any(|(_, (s, _))| *s == "warn") {
            "warn"
        } else {
            "pass"
        };
        let checks: serde_json::Map<String, Value> = checks
            .iter()
            .map(|(k, (s, d))| ((*k).to_owned(), json!({"status": s, "description": d})))
            .collect();
        json!({"status": status, "version": env!("CARGO_PKG_VERSION"), "checks": checks})
    }

    // ---- background -------------------------------------------------------------------------

    /// Pending messages whose expiry passed fail as expired (no gateway took them in time, and
    /// none will send them: the agent refuses an expired job).
    async fn sweep(&self) {
        let now = now_ms();
        let due = match self.store.due(Kind::Message, now, 200).await {
            Ok(d) => d,
            Err(e) => {
                debug!("SMS sweep: {e}");
                return;
            }
        };
        if !due.is_empty() {
            let _g = self.lock.lock().await;
            let mut writes = Vec::new();
            for d in due {
                // read again under the lock: an event may have moved it on
                let Ok(Some(d)) = self.store.get(Kind::Message, &d.id).await else {
                    continue;
                };
                let Some(mut m) = parse_message(&d) else {
                    continue;
                };
                if m.state() != State::Pending {
                    writes.push(Write::Put(message_doc(&m)));
                    continue;
                }
                for r in &mut m.recipients {
                    if r.state == State::Pending {
                        r.state = State::Failed;
                        r.error = Some(
                            "expired: the message's ttl/validUntil passed before a gateway took \
                             it"
                            .into(),
                        );
                    }
                }
                m.note_state(now);
                info!(message = %m.id, "SMS expired before a gateway took it");
                writes.push(Write::Put(message_doc(&m)));
                let hooks = self.webhooks_of(&m.owner).await.unwrap_or_default();
                for r in &m.recipients {
                    let payload = json!({"messageId": m.id, "phoneNumber": r.phone,
                        "failedAt": model::iso(now), "reason": r.error});
                    for h in hooks.iter().filter(|h| h.event == "sms:failed") {
                        writes.push(self.hooks.call(
                            &m.owner,
                            h,
                            &self.next_event_id(),
                            "",
                            payload.clone(),
                            now,
                        ));
                    }
                }
            }
            if let Err(e) = self.store.apply(writes).await {
                warn!("SMS sweep: {e}");
            } else {
                self.hooks.wake();
            }
        }
    }

    /// Deletes message states, received SMS and webhook calls (delivered long ago, or given
    /// up) older than `sms.keep`, a batch at a time.
    async fn retain(&self) {
        let cutoff = now_ms() - self.cfg.keep.as_millis() as i64;
        for kind in [Kind::Message, Kind::Outbox, Kind::Inbox] {
            let q = Query {
                kind,
                owner: None,
                state: None,
                from: None,
                to: Some(cutoff),
                limit: 500,
                offset: 0,
                newest_first: false,
            };
            let Ok(old) = self.store.list(&q).await else {
                return;
            };
            if old.is_empty() {
                continue;
            }
            let n = old.len();
            let writes = old.into_iter().map(|d| Write::Delete(kind, d.id)).collect();
            if self.store.apply(writes).await.is_ok() && kind == Kind::Message {
                let _ = self
                    .messages
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                        Some(v.saturating_sub(n))
                    });
                debug!("{n} message state(s) older than sms.keep deleted");
            }
        }
    }
}

/// The items of a `send-message` frame's `data` (an array, or a single object) that read as
/// `T`; others are skipped.
fn data_items<T: serde::de::DeserializeOwned>(frame: &str) -> Vec<T> {
    #[derive(serde::Deserialize)]
    struct F {
        #[serde(default)]
        data: Value,
    }
    let items = match serde_json::from_str::<F>(frame).map(|f| f.data) {
        Ok(Value::Array(a)) => a,
        Ok(v @ Value::Object(_)) => vec![v],
        _ => return Vec::new(),
    };
    items
        .into_iter()
        .filter_map(|v| match serde_json::from_value(v) {
            Ok(x) => Some(x),
            Err(e) => {
                // Said once (then every while), not per item: an agent newer or older than
                // the broker sends many.
                static PROBLEM: Mutex<Option<Problem>> = Mutex::new(None);
                let say = PROBLEM
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(Problem::default)
                    .occurred(&e.to_string());
                if say.loud() {
                    warn!(
                        "SMS service: an item it does not understand was not recorded ({e}); \
                         it is still passed to the channel's receivers. Are the broker and the \
                         agent of the same version?"
                    );
                } else {
                    debug!("SMS service: item not understood: {e}");
                }
                None
            }
        })
        .collect()
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::status(404, format!("no {what} with id {id:?}"))
}

/// Moves `m` on by one status event; returns the webhook event it causes with its payload.
fn apply_event(m: &mut Message, e: &StatusEvent, device: &str) -> Option<(&'static str, Value)> {
    let r = m.recipients.iter_mut().find(|r| r.job == e.id)?;
    let at = model::iso((e.time as i64).saturating_mul(1000).max(0));
    let prev = r.state;
    if prev == State::Cancelled {
        return None;
    }
    let fired = match e.status {
        Status::Queued => {
            if prev == State::Pending {
                r.state = State::Processed;
            }
            None
        }
        Status::Sent => {
            if matches!(prev, State::Delivered | State::Sent) {
                return None;
            }
            r.state = State::Sent;
            r.error = None;
            r.parts = e.parts;
            r.modem = e.modem.clone();
            Some((
                "sms:sent",
                json!({"messageId": m.id, "phoneNumber": r.phone, "partsCount": e.parts,
                       "sentAt": at}),
            ))
        }
        Status::Delivered => {
            if prev == State::Delivered {
                return None;
            }
            r.state = State::Delivered;
            Some((
                "sms:delivered",
                json!({"messageId": m.id, "phoneNumber": r.phone, "deliveredAt": at}),
            ))
        }
        Status::Failed | Status::Expired => {
            if matches!(prev, State::Failed | State::Delivered) {
                return None;
            }
            let reason = e.reason.clone().unwrap_or_else(|| "failed".into());
            let reason = if e.status == Status::Expired {
                format!("expired: {reason}")
            } else {
                match &e.error_code {
                    Some(c) if !reason.contains(c.as_str()) => format!("{reason} ({c})"),
                    _ => reason,
                }
            };
            r.state = State::Failed;
            r.error = Some(reason.clone());
            Some((
                "sms:failed",
                json!({"messageId": m.id, "phoneNumber": r.phone, "failedAt": at,
                       "reason": reason}),
            ))
        }
        Status::Held => {
            if matches!(prev, State::Pending | State::Processed) {
                r.state = State::Processed;
                let reason = e
                    .reason
                    .clone()
                    .unwrap_or_else(|| "a sending limit of the modem".into());
                r.held = Some(match e.until {
                    Some(u) => format!(
                        "{reason}; the gateway sends it from {}",
                        model::iso((u as i64).saturating_mul(1000))
                    ),
                    None => reason,
                });
            }
            None
        }
        Status::Modem | Status::Heartbeat => None,
    };
    if r.state != State::Processed {
        r.held = None;
    }
    if m.device.is_none() && !device.is_empty() {
        m.device = Some(device.to_owned());
    }
    fired
}

/// The key `wsmb-broker webhook-key` prints: the configured one (or `WSMB_WEBHOOK_KEY`), else
/// the one kept in the database, made and kept there when there is none yet.
pub async fn show_signing_key(config: &Config) -> anyhow::Result<String> {
    let store = Arc::new(DocStore::open(&config.storage).await?);
    let hooks = webhooks::Deliverer::new(&config.sms, store)?;
    let key = hooks
        .key()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the webhook signing key: {e}"))?;
    Ok(key.to_owned())
}

/// Runs `work` on the service every `every` (the first time after one period) until
/// `shutdown` or until the service is gone.
fn every<F, Fut>(svc: &Arc<Service>, every: Duration, shutdown: CancellationToken, work: F)
where
    F: Fn(Arc<Service>, u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let weak = Arc::downgrade(svc);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(svc) = weak.upgrade() else {
                return;
            };
            work(svc, n).await;
            n += 1;
        }
    });
}

/// `system:ping` webhooks every `sms.ping_interval` (none when it is 0), with the health of
/// `GET /health` as payload: a receiver that stops getting them knows the broker is gone.
fn spawn_pinger(svc: &Arc<Service>, shutdown: CancellationToken) {
    if svc.cfg.ping_interval.is_zero() {
        return;
    }
    every(svc, svc.cfg.ping_interval, shutdown, |svc, _| async move {
        if let Err(e) = svc.ping_webhooks().await {
            debug!("system:ping webhooks not queued: {e}");
        }
    });
}

/// Every second: what the service must read at start, if the database was down then; pending
/// messages that expired. Every minute: what is older than `sms.keep`.
fn spawn_sweeper(svc: &Arc<Service>, shutdown: CancellationToken) {
    every(svc, Duration::from_secs(1), shutdown, |svc, n| async move {
        if let Err(e) = svc.prepare().await {
            debug!("SMS service: database: {e}");
            return;
        }
        svc.sweep().await;
        if n % 60 == 0 {
            svc.retain().await;
        }
    });
}

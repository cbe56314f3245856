//! One client connection, from the first byte to the close.
//!
//! 1. Read the HTTP request head (within `handshake_timeout`) and route it: WebSocket upgrade on
//!    the configured path, `/healthz`, or an HTTP error.
//! 2. Check the Basic credentials, answer `101`.
//! 3. **Welcome timing.** The `connect` frame is sent when the client sends its first frame or
//!    after `welcome_delay`, whichever comes first, never together with the `101`. The legacy
//!    PHP client reads the upgrade response with one 1024-byte `fread` and throws away anything
//!    else in it; with the original broker that swallowed the `connect` frame, so `receiver.php`
//!    never saw it and `sender.php` (write, then read one frame) waited for its 10 s timeout.
//!    Here a sender that writes at once reads `connect` at once, and a client that waits for
//!    `connect` gets it after `welcome_delay` (100 ms by default, at most 250 ms).
//! 4. Rejected credentials: `connect` with `01`, then close 1008. Nothing else is processed.
//! 5. Accepted: a reader (parses frames, routes, replies) and a writer (drains the outgoing
//!    queue in batches with one flush per batch, pings, closes) run side by side.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info};

use wsmb_protocol::client::{Command, ItemId, PROTOCOL_V2, parse_client_frame};
use wsmb_protocol::reply::{self, SendResult};
use wsmb_protocol::{ResponseCode, time};

use crate::http::{self, HeadError, RequestHead};
use crate::router::ReceiverHandle;
use crate::server::Shared;

/// After the broker sends a close frame, how long it waits for the peer's close reply.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Most frames written per flush; bounds the latency added by batching.
const MAX_BATCH: usize = 256;

/// Why and how a connection is being ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Send a close frame; when `drain`, first write everything already queued.
    Close {
        code: CloseCode,
        reason: &'static str,
        drain: bool,
    },
    /// Stop writing at once (the peer is gone or closed first).
    Quit,
}

/// A frame on its way to a client.
pub struct Outgoing {
    /// The frame.
    pub msg: Message,
    /// Bytes it holds against the connection's `outgoing_queue_bytes` budget (0 for the
    /// broker's own replies, bounded by back-pressure instead, and for stored messages, bounded
    /// by the delivery engine).
    pub bytes: usize,
    /// Stored messages it carries: the delivery engine is told once it is written.
    pub written: Option<Written>,
}

/// "These stored messages were written to this connection", sent by the writer after a flush.
pub struct Written {
    /// The delivery engine.
    pub to: mpsc::UnboundedSender<crate::durable::Cmd>,
    /// The connection.
    pub conn: u64,
    /// The messages.
    pub keys: Vec<Arc<str>>,
}

impl Outgoing {
    /// A reply of the broker's own.
    pub fn reply(msg: Message) -> Outgoing {
        Outgoing {
            msg,
            bytes: 0,
            written: None,
        }
    }

    /// A forwarded message of `bytes` bytes (counted against the budget).
    pub fn counted(msg: Message, bytes: usize) -> Outgoing {
        Outgoing {
            msg,
            bytes,
            written: None,
        }
    }

    /// A frame the delivery engine accounts for itself.
    pub fn data(msg: Message) -> Outgoing {
        Outgoing::reply(msg)
    }
}

/// Shared between a connection's reader, its writer and the router.
pub struct ConnControl {
    stop: Mutex<Option<Stop>>,
    queued_bytes: AtomicUsize,
    room: Notify,
    notify: Notify,
    done: CancellationToken,
    last_rx: AtomicU64,
    born: Instant,
}

impl Default for ConnControl {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnControl {
    /// A fresh control block.
    pub fn new() -> Self {
        ConnControl {
            stop: Mutex::new(None),
            queued_bytes: AtomicUsize::new(0),
            room: Notify::new(),
            notify: Notify::new(),
            done: CancellationToken::new(),
            last_rx: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    fn request(&self, stop: Stop) {
        let mut s = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        if s.is_none() {
            *s = Some(stop);
            drop(s);
            self.notify.notify_one();
        }
    }

    fn take(&self) -> Option<Stop> {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `len` bytes of the outgoing budget `max`; false (and nothing taken) when they do
    /// not fit.
    pub fn reserve(&self, len: usize, max: usize) -> bool {
        let before = self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        if before + len > max {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives back what [`ConnControl::reserve`] took, once the frame is written (or dropped).
    pub fn release(&self, len: usize) {
        if len > 0 {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.room.notify_waiters();
        }
    }

    /// Resolves when bytes are released (register it before checking, see `Notify`).
    pub fn room_notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.room.notified()
    }

    /// Resolves once the connection's writer has finished.
    pub async fn gone(&self) {
        self.done.cancelled().await
    }

    /// Asks the connection to close because its outgoing queue is full.
    pub fn slow_consumer(&self) {
        self.request(Stop::Close {
            code: CloseCode::Policy,
            reason: "slow consumer: outgoing queue full",
            drain: false,
        });
    }

    /// Whether a close has been requested.
    pub fn close_requested(&self) -> bool {
        self.take().is_some()
    }

    fn touch(&self) {
        self.last_rx
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_rx.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
    }
}

/// Serves one accepted TCP connection.
pub async fn handle(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, id: u64) {
    let span = tracing::info_span!("conn", id, %peer, user = tracing::field::Empty);
    async move {
        if let Err(e) = serve(stream, &shared, id).await {
            debug!("connection ended: {e}");
        }
    }
    .instrument(span)
    .await
}

async fn serve(mut stream: TcpStream, shared: &Arc<Shared>, id: u64) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    let cfg = &shared.config.server;
    let head = tokio::time::timeout(cfg.handshake_timeout, http::read_head(&mut stream)).await;
    let (head, leftover) = match head {
        Err(_) => {
            debug!("handshake timeout");
            let resp = http::text_response(408, "Request Timeout", "", "request timeout", false);
            let _ = http::send_and_close(&mut stream, &resp).await;
            return Ok(());
        }
        Ok(Err(HeadError::Eof)) => return Ok(()),
        Ok(Err(HeadError::TooLarge)) => {
            let resp = http::text_response(
                431,
                "Request Header Fields Too Large",
                "",
                "request head too large",
                false,
            );
            http::send_and_close(&mut stream, &resp).await?;
            return Ok(());
        }
        Ok(Err(HeadError::Malformed(e))) => {
            debug!("malformed request: {e}");
            let resp = http::text_response(400, "Bad Request", "", "malformed HTTP request", false);
            let _ = http::send_and_close(&mut stream, &resp).await;
            return Ok(());
        }
        Ok(Err(HeadError::Io(e))) => return Err(e.into()),
        Ok(Ok(h)) => h,
    };

    let head_only = head.method == "HEAD";
    if head.path == crate::config::HEALTH_PATH && !head.wants_websocket() {
        let resp = if head.method == "GET" || head_only {
            http::response(
                200,
                "OK",
                "application/json",
                "",
                &shared.health_json(),
                head_only,
            )
        } else {
            http::text_response(
                405,
                "Method Not Allowed",
                "Allow: GET, HEAD\r\n",
                "use GET",
                false,
            )
        };
        http::send_and_close(&mut stream, &resp).await?;
        return Ok(());
    }
    if head.path != cfg.path {
        let body = format!(
            "not found: the WebSocket endpoint is {} and the health check {}",
            cfg.path,
            crate::config::HEALTH_PATH
        );
        let resp = http::text_response(404, "Not Found", "", &body, head_only);
        http::send_and_close(&mut stream, &resp).await?;
        return Ok(());
    }
    if !head.wants_websocket() {
        let resp = http::text_response(
            426,
            "Upgrade Required",
            "Upgrade: websocket\r\nConnection: Upgrade\r\n",
            "this is a WebSocket endpoint: connect with a WebSocket client \
             (Upgrade: websocket) and HTTP Basic credentials",
            head_only,
        );
        http::send_and_close(&mut stream, &resp).await?;
        return Ok(());
    }
    if head.method != "GET" {
        let resp = http::text_response(
            405,
            "Method Not Allowed",
            "Allow: GET\r\n",
            "use GET",
            false,
        );
        http::send_and_close(&mut stream, &resp).await?;
        return Ok(());
    }
    if head.ws_version.as_deref() != Some("13") {
        let resp = http::text_response(
            426,
            "Upgrade Required",
            "Sec-WebSocket-Version: 13\r\n",
            "unsupported WebSocket version: use 13 (RFC 6455)",
            false,
        );
        http::send_and_close(&mut stream, &resp).await?;
        return Ok(());
    }
    let Some(key) = head.ws_key.as_deref().filter(|k| !k.is_empty()) else {
        let resp = http::text_response(400, "Bad Request", "", "missing Sec-WebSocket-Key", false);
        http::send_and_close(&mut stream, &resp).await?;
        return Ok(());
    };
    let accept = derive_accept_key(key.as_bytes());

    let user = authenticate(&head, shared).await;
    if let Some(u) = &user {
        tracing::Span::current().record("user", u.as_str());
    }

    use tokio::io::AsyncWriteExt;
    stream
        .write_all(http::switching_protocols(&accept).as_bytes())
        .await?;

    let ws_config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(64 * 1024 + cfg.max_message_bytes + 1024)
        .max_message_size(Some(cfg.max_message_bytes))
        .max_frame_size(Some(cfg.max_message_bytes));
    let mut ws = WebSocketStream::from_partially_read(
        stream,
        leftover.to_vec(),
        Role::Server,
        Some(ws_config),
    )
    .await;

    // Welcome timing (see the module docs).
    let first = tokio::time::timeout(cfg.welcome_delay, ws.next())
        .await
        .unwrap_or_default();

    let Some(_user) = user else {
        shared.stats.auth_rejected.fetch_add(1, Ordering::Relaxed);
        info!("credentials rejected");
        let frame = reply::connect(ResponseCode::Rejected, time::now_timestamp());
        let _ = ws.send(Message::text(frame)).await;
        let _ = ws
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Policy,
                reason: Utf8Bytes::from_static("invalid credentials"),
            })))
            .await;
        // Give the peer a moment to read the frames and answer the close; ignore what it sends.
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        return Ok(());
    };

    debug!("accepted");
    let (tx, rx) = mpsc::channel(cfg.outgoing_queue);
    // The welcome is the first frame of the queue: the writer sends it once the reader has
    // taken every frame already received. Writing to a client that sent its frames and closed
    // makes its kernel answer with a reset, which would discard what it sent and we had not
    // read yet.
    let welcome = reply::connect(ResponseCode::Accepted, time::now_timestamp());
    let _ = tx.try_send(Outgoing::reply(Message::text(welcome)));
    let ctl = Arc::new(ConnControl::new());
    ctl.touch();
    let (sink, stream) = ws.split();
    let (replies, pending) = if shared.storage.is_some() {
        let (t, r) = mpsc::channel(MAX_PENDING_COMMITS);
        (Some(t), Some(r))
    } else {
        (None, None)
    };
    let completer = complete(pending, tx.clone(), Arc::clone(shared));
    let mut session = Session {
        id,
        shared: Arc::clone(shared),
        v2: false,
        subscriptions: Vec::new(),
        tx,
        ctl: Arc::clone(&ctl),
        replies,
    };
    let writer = write_loop(sink, rx, Arc::clone(&ctl), Arc::clone(shared));
    let reader = async {
        session.read_loop(stream, first).await;
        // no more replies: the completer finishes what is pending and stops
        session.replies = None;
    };
    tokio::join!(reader, writer, completer);
    session.unsubscribe_all();
    debug!("closed");
    Ok(())
}

async fn authenticate(head: &RequestHead, shared: &Shared) -> Option<String> {
    let Some(value) = head.authorization.as_deref() else {
        debug!("no Authorization header");
        return None;
    };
    let Some((user, password)) = http::basic_credentials(value) else {
        debug!("Authorization header is not valid Basic credentials");
        return None;
    };
    if shared.auth.verify(&user, &password).await {
        Some(user)
    } else {
        // The user name is logged (it helps operators); the password never is.
        info!(user = %user, "wrong user name or password");
        None
    }
}

type WsSink = SplitSink<WebSocketStream<TcpStream>, Message>;
type WsRead = SplitStream<WebSocketStream<TcpStream>>;

/// Writes queued frames, pings, and the close frame.
///
/// Writing is one branch of the loop, not a blocking step, so that a peer that stops reading
/// (its socket buffer full) still gets noticed by the dead-peer check, a slow-consumer close or
/// shutdown. Frames taken from the queue wait in `pending` until the sink has taken them, so an
/// interrupted write loses nothing.
async fn write_loop(
    mut sink: WsSink,
    mut rx: mpsc::Receiver<Outgoing>,
    ctl: Arc<ConnControl>,
    shared: Arc<Shared>,
) {
    let cfg = &shared.config.server;
    let ping_every = cfg.ping_interval;
    let tick = ping_every.max(Duration::from_millis(10));
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shutdown = shared.shutdown.clone();
    let mut out = Outbox::default();

    let stop = loop {
        tokio::select! {
            biased;
            _ = ctl.notify.notified() => {
                if let Some(stop) = ctl.take() {
                    break stop;
                }
            }
            _ = shutdown.cancelled() => {
                break Stop::Close { code: CloseCode::Away, reason: "server shutting down", drain: true };
            }
            _ = ping.tick(), if !ping_every.is_zero() => {
                if ctl.silent_for() > cfg.dead_peer_timeout {
                    info!("no frame from the peer for {:?}: dropping it", ctl.silent_for());
                    shared.stats.dead_peers.fetch_add(1, Ordering::Relaxed);
                    break Stop::Quit;
                }
                out.pending.push_back(Outgoing::reply(Message::Ping(Default::default())));
            }
            r = out.progress(&mut sink, &mut rx, &ctl) => match r {
                Ok(true) => {}
                Ok(false) | Err(_) => break Stop::Quit,
            }
        }
    };

    if let Stop::Close {
        code,
        reason,
        drain,
    } = stop
    {
        if code == CloseCode::Policy && reason.starts_with("slow") {
            shared.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
            info!("closing slow consumer");
        }
        let finish = async {
            if drain {
                rx.close();
                while out.progress(&mut sink, &mut rx, &ctl).await? {}
            }
            sink.send(Message::Close(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            })))
            .await
        };
        // A peer that does not read could block these writes forever.
        let _ = tokio::time::timeout(cfg.shutdown_timeout.max(CLOSE_GRACE), finish).await;
    }
    ctl.done.cancel();
}

/// Frames on their way from the queue into the socket.
#[derive(Default)]
struct Outbox {
    pending: std::collections::VecDeque<Outgoing>,
    unflushed: bool,
    /// Stored messages handed to the sink, confirmed to the engine after the flush.
    written: Vec<Written>,
}

impl Outbox {
    /// Moves frames forward: when idle, waits for the queue and takes a batch (up to
    /// [`MAX_BATCH`]); then hands them to the sink and flushes once. Cancel-safe: a frame leaves
    /// `pending` only once the sink has it. Returns false when the queue is closed and empty.
    async fn progress(
        &mut self,
        sink: &mut WsSink,
        rx: &mut mpsc::Receiver<Outgoing>,
        ctl: &ConnControl,
    ) -> Result<bool, WsError> {
        if self.pending.is_empty() && !self.unflushed {
            match rx.recv().await {
                Some(m) => self.pending.push_back(m),
                None => return Ok(false),
            }
            while self.pending.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => self.pending.push_back(m),
                    Err(_) => break,
                }
            }
        }
        while let Some(o) = self.pending.front() {
            sink.feed(o.msg.clone()).await?;
            if let Some(o) = self.pending.pop_front() {
                ctl.release(o.bytes);
                if let Some(w) = o.written {
                    self.written.push(w);
                }
            }
            self.unflushed = true;
        }
        if self.unflushed {
            sink.flush().await?;
            self.unflushed = false;
            for w in self.written.drain(..) {
                let _ = w.to.send(crate::durable::Cmd::Written(w.conn, w.keys));
            }
        }
        Ok(true)
    }
}

/// Hands `msg` to the receivers of `channel`: first to those with room, then, if that was not
/// enough, waits for the full ones (flow control: the sender is not read meanwhile) up to
/// `slow_receiver_timeout` in all. A receiver still full then is closed or passed over
/// (`slow_receiver`). Returns (delivered, receivers that stayed full).
async fn deliver(
    shared: &Shared,
    channel: &str,
    limit: u32,
    sender: u64,
    msg: &Message,
) -> (u32, u32) {
    let cfg = &shared.config.server;
    let max_bytes = cfg.outgoing_queue_bytes;
    let d = shared
        .router
        .deliver(channel, limit, sender, msg, max_bytes);
    let mut delivered = d.delivered;
    let mut missing = d.missing;
    let mut busy = 0;
    if missing == 0 {
        return (delivered, 0);
    }
    let deadline = tokio::time::Instant::now() + cfg.slow_receiver_timeout;
    for r in &d.full {
        if missing == 0 {
            break;
        }
        match tokio::time::timeout_at(deadline, crate::router::send_when_room(r, msg, max_bytes))
            .await
        {
            Ok(true) => {
                delivered += 1;
                missing -= 1;
            }
            Ok(false) => {}
            Err(_) => {
                busy += 1;
                if cfg.slow_receiver == crate::config::SlowReceiverPolicy::Disconnect {
                    r.ctl.slow_consumer();
                }
            }
        }
    }
    (delivered, busy)
}

/// Most sends of one connection waiting for their commit.
const MAX_PENDING_COMMITS: usize = 256;

/// A reply in the durable pipeline.
enum Pending {
    /// Ready to go.
    Ready(String),
    /// A send waiting for its commit.
    Stored(Box<StoredSend>),
}

/// A `send-message` submitted to the database.
struct StoredSend {
    commit: tokio::sync::oneshot::Receiver<Result<i64, crate::storage::StoreError>>,
    publish: crate::durable::Publish,
}

fn count_send(stats: &crate::server::Stats, delivered: u32, stored: Option<bool>) {
    stats
        .deliveries
        .fetch_add(u64::from(delivered), Ordering::Relaxed);
    if delivered == 0 && stored != Some(true) {
        stats.unrouted.fetch_add(1, Ordering::Relaxed);
    }
}

fn send_result(
    code: ResponseCode,
    message_id: String,
    channel: String,
    ids: Vec<String>,
    receivers: u32,
    stored: bool,
    reason: Option<String>,
) -> String {
    let result = SendResult {
        message_id,
        channel,
        receivers,
        ids,
        stored: Some(stored),
        reason,
    };
    reply::encode(reply::SEND_RESULT, code, &[result])
}

/// Sends the replies of one connection in order; a stored send is published to the delivery
/// engine once committed (or, when the database failed, to whoever is online).
async fn complete(
    rx: Option<mpsc::Receiver<Pending>>,
    tx: mpsc::Sender<Outgoing>,
    shared: Arc<Shared>,
) {
    let (Some(mut rx), Some(engine), Some(storage)) =
        (rx, shared.engine.clone(), shared.storage.clone())
    else {
        return;
    };
    while let Some(p) = rx.recv().await {
        let text = match p {
            Pending::Ready(t) => t,
            Pending::Stored(s) => {
                let StoredSend {
                    commit,
                    mut publish,
                } = *s;
                let committed = commit.await.unwrap_or_else(|_| {
                    Err(crate::storage::StoreError::Unavailable(
                        "the storage writer stopped".into(),
                    ))
                });
                // What the reply needs; the engine needs the ids only for an expiry report.
                let (key, channel) = (publish.key.clone(), publish.channel.clone());
                let ids = if publish.report_to.is_some() {
                    publish.ids.clone()
                } else {
                    std::mem::take(&mut publish.ids)
                };
                let (code, n, stored, reason) = match committed {
                    Ok(id) => {
                        publish.data_id = Some(id);
                        (
                            ResponseCode::Accepted,
                            engine.publish(publish).await,
                            true,
                            None,
                        )
                    }
                    Err(e) => {
                        storage.release(&publish.channel);
                        // The database is down: still deliver to whoever is online now.
                        match engine.publish(publish).await {
                            0 => (
                                ResponseCode::StorageUnavailable,
                                0,
                                false,
                                Some(format!(
                                    "no receiver is online and the message cannot be stored: \
                                     {e}; retry later"
                                )),
                            ),
                            n => (ResponseCode::Accepted, n, false, None),
                        }
                    }
                };
                count_send(&shared.stats, n, Some(stored));
                send_result(code, key, channel, ids, n, stored, reason)
            }
        };
        // The client may be gone; what it sent is still published, only the reply is lost.
        let _ = tx.send(Outgoing::reply(Message::text(text))).await;
    }
}

/// A `send-message` with a database, before its commit.
struct DurableSend<'a> {
    storage: &'a Arc<crate::storage::Storage>,
    channel: &'a str,
    limit: u32,
    key: String,
    ids: Vec<String>,
    payload: &'a Utf8Bytes,
}

impl DurableSend<'_> {
    /// Checks expiry and caps, and submits the insert (group commit).
    fn prepare(self, frame: &wsmb_protocol::ClientFrame<'_>, session: &Session) -> Pending {
        use crate::storage::{NewMessage, StoreError};
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let expires_at = frame.expiry(now);
        let publish = crate::durable::Publish {
            key: self.key,
            data_id: None,
            channel: self.channel.to_owned(),
            frame: self.payload.clone(),
            limit: self.limit,
            expires_at,
            ids: self.ids,
            report_to: frame.report.then(|| session.tx.clone()),
            sender: session.id,
        };
        let refuse = |code, why: String| {
            Pending::Ready(send_result(
                code,
                publish.key.clone(),
                publish.channel.clone(),
                publish.ids.clone(),
                0,
                false,
                Some(why),
            ))
        };
        if expires_at.is_some_and(|e| e <= now) {
            return refuse(
                ResponseCode::Expired,
                "the message had already expired when it arrived".into(),
            );
        }
        if let Err(StoreError::Full(why) | StoreError::Unavailable(why)) =
            self.storage.reserve(self.channel)
        {
            return refuse(ResponseCode::StorageFull, why);
        }
        let m = NewMessage {
            key: publish.key.clone(),
            channel: publish.channel.clone(),
            frame: self.payload.clone(),
            data: data_text(self.payload.as_str()),
            remaining: self.limit.max(1),
            expires_at,
        };
        let commit = self.storage.submit(m);
        Pending::Stored(Box::new(StoredSend { commit, publish }))
    }
}

/// The `data` array of a frame as JSON text, non-ASCII escaped (for the legacy `data` column).
fn data_text(frame: &str) -> String {
    #[derive(serde::Deserialize)]
    struct D<'a> {
        #[serde(borrow)]
        data: &'a serde_json::value::RawValue,
    }
    serde_json::from_str::<D<'_>>(frame)
        .map(|d| crate::storage::ascii_json(d.data.get()))
        .unwrap_or_else(|_| "[]".into())
}

/// The reader side's state.
struct Session {
    id: u64,
    shared: Arc<Shared>,
    /// `"protocol": 2` seen: keep subscriptions when sending, allow several.
    v2: bool,
    subscriptions: Vec<Box<str>>,
    tx: mpsc::Sender<Outgoing>,
    ctl: Arc<ConnControl>,
    /// With a database: replies in order, some waiting for their commit.
    replies: Option<mpsc::Sender<Pending>>,
}

impl Session {
    async fn read_loop(&mut self, mut stream: WsRead, first: Option<Result<Message, WsError>>) {
        let mut pending = first;
        let done = self.ctl.done.clone();
        let shutdown = self.shared.shutdown.clone();
        loop {
            let next = match pending.take() {
                Some(m) => Some(m),
                // Biased: frames already received are handled even when the writer is done
                // (a client that sent and closed loses nothing it sent).
                None => tokio::select! {
                    biased;
                    m = stream.next() => m,
                    _ = done.cancelled() => break,
                    _ = shutdown.cancelled() => break,
                },
            };
            let Some(next) = next else {
                self.ctl.request(Stop::Quit);
                return;
            };
            self.ctl.touch();
            let keep_going = match next {
                Ok(Message::Text(t)) => self.on_payload(t).await,
                Ok(Message::Binary(b)) => match Utf8Bytes::try_from(b) {
                    Ok(t) => self.on_payload(t).await,
                    Err(_) => {
                        self.reply_error(
                            ResponseCode::NotUtf8,
                            "the frame is not UTF-8 text; send the JSON as UTF-8".into(),
                        )
                        .await
                    }
                },
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => true,
                Ok(Message::Close(_)) => {
                    // tungstenite has queued the close reply; the writer can stop.
                    self.ctl.request(Stop::Quit);
                    false
                }
                Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
                    self.shared
                        .stats
                        .rejected_frames
                        .fetch_add(1, Ordering::Relaxed);
                    info!("frame of {size} bytes over the {max_size}-byte limit: closing (1009)");
                    let frame = reply::error(
                        ResponseCode::MessageTooLarge,
                        format!(
                            "the frame is {size} bytes; the broker accepts at most {max_size} \
                             (server.max_message_bytes)"
                        ),
                        None,
                    );
                    let _ = self.tx.try_send(Outgoing::reply(Message::text(frame)));
                    self.ctl.request(Stop::Close {
                        code: CloseCode::Size,
                        reason: "message too big",
                        drain: true,
                    });
                    false
                }
                Err(WsError::Utf8(_)) => {
                    self.ctl.request(Stop::Close {
                        code: CloseCode::Invalid,
                        reason: "text frame is not valid UTF-8",
                        drain: true,
                    });
                    false
                }
                Err(WsError::Protocol(e)) => {
                    debug!("WebSocket protocol error: {e}");
                    self.ctl.request(Stop::Close {
                        code: CloseCode::Protocol,
                        reason: "WebSocket protocol error",
                        drain: false,
                    });
                    false
                }
                Err(e) => {
                    debug!("read error: {e}");
                    self.ctl.request(Stop::Quit);
                    return;
                }
            };
            if !keep_going {
                break;
            }
        }
        // The writer is sending (or has sent) a close frame: wait for it, then briefly for the
        // peer's reply, ignoring anything else it sends.
        tokio::select! {
            _ = done.cancelled() => {}
            _ = tokio::time::sleep(self.shared.config.server.shutdown_timeout + CLOSE_GRACE) => {}
        }
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while let Some(Ok(m)) = stream.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }

    /// Handles one client frame. Returns false when the connection should stop reading.
    async fn on_payload(&mut self, payload: Utf8Bytes) -> bool {
        let shared = Arc::clone(&self.shared);
        let stats = &shared.stats;
        let frame = match parse_client_frame(payload.as_bytes()) {
            Ok(f) => f,
            Err(e) => {
                stats.rejected_frames.fetch_add(1, Ordering::Relaxed);
                debug!("refused frame: {e}");
                return self.reply_error(e.code(), e.to_string()).await;
            }
        };
        if frame.protocol.is_some_and(|p| p >= PROTOCOL_V2) {
            self.v2 = true;
        }
        match frame.command {
            Command::Ping => {
                let r = match &shared.storage {
                    Some(st) => reply::ping_with_storage(time::now_timestamp(), st.health()),
                    None => reply::connect(ResponseCode::Accepted, time::now_timestamp()),
                };
                self.reply(r).await
            }
            Command::Ack => {
                if let Some(engine) = &shared.engine {
                    let keys = frame.acks.iter().map(|k| k.to_string()).collect();
                    engine.send(crate::durable::Cmd::Ack(self.id, keys));
                }
                true
            }
            Command::ReceiveMessage => {
                let Some(channel) = frame.channel.as_deref() else {
                    return true;
                };
                if !self.v2 {
                    // Legacy: a connection receives on one channel; a new request moves it.
                    self.unsubscribe_all();
                }
                if !self.subscriptions.iter().any(|c| &**c == channel) {
                    let max = shared.config.server.max_channels_per_connection;
                    if self.subscriptions.len() >= max {
                        return self
                            .reply_error(
                                ResponseCode::TooManyChannels,
                                format!(
                                    "this connection already receives on {max} channels, the \
                                     limit (server.max_channels_per_connection); use another \
                                     connection"
                                ),
                            )
                            .await;
                    }
                    match &shared.engine {
                        Some(engine) => {
                            let st = &shared.config.storage;
                            let window = frame.window.unwrap_or(st.window).min(st.max_window);
                            engine.send(crate::durable::Cmd::Register(
                                channel.to_owned(),
                                crate::durable::Receiver {
                                    conn: self.id,
                                    tx: self.tx.clone(),
                                    ctl: Arc::clone(&self.ctl),
                                    ack: frame.ack,
                                    window,
                                },
                            ));
                        }
                        None => self.shared.router.subscribe(
                            channel,
                            ReceiverHandle {
                                id: self.id,
                                tx: self.tx.clone(),
                                ctl: Arc::clone(&self.ctl),
                            },
                        ),
                    }
                    self.subscriptions.push(channel.into());
                    debug!(channel, "receiving");
                }
                true
            }
            Command::SendMessage => {
                let Some(channel) = frame.channel.as_deref() else {
                    return true;
                };
                if !self.v2 && !self.subscriptions.is_empty() {
                    // Legacy role rule: a receiver that sends becomes a sender.
                    self.unsubscribe_all();
                }
                stats.messages_in.fetch_add(1, Ordering::Relaxed);
                let limit = frame
                    .number_of_receiver
                    .unwrap_or(self.shared.config.server.number_of_receiver);
                let message_id = self.shared.message_ids.next();
                let ids: Vec<String> = frame
                    .items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| match &item.id {
                        ItemId::Given(s) => s.to_string(),
                        ItemId::Missing => format!("{message_id}.{i}"),
                    })
                    .collect();
                if let (Some(storage), Some(replies)) = (&shared.storage, &self.replies) {
                    // Durable: the reply waits for the commit, in order, while this reader
                    // goes on with the next frames (many sends share one commit).
                    let pending = DurableSend {
                        storage,
                        channel,
                        limit,
                        key: message_id,
                        ids,
                        payload: &payload,
                    }
                    .prepare(&frame, self);
                    // (the completer outlives the reader, so this cannot fail while reading)
                    let _ = replies.send(pending).await;
                    return true;
                }
                let msg = Message::Text(payload.clone());
                let (delivered, busy) = deliver(&shared, channel, limit, self.id, &msg).await;
                let code = if delivered > 0 {
                    ResponseCode::Accepted
                } else if busy > 0 {
                    ResponseCode::ReceiversBusy
                } else {
                    ResponseCode::NoReceiver
                };
                count_send(&shared.stats, delivered, None);
                let result = SendResult {
                    message_id,
                    channel: channel.to_owned(),
                    receivers: delivered,
                    ids,
                    stored: None,
                    reason: None,
                };
                let r = reply::encode(reply::SEND_RESULT, code, &[result]);
                self.reply(r).await
            }
        }
    }

    /// Queues a reply. Always true: a client that can no longer take replies (it closed its
    /// side) still has the frames it sent handled.
    async fn reply(&self, text: String) -> bool {
        // Waiting here is the sender's back-pressure: a client that does not read its replies
        // stops being read. With a database, replies queue behind pending commits, so they
        // keep the order of the frames.
        let _ = match &self.replies {
            Some(r) => r.send(Pending::Ready(text)).await.is_ok(),
            None => self
                .tx
                .send(Outgoing::reply(Message::text(text)))
                .await
                .is_ok(),
        };
        true
    }

    async fn reply_error(&self, code: ResponseCode, reason: String) -> bool {
        self.reply(reply::error(code, reason, None)).await
    }

    fn unsubscribe_all(&mut self) {
        for c in self.subscriptions.drain(..) {
            match &self.shared.engine {
                Some(engine) => {
                    engine.send(crate::durable::Cmd::Unregister(c.to_string(), self.id))
                }
                None => self.shared.router.unsubscribe(&c, self.id),
            }
        }
    }
}

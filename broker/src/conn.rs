//! One client connection, from the first byte to the close: the session layer. It reads
//! frames, calls the delivery engine, and writes what is queued for it. What a message becomes
//! is decided in `delivery`; frames are encoded in `ws`; the queue is `outbox`.
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
//! 5. Accepted: three loops run side by side in the connection's task: the reader (parses
//!    frames, calls the engine, queues replies in order), the completer (turns each `send-message`
//!    into its `send-result` once its outcome is known: a commit may take a while, and the
//!    reader goes on meanwhile) and the writer (writes what is queued, pings, closes; every
//!    write has a deadline).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::ws::Socket;
use bytes::Bytes;
use tokio::sync::Notify;
use tracing::{Instrument, debug, info};

use wsmb_protocol::client::{Command, ItemId, PROTOCOL_V2, parse_client_frame};
use wsmb_protocol::reply::{self, SendResult};
use wsmb_protocol::{ResponseCode, time};

use crate::auth::permissions::Action;
use crate::delivery::{Accepted, Outcome, Publish, Report, Subscriber};
use crate::guard::Admission;
use crate::http::{self, HeadError, RequestHead};
use crate::outbox::{Out, Outbox, Stop};
use crate::state::Shared;
use crate::ws::{self, Frame, Incoming, Reader, Text, close};

/// After the broker sends a close frame, how long it waits for the peer's close reply.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Most frames written per write.
const MAX_BATCH: usize = 256;
/// Most replies of one connection waiting for their outcome (its reader pauses past it).
const MAX_PENDING: usize = 1024;
/// Largest list of item ids a `send-result` carries; a message with more is answered with
/// `ids_omitted` instead, so that no reply can outgrow what a client takes.
pub const MAX_IDS_BYTES: usize = 64 * 1024;

/// Serves one accepted TCP connection, admitted by the guard (`admission` is held until it
/// closes).
pub async fn handle<S: Socket>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    id: u64,
    admission: Admission,
) {
    // A debug span: at the default level no span is kept per connection (it would cost an
    // idle connection a tenth of its budget); the lines that matter at info name the
    // connection themselves.
    let span = tracing::debug_span!("conn", id, %peer, user = tracing::field::Empty);
    async move {
        if let Err(e) = serve(stream, peer, &shared, id, admission).await {
            debug!("connection ended: {e}");
        }
    }
    .instrument(span)
    .await
}

async fn serve<S: Socket>(
    stream: S,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    id: u64,
    mut admission: Admission,
) -> anyhow::Result<()> {
    // Boxed, so that what the handshake needs is not kept in the connection's future for its
    // whole life.
    let Some((stream, reader, first, user, _slot)) =
        Box::pin(handshake(stream, peer, shared, id, &mut admission)).await?
    else {
        return Ok(());
    };
    session(stream, reader, first, shared, id, user).await;
    Ok(())
}

/// What an accepted WebSocket takes from the handshake: the stream, its reader, the first
/// frame, the user, and its place among the sessions (`server.max_connections`).
type Welcomed<S> = (
    S,
    Reader,
    First,
    Arc<str>,
    tokio::sync::OwnedSemaphorePermit,
);

/// The first frame from the client, when one came within `welcome_delay`.
type First = Option<Result<Option<Incoming>, ws::ReadError>>;

/// From the first byte to an accepted WebSocket (`None`: answered and done, as HTTP or as a
/// rejected upgrade).
async fn handshake<S: Socket>(
    mut stream: S,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    id: u64,
    admission: &mut Admission,
) -> anyhow::Result<Option<Welcomed<S>>> {
    let _ = stream.set_nodelay(true);
    let cfg = &shared.config.server;
    let head = tokio::time::timeout(cfg.handshake_timeout, http::read_head(&mut stream)).await;
    let (head, leftover) = match head {
        Err(_) => {
            debug!("handshake timeout");
            let resp = http::text_response(408, "Request Timeout", "", "request timeout", false);
            let _ = respond(&mut stream, &resp, cfg.write_timeout).await;
            return Ok(None);
        }
        Ok(Err(HeadError::Eof)) => return Ok(None),
        Ok(Err(HeadError::TooLarge)) => {
            let resp = http::text_response(
                431,
                "Request Header Fields Too Large",
                "",
                "request head too large",
                false,
            );
            respond(&mut stream, &resp, cfg.write_timeout).await?;
            return Ok(None);
        }
        Ok(Err(HeadError::Malformed(e))) => {
            debug!("malformed request: {e}");
            let resp = http::text_response(400, "Bad Request", "", "malformed HTTP request", false);
            let _ = respond(&mut stream, &resp, cfg.write_timeout).await;
            return Ok(None);
        }
        Ok(Err(HeadError::Io(e))) => return Err(e.into()),
        Ok(Ok(h)) => h,
    };
    // Behind a trusted proxy, the client is the one it names.
    let client = shared
        .guard
        .client_address(peer.ip(), head.forwarded_for.as_deref());
    if let Some(left) = shared.guard.banned(client) {
        shared
            .guard
            .stats
            .refused_banned
            .fetch_add(1, Ordering::Relaxed);
        let resp = http::text_response(
            403,
            "Forbidden",
            &format!("Retry-After: {}\r\n", left.as_secs().max(1)),
            "this address is banned for a while after repeated failed logins",
            false,
        );
        let _ = respond(&mut stream, &resp, cfg.write_timeout).await;
        return Ok(None);
    }
    if head.path.starts_with(crate::config::API_PREFIX) && !head.wants_websocket() {
        Box::pin(crate::api::serve(stream, head, leftover, client, shared)).await;
        return Ok(None);
    }
    let metrics = &shared.config.metrics;
    if !metrics.path.is_empty() && head.path == metrics.path && !head.wants_websocket() {
        let allowed = match metrics.access {
            crate::config::MetricsAccess::Loopback => {
                peer.ip().is_loopback() && head.forwarded_for.is_none()
            }
            crate::config::MetricsAccess::Users => {
                authenticate(&head, shared, client, id).await.is_some()
            }
        };
        let resp = if !allowed && metrics.access == crate::config::MetricsAccess::Users {
            http::text_response(
                401,
                "Unauthorized",
                "WWW-Authenticate: Basic realm=\"wsmb\"\r\n",
                "the metrics need the credentials of a broker user (metrics.access)",
                false,
            )
        } else if !allowed {
            http::text_response(
                403,
                "Forbidden",
                "",
                "the metrics are served to loopback only (metrics.access)",
                false,
            )
        } else {
            http::response(
                200,
                "OK",
                crate::metrics::CONTENT_TYPE,
                "",
                &crate::metrics::render(shared),
                head.method == "HEAD",
            )
        };
        respond(&mut stream, &resp, cfg.write_timeout).await?;
        return Ok(None);
    }
    if let Some(asset) = crate::status::asset(&shared.config.status.path, &head.path)
        .filter(|_| !head.wants_websocket())
    {
        let resp = match authenticate(&head, shared, client, id).await {
            Some(user) => crate::status::answer(shared, asset, &head.method, &user).await,
            None => http::text_response(
                401,
                "Unauthorized",
                "WWW-Authenticate: Basic realm=\"wsmb\"\r\n",
                "the status page needs the credentials of a broker user",
                false,
            ),
        };
        respond(&mut stream, &resp, cfg.write_timeout).await?;
        return Ok(None);
    }
    if head.path == crate::config::HEALTH_PATH && !head.wants_websocket() {
        // Only up or down to strangers; the figures to users.
        let user = match head.authorization {
            Some(_) => authenticate(&head, shared, client, id).await,
            None => None,
        };
        let body = if user.is_some() {
            shared.health_json()
        } else {
            shared.health_brief()
        };
        let head_only = head.method == "HEAD";
        let resp = if head.method == "GET" || head_only {
            http::response(200, "OK", "application/json", "", &body, head_only)
        } else {
            http::text_response(
                405,
                "Method Not Allowed",
                "Allow: GET, HEAD\r\n",
                "use GET",
                false,
            )
        };
        respond(&mut stream, &resp, cfg.write_timeout).await?;
        return Ok(None);
    }
    if let Some(resp) = http_answer(&head, shared) {
        respond(&mut stream, &resp, cfg.write_timeout).await?;
        return Ok(None);
    }
    let Some(key) = head.ws_key.as_deref().filter(|k| !k.is_empty()) else {
        let resp = http::text_response(400, "Bad Request", "", "missing Sec-WebSocket-Key", false);
        respond(&mut stream, &resp, cfg.write_timeout).await?;
        return Ok(None);
    };
    let accept = ws::accept_key(key.as_bytes());

    let user = authenticate(&head, shared, client, id).await;
    if let Some(u) = &user {
        tracing::Span::current().record("user", u.as_str());
    }
    // Authenticated: out of the pending budget, into the sessions'.
    let slot = match &user {
        Some(_) => {
            admission.authenticated();
            match Arc::clone(&shared.session_slots).try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    shared
                        .stats
                        .connections_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        conn = id, %peer,
                        "session limit ({}) reached: refusing",
                        cfg.max_connections
                    );
                    let resp = http::text_response(
                        503,
                        "Service Unavailable",
                        "Retry-After: 5\r\n",
                        "too many connections (server.max_connections); retry later",
                        false,
                    );
                    let _ = respond(&mut stream, &resp, cfg.write_timeout).await;
                    return Ok(None);
                }
            }
        }
        None => None,
    };
    {
        use tokio::io::AsyncWriteExt;
        let upgrade = http::switching_protocols(&accept);
        tokio::time::timeout(cfg.write_timeout, stream.write_all(upgrade.as_bytes()))
            .await
            .map_err(|_| anyhow::anyhow!("write timed out"))??;
    }
    let mut reader = Reader::new(cfg.max_message_bytes, &leftover);
    drop(leftover);

    // Welcome timing (see the module docs).
    let first = tokio::time::timeout(cfg.welcome_delay, reader.next(&stream))
        .await
        .ok();

    let (Some(user), Some(slot)) = (user, slot) else {
        reject(&stream, &mut reader, shared, peer, id).await;
        return Ok(None);
    };
    Ok(Some((stream, reader, first, Arc::from(user), slot)))
}

/// An accepted connection: reader, completer and writer side by side until the close.
async fn session<S: Socket>(
    stream: S,
    reader: Reader,
    first: First,
    shared: &Arc<Shared>,
    id: u64,
    user: Arc<str>,
) {
    let cfg = &shared.config.server;
    debug!("accepted");
    let outbox = Arc::new(Outbox::for_conn(
        id,
        cfg.outgoing_queue,
        cfg.outgoing_queue_bytes,
    ));
    // The welcome is the first frame of the queue: the writer sends it once the reader has
    // taken every frame already received. Writing to a client that sent its frames and closed
    // makes its kernel answer with a reset, which would discard what it sent and we had not
    // read yet.
    let welcome = reply::connect(ResponseCode::Accepted, time::now_timestamp());
    let _ = outbox.try_push(Out::text(Bytes::from(welcome)));
    shared.sessions.add(id, &outbox);
    if shared.shutdown.is_cancelled() {
        // started while the others were being closed
        outbox.stop(crate::state::CLOSE_ON_SHUTDOWN);
    }
    let life = Life::new();
    let replies = Replies::default();
    let mut session = Session {
        id,
        shared: Arc::clone(shared),
        v2: false,
        user,
        subscriptions: Vec::new(),
        outbox: Arc::clone(&outbox),
        replies: &replies,
    };
    let reading = async {
        session.read_loop(&stream, reader, first, &life).await;
        // no more replies: the completer finishes what is pending and stops
        replies.close(None);
    };
    tokio::join!(
        reading,
        write_loop(&stream, &outbox, shared, id, &life),
        complete(&replies, &outbox),
    );
    session.unsubscribe_all();
    shared.sessions.remove(id);
    debug!("closed");
}

/// Rejected credentials: `connect` with `01`, close 1008, a moment for the peer's close reply.
async fn reject<S: Socket>(
    stream: &S,
    reader: &mut Reader,
    shared: &Shared,
    peer: SocketAddr,
    id: u64,
) {
    let cfg = &shared.config.server;
    shared.stats.auth_rejected.fetch_add(1, Ordering::Relaxed);
    info!(conn = id, %peer, "credentials rejected");
    let connect = reply::connect(ResponseCode::Rejected, time::now_timestamp());
    let frames = [
        Frame::Text(Bytes::from(connect)),
        Frame::Close(close::POLICY, "invalid credentials"),
    ];
    let _ = tokio::time::timeout(cfg.write_timeout, ws::write_frames(stream, &frames)).await;
    // Give the peer a moment to read the frames and answer the close; ignore what it sends.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Ok(Some(m)) = reader.next(stream).await {
            if matches!(m, Incoming::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// The plain HTTP answer to a request that is not a WebSocket upgrade on our path.
fn http_answer(head: &RequestHead, shared: &Shared) -> Option<Vec<u8>> {
    let cfg = &shared.config.server;
    let head_only = head.method == "HEAD";
    if head.path != cfg.path {
        let body = format!(
            "not found: the WebSocket endpoint is {} and the health check {}",
            cfg.path,
            crate::config::HEALTH_PATH
        );
        return Some(http::text_response(404, "Not Found", "", &body, head_only));
    }
    if !head.wants_websocket() {
        return Some(http::text_response(
            426,
            "Upgrade Required",
            "Upgrade: websocket\r\nConnection: Upgrade\r\n",
            "this is a WebSocket endpoint: connect with a WebSocket client \
             (Upgrade: websocket) and HTTP Basic credentials",
            head_only,
        ));
    }
    if head.method != "GET" {
        return Some(http::text_response(
            405,
            "Method Not Allowed",
            "Allow: GET\r\n",
            "use GET",
            false,
        ));
    }
    if head.ws_version.as_deref() != Some("13") {
        return Some(http::text_response(
            426,
            "Upgrade Required",
            "Sec-WebSocket-Version: 13\r\n",
            "unsupported WebSocket version: use 13 (RFC 6455)",
            false,
        ));
    }
    None
}

async fn respond<S: Socket>(stream: &mut S, resp: &[u8], limit: Duration) -> std::io::Result<()> {
    tokio::time::timeout(limit, http::send_and_close(stream, resp))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// The user `head`'s Basic credentials name, if they are right ([`crate::auth::login`]).
async fn authenticate(
    head: &RequestHead,
    shared: &Shared,
    client: std::net::IpAddr,
    id: u64,
) -> Option<String> {
    match crate::auth::login(
        &shared.auth,
        &shared.guard,
        head.authorization.as_deref(),
        client,
    )
    .await
    {
        crate::auth::Login::User(u) => Some(u),
        crate::auth::Login::Missing => {
            debug!(conn = id, "no valid Basic credentials");
            None
        }
        crate::auth::Login::Failed(_) => None,
    }
}

/// Between the reader and the writer of one connection: whether the reader has stopped.
struct Life {
    reader_done: std::sync::atomic::AtomicBool,
    notify: Notify,
}

impl Life {
    fn new() -> Life {
        Life {
            reader_done: std::sync::atomic::AtomicBool::new(false),
            notify: Notify::new(),
        }
    }

    fn reader_done(&self) {
        self.reader_done.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    async fn reader_stopped(&self) {
        loop {
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.reader_done.load(Ordering::Acquire) {
                return;
            }
            n.await;
        }
    }
}

/// Writes what is queued (pings and the shutdown close are queued by `state::Sessions`), then
/// the close frame. Waits on one thing only, so that an idle connection costs little.
async fn write_loop<S: Socket>(
    stream: &S,
    outbox: &Outbox,
    shared: &Shared,
    conn: u64,
    life: &Life,
) {
    let mut batch: Vec<Out> = Vec::new();
    let stop = loop {
        outbox.work().await;
        if let Some(stop) = outbox.stop_requested() {
            break stop;
        }
        outbox.take(&mut batch, MAX_BATCH);
        if let Err(why) = Box::pin(write_batch(stream, &mut batch, outbox, shared, conn)).await {
            info!(conn, "{why}: dropping the connection");
            break Stop::Quit;
        }
    };
    Box::pin(finish(stream, outbox, shared, conn, life, stop, batch)).await;
}

/// Ends a connection: writes what is queued when asked to, the close frame, waits briefly for
/// the peer's answer, stops the reader; stored rows that were never written go back.
async fn finish<S: Socket>(
    stream: &S,
    outbox: &Outbox,
    shared: &Shared,
    conn: u64,
    life: &Life,
    stop: Stop,
    mut batch: Vec<Out>,
) {
    let cfg = &shared.config.server;
    if let Stop::Close {
        code,
        reason,
        drain,
    } = stop
    {
        let closing = async {
            if drain {
                outbox.close();
                loop {
                    outbox.take(&mut batch, MAX_BATCH);
                    if batch.is_empty() {
                        break;
                    }
                    if write_batch(stream, &mut batch, outbox, shared, conn)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            let _ = ws::write_frames(stream, &[Frame::Close(code, reason)]).await;
        };
        // A peer that does not read could block these writes forever.
        let _ = tokio::time::timeout(cfg.shutdown_timeout.max(CLOSE_GRACE), closing).await;
        // Give the peer a moment to answer the close (the reader reads and drops what comes).
        let _ = tokio::time::timeout(CLOSE_GRACE, life.reader_stopped()).await;
    }
    // Wakes the reader if it still waits: reads now end.
    let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Read);
    // What was queued and will never be written: stored rows go back to the store.
    let mut carried: Vec<_> = batch
        .drain(..)
        .filter_map(|o| o.token)
        .map(|b| *b)
        .collect();
    carried.extend(
        outbox
            .drain_all()
            .into_iter()
            .filter_map(|o| o.token)
            .map(|b| *b),
    );
    if !carried.is_empty() {
        shared.engine.dropped(carried);
    }
    outbox.finish();
}

/// Reads and drops what the peer still sends after a close was decided: frames up to its close
/// answer, or raw bytes when the framing is lost; ends when the writer shuts the read side.
async fn drop_the_rest<S: Socket>(stream: &S, reader: &mut Reader, framing_lost: bool) {
    if framing_lost {
        reader.discard(stream).await;
    } else {
        while let Ok(Some(m)) = reader.next(stream).await {
            if matches!(m, Incoming::Close(_)) {
                break;
            }
        }
    }
}

/// Writes `batch` (within `write_timeout`; during a shutdown, within `shutdown_timeout`), then
/// gives back its bytes and tells the engine which stored rows it carried.
async fn write_batch<S: Socket>(
    stream: &S,
    batch: &mut Vec<Out>,
    outbox: &Outbox,
    shared: &Shared,
    conn: u64,
) -> Result<(), String> {
    if batch.is_empty() {
        return Ok(());
    }
    let cfg = &shared.config.server;
    let result = {
        let write = ws::write_frames(stream, batch.iter().map(|o| &o.frame));
        tokio::pin!(write);
        tokio::select! {
            r = tokio::time::timeout(cfg.write_timeout, &mut write) => r,
            _ = shared.shutdown.cancelled() => tokio::time::timeout(cfg.shutdown_timeout, &mut write).await,
        }
    };
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("write failed ({e})")),
        Err(_) => {
            shared.stats.write_timeouts.fetch_add(1, Ordering::Relaxed);
            return Err(format!(
                "a write did not finish within {:?} (server.write_timeout)",
                cfg.write_timeout
            ));
        }
    }
    let bytes: usize = batch.iter().map(|o| o.counted).sum();
    let carried: Vec<_> = batch
        .drain(..)
        .filter_map(|o| o.token)
        .map(|b| *b)
        .collect();
    outbox.release(bytes);
    if !carried.is_empty() {
        shared.engine.written(conn, carried);
    }
    Ok(())
}

/// A reply in the order of the frames that caused it.
enum Pending {
    /// Ready to go.
    Ready(String),
    /// A `send-message` whose outcome may still be coming.
    Send(Box<(Accepted, SendResult)>),
}

#[derive(Default)]
struct ReplyState {
    items: VecDeque<Pending>,
    /// The completer holds one it has not queued yet.
    holding: bool,
    closed: bool,
    /// How the connection ends once the last reply is queued.
    then: Option<Stop>,
}

/// The replies of one connection, in order (holds no memory when empty).
#[derive(Default)]
struct Replies {
    state: Mutex<ReplyState>,
    item: Notify,
    space: Notify,
}

impl Replies {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReplyState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether nothing waits (a ready reply may then skip the queue).
    fn is_empty(&self) -> bool {
        let s = self.lock();
        s.items.is_empty() && !s.holding
    }

    /// Queues a reply, waiting while [`MAX_PENDING`] wait.
    async fn push(&self, p: Pending) {
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            {
                let mut s = self.lock();
                if s.items.len() < MAX_PENDING {
                    s.items.push_back(p);
                    drop(s);
                    self.item.notify_one();
                    return;
                }
            }
            space.await;
        }
    }

    /// The next reply; `None` once closed and empty.
    async fn pop(&self) -> Option<Pending> {
        loop {
            let item = self.item.notified();
            tokio::pin!(item);
            item.as_mut().enable();
            {
                let mut s = self.lock();
                if let Some(p) = s.items.pop_front() {
                    s.holding = true;
                    if s.items.is_empty() && s.items.capacity() > 16 {
                        s.items = VecDeque::new();
                    }
                    drop(s);
                    self.space.notify_one();
                    return Some(p);
                }
                if s.closed {
                    return None;
                }
            }
            item.await;
        }
    }

    /// The reply taken by [`Replies::pop`] is queued.
    fn queued(&self) {
        self.lock().holding = false;
    }

    /// No more replies; once the last is queued, end the connection with `then`.
    fn close(&self, then: Option<Stop>) {
        let mut s = self.lock();
        s.closed = true;
        if s.then.is_none() {
            s.then = then;
        }
        drop(s);
        self.item.notify_one();
    }
}

/// Sends the replies of one connection in order, each `send-result` once its outcome is known.
async fn complete(replies: &Replies, outbox: &Outbox) {
    while let Some(p) = replies.pop().await {
        let text = match p {
            Pending::Ready(t) => t,
            Pending::Send(b) => {
                let (accepted, result) = *b;
                send_result(accepted.outcome().await, result)
            }
        };
        // The client may be gone; what it sent is still handled, only the reply is lost.
        let _ = outbox.push(Out::text(Bytes::from(text))).await;
        replies.queued();
    }
    if let Some(stop) = replies.lock().then {
        outbox.stop(stop);
    }
}

fn send_result(o: Outcome, mut r: SendResult) -> String {
    r.receivers = o.receivers;
    r.stored = o.stored;
    r.reason = o.reason;
    reply::encode(reply::SEND_RESULT, o.code, &[r])
}

/// The reader side's state.
struct Session<'a> {
    id: u64,
    shared: Arc<Shared>,
    /// `"protocol": 2` seen: keep subscriptions when sending, allow several.
    v2: bool,
    /// The authenticated user.
    user: Arc<str>,
    subscriptions: Vec<Box<str>>,
    outbox: Arc<Outbox>,
    replies: &'a Replies,
}

impl Session<'_> {
    async fn read_loop<S: Socket>(
        &mut self,
        stream: &S,
        mut reader: Reader,
        first: First,
        life: &Life,
    ) {
        let mut pending = first;
        let mut framing_lost = false;
        loop {
            // (When the writer finishes it shuts the read side down: this then ends.)
            let next = match pending.take() {
                Some(m) => m,
                None => reader.next(stream).await,
            };
            self.outbox.heard();
            let keep_going = match next {
                Ok(None) => {
                    self.outbox.stop(Stop::Quit);
                    break;
                }
                // Boxed: the connection's future stays small while it waits (the work of one
                // frame is allocated only while it is done).
                Ok(Some(Incoming::Text(t))) => Box::pin(self.on_payload(t)).await,
                Ok(Some(Incoming::Binary(b))) => match Text::new(b) {
                    Ok(t) => Box::pin(self.on_payload(t)).await,
                    Err(_) => {
                        Box::pin(self.reply_error(
                            ResponseCode::NotUtf8,
                            "the frame is not UTF-8 text; send the JSON as UTF-8".into(),
                        ))
                        .await
                    }
                },
                Ok(Some(Incoming::Ping(p))) => {
                    let _ = self.outbox.try_push(Out {
                        frame: Frame::Pong(p),
                        counted: 0,
                        token: None,
                    });
                    true
                }
                Ok(Some(Incoming::Pong)) => true,
                Ok(Some(Incoming::Close(c))) => {
                    // Answer with the peer's code (RFC 6455 5.5.1), then stop.
                    let code = c.map_or(close::NORMAL, |(code, _)| code);
                    self.outbox.stop(Stop::Close {
                        code,
                        reason: "",
                        drain: false,
                    });
                    break;
                }
                Err(ws::ReadError::TooBig { size, max }) => {
                    framing_lost = true;
                    self.shared
                        .stats
                        .rejected_frames
                        .fetch_add(1, Ordering::Relaxed);
                    info!(
                        conn = self.id,
                        "frame of {size} bytes over the {max}-byte limit: closing (1009)"
                    );
                    let frame = reply::error(
                        ResponseCode::MessageTooLarge,
                        format!(
                            "the frame is {size} bytes; the broker accepts at most {max} \
                             (server.max_message_bytes)"
                        ),
                        None,
                    );
                    Box::pin(self.reply(frame)).await;
                    // Closed once the replies before it, and it, are queued.
                    self.replies.close(Some(Stop::Close {
                        code: close::SIZE,
                        reason: "message too big",
                        drain: true,
                    }));
                    false
                }
                Err(e @ ws::ReadError::BadUtf8) => {
                    debug!("{e}");
                    self.replies.close(Some(Stop::Close {
                        code: close::INVALID,
                        reason: "text frame is not valid UTF-8",
                        drain: true,
                    }));
                    false
                }
                Err(e @ ws::ReadError::Protocol(_)) => {
                    framing_lost = true;
                    debug!("{e}");
                    self.outbox.stop(Stop::Close {
                        code: close::PROTOCOL,
                        reason: "WebSocket protocol error",
                        drain: false,
                    });
                    false
                }
                Err(e @ ws::ReadError::Io(_)) => {
                    debug!("read error: {e}");
                    self.outbox.stop(Stop::Quit);
                    break;
                }
            };
            if !keep_going {
                // A close is on its way: read and drop what the peer still sends (up to its
                // close answer) until the writer is done and stops reading.
                Box::pin(drop_the_rest(stream, &mut reader, framing_lost)).await;
                break;
            }
        }
        life.reader_done();
    }

    /// Handles one client frame. Returns false when the connection should stop reading.
    async fn on_payload(&mut self, payload: Text) -> bool {
        let shared = Arc::clone(&self.shared);
        let stats = &shared.stats;
        let frame = match parse_client_frame(payload.as_str().as_bytes()) {
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
        let engine = &shared.engine;
        match frame.command {
            Command::Ping => {
                let r = match engine.store() {
                    Some(st) => reply::ping_with_storage(time::now_timestamp(), st.health()),
                    None => reply::connect(ResponseCode::Accepted, time::now_timestamp()),
                };
                self.reply(r).await
            }
            Command::Ack => {
                let ids: Vec<&str> = frame.acks.iter().map(|k| k.as_ref()).collect();
                engine.ack(self.id, &ids);
                true
            }
            Command::ReceiveMessage => {
                let Some(channel) = frame.channel.as_deref() else {
                    return true;
                };
                if let Some(refusal) = self.forbidden(Action::Receive, channel) {
                    return self.reply_error(ResponseCode::Forbidden, refusal).await;
                }
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
                    let st = &shared.config.storage;
                    engine.subscribe(
                        channel,
                        Subscriber {
                            conn: self.id,
                            outbox: Arc::clone(&self.outbox),
                            ack: frame.ack,
                            window: frame.window.unwrap_or(st.window).min(st.max_window),
                        },
                    );
                    if self.subscriptions.is_empty() {
                        self.subscriptions.reserve_exact(1);
                    }
                    self.subscriptions.push(channel.into());
                    debug!(channel, "receiving");
                    if let Some(sms) = &shared.sms {
                        if channel == sms.config().jobs_channel {
                            sms.agent_online(&self.user, self.id);
                        }
                    }
                }
                true
            }
            Command::SendMessage => {
                let Some(channel) = frame.channel.as_deref() else {
                    return true;
                };
                if let Some(refusal) = self.forbidden(Action::Send, channel) {
                    return self.reply_error(ResponseCode::Forbidden, refusal).await;
                }
                if !self.v2 && !self.subscriptions.is_empty() {
                    // Legacy role rule: a receiver that sends becomes a sender.
                    self.unsubscribe_all();
                }
                // A user over `messages_per_second_per_user` is slowed down here (its frames
                // are read more slowly), not refused.
                shared.guard.pace_user(&self.user).await;
                stats.messages_in.fetch_add(1, Ordering::Relaxed);
                let limit = frame
                    .number_of_receiver
                    .unwrap_or(shared.config.server.number_of_receiver);
                let message_id = shared.message_ids.next();
                let (ids, omitted) = item_ids(&frame.items, &message_id);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let durable = engine.store().is_some();
                let report = (frame.report && durable).then(|| Report {
                    to: Arc::downgrade(&self.outbox),
                    ids: ids.clone(),
                });
                let result = SendResult {
                    message_id: message_id.clone(),
                    channel: channel.to_owned(),
                    receivers: 0,
                    ids,
                    ids_omitted: omitted,
                    stored: None,
                    reason: None,
                };
                if let Some(sms) = &shared.sms {
                    // Tracked before it is routed: a status event can never come first.
                    let c = sms.config();
                    if channel == c.jobs_channel {
                        sms.track_jobs(&self.user, &message_id, payload.as_str())
                            .await;
                    } else if channel == c.status_channel || channel == c.inbox_channel {
                        let recorded = if channel == c.status_channel {
                            sms.ingest(&self.user, payload.as_str()).await
                        } else {
                            sms.ingest_inbox(&self.user, payload.as_str()).await
                        };
                        if let Err(e) = recorded {
                            // Not recorded: refused, so that the agent keeps the events and
                            // sends them again.
                            tracing::warn!("SMS service: {channel} frame not recorded: {e}");
                            let refused = crate::delivery::Outcome {
                                code: ResponseCode::StorageUnavailable,
                                receivers: 0,
                                stored: Some(false),
                                reason: Some(format!(
                                    "the SMS service cannot record this now: {e}"
                                )),
                            };
                            return self.reply(send_result(refused, result)).await;
                        }
                    }
                }
                let publish = Publish {
                    sender: self.id,
                    channel,
                    message_id,
                    frame: payload.clone(),
                    limit,
                    expires_at: frame.expiry(now),
                    report,
                };
                let accepted = engine.publish(publish).await;
                if let (Accepted::Done(o), true) = (&accepted, self.replies.is_empty()) {
                    // Nothing waits before it: straight to the queue.
                    let text = send_result(o.clone(), result);
                    let _ = self.outbox.push(Out::text(Bytes::from(text))).await;
                    return true;
                }
                self.replies
                    .push(Pending::Send(Box::new((accepted, result))))
                    .await;
                true
            }
        }
    }

    /// Queues a reply, after those still waiting. Always true: a client that can no longer
    /// take replies (it closed its side) still has the frames it sent handled.
    async fn reply(&self, text: String) -> bool {
        // Waiting here is the sender's back-pressure: a client that does not read its replies
        // stops being read.
        if self.replies.is_empty() {
            let _ = self.outbox.push(Out::text(Bytes::from(text))).await;
        } else {
            self.replies.push(Pending::Ready(text)).await;
        }
        true
    }

    /// Why the user may not `action` on `channel` (`[permissions]`), logged; None if it may.
    fn forbidden(&self, action: Action, channel: &str) -> Option<String> {
        if self.shared.auth.allows(&self.user, action, channel) {
            return None;
        }
        info!(
            conn = self.id, user = %self.user, channel,
            "refused: the user may not {} this channel ([permissions])",
            action.words()
        );
        Some(format!(
            "user {:?} may not {} channel {channel:?}: see [permissions] in the broker config",
            &*self.user,
            action.words()
        ))
    }

    async fn reply_error(&self, code: ResponseCode, reason: String) -> bool {
        self.reply(reply::error(code, reason, None)).await
    }

    fn unsubscribe_all(&mut self) {
        if let Some(sms) = &self.shared.sms {
            if self
                .subscriptions
                .iter()
                .any(|c| **c == *sms.config().jobs_channel)
            {
                sms.agent_offline(self.id);
            }
        }
        for c in self.subscriptions.drain(..) {
            self.shared.engine.unsubscribe(&c, self.id);
        }
    }
}

/// One id per item, in order: the item's own, or `<message_id>.<index>`. When they would take
/// more than [`MAX_IDS_BYTES`], none are listed and their count is returned instead.
fn item_ids(
    items: &[wsmb_protocol::client::Item<'_>],
    message_id: &str,
) -> (Vec<String>, Option<u64>) {
    let mut bytes = 0;
    for (i, item) in items.iter().enumerate() {
        bytes += 4 + match &item.id {
            ItemId::Given(s) => s.len(),
            ItemId::Missing => message_id.len() + 1 + digits(i),
        };
        if bytes > MAX_IDS_BYTES {
            return (Vec::new(), Some(items.len() as u64));
        }
    }
    let ids = items
        .iter()
        .enumerate()
        .map(|(i, item)| match &item.id {
            ItemId::Given(s) => s.to_string(),
            ItemId::Missing => format!("{message_id}.{i}"),
        })
        .collect();
    (ids, None)
}

fn digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle connection's cost is mostly its task; its future must stay small (the budget
    /// for a whole idle connection is 4 KiB; see docs/benchmarks.md).
    #[tokio::test]
    async fn the_future_of_a_connection_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut cfg = crate::Config::default();
        cfg.storage.backend = crate::config::Backend::Memory;
        let stats = Arc::new(crate::stats::Stats::default());
        let token = tokio_util::sync::CancellationToken::new();
        let engine = crate::delivery::Engine::new(
            crate::delivery::DeliveryConfig::from_config(&cfg),
            None,
            Arc::clone(&stats),
            token.clone(),
        );
        let (table, _) = cfg.credential_sources().load().expect("no users");
        let auth = Arc::new(crate::auth::Authenticator::new(table, Default::default()));
        let shared = Shared::new(Arc::new(cfg), auth, engine, stats, token, None);
        let admission = shared.guard.admit(addr.ip()).expect("admitted");
        let f = handle(c, addr, shared, 1, admission);
        let size = std::mem::size_of_val(&f);
        assert!(size <= 2600, "the connection future is {size} bytes");
    }
}

//! The HTTP SMS API under `/3rdparty/v1` (the shape of SMS Gateway for Android's API, so that
//! its official clients work against the broker): one request per connection, read with the
//! same bounded head reader as the WebSocket upgrade, its body bounded by `sms.max_body_bytes`,
//! HTTP Basic auth against the broker's users, JSON in and out, errors as
//! `{"message": "..."}`. This is the session layer of the API: what a request does is the SMS
//! service's business ([`crate::sms`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use serde_json::{Value, json};
use tracing::debug;

use crate::auth::permissions::Action;
use crate::config::API_PREFIX;
use crate::http::{self, RequestHead};
use crate::sms::{ApiError, ListFilter, Service, model};
use crate::state::Shared;
use crate::ws::Socket;

/// A response: status, extra headers, JSON body (none for 204).
struct Reply {
    status: u16,
    extra: String,
    body: Option<Value>,
}

impl Reply {
    fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            extra: String::new(),
            body: Some(body),
        }
    }

    fn error(e: ApiError) -> Reply {
        let mut r = Reply::json(e.status, json!({"message": e.message}));
        if let Some(s) = e.retry_after {
            r.extra = format!("Retry-After: {s}\r\n");
        }
        r
    }

    fn bytes(&self, head_only: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            202 => "Accepted",
            204 => "No Content",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            409 => "Conflict",
            411 => "Length Required",
            413 => "Payload Too Large",
            429 => "Too Many Requests",
            503 => "Service Unavailable",
            _ => "Error",
        };
        match &self.body {
            None => format!(
                "HTTP/1.1 {} {reason}\r\nConnection: close\r\n{}\r\n",
                self.status, self.extra
            )
            .into_bytes(),
            Some(b) => http::response(
                self.status,
                reason,
                "application/json; charset=utf-8",
                &self.extra,
                &b.to_string(),
                head_only,
            ),
        }
    }
}

/// Serves one API request on `stream` and closes it.
pub async fn serve<S: Socket>(
    mut stream: S,
    head: RequestHead,
    leftover: BytesMut,
    client: IpAddr,
    shared: &Arc<Shared>,
) {
    let started = Instant::now();
    let (reply, user) = answer(&mut stream, &head, leftover, client, shared).await;
    if let Some(sms) = &shared.sms {
        sms.count_request(reply.status);
    }
    debug!(
        method = %head.method, path = %head.path, status = reply.status,
        user = user.as_deref().unwrap_or("-"), elapsed = ?started.elapsed(),
        "HTTP API request"
    );
    let bytes = reply.bytes(head.method == "HEAD");
    let _ = tokio::time::timeout(
        shared.config.server.write_timeout,
        http::send_and_close(&mut stream, &bytes),
    )
    .await;
}

async fn answer<S: Socket>(
    stream: &mut S,
    head: &RequestHead,
    leftover: BytesMut,
    client: IpAddr,
    shared: &Arc<Shared>,
) -> (Reply, Option<String>) {
    let Some(sms) = shared.sms.as_ref() else {
        return (
            Reply::error(ApiError {
                status: 404,
                message: "the SMS API is off (sms.enabled = false)".into(),
                retry_after: None,
            }),
            None,
        );
    };
    if let Err(wait) = shared.guard.http_request(client) {
        return (
            Reply::error(ApiError {
                status: 429,
                message: format!(
                    "too many requests from this address (server.http_requests_per_second = \
                     {}); retry after the time Retry-After gives",
                    shared.config.server.http_requests_per_second
                ),
                retry_after: Some(wait.as_secs().max(1)),
            }),
            None,
        );
    }
    let login = crate::auth::login(
        &shared.auth,
        &shared.guard,
        head.authorization.as_deref(),
        client,
    )
    .await;
    let user = match login {
        crate::auth::Login::User(u) => u,
        crate::auth::Login::Missing => {
            let mut r = Reply::json(
                401,
                json!({"message": "HTTP Basic credentials of a broker user are required"}),
            );
            r.extra = "WWW-Authenticate: Basic realm=\"wsmb\"\r\n".into();
            return (r, None);
        }
        crate::auth::Login::Failed(user) => {
            let mut r = Reply::json(401, json!({"message": "wrong user name or password"}));
            r.extra = "WWW-Authenticate: Basic realm=\"wsmb\"\r\n".into();
            return (r, Some(user));
        }
    };
    let body = match read_body(stream, head, leftover, sms, shared).await {
        Ok(b) => b,
        Err(e) => return (Reply::error(e), Some(user)),
    };
    let route = head
        .path
        .strip_prefix(API_PREFIX)
        .unwrap_or("")
        .trim_end_matches('/');
    let mut segments: Vec<&str> = route.split('/').filter(|s| !s.is_empty()).collect();
    // SMSGate serves `/message` as an alias of `/messages` (its JS client, 3.x, uses it).
    if segments.first() == Some(&"message") {
        segments[0] = "messages";
    }
    let method = if head.method == "HEAD" {
        "GET"
    } else {
        head.method.as_str()
    };
    if let Err(e) = permitted(shared, &user, method, &segments) {
        return (Reply::error(e), Some(user));
    }
    let query = http::query_pairs(&head.query);
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let r = match (method, segments.as_slice()) {
        ("POST", ["messages"]) => {
            let skip = q("skipPhoneValidation").is_some_and(|v| v == "true" || v == "1");
            match parse::<model::SendRequest>(&body) {
                Ok(req) => sms
                    .send(&user, shared.message_ids.next(), req, skip)
                    .await
                    .map(|(st, v)| Reply::json(st, v)),
                Err(e) => Err(e),
            }
        }
        ("GET", ["messages"]) => match list_filter(&q) {
            Ok(f) => sms
                .list(&user, &f)
                .await
                .map(|v| Reply::json(200, json!(v))),
            Err(e) => Err(e),
        },
        ("GET", ["messages", id]) => match sms.get(&user, &http::decode_component(id)).await {
            Ok(Some(m)) => Ok(Reply::json(200, sms.view(&m))),
            Ok(None) => Err(not_found("message", id)),
            Err(e) => Err(e),
        },
        ("DELETE", ["messages", id]) => {
            sms.cancel(&user, &http::decode_component(id))
                .await
                .map(|_| Reply {
                    status: 204,
                    extra: String::new(),
                    body: None,
                })
        }
        ("GET", ["webhooks"]) => sms
            .list_webhooks(&user)
            .await
            .map(|v| Reply::json(200, json!(v))),
        ("POST", ["webhooks"]) => match parse::<model::WebhookRequest>(&body) {
            Ok(req) if req.event == "sms:received" => {
                match allow(shared, &user, Action::Receive, &sms.config().inbox_channel) {
                    Ok(()) => sms
                        .add_webhook(&user, req)
                        .await
                        .map(|v| Reply::json(201, v)),
                    Err(e) => Err(e),
                }
            }
            Ok(req) => sms
                .add_webhook(&user, req)
                .await
                .map(|v| Reply::json(201, v)),
            Err(e) => Err(e),
        },
        ("DELETE", ["webhooks", id]) => sms
            .delete_webhook(&user, &http::decode_component(id))
            .await
            .map(|_| Reply {
                status: 204,
                extra: String::new(),
                body: None,
            }),
        ("GET", ["devices"]) => Ok(Reply::json(200, json!(sms.devices()))),
        ("GET", ["health"]) | ("GET", ["health", "ready"]) => {
            let h = sms.health().await;
            let st = if h["status"] == "fail" { 503 } else { 200 };
            Ok(Reply::json(st, h))
        }
        ("GET", ["health", "live"]) => Ok(Reply::json(200, json!({"status": "pass"}))),
        ("GET", ["inbox"]) => match list_filter(&q) {
            Ok(f) => sms.inbox(&f).await.map(|v| Reply::json(200, json!(v))),
            Err(e) => Err(e),
        },
        (_, ["messages"] | ["messages", _] | ["webhooks"] | ["webhooks", _] | ["devices"]) => {
            Err(ApiError {
                status: 405,
                message: format!("{} is not allowed on {}", head.method, head.path),
                retry_after: None,
            })
        }
        _ => Err(ApiError {
            status: 404,
            message: format!(
                "no such endpoint: {} {}; see docs/http-api.md",
                head.method, head.path
            ),
            retry_after: None,
        }),
    };
    (r.unwrap_or_else(Reply::error), Some(user))
}

/// What a request needs of `[permissions]`: sending SMS (and cancelling them) is sending on the
/// jobs channel; message states and webhooks are receiving on the status channel; the inbox
/// is receiving on the inbox channel; devices and health need only a user.
fn permitted(shared: &Shared, user: &str, method: &str, segments: &[&str]) -> Result<(), ApiError> {
    let Some(sms) = shared.sms.as_ref() else {
        return Ok(());
    };
    let c = sms.config();
    let (action, channel) = match (method, segments.first().copied()) {
        ("POST" | "DELETE", Some("messages")) => (Action::Send, &c.jobs_channel),
        (_, Some("messages" | "webhooks")) => (Action::Receive, &c.status_channel),
        (_, Some("inbox")) => (Action::Receive, &c.inbox_channel),
        _ => return Ok(()),
    };
    allow(shared, user, action, channel)
}

/// 403 unless `user` may `action` on `channel`; the refusal is logged.
fn allow(shared: &Shared, user: &str, action: Action, channel: &str) -> Result<(), ApiError> {
    if shared.auth.allows(user, action, channel) {
        return Ok(());
    }
    tracing::info!(
        user,
        channel,
        "HTTP API: refused: the user may not {} this channel ([permissions])",
        action.words()
    );
    Err(ApiError {
        status: 403,
        message: format!(
            "user {user:?} may not {} channel {channel:?}, which this needs: see [permissions] in \
             the broker config",
            action.words()
        ),
        retry_after: None,
    })
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError {
        status: 404,
        message: format!("no {what} with id {:?}", http::decode_component(id)),
        retry_after: None,
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad("the request has no JSON body"));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the JSON body is not valid: {e}")))
}

async fn read_body<S: Socket>(
    stream: &mut S,
    head: &RequestHead,
    leftover: BytesMut,
    sms: &Service,
    shared: &Shared,
) -> Result<BytesMut, ApiError> {
    if head.transfer_encoding {
        return Err(ApiError {
            status: 411,
            message: "chunked request bodies are not read: send Content-Length".into(),
            retry_after: None,
        });
    }
    let len = match head.content_length {
        None => return Ok(BytesMut::new()),
        Some(Err(())) => return Err(ApiError::bad("Content-Length is not a number")),
        Some(Ok(n)) => n,
    };
    let max = sms.config().max_body_bytes;
    if len > max {
        return Err(ApiError {
            status: 413,
            message: format!(
                "the body has {len} bytes; at most {max} are read (sms.max_body_bytes)"
            ),
            retry_after: None,
        });
    }
    let limit = shared.config.server.handshake_timeout;
    match tokio::time::timeout(limit, http::read_body(stream, leftover, len)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => Err(ApiError::bad(format!("the body could not be read: {e}"))),
        Err(_) => Err(ApiError {
            status: 408,
            message: format!("the body did not arrive within {limit:?}"),
            retry_after: None,
        }),
    }
}

fn list_filter<'a>(q: &impl Fn(&str) -> Option<&'a str>) -> Result<ListFilter, ApiError> {
    let num = |k: &str, default: usize| -> Result<usize, ApiError> {
        match q(k) {
            None | Some("") => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| ApiError::bad(format!("{k} = {v:?} is not a whole number"))),
        }
    };
    let time = |k: &str| -> Result<Option<i64>, ApiError> {
        match q(k) {
            None | Some("") => Ok(None),
            Some(v) => model::parse_iso(v)
                .map(Some)
                .ok_or_else(|| ApiError::bad(format!("{k} = {v:?} is not an ISO 8601 time"))),
        }
    };
    let state = match q("state") {
        None | Some("") => None,
        Some(s) => Some(model::State::parse(s).ok_or_else(|| {
            ApiError::bad(format!(
                "state = {s:?} is not one of Pending, Processed, Sent, Delivered, Failed, \
                 Cancelled"
            ))
        })?),
    };
    let limit = num("limit", 50)?;
    if limit == 0 || limit > 500 {
        return Err(ApiError::bad(format!("limit = {limit} must be 1 to 500")));
    }
    Ok(ListFilter {
        state,
        from: time("from")?,
        to: time("to")?,
        limit,
        offset: num("offset", 0)?,
        oldest_first: q("sort") == Some("created_at"),
    })
}

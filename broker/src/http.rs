//! The HTTP/1.1 side of the broker's port: reading one request head, routing it (WebSocket
//! upgrade, `/healthz`, errors) and writing plain responses.
//!
//! Written against `httparse` rather than a full HTTP server because the broker answers exactly
//! one request per connection and must control the upgrade response to the byte: legacy PHP
//! clients read it with a single 1024-byte `fread`, and the `connect` frame must not share that
//! read (see `conn`).

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest accepted request head.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 64;

/// The parts of a request head the broker uses.
#[derive(Debug, Clone, Default)]
pub struct RequestHead {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The path without query string.
    pub path: String,
    /// The query string (after `?`, without it), undecoded.
    pub query: String,
    /// `X-Forwarded-For` (believed only from a trusted proxy).
    pub forwarded_for: Option<String>,
    /// `Content-Length`, when given and valid (`Some(Err)`: given but not a number).
    pub content_length: Option<Result<usize, ()>>,
    /// Whether `Transfer-Encoding` was given (chunked bodies are not read).
    pub transfer_encoding: bool,
    /// `Upgrade` header.
    pub upgrade: Option<String>,
    /// `Connection` header.
    pub connection: Option<String>,
    /// `Sec-WebSocket-Key` header.
    pub ws_key: Option<String>,
    /// `Sec-WebSocket-Version` header.
    pub ws_version: Option<String>,
    /// `Authorization` header (secret: never log it).
    pub authorization: Option<Vec<u8>>,
}

impl RequestHead {
    /// Whether the client asks for a WebSocket upgrade (`Upgrade: websocket` and `Connection`
    /// containing the `upgrade` token, both case-insensitive as RFC 6455 requires).
    pub fn wants_websocket(&self) -> bool {
        let has_token = |v: &Option<String>, token: &str| {
            v.as_deref()
                .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        };
        has_token(&self.upgrade, "websocket") && has_token(&self.connection, "upgrade")
    }
}

/// Why a request head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The peer closed before sending a complete head.
    #[error("connection closed before the request was complete")]
    Eof,
    /// The head is larger than [`MAX_HEAD_BYTES`] or has too many headers.
    #[error("request head too large")]
    TooLarge,
    /// Not HTTP/1.x.
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    /// Socket error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads one request head. Returns it with whatever bytes followed it (a client may send its
/// first WebSocket frame right behind the upgrade request).
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(RequestHead, BytesMut), HeadError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
        let n = stream.read_buf(&mut buf).await?;
        if n == 0 {
            return Err(HeadError::Eof);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(len)) => {
                let head = extract(&req);
                let rest = buf.split_off(len);
                return Ok((head, rest));
            }
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(e) => return Err(HeadError::Malformed(e.to_string())),
        }
    }
}

fn extract(req: &httparse::Request<'_, '_>) -> RequestHead {
    let target = req.path.unwrap_or("/");
    let target = target.split('#').next().unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut head = RequestHead {
        method: req.method.unwrap_or("").to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        ..RequestHead::default()
    };
    for h in req.headers.iter() {
        let text = || String::from_utf8_lossy(h.value).trim().to_owned();
        if h.name.eq_ignore_ascii_case("upgrade") {
            head.upgrade = Some(text());
        } else if h.name.eq_ignore_ascii_case("connection") {
            head.connection = Some(text());
        } else if h.name.eq_ignore_ascii_case("sec-websocket-key") {
            head.ws_key = Some(text());
        } else if h.name.eq_ignore_ascii_case("sec-websocket-version") {
            head.ws_version = Some(text());
        } else if h.name.eq_ignore_ascii_case("authorization") {
            head.authorization = Some(h.value.to_vec());
        } else if h.name.eq_ignore_ascii_case("x-forwarded-for") {
            head.forwarded_for = Some(text());
        } else if h.name.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(text().parse::<usize>().map_err(|_| ()));
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            head.transfer_encoding = true;
        }
    }
    head
}

/// Reads a request body of `len` bytes (some may already be in `have`).
pub async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut have: BytesMut,
    len: usize,
) -> std::io::Result<BytesMut> {
    while have.len() < len {
        have.reserve(len - have.len());
        if stream.read_buf(&mut have).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    have.truncate(len);
    Ok(have)
}

/// Percent-decodes a query component (`+` is a space).
pub fn decode_component(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `key=value` pairs of a query string, decoded.
pub fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode_component(k), decode_component(v))
        })
        .collect()
}

/// Decodes `Authorization: Basic base64(user:password)`; the scheme is case-insensitive.
pub fn basic_credentials(value: &[u8]) -> Option<(String, String)> {
    use base64::Engine as _;
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// The `101 Switching Protocols` response, headers spelt as the legacy broker (Ratchet) sent
/// them.
pub fn switching_protocols(accept_key: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept_key}\r\n\r\n"
    )
}

/// A complete response with a body; the connection is closed after it.
pub fn response(
    status: u16,
    reason: &str,
    content_type: &str,
    extra: &str,
    body: &str,
    head_only: bool,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// A plain-text error response.
pub fn text_response(
    status: u16,
    reason: &str,
    extra: &str,
    body: &str,
    head_only: bool,
) -> Vec<u8> {
    let body = format!("{body}\n");
    response(
        status,
        reason,
        "text/plain; charset=utf-8",
        extra,
        &body,
        head_only,
    )
}

/// Writes `bytes` and closes the write side.
pub async fn send_and_close<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_the_legacy_php_request() {
        let req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\npragma: no-cache\r\nUpgrade: WebSocket\r\n\
                    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                    Sec-WebSocket-Version: 13\r\nAuthorization: Basic cWE6NGx0MEAxMjM0\r\n\r\nEXTRA";
        let mut r = &req[..];
        let (head, rest) = read_head(&mut r).await.expect("head");
        assert_eq!(head.method, "GET");
        assert_eq!(head.path, "/");
        assert!(head.wants_websocket());
        assert_eq!(head.ws_version.as_deref(), Some("13"));
        assert_eq!(&rest[..], b"EXTRA");
        let (u, p) =
            basic_credentials(head.authorization.as_deref().expect("auth")).expect("basic");
        assert_eq!((u.as_str(), p.as_str()), ("qa", "4lt0@1234"));
    }

    #[tokio::test]
    async fn oversized_and_truncated_heads() {
        let big = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        let mut r = big.as_bytes();
        assert!(matches!(read_head(&mut r).await, Err(HeadError::TooLarge)));
        let mut r = &b"GET / HTTP/1.1\r\nHost: x\r\n"[..];
        assert!(matches!(read_head(&mut r).await, Err(HeadError::Eof)));
        let mut r = &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..];
        assert!(matches!(
            read_head(&mut r).await,
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn query_strings() {
        assert_eq!(
            query_pairs("state=Sent&limit=5&to=2026-12-02T10%3A00%3A00%2B00%3A00&x&a+b=%zz%"),
            vec![
                ("state".into(), "Sent".into()),
                ("limit".into(), "5".into()),
                ("to".into(), "2026-12-02T10:00:00+00:00".into()),
                ("x".into(), "".into()),
                ("a b".into(), "%zz%".into()),
            ]
        );
        assert_eq!(decode_component("%C3%A9%"), "é%");
    }

    #[test]
    fn basic_auth_variants() {
        assert!(basic_credentials(b"basic cWE6NGx0MEAxMjM0").is_some());
        assert!(basic_credentials(b"BASIC  cWE6NGx0MEAxMjM0 ").is_some());
        assert!(basic_credentials(b"Bearer cWE6NGx0MEAxMjM0").is_none());
        assert!(basic_credentials(b"Basic !!!").is_none());
        // "nocolon" base64
        assert!(basic_credentials(b"Basic bm9jb2xvbg==").is_none());
        // password may contain ':'
        let (u, p) = basic_credentials(b"Basic dTpwOnE=").expect("u:p:q");
        assert_eq!((u.as_str(), p.as_str()), ("u", "p:q"));
    }

    #[test]
    fn upgrade_detection_is_token_based() {
        let mut h = RequestHead {
            upgrade: Some("websocket".into()),
            connection: Some("keep-alive, Upgrade".into()),
            ..Default::default()
        };
        assert!(h.wants_websocket());
        h.connection = Some("keep-alive".into());
        assert!(!h.wants_websocket());
    }
}

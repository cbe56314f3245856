//! RFC 6455 framing for the broker's side of a connection: reading client frames, writing
//! server frames. No broker semantics live here (see `conn` for the session, `outbox` for what
//! is queued).
//!
//! Why in-house rather than tungstenite (which the agent, the bench and the tests use as
//! clients): tungstenite allocates its read buffer (`read_buffer_size`) for the life of a
//! connection and never shrinks its write buffer, so every idle connection holds tens of KiB;
//! the broker's budget for an idle connection is 4 KiB in all. Here
//!
//! - a connection holds **no buffer while idle**: the read buffer is taken when bytes arrive and
//!   given back once every complete frame in it has been handed on; frames are written straight
//!   from the queued payloads (vectored writes), so there is no write buffer at all;
//! - every write has a **deadline** (the caller's), and no frame is ever refused for its size;
//! - the limits are the broker's: a message over `max_message` is refused on its header, before
//!   its payload is read.
//!
//! What a server must check (RFC 6455 section 5) is checked: client frames masked, reserved bits
//! clear (no extension is negotiated), known opcodes, control frames unfragmented and at most
//! 125 bytes, continuations only inside a fragmented message, text and close reasons valid
//! UTF-8, close codes valid. Violations end the connection with 1002, bad UTF-8 with 1007, size
//! with 1009 (the caller sends the close frame).

use std::io;
use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// What a session reads from and writes to: a TCP connection, or for TLS the local end of a
/// socket pair whose other end a TLS task serves (see `tls`). Reading and writing go through
/// `&self` (readiness, then a non-blocking try), so the session's reader and writer share it.
pub trait Socket:
    AsyncRead + AsyncWrite + Unpin + Send + Sync + std::os::fd::AsFd + 'static
{
    /// Waits until a read may make progress.
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;
    /// Reads what is there into `buf`, or `WouldBlock`.
    fn try_read_buf<B: BufMut>(&self, buf: &mut B) -> io::Result<usize>;
    /// Reads what is there into `buf`, or `WouldBlock`.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Waits until a write may make progress.
    fn writable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;
    /// Writes what fits of `bufs`, or `WouldBlock`.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Disables Nagle's algorithm where there is one.
    fn set_nodelay(&self, on: bool) -> io::Result<()>;
}

macro_rules! socket_impl {
    ($t:ty, $nodelay:expr) => {
        impl Socket for $t {
            fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
                <$t>::readable(self)
            }
            fn try_read_buf<B: BufMut>(&self, buf: &mut B) -> io::Result<usize> {
                <$t>::try_read_buf(self, buf)
            }
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$t>::try_read(self, buf)
            }
            fn writable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
                <$t>::writable(self)
            }
            fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                <$t>::try_write_vectored(self, bufs)
            }
            fn set_nodelay(&self, on: bool) -> io::Result<()> {
                let f: fn(&$t, bool) -> io::Result<()> = $nodelay;
                f(self, on)
            }
        }
    };
}
socket_impl!(tokio::net::TcpStream, |s, on| s.set_nodelay(on));
socket_impl!(tokio::net::UnixStream, |_, _| Ok(()));

/// Most payload bytes of a control frame (RFC 6455 5.5).
pub const MAX_CONTROL: usize = 125;
/// Size of the read buffer taken when bytes arrive and no frame is in progress.
const READ_CHUNK: usize = 16 * 1024;
/// Payloads smaller than this are copied out of the read buffer, so that a small message queued
/// for a slow receiver does not keep a whole read buffer alive.
const COPY_BELOW: usize = 4 * 1024;
/// Most slices handed to one vectored write (Linux's IOV_MAX is 1024).
const MAX_IOV: usize = 512;

/// Close codes the broker sends.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Going away (shutdown).
    pub const AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL: u16 = 1002;
    /// Invalid frame payload data (bad UTF-8).
    pub const INVALID: u16 = 1007;
    /// Policy violation (rejected credentials, slow consumer).
    pub const POLICY: u16 = 1008;
    /// Message too big.
    pub const SIZE: u16 = 1009;
}

/// UTF-8 text in a shared buffer, validated once (`bytestring`: no check again on each use).
#[derive(Clone, PartialEq, Eq)]
pub struct Text(bytestring::ByteString);

impl Text {
    /// Validates `b`.
    pub fn new(b: Bytes) -> Result<Text, Bytes> {
        match bytestring::ByteString::try_from(b.clone()) {
            Ok(s) => Ok(Text(s)),
            Err(_) => Err(b),
        }
    }

    /// From a string (copied).
    pub fn from_string(s: String) -> Text {
        Text(bytestring::ByteString::from(s))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The bytes.
    pub fn bytes(&self) -> &Bytes {
        self.0.as_bytes()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A text message (all its fragments), valid UTF-8.
    Text(Text),
    /// A binary message (all its fragments).
    Binary(Bytes),
    /// A ping; answer with a pong carrying the same payload.
    Ping(Bytes),
    /// A pong.
    Pong,
    /// A close frame: its code and reason, if it had any.
    Close(Option<(u16, String)>),
}

/// Why reading stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// A violation of RFC 6455: close with 1002.
    #[error("WebSocket protocol error: {0}")]
    Protocol(&'static str),
    /// A text message or close reason that is not UTF-8: close with 1007.
    #[error("text that is not valid UTF-8")]
    BadUtf8,
    /// A message over the limit: close with 1009.
    #[error("message of {size} bytes over the {max}-byte limit")]
    TooBig {
        /// Its size (of the message so far, with this frame).
        size: u64,
        /// The limit.
        max: usize,
    },
}

impl ReadError {
    /// The close code to send for this error (`None`: the socket is gone).
    pub fn close_code(&self) -> Option<u16> {
        match self {
            ReadError::Io(_) => None,
            ReadError::Protocol(_) => Some(close::PROTOCOL),
            ReadError::BadUtf8 => Some(close::INVALID),
            ReadError::TooBig { .. } => Some(close::SIZE),
        }
    }
}

/// A fragmented message being received.
struct Partial {
    binary: bool,
    data: BytesMut,
}

/// The reading side of a connection.
pub struct Reader {
    buf: BytesMut,
    max_message: usize,
    partial: Option<Partial>,
}

impl Reader {
    /// A reader for messages of at most `max_message` bytes, starting with bytes already read
    /// (those behind the HTTP request head).
    pub fn new(max_message: usize, leftover: &[u8]) -> Reader {
        Reader {
            buf: BytesMut::from(leftover),
            max_message,
            partial: None,
        }
    }

    /// Whether no buffer is held.
    pub fn is_idle(&self) -> bool {
        self.buf.capacity() == 0 && self.partial.is_none()
    }

    /// The next message or control frame; `Ok(None)` when the peer closed the TCP connection.
    /// Cancel-safe: the only await is for readability.
    pub async fn next<S: Socket>(&mut self, stream: &S) -> Result<Option<Incoming>, ReadError> {
        loop {
            if let Some(m) = self.parse()? {
                return Ok(Some(m));
            }
            if self.buf.is_empty() && self.partial.is_none() {
                // Nothing in progress: hold no buffer while waiting.
                self.buf = BytesMut::new();
            }
            stream.readable().await?;
            if self.buf.capacity() - self.buf.len() < 512 {
                self.buf.reserve(READ_CHUNK);
            }
            match stream.try_read_buf(&mut self.buf) {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads and drops bytes until the peer closes or the read side is shut down: for a
    /// connection whose framing can no longer be trusted (a protocol error, an oversized
    /// message), so that closing it does not reset the peer before it read our close frame.
    pub async fn discard<S: Socket>(&mut self, stream: &S) {
        self.buf = BytesMut::new();
        self.partial = None;
        loop {
            if stream.readable().await.is_err() {
                return;
            }
            let mut scratch = [0u8; 2048];
            match stream.try_read(&mut scratch) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }

    /// Parses one frame from the buffer; `None` when more bytes are needed (having reserved
    /// room for them).
    fn parse(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            let b = &self.buf[..];
            if b.len() < 2 {
                return Ok(None);
            }
            let fin = b[0] & 0x80 != 0;
            if b[0] & 0x70 != 0 {
                return Err(ReadError::Protocol(
                    "reserved bits set (no extension was negotiated)",
                ));
            }
            let opcode = b[0] & 0x0f;
            let masked = b[1] & 0x80 != 0;
            let len7 = b[1] & 0x7f;
            let ext = match len7 {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let head = 2 + ext + 4;
            if b.len() < 2 + ext {
                return Ok(None);
            }
            let len: u64 = match len7 {
                126 => u64::from(u16::from_be_bytes([b[2], b[3]])),
                127 => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&b[2..10]);
                    u64::from_be_bytes(a)
                }
                n => u64::from(n),
            };
            if len7 == 127 && len >> 63 != 0 {
                return Err(ReadError::Protocol("payload length with the top bit set"));
            }
            if !masked {
                return Err(ReadError::Protocol("unmasked client frame"));
            }
            let control = opcode & 0x08 != 0;
            match opcode {
                0x8..=0xa => {
                    if !fin {
                        return Err(ReadError::Protocol("fragmented control frame"));
                    }
                    if len > MAX_CONTROL as u64 {
                        return Err(ReadError::Protocol("control frame over 125 bytes"));
                    }
                }
                0x1 | 0x2 => {
                    if self.partial.is_some() {
                        return Err(ReadError::Protocol(
                            "a new message started before the fragmented one ended",
                        ));
                    }
                }
                0x0 => {
                    if self.partial.is_none() {
                        return Err(ReadError::Protocol(
                            "continuation frame without a message to continue",
                        ));
                    }
                }
                _ => return Err(ReadError::Protocol("reserved opcode")),
            }
            if !control {
                let so_far = self.partial.as_ref().map_or(0, |p| p.data.len() as u64);
                let size = so_far.saturating_add(len);
                if size > self.max_message as u64 {
                    return Err(ReadError::TooBig {
                        size,
                        max: self.max_message,
                    });
                }
            }
            let len = len as usize;
            let total = head + len;
            if self.buf.len() < total {
                self.buf.reserve(total - self.buf.len());
                return Ok(None);
            }
            let mut key = [0u8; 4];
            key.copy_from_slice(&self.buf[head - 4..head]);
            self.buf.advance(head);
            let mut payload = self.buf.split_to(len);
            unmask(&mut payload, key);
            match opcode {
                0x8 => return close_frame(&payload).map(Some),
                0x9 => return Ok(Some(Incoming::Ping(own(payload)))),
                0xa => return Ok(Some(Incoming::Pong)),
                0x1 | 0x2 if fin => {
                    let bytes = own(payload);
                    return if opcode == 0x1 {
                        Text::new(bytes)
                            .map(|t| Some(Incoming::Text(t)))
                            .map_err(|_| ReadError::BadUtf8)
                    } else {
                        Ok(Some(Incoming::Binary(bytes)))
                    };
                }
                0x1 | 0x2 => {
                    let mut data = BytesMut::with_capacity(payload.len());
                    data.extend_from_slice(&payload);
                    self.partial = Some(Partial {
                        binary: opcode == 0x2,
                        data,
                    });
                }
                _ => {
                    // continuation (checked above that a message is in progress)
                    let Some(p) = self.partial.as_mut() else {
                        return Err(ReadError::Protocol("continuation frame without a message"));
                    };
                    p.data.extend_from_slice(&payload);
                    if fin {
                        let Some(p) = self.partial.take() else {
                            return Err(ReadError::Protocol(
                                "continuation frame without a message",
                            ));
                        };
                        let bytes = p.data.freeze();
                        return if p.binary {
                            Ok(Some(Incoming::Binary(bytes)))
                        } else {
                            Text::new(bytes)
                                .map(|t| Some(Incoming::Text(t)))
                                .map_err(|_| ReadError::BadUtf8)
                        };
                    }
                }
            }
        }
    }
}

/// A payload as its own allocation when small (see [`COPY_BELOW`]).
fn own(payload: BytesMut) -> Bytes {
    if payload.len() < COPY_BELOW {
        Bytes::copy_from_slice(&payload)
    } else {
        payload.freeze()
    }
}

fn unmask(data: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(a) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Whether a close code may appear in a close frame (RFC 6455 7.4, IANA registry).
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn close_frame(payload: &[u8]) -> Result<Incoming, ReadError> {
    match payload.len() {
        0 => Ok(Incoming::Close(None)),
        1 => Err(ReadError::Protocol("close frame with a 1-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !valid_close_code(code) {
                return Err(ReadError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| ReadError::BadUtf8)?;
            Ok(Incoming::Close(Some((code, reason.to_owned()))))
        }
    }
}

/// A server frame to write.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A text frame (the payload is UTF-8: it is a [`Text`] or the broker's own JSON).
    Text(Bytes),
    /// A ping.
    Ping,
    /// A pong with the ping's payload.
    Pong(Bytes),
    /// A close frame.
    Close(u16, &'static str),
}

impl Frame {
    /// The payload length.
    pub fn len(&self) -> usize {
        match self {
            Frame::Text(b) | Frame::Pong(b) => b.len(),
            Frame::Ping => 0,
            Frame::Close(_, r) => 2 + r.len(),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A frame header (server frames are never masked): bytes and length.
fn header(opcode: u8, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x80 | opcode;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= usize::from(u16::MAX) {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// One frame laid out for a vectored write.
struct Encoded<'a> {
    head: [u8; 10],
    head_len: usize,
    body: &'a [u8],
    close: [u8; 2],
    reason: &'a [u8],
}

fn encode(f: &Frame) -> Encoded<'_> {
    let (opcode, body, close, reason): (u8, &[u8], [u8; 2], &[u8]) = match f {
        Frame::Text(b) => (0x1, b, [0; 2], &[]),
        Frame::Ping => (0x9, &[], [0; 2], &[]),
        Frame::Pong(b) => (0xa, b, [0; 2], &[]),
        Frame::Close(code, r) => (0x8, &[], code.to_be_bytes(), r.as_bytes()),
    };
    let (head, head_len) = header(opcode, f.len());
    Encoded {
        head,
        head_len,
        body,
        close,
        reason,
    }
}

/// Writes `frames` completely (vectored writes, payloads not copied). Not cancel-safe: a write
/// dropped half-way leaves a frame cut, and the connection must then be dropped.
pub async fn write_frames<'a, S: Socket, I>(stream: &S, frames: I) -> io::Result<()>
where
    I: IntoIterator<Item = &'a Frame>,
{
    let encoded: Vec<Encoded<'_>> = frames.into_iter().map(encode).collect();
    let mut parts: Vec<&[u8]> = Vec::with_capacity(encoded.len() * 2);
    for e in &encoded {
        parts.push(&e.head[..e.head_len]);
        if !e.body.is_empty() {
            parts.push(e.body);
        }
        if e.head[0] & 0x0f == 0x8 {
            parts.push(&e.close);
            if !e.reason.is_empty() {
                parts.push(e.reason);
            }
        }
    }
    write_all_vectored(stream, &parts).await
}

/// Writes every byte of `parts`, in order.
async fn write_all_vectored<S: Socket>(stream: &S, parts: &[&[u8]]) -> io::Result<()> {
    let mut i = 0; // first part not completely written
    let mut off = 0; // bytes of part i already written
    while i < parts.len() {
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity((parts.len() - i).min(MAX_IOV));
        slices.push(IoSlice::new(&parts[i][off..]));
        for p in parts.iter().skip(i + 1).take(MAX_IOV - 1) {
            slices.push(IoSlice::new(p));
        }
        stream.writable().await?;
        let mut n = match stream.try_write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        while n > 0 && i < parts.len() {
            let left = parts[i].len() - off;
            if n >= left {
                n -= left;
                i += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key` (RFC 6455 4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    use base64::Engine as _;
    use sha1::Digest as _;
    let mut h = sha1::Sha1::new();
    h.update(key);
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![first];
        let n = payload.len();
        if n < 126 {
            f.push(0x80 | n as u8);
        } else if n <= 65535 {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        f
    }

    fn parse_all(bytes: &[u8], max: usize) -> Vec<Result<Incoming, String>> {
        let mut r = Reader::new(max, bytes);
        let mut out = Vec::new();
        loop {
            match r.parse() {
                Ok(Some(m)) => out.push(Ok(m)),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn the_rfc_examples_parse() {
        // RFC 6455 5.7: a masked "Hello"
        let hello = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let got = parse_all(&hello, 100);
        assert_eq!(
            got,
            vec![Ok(Incoming::Text(Text::from_string("Hello".into())))]
        );
        // fragmented "Hel" + "lo" with a ping in between
        let mut b = masked(0x01, b"Hel");
        b.extend(masked(0x89, b"p"));
        b.extend(masked(0x80, b"lo"));
        let got = parse_all(&b, 100);
        assert_eq!(
            got,
            vec![
                Ok(Incoming::Ping(Bytes::from_static(b"p"))),
                Ok(Incoming::Text(Text::from_string("Hello".into())))
            ]
        );
    }

    #[test]
    fn lengths_of_every_form_and_a_byte_at_a_time() {
        for n in [0usize, 125, 126, 65535, 65536, 200_000] {
            let payload = vec![b'a'; n];
            let frame = masked(0x82, &payload);
            let mut r = Reader::new(1 << 20, &[]);
            let mut got = None;
            // feed in uneven pieces
            for chunk in frame.chunks(7777) {
                r.buf.extend_from_slice(chunk);
                if let Some(m) = r.parse().expect("valid") {
                    got = Some(m);
                }
            }
            assert_eq!(got, Some(Incoming::Binary(Bytes::from(payload))), "{n}");
        }
        let frame = masked(0x81, "é😀".as_bytes());
        let mut r = Reader::new(100, &[]);
        let mut got = None;
        for b in &frame {
            r.buf.extend_from_slice(&[*b]);
            if let Some(m) = r.parse().expect("valid") {
                got = Some(m);
            }
        }
        assert_eq!(got, Some(Incoming::Text(Text::from_string("é😀".into()))));
    }

    #[test]
    fn violations_are_named() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x81, 0x05, b'h', b'e', b'l', b'l', b'o'], "unmasked"),
            (masked(0xc1, b"x"), "reserved bits"),
            (masked(0x83, b"x"), "reserved opcode"),
            (masked(0x8b, b"x"), "reserved opcode"),
            (masked(0x09, b"x"), "fragmented control"),
            (masked(0x89, &[0u8; 126]), "over 125"),
            (masked(0x80, b"x"), "continuation"),
            (
                [masked(0x01, b"a"), masked(0x81, b"b")].concat(),
                "new message",
            ),
            (masked(0x88, &[3]), "1-byte"),
            (masked(0x88, &999u16.to_be_bytes()), "invalid close code"),
            (masked(0x88, &1005u16.to_be_bytes()), "invalid close code"),
            (masked(0x81, &[0xff, 0xfe]), "UTF-8"),
            (
                [masked(0x01, &[0xce]), masked(0x80, &[0xff])].concat(),
                "UTF-8",
            ),
            (masked(0x82, &[0u8; 101]), "over the 100-byte limit"),
            (
                [masked(0x02, &[0u8; 60]), masked(0x80, &[0u8; 60])].concat(),
                "120 bytes",
            ),
        ];
        for (bytes, want) in cases {
            let got = parse_all(&bytes, 100);
            match got.last() {
                Some(Err(e)) => assert!(e.contains(want), "{want}: {e}"),
                other => panic!("{want}: {other:?}"),
            }
        }
        // a message split over a UTF-8 sequence is fine
        let b = [masked(0x01, &[0xce]), masked(0x80, &[0xba])].concat();
        assert_eq!(
            parse_all(&b, 100),
            vec![Ok(Incoming::Text(Text::from_string("κ".into())))]
        );
        // close frames
        let mut c = 1000u16.to_be_bytes().to_vec();
        c.extend_from_slice(b"bye");
        assert_eq!(
            parse_all(&masked(0x88, &c), 100),
            vec![Ok(Incoming::Close(Some((1000, "bye".into()))))]
        );
        assert_eq!(
            parse_all(&masked(0x88, &[]), 100),
            vec![Ok(Incoming::Close(None))]
        );
    }

    #[test]
    fn an_oversized_message_is_refused_on_its_header() {
        // only the header of a 1 GB frame: refused without waiting for the payload
        let mut b = vec![0x82, 0x80 | 127];
        b.extend_from_slice(&(1u64 << 30).to_be_bytes());
        b.extend_from_slice(&[1, 2, 3, 4]);
        let got = parse_all(&b, 1 << 20);
        assert!(
            matches!(&got[..], [Err(e)] if e.contains("1073741824")),
            "{got:?}"
        );
    }

    #[test]
    fn accept_key_matches_the_rfc() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn unmasking_is_its_own_inverse_at_every_length() {
        for n in 0..40 {
            let orig: Vec<u8> = (0..n as u8).collect();
            let mut d = orig.clone();
            unmask(&mut d, [1, 2, 3, 4]);
            let want: Vec<u8> = orig
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4])
                .collect();
            assert_eq!(d, want);
            unmask(&mut d, [1, 2, 3, 4]);
            assert_eq!(d, orig);
        }
    }

    #[tokio::test]
    async fn frames_are_written_whole_and_read_back_by_tungstenite() {
        use futures_util::StreamExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let big = Bytes::from(vec![b'x'; 3 * 1024 * 1024]);
        let big2 = big.clone();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            let frames = vec![
                Frame::Text(Bytes::from_static(b"hello")),
                Frame::Text(big2),
                Frame::Ping,
                Frame::Text(Bytes::from(vec![b'y'; 300])),
                Frame::Close(1001, "bye"),
            ];
            write_frames(&s, &frames).await.expect("write");
            s
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            tcp,
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        use tokio_tungstenite::tungstenite::Message;
        let mut got = Vec::new();
        while let Some(Ok(m)) = ws.next().await {
            let stop = matches!(m, Message::Close(_));
            got.push(m);
            if stop {
                break;
            }
        }
        assert_eq!(
            got.len(),
            5,
            "{:?}",
            got.iter().map(|m| m.len()).collect::<Vec<_>>()
        );
        assert_eq!(got[0], Message::text("hello"));
        assert_eq!(got[1].len(), big.len());
        assert!(matches!(got[2], Message::Ping(_)));
        assert_eq!(got[3].len(), 300);
        assert!(
            matches!(&got[4], Message::Close(Some(c)) if u16::from(c.code) == 1001 && c.reason == "bye")
        );
        drop(server.await);
    }
}

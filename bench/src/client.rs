//! WebSocket clients for the benchmark: connecting with Basic auth, the messages a sender
//! sends, and reading what a receiver gets, in the two modes:
//!
//! - **legacy**: what the original broker's clients can do. A receiver registers with a bare
//!   `receive-message` (no `ping` after it: the original turns a receiver that pings into a
//!   mere client) and counts every item of every frame it gets, whether the frame is a
//!   forwarded message or one rebuilt from stored rows. Senders expect no reply.
//! - **wsmb**: the same, and receivers may use acknowledged mode (`deliver` frames, `ack`).

use std::time::Instant;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{WebSocketStream, client_async};

/// A client connection.
pub type Ws = WebSocketStream<TcpStream>;

/// Where and who.
#[derive(Clone, Debug)]
pub struct Target {
    /// `host:port`.
    pub addr: String,
    /// User.
    pub user: String,
    /// Password.
    pub password: String,
}

/// Connects and reads the `connect` frame (`00` required).
pub async fn connect(t: &Target) -> anyhow::Result<Ws> {
    use base64::Engine as _;
    let mut req = format!("ws://{}/", t.addr).into_client_request()?;
    let token =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", t.user, t.password));
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Basic {token}"))?,
    );
    let tcp = TcpStream::connect(&t.addr)
        .await
        .with_context(|| format!("connect to {}", t.addr))?;
    tcp.set_nodelay(true)?;
    let (mut ws, _) = client_async(req, tcp).await?;
    match tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.contains("\"00\"") => Ok(ws),
        other => bail!("not accepted: {other:?}"),
    }
}

/// A `send-message` of about `size` bytes carrying item `seq`, stamped `ns` (nanoseconds on
/// the bench's clock), for `limit` receivers (0 = all).
pub fn message(channel: &str, seq: u64, ns: u64, size: usize, limit: u32) -> String {
    let head = format!(
        r#"{{"command":"send-message","channel":"{channel}","number_of_receiver":{limit},"data":[{{"id":"{seq}","t":{ns},"p":""#
    );
    let pad = size.saturating_sub(head.len() + 4).max(1);
    let mut s = String::with_capacity(head.len() + pad + 4);
    s.push_str(&head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}]}");
    s
}

/// The items a frame carries: (seq, stamp) of each `{"id":"<seq>","t":<ns>` in it. Works on
/// forwarded frames, rebuilt ones, and `deliver` envelopes alike, without parsing the JSON.
pub fn items(text: &str, out: &mut Vec<(u64, u64)>) {
    let mut rest = text;
    while let Some(i) = rest.find("{\"id\":\"") {
        rest = &rest[i + 7..];
        let Some(end) = rest.find('"') else { return };
        let Ok(seq) = rest[..end].parse::<u64>() else {
            continue;
        };
        rest = &rest[end..];
        let ns = rest
            .strip_prefix("\",\"t\":")
            .and_then(|r| {
                let e = r.find(|c: char| !c.is_ascii_digit())?;
                r[..e].parse().ok()
            })
            .unwrap_or(0);
        out.push((seq, ns));
    }
}

/// The `message_id` of a `deliver` frame.
pub fn deliver_id(text: &str) -> Option<&str> {
    if !text.starts_with("{\"command\":\"deliver\"") {
        return None;
    }
    let i = text.find("\"message_id\":\"")? + 14;
    let rest = &text[i..];
    Some(&rest[..rest.find('"')?])
}

/// `ack` of `ids`.
pub fn ack_frame(ids: &mut Vec<String>) -> String {
    let list: Vec<String> = ids.drain(..).map(|i| format!("\"{i}\"")).collect();
    format!(r#"{{"command":"ack","data":[{}]}}"#, list.join(","))
}

/// `receive-message`, legacy or acknowledged.
pub fn receive(channel: &str, ack: bool) -> Message {
    let mode = if ack {
        r#","protocol":2,"ack":true,"window":1024"#
    } else {
        ""
    };
    Message::text(format!(
        r#"{{"command":"receive-message","channel":"{channel}"{mode},"data":[]}}"#
    ))
}

/// Nanoseconds since `origin`.
pub fn since(origin: Instant) -> u64 {
    origin.elapsed().as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_found_in_every_kind_of_frame() {
        let mut v = Vec::new();
        items(&message("c", 7, 99, 200, 1), &mut v);
        assert_eq!(v, vec![(7, 99)]);
        assert!(message("c", 7, 99, 200, 1).len() >= 199);
        v.clear();
        items(
            r#"{"command":"send-message","channel":"c","data":[{"id":"1","t":5,"p":"x"},{"id":"2","t":6,"p":"x"}]}"#,
            &mut v,
        );
        assert_eq!(v, vec![(1, 5), (2, 6)]);
        v.clear();
        let d = format!(
            r#"{{"command":"deliver","message_id":"m-1","channel":"c","delivery":1,"frame":{}}}"#,
            message("c", 3, 4, 100, 1)
        );
        items(&d, &mut v);
        assert_eq!((v, deliver_id(&d)), (vec![(3, 4)], Some("m-1")));
    }
}

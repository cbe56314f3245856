//! A raw-socket client that behaves exactly like the legacy PHP client of WSMessageBrocker
//! (legacy-protocol.md section 5): blocking socket, fixed request header order, ONE 1024-byte
//! read for the upgrade response (anything else in it is thrown away), masked binary frames with
//! the 7/16/64-bit length forms, reading one frame at a time, answering pings with an empty
//! masked pong, never sending a close frame.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub struct LegacyClient {
    sock: TcpStream,
    /// What the single handshake read returned (the PHP client discards it after two checks).
    pub handshake: String,
}

#[derive(Debug)]
pub enum ReadOutcome {
    /// A data frame (opcode 0/1/2), unmasked.
    Data(Vec<u8>),
    /// The server sent a close frame; the PHP client closes its socket.
    Closed,
    /// The socket timed out or failed (PHP: `fread` returns false).
    Failed(String),
}

impl LegacyClient {
    /// `websocket_open($host, $port, $headers, $err, $timeout)`.
    pub fn open(addr: SocketAddr, headers: &[String], timeout: Duration) -> Result<Self, String> {
        let sock = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut req = format!(
            "GET / HTTP/1.1\r\nHost: {}\r\npragma: no-cache\r\nUpgrade: WebSocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n",
            addr.ip(),
            "x3JJHMbDL1EzLkh9GBhXDw=="
        );
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        let mut c = LegacyClient {
            sock,
            handshake: String::new(),
        };
        c.sock
            .write_all(req.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1024];
        let n = c.sock.read(&mut buf).map_err(|e| e.to_string())?;
        c.handshake = String::from_utf8_lossy(&buf[..n]).into_owned();
        let lower = c.handshake.to_lowercase();
        if !lower.contains(" 101 ") || !lower.contains("sec-websocket-accept: ") {
            return Err(format!(
                "Server did not accept to upgrade connection to websocket.{}",
                c.handshake
            ));
        }
        Ok(c)
    }

    /// `websocket_write($sp, $data)`: one masked binary frame.
    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        let mut frame = vec![0x82u8];
        let len = data.len();
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else if len < 0xFFFF {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&0u32.to_be_bytes());
            frame.extend_from_slice(&(len as u32).to_be_bytes());
        }
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        frame.extend_from_slice(&mask);
        frame.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.sock.write_all(&frame)
    }

    fn read_exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; n];
        self.sock.read_exact(&mut buf).map_err(|e| e.to_string())?;
        Ok(buf)
    }

    /// `websocket_read($sp)`: reads until a final data frame.
    pub fn read(&mut self) -> ReadOutcome {
        let mut data = Vec::new();
        loop {
            let h = match self.read_exact(2) {
                Ok(h) => h,
                Err(e) => return ReadOutcome::Failed(e),
            };
            let opcode = h[0] & 0x0f;
            let fin = h[0] & 0x80 != 0;
            let masked = h[1] & 0x80 != 0;
            let mut len = u64::from(h[1] & 0x7f);
            if len >= 126 {
                let n = if len == 127 { 8 } else { 2 };
                let ext = match self.read_exact(n) {
                    Ok(e) => e,
                    Err(e) => return ReadOutcome::Failed(e),
                };
                len = ext.iter().fold(0u64, |a, b| (a << 8) | u64::from(*b));
            }
            let mask = if masked {
                match self.read_exact(4) {
                    Ok(m) => Some(m),
                    Err(e) => return ReadOutcome::Failed(e),
                }
            } else {
                None
            };
            let payload = match self.read_exact(len as usize) {
                Ok(p) => p,
                Err(e) => return ReadOutcome::Failed(e),
            };
            match opcode {
                9 => {
                    let _ = self.sock.write_all(&[0x8a, 0x80, 1, 2, 3, 4]);
                    continue;
                }
                8 => return ReadOutcome::Closed,
                0..=2 => {
                    match mask {
                        Some(m) => {
                            data.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]))
                        }
                        None => data.extend_from_slice(&payload),
                    }
                    if fin {
                        return ReadOutcome::Data(data);
                    }
                }
                _ => continue,
            }
        }
    }
}

/// A string as PHP's `json_encode` writes it by default: non-ASCII as `\uXXXX` (UTF-16), `/`
/// as `\/`.
pub fn php_json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' => out.push_str("\\/"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `json_encode($request, JSON_PRETTY_PRINT)` of the seed README's sender.php request: 4-space
/// indent, `": "` separators, keys in the PHP array's order.
pub fn pretty_sms_request(channel: &str, id: &str, receiver: &str, message: &str) -> String {
    format!(
        "{{\n    \"command\": \"send-message\",\n    \"channel\": {},\n    \"data\": [\n        {{\n            \"id\": {},\n            \"time\": 1700000000,\n            \"receiver\": {},\n            \"message\": {}\n        }}\n    ]\n}}",
        php_json_string(channel),
        php_json_string(id),
        php_json_string(receiver),
        php_json_string(message)
    )
}

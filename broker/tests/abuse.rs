//! The abuse limits (`guard`), each hit by a misbehaving client while a well-behaved one, from
//! another address, is still served. Clients get distinct source addresses by binding to
//! 127.0.0.x (all loopback on Linux); loopback is not a trusted proxy in these tests.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::client_async;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const T: Duration = Duration::from_secs(20);

/// A TCP connection to `addr` from the local address `from` (e.g. "127.0.0.7").
async fn tcp_from(from: &str, addr: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(format!("{from}:0").parse().expect("addr"))
        .expect("bind a local address");
    s.connect(addr).await.expect("connect")
}

/// A WebSocket from `from` as `creds`, after its `connect` frame (asserted `00`).
async fn ws_from(from: &str, addr: SocketAddr, creds: (&str, &str)) -> Ws {
    let mut req = format!("ws://{addr}/").into_client_request().expect("req");
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&basic(creds.0, creds.1)).expect("header"),
    );
    let (mut ws, _) = client_async(req, tcp_from(from, addr).await)
        .await
        .expect("upgrade");
    let r = reply(&mut ws).await;
    assert_eq!(
        (r.command.as_str(), r.response_code.as_str()),
        ("connect", "00")
    );
    ws
}

/// Sends raw bytes from `from`; everything the broker answers until it closes (or 5 s).
async fn exchange_from(from: &str, addr: SocketAddr, request: &[u8]) -> String {
    let mut s = tcp_from(from, addr).await;
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The well-behaved client: connects, sends a message to itself and gets it back.
async fn still_served(from: &str, addr: SocketAddr) {
    let mut rx = ws_from(from, addr, QA).await;
    receive_on(&mut rx, "fine").await;
    let mut tx = ws_from(from, addr, QA).await;
    send(&mut tx, &sms("fine", "ok-1")).await;
    let t = recv_text(&mut rx).await;
    assert!(t.contains("ok-1"), "{t}");
}

fn untrusted(c: &mut wsmb_broker::Config) {
    c.server.trusted_proxies = Vec::new();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_spend_their_own_budget_not_the_sessions() {
    let b = broker_with(|c| {
        untrusted(c);
        c.server.max_pending_connections = 4;
        c.server.max_connections_per_address = 1000;
        c.server.handshake_timeout = Duration::from_secs(30);
    })
    .await;
    // Ten authenticated sessions: the pending budget (4) does not limit them.
    let mut sessions = Vec::new();
    for _ in 0..10 {
        sessions.push(ws_from("127.0.0.1", b.addr, QA).await);
    }
    // An attacker's half-sent request heads fill the pending budget...
    let mut attackers = Vec::new();
    for _ in 0..4 {
        let mut s = tcp_from("127.0.0.66", b.addr).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        attackers.push(s);
    }
    let deadline = Instant::now() + T;
    loop {
        let r = exchange_from("127.0.0.66", b.addr, b"GET / HTTP/1.1\r\n").await;
        if r.contains("503") {
            assert!(r.contains("server.max_pending_connections"), "{r}");
            break;
        }
        assert!(Instant::now() < deadline, "the budget never filled: {r}");
    }
    // ...and the sessions already in go on.
    receive_on(&mut sessions[0], "live").await;
    send(&mut sessions[1], &sms("live", "still")).await;
    assert!(recv_text(&mut sessions[0]).await.contains("still"));
    assert!(b.shared.guard.stats.refused_pending.load(Ordering::Relaxed) >= 1);
    // The attackers give up: room again.
    drop(attackers);
    let deadline = Instant::now() + T;
    loop {
        let mut req = format!("ws://{}/", b.addr)
            .into_client_request()
            .expect("req");
        req.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&basic(QA.0, QA.1)).expect("header"),
        );
        if client_async(req, tcp_from("127.0.0.1", b.addr).await)
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no room after the attackers left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_is_capped_and_others_are_not() {
    let b = broker_with(|c| {
        untrusted(c);
        c.server.max_connections_per_address = 3;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(ws_from("127.0.0.9", b.addr, QA).await);
    }
    let r = exchange_from(
        "127.0.0.9",
        b.addr,
        legacy_request("x", "qa", "4lt0@1234").as_bytes(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
    assert!(r.contains("max_connections_per_address"), "{r}");
    still_served("127.0.0.10", b.addr).await;
    drop(held.pop());
    let deadline = Instant::now() + T;
    loop {
        let r = exchange_from("127.0.0.9", b.addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
        if r.starts_with("HTTP/1.1 200 ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the address's count never went down: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_wait_longer_then_the_address_is_banned() {
    let b = broker_with(|c| {
        untrusted(c);
        c.server.auth_fail_delay = Duration::from_millis(100);
        c.server.auth_fail_delay_max = Duration::from_millis(400);
        c.server.auth_ban_after = 5;
    })
    .await;
    let wrong = legacy_request("x", "qa", "guess");
    let mut waited = Vec::new();
    for _ in 0..4 {
        let t0 = Instant::now();
        let r = exchange_from("127.0.0.20", b.addr, wrong.as_bytes()).await;
        waited.push(t0.elapsed());
        assert!(
            r.starts_with("HTTP/1.1 101 "),
            "legacy clients get 101 then 01: {r}"
        );
    }
    // 100, 200, 400, 400 ms at least before each answer
    for (i, min) in [100u64, 200, 400, 400].iter().enumerate() {
        assert!(
            waited[i] >= Duration::from_millis(*min),
            "failure {}: {:?}",
            i + 1,
            waited
        );
    }
    // The fifth bans the address: its next connections are closed before any work, even
    // with the right password.
    exchange_from("127.0.0.20", b.addr, wrong.as_bytes()).await;
    assert_eq!(b.shared.guard.stats.bans.load(Ordering::Relaxed), 1);
    let right = legacy_request("x", "qa", "4lt0@1234");
    let r = exchange_from("127.0.0.20", b.addr, right.as_bytes()).await;
    assert!(r.is_empty(), "closed at once: {r:?}");
    assert!(b.shared.guard.stats.refused_banned.load(Ordering::Relaxed) >= 1);
    // The same through the HTTP API.
    let r = exchange_from(
        "127.0.0.20",
        b.addr,
        b"GET /3rdparty/v1/health HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(r.is_empty(), "{r:?}");
    // Everybody else is served.
    still_served("127.0.0.21", b.addr).await;
    assert_eq!(
        b.shared.guard.stats.auth_failures.load(Ordering::Relaxed),
        5
    );
}

/// Behind a trusted proxy the client is the last `X-Forwarded-For` address: it is banned, the
/// proxy (and everyone else behind it) is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_the_forwarded_client_is_banned_not_the_proxy() {
    let b = broker_with(|c| {
        c.server.trusted_proxies = vec!["127.0.0.30".parse::<IpAddr>().expect("ip")];
        c.server.auth_fail_delay = Duration::from_millis(1);
        c.server.auth_fail_delay_max = Duration::from_millis(1);
        c.server.auth_ban_after = 2;
    })
    .await;
    let api = |who: &str, creds: &str| {
        format!(
            "GET /3rdparty/v1/messages HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.9.9.9, {who}\r\n\
             Authorization: {creds}\r\n\r\n"
        )
    };
    let bad = basic("qa", "guess");
    for _ in 0..2 {
        let r = exchange_from("127.0.0.30", b.addr, api("203.0.113.7", &bad).as_bytes()).await;
        assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
    }
    let good = basic(QA.0, QA.1);
    let r = exchange_from("127.0.0.30", b.addr, api("203.0.113.7", &good).as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 403 "), "the client is banned: {r}");
    let r = exchange_from("127.0.0.30", b.addr, api("203.0.113.8", &good).as_bytes()).await;
    assert!(
        r.starts_with("HTTP/1.1 200 "),
        "another client behind the proxy: {r}"
    );
    // A client cannot name itself: X-Forwarded-For from an untrusted address is ignored.
    let r = exchange_from("127.0.0.31", b.addr, api("203.0.113.8", &good).as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
}

/// With `bcrypt_concurrency = 1`, a source that keeps failing on a bcrypt user cannot make a
/// real bcrypt user wait behind all its checks: its checks go one at a time behind a gate of
/// their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_source_cannot_starve_a_real_bcrypt_login() {
    // bcrypt of "secret", cost 8 (htpasswd -nbB -C 8 bc secret)
    let hash = bcrypt::hash("secret", 8).expect("hash");
    let b = broker_with(move |c| {
        untrusted(c);
        c.credentials.lines.push(format!("bc:{hash}"));
        c.credentials.bcrypt_concurrency = 1;
        c.server.auth_fail_delay = Duration::from_millis(1);
        c.server.auth_fail_delay_max = Duration::from_millis(1);
        c.server.auth_ban_after = 0;
        c.server.max_connections_per_address = 1000;
    })
    .await;
    // One failure makes the attacker a suspect.
    exchange_from(
        "127.0.0.40",
        b.addr,
        legacy_request("x", "bc", "nope-0").as_bytes(),
    )
    .await;
    let before = b.shared.auth.stats.bcrypt_checks.load(Ordering::Relaxed);
    let addr = b.addr;
    let mut attack = tokio::task::JoinSet::new();
    for i in 1..=30 {
        attack.spawn(async move {
            exchange_from(
                "127.0.0.40",
                addr,
                legacy_request("x", "bc", &format!("nope-{i}")).as_bytes(),
            )
            .await
        });
    }
    // Let the attack queue up, then log in for real.
    let deadline = Instant::now() + T;
    while b.shared.auth.stats.bcrypt_checks.load(Ordering::Relaxed) < before + 2 {
        assert!(Instant::now() < deadline, "the attack did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ws = ws_from("127.0.0.41", b.addr, ("bc", "secret")).await;
    let done = b.shared.auth.stats.bcrypt_checks.load(Ordering::Relaxed) - before;
    assert!(
        done < 10,
        "the real login waited behind {done} of the attacker's 30 bcrypt checks"
    );
    while attack.join_next().await.is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_requests_are_paced_per_address() {
    let b = broker_with(|c| {
        untrusted(c);
        c.server.http_requests_per_second = 5.0;
    })
    .await;
    let req = format!(
        "GET /3rdparty/v1/health HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
        basic(QA.0, QA.1)
    );
    let mut limited = None;
    for _ in 0..20 {
        let r = exchange_from("127.0.0.50", b.addr, req.as_bytes()).await;
        if r.starts_with("HTTP/1.1 429 ") {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("a burst of 20 requests meets the limit (5/s, 10 in a burst)");
    assert!(r.contains("Retry-After: "), "{r}");
    assert!(r.contains("http_requests_per_second"), "{r}");
    let r = exchange_from("127.0.0.51", b.addr, req.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 200 "), "another address: {r}");
}

/// `messages_per_second_per_user`: a flooding user is slowed down to its rate (nothing is
/// refused or lost), while another user is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_user_is_slowed_down_and_others_are_not() {
    let b = broker_with(|c| {
        c.server.messages_per_second_per_user = 50.0;
    })
    .await;
    let mut rx = connect(b.addr).await;
    receive_on(&mut rx, "flood").await;
    let mut flood = connect(b.addr).await;
    let t0 = Instant::now();
    for i in 0..150 {
        send(&mut flood, &sms("flood", &format!("f{i}"))).await;
    }
    // Another user, meanwhile: answered while the flood is still being paced.
    let mut other = connect_as(b.addr, SHA_USER).await;
    send(&mut other, &sms("elsewhere", "hello")).await;
    let r = reply(&mut other).await;
    assert_eq!(r.command, "send-result");
    let other_done = t0.elapsed();
    let mut got = 0;
    while got < 150 {
        if recv_text(&mut rx).await.contains("\"f") {
            got += 1;
        }
    }
    let flood_done = t0.elapsed();
    // 50 in the burst, then 100 at 50 a second: two seconds at least.
    assert!(flood_done >= Duration::from_millis(1900), "{flood_done:?}");
    assert!(other_done < flood_done, "{other_done:?} vs {flood_done:?}");
    assert!(b.shared.guard.stats.messages_paced.load(Ordering::Relaxed) > 0);
}

//! The status page over HTTP (its look and behaviour in a real browser are tested in
//! `tests/tests/http_api.rs`): who may see it, what its figures say, the SMS listings only for
//! users who may read message states, the page off or elsewhere, and bad paths refused.

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::Value;

/// One request as `creds` (none: without credentials); the status and the whole answer.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    creds: Option<(&str, &str)>,
) -> (u16, String) {
    http_request(
        addr,
        method,
        path,
        &creds.map(auth_header).unwrap_or_default(),
    )
    .await
}

fn body_json(text: &str) -> Value {
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_needs_a_user_and_its_figures_follow_the_broker() {
    let b = broker().await;
    for path in ["/status", "/status/data", "/status/app.js"] {
        let (code, text) = request(b.addr, "GET", path, None).await;
        assert_eq!(code, 401, "{path}: {text}");
        assert!(text.contains("WWW-Authenticate: Basic"), "{text}");
        let (code, _) = request(b.addr, "GET", path, Some(("qa", "wrong"))).await;
        assert_eq!(code, 401, "{path}");
    }
    let (code, page) = request(b.addr, "GET", "/status", Some(QA)).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("Content-Type: text/html"), "{page}");
    assert!(
        page.contains("Content-Security-Policy: default-src 'none'"),
        "{page}"
    );
    assert!(page.contains(r#"src="/status/app.js""#), "{page}");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "nothing from elsewhere"
    );
    let (code, js) = request(b.addr, "GET", "/status/app.js", Some(QA)).await;
    assert_eq!(code, 200);
    assert!(
        js.contains("text/javascript") && !js.contains("innerHTML"),
        "{js}"
    );
    let (code, css) = request(b.addr, "GET", "/status/app.css", Some(QA)).await;
    assert_eq!((code, css.contains("text/css")), (200, true));
    let (code, _) = request(b.addr, "POST", "/status/data", Some(QA)).await;
    assert_eq!(code, 405);
    let (code, _) = request(b.addr, "GET", "/status/nothing", Some(QA)).await;
    assert_ne!(code, 200);

    // A receiver and a message: the channel's figures move.
    let mut rx = connect(b.addr).await;
    receive_on(&mut rx, "page-ch").await;
    let mut tx = connect_as(b.addr, SHA_USER).await;
    send(&mut tx, &sms("page-ch", "p-1")).await;
    assert!(recv_text(&mut rx).await.contains("p-1"));
    assert_eq!(reply(&mut tx).await.response_code, "00");
    let (code, text) = request(b.addr, "GET", "/status/data", Some(QA)).await;
    assert_eq!(code, 200, "{text}");
    let d = body_json(&text);
    let ch = d["channels"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "page-ch"))
        .unwrap_or_else(|| panic!("{d}"));
    assert_eq!(
        (&ch["receivers"], &ch["in"], &ch["out"]),
        (&1.into(), &1.into(), &1.into()),
        "{d}"
    );
    assert_eq!(d["user"], "qa");
    assert_eq!(d["broker"]["status"], "ok", "{d}");
    let minutes = d["chart"]["series"]["in"].as_array().expect("series");
    assert_eq!(minutes.len(), 60, "{d}");
    let total: u64 = minutes.iter().filter_map(Value::as_u64).sum();
    assert_eq!(
        Some(total),
        d["broker"]["messages_in"].as_u64(),
        "every message in the hour: {d}"
    );
    assert!(d["sms"]["gateways"].is_array(), "{d}");
    assert!(d["sms"]["messages"].is_array(), "{d}");
    assert!(d["sms"]["health"]["checks"].is_object(), "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sms_listings_only_for_users_who_may_read_states() {
    let rules = r#"
default = "none"
[users.qa]
send = ["sms"]
[users.sha]
receive = ["sms-status"]
"#;
    let b = broker_with(|c| {
        c.permissions =
            wsmb_common::from_toml(rules, std::path::Path::new("rules.toml")).expect("rules");
    })
    .await;
    let (_, text) = request(b.addr, "GET", "/status/data", Some(QA)).await;
    let d = body_json(&text);
    assert!(d["sms"]["messages"].is_null(), "{d}");
    assert!(
        d["sms"]["listError"]
            .as_str()
            .is_some_and(|e| e.contains("permissions")),
        "{d}"
    );
    assert!(
        d["sms"]["gateways"].is_array(),
        "the gateways need only a user: {d}"
    );
    let (_, text) = request(b.addr, "GET", "/status/data", Some(SHA_USER)).await;
    assert!(body_json(&text)["sms"]["messages"].is_array(), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_moves_or_goes_and_bad_paths_are_refused() {
    let b = broker_with(|c| c.status.path = "/ops/status".into()).await;
    let (code, page) = request(b.addr, "GET", "/ops/status", Some(QA)).await;
    assert_eq!(code, 200);
    assert!(page.contains(r#"src="/ops/status/app.js""#), "{page}");
    let (code, _) = request(b.addr, "GET", "/ops/status/data", Some(QA)).await;
    assert_eq!(code, 200);
    let (code, _) = request(b.addr, "GET", "/status", Some(QA)).await;
    assert_ne!(code, 200);

    let b = broker_with(|c| c.status.path = String::new()).await;
    let (code, _) = request(b.addr, "GET", "/status", Some(QA)).await;
    assert_ne!(code, 200);

    for bad in [
        "status",
        "/status/",
        "/",
        "/metrics",
        "/healthz",
        "/3rdparty/v1/x",
        "/a\"b",
        "/a/../b",
    ] {
        let mut c = test_config();
        c.status.path = bad.into();
        let e = c.validate().expect_err(bad).to_string();
        assert!(e.contains("status.path"), "{bad}: {e}");
    }
}

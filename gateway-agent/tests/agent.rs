//! The agent in this process against a real broker (in-process, real sockets) and simulated
//! modems on real pseudo-terminals: jobs in, SMS out, every outcome reported on `sms-status`.

mod common;

use std::time::Duration;

use common::*;
use wsmb_agent::config::RouteConfig;
use wsmb_agent::sim::{Fault, SimConfig};
use wsmb_protocol::sms::Status;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_queued_sent_and_reported() {
    let dir = scratch("happy");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let mut cfg = agent_config(b.addr, &dir, vec![modem("m1", &sim)]);
    cfg.agent.country_code = "62".into();
    let (_agent, mut status) = start_ready(cfg, b.addr).await;

    let text = "Kode OTP Anda 482913. Jangan berikan kode ini kepada siapa pun. €".repeat(3);
    send_jobs(
        b.addr,
        serde_json::json!([job("otp-1", "0812-6666-666", &text)]),
    )
    .await;
    let queued = status.wait("otp-1", Status::Queued, T).await;
    assert_eq!(queued.receiver.as_deref(), Some("+628126666666"));
    assert_eq!(queued.parts, Some(2));
    let sent = status.wait("otp-1", Status::Sent, T).await;
    assert_eq!(sent.modem.as_deref(), Some("m1"));
    assert_eq!(sent.parts, Some(2));
    assert_eq!(sent.message_references.len(), 2);
    assert_eq!(sent.attempts, Some(1));
    assert_eq!(sim.messages(), vec![("+628126666666".to_owned(), text)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jobs_fail_with_a_reason_and_never_block_the_others() {
    let dir = scratch("invalid");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let mut cfg = agent_config(b.addr, &dir, vec![modem("m1", &sim)]);
    cfg.agent.block_list = vec!["+6281111111111".into()];
    cfg.agent.max_parts = 2;
    let a = wsmb_agent::agent::start(cfg).await.expect("agent");
    let mut status = StatusListener::new(b.addr).await;
    link_up(&a).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    send_jobs(
        b.addr,
        serde_json::json!([
            job("bad-number", "call me", "x"),
            job("empty", "+628123456789", "   "),
            job("long", "+628123456789", &"x".repeat(400)),
            job("blocked", "+62 811 1111 1111", "x"),
            {"id": "expired", "receiver": "+628123456789", "message": "x", "expiration": now - 10},
            {"id": "no-receiver", "message": "x"},
            "not even an object",
            job("good", "+628123456789", "still delivered"),
        ]),
    )
    .await;
    for (id, code) in [
        ("bad-number", "invalid_receiver"),
        ("empty", "empty_message"),
        ("long", "too_long"),
        ("blocked", "blocked"),
        ("no-receiver", "invalid_receiver"),
    ] {
        let e = status.wait(id, Status::Failed, T).await;
        assert_eq!(e.error_code.as_deref(), Some(code), "{id}");
        assert!(e.reason.as_deref().is_some_and(|r| r.len() > 10), "{id}");
    }
    status.wait("expired", Status::Expired, T).await;
    let e = status.wait("", Status::Failed, T).await;
    assert_eq!(e.error_code.as_deref(), Some("invalid_job"));
    status.wait("good", Status::Sent, T).await;
    assert_eq!(sim.messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_object_data_and_duplicate_ids() {
    let dir = scratch("dedup");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let a = wsmb_agent::agent::start(agent_config(b.addr, &dir, vec![modem("m1", &sim)]))
        .await
        .expect("agent");
    let mut status = StatusListener::new(b.addr).await;
    link_up(&a).await;
    // WSMB's broker requires `data` to be an array, but a legacy broker forwards a single
    // object, as the original author's Pi gateway sent them: the agent takes both.
    let cfg = agent_config(b.addr, &dir, vec![modem("m1", &sim)]);
    let frame = serde_json::json!({"command": "send-message", "channel": "sms", "data": job("same", "+628123456789", "once")});
    assert_eq!(
        wsmb_agent::link::intake(&a.store, &cfg, &frame.to_string(), None)
            .await
            .expect("stored"),
        1
    );
    status.wait("same", Status::Sent, T).await;
    send_jobs(
        b.addr,
        serde_json::json!([job("same", "+628123456789", "once")]),
    )
    .await;
    send_jobs(
        b.addr,
        serde_json::json!([job("other", "+628123456789", "two")]),
    )
    .await;
    status.wait("other", Status::Sent, T).await;
    status.settle(Duration::from_millis(300)).await;
    assert_eq!(status.of("same"), vec![Status::Queued, Status::Sent]);
    assert_eq!(sim.messages().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_permanent_and_ambiguous_ones_fail() {
    let dir = scratch("errors");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let (_agent, mut status) =
        start_ready(agent_config(b.addr, &dir, vec![modem("m1", &sim)]), b.addr).await;

    sim.push_fault(Fault::ErrorAfterPdu(38));
    send_jobs(
        b.addr,
        serde_json::json!([job("transient", "+628123456789", "t")]),
    )
    .await;
    let e = status.wait("transient", Status::Sent, T).await;
    assert_eq!(e.attempts, Some(2));

    sim.push_fault(Fault::ErrorAfterPdu(28));
    send_jobs(
        b.addr,
        serde_json::json!([job("permanent", "+628123456789", "p")]),
    )
    .await;
    let e = status.wait("permanent", Status::Failed, T).await;
    assert_eq!(e.error_code.as_deref(), Some("+CMS ERROR: 28"));
    assert!(!e.ambiguous);

    sim.push_fault(Fault::ErrorAfterPdu(500));
    send_jobs(
        b.addr,
        serde_json::json!([job("ambiguous", "+628123456789", "a")]),
    )
    .await;
    let e = status.wait("ambiguous", Status::Failed, T).await;
    assert!(e.ambiguous, "{e:?}");
    assert!(
        e.reason
            .as_deref()
            .is_some_and(|r| r.contains("may have been sent"))
    );

    sim.push_fault(Fault::NoResult);
    send_jobs(
        b.addr,
        serde_json::json!([job("silent", "+628123456789", "s")]),
    )
    .await;
    let e = status.wait("silent", Status::Failed, T).await;
    assert!(e.ambiguous);

    // always failing: gives up after max_attempts (3), and the queue moves on
    for _ in 0..3 {
        sim.push_fault(Fault::ErrorAfterPdu(42));
    }
    send_jobs(
        b.addr,
        serde_json::json!([job("doomed", "+628123456789", "d")]),
    )
    .await;
    let e = status.wait("doomed", Status::Failed, T).await;
    assert_eq!(e.attempts, Some(3));
    assert!(
        e.reason
            .as_deref()
            .is_some_and(|r| r.contains("gave up after 3 attempts"))
    );
    send_jobs(
        b.addr,
        serde_json::json!([job("after", "+628123456789", "fine")]),
    )
    .await;
    status.wait("after", Status::Sent, T).await;

    // what went out: transient once (the 38 attempt did not), permanent no, ambiguous and
    // silent once each (never twice), after once
    let texts: Vec<String> = sim.messages().into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, vec!["t", "a", "s", "fine"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_ambiguous_sends_again_and_says_so_in_the_config() {
    let dir = scratch("retryamb");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let mut cfg = agent_config(b.addr, &dir, vec![modem("m1", &sim)]);
    cfg.agent.retry_ambiguous = true;
    let (_agent, mut status) = start_ready(cfg, b.addr).await;
    sim.push_fault(Fault::ErrorAfterPdu(500));
    send_jobs(
        b.addr,
        serde_json::json!([job("dup", "+628123456789", "maybe twice")]),
    )
    .await;
    let e = status.wait("dup", Status::Sent, T).await;
    assert_eq!(e.attempts, Some(2));
    assert_eq!(sim.messages().len(), 2, "the duplicate the user accepted");
}

/// Three simulated modems and an agent configuration for them: a1 and a2 in group `tsel`,
/// which `prefixes` are routed to, and b1 in the default group.
struct ThreeModems {
    sims: [wsmb_agent::sim::Simulator; 3],
    modems: [wsmb_agent::config::ModemConfig; 3],
    cfg: wsmb_agent::config::Config,
}

async fn three_modems(
    dir: &std::path::Path,
    broker: std::net::SocketAddr,
    prefixes: &[&str],
) -> ThreeModems {
    let sims = [
        sim(dir, "a1", SimConfig::default()).await,
        sim(dir, "a2", SimConfig::default()).await,
        sim(dir, "b1", SimConfig::default()).await,
    ];
    let mut modems = [
        modem("a1", &sims[0]),
        modem("a2", &sims[1]),
        modem("b1", &sims[2]),
    ];
    modems[0].group = "tsel".into();
    modems[1].group = "tsel".into();
    let mut cfg = agent_config(broker, dir, modems.to_vec());
    cfg.routes = vec![RouteConfig {
        prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
        group: "tsel".into(),
    }];
    cfg.validate().expect("valid");
    ThreeModems { sims, modems, cfg }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_prefix_round_robin_and_failover() {
    let dir = scratch("route");
    let b = broker().await;
    let ThreeModems {
        sims: [s1, s2, s3],
        cfg,
        ..
    } = three_modems(&dir, b.addr, &["+62812", "+62813"]).await;
    let (_agent, mut status) = start_ready(cfg, b.addr).await;

    let mut jobs = Vec::new();
    for i in 0..6 {
        jobs.push(job(&format!("t{i}"), "+628121111111", &format!("tsel {i}")));
    }
    jobs.push(job("other", "+628571111111", "indosat"));
    send_jobs(b.addr, serde_json::Value::Array(jobs)).await;
    for i in 0..6 {
        status.wait(&format!("t{i}"), Status::Sent, T).await;
    }
    let e = status.wait("other", Status::Sent, T).await;
    assert_eq!(e.modem.as_deref(), Some("b1"));
    let (n1, n2) = (s1.messages().len(), s2.messages().len());
    assert_eq!(n1 + n2, 6);
    assert!(
        n1 >= 1 && n2 >= 1,
        "both modems of the group take jobs: a1 {n1}, a2 {n2}"
    );
    assert_eq!(s3.messages().len(), 1);

    // failover: a transient error on one modem of the group; another modem of the group sends
    s1.push_fault(Fault::ErrorAfterPdu(38));
    s2.push_fault(Fault::ErrorAfterPdu(38));
    send_jobs(
        b.addr,
        serde_json::json!([job("fo", "+628131111111", "failover")]),
    )
    .await;
    let e = status.wait("fo", Status::Sent, T).await;
    assert_eq!(e.attempts, Some(2));
    let all: Vec<String> = s1
        .messages()
        .into_iter()
        .chain(s2.messages())
        .map(|(_, t)| t)
        .collect();
    assert_eq!(all.iter().filter(|t| *t == "failover").count(), 1);
}

/// A job's `sim` (the HTTP API's `simNumber`) sends it through that `[[modem]]` whatever the
/// routes say, retries on that modem only, waits while it is down; a `sim` past the last modem
/// fails at once, and a modem taken out of the configuration fails the jobs pinned to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_naming_its_sim_goes_through_that_modem_only() {
    let dir = scratch("simnumber");
    let b = broker().await;
    let ThreeModems {
        sims: [s1, s2, s3],
        modems: [m1, _, m3],
        cfg,
    } = three_modems(&dir, b.addr, &["+62812"]).await;
    let (agent, mut status) = start_ready(cfg.clone(), b.addr).await;
    let pinned = |id: &str, sim: u64| {
        let mut j = job(id, "+628121111111", id);
        j["sim"] = serde_json::json!(sim);
        j
    };
    let mut jobs = vec![pinned("to-b1", 3), pinned("past-the-last", 9)];
    for i in 0..4 {
        jobs.push(pinned(&format!("to-a1-{i}"), 1));
    }
    send_jobs(b.addr, serde_json::Value::Array(jobs)).await;
    let e = status.wait("to-b1", Status::Sent, T).await;
    assert_eq!(e.modem.as_deref(), Some("b1"), "sim 3 beats the route");
    for i in 0..4 {
        let e = status.wait(&format!("to-a1-{i}"), Status::Sent, T).await;
        assert_eq!(e.modem.as_deref(), Some("a1"), "{e:?}");
    }
    let e = status.wait("past-the-last", Status::Failed, T).await;
    assert_eq!(e.error_code.as_deref(), Some("no_such_sim"), "{e:?}");
    let reason = e.reason.clone().unwrap_or_default();
    assert!(reason.contains("3 modem(s) (a1, a2, b1)"), "{reason}");
    assert_eq!(status.of("past-the-last"), vec![Status::Failed]);
    assert_eq!((s1.messages().len(), s2.messages().len()), (4, 0));

    // A transient error: retried on the same modem, not handed to the other of the group.
    s1.push_fault(Fault::ErrorAfterPdu(38));
    send_jobs(b.addr, serde_json::json!([pinned("retry-a1", 1)])).await;
    let e = status.wait("retry-a1", Status::Sent, T).await;
    assert_eq!((e.modem.as_deref(), e.attempts), (Some("a1"), Some(2)));
    assert_eq!(s2.messages().len(), 0);
    stop(agent).await;

    // Its modem down: it waits, though two others are ready.
    s2.set_silent(true);
    let a = wsmb_agent::agent::start(cfg).await.expect("agent");
    link_up(&a).await;
    send_jobs(b.addr, serde_json::json!([pinned("to-a2", 2)])).await;
    status.wait("to-a2", Status::Queued, T).await;
    status.settle(Duration::from_secs(2)).await;
    assert_eq!(status.of("to-a2"), vec![Status::Queued]);
    stop(a).await;

    // a2 taken out of the configuration: the job pinned to it fails, saying why.
    let mut cfg = agent_config(b.addr, &dir, vec![m1, m3]);
    cfg.routes.clear();
    let (_agent, _) = start_ready(cfg, b.addr).await;
    let e = status.wait("to-a2", Status::Failed, T).await;
    assert_eq!(e.error_code.as_deref(), Some("no_such_modem"), "{e:?}");
    assert!(
        e.reason
            .as_deref()
            .is_some_and(|r| r.contains("modem a2, which is no longer configured")),
        "{e:?}"
    );
    assert_eq!(
        s1.messages().len() + s2.messages().len() + s3.messages().len(),
        6,
        "nothing else was sent"
    );
}

/// Quiet hours hold every job but the OTP lane until the window's end, said once with until
/// when; the OTP goes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_hours_hold_bulk_jobs_and_let_otps_through() {
    let dir = scratch("quiet");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let mut cfg = agent_config(b.addr, &dir, vec![modem("m1", &sim)]);
    // A window from an hour ago to an hour from now, in the machine's local time.
    let now = chrono::Local::now();
    let hhmm = |t: chrono::DateTime<chrono::Local>| t.format("%H:%M").to_string();
    let end = now + chrono::Duration::hours(1);
    cfg.agent.quiet_hours = format!("{}-{}", hhmm(now - chrono::Duration::hours(1)), hhmm(end));
    cfg.validate().expect("valid");
    let (_agent, mut status) = start_ready(cfg.clone(), b.addr).await;
    let mut otp = job("otp", "+628123456789", "Your code is 1234");
    otp["priority"] = serde_json::json!(100);
    send_jobs(
        b.addr,
        serde_json::json!([job("news", "+628123456789", "Our new menu"), otp]),
    )
    .await;
    status.wait("otp", Status::Sent, T).await;
    let held = status.wait("news", Status::Held, T).await;
    let reason = held.reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with(&format!(
            "quiet hours (agent.quiet_hours = {:?}): sent from {}",
            cfg.agent.quiet_hours,
            hhmm(end)
        )),
        "{held:?}"
    );
    let until = held.until.expect("until") as i64;
    let want = end.timestamp() - end.timestamp() % 60;
    assert!(
        (until - want).abs() <= 60,
        "{held:?}: until {until}, window ends {want}"
    );
    status.settle(Duration::from_secs(2)).await;
    assert_eq!(status.of("news"), vec![Status::Queued, Status::Held]);
    assert_eq!(
        sim.messages(),
        vec![("+628123456789".to_owned(), "Your code is 1234".to_owned())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_parts_back() {
    let dir = scratch("rate");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let mut m = modem("m1", &sim);
    m.rate_per_minute = 2;
    let (_agent, mut status) = start_ready(agent_config(b.addr, &dir, vec![m]), b.addr).await;
    send_jobs(
        b.addr,
        serde_json::json!([
            job("r1", "+628123456789", "1"),
            job("r2", "+628123456789", "2"),
            job("r3", "+628123456789", "3")
        ]),
    )
    .await;
    status.wait("r1", Status::Sent, T).await;
    status.wait("r2", Status::Sent, T).await;
    // The third waits for the minute, and says so once.
    let held = status.wait("r3", Status::Held, T).await;
    let reason = held.reason.clone().unwrap_or_default();
    assert!(reason.contains("rate_per_minute = 2"), "{held:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let until = held.until.expect("until");
    assert!(until > now + 30 && until <= now + 61, "{held:?}");
    status.settle(Duration::from_secs(2)).await;
    assert_eq!(
        status.of("r3"),
        vec![Status::Queued, Status::Held],
        "the third SMS must wait for the minute"
    );
    assert_eq!(sim.messages().len(), 2);
}

/// A day's limit counts what was sent before a restart of the agent, and a job held by it that
/// expires ends `expired` without waiting for the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_limit_survives_a_restart_and_held_jobs_expire() {
    let dir = scratch("rateday");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let mut m = modem("m1", &sim);
    m.rate_per_day = 1;
    let cfg = agent_config(b.addr, &dir, vec![m]);
    {
        let (agent, mut status) = start_ready(cfg.clone(), b.addr).await;
        send_jobs(b.addr, serde_json::json!([job("d1", "+628123456789", "1")])).await;
        status.wait("d1", Status::Sent, T).await;
        stop(agent).await;
    }
    let (_agent, mut status) = start_ready(cfg, b.addr).await;
    let soon = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3;
    let mut d2 = job("d2", "+628123456789", "2");
    d2["expiration"] = serde_json::json!(soon);
    send_jobs(b.addr, serde_json::json!([d2])).await;
    let held = status.wait("d2", Status::Held, T).await;
    assert!(
        held.reason
            .as_deref()
            .is_some_and(|r| r.contains("rate_per_day = 1")),
        "{held:?}"
    );
    status.wait("d2", Status::Expired, T).await;
    assert_eq!(sim.messages().len(), 1, "the day's one SMS only");
}

/// An OTP (priority 100) that arrives behind a bulk batch goes out first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_otp_lane_overtakes_a_waiting_batch() {
    let dir = scratch("lane");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    // The modem does not answer at first: the jobs all wait in the queue.
    sim.set_silent(true);
    let a = wsmb_agent::agent::start(agent_config(b.addr, &dir, vec![modem("m1", &sim)]))
        .await
        .expect("agent");
    let mut status = common::StatusListener::new(b.addr).await;
    common::link_up(&a).await;
    let mut otp = job("otp", "+628123456789", "Your code is 1234");
    otp["priority"] = serde_json::json!(100);
    send_jobs(
        b.addr,
        serde_json::json!([
            job("b1", "+628123456789", "bulk 1"),
            job("b2", "+628123456789", "bulk 2"),
            job("b3", "+628123456789", "bulk 3"),
            otp
        ]),
    )
    .await;
    for id in ["b1", "b2", "b3", "otp"] {
        status.wait(id, Status::Queued, T).await;
    }
    assert!(!a.modems[0].health().is_ready());
    sim.set_silent(false);
    for id in ["b1", "b2", "b3", "otp"] {
        status.wait(id, Status::Sent, T).await;
    }
    let texts: Vec<String> = sim.messages().into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, ["Your code is 1234", "bulk 1", "bulk 2", "bulk 3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_wait_while_the_modem_is_silent_or_gone_and_go_out_after() {
    let dir = scratch("faults");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let (_agent, mut status) =
        start_ready(agent_config(b.addr, &dir, vec![modem("m1", &sim)]), b.addr).await;

    sim.set_silent(true);
    send_jobs(
        b.addr,
        serde_json::json!([job("s1", "+628123456789", "while silent")]),
    )
    .await;
    status.wait("modem:m1", Status::Modem, T).await;
    status.settle(Duration::from_millis(1500)).await;
    assert!(!status.of("s1").contains(&Status::Sent));
    sim.set_silent(false);
    let e = status
        .wait("s1", Status::Sent, Duration::from_secs(30))
        .await;
    assert_eq!(e.modem.as_deref(), Some("m1"));

    sim.disappear();
    send_jobs(
        b.addr,
        serde_json::json!([job("g1", "+628123456789", "while gone")]),
    )
    .await;
    status.settle(Duration::from_millis(1500)).await;
    assert!(!status.of("g1").contains(&Status::Sent));
    sim.reappear().expect("reappear");
    status
        .wait("g1", Status::Sent, Duration::from_secs(30))
        .await;
    let texts: Vec<String> = sim.messages().into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, vec!["while silent", "while gone"]);
    let states: Vec<Option<String>> = status
        .events
        .iter()
        .filter(|e| e.status == Status::Modem)
        .map(|e| e.modem_state.clone())
        .collect();
    assert!(
        states.contains(&Some("down".into())) && states.contains(&Some("ready".into())),
        "{states:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_stops_the_modem_and_the_jobs_stay_queued() {
    let dir = scratch("pin");
    let b = broker().await;
    let sim = sim(
        &dir,
        "m1",
        SimConfig {
            pin: Some("1234".into()),
            ..SimConfig::default()
        },
    )
    .await;
    let mut m = modem("m1", &sim);
    m.pin = "4321".into();
    let a = wsmb_agent::agent::start(agent_config(b.addr, &dir, vec![m]))
        .await
        .expect("agent");
    let mut status = StatusListener::new(b.addr).await;
    link_up(&a).await;
    send_jobs(b.addr, serde_json::json!([job("p1", "+628123456789", "x")])).await;
    let e = status.wait("modem:m1", Status::Modem, T).await;
    let e = if e.modem_state.as_deref() == Some("stopped") {
        e
    } else {
        status.settle(Duration::from_secs(2)).await;
        status
            .events
            .iter()
            .find(|e| e.modem_state.as_deref() == Some("stopped"))
            .cloned()
            .expect("stopped event")
    };
    assert!(
        e.reason.as_deref().is_some_and(|r| r.contains("wrong PIN")),
        "{e:?}"
    );
    status.settle(Duration::from_secs(1)).await;
    assert_eq!(status.of("p1"), vec![Status::Queued]);
    assert_eq!(
        a.store.state("p1").await.expect("state").as_deref(),
        Some("queued")
    );
    assert_eq!(sim.pin_attempts(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_produced_while_the_broker_is_away_are_published_after() {
    let dir = scratch("outbox");
    let b = broker().await;
    let addr = b.addr;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let a = wsmb_agent::agent::start(agent_config(addr, &dir, vec![modem("m1", &sim)]))
        .await
        .expect("agent");
    link_up(&a).await;
    modems_ready(&a).await;
    // a job sent while the status channel has no listener: 02 from the broker, not an error
    send_jobs(
        addr,
        serde_json::json!([job("early", "+628123456789", "x")]),
    )
    .await;
    sim.wait_messages(1, T).await;
    let mut status = StatusListener::new(addr).await;
    send_jobs(addr, serde_json::json!([job("late", "+628123456789", "y")])).await;
    status.wait("late", Status::Sent, T).await;
    // the outbox is empty once everything was acknowledged
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.store.outbox(0, 10).await.expect("outbox").1.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_drops_a_silent_broker_and_waits_for_a_late_one() {
    use futures_util::SinkExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = scratch("link");
    // A "broker" that accepts, says connect 00, then never reads again (pings unanswered).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let fake = listener.local_addr().expect("addr");
    let accepts = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&accepts);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut ws) = tokio_tungstenite::accept_async(s).await {
                let _ = ws
                    .send(tokio_tungstenite::tungstenite::Message::text(
                        r#"{"command":"connect","response_code":"00","response_text":"Accepted","data":[]}"#,
                    ))
                    .await;
                held.push(ws);
            }
        }
    });
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let mut cfg = agent_config(fake, &dir, vec![modem("m1", &sim)]);
    cfg.broker.ping_interval = Duration::from_millis(300);
    let a = wsmb_agent::agent::start(cfg).await.expect("agent");
    let deadline = tokio::time::Instant::now() + T;
    while accepts.load(Ordering::SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent did not give up on the silent broker"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reason = match a.link.borrow().clone() {
        wsmb_agent::link::LinkState::Down(r) => r,
        up => format!("{up:?}"),
    };
    assert!(
        reason.contains("no frame from the broker") || reason.contains("Up"),
        "{reason}"
    );
    a.shutdown.cancel();

    // a broker that is not there yet: the agent keeps trying and connects when it appears
    let spare = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let later = spare.local_addr().expect("addr");
    drop(spare);
    let dir = scratch("late");
    let sim2 = common::sim(&dir, "m2", SimConfig::default()).await;
    let a = wsmb_agent::agent::start(agent_config(later, &dir, vec![modem("m2", &sim2)]))
        .await
        .expect("agent");
    // Its first attempts fail (nothing listens there yet).
    let mut w = a.link.clone();
    tokio::time::timeout(T, async {
        loop {
            if matches!(&*w.borrow_and_update(), wsmb_agent::link::LinkState::Down(r) if r != "starting")
            {
                return;
            }
            w.changed().await.expect("the agent runs");
        }
    })
    .await
    .expect("a failed attempt to connect");
    let mut c = wsmb_broker::Config::default();
    c.storage.backend = wsmb_broker::config::Backend::Memory;
    c.server.listen = later.to_string();
    c.credentials.lines = vec!["qa:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1".into()];
    let _b = wsmb_broker::start(c)
        .await
        .expect("broker on the agent's address");
    link_up(&a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_expires_while_waiting_is_reported_expired_not_sent() {
    let dir = scratch("expiry");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let (_agent, mut status) =
        start_ready(agent_config(b.addr, &dir, vec![modem("m1", &sim)]), b.addr).await;
    sim.disappear();
    let soon = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 2;
    send_jobs(
        b.addr,
        serde_json::json!([{"id": "otp-late", "receiver": "+628123456789", "message": "code 1", "expiration": soon.to_string()}]),
    )
    .await;
    status.wait("otp-late", Status::Queued, T).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    sim.reappear().expect("reappear");
    let e = status.wait("otp-late", Status::Expired, T).await;
    assert!(e.reason.as_deref().is_some_and(|r| r.contains("expired")));
    status.settle(Duration::from_millis(500)).await;
    assert!(
        sim.messages().is_empty(),
        "an expired OTP must never go out late"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_sent_while_the_agent_is_away_wait_in_the_broker_until_the_agent_has_them() {
    let dir = scratch("durable");
    let mut c = wsmb_broker::Config::default();
    c.server.listen = "127.0.0.1:0".into();
    c.credentials.lines = vec!["qa:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1".into()];
    c.storage.path = dir.join("broker.sqlite");
    let b = wsmb_broker::start(c).await.expect("broker with SQLite");
    for i in 0..3 {
        send_jobs(
            b.addr,
            serde_json::json!([job(
                &format!("d{i}"),
                "+628123456789",
                &format!("durable {i}")
            )]),
        )
        .await;
    }
    let stored = || b.shared.engine.store().expect("storage").stored();
    assert_eq!(stored(), 3);
    let mut status = StatusListener::new(b.addr).await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let a = wsmb_agent::agent::start(agent_config(b.addr, &dir, vec![modem("m1", &sim)]))
        .await
        .expect("agent");
    for i in 0..3 {
        status.wait(&format!("d{i}"), Status::Sent, T).await;
    }
    // acknowledged once stored by the agent: nothing left in the broker
    let deadline = tokio::time::Instant::now() + T;
    while stored() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} still stored",
            stored()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let texts: Vec<String> = sim.messages().into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, vec!["durable 0", "durable 1", "durable 2"]);
    a.shutdown.cancel();
}

/// A TLS front (socat with a self-signed certificate for `localhost`, made by openssl) to the
/// in-process broker. Returns the TLS port, the certificate file and the socat process.
fn tls_front(
    dir: &std::path::Path,
    broker: std::net::SocketAddr,
) -> (u16, std::path::PathBuf, std::process::Child) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl (installed by .ci/run)")
        .success();
    assert!(ok, "openssl req failed");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = std::process::Command::new("socat")
        .arg(format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
            cert.display(),
            key.display()
        ))
        .arg(format!("TCP:{broker}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("socat (installed by .ci/run)");
    (port, cert, child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_works_over_wss_with_a_private_certificate() {
    let dir = scratch("wss");
    let b = broker().await;
    let (port, cert, mut socat) = tls_front(&dir, b.addr);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;

    // without the certificate: refused, and the reason says why
    let mut cfg = agent_config(b.addr, &dir.join("a"), vec![modem("m1", &sim)]);
    cfg.broker.url = format!("wss://localhost:{port}/");
    let a = wsmb_agent::agent::start(cfg.clone()).await.expect("agent");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let state = a.link.borrow().clone();
    assert!(
        matches!(&state, wsmb_agent::link::LinkState::Down(r) if r.to_lowercase().contains("certificate")),
        "{state:?}"
    );
    a.shutdown.cancel();
    let _ = a.task.await;
    drop(a.modems); // releases the modem's port

    // trusting it: up, and a job goes through
    cfg.broker.ca_file = cert;
    cfg.agent.state_dir = dir.join("b");
    cfg.validate().expect("valid");
    let a = wsmb_agent::agent::start(cfg).await.expect("agent");
    let mut status = StatusListener::new(b.addr).await;
    link_up(&a).await;
    send_jobs(
        b.addr,
        serde_json::json!([job("tls-1", "+628123456789", "over TLS")]),
    )
    .await;
    status.wait("tls-1", Status::Sent, T).await;
    let _ = socat.kill();
    let _ = socat.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_without_an_id_delivered_again_is_sent_once() {
    // A broker redelivers a frame (same message_id) when the agent's acknowledgement was lost;
    // a job without an id of its own must be recognised, not sent a second time.
    let dir = scratch("noid");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let cfg = agent_config(b.addr, &dir, vec![modem("m1", &sim)]);
    let (a, mut status) = start_ready(cfg.clone(), b.addr).await;
    let frame = serde_json::json!({"command": "send-message", "channel": "sms",
        "data": [{"receiver": "+628123456789", "message": "no id"}]})
    .to_string();
    for _ in 0..2 {
        wsmb_agent::link::intake(&a.store, &cfg, &frame, Some("19ac8f0e1b2-7"))
            .await
            .expect("stored");
    }
    status.wait("local-19ac8f0e1b2-7.0", Status::Sent, T).await;
    status.settle(Duration::from_millis(500)).await;
    assert_eq!(
        sim.messages(),
        vec![("+628123456789".to_owned(), "no id".to_owned())]
    );
    assert_eq!(
        status.of("local-19ac8f0e1b2-7.0"),
        vec![Status::Queued, Status::Sent]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_events_the_broker_cannot_take_are_kept_and_sent_again() {
    // The broker's store holds one message per channel: the agent's first status frame is
    // stored (nobody listens yet), the next gets 04 (storage full). Those events must not be
    // dropped: once an application takes the stored one, they arrive.
    let dir = scratch("status04");
    let mut c = wsmb_broker::Config::default();
    c.server.listen = "127.0.0.1:0".into();
    c.credentials.lines = vec!["qa:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1".into()];
    c.storage.path = dir.join("broker.sqlite");
    c.storage.max_stored_per_channel = 1;
    let b = wsmb_broker::start(c).await.expect("broker with SQLite");
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let a = wsmb_agent::agent::start(agent_config(b.addr, &dir, vec![modem("m1", &sim)]))
        .await
        .expect("agent");
    link_up(&a).await;
    modems_ready(&a).await;
    send_jobs(
        b.addr,
        serde_json::json!([job("k1", "+628123456789", "kept")]),
    )
    .await;
    // sent by the modem, while the status frames after the first are refused
    let deadline = tokio::time::Instant::now() + T;
    while sim.messages().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "not sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = b.shared.engine.store().expect("store");
    let deadline = tokio::time::Instant::now() + T;
    while store.stored_on("sms-status") == 0 {
        assert!(tokio::time::Instant::now() < deadline, "nothing stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut status = StatusListener::new(b.addr).await;
    status.wait("k1", Status::Sent, T).await;
    assert!(
        status.of("k1").contains(&Status::Queued),
        "{:?}",
        status.of("k1")
    );
    a.shutdown.cancel();
}

/// Delivery reports (`+CDS`) settle sent jobs: delivered when every part is (a three-part
/// message waits for its three reports), failed for good with the network's reason; a
/// temporary status waits for the final one; a report that matches nothing is counted and
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_reports_settle_sent_jobs() {
    use wsmb_agent::pdu::{SmscTime, StatusReport};
    let dir = scratch("reports");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let mut cfg = agent_config(b.addr, &dir, vec![modem("m1", &sim)]);
    cfg.agent.status_report = true;
    let (agent, mut status) = start_ready(cfg, b.addr).await;
    let long = "Kode OTP Anda 482913. ".repeat(20);
    send_jobs(
        b.addr,
        serde_json::json!([
            job("ok", "+628123456789", "one part"),
            job("long", "+628123456789", &long),
            job("gone", "+628127777777", "to a number that never answers")
        ]),
    )
    .await;
    let mut mr = std::collections::HashMap::new();
    for id in ["ok", "long", "gone"] {
        let e = status.wait(id, Status::Sent, T).await;
        mr.insert(id, e.message_references.clone());
    }
    assert_eq!(mr["long"].len(), 3, "three parts: {mr:?}");
    let now = SmscTime {
        epoch: 1_796_491_800,
        offset_minutes: 420,
    };
    let report = |mr: u8, to: &str, st: u8| StatusReport {
        mr,
        recipient: to.into(),
        submitted: now,
        discharged: now,
        status: st,
    };
    // One part, delivered (the report gives the number in national form: still matched).
    sim.send_report(report(mr["ok"][0], "08123456789", 0x00));
    let e = status.wait("ok", Status::Delivered, T).await;
    assert_eq!(e.modem.as_deref(), Some("m1"));
    // Three parts: two reports are not enough; a temporary state is not final.
    sim.send_report(report(mr["long"][0], "+628123456789", 0x00));
    sim.send_report(report(mr["long"][1], "+628123456789", 0x21));
    sim.send_report(report(mr["long"][2], "+628123456789", 0x00));
    status.settle(Duration::from_millis(1500)).await;
    assert_eq!(
        status.of("long"),
        vec![Status::Queued, Status::Sent],
        "not yet"
    );
    sim.send_report(report(mr["long"][1], "+628123456789", 0x00));
    status.wait("long", Status::Delivered, T).await;
    // Failed for good, with the network's reason.
    sim.send_report(report(mr["gone"][0], "+628127777777", 0x46));
    let e = status.wait("gone", Status::Failed, T).await;
    let reason = e.reason.unwrap_or_default();
    assert!(reason.contains("validity period expired"), "{reason}");
    assert_eq!(e.error_code.as_deref(), Some("not_delivered"));
    // Nothing matches: counted, nothing else changes; a repeated report changes nothing.
    sim.send_report(report(mr["ok"][0], "+4915112345678", 0x00));
    sim.send_report(report(mr["ok"][0], "+628123456789", 0x00));
    let deadline = tokio::time::Instant::now() + T;
    while agent.store.unmatched_reports().await.expect("count") < 1 {
        assert!(tokio::time::Instant::now() < deadline, "not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    status.settle(Duration::from_millis(1000)).await;
    for id in ["ok", "long"] {
        let n = status
            .of(id)
            .iter()
            .filter(|s| **s == Status::Delivered)
            .count();
        assert_eq!(n, 1, "{id}: {:?}", status.of(id));
    }
    assert_eq!(agent.store.unmatched_reports().await.expect("count"), 1);
}

/// The simulator's own reports (as a network gives them) reach the job, part by part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_that_reports_every_part_gets_the_job_delivered() {
    let dir = scratch("netreports");
    let b = broker().await;
    let sim = sim(
        &dir,
        "m1",
        SimConfig {
            delivery_report: Some(0x00),
            ..SimConfig::default()
        },
    )
    .await;
    let (_agent, mut status) =
        start_ready(agent_config(b.addr, &dir, vec![modem("m1", &sim)]), b.addr).await;
    let mut j = job("asked", "+628123456789", &"x".repeat(400));
    j["delivery_report"] = serde_json::json!(true);
    send_jobs(
        b.addr,
        serde_json::json!([j, job("not-asked", "+628123456789", "no report wanted")]),
    )
    .await;
    status.wait("asked", Status::Delivered, T).await;
    status.wait("not-asked", Status::Sent, T).await;
    status.settle(Duration::from_millis(800)).await;
    assert!(!status.of("not-asked").contains(&Status::Delivered));
    assert_eq!(sim.reports().len(), 3, "one per part of the job that asked");
}

/// A modem that stores reports (`+CDSI: "SR",<index>`): each is read, taken and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_delivery_reports_are_read_and_deleted() {
    let dir = scratch("cdsi");
    let b = broker().await;
    let sim = sim(
        &dir,
        "m1",
        SimConfig {
            delivery_report: Some(0x00),
            store_reports: true,
            ..SimConfig::default()
        },
    )
    .await;
    let mut cfg = agent_config(b.addr, &dir, vec![modem("m1", &sim)]);
    cfg.agent.status_report = true;
    let (_agent, mut status) = start_ready(cfg, b.addr).await;
    send_jobs(
        b.addr,
        serde_json::json!([job("sr", "+628123456789", "stored report")]),
    )
    .await;
    status.wait("sr", Status::Delivered, T).await;
    wait_storage_empty(&sim).await;
    assert!(
        sim.commands().iter().any(|c| c == "AT+CPMS=\"SR\""),
        "{:?}",
        sim.commands()
    );
}

fn by_sender(
    got: &[wsmb_protocol::sms::InboxMessage],
    sender: &str,
) -> wsmb_protocol::sms::InboxMessage {
    got.iter()
        .find(|m| m.sender == sender)
        .unwrap_or_else(|| panic!("nothing from {sender}: {got:#?}"))
        .clone()
}

/// Received SMS (PDUs from Gammu's encoder): announced ones and one whose indication the modem
/// dropped (found by the sweep), a three-part UCS-2 message arriving out of order, an
/// alphanumeric sender, the same SMS read twice; each is published once on `sms-inbox` with
/// its parts joined, and deleted from the modem. A message whose last part never comes is
/// published with what came, marked partial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_sms_are_joined_published_once_and_deleted() {
    use common::gammu;
    let dir = scratch("inbound");
    let b = broker().await;
    let sim = sim(&dir, "m1", SimConfig::default()).await;
    let mut cfg = agent_config(b.addr, &dir, vec![modem("m1", &sim)]);
    cfg.agent.inbox_sweep = Duration::from_secs(1);
    cfg.agent.inbox_part_timeout = Duration::from_secs(2);
    let mut inbox = InboxListener::new(b.addr).await;
    let (_agent, _status) = start_ready(cfg, b.addr).await;

    let reply = gammu::deliver("YA, saya setuju", "+628123456789", false);
    let long = "Terima kasih 🙏 — pesanan Anda #4821 sudah kami terima. ".repeat(3);
    let parts = gammu::deliver(&long, "08126666666", true);
    assert_eq!(parts.len(), 3, "three UCS-2 parts");
    let bank = gammu::deliver("Saldo Anda €100 [OK] {ref}", "BANK", false);
    let quiet = gammu::deliver("no indication for this one", "+4915112345678", false);
    sim.receive(&reply[0], true).expect("room");
    for k in [2, 0, 1] {
        sim.receive(&parts[k], true).expect("room");
    }
    sim.receive(&bank[0], true).expect("room");
    sim.receive(&reply[0], true).expect("room"); // read again
    sim.receive(&quiet[0], false).expect("room");
    // Passed on directly, not stored (+CMT: ,<length> and the PDU).
    let direct = gammu::deliver("langsung", "+628129999999", false);
    let len = format!("+CMT: ,{}", direct[0].len() / 2 - 8);
    sim.unsolicited(&[&len, &direct[0]]);
    let got = inbox.wait(5, T).await;
    inbox.settle(Duration::from_millis(1500)).await;
    assert_eq!(inbox.messages.len(), 5, "each once: {:#?}", inbox.messages);
    assert_eq!(by_sender(&got, "+628129999999").message, "langsung");
    let by = |sender: &str| {
        got.iter()
            .find(|m| m.sender == sender)
            .unwrap_or_else(|| panic!("nothing from {sender}: {got:#?}"))
            .clone()
    };
    let m = by("+628123456789");
    assert_eq!(
        (m.message.as_str(), m.parts, m.partial),
        ("YA, saya setuju", 1, false)
    );
    assert_eq!(m.received_at, "2026-12-05T17:30:00+00:00");
    assert_eq!(m.modem.as_deref(), Some("m1"));
    let m = by("08126666666");
    assert_eq!(
        (m.message.as_str(), m.parts, m.coding.as_str()),
        (long.as_str(), 3, "ucs2")
    );
    assert_eq!(by("BANK").message, "Saldo Anda €100 [OK] {ref}");
    assert_eq!(by("+4915112345678").message, "no indication for this one");
    let ids: std::collections::HashSet<&str> = got.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.len(), 5);
    wait_storage_empty(&sim).await;

    // Only the first of two parts: published after the timeout, marked partial.
    let two = gammu::deliver(&"a".repeat(200), "+628127777777", false);
    sim.receive(&two[0], true).expect("room");
    let got = inbox.wait(6, T).await;
    let m = got
        .iter()
        .find(|m| m.sender == "+628127777777")
        .expect("partial");
    assert!(m.partial, "{m:?}");
    assert_eq!(m.message, "a".repeat(153));
}

/// SMS that came while the agent was away, filling the SIM's storage (the network cannot
/// deliver more), are taken when it starts, the storage is cleared, and the next SMS arrives;
/// a message whose parts straddle the restart is joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_storage_left_while_away_is_taken_and_cleared_at_start() {
    use common::gammu;
    let dir = scratch("inbound-away");
    let b = broker().await;
    let sim = sim(
        &dir,
        "m1",
        SimConfig {
            storage_slots: 3,
            ..SimConfig::default()
        },
    )
    .await;
    let cfg = agent_config(b.addr, &dir, vec![modem("m1", &sim)]);
    let mut inbox = InboxListener::new(b.addr).await;
    let split = gammu::deliver(&"b".repeat(300), "+628123456789", false);
    {
        let (agent, _status) = start_ready(cfg.clone(), b.addr).await;
        sim.receive(&split[0], true).expect("room");
        wait_storage_empty(&sim).await;
        stop(agent).await;
    }
    // Away: the second part and two more SMS fill the storage; a fourth finds no room.
    sim.receive(&split[1], true).expect("room");
    for t in ["one", "two"] {
        sim.receive(&gammu::deliver(t, "+628126666666", false)[0], true)
            .expect("room");
    }
    let later = gammu::deliver("after the storage was cleared", "+628126666666", false);
    assert!(sim.receive(&later[0], true).is_none(), "full");
    let (_agent, _status) = start_ready(cfg, b.addr).await;
    let got = inbox.wait(3, T).await;
    let texts: std::collections::BTreeSet<String> = got.iter().map(|m| m.message.clone()).collect();
    assert!(
        texts.contains(&"b".repeat(300)),
        "joined across the restart: {got:#?}"
    );
    assert!(texts.contains("one") && texts.contains("two"), "{got:#?}");
    // Published once stored; deleted from the modem right after.
    wait_storage_empty(&sim).await;
    sim.receive(&later[0], true).expect("room again");
    let got = inbox.wait(4, T).await;
    assert!(
        got.iter()
            .any(|m| m.message == "after the storage was cleared")
    );
}

/// A modem that failed to delete what the agent took fills up; when it says its storage is full
/// (`^SMMEMFULL`), the agent reads it at once, recognises what it has (published once), clears
/// it, and the next SMS arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_storage_is_cleared_of_what_was_taken_when_the_modem_says_so() {
    use common::gammu;
    let dir = scratch("inbound-full");
    let b = broker().await;
    let sim = sim(
        &dir,
        "m1",
        SimConfig {
            storage_slots: 2,
            ..SimConfig::default()
        },
    )
    .await;
    let mut cfg = agent_config(b.addr, &dir, vec![modem("m1", &sim)]);
    cfg.agent.inbox_sweep = Duration::from_secs(3600);
    let mut inbox = InboxListener::new(b.addr).await;
    let (_agent, _status) = start_ready(cfg, b.addr).await;
    sim.set_refuse_delete(true);
    for t in ["first", "second"] {
        sim.receive(&gammu::deliver(t, "+628126666666", false)[0], true)
            .expect("room");
    }
    inbox.wait(2, T).await;
    // Both deletes tried (and refused) before the modem deletes again.
    let deadline = tokio::time::Instant::now() + T;
    while sim
        .commands()
        .iter()
        .filter(|c| c.starts_with("AT+CMGD="))
        .count()
        < 2
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            sim.commands()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim.stored().len(), 2, "not deleted: the storage is full");
    sim.set_refuse_delete(false);
    let third = gammu::deliver("third", "+628126666666", false);
    assert!(sim.receive(&third[0], true).is_none(), "full: ^SMMEMFULL");
    wait_storage_empty(&sim).await;
    sim.receive(&third[0], true).expect("room again");
    let got = inbox.wait(3, T).await;
    inbox.settle(Duration::from_millis(1000)).await;
    let texts: Vec<&str> = inbox.messages.iter().map(|m| m.message.as_str()).collect();
    assert_eq!(texts, ["first", "second", "third"], "each once: {got:#?}");
}

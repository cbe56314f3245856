//! The `wsmb-broker` binary as users run it: command line, config checks, signals, logs, and the
//! legacy PHP client's exact behaviour against the real process.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::legacy::{LegacyClient, ReadOutcome, pretty_sms_request};
use common::process::{BrokerProcess, TempDir, bin};
use common::{basic, connect_as, connect_raw, expect_close, receive_on, reply, send, sms};

const QA_LINE: &str = "qa:$apr1$v7oipsaf$bHYHIpWTQbVLBGRumBHIG1\n";

fn out(cmd: &mut Command) -> (i32, String, String) {
    let o = cmd.output().expect("run wsmb-broker");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs Apache's `htpasswd` tool (Debian package apache2-utils, installed by .ci/run).
fn htpasswd(flag: &str, user: &str, pass: &str) -> String {
    let o = Command::new("htpasswd")
        .args(["-n", "-b", flag, user, pass])
        .output()
        .expect("the htpasswd command (apache2-utils)");
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout).trim().to_owned() + "\n"
}

#[test]
fn help_and_version() {
    let (code, stdout, _) = out(bin().arg("--help"));
    assert_eq!(code, 0);
    for word in ["check-config", "--config", "--listen", "--htpasswd"] {
        assert!(stdout.contains(word), "--help lacks {word}: {stdout}");
    }
    let (code, stdout, _) = out(bin().arg("--version"));
    assert_eq!(code, 0);
    assert_eq!(
        stdout.trim(),
        format!("wsmb-broker {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_config_accepts_the_example_and_names_problems() {
    let dir = TempDir::new("check");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/broker.example.toml");
    let users =
        htpasswd("-B", "bob", "s3cret") + &htpasswd("-m", "ann", "x") + &htpasswd("-s", "sid", "y");
    let hp = dir.file("htpasswd", &users);
    let (code, stdout, stderr) =
        out(bin().args(["check-config", "--config", example, "--htpasswd", &hp]));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("users: 3 (1 apr1, 1 bcrypt, 1 {SHA})"),
        "{stdout}"
    );
    assert!(stdout.contains("configuration OK"), "{stdout}");

    // an unsupported entry: file and line named, fix given
    let bad = dir.file("bad", &format!("{QA_LINE}# comment\neve:$6$salt$hash\n"));
    let (code, _, stderr) =
        out(bin().args(["check-config", "--config", example, "--htpasswd", &bad]));
    assert_eq!(code, 2);
    assert!(stderr.contains(&format!("{bad} line 3")), "{stderr}");
    assert!(
        stderr.contains("SHA-512") && stderr.contains("htpasswd -B"),
        "{stderr}"
    );

    // an unknown key
    let cfg = dir.file("b.toml", "[server]\nport = 8888\n");
    let (code, _, stderr) = out(bin().args(["check-config", "--config", &cfg]));
    assert_eq!(code, 2);
    assert!(
        stderr.contains("port") && stderr.contains("b.toml"),
        "{stderr}"
    );

    // a missing file given explicitly
    let (code, _, stderr) =
        out(bin().args(["check-config", "--config", "/nonexistent/broker.toml"]));
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/broker.toml"), "{stderr}");

    // a bad flag value
    let (code, _, stderr) =
        out(bin().args(["check-config", "--config", example, "--listen", "localhost"]));
    assert_eq!(code, 2);
    assert!(stderr.contains("server.listen"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bcrypt_from_apache_htpasswd_and_env_credentials_work() {
    let dir = TempDir::new("run");
    let hp = dir.file("htpasswd", &htpasswd("-B", "bob", "s3cret"));
    let env_line = htpasswd("-s", "envuser", "envpass");
    let p = BrokerProcess::spawn(
        &["--htpasswd", &hp],
        &[("WSMB_CREDENTIALS", env_line.trim())],
    );
    connect_as(p.addr, ("bob", "s3cret")).await;
    connect_as(p.addr, ("envuser", "envpass")).await;
    let mut ws = connect_raw(p.addr, Some(("bob", "wrong"))).await;
    assert_eq!(reply(&mut ws).await.response_code, "01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_everyone_with_1001_and_exits_0() {
    let dir = TempDir::new("term");
    let hp = dir.file("htpasswd", QA_LINE);
    let mut p = BrokerProcess::spawn(&["--htpasswd", &hp], &[]);
    let mut rx = connect_as(p.addr, ("qa", "4lt0@1234")).await;
    receive_on(&mut rx, "sms").await;
    let mut tx = connect_as(p.addr, ("qa", "4lt0@1234")).await;
    for i in 0..50 {
        send(&mut tx, &sms("sms", &format!("t{i}"))).await;
    }
    for _ in 0..50 {
        assert_eq!(reply(&mut tx).await.response_code, "00");
    }
    p.signal("TERM");
    // rx has not read yet: the 50 messages come first, then the close
    for i in 0..50 {
        assert!(
            common::recv_text(&mut rx)
                .await
                .contains(&format!("\"t{i}\""))
        );
    }
    assert_eq!(expect_close(&mut rx).await, Some(1001));
    let status = tokio::task::spawn_blocking(move || {
        let s = p.wait_exit(Duration::from_secs(15));
        (s, p.log())
    })
    .await
    .expect("join");
    assert!(
        status.0.success(),
        "exit status {:?}\n{}",
        status.0,
        status.1
    );
    assert!(status.1.contains("SIGTERM received"), "{}", status.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_credentials() {
    let dir = TempDir::new("hup");
    let hp = dir.file("htpasswd", QA_LINE);
    let cfg = dir.file(
        "broker.toml",
        &format!(
            "[credentials]\nfiles = [\"{hp}\"]\nreload_interval = \"0s\"\n[storage]\nbackend = \"memory\"\n"
        ),
    );
    let p = BrokerProcess::spawn(&["--config", &cfg], &[]);
    let mut keep = connect_as(p.addr, ("qa", "4lt0@1234")).await;
    std::fs::write(&hp, htpasswd("-m", "newbie", "pw")).expect("write");
    // no polling: nothing changes until SIGHUP
    tokio::time::sleep(Duration::from_millis(300)).await;
    connect_as(p.addr, ("qa", "4lt0@1234")).await;
    p.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut ws = connect_raw(p.addr, Some(("newbie", "pw"))).await;
        if reply(&mut ws).await.response_code == "00" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP reload not seen:\n{}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ws = connect_raw(p.addr, Some(("qa", "4lt0@1234"))).await;
    assert_eq!(reply(&mut ws).await.response_code, "01");
    // the connection from before the reload is untouched
    send(&mut keep, r#"{"command":"ping"}"#).await;
    assert_eq!(reply(&mut keep).await.response_code, "00");
    assert!(p.log().contains("credentials reloaded (SIGHUP)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_contain_passwords_or_authorization_headers() {
    let dir = TempDir::new("logs");
    let hp = dir.file("htpasswd", QA_LINE);
    let mut p = BrokerProcess::spawn(&["--htpasswd", &hp, "--log-level", "trace"], &[]);
    let mut ok = connect_as(p.addr, ("qa", "4lt0@1234")).await;
    send(&mut ok, &sms("sms", "x")).await;
    reply(&mut ok).await;
    let mut bad = connect_raw(p.addr, Some(("qa", "Wr0ngPassw0rd"))).await;
    reply(&mut bad).await;
    p.signal("TERM");
    let log = tokio::task::spawn_blocking(move || {
        p.wait_exit(Duration::from_secs(15));
        p.log()
    })
    .await
    .expect("join");
    assert!(log.contains("wrong user name or password"), "{log}");
    for secret in [
        "4lt0@1234".to_owned(),
        "Wr0ngPassw0rd".to_owned(),
        basic("qa", "4lt0@1234")["Basic ".len()..].to_owned(),
        basic("qa", "Wr0ngPassw0rd")["Basic ".len()..].to_owned(),
        "bHYHIpWTQbVLBGRumBHIG1".to_owned(),
    ] {
        assert!(!log.contains(&secret), "log contains {secret}:\n{log}");
    }
}

#[test]
fn legacy_php_sender_gets_a_json_reply_at_once() {
    let dir = TempDir::new("legacy-sender");
    let hp = dir.file("htpasswd", QA_LINE);
    let p = BrokerProcess::spawn(&["--htpasswd", &hp], &[]);
    let auth = vec![basic("qa", "4lt0@1234").replace("Basic", "Authorization: Basic")];
    for _ in 0..3 {
        let t0 = Instant::now();
        let mut c = LegacyClient::open(p.addr, &auth, Duration::from_secs(10)).expect("open");
        assert!(
            c.handshake.ends_with("\r\n\r\n"),
            "frame inside the handshake read"
        );
        let msg = pretty_sms_request(
            "sms",
            "6560a1b2c3d4e",
            "08126666666",
            "Haloo. Pesan ini dikirim é",
        );
        c.write(msg.as_bytes()).expect("write");
        let r = c.read();
        let waited = t0.elapsed();
        let ReadOutcome::Data(d) = r else {
            panic!("no reply: {r:?}")
        };
        let v: serde_json::Value = serde_json::from_slice(&d).expect("a JSON reply");
        assert_eq!(v["command"], "connect");
        assert_eq!(v["response_code"], "00");
        assert!(waited < Duration::from_secs(2), "reply took {waited:?}");
        // the acknowledgement follows
        let ReadOutcome::Data(d) = c.read() else {
            panic!("no send-result")
        };
        let v: serde_json::Value = serde_json::from_slice(&d).expect("json");
        assert_eq!(v["command"], "send-result");
        assert_eq!(v["data"][0]["ids"][0], "6560a1b2c3d4e");
    }
    // wrong password: the legacy sender reads the 01 frame, then the connection closes
    let auth = vec![basic("qa", "nope").replace("Basic", "Authorization: Basic")];
    let mut c = LegacyClient::open(p.addr, &auth, Duration::from_secs(10)).expect("open");
    c.write(pretty_sms_request("sms", "1", "0812", "x").as_bytes())
        .expect("write");
    let ReadOutcome::Data(d) = c.read() else {
        panic!("no reply")
    };
    let v: serde_json::Value = serde_json::from_slice(&d).expect("json");
    assert_eq!(v["response_code"], "01");
    assert!(matches!(c.read(), ReadOutcome::Closed));
}

#[test]
fn legacy_php_receiver_sees_connect_then_messages_byte_for_byte() {
    let dir = TempDir::new("legacy-receiver");
    let hp = dir.file("htpasswd", QA_LINE);
    let p = BrokerProcess::spawn(&["--htpasswd", &hp], &[]);
    let auth = vec![
        basic("qa", "4lt0@1234").replace("Basic", "Authorization: Basic"),
        "Content-type: application/json".to_owned(),
    ];
    let mut rx = LegacyClient::open(p.addr, &auth, Duration::from_secs(10)).expect("open");
    let req =
        "{\n    \"command\": \"receive-message\",\n    \"channel\": \"sms\",\n    \"data\": []\n}";
    rx.write(req.as_bytes()).expect("write");
    let ReadOutcome::Data(first) = rx.read() else {
        panic!("nothing read")
    };
    let v: serde_json::Value = serde_json::from_slice(&first).expect("json");
    assert_eq!(v["command"], "connect", "receiver.php must print Connected");
    assert_eq!(v["response_code"], "00");

    // a legacy sender: small, 16-bit and 64-bit length forms
    let auth = vec![basic("qa", "4lt0@1234").replace("Basic", "Authorization: Basic")];
    for size in [10usize, 300, 70_000] {
        let mut tx = LegacyClient::open(p.addr, &auth, Duration::from_secs(10)).expect("open");
        let msg = pretty_sms_request(
            "sms",
            &format!("id{size}"),
            "+628126666666",
            &"é".repeat(size),
        );
        tx.write(msg.as_bytes()).expect("write");
        let ReadOutcome::Data(got) = rx.read() else {
            panic!("receiver got nothing")
        };
        assert_eq!(got, msg.as_bytes(), "not byte for byte (size {size})");
    }
}

#[test]
fn an_unsupported_htpasswd_entry_stops_start_up_with_file_and_line() {
    let dir = TempDir::new("badstart");
    let bad = dir.file("htpasswd", &format!("{QA_LINE}zed:{{SHA}}short\n"));
    let o = bin()
        .args(["--htpasswd", &bad, "--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run");
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains(&format!("{bad} line 2")), "{stderr}");
    assert!(stderr.contains("zed"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_is_a_graceful_stop_too() {
    let dir = TempDir::new("int");
    let hp = dir.file("htpasswd", QA_LINE);
    let mut p = BrokerProcess::spawn(&["--htpasswd", &hp], &[]);
    let mut ws = connect_as(p.addr, ("qa", "4lt0@1234")).await;
    p.signal("INT");
    assert_eq!(expect_close(&mut ws).await, Some(1001));
    let st = tokio::task::spawn_blocking(move || p.wait_exit(Duration::from_secs(15)))
        .await
        .expect("join");
    assert!(st.success());
}

/// Runs `wsmb-broker passwd ARGS` with `stdin` piped in.
fn passwd(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    use std::io::Write as _;
    let mut cmd = bin();
    cmd.arg("passwd")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("wsmb-broker passwd");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).expect("write stdin");
    }
    drop(input);
    let o = child.wait_with_output().expect("wait");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Apache's `htpasswd -v` agrees that `user` has `pass` in `file`.
fn apache_verifies(file: &str, user: &str, pass: &str) -> bool {
    Command::new("htpasswd")
        .args(["-v", "-b", file, user, pass])
        .output()
        .expect("the htpasswd command (apache2-utils)")
        .status
        .success()
}

async fn wait_accepts(
    addr: std::net::SocketAddr,
    creds: (&str, &str),
    want: &str,
    log: &dyn Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut ws = connect_raw(addr, Some(creds)).await;
        if reply(&mut ws).await.response_code == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{creds:?} never got {want}:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwd_adds_changes_and_removes_users_that_the_running_broker_picks_up() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("passwd");
    let hp = dir.file("htpasswd", &format!("# the broker's users\n{QA_LINE}"));
    std::fs::set_permissions(&hp, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let cfg = dir.file(
        "broker.toml",
        &format!(
            "[credentials]\nfiles = [\"{hp}\"]\nreload_interval = \"100ms\"\n[storage]\nbackend = \"memory\"\n"
        ),
    );
    let p = BrokerProcess::spawn(&["--config", &cfg], &[]);
    let log = || p.log();

    // Add (bcrypt by default), from stdin; Apache's own tool reads the result.
    let (code, stdout, stderr) = passwd(&["--stdin", &hp, "app"], Some("first pass\n"));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("\"app\" added"), "{stdout}");
    assert!(apache_verifies(&hp, "app", "first pass"));
    assert!(
        std::fs::read_to_string(&hp)
            .expect("read")
            .contains("app:$2y$10$")
    );
    wait_accepts(p.addr, ("app", "first pass"), "00", &log).await;

    // Change, with --apr1 and then --sha; the others keep working, the mode is kept.
    let (code, stdout, _) = passwd(&["--stdin", "--apr1", &hp, "app"], Some("second\n"));
    assert_eq!(code, 0);
    assert!(stdout.contains("password changed"), "{stdout}");
    assert!(apache_verifies(&hp, "app", "second"));
    wait_accepts(p.addr, ("app", "second"), "00", &log).await;
    let (code, _, _) = passwd(&["--stdin", "--sha", &hp, "app"], Some("third"));
    assert_eq!(code, 0);
    assert!(apache_verifies(&hp, "app", "third"));
    wait_accepts(p.addr, ("app", "third"), "00", &log).await;
    wait_accepts(p.addr, ("qa", "4lt0@1234"), "00", &log).await;
    let text = std::fs::read_to_string(&hp).expect("read");
    assert!(
        text.starts_with("# the broker's users\nqa:$apr1$"),
        "{text}"
    );
    let mode = std::fs::metadata(&hp).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o640);

    // Remove.
    let (code, stdout, _) = passwd(&["--delete", &hp, "app"], None);
    assert_eq!(code, 0);
    assert!(stdout.contains("\"app\" deleted"), "{stdout}");
    wait_accepts(p.addr, ("app", "third"), "01", &log).await;
    let (code, _, stderr) = passwd(&["--delete", &hp, "app"], None);
    assert_eq!(code, 2);
    assert!(stderr.contains("there is no user \"app\""), "{stderr}");

    // Never from the command line; no terminal to prompt on names --stdin; bad input changes
    // nothing.
    let before = std::fs::read(&hp).expect("read");
    let (code, _, stderr) = passwd(&[&hp, "app", "secret"], None);
    assert_eq!(code, 2, "{stderr}");
    // The prompt, on a real pseudo-terminal (util-linux `script` gives the command one and
    // types what it reads from stdin, ahead of the prompts, so the terminal's own echo of the
    // type-ahead is in the output): asked twice; a mismatch changes nothing.
    let prompt = |typed: &str| {
        use std::io::Write as _;
        let mut child = Command::new("script")
            .args(["-qec"])
            .arg(format!(
                "{} passwd {hp} viaprompt",
                env!("CARGO_BIN_EXE_wsmb-broker")
            ))
            .arg("/dev/null")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("script (util-linux)");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(typed.as_bytes())
            .expect("type");
        let o = child.wait_with_output().expect("wait");
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (code, out) = prompt("typo one\ntypo two\n");
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("do not match"), "{out}");
    assert_eq!(std::fs::read(&hp).expect("read"), before);
    let (code, out) = prompt("prompted pw\nprompted pw\n");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("New password for viaprompt") && out.contains("Retype it"),
        "{out}"
    );
    assert!(apache_verifies(&hp, "viaprompt", "prompted pw"));
    let (code, _, _) = passwd(&["--delete", &hp, "viaprompt"], None);
    assert_eq!(code, 0);

    // (setsid: no controlling terminal, as under cron or a script, even when the tests run
    // in one)
    let o = Command::new("setsid")
        .args([
            "-w",
            env!("CARGO_BIN_EXE_wsmb-broker"),
            "passwd",
            &hp,
            "app",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("setsid (util-linux)");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--stdin"), "{stderr}");
    let (code, _, stderr) = passwd(&["--stdin", &hp, "a:b"], Some("pw\n"));
    assert_eq!(code, 2);
    assert!(stderr.contains("contains `:`"), "{stderr}");
    let (code, _, stderr) = passwd(&["--stdin", &hp, "app"], Some("\n"));
    assert_eq!(code, 2);
    assert!(stderr.contains("empty"), "{stderr}");
    assert_eq!(std::fs::read(&hp).expect("read"), before);
}

/// A `NOTIFY_SOCKET` as systemd provides it; returns the messages received within `t`.
struct NotifySocket {
    sock: std::os::unix::net::UnixDatagram,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn new(dir: &TempDir) -> Self {
        let path = dir.0.join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
        NotifySocket { sock, path }
    }

    /// Waits for a datagram containing `needle`; returns it.
    fn wait(&self, needle: &str, t: Duration) -> Option<String> {
        let deadline = Instant::now() + t;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            self.sock.set_read_timeout(Some(left)).ok()?;
            let n = self.sock.recv(&mut buf).ok()?;
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.contains(needle) {
                return Some(msg);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_it_says_ready_once_listening_and_feeds_the_watchdog() {
    let dir = TempDir::new("notify");
    let hp = dir.file("htpasswd", QA_LINE);
    let notify = NotifySocket::new(&dir);
    let path = notify.path.display().to_string();
    let mut p = BrokerProcess::spawn(
        &["--htpasswd", &hp],
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "300000")],
    );
    let ready = notify
        .wait("READY=1", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no READY=1:\n{}", p.log()));
    assert!(
        ready.contains(&format!("STATUS=listening on {}", p.addr)),
        "{ready}"
    );
    // READY comes after the socket listens: a connection works at once.
    connect_as(p.addr, ("qa", "4lt0@1234")).await;
    for _ in 0..3 {
        assert!(
            notify.wait("WATCHDOG=1", Duration::from_secs(5)).is_some(),
            "watchdog not fed:\n{}",
            p.log()
        );
    }
    p.signal("TERM");
    assert!(notify.wait("STOPPING=1", Duration::from_secs(5)).is_some());
    assert!(p.wait_exit(Duration::from_secs(20)).success());
}

/// `--log-format json`: every line on stderr is one JSON object with time, level, target and
/// the message with its fields, for log shippers; the default stays text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_format_writes_one_object_per_line() {
    let dir = TempDir::new("jsonlogs");
    let hp = dir.file("htpasswd", QA_LINE);
    let mut p = BrokerProcess::spawn(&["--htpasswd", &hp, "--log-format", "json"], &[]);
    let mut bad = connect_raw(p.addr, Some(("qa", "Wr0ngPassw0rd"))).await;
    reply(&mut bad).await;
    p.signal("TERM");
    let log = tokio::task::spawn_blocking(move || {
        p.wait_exit(Duration::from_secs(15));
        p.log()
    })
    .await
    .expect("join");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let find = |needle: &str| {
        lines
            .iter()
            .find(|v| {
                v["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(needle))
            })
            .unwrap_or_else(|| panic!("no {needle:?} line: {log}"))
    };
    let start = find("listening on");
    assert_eq!(start["level"], "INFO", "{start}");
    assert!(start["timestamp"].is_string(), "{start}");
    assert!(
        start["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("wsmb_broker")),
        "{start}"
    );
    let login = find("wrong user name or password");
    assert_eq!(login["fields"]["user"], "qa", "{login}");
    assert_eq!(login["fields"]["client"], "127.0.0.1", "{login}");
    assert!(!log.contains("Wr0ngPassw0rd"), "{log}");

    // An unknown format is refused with what to write instead.
    let (code, _, err) = out(bin().args(["--log-format", "xml", "check-config"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("text") && err.contains("json"), "{err}");
}

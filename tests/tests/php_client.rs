//! Our PHP client (`clients/php/`) with the real `php` against the real broker and agent
//! binaries on a simulated modem: the examples as users run them, its exceptions, and the
//! status worker's reconnect across a broker restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use wsmb_agent::sim::{SimConfig, Simulator};
use wsmb_e2e::{
    Proc, agent_config, ready_agent, repo_root, scratch, spawn_listening, sqlite_broker,
};

const PASSWORD: &str = "4lt0@1234";
const T: Duration = Duration::from_secs(30);

fn client_dir() -> PathBuf {
    repo_root().join("clients/php")
}

/// The broker binary with its SQLite store in `dir`, on `listen`.
fn broker(dir: &Path, listen: &str) -> (Proc, SocketAddr) {
    sqlite_broker(env!("CARGO_BIN_EXE_e2e-broker"), dir, listen, &[])
}

/// A broker (SQLite in a scratch dir), a simulated modem and an agent on it, ready.
async fn bundle(tag: &str) -> (PathBuf, Proc, SocketAddr, Simulator, Proc) {
    let dir = scratch(tag);
    let (b, addr) = broker(&dir, "127.0.0.1:0");
    let sim = Simulator::start(dir.join("modem"), SimConfig::default())
        .await
        .expect("sim");
    let a = tokio::task::block_in_place(|| agent(&dir, addr, &sim));
    (dir, b, addr, sim, a)
}

fn agent(dir: &Path, addr: SocketAddr, sim: &Simulator) -> Proc {
    let cfg = agent_config(dir, &format!("ws://{addr}/"), sim.path(), "");
    ready_agent(env!("CARGO_BIN_EXE_e2e-agent"), &cfg)
}

fn php(addr: SocketAddr, password: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("php");
    cmd.current_dir(client_dir())
        .args(args)
        .env("WSMB_URL", format!("ws://{addr}/"))
        .env("WSMB_USER", "qa")
        .env("WSMB_PASSWORD", password);
    cmd
}

fn run(mut cmd: Command) -> (Option<i32>, String) {
    let o: Output = cmd.output().expect("php (Debian package php-cli)");
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Runs a PHP snippet with the client loaded as `$c` (a Wsmb\Client for `url`).
fn snippet(url: &str, password: &str, code: &str) -> (Option<i32>, String) {
    let src = format!(
        "require '{}/src/Client.php';\n$c = new Wsmb\\Client('{url}', 'qa', '{password}', ['timeout' => 3]);\n{code}",
        client_dir().display()
    );
    let mut cmd = Command::new("php");
    cmd.args(["-r", &src]);
    run(cmd)
}

/// What an exception of the snippet was: `Class: message`.
const CATCH: &str = "} catch (Wsmb\\Exception $e) { echo get_class($e), ': ', $e->getMessage(), \
                     ($e instanceof Wsmb\\RefusedException ? ' code=' . $e->getResponseCode() : ''), \"\\n\"; exit(3); }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_php_examples_send_an_otp_and_wait_for_its_sent_status() {
    let (_dir, _b, addr, sim, _a) = bundle("php-examples").await;

    // Five lines: send an OTP.
    let (code, out) = tokio::task::block_in_place(|| {
        run(php(
            addr,
            PASSWORD,
            &["examples/send-otp.php", "0812-1111-2222"],
        ))
    });
    assert_eq!(code, Some(0), "{out}");
    let otp = out.split_whitespace().nth(1).expect("the code").to_owned();
    assert!(out.contains("accepted by the broker as php-"), "{out}");
    let msgs = sim.wait_messages(1, T).await;
    assert_eq!(msgs[0].0, "+6281211112222");
    assert_eq!(
        msgs[0].1,
        format!("Your code is {otp}. It expires in 5 minutes.")
    );

    // Wait for `sent`; UCS-2 text and a long one go through too.
    let text = "Pesanan Anda sudah dikirim — terima kasih! ✓";
    let (code, out) = tokio::task::block_in_place(|| {
        run(php(
            addr,
            PASSWORD,
            &["examples/wait-sent.php", "+6281233334444", text],
        ))
    });
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("sent by modem sim1 to +6281233334444"),
        "{out}"
    );
    let msgs = sim.wait_messages(2, T).await;
    assert_eq!(msgs[1], ("+6281233334444".to_owned(), text.to_owned()));

    // A job the agent refuses is reported, not waited for forever.
    let (code, out) = tokio::task::block_in_place(|| {
        run(php(addr, PASSWORD, &["examples/wait-sent.php", "12", "x"]))
    });
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.starts_with("accepted") && out.contains("failed: "),
        "{out}"
    );

    // The job's options reach the agent: sim 1 is the one modem, sim 2 is none; a bad option
    // is refused before anything is sent.
    let url = format!("ws://{addr}/");
    let wait = |opts: &str| {
        format!(
            "$c->watchStatus(); $r = $c->sendSms('+6281255556666', 'opts', {opts}); \
             $e = $c->waitForStatus($r['id'], 20); echo $e['status'], ' ', $e['modem'] ?? '', ' ', \
             $e['error_code'] ?? '', ' ', $e['reason'] ?? '';"
        )
    };
    let (code, out) = tokio::task::block_in_place(|| {
        snippet(
            &url,
            PASSWORD,
            &wait("['sim' => 1, 'priority' => 100, 'delivery_report' => true]"),
        )
    });
    assert_eq!((code, out.as_str()), (Some(0), "sent sim1  "), "{out}");
    let (code, out) =
        tokio::task::block_in_place(|| snippet(&url, PASSWORD, &wait("['sim' => 2]")));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.starts_with("failed  no_such_sim sim 2: this gateway has 1 modem(s) (sim1)"),
        "{out}"
    );
    let (_, out) = tokio::task::block_in_place(|| {
        snippet(
            &url,
            PASSWORD,
            "try { $c->sendSms('+6281255556666', 'x', ['sim' => 0]); } catch (InvalidArgumentException $e) { echo $e->getMessage(); }",
        )
    });
    assert!(
        out.starts_with("sim must be a whole number from 1 to 64"),
        "{out}"
    );
    assert_eq!(
        sim.wait_messages(3, T).await.len(),
        3,
        "one more SMS, through sim 1"
    );
    let reports: Vec<bool> = sim
        .sent()
        .iter()
        .filter_map(|s| s.submit.as_ref().map(|p| p.status_report))
        .collect();
    assert_eq!(
        reports.last(),
        Some(&true),
        "delivery_report => true asked for a report (the agent's default is none): {reports:?}"
    );
    assert!(!reports[0], "{reports:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_php_client_says_what_went_wrong() {
    let dir = scratch("php-errors");
    let (_b, addr) = broker(&dir, "127.0.0.1:0");
    let url = format!("ws://{addr}/");
    tokio::task::block_in_place(|| {
        // Refused credentials.
        let (code, out) = snippet(
            &url,
            "wrong",
            &format!("try {{ $c->sendSms('+62811', 'x'); {CATCH}"),
        );
        assert_eq!(code, Some(3));
        assert!(
            out.starts_with("Wsmb\\AuthenticationException: ")
                && out.contains("refused user \"qa\""),
            "{out}"
        );
        // A refused message: the broker's code and reason.
        let (code, out) = snippet(
            &url,
            PASSWORD,
            &format!("try {{ $c->send(str_repeat('c', 101), [['id' => 'a']]); {CATCH}"),
        );
        assert_eq!(code, Some(3));
        assert!(
            out.starts_with("Wsmb\\RefusedException: ") && out.contains("code=12"),
            "{out}"
        );
        // Nobody listens: stored for the agent to come, not an error.
        let (code, out) = snippet(
            &url,
            PASSWORD,
            "$r = $c->sendSms('+62811', 'later', ['id' => 'later-1']); echo $r['response_code'], ' ', var_export($r['stored'], true), ' ', $r['id'];",
        );
        assert_eq!(code, Some(0), "{out}");
        assert_eq!(out, "00 true later-1");
        // waitForStatus without watchStatus is a programming error, said so.
        let (_, out) = snippet(
            &url,
            PASSWORD,
            "try { $c->waitForStatus('x', 1); } catch (LogicException $e) { echo $e->getMessage(); }",
        );
        assert!(out.contains("call watchStatus() before sending"), "{out}");
        // And a timeout: nobody had an agent, so no status.
        let (code, out) = snippet(
            &url,
            PASSWORD,
            &format!(
                "try {{ $c->watchStatus(); $r = $c->sendSms('+62811', 'x'); $c->waitForStatus($r['id'], 0.5); {CATCH}"
            ),
        );
        assert_eq!(code, Some(3));
        assert!(
            out.starts_with("Wsmb\\TimeoutException: ") && out.contains("gateway agent"),
            "{out}"
        );
    });

    // Unreachable: nothing listens on the port.
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let gone = free.local_addr().expect("addr");
    drop(free);
    let (code, out) = snippet(
        &format!("ws://{gone}/"),
        PASSWORD,
        &format!("try {{ $c->connect(); {CATCH}"),
    );
    assert_eq!(code, Some(3));
    assert!(
        out.starts_with("Wsmb\\ConnectionException: cannot connect to the WSMB broker"),
        "{out}"
    );
    // Accepts the connection but never answers: a timeout, not a hang.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let (code, out) = snippet(
        &format!("ws://{silent_addr}/"),
        PASSWORD,
        &format!("try {{ $c->connect(); {CATCH}"),
    );
    drop(silent);
    assert_eq!(code, Some(3));
    assert!(
        out.starts_with("Wsmb\\TimeoutException: no answer to the WebSocket upgrade"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_php_status_worker_reconnects_after_a_broker_restart() {
    let (dir, b, addr, _sim, a) = bundle("php-worker").await;
    let mut worker = php(addr, PASSWORD, &["examples/status-worker.php"]);
    worker.env("WSMB_STOP_AFTER", "after-restart");
    let mut worker = Proc::spawn(worker).expect("worker");
    let url = format!("ws://{addr}/");
    tokio::task::block_in_place(|| {
        // The worker is subscribed once a status reaches it.
        let (code, out) = snippet(
            &url,
            PASSWORD,
            "$c->sendSms('+6281200001111', 'one', ['id' => 'before']);",
        );
        assert_eq!(code, Some(0), "{out}");
        assert!(
            worker
                .wait_line(r#""id":"before","status":"sent""#, T)
                .is_some(),
            "worker: {}",
            worker.output()
        );
        // An agent's heartbeat on the status channel is not an event for the application.
        let (code, out) = snippet(
            &url,
            PASSWORD,
            "$c->send('sms-status', [['id' => 'agent', 'status' => 'heartbeat', 'time' => 1800000000, \
             'agent' => ['version' => '0.1.0', 'interval' => 60, 'uptime' => 1, 'queued' => 0, \
             'unpublished' => 0, 'modems' => []]]]);",
        );
        assert_eq!(code, Some(0), "{out}");
    });

    drop(b);
    tokio::task::block_in_place(|| {
        assert!(
            worker.wait_line("reconnecting in 1 s", T).is_some(),
            "worker: {}",
            worker.output()
        );
    });
    let (_b2, again) = broker(&dir, &addr.to_string());
    assert_eq!(again, addr);
    tokio::task::block_in_place(|| {
        assert!(
            a.wait_line("connected to the broker", T).is_some(),
            "{}",
            a.output()
        );
        let deadline = std::time::Instant::now() + T;
        // The worker resubscribes on its own; statuses sent before it is back wait in the
        // broker's store for it.
        let (code, out) = snippet(
            &url,
            PASSWORD,
            "$c->sendSms('+6281200001111', 'two', ['id' => 'after-restart']);",
        );
        assert_eq!(code, Some(0), "{out}");
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(
            worker
                .wait_line(r#""id":"after-restart","status":"sent""#, left)
                .is_some(),
            "worker: {}",
            worker.output()
        );
        let status = worker.wait(T).expect("the worker stops when told");
        assert!(status.success(), "{}", worker.output());
        assert!(
            !worker.output().contains("heartbeat"),
            "heartbeats reached the application's callback: {}",
            worker.output()
        );
    });
}

/// A self-signed certificate for 127.0.0.1 and localhost, made with openssl: (cert, key).
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=wsmb test {name}"),
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    (cert, key)
}

/// Sends SIGHUP to the broker and waits for its log line `needle`.
fn sighup_and_wait(broker: &Proc, needle: &str) {
    let hup = Command::new("kill")
        .args(["-HUP", &broker.pid().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    tokio::task::block_in_place(|| {
        assert!(
            broker.wait_line(needle, T).is_some(),
            "no {needle:?}:\n{}",
            broker.output()
        );
    });
}

/// `curl --cacert CA https://ADDR/healthz`: whether the TLS handshake was trusted.
fn curl_healthz(addr: SocketAddr, ca: &Path) -> bool {
    Command::new("curl")
        .args(["-sf", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg(format!("https://{addr}/healthz"))
        .output()
        .expect("curl")
        .status
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_brokers_own_tls_php_and_the_agent_connect_and_sighup_swaps_the_certificate() {
    let dir = scratch("tls");
    let (first, first_key) = certificate(&dir, "first");
    let (second, second_key) = certificate(&dir, "second");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::copy(&first, &cert).expect("copy");
    std::fs::copy(&first_key, &key).expect("copy");
    let cfg = dir.join("broker.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[credentials]\nfiles = [\"{}\"]\n\
             [storage]\nbackend = \"sqlite\"\npath = \"{}\"\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            repo_root().join("deploy/htpasswd.example").display(),
            dir.join("broker.sqlite").display(),
            cert.display(),
            key.display()
        ),
    )
    .expect("config");
    let check = Command::new(env!("CARGO_BIN_EXE_e2e-broker"))
        .args(["check-config", "--config", &cfg.display().to_string()])
        .output()
        .expect("check-config");
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("tls: "),
        "{check:?}"
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_e2e-broker"));
    cmd.args(["--config", &cfg.display().to_string()])
        .env_remove("RUST_LOG");
    let (b, addr) = spawn_listening(cmd);
    assert!(
        curl_healthz(addr, &first),
        "https:// with the first certificate"
    );
    assert!(!curl_healthz(addr, &second));
    // The HTTP SMS API is served over the same TLS listener.
    let api = Command::new("curl")
        .args(["-s", "--max-time", "10", "--cacert"])
        .arg(&first)
        .args(["-u", &format!("qa:{PASSWORD}"), "-w", "\n%{http_code}"])
        .arg(format!("https://{addr}/3rdparty/v1/health"))
        .output()
        .expect("curl");
    let api = String::from_utf8_lossy(&api.stdout).into_owned();
    assert!(
        api.ends_with("\n200") && api.contains("\"checks\""),
        "{api}"
    );

    // The agent over wss://, trusting the first certificate.
    let sim = Simulator::start(dir.join("modem"), SimConfig::default())
        .await
        .expect("sim");
    let agent_cfg = agent_config(
        &dir,
        &format!("wss://localhost:{}/", addr.port()),
        sim.path(),
        "",
    );
    let text = std::fs::read_to_string(&agent_cfg).expect("read");
    std::fs::write(
        &agent_cfg,
        text.replace(
            "[broker]\n",
            &format!("[broker]\nca_file = \"{}\"\n", first.display()),
        ),
    )
    .expect("write");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_e2e-agent"));
    cmd.args(["--config", &agent_cfg.display().to_string(), "run"])
        .env("WSMB_PASSWORD", PASSWORD);
    let a = Proc::spawn(cmd).expect("agent");
    tokio::task::block_in_place(|| {
        for needle in ["connected to the broker", "modem ready"] {
            assert!(a.wait_line(needle, T).is_some(), "agent: {}", a.output());
        }
    });

    // PHP over wss:// (ssl://), trusting the first certificate; without it, a clear refusal.
    let url = format!("wss://127.0.0.1:{}/", addr.port());
    let send = |ca: &Path, id: &str| {
        snippet(
            &url,
            PASSWORD,
            &format!(
                "$c = new Wsmb\\Client('{url}', 'qa', '{PASSWORD}', ['ca_file' => '{}', 'timeout' => 10]);\n\
                 try {{ $c->watchStatus(); $r = $c->sendSms('+6281200001111', 'tls {id}', ['id' => '{id}']);\n\
                 $e = $c->waitForStatus('{id}', 30); echo $e['status']; {CATCH}",
                ca.display()
            ),
        )
    };
    let (code, out) = tokio::task::block_in_place(|| send(&first, "tls-1"));
    assert_eq!((code, out.as_str()), (Some(0), "sent"), "{}", a.output());
    let (code, out) = tokio::task::block_in_place(|| send(&second, "tls-x"));
    assert_eq!(code, Some(3));
    assert!(
        out.starts_with("Wsmb\\ConnectionException: TLS handshake") && out.contains("ca_file"),
        "{out}"
    );

    // Swap the certificate, SIGHUP: new connections get the second one; the agent's open
    // connection (which trusts only the first, so it could not reconnect) is not dropped.
    std::fs::copy(&second, &cert).expect("copy");
    std::fs::copy(&second_key, &key).expect("copy");
    sighup_and_wait(&b, "TLS certificate reloaded (SIGHUP)");
    assert!(
        curl_healthz(addr, &second),
        "the second certificate after SIGHUP"
    );
    assert!(!curl_healthz(addr, &first));
    let (code, out) = tokio::task::block_in_place(|| send(&second, "tls-2"));
    assert_eq!((code, out.as_str()), (Some(0), "sent"), "{}", a.output());
    assert_eq!(
        a.output().matches("connected to the broker").count(),
        1,
        "the agent's connection was dropped:\n{}",
        a.output()
    );

    // A broken certificate file on reload keeps the working one.
    std::fs::write(&cert, "not a certificate").expect("write");
    sighup_and_wait(
        &b,
        "TLS certificate reload failed, keeping the previous one",
    );
    assert!(curl_healthz(addr, &second));
}

/// The oldest PHP the client supports, 7.4, where CI provides it: `WSMB_TEST_PHP74_ROOT` is a
/// Debian 11 root with php7.4-cli in which this repository is bind-mounted at the same path
/// (.ci/run makes it). Without the variable the test says so and checks nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_php_examples_work_on_php_7_4() {
    let Ok(root) = std::env::var("WSMB_TEST_PHP74_ROOT") else {
        eprintln!("WSMB_TEST_PHP74_ROOT not set (.ci/run sets it): PHP 7.4 not checked");
        return;
    };
    let php74 = |addr: SocketAddr, args: &[&str]| {
        let mut cmd = Command::new("chroot");
        cmd.arg(&root)
            .arg("php7.4")
            .args(args)
            .env("WSMB_URL", format!("ws://{addr}/"))
            .env("WSMB_USER", "qa")
            .env("WSMB_PASSWORD", PASSWORD);
        run(cmd)
    };
    let (_dir, _b, addr, sim, _a) = bundle("php74").await;
    let examples = client_dir().join("examples");
    let (_, version) = php74(addr, &["-r", "echo PHP_VERSION;"]);
    assert!(version.starts_with("7.4."), "{version}");
    let send = examples.join("send-otp.php").display().to_string();
    let (code, out) = tokio::task::block_in_place(|| php74(addr, &[&send, "081211112222"]));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("accepted by the broker as php-"), "{out}");
    let wait = examples.join("wait-sent.php").display().to_string();
    let (code, out) =
        tokio::task::block_in_place(|| php74(addr, &[&wait, "+6281233334444", "PHP 7.4 ✓"]));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("sent by modem sim1 to +6281233334444"),
        "{out}"
    );
    let msgs = sim.wait_messages(2, T).await;
    assert_eq!(
        msgs[1],
        ("+6281233334444".to_owned(), "PHP 7.4 ✓".to_owned())
    );
}

/// deploy/nginx-wsmb.conf as shipped (ports, certificate and broker address substituted), with
/// nginx terminating TLS in front of the broker: PHP over wss:// through it, a job sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nginx_example_proxies_wss_to_the_broker() {
    let dir = scratch("nginx");
    let (cert, key) = certificate(&dir, "nginx");
    let (_b, addr) = broker(&dir, "127.0.0.1:0");
    let sim = Simulator::start(dir.join("modem"), SimConfig::default())
        .await
        .expect("sim");
    let _a = tokio::task::block_in_place(|| agent(&dir, addr, &sim));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let example = std::fs::read_to_string(repo_root().join("deploy/nginx-wsmb.conf"))
        .expect("deploy/nginx-wsmb.conf");
    let site = example
        .replace("listen 443 ssl;", &format!("listen 127.0.0.1:{port} ssl;"))
        .replace("listen [::]:443 ssl;", "")
        .replace(
            "/etc/letsencrypt/live/broker.example.com/fullchain.pem",
            &cert.display().to_string(),
        )
        .replace(
            "/etc/letsencrypt/live/broker.example.com/privkey.pem",
            &key.display().to_string(),
        )
        .replace("http://127.0.0.1:8888", &format!("http://{addr}"));
    assert_ne!(site, example);
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{}}\nhttp {{\naccess_log off;\nclient_body_temp_path {d}/t1;\nproxy_temp_path {d}/t2;\n\
             fastcgi_temp_path {d}/t3;\nuwsgi_temp_path {d}/t4;\nscgi_temp_path {d}/t5;\n{site}\n}}\n"
        ),
    )
    .expect("nginx.conf");
    let mut cmd = Command::new("nginx");
    cmd.arg("-c").arg(&conf).arg("-p").arg(&dir);
    let nginx = Proc::spawn(cmd).expect("nginx (Debian package nginx, installed by .ci/run)");
    let deadline = std::time::Instant::now() + T;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nginx did not start: {}\n{}",
            nginx.output(),
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("wss://localhost:{port}/");
    let (code, out) = tokio::task::block_in_place(|| {
        snippet(
            &url,
            PASSWORD,
            &format!(
                "$c = new Wsmb\\Client('{url}', 'qa', '{PASSWORD}', ['ca_file' => '{}']);\n\
                 try {{ $c->watchStatus(); $r = $c->sendSms('+6281200001111', 'via nginx', ['id' => 'ng-1']);\n\
                 $e = $c->waitForStatus('ng-1', 30); echo $e['status']; {CATCH}",
                cert.display()
            ),
        )
    });
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "sent"),
        "{}",
        nginx.output()
    );
}

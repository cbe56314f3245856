//! The seed README's `sender.php` and `receiver.php`, run by the real PHP interpreter
//! (`php-cli`), against the real broker process.

use std::process::Command;
use std::time::{Duration, Instant};

use wsmb_e2e::{Proc, repo_root, start_broker};

fn php(script: &str, port: u16) -> Command {
    let dir = repo_root().join("tests/fixtures/legacy-php");
    let mut cmd = Command::new("php");
    cmd.current_dir(&dir)
        .arg(dir.join(script))
        .env("MQ_SERVER_HOST", "127.0.0.1")
        .env("MQ_SERVER_PORT", port.to_string())
        .env("MQ_CLIENT_USERNAME", "qa")
        .env("MQ_CLIENT_PASSWORD", "4lt0@1234")
        .env("MQ_CANNEL_NAME", "sms");
    cmd
}

fn broker() -> (Proc, std::net::SocketAddr) {
    let htpasswd = repo_root().join("deploy/htpasswd.example");
    start_broker(
        env!("CARGO_BIN_EXE_e2e-broker"),
        &["--htpasswd", htpasswd.to_str().expect("path")],
    )
}

#[test]
fn receiver_php_prints_connected_and_sender_php_gets_a_reply_at_once() {
    let (_broker, addr) = broker();
    let receiver =
        Proc::spawn(php("receiver.php", addr.port())).expect("php (Debian package php-cli)");
    assert!(
        receiver
            .wait_line("Connected", Duration::from_secs(10))
            .is_some(),
        "receiver.php never printed Connected:\n{}",
        receiver.output()
    );

    let t0 = Instant::now();
    let out = php("sender.php", addr.port())
        .output()
        .expect("run sender.php");
    let waited = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The original broker made sender.php wait 10 s for its socket timeout and print nothing.
    assert!(
        waited < Duration::from_secs(5),
        "sender.php took {waited:?}"
    );
    let reply: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout:?}"));
    assert_eq!(reply["command"], "connect");
    assert_eq!(reply["response_code"], "00");

    let line = receiver
        .wait_line("Haloo. Pesan ini dikirim", Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "receiver.php did not print the message:\n{}",
                receiver.output()
            )
        });
    assert!(
        line.contains("[message] => Haloo. Pesan ini dikirim"),
        "{line}"
    );
    let out = receiver.output();
    assert!(out.contains("[receiver] => 08126666666"), "{out}");
    assert!(out.contains("[command] => send-message"), "{out}");
}

#[test]
fn sender_php_with_wrong_password_reads_the_rejection() {
    let (_broker, addr) = broker();
    let out = php("sender.php", addr.port())
        .env("MQ_CLIENT_PASSWORD", "wrong")
        .output()
        .expect("run sender.php");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let reply: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout:?}"));
    assert_eq!(reply["response_code"], "01");
    assert_eq!(reply["response_text"], "Rejected");
}

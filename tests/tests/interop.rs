//! Interoperability with an independent WebSocket client library: Python's `websockets` (from
//! PyPI, in the venv `.ci/run` makes) talks to the real broker binary: Basic auth on the
//! upgrade, the `connect` frame, receiving and sending, a ping answered with its payload, a
//! large fragmented message, and a clean close (1000).

use std::path::PathBuf;
use std::process::Command;

use wsmb_e2e::{QA_PASSWORD, repo_root, scratch, sqlite_broker};

const SCRIPT: &str = r#"
import base64, json, os, sys
from websockets.sync.client import connect

url = os.environ["URL"]
auth = {"Authorization": "Basic " + base64.b64encode(("qa:" + os.environ["PW"]).encode()).decode()}

def welcomed(ws):
    first = json.loads(ws.recv(timeout=5))
    assert first["command"] == "connect" and first["response_code"] == "00", first

with connect(url, additional_headers=auth, max_size=2**21) as rx, \
     connect(url, additional_headers=auth) as tx:
    welcomed(rx)
    welcomed(tx)
    rx.send(json.dumps({"command": "receive-message", "channel": "py", "data": []}))
    rx.send(json.dumps({"command": "ping"}))
    assert json.loads(rx.recv(timeout=5))["command"] == "connect"
    # a WebSocket ping, answered with its payload
    rx.ping(b"are you there").wait(timeout=5)
    tx.send(json.dumps({"command": "send-message", "channel": "py",
                        "data": [{"id": "1", "message": "κόσμε 😀"}]}))
    got = json.loads(rx.recv(timeout=5))
    assert got["data"][0]["message"] == "κόσμε 😀", got
    result = json.loads(tx.recv(timeout=5))
    assert result["command"] == "send-result" and result["response_code"] == "00", result
    # a large message sent in fragments (an iterable of strings)
    big = "x" * 900_000
    head = json.dumps({"command": "send-message", "channel": "py", "data": ["BIG"]})
    parts = [head[:-3], big[:300_000], big[300_000:], head[-3:]]
    tx.send(iter(parts))
    got = json.loads(rx.recv(timeout=10))
    assert got["data"] == ["BIG" + big], len(got["data"][0])
# closed cleanly when the blocks ended: the broker answered our 1000 with 1000
assert rx.close_code == 1000 and tx.close_code == 1000, (rx.close_code, tx.close_code)
print("interop ok")
"#;

fn python() -> PathBuf {
    std::env::var_os("WSMB_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/ci-venv/bin/python"))
}

#[test]
fn pythons_websockets_library_talks_to_the_broker() {
    let dir = scratch("interop-py");
    let (_broker, addr) = sqlite_broker(env!("CARGO_BIN_EXE_e2e-broker"), &dir, "127.0.0.1:0", &[]);
    let out = Command::new(python())
        .args(["-c", SCRIPT])
        .env("URL", format!("ws://{addr}/"))
        .env("PW", QA_PASSWORD)
        .output()
        .expect("python with websockets (installed by .ci/run)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("interop ok"),
        "{text}"
    );
}

//! The AT engine's reading of modem output: any bytes a modem (or a noisy serial line) sends,
//! as the answer to a command and while idle; lines, final results, URCs, the prompt.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use wsmb_agent::at::{AtPort, Final};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (ours, mut modem) = tokio::io::duplex(64 * 1024);
        let _ = modem.write_all(data).await;
        let mut at = AtPort::new(ours);
        // While idle (URCs, stray lines), then as a command's answer.
        let _ = at.poll(Duration::from_millis(1)).await;
        let _ = at.command("AT+CSQ", Duration::from_millis(5)).await;
        let _ = at.take_urcs();
        drop(modem);
    });
    if let Ok(text) = std::str::from_utf8(data) {
        for line in text.lines() {
            let _ = Final::parse(line);
            let _ = wsmb_agent::at::redact(line);
        }
    }
});

//! The client frame parser: any bytes a client sends as a WebSocket message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = wsmb_protocol::client::parse_client_frame(data) {
        // What the broker reads of a valid frame must be readable too.
        let _ = frame.expiry(1_800_000_000);
        let _ = wsmb_protocol::sms::parse_jobs(std::str::from_utf8(data).unwrap_or(""));
    }
});

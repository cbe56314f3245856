//! The PDU decoders: any hex a modem gives (received SMS, delivery reports) or is given.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As bytes (hex-encoded here) and as whatever text the modem sent.
    let hex: String = data.iter().map(|b| format!("{b:02X}")).collect();
    let _ = wsmb_agent::pdu::decode_received(&hex);
    let _ = wsmb_agent::pdu::decode_submit(&hex);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = wsmb_agent::pdu::decode_received(text);
        let _ = wsmb_agent::pdu::from_hex(text);
    }
});

//! The htpasswd parser: any text in a credentials file (lines, hashes of every kind).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(entries) = wsmb_broker::auth::htpasswd::parse(text, "fuzz") {
            // Checking a password against whatever parsed must not panic either (bcrypt of a
            // high cost is slow: only cheap kinds are checked).
            for e in entries.iter().take(4) {
                if !e.hash.is_expensive() {
                    let _ = e.hash.verify(b"password");
                }
            }
        }
    }
});

//! The HTTP request head reader (WebSocket upgrades, the HTTP API, /healthz): any bytes a
//! client sends first, read from an in-memory stream; then the helpers that read its parts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut input = data;
    if let Ok((head, _rest)) = rt.block_on(wsmb_broker::http::read_head(&mut input)) {
        let _ = head.wants_websocket();
        if let Some(a) = &head.authorization {
            let _ = wsmb_broker::http::basic_credentials(a);
        }
        let _ = wsmb_broker::http::query_pairs(&head.query);
        let _ = wsmb_broker::http::decode_component(&head.path);
    }
});

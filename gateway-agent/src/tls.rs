//! TLS of the `wss://` link to the broker: the connector the link uses, trusting what
//! [`wsmb_common::tls`] trusts (the public roots and `broker.ca_file`).

use std::path::Path;
use std::sync::Arc;

/// The TLS set-up of a link to `url` (ring provider, TLS 1.2 and 1.3); `None` for `ws://`.
pub fn connector(
    url: &str,
    ca_file: &Path,
) -> Result<Option<tokio_tungstenite::Connector>, String> {
    if !url.starts_with("wss://") {
        return Ok(None);
    }
    let config = wsmb_common::tls::client_config(ca_file, "broker.ca_file")?;
    Ok(Some(tokio_tungstenite::Connector::Rustls(Arc::new(config))))
}

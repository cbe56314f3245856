//! The legacy timestamp: UTC, seconds precision, always `.000Z`
//! (`2026-11-28T06:19:08.000Z`), as the PHP broker wrote it with `gmdate(...).".000Z"`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Formats `t` the way the legacy broker did, dropping sub-second precision.
pub fn legacy_timestamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// The current time as a legacy timestamp.
pub fn now_timestamp() -> String {
    legacy_timestamp(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_the_legacy_broker() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_847_948_789);
        assert_eq!(legacy_timestamp(t), "2026-11-28T06:39:08.000Z");
        assert_eq!(legacy_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }
}

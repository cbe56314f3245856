//! `response_code` values carried by every broker reply.
//!
//! `"00"` and `"01"` are the legacy codes (`connect` and `ping` replies); the others were added
//! by WSMB for the new `send-result` and `error` frames. Codes are two-digit strings, as the
//! legacy clients expect. `docs/protocol.md` has the same table.

/// A documented response code with its fixed `response_text`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponseCode {
    /// `00`: credentials accepted, message accepted, broker healthy.
    Accepted,
    /// `01`: credentials rejected (the connection is closed right after), or broker unhealthy.
    Rejected,
    /// `02`: the message reached no receiver and was not stored (memory mode).
    NoReceiver,
    /// `03`: every receiver of the channel had a full outgoing queue; the message was not taken.
    ReceiversBusy,
    /// `04`: the broker's store is at its cap (per channel or in total); nothing was dropped to
    /// make room, and this message was not taken.
    StorageFull,
    /// `05`: the message needed storing (no receiver could take it now) but the database is
    /// unavailable; it was not taken.
    StorageUnavailable,
    /// `06`: a stored message expired before it could be delivered (sent to a sender that asked
    /// for reports).
    Expired,
    /// `10`: the frame is not valid JSON.
    InvalidJson,
    /// `11`: the frame is JSON but not an object.
    NotAnObject,
    /// `12`: `channel` is missing, not a string, empty or too long.
    InvalidChannel,
    /// `13`: `command` is missing, not a string, or not a known command.
    UnknownCommand,
    /// `14`: `number_of_receiver` is neither a number nor a numeric string.
    InvalidNumberOfReceiver,
    /// `15`: `data` of a `send-message` is missing or not an array.
    InvalidData,
    /// `16`: the frame is larger than the broker's limit; the connection is closed (1009).
    MessageTooLarge,
    /// `17`: a binary frame whose bytes are not UTF-8 text.
    NotUtf8,
    /// `18`: an optional field (such as `protocol`) has a value of the wrong type.
    InvalidField,
    /// `19`: a protocol-2 connection asked to receive on more channels than the broker allows.
    TooManyChannels,
    /// `20`: the user may not send (or receive) on that channel (`[permissions]`).
    Forbidden,
}

impl ResponseCode {
    /// Every code, in table order.
    pub const ALL: [ResponseCode; 18] = [
        Self::Accepted,
        Self::Rejected,
        Self::NoReceiver,
        Self::ReceiversBusy,
        Self::StorageFull,
        Self::StorageUnavailable,
        Self::Expired,
        Self::InvalidJson,
        Self::NotAnObject,
        Self::InvalidChannel,
        Self::UnknownCommand,
        Self::InvalidNumberOfReceiver,
        Self::InvalidData,
        Self::MessageTooLarge,
        Self::NotUtf8,
        Self::InvalidField,
        Self::TooManyChannels,
        Self::Forbidden,
    ];

    /// The two-digit code as it appears on the wire.
    pub fn code(self) -> &'static str {
        match self {
            Self::Accepted => "00",
            Self::Rejected => "01",
            Self::NoReceiver => "02",
            Self::ReceiversBusy => "03",
            Self::StorageFull => "04",
            Self::StorageUnavailable => "05",
            Self::Expired => "06",
            Self::InvalidJson => "10",
            Self::NotAnObject => "11",
            Self::InvalidChannel => "12",
            Self::UnknownCommand => "13",
            Self::InvalidNumberOfReceiver => "14",
            Self::InvalidData => "15",
            Self::MessageTooLarge => "16",
            Self::NotUtf8 => "17",
            Self::InvalidField => "18",
            Self::TooManyChannels => "19",
            Self::Forbidden => "20",
        }
    }

    /// The fixed `response_text` that goes with the code.
    pub fn text(self) -> &'static str {
        match self {
            Self::Accepted => "Accepted",
            Self::Rejected => "Rejected",
            Self::NoReceiver => "No receiver",
            Self::ReceiversBusy => "Receivers busy",
            Self::StorageFull => "Storage full",
            Self::StorageUnavailable => "Storage unavailable",
            Self::Expired => "Expired",
            Self::InvalidJson => "Invalid JSON",
            Self::NotAnObject => "Not a JSON object",
            Self::InvalidChannel => "Invalid channel",
            Self::UnknownCommand => "Unknown command",
            Self::InvalidNumberOfReceiver => "Invalid number_of_receiver",
            Self::InvalidData => "Invalid data",
            Self::MessageTooLarge => "Message too large",
            Self::NotUtf8 => "Not UTF-8",
            Self::InvalidField => "Invalid field",
            Self::TooManyChannels => "Too many channels",
            Self::Forbidden => "Forbidden",
        }
    }

    /// Looks a code up by its wire form.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_two_digit_strings_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for c in ResponseCode::ALL {
            assert_eq!(c.code().len(), 2);
            assert!(c.code().bytes().all(|b| b.is_ascii_digit()));
            assert!(seen.insert(c.code()), "duplicate code {}", c.code());
            assert_eq!(ResponseCode::from_code(c.code()), Some(c));
        }
        assert_eq!(ResponseCode::from_code("99"), None);
    }

    #[test]
    fn legacy_codes_keep_their_legacy_texts() {
        assert_eq!(ResponseCode::Accepted.code(), "00");
        assert_eq!(ResponseCode::Accepted.text(), "Accepted");
        assert_eq!(ResponseCode::Rejected.code(), "01");
        assert_eq!(ResponseCode::Rejected.text(), "Rejected");
    }
}

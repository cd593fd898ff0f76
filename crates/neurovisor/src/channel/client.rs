//! Errors of the gRPC conversation with the guest agent.
//!
//! A `tonic::Status` from the guest carries guest text: only its code and its
//! sanitized message ([`super::sanitize_guest_text`]) are kept.

use super::text::sanitize_guest_text;

/// A failed call to the guest agent. Messages are sanitized guest text.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot reach the guest agent: {0}")]
    Connect(String),
    /// The agent rejected the request (e.g. INVALID_ARGUMENT for an unknown language).
    #[error("{0}")]
    Rejected(String),
    #[error("guest agent call failed: {message}")]
    Call { code: tonic::Code, message: String },
}

impl From<tonic::Status> for GuestError {
    fn from(s: tonic::Status) -> Self {
        let message = sanitize_guest_text(s.message());
        match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => Self::Rejected(message),
            code => Self::Call { code, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_status_messages_are_sanitized() {
        let e = GuestError::from(tonic::Status::invalid_argument(
            "\x1b[2Jno\n2026-01-01T00:00:00Z ERROR forged log line",
        ));
        let text = e.to_string();
        assert!(matches!(e, GuestError::Rejected(_)));
        assert!(!text.chars().any(char::is_control), "{text:?}");
        assert!(text.contains("\\u{1b}[2Jno\\u{a}2026"), "{text}");
        let e = GuestError::from(tonic::Status::internal("x".repeat(100_000)));
        assert!(e.to_string().len() < 1100, "{}", e.to_string().len());
    }
}

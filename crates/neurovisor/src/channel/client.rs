//! Errors of the gRPC conversation with the guest agent.

/// A failed call to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot reach the guest agent: {0}")]
    Connect(String),
    /// The agent rejected the request (e.g. INVALID_ARGUMENT for an unknown language).
    #[error("{}", .0.message())]
    Rejected(tonic::Status),
    #[error("guest agent call failed: {}", .0.message())]
    Call(tonic::Status),
}

impl From<tonic::Status> for GuestError {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => Self::Rejected(s),
            _ => Self::Call(s),
        }
    }
}

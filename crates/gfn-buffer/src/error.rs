use thiserror::Error;

#[derive(Debug, Error)]
pub enum BufferError {
    #[error("replay-buffer server at {addr}: {reason}")]
    Connection { addr: String, reason: String },
    #[error("replay-buffer server at {addr} refused this client: {reason}")]
    Refused { addr: String, reason: String },
    #[error("invalid {field} = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    /// A request the server did not answer in time, with the connection still open (a
    /// server that is stopped or stuck).
    #[error("replay-buffer server at {addr}: no {what} reply within {seconds} s")]
    NoReply {
        addr: String,
        what: String,
        seconds: f64,
    },
    #[error("replay-buffer snapshot {path}: {reason}")]
    Snapshot { path: String, reason: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, BufferError>;

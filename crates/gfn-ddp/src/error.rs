use thiserror::Error;

#[derive(Debug, Error)]
pub enum DdpError {
    #[error("{var}={value}: {reason}")]
    InvalidEnv {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("{var} is not set, but {context}")]
    MissingEnv {
        var: &'static str,
        context: &'static str,
    },
    #[error("rendezvous at {addr}: {reason}")]
    Rendezvous { addr: String, reason: String },
    #[error("{backend} backend: {reason}")]
    Backend {
        backend: &'static str,
        reason: String,
    },
    #[error("{0}")]
    Launch(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, DdpError>;

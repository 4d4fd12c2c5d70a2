use thiserror::Error;

/// Errors of the core library. Every variant names what was wrong and with which value.
#[derive(Debug, Error)]
pub enum Error {
    #[error("invalid {field} = {value}: {reason}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("environment {env} cannot enumerate its states")]
    NotEnumerable { env: String },
    #[error(
        "environment {env} has {n_states} states, more than the {limit} that exact evaluation enumerates"
    )]
    TooLargeToEnumerate {
        env: String,
        n_states: String,
        limit: usize,
    },
    /// An environment broke its contract (see [`crate::env::Environment`]).
    #[error("environment {env}: {reason}")]
    Environment { env: String, reason: String },
    /// A metric's state (from a checkpoint) or share (from another rank) that does not decode.
    #[error("metric {metric}: {reason}")]
    MetricData { metric: String, reason: String },
    /// Training diverged: nothing non-finite reached the parameters a checkpoint holds.
    #[error(
        "step {step}: {what}; training stopped (train.max_nonfinite_steps = {allowed}); no checkpoint holds non-finite values"
    )]
    NonFinite {
        step: u64,
        what: String,
        allowed: u64,
    },
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },
    /// A collective of the gradient hook failed (data-parallel training).
    #[error("collective: {0}")]
    Collective(String),
    /// Raised by a hook or batch source of the training loop ([`crate::fit`]).
    #[error("{0}")]
    Hook(String),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(
        field: &'static str,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidConfig {
            field,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

//! The wire protocol. A connection carries length-delimited frames (4-byte big-endian length,
//! tokio-util's codec), each one postcard-encoded message. The client's first frame is a
//! [`Hello`] whose leading field is the protocol version and which carries the job's [`Token`];
//! until the server accepts it, frames are limited to [`HELLO_FRAME_LIMIT`] bytes, afterwards
//! to [`FRAME_LIMIT`]. The codec checks a frame's length before reserving memory for it, and
//! serde's sequence decoding caps pre-allocation, so no length read from the wire makes the
//! server allocate more than the frame limit.

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

/// Bumped whenever a message changes shape.
pub const PROTOCOL_VERSION: u16 = 3;
/// Largest frame accepted before the hello is accepted (a hello is about 50 bytes).
pub const HELLO_FRAME_LIMIT: usize = 256;
/// Largest frame accepted from an authenticated peer.
pub const FRAME_LIMIT: usize = 8 << 20;
/// Most items one `Sample` request may ask for.
pub const MAX_SAMPLE: u32 = 1 << 16;
/// Longest trajectory (in states) and widest state accepted in an item.
pub const MAX_TRAJECTORY_STATES: usize = 1 << 16;
pub const MAX_STATE_DIM: u32 = 1 << 10;

/// A codec for frames of at most `max_frame` bytes.
pub fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(max_frame)
        .new_codec()
}

/// A per-job secret handed to every rank at start-up; a connection without it is refused.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token(pub [u8; 32]);

impl Token {
    pub fn random() -> Self {
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Token(bytes)
    }

    /// Comparison whose time does not depend on where the tokens differ.
    pub fn matches(&self, other: &Token) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Who is connecting: a training rank (whose session the server waits for before exiting) or
/// an observer that only reads statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Trainer { rank: u32 },
    Observer { rank: u32 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// First on the wire, so that any later change still decodes this far.
    pub version: u16,
    pub token: Token,
    pub role: Role,
    /// Coordinates per state; every client of one server must agree.
    pub state_dim: u32,
}

/// One trajectory: `states` holds its states as rows of `state_dim` coordinates, `actions[i]`
/// the forward action taken from state `i` (the exit action, or none, last); `key` is a hash
/// of the terminal state's coordinates (the unique-state policy keeps one item per key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub key: u64,
    pub log_reward: f32,
    pub states: Vec<i64>,
    pub actions: Vec<u32>,
}

impl Item {
    /// An upper bound on the item's postcard encoding (varints at their longest).
    pub fn max_encoded_len(&self) -> usize {
        const VARINT_U64: usize = 10;
        const VARINT_U32: usize = 5;
        VARINT_U64
            + 4
            + 2 * VARINT_U32
            + self.states.len() * VARINT_U64
            + self.actions.len() * VARINT_U32
    }

    /// Checks the shape against `state_dim`; the message names what is wrong.
    pub fn validate(&self, state_dim: usize) -> Result<(), String> {
        let n = self.actions.len();
        if n == 0 || n > MAX_TRAJECTORY_STATES {
            return Err(format!(
                "item with {n} actions (expected 1..={MAX_TRAJECTORY_STATES})"
            ));
        }
        if self.states.len() != n * state_dim {
            return Err(format!(
                "item with {} state coordinates for {n} actions of state_dim {state_dim}",
                self.states.len()
            ));
        }
        if self.log_reward.is_nan() || self.log_reward == f32::INFINITY {
            return Err(format!("item with log_reward {}", self.log_reward));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Store these trajectories. No reply unless they are malformed.
    Push { items: Vec<Item> },
    /// Draw up to `n` items (fewer while the buffer holds fewer, none while empty).
    Sample { n: u32 },
    /// Reply with the statistics. Replies come in request order, so a `Stats` reply also
    /// confirms that every earlier push of this connection has been stored.
    Stats,
    /// The training rank is done; the server replies `Bye` and closes.
    Shutdown,
    /// Write the store to this buffer rank's snapshot file of `step` (a checkpoint of the run).
    /// Replies `Snapshot`; like `Stats`, it follows every earlier push of this connection.
    Save { step: u64 },
    /// Replace the store with the snapshot of `step` (a resumed run). Replies `Snapshot`.
    Restore { step: u64 },
}

/// Statistics of one server. Rates are averages since it started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerStats {
    pub size: u64,
    pub capacity: u64,
    /// Items received (duplicates included).
    pub received: u64,
    /// Items not stored because their terminal state was already held (unique policy), or lay
    /// too close to a stored one or below the lowest stored reward (diverse policy).
    pub duplicates: u64,
    /// Items sent back in samples.
    pub sampled: u64,
    pub uptime_s: f64,
    pub pushes_per_s: f64,
    pub samples_per_s: f64,
    /// Percentiles 0, 1, ..., 100 of the stored log-rewards (empty while the buffer is empty).
    pub log_reward_percentiles: Vec<f32>,
    /// Ids of the distinct modes found among everything received (at most `MAX_MODE_KEYS`).
    pub mode_keys: Vec<u64>,
    /// Distinct modes found, even beyond the ids listed.
    pub modes_found: u64,
    /// Training connections open now.
    pub trainers: u32,
}

/// Most mode keys a statistics reply lists.
pub const MAX_MODE_KEYS: usize = 1 << 16;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Welcome {
        version: u16,
    },
    Samples {
        items: Vec<Item>,
    },
    Stats(ServerStats),
    /// The request (or frame) was refused; the server closes the connection after sending it.
    Error {
        reason: String,
    },
    /// Final statistics, answering `Shutdown`.
    Bye(ServerStats),
    /// Answers `Save` or `Restore` (the connection stays open whatever the outcome).
    Snapshot {
        step: u64,
        outcome: SnapshotOutcome,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SnapshotOutcome {
    /// Items written or restored.
    Done {
        items: u64,
    },
    /// `Restore`: the buffer rank has no snapshot of that step; its store is left as it was.
    Missing,
    Failed {
        reason: String,
    },
}

pub fn encode<T: Serialize>(message: &T) -> Bytes {
    Bytes::from(postcard::to_stdvec(message).expect("messages always serialise"))
}

/// Decodes one whole frame; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, String> {
    match postcard::take_from_bytes::<T>(frame) {
        Ok((message, [])) => Ok(message),
        Ok((_, rest)) => Err(format!("{} trailing bytes after the message", rest.len())),
        Err(e) => Err(format!("malformed message: {e}")),
    }
}

/// Decodes a hello, checking the version before the rest so that a client of another version
/// is told so rather than that its frame is malformed.
pub fn decode_hello(frame: &[u8]) -> Result<Hello, String> {
    let (version, _) =
        postcard::take_from_bytes::<u16>(frame).map_err(|e| format!("malformed hello: {e}"))?;
    if version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {version}, but this server speaks version {PROTOCOL_VERSION}"
        ));
    }
    let hello: Hello = decode(frame).map_err(|e| format!("hello: {e}"))?;
    if hello.state_dim == 0 || hello.state_dim > MAX_STATE_DIM {
        return Err(format!(
            "hello with state_dim {} (expected 1..={MAX_STATE_DIM})",
            hello.state_dim
        ));
    }
    Ok(hello)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            token: Token([7; 32]),
            role: Role::Trainer { rank: 3 },
            state_dim: 4,
        }
    }

    #[test]
    fn messages_round_trip() {
        let item = Item {
            key: 77,
            log_reward: -1.5,
            states: vec![0, 0, 1, 0],
            actions: vec![1, 2],
        };
        let request = Request::Push {
            items: vec![item.clone(); 3],
        };
        assert_eq!(decode::<Request>(&encode(&request)).unwrap(), request);
        for reply in [
            Reply::Snapshot {
                step: 9,
                outcome: SnapshotOutcome::Done { items: 4 },
            },
            Reply::Snapshot {
                step: 9,
                outcome: SnapshotOutcome::Failed {
                    reason: "disk full".into(),
                },
            },
        ] {
            assert_eq!(decode::<Reply>(&encode(&reply)).unwrap(), reply);
        }
        assert_eq!(decode_hello(&encode(&hello())).unwrap(), hello());
        assert!(encode(&hello()).len() < HELLO_FRAME_LIMIT);
        assert_eq!(item.validate(2), Ok(()));
        assert!(item.validate(3).is_err());
    }

    #[test]
    fn another_version_is_named() {
        let mut h = hello();
        h.version = 1;
        let err = decode_hello(&encode(&h)).unwrap_err();
        assert!(err.contains("protocol version 1"), "{err}");
    }

    #[test]
    fn trailing_and_truncated_bytes_are_errors() {
        let mut frame = encode(&Request::Sample { n: 5 }).to_vec();
        frame.push(0);
        assert!(decode::<Request>(&frame).unwrap_err().contains("trailing"));
        let frame = encode(&Request::Push {
            items: vec![Item {
                key: 1,
                log_reward: 0.0,
                states: vec![1; 10],
                actions: vec![1; 5],
            }],
        });
        assert!(decode::<Request>(&frame[..frame.len() - 3]).is_err());
    }

    #[test]
    fn tokens_compare_in_full() {
        let a = Token([1; 32]);
        let mut b = a;
        assert!(a.matches(&b));
        b.0[31] ^= 1;
        assert!(!a.matches(&b));
        assert_ne!(Token::random(), Token::random());
    }
}

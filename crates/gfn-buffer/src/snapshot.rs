//! A buffer rank's snapshot files, written at each of the run's checkpoints beside rank 0's
//! `checkpoint.pt` and read back on resume (as Reverb's checkpoints restore a server's
//! tables). One file per checkpointed step, `<prefix>.step-<step>.bin`: a magic line, the
//! step, the postcard-encoded store, and a CRC-32 of all that. Written to a temporary file,
//! synced and renamed, so that a reader sees a whole file or none; the file of the previous
//! checkpoint is kept until the next one lands (rank 0's checkpoint may still name it).

use crate::store::StoreSnapshot;
use crate::{BufferError, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"GFNBUF1\n";
/// Largest snapshot read back (it is held in memory twice while decoding).
pub const MAX_SNAPSHOT_BYTES: u64 = 16 << 30;

/// Where a buffer rank keeps its snapshots: `dir/buffer-rank-<rank>.step-<step>.bin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    pub dir: PathBuf,
    pub rank: usize,
}

impl SnapshotFiles {
    fn prefix(&self) -> String {
        format!("buffer-rank-{}.step-", self.rank)
    }

    pub fn path(&self, step: u64) -> PathBuf {
        self.dir.join(format!("{}{step}.bin", self.prefix()))
    }

    /// Steps of the snapshots present, ascending.
    fn steps(&self) -> Vec<u64> {
        let prefix = self.prefix();
        let mut steps: Vec<u64> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix(&prefix)?
                    .strip_suffix(".bin")?
                    .parse()
                    .ok()
            })
            .collect();
        steps.sort_unstable();
        steps
    }

    /// Writes the snapshot of `step` atomically, then drops those older than the one before
    /// it. Returns the bytes written.
    pub fn save(&self, step: u64, snapshot: &StoreSnapshot) -> Result<u64> {
        let path = self.path(step);
        let fail = |e: std::io::Error| snapshot_error(&path, e.to_string());
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&step.to_le_bytes());
        bytes.extend(
            postcard::to_stdvec(snapshot).map_err(|e| snapshot_error(&path, e.to_string()))?,
        );
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let tmp = self.dir.join(format!(
            ".{}{step}.tmp.{}",
            self.prefix(),
            std::process::id()
        ));
        let mut file = std::fs::File::create(&tmp).map_err(fail)?;
        file.write_all(&bytes).map_err(fail)?;
        file.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, &path).map_err(fail)?;
        let steps = self.steps();
        let keep_from = steps.iter().rev().filter(|&&s| s < step).nth(0).copied();
        for old in steps {
            if old != step && Some(old) != keep_from {
                let _ = std::fs::remove_file(self.path(old));
            }
        }
        Ok(bytes.len() as u64)
    }

    /// The snapshot of `step`; `Ok(None)` where there is none.
    pub fn load(&self, step: u64) -> Result<Option<StoreSnapshot>> {
        let path = self.path(step);
        let fail = |reason: String| snapshot_error(&path, reason);
        let size = match std::fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(fail(e.to_string())),
        };
        if size > MAX_SNAPSHOT_BYTES {
            return Err(fail(format!(
                "{size} bytes, more than the {MAX_SNAPSHOT_BYTES} a snapshot may hold"
            )));
        }
        let bytes = std::fs::read(&path).map_err(|e| fail(e.to_string()))?;
        let header = MAGIC.len() + 8;
        if bytes.len() < header + 4 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(fail("not a replay-buffer snapshot".into()));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(fail("checksum mismatch: the file is damaged".into()));
        }
        let stored_step =
            u64::from_le_bytes(body[MAGIC.len()..header].try_into().expect("8 bytes"));
        if stored_step != step {
            return Err(fail(format!("holds step {stored_step}, not {step}")));
        }
        postcard::from_bytes(&body[header..])
            .map(Some)
            .map_err(|e| fail(format!("malformed contents: {e}")))
    }
}

fn snapshot_error(path: &Path, reason: String) -> BufferError {
    BufferError::Snapshot {
        path: path.display().to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Item;

    fn snapshot(n: u64) -> StoreSnapshot {
        StoreSnapshot {
            items: (0..n)
                .map(|k| Item {
                    key: k,
                    log_reward: -(k as f32),
                    states: vec![k as i64, 1],
                    actions: vec![k as u32],
                })
                .collect(),
            received: n + 3,
            duplicates: 1,
            sampled: 40,
            modes: vec![2, 9],
        }
    }

    fn files(name: &str) -> SnapshotFiles {
        let dir = std::env::temp_dir().join(format!("gfn-snapshots-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        SnapshotFiles { dir, rank: 3 }
    }

    #[test]
    fn snapshots_round_trip_and_only_the_last_two_stay() {
        let files = files("round-trip");
        for step in [10, 20, 30] {
            files.save(step, &snapshot(step)).unwrap();
        }
        assert_eq!(files.steps(), vec![20, 30]);
        assert_eq!(files.load(30).unwrap(), Some(snapshot(30)));
        assert_eq!(files.load(20).unwrap(), Some(snapshot(20)));
        assert_eq!(files.load(10).unwrap(), None);
        assert!(files.path(30).ends_with("buffer-rank-3.step-30.bin"));
    }

    #[test]
    fn a_damaged_or_misnamed_snapshot_is_refused_by_path() {
        let files = files("damaged");
        files.save(5, &snapshot(5)).unwrap();
        let path = files.path(5);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let err = files.load(5).unwrap_err().to_string();
        assert!(
            err.contains("buffer-rank-3.step-5.bin") && err.contains("checksum"),
            "{err}"
        );
        files.save(6, &snapshot(6)).unwrap();
        std::fs::rename(files.path(6), files.path(7)).unwrap();
        let err = files.load(7).unwrap_err().to_string();
        assert!(err.contains("holds step 6, not 7"), "{err}");
        std::fs::write(files.path(8), b"hello").unwrap();
        assert!(files
            .load(8)
            .unwrap_err()
            .to_string()
            .contains("not a replay-buffer snapshot"));
    }
}

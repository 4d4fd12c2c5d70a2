//! A run directory that one run at a time may use: an exclusive lock (`flock` on `.lock`,
//! holding the owner's pid) for as long as the run lives, and no silent reuse of a directory
//! that already holds a run: a fresh run needs an empty one, `--resume` continues the run there
//! and `--overwrite` deletes that run's files first.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOCK_FILE: &str = ".lock";

/// What a run may find in its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutMode {
    /// The directory must be empty or new.
    Fresh,
    /// A run's files there are deleted first.
    Overwrite,
    /// The run there is continued from its checkpoint.
    Resume,
}

/// Held while the run uses the directory; the lock goes with the process (or this value).
pub struct RunDir {
    pub path: PathBuf,
    _lock: File,
}

/// Whether `name` is a file that `gfn train` writes in a run directory.
fn written_by_a_run(name: &str) -> bool {
    const FILES: &[&str] = &[
        "config.toml",
        "checkpoint.pt",
        "metrics.jsonl",
        "summary.json",
    ];
    FILES.contains(&name)
        || name.starts_with("events.out.tfevents.")
        || name.starts_with("checkpoint.tmp")
        || name.starts_with("buffer-rank-")
        || name.starts_with(".buffer-rank-")
        || name.ends_with(".png")
}

impl RunDir {
    /// Creates (if needed) and locks `path` for this run.
    pub fn claim(path: &Path, mode: OutMode) -> Result<RunDir> {
        let shown = path.display();
        std::fs::create_dir_all(path).with_context(|| format!("cannot create --out {shown}"))?;
        let lock = lock(path)?;
        let mut entries: Vec<String> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list --out {shown}"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name != LOCK_FILE)
            .collect();
        entries.sort();
        match mode {
            OutMode::Resume => {}
            OutMode::Fresh if entries.is_empty() => {}
            OutMode::Fresh => bail!(
                "--out {shown} is not empty (it holds {}): continue that run with --resume {shown}, \
                 replace it with --overwrite, or choose another directory",
                listing(&entries)
            ),
            OutMode::Overwrite => {
                let foreign: Vec<String> =
                    entries.iter().filter(|n| !written_by_a_run(n)).cloned().collect();
                if !foreign.is_empty() {
                    bail!(
                        "--overwrite {shown}: it holds files that no run wrote ({}); not deleting them",
                        listing(&foreign)
                    );
                }
                for name in &entries {
                    std::fs::remove_file(path.join(name))
                        .with_context(|| format!("--overwrite: cannot delete {shown}/{name}"))?;
                }
            }
        }
        Ok(RunDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// Drops the lines of `metrics.jsonl` past `step` (written after the checkpoint a resume
    /// starts from), so that the resumed run appends each step once.
    pub fn trim_metrics_after(&self, file: &str, step: u64) -> Result<()> {
        let path = self.path.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|line| line_step(line).is_some_and(|s| s <= step))
            .map(|line| format!("{line}\n"))
            .collect();
        if kept.len() != text.len() {
            std::fs::write(&path, kept).with_context(|| format!("rewriting {}", path.display()))?;
        }
        Ok(())
    }
}

fn line_step(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line).ok()?["step"].as_u64()
}

fn listing(names: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut shown = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        shown += &format!(" and {} more", names.len() - SHOWN);
    }
    shown
}

/// Takes the directory's lock without waiting and records this process's pid in it.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("--out {} is not writable", dir.display()))?;
    // SAFETY: flock on a descriptor this function owns; it neither blocks nor touches memory.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut owner = String::new();
        let _ = file.read_to_string(&mut owner);
        let owner = owner.trim();
        bail!(
            "--out {} is in use by another gfn run (pid {}); wait for it to end or choose another directory",
            dir.display(),
            if owner.is_empty() { "unknown" } else { owner }
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gfn-rundir-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_second_claim_names_the_first_owner() {
        let dir = scratch("lock");
        let first = RunDir::claim(&dir, OutMode::Fresh).unwrap();
        // flock locks belong to the open file description, so a second open in this process
        // conflicts just as another process's would.
        let err = RunDir::claim(&dir, OutMode::Resume)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        RunDir::claim(&dir, OutMode::Resume).unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_run_s_files_need_resume_or_overwrite() {
        let dir = scratch("reuse");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("summary.json"), "{}").unwrap();
        let err = RunDir::claim(&dir, OutMode::Fresh)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("summary.json") && err.contains("--overwrite"),
            "{err}"
        );
        drop(RunDir::claim(&dir, OutMode::Overwrite).unwrap());
        assert!(!dir.join("summary.json").exists());
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        let err = RunDir::claim(&dir, OutMode::Overwrite)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("notes.txt"), "{err}");
        assert!(dir.join("notes.txt").exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn trimming_keeps_the_steps_up_to_the_checkpoint() {
        let dir = scratch("trim");
        let run = RunDir::claim(&dir, OutMode::Fresh).unwrap();
        let lines = "{\"step\":10}\n{\"step\":20}\n{\"step\":30}\n";
        std::fs::write(dir.join("metrics.jsonl"), lines).unwrap();
        run.trim_metrics_after("metrics.jsonl", 20).unwrap();
        let kept = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        assert_eq!(kept, "{\"step\":10}\n{\"step\":20}\n");
        let _ = std::fs::remove_dir_all(dir);
    }
}

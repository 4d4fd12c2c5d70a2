//! What a configuration will ask of the machine, checked before anything is allocated: memory
//! (parameters with their gradient and Adam moments, one training batch with its activations,
//! the replay buffer, the evaluation batches) against the memory this process may use, and
//! threads against its CPUs. A value that cannot fit is refused with one line that names the
//! setting that contributes most, instead of an allocation failure that aborts the process.

use crate::{Error, Result};

/// Bytes per parameter: the value, its gradient, two Adam moments, and the host copy that CPU
/// rollouts read.
pub const BYTES_PER_PARAMETER: u64 = 5 * 4;

/// Threads per CPU beyond which `train.threads` is refused: more only adds switching, and
/// large values exhaust the process's threads.
pub const MAX_THREADS_PER_CPU: usize = 8;

/// One part of a run's memory, named by the setting that sizes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    pub field: &'static str,
    pub value: String,
    pub what: &'static str,
    pub bytes: u64,
}

impl Demand {
    pub fn new(
        field: &'static str,
        value: impl std::fmt::Display,
        what: &'static str,
        bytes: u64,
    ) -> Self {
        Demand {
            field,
            value: value.to_string(),
            what,
            bytes,
        }
    }
}

/// Refuses `demands` whose sum exceeds `available` bytes, naming the largest part.
pub fn check_memory(demands: &[Demand], available: u64) -> Result<()> {
    let total = demands
        .iter()
        .fold(0u64, |sum, d| sum.saturating_add(d.bytes));
    if total <= available {
        return Ok(());
    }
    let largest = demands
        .iter()
        .max_by_key(|d| d.bytes)
        .expect("a total above zero has a part");
    Err(Error::InvalidConfig {
        field: largest.field,
        value: largest.value.clone(),
        reason: format!(
            "the run would need about {} ({} {}), more than the {} of memory available to it",
            human_bytes(total),
            largest.what,
            human_bytes(largest.bytes),
            human_bytes(available)
        ),
    })
}

/// Refuses more than [`MAX_THREADS_PER_CPU`] threads per CPU of this process.
pub fn check_threads(field: &'static str, threads: usize) -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let limit = MAX_THREADS_PER_CPU * cpus;
    if threads > limit {
        return Err(Error::invalid(
            field,
            threads,
            format!("more than {MAX_THREADS_PER_CPU} per CPU of the {cpus} this process may use (at most {limit})"),
        ));
    }
    Ok(())
}

/// Memory this process may still take: the kernel's MemAvailable, lowered by a cgroup (v2)
/// limit where one applies. `None` where neither can be read (not Linux).
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })?
        * 1024;
    Some(cgroup_room().map_or(available, |room| room.min(available)))
}

fn cgroup_room() -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{name}")).ok();
    let limit: u64 = read("memory.max")?.trim().parse().ok()?;
    let used: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(limit.saturating_sub(used))
}

/// `a × b × …` without overflow (saturating: anything that large is refused anyway).
pub fn product(factors: &[u64]) -> u64 {
    factors.iter().fold(1u64, |p, &f| p.saturating_mul(f))
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_part_is_named_with_the_total() {
        let demands = [
            Demand::new("replay.capacity", 10, "replay buffer", 3 << 30),
            Demand::new("model.hidden", 100_000, "parameters", 40 << 30),
        ];
        let err = check_memory(&demands, 16 << 30).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid model.hidden = 100000: the run would need about 43.0 GiB (parameters 40.0 GiB), more than the 16.0 GiB of memory available to it"
        );
        assert!(check_memory(&demands, 43 << 30).is_ok());
    }

    #[test]
    fn sizes_saturate_instead_of_wrapping() {
        assert_eq!(product(&[u64::MAX, 2]), u64::MAX);
        let demands = [
            Demand::new("a", 1, "x", u64::MAX),
            Demand::new("b", 1, "y", u64::MAX),
        ];
        assert!(check_memory(&demands, u64::MAX - 1).is_err());
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12), "12 B");
    }

    #[test]
    fn threads_beyond_eight_per_cpu_are_refused() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert!(check_threads("train.threads", MAX_THREADS_PER_CPU * cpus).is_ok());
        let err = check_threads("train.threads", 100_000)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid train.threads = 100000: more than 8 per CPU"),
            "{err}"
        );
    }

    #[test]
    fn this_machine_reports_its_memory() {
        let bytes = available_memory().expect("Linux has /proc/meminfo");
        assert!(bytes > 1 << 20, "{bytes}");
    }
}

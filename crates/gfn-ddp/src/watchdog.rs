//! Blocking waits that the backend cannot time out itself (MPI start-up, a first collective)
//! run under a watchdog: if the wait outlives its deadline the process reports what it was
//! waiting for and exits non-zero, so no rank hangs forever on a peer that never arrives.
//! After start-up, [`CollectiveDeadline`] does the same for every collective.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Exit status of a rank that gave up waiting.
pub const TIMEOUT_EXIT_CODE: i32 = 124;

pub struct Watchdog {
    done: Arc<AtomicBool>,
}

impl Watchdog {
    pub fn arm(what: impl Into<String>, timeout: Duration) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let what = what.into();
        std::thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if flag.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !flag.load(Ordering::Acquire) {
                eprintln!(
                    "error: timed out after {} s waiting for {what}",
                    timeout.as_secs()
                );
                std::process::exit(TIMEOUT_EXIT_CODE);
            }
        });
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
    }
}

/// The rank whose arrival this rank is waiting for inside a collective, where the backend can
/// tell (the shared-memory window knows whose counter it polls); -1 when unknown.
pub(crate) static WAITING_FOR_RANK: AtomicI64 = AtomicI64::new(-1);

/// Ends the whole job from the watchdog thread, with this exit status.
pub type Abort = fn(i32);

/// A deadline on every collective after start-up: one thread per process checks how long the
/// collective in progress (if any) has been running and, past the timeout, names it (and the
/// missing rank where known) and ends the job through `abort` (MPI_Abort under MPI, which
/// also ends stopped ranks, with or without `mpirun --enable-recovery`; exiting elsewhere,
/// which the launcher answers by ending the rest).
pub struct CollectiveDeadline {
    shared: Arc<DeadlineState>,
}

struct DeadlineState {
    /// Milliseconds since `epoch` when the current collective began; 0: none running.
    entered_ms: AtomicU64,
    /// The running collective, as `Collective as usize`.
    what: AtomicUsize,
    epoch: Instant,
}

/// The collectives a deadline names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collective {
    AllReduce,
    Broadcast,
    Barrier,
    Gather,
    ReduceScatter,
    AllGather,
}

impl Collective {
    const ALL: [Collective; 6] = [
        Collective::AllReduce,
        Collective::Broadcast,
        Collective::Barrier,
        Collective::Gather,
        Collective::ReduceScatter,
        Collective::AllGather,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Collective::AllReduce => "all_reduce",
            Collective::Broadcast => "broadcast",
            Collective::Barrier => "barrier",
            Collective::Gather => "gather",
            Collective::ReduceScatter => "reduce_scatter",
            Collective::AllGather => "all_gather",
        }
    }
}

/// Marks a collective as running until dropped.
pub struct InCollective<'a>(&'a DeadlineState);

impl Drop for InCollective<'_> {
    fn drop(&mut self) {
        self.0.entered_ms.store(0, Ordering::Release);
        WAITING_FOR_RANK.store(-1, Ordering::Release);
    }
}

impl CollectiveDeadline {
    pub fn start(rank: usize, timeout: Duration, abort: Abort) -> Self {
        let shared = Arc::new(DeadlineState {
            entered_ms: AtomicU64::new(0),
            what: AtomicUsize::new(0),
            epoch: Instant::now(),
        });
        let state = shared.clone();
        let poll = (timeout / 20).clamp(Duration::from_millis(10), Duration::from_millis(200));
        std::thread::Builder::new()
            .name("gfn-collective-deadline".into())
            .spawn(move || loop {
                std::thread::sleep(poll);
                if Arc::strong_count(&state) == 1 {
                    return;
                }
                let entered = state.entered_ms.load(Ordering::Acquire);
                let now = state.epoch.elapsed().as_millis() as u64;
                if entered != 0 && now.saturating_sub(entered) > timeout.as_millis() as u64 {
                    let what = Collective::ALL[state.what.load(Ordering::Acquire)].name();
                    let missing = match WAITING_FOR_RANK.load(Ordering::Acquire) {
                        r if r >= 0 => format!("rank {r} did not arrive"),
                        _ => "a peer rank did not arrive".into(),
                    };
                    eprintln!(
                        "error: [rank {rank}] {what} did not complete within {} s (ddp.timeout_s): {missing} (stopped, dead or stuck); ending the job",
                        timeout.as_secs()
                    );
                    abort(TIMEOUT_EXIT_CODE);
                    std::process::exit(TIMEOUT_EXIT_CODE);
                }
            })
            .expect("spawning the collective deadline thread");
        CollectiveDeadline { shared }
    }

    /// Starts the clock on `what`.
    pub fn enter(&self, what: Collective) -> InCollective<'_> {
        // +1: 0 means "none running", and the first collective may begin in the first ms.
        let now = self.shared.epoch.elapsed().as_millis() as u64 + 1;
        self.shared.what.store(what as usize, Ordering::Release);
        self.shared.entered_ms.store(now, Ordering::Release);
        InCollective(&self.shared)
    }
}

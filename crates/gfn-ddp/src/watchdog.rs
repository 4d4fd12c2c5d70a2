//! Blocking waits that the backend cannot time out itself (MPI start-up, a first collective)
//! run under a watchdog: if the wait outlives its deadline the process reports what it was
//! waiting for and exits non-zero, so no rank hangs forever on a peer that never arrives.

use std::sync::atomic::{AtomicBool, Ordering};
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

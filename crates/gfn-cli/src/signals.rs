//! SIGTERM and SIGINT (a scheduler's preemption, Slurm's `--signal`, Ctrl-C) ask training to
//! stop: the ranks finish the step they are in, agree to stop, and rank 0 writes a checkpoint
//! before the job exits with [`STOPPED_EXIT_CODE`]. A second signal ends the process at once.

use std::sync::atomic::{AtomicBool, Ordering};

/// EX_TEMPFAIL: "try again later". A job script requeues on it (launch/slurm.sbatch).
pub const STOPPED_EXIT_CODE: i32 = 75;

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: libc::c_int) {
    if REQUESTED.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + signal) };
    }
}

/// Routes SIGTERM and SIGINT to the stop request.
pub fn install() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only touches an atomic and calls _exit, both async-signal-safe;
        // the sigaction struct is fully initialised before the call.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// Whether a stop was asked for on this process.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

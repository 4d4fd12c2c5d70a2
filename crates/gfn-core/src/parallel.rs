//! Threads for one training process on the CPU. libtorch's own intra-op threads split each
//! GEMM of this small model poorly (two threads buy ~15% on the update), so training instead
//! hands whole, independent pieces of work to its own threads: trajectories to roll out,
//! networks that share no parameters (or shares of the trajectories) to run forward and
//! backward, and the optimizer's elements.
//!
//! A step hands work over several times, a few hundred microseconds apart. Helpers therefore
//! spin for a while before they sleep, and the caller spins while it waits: a handoff costs a
//! few microseconds, where a condition variable's wake-up costs ~60 us on a VM (measured with
//! rayon's scopes).

use std::any::Any;
use std::cell::Cell;
use std::marker::PhantomData;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it sleeps: longer than the gaps between the handoffs
/// of one training step.
const SPIN_BEFORE_SLEEP: Duration = Duration::from_millis(2);

const IDLE: u8 = 0;
const POSTED: u8 = 1;
const DONE: u8 = 2;
const SHUTDOWN: u8 = 3;

/// A job lent to a helper: a closure on the poster's stack, which the poster keeps alive
/// (and does not touch) until the helper reports `DONE`.
type Job = *mut (dyn FnMut() + Send);

struct Slot {
    state: AtomicU8,
    sleeping: AtomicBool,
    /// Set by [`ThreadPool::rest`]: sleep as soon as idle, without spinning first.
    rest: AtomicBool,
    job: Mutex<Option<SendPtr>>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

struct SendPtr(Job);
// SAFETY: the pointee is `Send`; the pointer itself only crosses to the helper that runs it.
unsafe impl Send for SendPtr {}

struct Helper {
    slot: Arc<Slot>,
    thread: Option<JoinHandle<()>>,
}

/// `threads - 1` helper threads; the thread that calls [`map_on_pool`] is the last one.
/// Not `Sync`: each helper takes one job at a time, so only one thread may hand work out,
/// and a job cannot reach the pool to hand out more.
pub struct ThreadPool {
    helpers: Vec<Helper>,
    not_sync: PhantomData<Cell<()>>,
}

/// `threads`, or for 0 the CPUs this process may run on shared among `ranks_here` processes
/// on the machine (at least one).
pub fn resolve_threads(threads: usize, ranks_here: usize) -> usize {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    share_cpus(threads, cpus, ranks_here)
}

fn share_cpus(threads: usize, cpus: usize, ranks_here: usize) -> usize {
    match threads {
        0 => (cpus / ranks_here.max(1)).max(1),
        n => n,
    }
}

/// A pool for `threads` threads, or `None` for one. Each helper keeps libtorch to one intra-op
/// thread, so that several of them never oversubscribe the cores.
pub fn training_pool(threads: usize) -> Option<ThreadPool> {
    (threads > 1).then(|| ThreadPool {
        helpers: (1..threads).map(spawn_helper).collect(),
        not_sync: PhantomData,
    })
}

impl ThreadPool {
    /// Threads that work on a [`map_on_pool`] call, the caller included.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Sends idle helpers to sleep now rather than after spinning, to leave the cores to other
    /// threads (libtorch's own) until the next job.
    pub fn rest(&self) {
        for helper in &self.helpers {
            helper.slot.rest.store(true, Ordering::Relaxed);
        }
    }
}

fn spawn_helper(index: usize) -> Helper {
    let slot = Arc::new(Slot {
        state: AtomicU8::new(IDLE),
        sleeping: AtomicBool::new(false),
        rest: AtomicBool::new(false),
        job: Mutex::new(None),
        panic: Mutex::new(None),
    });
    let shared = Arc::clone(&slot);
    let thread = thread::Builder::new()
        .name(format!("gfn-train-{index}"))
        .spawn(move || {
            tch::set_num_threads(1);
            helper_loop(&shared)
        })
        .expect("spawning a training thread");
    Helper {
        slot,
        thread: Some(thread),
    }
}

fn helper_loop(slot: &Slot) {
    loop {
        let state = wait_for_work(slot);
        if state == SHUTDOWN {
            return;
        }
        let job = slot
            .job
            .lock()
            .expect("job slot")
            .take()
            .expect("a posted job");
        // SAFETY: the poster keeps the closure alive until it sees `DONE`, set below.
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| unsafe { (*job.0)() }));
        if let Err(payload) = outcome {
            *slot.panic.lock().expect("panic slot") = Some(payload);
        }
        slot.state.store(DONE, Ordering::Release);
    }
}

/// Spins, then sleeps, until a job is posted or the pool shuts down.
fn wait_for_work(slot: &Slot) -> u8 {
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            let state = slot.state.load(Ordering::Acquire);
            if state == POSTED || state == SHUTDOWN {
                return state;
            }
            std::hint::spin_loop();
        }
        if slot.rest.load(Ordering::Relaxed) || start.elapsed() > SPIN_BEFORE_SLEEP {
            // Either the poster sees `sleeping` and unparks us, or we see its post here.
            slot.sleeping.store(true, Ordering::SeqCst);
            let state = slot.state.load(Ordering::SeqCst);
            if state != POSTED && state != SHUTDOWN {
                thread::park();
            }
            slot.sleeping.store(false, Ordering::SeqCst);
        }
    }
}

impl Helper {
    fn post(&self, job: Job) {
        self.slot.rest.store(false, Ordering::Relaxed);
        *self.slot.job.lock().expect("job slot") = Some(SendPtr(job));
        self.slot.state.store(POSTED, Ordering::SeqCst);
        if self.slot.sleeping.load(Ordering::SeqCst) {
            self.thread
                .as_ref()
                .expect("a running helper")
                .thread()
                .unpark();
        }
    }

    /// Waits for the posted job; its panic, if it had one.
    fn wait(&self) -> Option<Box<dyn Any + Send>> {
        let mut spins = 0u32;
        while self.slot.state.load(Ordering::Acquire) != DONE {
            spins += 1;
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        self.slot.state.store(IDLE, Ordering::Release);
        self.slot.panic.lock().expect("panic slot").take()
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        for helper in &mut self.helpers {
            helper.slot.state.store(SHUTDOWN, Ordering::SeqCst);
            if let Some(thread) = helper.thread.take() {
                thread.thread().unpark();
                // A helper that panicked outside a job has nothing left to report.
                let _ = thread.join();
            }
        }
    }
}

/// Waits for every posted helper, also while the caller unwinds: their jobs borrow its stack.
struct WaitOnDrop<'a> {
    posted: &'a [Helper],
}

impl WaitOnDrop<'_> {
    /// Waits for them all; the first panic among their jobs.
    fn wait_all(&mut self) -> Option<Box<dyn Any + Send>> {
        let posted = std::mem::take(&mut self.posted);
        let mut first = None;
        for helper in posted {
            // Every helper is waited for, whatever an earlier one reported.
            let payload = helper.wait();
            first = first.or(payload);
        }
        first
    }
}

impl Drop for WaitOnDrop<'_> {
    fn drop(&mut self) {
        self.wait_all();
    }
}

/// `job` applied to every item, spread over the pool's threads (the caller runs the first
/// share); the results in the items' order. A panic in any job resumes on the caller.
pub fn map_on_pool<T, R, F>(pool: &ThreadPool, items: Vec<T>, job: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(T) -> R + Sync,
{
    let n = items.len();
    let threads = pool.threads().min(n);
    // Thread k takes items k, k + threads, ...
    let mut shares: Vec<Vec<(usize, T)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        shares[i % threads].push((i, item));
    }
    let mut outputs: Vec<Vec<(usize, R)>> = (0..threads).map(|_| Vec::new()).collect();
    let job = &job;
    let mut runners: Vec<_> = shares
        .into_iter()
        .zip(outputs.iter_mut())
        .map(|(share, out)| {
            let mut share = Some(share);
            move || {
                let share = share.take().expect("each share runs once");
                out.extend(share.into_iter().map(|(i, item)| (i, job(item))));
            }
        })
        .collect();
    if let Some((own, lent)) = runners.split_first_mut() {
        let posted = &pool.helpers[..lent.len()];
        let mut guard = WaitOnDrop { posted };
        for (helper, runner) in posted.iter().zip(lent.iter_mut()) {
            let runner: &mut (dyn FnMut() + Send) = runner;
            // SAFETY: `guard` waits for this helper before `runners` goes out of scope, on
            // return and on unwind alike; the lifetime is erased only for the hand-over.
            let runner: Job = unsafe { std::mem::transmute(runner) };
            helper.post(runner);
        }
        own();
        if let Some(payload) = guard.wait_all() {
            panic::resume_unwind(payload);
        }
    }
    drop(runners);
    let mut results: Vec<Option<R>> = (0..n).map(|_| None).collect();
    for (i, r) in outputs.into_iter().flatten() {
        results[i] = Some(r);
    }
    results
        .into_iter()
        .map(|r| r.expect("every item ran"))
        .collect()
}

/// `0..n` cut into `parts` consecutive ranges whose lengths differ by at most one: part `k` is
/// `n·k/parts .. n·(k+1)/parts`.
pub fn even_shares(n: usize, parts: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..parts).map(move |k| n * k / parts..n * (k + 1) / parts)
}

/// Runs `work` with libtorch's intra-op threads at `threads` and the pool's helpers asleep, for
/// work made of large tensor ops on the calling thread; back to one intra-op thread after.
pub fn with_intra_op_threads<R>(pool: &ThreadPool, threads: usize, work: impl FnOnce() -> R) -> R {
    pool.rest();
    tch::set_num_threads(threads as i32);
    let result = work();
    tch::set_num_threads(1);
    result
}

/// A reference that jobs on the pool's threads may read although its type is not `Sync`. tch
/// leaves its tensors unmarked, yet libtorch lets any number of threads read a tensor at once
/// (recording it in an autograd graph only bumps atomic reference counts).
pub struct ReadOnly<'a, T: ?Sized>(&'a T);

impl<'a, T: ?Sized> ReadOnly<'a, T> {
    /// # Safety
    /// While the wrapper is shared, no thread may write through any path what `value` reaches,
    /// except data that only one thread owns (a network's own gradients, say).
    pub unsafe fn new(value: &'a T) -> Self {
        ReadOnly(value)
    }

    /// Taking the wrapper by method call makes a closure capture it, not the bare reference.
    pub fn get(&self) -> &'a T {
        self.0
    }
}

// SAFETY: see `ReadOnly::new`.
unsafe impl<T: ?Sized> Send for ReadOnly<'_, T> {}
unsafe impl<T: ?Sized> Sync for ReadOnly<'_, T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_shares_cover_the_range_in_order() {
        let shares = |n, parts| even_shares(n, parts).collect::<Vec<_>>();
        assert_eq!(shares(7, 3), [0..2, 2..4, 4..7]);
        assert_eq!(shares(4, 2), [0..2, 2..4]);
        assert_eq!(shares(1, 3), [0..0, 0..0, 0..1]);
        assert_eq!(shares(5, 0), []);
    }

    #[test]
    fn unset_threads_share_the_cpus_among_the_ranks_here() {
        assert_eq!(share_cpus(0, 2, 1), 2);
        assert_eq!(share_cpus(0, 2, 2), 1);
        assert_eq!(share_cpus(0, 16, 4), 4);
        assert_eq!(share_cpus(0, 2, 8), 1, "never below one");
        assert_eq!(
            share_cpus(0, 4, 0),
            4,
            "a launcher saying 0 ranks counts as one"
        );
        assert_eq!(share_cpus(3, 2, 2), 3, "a set value is kept");
    }

    #[test]
    fn results_keep_the_items_order() {
        let pool = training_pool(3).expect("three threads make a pool");
        for n in [0usize, 1, 2, 3, 10] {
            let squares = map_on_pool(&pool, (0..n as u64).collect(), |i| i * i);
            assert_eq!(squares, (0..n as u64).map(|i| i * i).collect::<Vec<_>>());
        }
        assert!(training_pool(1).is_none());
    }

    #[test]
    fn jobs_run_on_several_threads() {
        let pool = training_pool(2).expect("two threads make a pool");
        let names = map_on_pool(&pool, vec![(), ()], |()| {
            thread::current().name().map(str::to_owned)
        });
        assert_ne!(names[0], names[1]);
        assert_eq!(names[1].as_deref(), Some("gfn-train-1"));
    }

    #[test]
    fn helpers_wake_after_sleeping() {
        let pool = training_pool(2).expect("two threads make a pool");
        thread::sleep(SPIN_BEFORE_SLEEP * 3);
        assert_eq!(map_on_pool(&pool, vec![1, 2], |i| i + 1), vec![2, 3]);
    }

    #[test]
    fn resting_helpers_sleep_at_once_and_wake_for_work() {
        let pool = training_pool(2).expect("two threads make a pool");
        assert_eq!(map_on_pool(&pool, vec![1, 2], |i| i * 3), vec![3, 6]);
        pool.rest();
        let helper = &pool.helpers[0];
        let start = Instant::now();
        while !helper.slot.sleeping.load(Ordering::SeqCst) {
            assert!(start.elapsed() < SPIN_BEFORE_SLEEP, "still spinning");
            thread::yield_now();
        }
        assert_eq!(map_on_pool(&pool, vec![4, 5], |i| i * 3), vec![12, 15]);
    }

    #[test]
    fn a_panic_in_a_helper_reaches_the_caller_and_the_pool_survives() {
        let pool = training_pool(2).expect("two threads make a pool");
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            map_on_pool(&pool, (0..4).collect(), |i| {
                assert!(i != 3, "job {i} failed");
            })
        }));
        let payload = outcome.expect_err("job 3 panics");
        let message = payload
            .downcast_ref::<String>()
            .expect("a formatted message");
        assert!(message.contains("job 3 failed"), "{message}");
        assert_eq!(map_on_pool(&pool, vec![5, 6], |i| i * 2), vec![10, 12]);
    }

    #[test]
    fn a_panic_on_the_caller_waits_for_the_helpers() {
        let pool = training_pool(2).expect("two threads make a pool");
        let finished = AtomicBool::new(false);
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            map_on_pool(&pool, vec![0, 1], |i| {
                if i == 0 {
                    panic!("caller's share fails");
                }
                thread::sleep(Duration::from_millis(20));
                finished.store(true, Ordering::SeqCst);
            })
        }));
        assert!(outcome.is_err());
        assert!(
            finished.load(Ordering::SeqCst),
            "the helper's job ended first"
        );
    }
}

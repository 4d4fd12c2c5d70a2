//! A buffer rank out of file descriptors: every accept fails at once. The server pauses
//! between attempts and logs the failures at most once per interval, instead of spinning and
//! writing a line per failure; its trainer is served throughout. (Its own test binary: it
//! lowers this process's descriptor limit.)

use gfn_buffer::client::{Client, ClientConfig};
use gfn_buffer::protocol::{Role, Token};
use gfn_buffer::server::{Server, ServerConfig};
use gfn_buffer::store::{Policy, StoreConfig};
use std::process::{Child, Command};
use std::time::Duration;

const TOKEN: Token = Token([9; 32]);

fn open_descriptors() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

fn set_soft_limit(limit: u64) {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut current), 0);
        current.rlim_cur = limit;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &current), 0);
    }
}

/// A process that connects to `port` and holds the connection for `seconds`.
fn connector(port: u16, seconds: u32) -> Child {
    Command::new("bash")
        .arg("-c")
        .arg(format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port}; sleep {seconds}"
        ))
        .spawn()
        .unwrap()
}

#[test]
fn accept_failures_are_paused_and_logged_at_most_once_per_interval() {
    let server = Server::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let config = ServerConfig {
        store: StoreConfig {
            capacity: 100,
            policy: Policy::Fifo,
            diversity: gfn_diversity::Diversity::default(),
            modes: None,
        },
        token: TOKEN,
        trainers: vec![0],
        idle_timeout: Duration::from_secs(30),
        hello_timeout: Duration::from_secs(1),
        snapshots: None,
    };
    let serving = std::thread::spawn(move || server.serve(config).unwrap());
    let trainer = Client::connect(ClientConfig {
        addr: addr.to_string(),
        token: TOKEN,
        role: Role::Trainer { rank: 0 },
        state_dim: 1,
        connect_timeout: Duration::from_secs(5),
        push_queue: 16,
        stats_every: None,
    })
    .unwrap();
    let normal = {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct we own.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        limit.rlim_cur
    };
    // No descriptor to spare: the server's accepts fail with EMFILE.
    set_soft_limit(open_descriptors());
    let connectors: Vec<Child> = (0..4).map(|_| connector(addr.port(), 3)).collect();
    std::thread::sleep(Duration::from_secs(2));
    // Served all along: the trainer's connection needs no new descriptor.
    trainer.sync(Duration::from_secs(5)).unwrap();
    set_soft_limit(normal);
    for mut c in connectors {
        let _ = c.wait();
    }
    trainer.shutdown(Duration::from_secs(5)).unwrap();
    let report = serving.join().unwrap();
    // About 2 s at one attempt per 50 ms pause: tens of failures, not hundreds of thousands.
    assert!(
        (5..=100).contains(&report.accept_errors),
        "{} accept errors",
        report.accept_errors
    );
    assert_eq!(report.accept_errors_logged, 1);
}

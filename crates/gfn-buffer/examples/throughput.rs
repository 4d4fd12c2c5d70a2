//! Server throughput on loopback: C concurrent clients, each pushing batches of B trajectories
//! and taking B/2 prefetched replay samples per round as fast as the server keeps up (what a
//! trainer does each step, without the training). Prints a markdown table of what the server
//! stored and served per second.
//!
//! `cargo run --release -p gfn-buffer --example throughput -- [CLIENTS,..] [SECONDS] [BATCH]`

use gfn_buffer::client::{Client, ClientConfig};
use gfn_buffer::protocol::{Item, Role, Token};
use gfn_buffer::server::{Server, ServerConfig};
use gfn_buffer::store::{Policy, StoreConfig};
use std::time::{Duration, Instant};

/// A 4x8 HyperGrid-sized trajectory: about 15 states of 4 coordinates.
fn trajectory(key: u64) -> Item {
    let len = 8 + (key % 15) as usize;
    Item {
        key,
        log_reward: (key % 7) as f32 - 3.0,
        states: (0..len * 4).map(|i| (i % 8) as i64).collect(),
        actions: (0..len as u32).map(|a| a % 5).collect(),
    }
}

struct Row {
    clients: usize,
    pushes_per_s: f64,
    samples_per_s: f64,
    dropped: u64,
}

fn measure(clients: usize, seconds: f64, batch: usize) -> Row {
    let token = Token::random();
    let server = Server::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let config = ServerConfig {
        store: StoreConfig {
            capacity: 100_000,
            policy: Policy::Prioritized,
            diversity: gfn_diversity::Diversity::default(),
            // Items of log-reward 3.0 or more are modes, one per key.
            modes: Some(std::sync::Arc::new(|item: &gfn_buffer::protocol::Item| {
                if item.log_reward >= 3.0 {
                    vec![item.key]
                } else {
                    Vec::new()
                }
            })),
        },
        token,
        trainers: (0..clients as u32).collect(),
        idle_timeout: Duration::from_secs(30),
        hello_timeout: Duration::from_secs(5),
        snapshots: None,
    };
    let serving = std::thread::spawn(move || server.serve(config).unwrap());
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let client = Client::connect(ClientConfig {
                    addr,
                    token,
                    role: Role::Trainer { rank: c as u32 },
                    state_dim: 4,
                    connect_timeout: Duration::from_secs(5),
                    push_queue: 1024,
                    stats_every: None,
                })
                .unwrap();
                let items: Vec<Item> = (0..batch as u64).map(trajectory).collect();
                let start = Instant::now();
                let mut taken = 0usize;
                let mut round = 0u64;
                while start.elapsed().as_secs_f64() < seconds {
                    client.push(items.clone());
                    taken += client.take(batch / 2).len();
                    round += 1;
                    // Back-pressure: at most 32 batches in flight, so that what is measured is
                    // what the server sustains, not how fast a queue fills.
                    if round.is_multiple_of(32) {
                        client.sync(Duration::from_secs(30)).unwrap();
                    }
                }
                let stats = client.sync(Duration::from_secs(30)).unwrap();
                let dropped = client.dropped_pushes();
                client.shutdown(Duration::from_secs(30)).unwrap();
                (stats, dropped, taken)
            })
        })
        .collect();
    let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let report = serving.join().unwrap();
    let elapsed = report.stats.uptime_s;
    Row {
        clients,
        pushes_per_s: report.stats.received as f64 / elapsed,
        samples_per_s: report.stats.sampled as f64 / elapsed,
        dropped: results.iter().map(|r| r.1).sum(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let clients: Vec<usize> = args
        .first()
        .map(|s| s.split(',').map(|c| c.parse().expect("clients")).collect())
        .unwrap_or_else(|| vec![1, 2, 4, 8]);
    let seconds: f64 = args.get(1).map_or(3.0, |s| s.parse().expect("seconds"));
    let batch: usize = args.get(2).map_or(16, |s| s.parse().expect("batch"));
    println!("| clients | stored trajectories/s | served samples/s | pushes dropped |");
    println!("|---|---|---|---|");
    for c in clients {
        let row = measure(c, seconds, batch);
        println!(
            "| {} | {:.0} | {:.0} | {} |",
            row.clients, row.pushes_per_s, row.samples_per_s, row.dropped
        );
    }
}

//! The server and client over real loopback sockets: the protocol's happy path, every kind of
//! bad input, and peers that disappear.

use gfn_buffer::client::{Client, ClientConfig};
use gfn_buffer::protocol::{
    encode, Hello, Item, Reply, Request, Role, Token, FRAME_LIMIT, PROTOCOL_VERSION,
};
use gfn_buffer::server::{ServeReport, Server, ServerConfig};
use gfn_buffer::snapshot::SnapshotFiles;
use gfn_buffer::store::{Policy, StoreConfig};
use gfn_buffer::BufferError;
use rand::{Rng, SeedableRng};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const TOKEN: Token = Token([42; 32]);
const STATE_DIM: u32 = 2;

fn start(trainers: u32, policy: Policy) -> (SocketAddr, JoinHandle<ServeReport>) {
    start_with(trainers, policy, Duration::from_secs(30))
}

fn start_with(
    trainers: u32,
    policy: Policy,
    idle_timeout: Duration,
) -> (SocketAddr, JoinHandle<ServeReport>) {
    start_in(trainers, policy, idle_timeout, None)
}

fn start_in(
    trainers: u32,
    policy: Policy,
    idle_timeout: Duration,
    snapshots: Option<SnapshotFiles>,
) -> (SocketAddr, JoinHandle<ServeReport>) {
    let server = Server::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let config = ServerConfig {
        store: StoreConfig {
            capacity: 1000,
            policy,
            diversity: gfn_diversity::Diversity::default(),
            // Items of log-reward 1.0 or more are modes, one per key.
            modes: Some(std::sync::Arc::new(|item: &gfn_buffer::protocol::Item| {
                if item.log_reward >= 1.0 {
                    vec![item.key]
                } else {
                    Vec::new()
                }
            })),
        },
        token: TOKEN,
        trainers: (0..trainers).collect(),
        idle_timeout,
        hello_timeout: Duration::from_secs(2),
        snapshots,
    };
    (
        addr,
        std::thread::spawn(move || server.serve(config).unwrap()),
    )
}

fn client(addr: SocketAddr, rank: u32) -> gfn_buffer::Result<Client> {
    Client::connect(ClientConfig {
        addr: addr.to_string(),
        token: TOKEN,
        role: Role::Trainer { rank },
        state_dim: STATE_DIM,
        connect_timeout: Duration::from_secs(5),
        push_queue: 1024,
        stats_every: None,
    })
}

/// A trajectory (0,0) → (key,0) → exit, `key` steps long, with the given log-reward.
fn item(key: u64, log_reward: f32) -> Item {
    let mut states = Vec::new();
    let mut actions = Vec::new();
    for x in 0..=key as i64 {
        states.extend([x, 0]);
        actions.push(if x == key as i64 { 2 } else { 0 });
    }
    Item {
        key,
        log_reward,
        states,
        actions,
    }
}

fn take_until(client: &Client, n: usize) -> Vec<Item> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let items = client.take(n);
        if items.len() == n || Instant::now() > deadline {
            return items;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn pushes_are_stored_sampled_and_counted_then_the_server_exits() {
    let (addr, server) = start(2, Policy::Fifo);
    let a = client(addr, 0).unwrap();
    let b = client(addr, 1).unwrap();
    assert!(a.push((0..10).map(|k| item(k, 0.0)).collect()));
    assert!(b.push(vec![item(20, 2.0), item(21, 1.0), item(22, 0.5)]));
    let stats_a = a.sync(Duration::from_secs(5)).unwrap();
    assert!(stats_a.received >= 10);
    let stats = b.sync(Duration::from_secs(5)).unwrap();
    assert_eq!((stats.received, stats.size), (13, 13));
    assert_eq!(stats.mode_keys, vec![20, 21]);
    assert_eq!(stats.trainers, 2);
    // Samples come back intact: every one is a stored trajectory.
    let drawn = take_until(&a, 50);
    assert_eq!(drawn.len(), 50);
    for it in &drawn {
        let expected = if it.key >= 20 {
            item(it.key, [2.0, 1.0, 0.5][(it.key - 20) as usize])
        } else {
            item(it.key, 0.0)
        };
        assert_eq!(it, &expected);
    }
    assert!(a.received_items() >= 50);
    let bye = a.shutdown(Duration::from_secs(5)).unwrap();
    assert!(bye.sampled >= 50);
    b.shutdown(Duration::from_secs(5)).unwrap();
    let report = server.join().unwrap();
    assert_eq!((report.trainers_finished, report.trainers_lost), (2, 0));
    assert_eq!(report.stats.received, 13);
    assert!(!report.idle_exit);
}

#[test]
fn a_saved_store_is_restored_by_a_new_server_with_its_counts() {
    let dir = std::env::temp_dir().join(format!("gfn-buffer-snapshots-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let files = SnapshotFiles {
        dir: dir.clone(),
        rank: 1,
    };
    let timeout = Duration::from_secs(5);
    let idle = Duration::from_secs(30);
    let (addr, server) = start_in(1, Policy::Fifo, idle, Some(files.clone()));
    let c = client(addr, 0).unwrap();
    c.push((0..30).map(|k| item(k, k as f32 / 10.0)).collect());
    // The save follows the push on the connection, so it holds all 30 items.
    assert_eq!(c.save(7, timeout).unwrap(), 30);
    let before = c.sync(timeout).unwrap();
    c.shutdown(timeout).unwrap();
    server.join().unwrap();

    let (addr, server) = start_in(1, Policy::Fifo, idle, Some(files));
    let c = client(addr, 0).unwrap();
    assert_eq!(
        c.restore(8, timeout).unwrap(),
        None,
        "no snapshot of step 8"
    );
    assert_eq!(c.sync(timeout).unwrap().size, 0);
    assert_eq!(c.restore(7, timeout).unwrap(), Some(30));
    let after = c.sync(timeout).unwrap();
    for (what, a, b) in [
        ("size", after.size, before.size),
        ("received", after.received, before.received),
        ("modes", after.modes_found, before.modes_found),
    ] {
        assert_eq!(a, b, "{what}");
    }
    assert_eq!(after.log_reward_percentiles, before.log_reward_percentiles);
    let drawn = take_until(&c, 20);
    assert!(drawn.iter().all(|i| i == &item(i.key, i.key as f32 / 10.0)));
    c.shutdown(timeout).unwrap();
    server.join().unwrap();

    // A server without a snapshot directory refuses, and the connection stays usable.
    let (addr, server) = start(1, Policy::Fifo);
    let c = client(addr, 0).unwrap();
    let err = c.save(1, timeout).unwrap_err().to_string();
    assert!(err.contains("keeps no snapshots"), "{err}");
    assert_eq!(c.sync(timeout).unwrap().size, 0);
    c.shutdown(timeout).unwrap();
    server.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unique_policy_serves_each_terminal_state_once() {
    let (addr, server) = start(1, Policy::Unique);
    let c = client(addr, 0).unwrap();
    c.push((0..40).map(|k| item(k % 4, 0.0)).collect());
    let stats = c.sync(Duration::from_secs(5)).unwrap();
    assert_eq!((stats.size, stats.duplicates), (4, 36));
    c.shutdown(Duration::from_secs(5)).unwrap();
    server.join().unwrap();
}

fn raw_connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn write_frame(stream: &mut TcpStream, payload: &[u8]) {
    stream
        .write_all(&(payload.len() as u32).to_be_bytes())
        .unwrap();
    stream.write_all(payload).unwrap();
}

/// Reads one reply frame, or `None` once the server has closed the connection.
fn read_reply(stream: &mut TcpStream) -> Option<Reply> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut frame).ok()?;
    Some(gfn_buffer::protocol::decode(&frame).unwrap())
}

fn closed(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(0) | Err(_))
}

fn hello(token: Token, version: u16) -> Vec<u8> {
    encode(&Hello {
        version,
        token,
        role: Role::Observer { rank: 9 },
        state_dim: STATE_DIM,
    })
    .to_vec()
}

fn expect_error(stream: &mut TcpStream, needle: &str) {
    match read_reply(stream) {
        Some(Reply::Error { reason }) => assert!(reason.contains(needle), "{reason}"),
        other => panic!("expected an error naming {needle:?}, got {other:?}"),
    }
    assert!(closed(stream));
}

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn bad_input_is_refused_without_harming_other_clients() {
    // One trainer: the good client. Raw connections that misbehave never count as trainers.
    let (addr, server) = start(1, Policy::Prioritized);
    let good = client(addr, 0).unwrap();
    good.push((0..5).map(|k| item(k, 0.0)).collect());
    let rss_before = resident_kib();

    // Wrong token, through the real client: a clear refusal.
    let err = Client::connect(ClientConfig {
        addr: addr.to_string(),
        token: Token([0; 32]),
        role: Role::Trainer { rank: 5 },
        state_dim: STATE_DIM,
        connect_timeout: Duration::from_secs(5),
        push_queue: 4,
        stats_every: None,
    })
    .err()
    .expect("refused");
    assert!(
        matches!(&err, BufferError::Refused { reason, .. } if reason.contains("token")),
        "{err}"
    );
    // A training rank this buffer does not serve, and a second session for a served one.
    for (rank, needle) in [(7, "not assigned"), (0, "already")] {
        let err = client(addr, rank).err().expect("refused");
        assert!(
            matches!(&err, BufferError::Refused { reason, .. } if reason.contains(needle)),
            "{err}"
        );
    }

    // Another protocol version.
    let mut s = raw_connect(addr);
    write_frame(&mut s, &hello(TOKEN, PROTOCOL_VERSION + 1));
    expect_error(&mut s, "protocol version");

    // Random bytes instead of a hello.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for _ in 0..20 {
        let mut s = raw_connect(addr);
        let junk: Vec<u8> = (0..rng.gen_range(1..200)).map(|_| rng.gen()).collect();
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        assert!(closed(&mut s) || matches!(read_reply(&mut s), Some(Reply::Error { .. }) | None));
    }

    // A huge length prefix before authenticating, then after: refused, nothing allocated.
    for _ in 0..50 {
        let mut s = raw_connect(addr);
        s.write_all(&u32::MAX.to_be_bytes()).unwrap();
        expect_error(&mut s, "frame");
    }
    let mut s = raw_connect(addr);
    write_frame(&mut s, &hello(TOKEN, PROTOCOL_VERSION));
    assert!(matches!(read_reply(&mut s), Some(Reply::Welcome { .. })));
    s.write_all(&((FRAME_LIMIT + 1) as u32).to_be_bytes())
        .unwrap();
    expect_error(&mut s, "frame");

    // A truncated frame: the length promises more than ever arrives.
    let mut s = raw_connect(addr);
    write_frame(&mut s, &hello(TOKEN, PROTOCOL_VERSION));
    assert!(matches!(read_reply(&mut s), Some(Reply::Welcome { .. })));
    s.write_all(&100u32.to_be_bytes()).unwrap();
    s.write_all(&[1, 2, 3]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    expect_error(&mut s, "frame");

    // Malformed requests after the hello: garbage, an item of the wrong shape, a huge sample.
    for (payload, needle) in [
        (vec![200, 1, 2, 3], "malformed"),
        (
            encode(&Request::Push {
                items: vec![Item {
                    key: 1,
                    log_reward: 0.0,
                    states: vec![1, 2, 3],
                    actions: vec![0],
                }],
            })
            .to_vec(),
            "state coordinates",
        ),
        (encode(&Request::Sample { n: u32::MAX }).to_vec(), "sample"),
    ] {
        let mut s = raw_connect(addr);
        write_frame(&mut s, &hello(TOKEN, PROTOCOL_VERSION));
        assert!(matches!(read_reply(&mut s), Some(Reply::Welcome { .. })));
        write_frame(&mut s, &payload);
        expect_error(&mut s, needle);
    }

    // A connection that says nothing is dropped after the hello timeout.
    let mut silent = raw_connect(addr);
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    expect_error(&mut silent, "no hello");

    // Nothing above cost memory in proportion to the lengths it claimed.
    let grown = resident_kib().saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "resident memory grew by {grown} KiB");

    // The good client was never disturbed.
    assert!(good.lost().is_none());
    let stats = good.sync(Duration::from_secs(5)).unwrap();
    assert_eq!(stats.received, 5);
    assert_eq!(take_until(&good, 8).len(), 8);
    good.shutdown(Duration::from_secs(5)).unwrap();
    let report = server.join().unwrap();
    assert_eq!(report.trainers_finished, 1);
    // Token, rank twice, version, 50 huge prefixes, the silent one; the junk may add more.
    assert!(report.refused >= 55, "{}", report.refused);
}

#[test]
fn random_frames_after_the_hello_never_stop_the_server() {
    let (addr, server) = start(1, Policy::Fifo);
    let good = client(addr, 0).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let valid = encode(&Request::Push {
        items: vec![item(3, 0.5), item(1, 2.0)],
    })
    .to_vec();
    for round in 0..200 {
        let mut s = raw_connect(addr);
        write_frame(&mut s, &hello(TOKEN, PROTOCOL_VERSION));
        assert!(matches!(read_reply(&mut s), Some(Reply::Welcome { .. })));
        // Half random bytes, half a valid push with a few bytes flipped.
        let payload: Vec<u8> = if round % 2 == 0 {
            (0..rng.gen_range(0..300)).map(|_| rng.gen()).collect()
        } else {
            let mut p = valid.clone();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..p.len());
                p[i] ^= rng.gen::<u8>() | 1;
            }
            p
        };
        write_frame(&mut s, &payload);
        write_frame(&mut s, &encode(&Request::Stats));
        // Either the frame was accepted (a stats reply follows) or refused with an error.
        match read_reply(&mut s) {
            Some(Reply::Stats(_))
            | Some(Reply::Error { .. })
            | Some(Reply::Samples { .. })
            | None => {}
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert!(good.lost().is_none());
    good.push(vec![item(2, 0.0)]);
    assert!(good.sync(Duration::from_secs(5)).is_ok());
    good.shutdown(Duration::from_secs(5)).unwrap();
    server.join().unwrap();
}

#[test]
fn the_fuzz_entry_point_survives_random_and_mutated_inputs() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let seeds = [
        hello(TOKEN, PROTOCOL_VERSION),
        encode(&Request::Push {
            items: vec![item(2, 0.5), item(0, -1.0)],
        })
        .to_vec(),
        encode(&Request::Sample { n: 70_000 }).to_vec(),
    ];
    for i in 0..20_000 {
        let mut input = if i % 3 == 0 {
            (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect()
        } else {
            let seed = &seeds[i % seeds.len()];
            let mut framed = (seed.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(seed);
            framed
        };
        for _ in 0..rng.gen_range(0..4) {
            if !input.is_empty() {
                let j = rng.gen_range(0..input.len());
                input[j] = rng.gen();
            }
        }
        gfn_buffer::fuzzing::feed(&input);
    }
}

#[test]
fn a_trainer_that_disappears_does_not_keep_the_server_waiting() {
    let (addr, server) = start(2, Policy::Fifo);
    let finishing = client(addr, 0).unwrap();
    let vanishing = client(addr, 1).unwrap();
    vanishing.push(vec![item(1, 0.0)]);
    vanishing.sync(Duration::from_secs(5)).unwrap();
    drop(vanishing); // closes the socket without a shutdown, as a killed process would
    finishing.shutdown(Duration::from_secs(5)).unwrap();
    let report = server.join().unwrap();
    assert_eq!((report.trainers_finished, report.trainers_lost), (1, 1));
}

#[test]
fn a_server_nobody_reaches_gives_up_after_its_idle_timeout() {
    let started = Instant::now();
    let (_, server) = start_with(3, Policy::Fifo, Duration::from_millis(300));
    let report = server.join().unwrap();
    assert!(report.idle_exit);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_client_whose_server_dies_reports_it_and_never_blocks() {
    // A stand-in server: welcomes the client, then vanishes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut frame).unwrap();
        write_frame(
            &mut s,
            &encode(&Reply::Welcome {
                version: PROTOCOL_VERSION,
            }),
        );
        std::thread::sleep(Duration::from_millis(200));
    });
    let c = client(addr, 0).unwrap();
    fake.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.lost().is_none() && Instant::now() < deadline {
        assert!(c.take(4).is_empty());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(c.lost().unwrap().contains("closed"), "{:?}", c.lost());
    let t = Instant::now();
    for _ in 0..10_000 {
        c.push(vec![item(1, 0.0)]);
        c.take(4);
    }
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "pushing to a lost server blocked"
    );
    assert_eq!(c.dropped_pushes(), 10_000);
    assert!(c.sync(Duration::from_secs(1)).is_err());
}

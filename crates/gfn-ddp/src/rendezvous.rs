//! TCP rendezvous for launches without MPI (torchrun-style): rank 0 listens, every other rank
//! connects and registers with a small contribution (bytes), and once all have arrived rank 0
//! sends every rank the contributions of all (an all-gather): the NCCL unique id, the job token,
//! the replay-buffer servers' addresses. Every wait has a deadline. Rank 0 listens on
//! MASTER_PORT + 1 (or GFN_RENDEZVOUS_PORT): under torchrun the agent already serves its own
//! store on MASTER_PORT. Rank 0 speaks first (the magic), and a rank writes nothing until it has
//! heard it: a client that reached some other listener on that port (a gloo pair of this node,
//! which takes any connection as its peer and aborts its process on bytes it cannot parse)
//! leaves again without having sent it a byte.

use crate::{DdpError, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"GFNRDV03";
/// Largest contribution of one rank.
pub const MAX_CONTRIBUTION: u32 = 64 << 10;
/// Largest table rank 0 may send back.
const MAX_TABLE: u64 = 256 << 20;

/// The rendezvous port for a given MASTER_PORT.
pub fn rendezvous_port(master_port: u16, override_var: Option<String>) -> Result<u16> {
    match override_var {
        Some(v) => v
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or(DdpError::InvalidEnv {
                var: "GFN_RENDEZVOUS_PORT",
                value: v,
                reason: "not a port number (1-65535)".into(),
            }),
        None => master_port.checked_add(1).ok_or(DdpError::InvalidEnv {
            var: "MASTER_PORT",
            value: master_port.to_string(),
            reason: "the rendezvous uses MASTER_PORT + 1, which overflows".into(),
        }),
    }
}

/// Joins the rendezvous of `world_size` ranks at `host:port` with this rank's contribution;
/// returns every rank's contribution, indexed by rank.
pub fn all_gather(
    host: &str,
    port: u16,
    rank: usize,
    world_size: usize,
    contribution: Vec<u8>,
    timeout: Duration,
) -> Result<Vec<Vec<u8>>> {
    Rendezvous::join(host, port, rank, world_size, timeout)?.all_gather(contribution)
}

/// This rank's place at the rendezvous, taken before it opens any other socket: rank 0 holds
/// the port, and every other rank has heard rank 0 greet on it. So no listener that a rank of
/// this job binds to a kernel-chosen port (a gloo pair) can be holding the rendezvous port.
pub struct Rendezvous {
    addr: String,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    deadline: Instant,
    /// Rank 0's listener.
    listener: Option<TcpListener>,
}

impl Rendezvous {
    /// Rank 0 binds the port; another rank waits until rank 0 greets on it. Both within
    /// `timeout`, which also bounds the all-gather that follows.
    pub fn join(
        host: &str,
        port: u16,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let mut rendezvous = Rendezvous {
            addr: format!("{host}:{port}"),
            rank,
            world_size,
            timeout,
            deadline: Instant::now() + timeout,
            listener: None,
        };
        if rank == 0 {
            let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
                rendezvous.fail(format!("rank 0 cannot listen on port {port}: {e}"))
            })?;
            listener.set_nonblocking(true)?;
            rendezvous.listener = Some(listener);
        } else {
            // Heard, and left again: rank 0 takes the closed connection for a stray one.
            rendezvous.reach_rank_0()?;
        }
        Ok(rendezvous)
    }

    /// Every rank's contribution, indexed by rank.
    pub fn all_gather(self, contribution: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        if contribution.len() > MAX_CONTRIBUTION as usize {
            return Err(self.fail(format!(
                "a contribution of {} bytes exceeds the {MAX_CONTRIBUTION}-byte limit",
                contribution.len()
            )));
        }
        match &self.listener {
            Some(listener) => self.serve(listener, contribution),
            None => self.register(contribution),
        }
    }

    fn fail(&self, reason: String) -> DdpError {
        DdpError::Rendezvous {
            addr: self.addr.clone(),
            reason,
        }
    }

    /// Rank 0: waits for every other rank's registration, then sends all of them the table.
    fn serve(&self, listener: &TcpListener, contribution: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let world_size = self.world_size;
        let mut peers: Vec<Option<(TcpStream, Vec<u8>)>> = (0..world_size).map(|_| None).collect();
        let mut arrived = 1;
        while arrived < world_size {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let hello = stream
                        .write_all(MAGIC)
                        .and_then(|()| read_hello(&mut stream));
                    match hello {
                        Ok((r, w, bytes))
                            if w as usize == world_size
                                && (1..world_size).contains(&(r as usize))
                                && peers[r as usize].is_none() =>
                        {
                            peers[r as usize] = Some((stream, bytes));
                            arrived += 1;
                        }
                        Ok((r, w, _)) => {
                            return Err(self.fail(format!("a peer registered as rank {r} of {w}, but this job has world size {world_size} (or that rank arrived twice)")));
                        }
                        // A stray connection (port scan, health check, a rank's first call): ignore it.
                        Err(_) => continue,
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= self.deadline {
                        let missing: Vec<usize> =
                            (1..world_size).filter(|&r| peers[r].is_none()).collect();
                        return Err(self.fail(format!(
                            "ranks {missing:?} of {world_size} did not arrive within {} s",
                            self.timeout.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(self.fail(format!("accept failed: {e}"))),
            }
        }
        let mut table = vec![contribution];
        table.extend(
            peers
                .iter()
                .skip(1)
                .map(|p| p.as_ref().expect("arrived").1.clone()),
        );
        let mut encoded = (table.len() as u32).to_le_bytes().to_vec();
        for entry in &table {
            encoded.extend((entry.len() as u32).to_le_bytes());
            encoded.extend(entry);
        }
        for (stream, _) in peers.iter_mut().flatten() {
            stream.write_all(&(encoded.len() as u64).to_le_bytes())?;
            stream.write_all(&encoded)?;
        }
        Ok(table)
    }

    /// A connection on which rank 0 has greeted, tried until the deadline.
    fn reach_rank_0(&self) -> Result<TcpStream> {
        loop {
            let attempt = self
                .addr
                .to_socket_addrs()
                .map_err(|e| self.fail(format!("cannot resolve: {e}")))?
                .find_map(|a| greeted_by_rank_0(&a));
            match attempt {
                Some(stream) => return Ok(stream),
                None if Instant::now() >= self.deadline => {
                    return Err(self.fail(format!(
                        "rank {} could not reach rank 0 within {} s",
                        self.rank,
                        self.timeout.as_secs()
                    )))
                }
                None => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Another rank: registers with rank 0 and reads the table back.
    fn register(&self, contribution: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let mut stream = self.reach_rank_0()?;
        let mut hello = MAGIC.to_vec();
        hello.extend((self.rank as u32).to_le_bytes());
        hello.extend((self.world_size as u32).to_le_bytes());
        hello.extend((contribution.len() as u32).to_le_bytes());
        hello.extend(&contribution);
        stream.write_all(&hello)?;
        let remaining = self
            .deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        stream.set_read_timeout(Some(remaining))?;
        let mut len = [0u8; 8];
        stream.read_exact(&mut len).map_err(|e| {
            self.fail(format!(
                "rank 0 did not complete the rendezvous within {} s ({e})",
                self.timeout.as_secs()
            ))
        })?;
        let len = u64::from_le_bytes(len);
        if len > MAX_TABLE {
            return Err(self.fail(format!(
                "a table of {len} bytes exceeds the {MAX_TABLE}-byte limit"
            )));
        }
        let mut encoded = vec![0u8; len as usize];
        stream
            .read_exact(&mut encoded)
            .map_err(|e| self.fail(format!("truncated table ({e})")))?;
        parse_table(&encoded, self.world_size)
            .ok_or_else(|| self.fail("malformed table from rank 0".into()))
    }
}

/// A connection to `addr` if what listens there greets as rank 0 does within a second.
fn greeted_by_rank_0(addr: &SocketAddr) -> Option<TcpStream> {
    let mut stream = TcpStream::connect_timeout(addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut greeting = [0u8; MAGIC.len()];
    stream.read_exact(&mut greeting).ok()?;
    (&greeting == MAGIC).then_some(stream)
}

/// A port that is free now, and the port after it, both below the kernel's ephemeral range
/// (`ip_local_port_range`): no socket bound to port 0 (gloo's pairs, outgoing connections)
/// can take them, so they stay free until a job binds them explicitly. For launching test
/// jobs on one machine: MASTER_PORT for torchrun's store, and the rendezvous after it.
pub fn free_port_pair() -> Option<u16> {
    static PICKED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOWEST: u16 = 10_000;
    let span = u32::from(ephemeral_start.checked_sub(LOWEST + 1)?);
    // A different start per process and per call keeps concurrent tests apart.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let picked = PICKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let start = (std::process::id() ^ nanos).wrapping_add(picked.wrapping_mul(7919));
    (0..span.min(2000))
        .map(|i| LOWEST + ((start.wrapping_add(i)) % span) as u16)
        .find(|&port| {
            [port, port + 1]
                .iter()
                .all(|&p| TcpListener::bind(("0.0.0.0", p)).is_ok())
        })
}

fn parse_table(mut bytes: &[u8], world_size: usize) -> Option<Vec<Vec<u8>>> {
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, rest) = bytes.split_at_checked(n)?;
        bytes = rest;
        Some(head)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    if count != world_size {
        return None;
    }
    (0..count)
        .map(|_| {
            let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
            take(len).map(<[u8]>::to_vec)
        })
        .collect()
}

/// Reads a peer's registration: rank, world size and contribution.
fn read_hello(stream: &mut TcpStream) -> std::io::Result<(u32, u32, Vec<u8>)> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut buf = [0u8; 20];
    stream.read_exact(&mut buf)?;
    if &buf[..8] != MAGIC {
        return Err(invalid("not a gfn rendezvous hello"));
    }
    let word = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap());
    let len = word(16);
    if len > MAX_CONTRIBUTION {
        return Err(invalid("contribution too large"));
    }
    let mut contribution = vec![0u8; len as usize];
    stream.read_exact(&mut contribution)?;
    Ok((word(8), word(12), contribution))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Below the ephemeral range: the gloo pairs of tests running beside cannot take it.
    fn free_port() -> u16 {
        free_port_pair().unwrap()
    }

    #[test]
    fn every_rank_receives_every_contribution() {
        let port = free_port();
        let contribution = |r: usize| format!("rank {r}").into_bytes().repeat(r);
        let expected: Vec<Vec<u8>> = (0..4).map(contribution).collect();
        let peers: Vec<_> = (1..4)
            .map(|r| {
                std::thread::spawn(move || {
                    all_gather(
                        "127.0.0.1",
                        port,
                        r,
                        4,
                        contribution(r),
                        Duration::from_secs(10),
                    )
                    .unwrap()
                })
            })
            .collect();
        let root = all_gather(
            "127.0.0.1",
            port,
            0,
            4,
            contribution(0),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(root, expected);
        assert!(root[0].is_empty());
        for p in peers {
            assert_eq!(p.join().unwrap(), expected);
        }
    }

    #[test]
    fn a_rank_that_never_arrives_times_out_with_a_clear_error() {
        let port = free_port();
        let start = Instant::now();
        let err = all_gather("127.0.0.1", port, 0, 2, vec![1], Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ranks [1] of 2 did not arrive within 1 s"),
            "{err}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        let err = all_gather(
            "127.0.0.1",
            free_port(),
            1,
            2,
            vec![],
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("could not reach rank 0"), "{err}");
    }

    #[test]
    fn a_rank_sends_nothing_to_a_listener_that_is_not_rank_0() {
        // What listens is not rank 0 (say, a gloo pair that took the port): it never greets.
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let received = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            let mut bytes = Vec::new();
            let _ = stream.read_to_end(&mut bytes);
            bytes
        });
        let err = all_gather("127.0.0.1", port, 1, 2, vec![7; 64], Duration::from_secs(2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("could not reach rank 0"), "{err}");
        assert_eq!(received.join().unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn a_rank_joins_only_once_rank_0_holds_the_port_and_greets_on_it() {
        let port = free_port();
        let started = Instant::now();
        let guest = std::thread::spawn(move || {
            let joined = Rendezvous::join("127.0.0.1", port, 1, 2, Duration::from_secs(10));
            let at = started.elapsed();
            (at, joined.unwrap().all_gather(vec![1]).unwrap())
        });
        std::thread::sleep(Duration::from_millis(400));
        let host = Rendezvous::join("127.0.0.1", port, 0, 2, Duration::from_secs(10)).unwrap();
        // Held from the join on: nothing else (a gloo pair) can bind it.
        assert!(TcpListener::bind(("127.0.0.1", port)).is_err());
        std::thread::sleep(Duration::from_millis(400));
        let table = host.all_gather(vec![0]).unwrap();
        let (joined_at, guest_table) = guest.join().unwrap();
        // Rank 0 greets from its all-gather on: the guest was still waiting until then.
        assert!(joined_at >= Duration::from_millis(800), "{joined_at:?}");
        assert_eq!(table, vec![vec![0], vec![1]]);
        assert_eq!(guest_table, table);
    }

    #[test]
    fn free_port_pairs_are_free_and_below_the_ephemeral_range() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let ephemeral_start: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
        for _ in 0..20 {
            let port = free_port_pair().unwrap();
            assert!((10_000..ephemeral_start - 1).contains(&port), "{port}");
            let _first = TcpListener::bind(("0.0.0.0", port)).unwrap();
            let _second = TcpListener::bind(("0.0.0.0", port + 1)).unwrap();
        }
    }

    #[test]
    fn the_port_is_master_port_plus_one_unless_overridden() {
        assert_eq!(rendezvous_port(29500, None).unwrap(), 29501);
        assert_eq!(rendezvous_port(29500, Some("4000".into())).unwrap(), 4000);
        assert!(rendezvous_port(29500, Some("x".into()))
            .unwrap_err()
            .to_string()
            .contains("GFN_RENDEZVOUS_PORT"));
        assert!(rendezvous_port(65535, None).is_err());
    }
}

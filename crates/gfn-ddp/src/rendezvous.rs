//! TCP rendezvous for launches without MPI (torchrun-style): rank 0 listens, every other rank
//! connects and registers, and once all have arrived rank 0 sends each the same payload (e.g.
//! the NCCL unique id). Every wait has a deadline. Rank 0 listens on MASTER_PORT + 1 (or
//! GFN_RENDEZVOUS_PORT): under torchrun the agent already serves its own store on MASTER_PORT.

use crate::{DdpError, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"GFNRDV01";
/// Largest payload accepted from rank 0.
const MAX_PAYLOAD: u32 = 1 << 20;

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

/// Joins the rendezvous of `world_size` ranks at `host:port`. Rank 0 passes the payload to
/// distribute; every rank returns it.
pub fn rendezvous(
    host: &str,
    port: u16,
    rank: usize,
    world_size: usize,
    payload: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let addr = format!("{host}:{port}");
    let fail = |reason: String| DdpError::Rendezvous {
        addr: addr.clone(),
        reason,
    };
    let deadline = Instant::now() + timeout;
    if rank == 0 {
        let payload = payload.expect("rank 0 provides the payload");
        let listener = TcpListener::bind(("0.0.0.0", port))
            .map_err(|e| fail(format!("rank 0 cannot listen on port {port}: {e}")))?;
        listener.set_nonblocking(true)?;
        let mut peers: Vec<Option<TcpStream>> = (0..world_size).map(|_| None).collect();
        let mut arrived = 1;
        while arrived < world_size {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                    match read_hello(&mut stream) {
                        Ok((r, w))
                            if w as usize == world_size
                                && (1..world_size).contains(&(r as usize))
                                && peers[r as usize].is_none() =>
                        {
                            peers[r as usize] = Some(stream);
                            arrived += 1;
                        }
                        Ok((r, w)) => {
                            return Err(fail(format!("a peer registered as rank {r} of {w}, but this job has world size {world_size} (or that rank arrived twice)")));
                        }
                        // A stray connection (port scan, health check): ignore it.
                        Err(_) => continue,
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> =
                            (1..world_size).filter(|&r| peers[r].is_none()).collect();
                        return Err(fail(format!(
                            "ranks {missing:?} of {world_size} did not arrive within {} s",
                            timeout.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(fail(format!("accept failed: {e}"))),
            }
        }
        for stream in peers.iter_mut().flatten() {
            stream.write_all(&(payload.len() as u32).to_le_bytes())?;
            stream.write_all(&payload)?;
        }
        Ok(payload)
    } else {
        let mut stream = loop {
            let attempt = addr
                .to_socket_addrs()
                .map_err(|e| fail(format!("cannot resolve: {e}")))?
                .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok());
            match attempt {
                Some(stream) => break stream,
                None if Instant::now() >= deadline => {
                    return Err(fail(format!(
                        "rank {rank} could not reach rank 0 within {} s",
                        timeout.as_secs()
                    )))
                }
                None => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        stream.write_all(MAGIC)?;
        stream.write_all(&(rank as u32).to_le_bytes())?;
        stream.write_all(&(world_size as u32).to_le_bytes())?;
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        stream.set_read_timeout(Some(remaining))?;
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).map_err(|e| {
            fail(format!(
                "rank 0 did not complete the rendezvous within {} s ({e})",
                timeout.as_secs()
            ))
        })?;
        let len = u32::from_le_bytes(len);
        if len > MAX_PAYLOAD {
            return Err(fail(format!(
                "payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"
            )));
        }
        let mut payload = vec![0u8; len as usize];
        stream
            .read_exact(&mut payload)
            .map_err(|e| fail(format!("truncated payload ({e})")))?;
        Ok(payload)
    }
}

fn read_hello(stream: &mut TcpStream) -> std::io::Result<(u32, u32)> {
    let mut buf = [0u8; 16];
    stream.read_exact(&mut buf)?;
    if &buf[..8] != MAGIC {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a gfn rendezvous hello",
        ));
    }
    Ok((
        u32::from_le_bytes(buf[8..12].try_into().unwrap()),
        u32::from_le_bytes(buf[12..16].try_into().unwrap()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn every_rank_receives_rank_zeros_payload() {
        let port = free_port();
        let peers: Vec<_> = (1..3)
            .map(|r| {
                std::thread::spawn(move || {
                    rendezvous("127.0.0.1", port, r, 3, None, Duration::from_secs(10)).unwrap()
                })
            })
            .collect();
        let root = rendezvous(
            "127.0.0.1",
            port,
            0,
            3,
            Some(b"unique-id".to_vec()),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(root, b"unique-id");
        for p in peers {
            assert_eq!(p.join().unwrap(), b"unique-id");
        }
    }

    #[test]
    fn a_rank_that_never_arrives_times_out_with_a_clear_error() {
        let port = free_port();
        let start = Instant::now();
        let err = rendezvous(
            "127.0.0.1",
            port,
            0,
            2,
            Some(vec![1]),
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ranks [1] of 2 did not arrive within 1 s"),
            "{err}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        let err = rendezvous("127.0.0.1", free_port(), 1, 2, None, Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("could not reach rank 0"), "{err}");
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

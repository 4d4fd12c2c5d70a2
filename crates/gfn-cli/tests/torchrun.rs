//! `gfn train` under torchrun on CPUs, where `--backend auto` is gloo: two ranks learn as well
//! as one with the same total batch and resume, a third process serves a replay buffer, a rank
//! started by hand with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT joins the same way, and a
//! killed rank ends the whole job within seconds. And two simulated nodes: two network
//! namespaces joined by a veth pair, one torchrun agent in each.

mod common;

use common::{
    assert_ok, bare_gfn, free_port, rank_pid, scratch, signal_rank_mid_run, summary, GFN,
    QUALITY_RUN, UNTIL_STOPPED,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The project venv's torchrun (launch/setup.sh installs torch there).
fn torchrun_exe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/torchrun")
}

/// `torchrun --nproc-per-node N --no-python gfn ARGS`, on a port of its own.
fn torchrun(nproc: usize, args: &[&str]) -> Command {
    let mut command = Command::new(torchrun_exe());
    command
        .arg(format!("--nproc-per-node={nproc}"))
        .arg(format!("--master-port={}", free_port()))
        .arg("--no-python")
        .arg(GFN)
        .args(args)
        .env("RUST_LOG", "warn");
    command
}

fn run(mut command: Command) -> Output {
    command
        .output()
        .expect("the venv's torchrun runs (launch/setup.sh installs torch)")
}

#[test]
fn two_torchrun_ranks_learn_as_well_as_one_and_resume() {
    let out = scratch("torchrun-two");
    let mut args = vec![
        "train",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "sampling.batch_size=8",
    ];
    args.extend_from_slice(QUALITY_RUN);
    assert_ok(&run(torchrun(2, &args)));
    let s = summary(&out);
    assert_eq!(s["ranks"], 2);
    assert_eq!(s["backend"], "gloo");
    assert_eq!(s["trajectories"], 16_000);
    let tv = s["exact_tv"].as_f64().unwrap();
    // One rank reaches < 0.05 with batch 16 in 1000 steps; so must two ranks of 8.
    assert!(tv < 0.05, "2 ranks x batch 8 under gloo: exact TV {tv}");
    let resume = [
        "train",
        "--resume",
        out.to_str().unwrap(),
        "--set",
        "train.steps=1100",
    ];
    assert_ok(&run(torchrun(2, &resume)));
    assert_eq!(summary(&out)["steps"], 1100);
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn a_third_torchrun_process_serves_a_replay_buffer() {
    let out = scratch("torchrun-buffer");
    let mut args = vec![
        "train",
        "--out",
        out.to_str().unwrap(),
        "--num-remote-buffers",
        "1",
        "--set",
        "sampling.batch_size=8",
        "--set",
        "train.steps=300",
    ];
    args.extend_from_slice(&QUALITY_RUN[..2]);
    args.extend_from_slice(&QUALITY_RUN[4..]);
    assert_ok(&run(torchrun(3, &args)));
    let s = summary(&out);
    assert_eq!(
        (s["ranks"].as_u64(), s["remote_buffers"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(s["backend"], "gloo");
    assert_eq!(s["buffer_received"], 2 * 300 * 8);
    assert_eq!(s["buffer_pushes_dropped"], 0);
    assert_eq!(s["buffer_modes_found"], s["modes_found"]);
    assert!(s["buffer_replayed"].as_u64().unwrap() > 0, "{s}");
    let _ = std::fs::remove_dir_all(out);
}

/// What torchrun sets, by hand: two processes meet at MASTER_ADDR:MASTER_PORT.
#[test]
fn ranks_started_by_hand_with_torchrun_variables_train_over_gloo() {
    let out = scratch("by-hand");
    let port = free_port().to_string();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            bare_gfn()
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .args(["train", "--out", out.to_str().unwrap(), "--device", "cpu"])
                .args(["--set", "train.steps=50", "--set", "env.dim=2"])
                .args(["--set", "train.eval_samples=1000"])
                .envs([
                    ("RANK", rank.to_string().as_str()),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_RANK", rank.to_string().as_str()),
                    ("MASTER_ADDR", "127.0.0.1"),
                    ("MASTER_PORT", port.as_str()),
                ])
                .spawn()
                .unwrap()
        })
        .collect();
    for rank in ranks {
        assert_ok(&rank.wait_with_output().unwrap());
    }
    let s = summary(&out);
    assert_eq!(
        (s["ranks"].as_u64(), s["backend"].as_str()),
        (Some(2), Some("gloo"))
    );
    let _ = std::fs::remove_dir_all(out);
}

/// A killed rank: the survivor's wait in the shared window sees that the rank it waits for no
/// longer exists and ends at once, naming it (torchrun then ends the job). A stopped rank: the
/// collective deadline names it, the waiting rank exits, and torchrun stops the stopped one
/// (SIGTERM, then SIGKILL after its 30-second grace).
#[test]
fn a_killed_or_stopped_torchrun_rank_ends_the_whole_job() {
    for (signal, timeout_s, expected, limit_s) in [
        ("-9", 120, "rank 1 (pid", 30),
        (
            "-STOP",
            5,
            "did not complete within 5 s (ddp.timeout_s): rank 1 did not arrive",
            60,
        ),
    ] {
        let out = scratch("torchrun-killed");
        let mut args = vec!["train", "--out", out.to_str().unwrap(), "--device", "cpu"];
        args.extend_from_slice(UNTIL_STOPPED);
        let timeout = format!("ddp.timeout_s={timeout_s}");
        args.extend_from_slice(&["--set", &timeout]);
        let job = torchrun(2, &args);
        let (output, took) =
            signal_rank_mid_run(job, &out, 1, signal, Duration::from_secs(limit_s + 30));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{signal}: {stderr}");
        assert!(stderr.contains(expected), "{signal}: {stderr}");
        assert!(
            took < Duration::from_secs(limit_s),
            "{signal}: the job ended {took:?} after the signal"
        );
        assert!(rank_pid(&out, 0).is_none(), "rank 0 outlived the job");
        let _ = std::fs::remove_dir_all(out);
    }
}

/// Two network namespaces joined by a veth pair (10.77.N.1 and 10.77.N.2), removed on drop:
/// two nodes that reach each other only over that link.
struct TwoNodes {
    names: [String; 2],
    addresses: [String; 2],
}

impl TwoNodes {
    /// `Err` says what is missing where namespaces cannot be made (not root, no iproute2).
    fn new(tag: &str) -> Result<Self, String> {
        let id = std::process::id() % 200;
        let names = [0, 1].map(|n| format!("gfn{tag}{id}{n}"));
        let addresses = [1, 2].map(|h| format!("10.77.{id}.{h}"));
        let nodes = TwoNodes { names, addresses };
        let veth = [0, 1].map(|n| format!("gv{tag}{id}{n}"));
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip").args(args).output();
            match out {
                Ok(o) if o.status.success() => Ok(()),
                Ok(o) => Err(format!(
                    "`ip {}`: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => Err(format!("no `ip` command (iproute2): {e}")),
            }
        };
        for name in &nodes.names {
            ip(&["netns", "add", name])?;
        }
        ip(&[
            "link", "add", &veth[0], "type", "veth", "peer", "name", &veth[1],
        ])?;
        for ((ns, dev), address) in nodes.names.iter().zip(&veth).zip(&nodes.addresses) {
            ip(&["link", "set", dev, "netns", ns])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                dev,
            ])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(nodes)
    }

    /// torchrun on node `n`, one process per node, meeting at node 0's c10d store. Each node
    /// has a /dev/shm of its own, as separate machines do (so the ranks cannot meet in a
    /// shared window and talk over the veth link).
    fn torchrun(&self, n: usize, port: u16, program: &Path, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.names[n]])
            .args(["unshare", "--mount", "--", "sh", "-c"])
            .arg(r#"mount -t tmpfs tmpfs /dev/shm && exec "$0" "$@""#)
            .arg(torchrun_exe())
            .args([
                "--nnodes=2",
                &format!("--node-rank={n}"),
                "--nproc-per-node=1",
            ])
            .args(["--rdzv-backend=c10d"])
            .arg(format!("--rdzv-endpoint={}:{port}", self.addresses[0]))
            // Node 0 hosts the store; each node names the address the other one reaches.
            .arg(format!("--rdzv-conf=is_host={}", n == 0))
            .arg(format!("--local-addr={}", self.addresses[n]))
            .arg("--no-python")
            .arg(program)
            .args(args)
            .env("RUST_LOG", "warn");
        command
    }

    /// Runs `program args` on both nodes at once; returns both outputs.
    fn run_both(&self, program: &Path, args: &[&str]) -> [Output; 2] {
        let port = free_port();
        let children = [0, 1].map(|n| {
            self.torchrun(n, port, program, args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        });
        children.map(|c| c.wait_with_output().unwrap())
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn two_nodes_or_skip(tag: &str) -> Option<TwoNodes> {
    match TwoNodes::new(tag) {
        Ok(nodes) => Some(nodes),
        Err(reason) => {
            eprintln!("skipped: simulating two nodes needs root and iproute2 ({reason})");
            None
        }
    }
}

fn example(name: &str) -> PathBuf {
    // Workspace examples are built beside the test executables: target/<profile>/examples/.
    let deps = std::env::current_exe().unwrap();
    deps.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

/// The data-parallel checks across two nodes: a step equals one rank's on the union of both
/// batches, and the parameters stay bitwise equal on both nodes.
#[test]
fn two_nodes_match_one_rank_on_the_union_and_stay_bitwise_equal() {
    let Some(nodes) = two_nodes_or_skip("c") else {
        return;
    };
    let exe = example("ddp_checks");
    assert!(
        exe.exists(),
        "{} was not built (cargo test --workspace builds it)",
        exe.display()
    );
    let outputs = nodes.run_both(&exe, &["--gloo"]);
    for (n, out) in outputs.iter().enumerate() {
        assert_ok(out);
        let stdout = String::from_utf8_lossy(&out.stdout);
        for kind in ["Tb", "Subtb"] {
            assert!(
                stdout.contains(&format!("rank {n}: {kind} union step")),
                "node {n}: {stdout}"
            );
        }
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `gfn train` on two nodes ends with bitwise the parameters of the same run on one node.
#[test]
fn training_on_two_nodes_gives_the_one_node_result() {
    let Some(nodes) = two_nodes_or_skip("t") else {
        return;
    };
    let (two, one) = (scratch("two-nodes"), scratch("one-node"));
    let args = |out: &Path| -> Vec<String> {
        let mut args = vec![
            "train".to_string(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ];
        let settings = [
            "train.steps=100",
            "env.dim=2",
            "train.eval_samples=1000",
            "train.threads=1",
        ];
        for s in settings {
            args.extend(["--set".to_string(), s.to_string()]);
        }
        args.extend(["--device".to_string(), "cpu".to_string()]);
        args
    };
    let two_args = args(&two);
    for out in nodes.run_both(Path::new(GFN), &strs(&two_args)) {
        assert_ok(&out);
    }
    let one_args = args(&one);
    assert_ok(&run(torchrun(2, &strs(&one_args))));
    let s = summary(&two);
    assert_eq!(
        (s["ranks"].as_u64(), s["backend"].as_str()),
        (Some(2), Some("gloo"))
    );
    let params = |dir: &Path| {
        let tensors = tch::Tensor::load_multi(dir.join("checkpoint.pt")).unwrap();
        let (_, p) = tensors.into_iter().find(|(n, _)| n == "params").unwrap();
        Vec::<f32>::try_from(p).unwrap()
    };
    assert_eq!(params(&two), params(&one), "two nodes and one node differ");
    assert_eq!(s["loss"], summary(&one)["loss"]);
    let _ = std::fs::remove_dir_all(two);
    let _ = std::fs::remove_dir_all(one);
}

//! The mesh at scale, in the deterministic simulation (`edgecoder::mesh::sim`): the real
//! membership and gossip code of every node over an in-memory network with message loss.
//!
//! 1. A capability change: time until 99 % (and 100 %) of live nodes hold it.
//! 2. A crash: time until every live node has declared the node dead.
//! 3. Steady state for `MESH_BENCH_MINUTES` simulated minutes: false deaths (live nodes
//!    declared dead anywhere) and envelope bytes sent per node per second.
//!
//! Run: `cargo bench --bench mesh` (1,000 nodes, 20 % loss, 10 minutes, ~1–5 ms latency).
//! `MESH_BENCH_NODES`, `MESH_BENCH_LOSS`, `MESH_BENCH_MINUTES` and `MESH_BENCH_SEED` change
//! the scenario. Figures go to docs/PERFORMANCE.md.

use std::time::{Duration, Instant};

use edgecoder::mesh::core::Tuning;
use edgecoder::mesh::sim::{Observed, Sim, SimConfig};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The simulation's absolute time of `ms` since its start (observations carry absolute times).
fn sim_start_ms(sim: &Sim, ms: u64) -> u64 {
    sim.epoch_ms() + ms
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful either way.
    let nodes: usize = env("MESH_BENCH_NODES", 1000);
    let loss: f64 = env("MESH_BENCH_LOSS", 0.2);
    let minutes: u64 = env("MESH_BENCH_MINUTES", 10);
    let seed: u64 = env("MESH_BENCH_SEED", 7);
    let mut tuning = Tuning::default();
    // Overrides for exploring the protocol's settings.
    let millis = |name: &str, d: Duration| Duration::from_millis(env(name, d.as_millis() as u64));
    tuning.gossip_period = millis("MESH_BENCH_GOSSIP_MS", tuning.gossip_period);
    tuning.probe_period = millis("MESH_BENCH_PROBE_MS", tuning.probe_period);
    tuning.suspicion_min = millis("MESH_BENCH_SUSPICION_MS", tuning.suspicion_min);
    tuning.gossip_fanout = env("MESH_BENCH_FANOUT", tuning.gossip_fanout);
    tuning.indirect_probes = env("MESH_BENCH_INDIRECT", tuning.indirect_probes);
    tuning.probe_rounds = env("MESH_BENCH_ROUNDS", tuning.probe_rounds);
    tuning.retransmit_mult = env("MESH_BENCH_RETRANSMIT", tuning.retransmit_mult);
    tuning.piggyback_bytes = env("MESH_BENCH_PIGGYBACK", tuning.piggyback_bytes);
    println!(
        "mesh simulation: {nodes} nodes, {:.0}% loss, latency 1-5 ms, seed {seed}",
        loss * 100.0
    );
    println!("tuning: {tuning:?}");
    let wall = Instant::now();
    let mut sim = Sim::new(
        SimConfig {
            nodes,
            loss,
            latency_ms: (1, 5),
            tuning,
            seed,
        },
        Duration::from_secs(10),
    );

    // Join: everyone through node 0, spread over 10 s; wait for full membership everywhere.
    let mut t = 0;
    loop {
        t += 1000;
        sim.run_until(t);
        let c = sim.converged();
        if c == nodes || t >= 180_000 {
            println!(
                "membership: {c}/{nodes} nodes see every other node after {:.1} s",
                t as f64 / 1000.0
            );
            break;
        }
    }
    // Every node publishes its capabilities once, as a booting node does; let that settle
    // (a thousand new records, each passed on by every node: minutes of gossip at first).
    let settle: u64 = env("MESH_BENCH_SETTLE_S", 180);
    for i in 0..nodes {
        sim.publish_caps(i, &["qwen2.5-coder-1.5b"]);
    }
    t += settle * 1000;
    sim.run_until(t);
    let observed_before = sim.observed.len();

    // 1. A capability change.
    let author = nodes / 3;
    let start = sim.now_ms();
    let seq = sim.publish_caps(author, &["qwen2.5-coder-1.5b", "qwen2.5-coder-7b"]);
    let (mut t99, mut t100) = (None, None);
    let need99 = (nodes as f64 * 0.99).ceil() as usize;
    while t100.is_none() && sim.now_ms() - start < 60_000 {
        let now = sim.now_ms() + 50;
        sim.run_until(now);
        let have = sim.have_caps(author, seq);
        if t99.is_none() && have >= need99 {
            t99 = Some(sim.now_ms() - start);
        }
        if have == nodes {
            t100 = Some(sim.now_ms() - start);
        }
    }
    let fmt = |v: Option<u64>| {
        v.map_or("not within 60 s".into(), |ms| {
            format!("{:.2} s", ms as f64 / 1000.0)
        })
    };
    println!(
        "capability change: 99% of nodes after {}, 100% after {}",
        fmt(t99),
        fmt(t100)
    );

    // 2. A crash.
    let victim = nodes / 2;
    sim.kill(victim);
    let start = sim.now_ms();
    let mut first = None;
    let mut all = None;
    while all.is_none() && sim.now_ms() - start < 120_000 {
        let now = sim.now_ms() + 100;
        sim.run_until(now);
        let seen = sim.seen_alive_by(victim);
        if first.is_none() && seen < nodes - 1 {
            first = Some(sim.now_ms() - start);
        }
        if seen == 0 {
            all = Some(sim.now_ms() - start);
        }
    }
    println!(
        "crash: first node declares it dead after {}, every node after {}",
        fmt(first),
        fmt(all)
    );

    // 3. Steady state.
    let bytes_before: u64 = sim.bytes_sent.iter().sum();
    let kinds_before = sim.by_kind.clone();
    let msgs_before = sim.messages;
    let swim_before = sim.swim_totals();
    let start = sim.now_ms();
    let end = start + minutes * 60_000;
    while sim.now_ms() < end {
        let now = (sim.now_ms() + 10_000).min(end);
        sim.run_until(now);
    }
    let secs = (sim.now_ms() - start) as f64 / 1000.0;
    let bytes: u64 = sim.bytes_sent.iter().sum::<u64>() - bytes_before;
    let live = sim.alive() as f64;
    let false_deaths: Vec<(u64, usize, usize)> = sim.observed[observed_before..]
        .iter()
        .filter_map(|(at, o)| match o {
            Observed::Down { node, peer } if *peer != victim => Some((*at, *node, *peer)),
            _ => None,
        })
        .collect();
    println!(
        "steady state over {minutes} min: {:.0} bytes/s per node ({:.1} messages/s per node), false deaths: {}",
        bytes as f64 / live / secs,
        (sim.messages - msgs_before) as f64 / live / secs,
        false_deaths.len()
    );
    for (k, (n, b)) in &sim.by_kind {
        let (n0, b0) = kinds_before.get(k).copied().unwrap_or_default();
        let unit = if k.starts_with('(') {
            "items   "
        } else {
            "messages"
        };
        println!(
            "  {k:<12} {:>8.2} {unit}/s per node, {:>7.0} bytes/s per node",
            (n - n0) as f64 / live / secs,
            (b - b0) as f64 / live / secs
        );
    }
    let swim = sim.swim_totals();
    println!(
        "  membership: {} probes failed, {} suspicions raised, {} declared dead, {} refuted, {} updates that were news; mean local health {:.2}",
        swim.probes_failed - swim_before.probes_failed,
        swim.suspected - swim_before.suspected,
        swim.declared_dead - swim_before.declared_dead,
        swim.refuted - swim_before.refuted,
        swim.news - swim_before.news,
        f64::from(swim.health) / live
    );
    let refuted = sim
        .observed
        .iter()
        .filter(|(at, o)| *at >= sim_start_ms(&sim, start) && matches!(o, Observed::Refuted { .. }))
        .count();
    println!(
        "  suspicions of live nodes refuted in steady state: {refuted} ({:.3}/s across the mesh)",
        refuted as f64 / secs
    );
    for (at, node, peer) in false_deaths.iter().take(10) {
        println!("  false death: node {node} declared {peer} dead at {at} ms");
    }
    println!(
        "converged at the end: {}/{} live nodes; messages lost: {}; wall time {:.1} s",
        sim.converged(),
        sim.alive(),
        sim.lost,
        wall.elapsed().as_secs_f64()
    );
}

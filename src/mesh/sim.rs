//! A deterministic simulation of many mesh nodes: the real [`Core`] of each node over an
//! in-memory network with latency, message loss and partitions, on a virtual clock.
//!
//! Used by the unit tests (a few dozen nodes) and by `benches/mesh.rs` (a thousand). Messages
//! are not signed here (envelopes are tested on their own and cost the same everywhere); their
//! size is counted as the real envelope's: signature, header and the postcard message.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use super::core::{Core, Event, Tuning};
use super::wire::{CapRecord, Message, Record};
use crate::coordinator::model::{ResourceClass, TaskKind};
use crate::identity::{Identity, KeyId};

/// Envelope bytes around a message: signature (64), version (1), sender (32), nonce (16); the
/// time (a varint) is added per message.
pub const ENVELOPE_OVERHEAD: usize = 64 + 1 + 32 + 16;

/// Bytes of `v` as a postcard varint.
fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// Simulation settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Nodes.
    pub nodes: usize,
    /// Probability that any one message is lost.
    pub loss: f64,
    /// One-way latency range, ms.
    pub latency_ms: (u64, u64),
    /// Protocol settings.
    pub tuning: Tuning,
    /// Random seed (same seed, same run).
    pub seed: u64,
}

#[derive(Debug)]
enum What {
    Deliver {
        to: usize,
        from: KeyId,
        msg: Box<Message>,
    },
    /// A node's core asked to be woken at this time.
    Wake {
        node: usize,
        epoch: u32,
    },
    Tick,
}

struct Node {
    core: Core,
    identity: Arc<Identity>,
    alive: bool,
    epoch: u32,
    group: u8,
    /// The wake-up already scheduled for this node (ms), if any.
    wake_at: Option<u64>,
}

/// What happened, for measurements.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    /// `node` declared `peer` down.
    Down {
        /// Observer.
        node: usize,
        /// The peer (index).
        peer: usize,
    },
    /// `node` learned it was suspected or declared dead, and refuted it.
    Refuted {
        /// The node.
        node: usize,
        /// It had been declared dead.
        dead: bool,
    },
    /// `node` learned a capability record of `author` with `seq`.
    Caps {
        /// Observer.
        node: usize,
        /// Author (index).
        author: usize,
        /// Version.
        seq: u64,
    },
}

/// The simulation.
pub struct Sim {
    cfg: SimConfig,
    nodes: Vec<Node>,
    index: HashMap<KeyId, usize>,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    pending: HashMap<usize, What>,
    seq: u64,
    now: u64,
    rng: SmallRng,
    /// Envelope bytes sent by each node.
    pub bytes_sent: Vec<u64>,
    /// Messages sent in total.
    pub messages: u64,
    /// Messages lost.
    pub lost: u64,
    /// Messages and bytes sent, by message kind.
    pub by_kind: std::collections::BTreeMap<&'static str, (u64, u64)>,
    /// Observations, in time order: (ms, what).
    pub observed: Vec<(u64, Observed)>,
    deferred: Vec<(u64, Deferred)>,
}

/// The simulated clock starts here (a realistic epoch, so generations look like real ones).
const T0: u64 = 1_700_000_000_000;

fn url(i: usize) -> String {
    format!(
        "http://10.{}.{}.{}:4301",
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255
    )
}

impl Sim {
    /// Builds `cfg.nodes` nodes; node 0 is the seed every other node joins through, the joins
    /// spread over the first `join_spread` of simulated time.
    pub fn new(cfg: SimConfig, join_spread: Duration) -> Self {
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let mut sim = Sim {
            nodes: Vec::with_capacity(cfg.nodes),
            index: HashMap::new(),
            queue: BinaryHeap::new(),
            pending: HashMap::new(),
            seq: 0,
            now: T0,
            bytes_sent: vec![0; cfg.nodes],
            messages: 0,
            lost: 0,
            by_kind: Default::default(),
            observed: Vec::new(),
            deferred: Vec::new(),
            rng: SmallRng::seed_from_u64(cfg.seed ^ 1),
            cfg,
        };
        for i in 0..sim.cfg.nodes {
            let identity = Arc::new(Identity::from_secrets(rng.random(), rng.random()));
            sim.index.insert(identity.key_id(), i);
            let core = Core::new(
                identity.clone(),
                &url(i),
                sim.cfg.tuning.clone(),
                [],
                T0,
                rng.random(),
            );
            sim.nodes.push(Node {
                core,
                identity,
                alive: true,
                epoch: 0,
                group: 0,
                wake_at: None,
            });
        }
        let spread = join_spread.as_millis() as u64;
        for i in 1..sim.cfg.nodes {
            let at = T0
                + if spread == 0 {
                    0
                } else {
                    rng.random_range(0..spread)
                };
            let seed = sim.nodes[0].core.own_record().clone();
            sim.at(at, move |s| {
                let now = s.now;
                let _ = s.nodes[i].core.join(&seed, now);
                s.flush(i);
            });
        }
        sim.schedule(T0 + 1000, What::Tick);
        sim
    }

    fn at(&mut self, time: u64, f: impl FnOnce(&mut Sim) + 'static) {
        // Joins happen from `run_until`'s loop: keep them as closures run in time order.
        self.deferred.push((time, Box::new(f)));
    }
}

type Deferred = Box<dyn FnOnce(&mut Sim)>;

impl Sim {
    fn schedule(&mut self, time: u64, what: What) {
        self.seq += 1;
        let id = self.seq as usize;
        self.pending.insert(id, what);
        self.queue.push(Reverse((time, self.seq, id)));
    }

    /// Hands a node's outputs to the network and timer queue.
    fn flush(&mut self, i: usize) {
        let out = self.nodes[i].core.drain();
        let from = self.nodes[i].identity.key_id();
        for (to, msg) in out.send {
            let size = postcard::experimental::serialized_size(&msg).unwrap_or(0)
                + ENVELOPE_OVERHEAD
                + varint_len(self.now);
            self.bytes_sent[i] += size as u64;
            let e = self.by_kind.entry(msg.kind_name()).or_default();
            e.0 += 1;
            e.1 += size as u64;
            // What SWIM packets carry, counted apart as well (included in the above).
            if let Message::Swim(p) = &msg {
                for (name, n, bytes) in [
                    (
                        "(updates)",
                        p.updates.len(),
                        postcard::experimental::serialized_size(&p.updates).unwrap_or(0),
                    ),
                    (
                        "(records)",
                        p.records.len(),
                        postcard::experimental::serialized_size(&p.records).unwrap_or(0),
                    ),
                    (
                        "(intros)",
                        usize::from(p.intro.is_some()),
                        postcard::experimental::serialized_size(&p.intro).unwrap_or(0),
                    ),
                ] {
                    let e = self.by_kind.entry(name).or_default();
                    e.0 += n as u64;
                    e.1 += bytes as u64;
                }
            }
            self.messages += 1;
            let Some(&j) = self.index.get(&to.key) else {
                continue;
            };
            if self.nodes[i].group != self.nodes[j].group || self.rng.random_bool(self.cfg.loss) {
                self.lost += 1;
                continue;
            }
            let (lo, hi) = self.cfg.latency_ms;
            let delay = if hi > lo {
                self.rng.random_range(lo..=hi)
            } else {
                lo
            };
            self.schedule(
                self.now + delay,
                What::Deliver {
                    to: j,
                    from,
                    msg: Box::new(msg),
                },
            );
        }
        self.arm(i);
        for e in out.events {
            match e {
                Event::PeerDown(p) => {
                    if let Some(&peer) = self.index.get(&p.key) {
                        self.observed
                            .push((self.now, Observed::Down { node: i, peer }));
                    }
                }
                Event::Record(Record::Caps(c)) => {
                    if let Some(&author) = self.index.get(&c.node) {
                        self.observed.push((
                            self.now,
                            Observed::Caps {
                                node: i,
                                author,
                                seq: c.seq,
                            },
                        ));
                    }
                }
                Event::Refuted { dead } => {
                    self.observed
                        .push((self.now, Observed::Refuted { node: i, dead }));
                }
                _ => {}
            }
        }
    }

    /// Schedules node `i`'s next wake-up if its core wants one sooner than already planned.
    fn arm(&mut self, i: usize) {
        let next = self.nodes[i].core.next_wakeup().max(self.now);
        if next == u64::MAX || self.nodes[i].wake_at.is_some_and(|w| w <= next) {
            return;
        }
        self.nodes[i].wake_at = Some(next);
        let epoch = self.nodes[i].epoch;
        self.schedule(next, What::Wake { node: i, epoch });
    }

    /// Runs until simulated time `until` (ms since the simulation's start).
    pub fn run_until(&mut self, until_ms: u64) {
        let until = T0 + until_ms;
        loop {
            let next_event = self.queue.peek().map(|Reverse((t, _, _))| *t);
            self.deferred.sort_by_key(|(t, _)| Reverse(*t));
            let next_deferred = self.deferred.last().map(|(t, _)| *t);
            let next = match (next_event, next_deferred) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => break,
            };
            if next > until {
                break;
            }
            self.now = next;
            if next_deferred == Some(next) {
                if let Some((_, f)) = self.deferred.pop() {
                    f(self);
                }
                continue;
            }
            let Some(Reverse((_, _, id))) = self.queue.pop() else {
                break;
            };
            let Some(what) = self.pending.remove(&id) else {
                continue;
            };
            match what {
                What::Deliver { to, from, msg } => {
                    if self.nodes[to].alive {
                        let now = self.now;
                        self.nodes[to].core.handle_message(from, *msg, now);
                        self.flush(to);
                    }
                }
                What::Wake { node, epoch } => {
                    let n = &mut self.nodes[node];
                    // A wake-up superseded by an earlier one, or of a process since killed.
                    if !n.alive || n.epoch != epoch || n.wake_at != Some(self.now) {
                        continue;
                    }
                    n.wake_at = None;
                    let now = self.now;
                    n.core.tick(now);
                    self.flush(node);
                }
                What::Tick => {
                    // The cores schedule their own work; this only catches a node whose
                    // wake-up was superseded and then not re-armed.
                    for i in 0..self.nodes.len() {
                        if self.nodes[i].alive {
                            self.arm(i);
                        }
                    }
                    self.schedule(self.now + 1000, What::Tick);
                }
            }
        }
        self.now = self.now.max(until);
    }

    /// The absolute time (ms since the epoch) the simulation starts at; observations carry
    /// absolute times.
    pub fn epoch_ms(&self) -> u64 {
        T0
    }

    /// Simulated time, ms since the start.
    pub fn now_ms(&self) -> u64 {
        self.now - T0
    }

    /// Stops a node without a word (a crash).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].alive = false;
        self.nodes[i].epoch += 1;
        self.nodes[i].wake_at = None;
    }

    /// Restarts a killed node: a fresh process, same key, newer generation, joining via `via`.
    pub fn restart(&mut self, i: usize, via: usize) {
        let seed = self.rng.random();
        let node = &mut self.nodes[i];
        node.core = Core::new(
            node.identity.clone(),
            &url(i),
            self.cfg.tuning.clone(),
            [],
            self.now,
            seed,
        );
        node.alive = true;
        node.epoch += 1;
        node.wake_at = None;
        let contact = self.nodes[via].core.own_record().clone();
        let now = self.now;
        let _ = self.nodes[i].core.join(&contact, now);
        self.flush(i);
    }

    /// Puts a node in partition group `g`: messages only flow within a group.
    pub fn set_group(&mut self, i: usize, g: u8) {
        self.nodes[i].group = g;
    }

    /// Node `i` publishes new capabilities; returns the record's version.
    pub fn publish_caps(&mut self, i: usize, models: &[&str]) -> u64 {
        let now = self.now;
        let rec = CapRecord {
            node: self.nodes[i].identity.key_id(),
            seq: 0,
            issued_ms: now,
            url: url(i),
            x25519: self.nodes[i].identity.x25519_public().to_bytes(),
            kinds: vec![TaskKind::Chat, TaskKind::Completion],
            models: models.iter().map(|m| m.to_string()).collect(),
            resource_class: ResourceClass::Small,
            slots: 4,
            free_slots: 4,
            load_pct: 0,
            price: 0,
            model_budget_mib: 0,
            throttled: false,
        };
        self.nodes[i].core.publish_caps(rec, now);
        self.flush(i);
        self.nodes[i].core.with_records(|r| {
            r.caps_of(&self.nodes[i].identity.key_id())
                .map_or(0, |c| c.seq)
        })
    }

    /// How many live nodes (other than `i`) hold `i` as an active member.
    pub fn seen_alive_by(&self, i: usize) -> usize {
        let key = self.nodes[i].identity.key_id();
        self.nodes
            .iter()
            .enumerate()
            .filter(|(j, n)| *j != i && n.alive && n.core.active().any(|p| p.key == key))
            .count()
    }

    /// Live nodes.
    pub fn alive(&self) -> usize {
        self.nodes.iter().filter(|n| n.alive).count()
    }

    /// Live nodes whose view has every other live node active and no dead one.
    pub fn converged(&self) -> usize {
        let live: Vec<KeyId> = self
            .nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.identity.key_id())
            .collect();
        self.nodes
            .iter()
            .filter(|n| n.alive)
            .filter(|n| {
                let mine = n.identity.key_id();
                let active: std::collections::HashSet<KeyId> =
                    n.core.active().map(|p| p.key).collect();
                active.len() == live.len() - 1
                    && live.iter().all(|k| *k == mine || active.contains(k))
            })
            .count()
    }

    /// Live nodes holding `author`'s capability record at version `seq` or newer.
    pub fn have_caps(&self, author: usize, seq: u64) -> usize {
        let key = self.nodes[author].identity.key_id();
        self.nodes
            .iter()
            .filter(|n| n.alive)
            .filter(|n| {
                n.core
                    .with_records(|r| r.caps_of(&key).is_some_and(|c| c.seq >= seq))
            })
            .count()
    }

    /// Membership counters summed over live nodes (health: the sum of scores).
    pub fn swim_totals(&self) -> crate::mesh::swim::SwimStats {
        let mut t = crate::mesh::swim::SwimStats::default();
        for n in self.nodes.iter().filter(|n| n.alive) {
            let s = n.core.stats().swim;
            t.probes += s.probes;
            t.probes_failed += s.probes_failed;
            t.suspected += s.suspected;
            t.declared_dead += s.declared_dead;
            t.refuted += s.refuted;
            t.unknown_sender += s.unknown_sender;
            t.news += s.news;
            t.health += s.health;
        }
        t
    }

    /// Direct access to one node's core.
    pub fn core(&self, i: usize) -> &Core {
        &self.nodes[i].core
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(nodes: usize, loss: f64, seed: u64) -> Sim {
        let tuning = Tuning {
            sync_interval: Duration::from_secs(5),
            ..Tuning::default()
        };
        Sim::new(
            SimConfig {
                nodes,
                loss,
                latency_ms: (1, 5),
                tuning,
                seed,
            },
            Duration::from_secs(2),
        )
    }

    #[test]
    fn membership_converges_and_a_crashed_node_is_declared_dead_everywhere() {
        for seed in 1..=4 {
            crash_and_restart(seed);
        }
    }

    fn crash_and_restart(seed: u64) {
        let mut sim = small(40, 0.05, seed);
        sim.run_until(30_000);
        assert_eq!(sim.converged(), 40, "everyone sees everyone");
        sim.kill(7);
        let t = sim.now_ms();
        sim.run_until(t + 30_000);
        assert_eq!(
            sim.seen_alive_by(7),
            0,
            "nobody holds the dead node as active"
        );
        let downs: std::collections::HashSet<usize> = sim
            .observed
            .iter()
            .filter_map(|(_, o)| match o {
                Observed::Down { node, peer: 7 } => Some(*node),
                _ => None,
            })
            .collect();
        assert_eq!(downs.len(), 39);
        // It comes back under a newer generation and is alive everywhere again.
        sim.restart(7, 3);
        let t = sim.now_ms();
        sim.run_until(t + 30_000);
        assert_eq!(sim.converged(), 40);
    }

    #[test]
    fn capabilities_reach_every_node_despite_loss() {
        let mut sim = small(60, 0.2, 2);
        sim.run_until(30_000);
        let seq = sim.publish_caps(11, &["qwen"]);
        let t = sim.now_ms();
        sim.run_until(t + 20_000);
        assert_eq!(sim.have_caps(11, seq), 60);
    }

    #[test]
    fn a_lossy_mesh_declares_no_live_node_dead() {
        let mut sim = small(100, 0.2, 5);
        sim.run_until(60_000);
        assert_eq!(sim.converged(), 100);
        let before = sim.observed.len();
        sim.run_until(180_000);
        let deaths: Vec<&(u64, Observed)> = sim.observed[before..]
            .iter()
            .filter(|(_, o)| matches!(o, Observed::Down { .. }))
            .collect();
        assert!(deaths.is_empty(), "false deaths at 20 % loss: {deaths:?}");
        assert_eq!(sim.converged(), 100);
    }

    #[test]
    fn a_partition_heals() {
        for seed in 1..=4 {
            partition_and_heal(seed);
        }
    }

    fn partition_and_heal(seed: u64) {
        let mut sim = small(30, 0.0, seed);
        sim.run_until(20_000);
        assert_eq!(sim.converged(), 30);
        for i in 15..30 {
            sim.set_group(i, 1);
        }
        let t = sim.now_ms();
        sim.run_until(t + 60_000);
        assert_eq!(
            sim.seen_alive_by(20),
            14,
            "only its own side holds it alive"
        );
        assert_eq!(sim.seen_alive_by(3), 14);
        for i in 15..30 {
            sim.set_group(i, 0);
        }
        let t = sim.now_ms();
        sim.run_until(t + 120_000);
        assert_eq!(sim.converged(), 30, "both sides find each other again");
    }
}

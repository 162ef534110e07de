//! SWIM membership with Lifeguard's extensions, free of I/O.
//!
//! Follows A. Das, I. Gupta, A. Motivala, "SWIM: Scalable Weakly-consistent Infection-style
//! Process Group Membership Protocol" (DSN 2002), and A. Dadgar, J. Phillips, J. Currey,
//! "Lifeguard: Local Health Awareness for More Accurate Failure Detection" (2018). Section
//! numbers below are those papers'; "Off-spec:" marks where this differs, and why.
//!
//! * **Failure detection** (SWIM §3, §4.3): every protocol period the node probes the next
//!   member of a shuffled round-robin order with a `Ping`. Without an `Ack` within a round it
//!   asks `indirect_probes` other members to probe the target (`PingReq`); they pass on the
//!   target's ack, or a `Nack` when it did not answer them.
//!   Off-spec: a probe runs up to `probe_rounds` rounds within the period, each after the first
//!   repeating the direct ping alongside fresh indirect probes, before the member is suspected
//!   (memberlist adds a TCP ping for the same reason). With independent message loss `p`, one
//!   round fails a live member with probability (1-(1-p)²)·(1-(1-p)⁴)^k: 7 % at p = 20 %,
//!   k = 3. Suspicions that frequent, each refuted and spread to every node, would be most of
//!   the mesh's traffic; four rounds after the first bring it under 10⁻⁴ per probe, and the
//!   extra messages are paid only by the few probes that need them.
//! * **Suspicion** (SWIM §4.2) with Lifeguard's dynamic timeout (§IV-B): a suspect has from
//!   `suspicion_min` up to `suspicion_max_mult` times that to refute, shrinking logarithmically
//!   as independent accusers confirm the suspicion. A member refutes by raising its incarnation;
//!   a dead member may refute too (as in memberlist), so a node that was cut off comes back
//!   without a restart.
//! * **Local health** (Lifeguard §IV-A): a score from 0 to `max_health`, raised by a failed
//!   probe that also missed its nacks and by having to refute a suspicion of itself, lowered by
//!   each successful probe. The probe period and round time are multiplied by (1 + score): a
//!   node that is itself slow or cut off probes less, and so accuses less.
//! * **Buddy system** (Lifeguard §IV-C): a message to a member this node holds as suspect or
//!   dead carries that update first, so the member learns of it at once and can refute.
//! * **Dissemination** (SWIM §4.1): membership updates and gossiped records ride on every
//!   message, fewest transmissions first, each sent at most
//!   `retransmit_mult`·⌈log10(n + 1)⌉ times; pending ones are also pushed to `gossip_fanout`
//!   members every `gossip_period` (memberlist's gossip interval).
//! * **Reconnection**: a dead member is pinged every `reconnect_period`; once a partition heals
//!   the buddy update makes it refute, and both sides see each other alive again.
//!
//! Members are named in messages by key and generation only (an update is ~45 bytes); their
//! addresses come from their signed identity records, which [`Swim::learn`] is given.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use super::core::Tuning;
use super::wire::{Item, MemberState, Packet, PeerId, Probe, RecordKind, SignedRecord, Update};
use crate::identity::KeyId;

/// While this node knows no active member it pings its seeds this often.
pub const JOIN_RETRY_MS: u64 = 2_000;

/// Dead members are looked at for forgetting this often.
const HOUSEKEEPING_MS: u64 = 10_000;

/// A relay answers `Nack` when the target has not acked within this share of a probe round
/// (Lifeguard §IV-A: early enough for the asker to count it).
const NACK_SHARE: f64 = 0.8;

/// Queue entries looked at for one message before giving up on filling its budget.
const TAKE_SCAN: usize = 64;

/// Bytes below which a message's piggyback budget counts as full.
const MIN_ITEM: usize = 40;

/// What the rest of the node hears from membership.
#[derive(Debug, Clone, PartialEq)]
pub enum SwimEvent {
    /// A member joined, came back, or was learned.
    Up(PeerId),
    /// A member was declared dead or left.
    Down(PeerId),
    /// A member dead or gone for `forget_down_after` was dropped: (key, generation).
    Forgotten(KeyId, u64),
    /// The mesh suspected (or declared dead) this node, and it refuted.
    Refuted {
        /// It had been declared dead, not only suspected.
        dead: bool,
    },
    /// A message named a process of `key` this node has no identity record of; `from` has
    /// one.
    Unknown {
        /// The node.
        key: KeyId,
        /// Who mentioned it.
        from: KeyId,
    },
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SwimStats {
    /// Probes started.
    pub probes: u64,
    /// Probes that ended without an ack.
    pub probes_failed: u64,
    /// Suspicions this node raised.
    pub suspected: u64,
    /// Members this node declared dead when their suspicion ran out.
    pub declared_dead: u64,
    /// Suspicions of this node that it refuted.
    pub refuted: u64,
    /// Packets from senders with no known identity (dropped).
    pub unknown_sender: u64,
    /// Membership updates received that were news (and so passed on).
    pub news: u64,
    /// Local health score now (0: healthy).
    pub health: u32,
}

/// A member as the rest of the node sees it.
#[derive(Debug, Clone)]
pub struct MemberView<'a> {
    /// Address and generation.
    pub peer: &'a PeerId,
    /// State.
    pub state: MemberState,
    /// Incarnation.
    pub incarnation: u32,
    /// Last packet received from it (ms; 0: never).
    pub last_seen_ms: u64,
}

#[derive(Debug, Clone)]
struct Suspicion {
    start_ms: u64,
    accusers: Vec<[u8; 8]>,
    /// Confirmations that bring the timeout down to its minimum.
    k: usize,
    deadline_ms: u64,
    /// This node failed to reach the suspect itself (it is one of the accusers).
    mine: bool,
    /// The deadline passed and this node is probing the suspect once more before declaring
    /// it dead.
    verifying: bool,
}

#[derive(Debug, Clone)]
struct Member {
    peer: PeerId,
    incarnation: u32,
    state: MemberState,
    since_ms: u64,
    suspicion: Option<Suspicion>,
    /// A packet from this generation arrived, so it can reach this node: no more intros.
    heard: bool,
    last_seen_ms: u64,
    /// Blacklisted: never probed, updates about it ignored.
    blocked: bool,
    /// Joined through: pinged while this node knows no active member.
    seed: bool,
}

impl Member {
    fn active(&self) -> bool {
        !self.blocked && matches!(self.state, MemberState::Alive | MemberState::Suspect)
    }
}

#[derive(Debug, Clone)]
struct ProbeState {
    /// A suspicion's last check rather than the protocol period's probe.
    verify: bool,
    target: KeyId,
    seq: u32,
    round: u32,
    round_ms: u64,
    next_round_ms: u64,
    end_ms: u64,
    expected_nacks: u32,
    nacks: u32,
    /// Members asked to probe the target: their acks and nacks count, nobody else's.
    relays: Vec<KeyId>,
}

#[derive(Debug, Clone)]
struct Relay {
    origin: KeyId,
    origin_seq: u32,
    deadline_ms: u64,
}

/// What a gossip queue entry is about: a newer entry with the same key replaces an older one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum GossipKey {
    Member(KeyId),
    Record(RecordKind, KeyId, u64),
}

#[derive(Debug, Clone)]
enum Gossip {
    Update(Update),
    Record(Item),
}

#[derive(Debug)]
struct Queued {
    id: u64,
    transmits: u32,
    size: usize,
    what: Gossip,
}

/// Updates and records waiting to be piggybacked, fewest transmissions (then newest) first.
#[derive(Debug, Default)]
struct Queue {
    items: HashMap<GossipKey, Queued>,
    order: BTreeSet<(u32, Reverse<u64>, GossipKey)>,
    next_id: u64,
}

impl Queue {
    fn push(&mut self, key: GossipKey, what: Gossip) {
        if let Some(old) = self.items.remove(&key) {
            self.order.remove(&(old.transmits, Reverse(old.id), key));
        }
        let size = match &what {
            Gossip::Update(u) => postcard::experimental::serialized_size(u),
            Gossip::Record(i) => postcard::experimental::serialized_size(i),
        }
        .unwrap_or(64);
        self.next_id += 1;
        let id = self.next_id;
        self.order.insert((0, Reverse(id), key));
        self.items.insert(
            key,
            Queued {
                id,
                transmits: 0,
                size,
                what,
            },
        );
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Fills one message: within `budget` bytes, each taken entry counts a transmission and
    /// leaves the queue after `limit`.
    fn take(
        &mut self,
        mut budget: usize,
        limit: u32,
        skip: Option<GossipKey>,
        updates: &mut Vec<Update>,
        records: &mut Vec<Item>,
    ) {
        let mut taken = Vec::new();
        for &(t, id, key) in self.order.iter().take(TAKE_SCAN) {
            if budget < MIN_ITEM {
                break;
            }
            if Some(key) == skip {
                continue;
            }
            let Some(q) = self.items.get(&key) else {
                continue;
            };
            if q.size <= budget {
                budget -= q.size;
                taken.push((t, id, key));
            }
        }
        for (t, id, key) in taken {
            self.order.remove(&(t, id, key));
            let Some(q) = self.items.get_mut(&key) else {
                continue;
            };
            q.transmits += 1;
            match &q.what {
                Gossip::Update(u) => updates.push(u.clone()),
                Gossip::Record(i) => records.push(i.clone()),
            }
            if q.transmits >= limit {
                self.items.remove(&key);
            } else {
                self.order.insert((q.transmits, id, key));
            }
        }
    }
}

/// The membership state machine of one node.
pub struct Swim {
    me: PeerId,
    prefix: [u8; 8],
    incarnation: u32,
    own_record: SignedRecord,
    left: bool,
    tuning: Tuning,
    members: BTreeMap<KeyId, Member>,
    /// Probe order (SWIM §4.3): shuffled, walked round-robin, reshuffled at the end.
    order: Vec<KeyId>,
    next_index: usize,
    /// The protocol period's probe and any suspicion checks, each with its own sequence number.
    probes: Vec<ProbeState>,
    next_probe_ms: u64,
    seq: u32,
    relays: BTreeMap<u32, Relay>,
    queue: Queue,
    health: u32,
    next_gossip_ms: u64,
    next_reconnect_ms: u64,
    next_housekeeping_ms: u64,
    next_join_ms: u64,
    suspects: BTreeSet<KeyId>,
    dead: BTreeSet<KeyId>,
    rng: SmallRng,
    out: Vec<(PeerId, Packet)>,
    events: Vec<SwimEvent>,
    stats: SwimStats,
    /// Set while handling a packet that carried an outdated accusation of this node.
    stale_view: bool,
    /// Active members (kept as a count: it is needed on every message).
    active: usize,
}

impl std::fmt::Debug for Swim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swim")
            .field("me", &self.me)
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

fn prefix(key: &KeyId) -> [u8; 8] {
    let mut p = [0u8; 8];
    p.copy_from_slice(&key.0[..8]);
    p
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Swim {
    /// A node that knows no one yet. `own_record` is its signed identity, sent as an intro to
    /// members that have not heard from it.
    pub fn new(
        me: PeerId,
        own_record: SignedRecord,
        tuning: Tuning,
        now_ms: u64,
        seed: u64,
    ) -> Self {
        Swim {
            prefix: prefix(&me.key),
            me,
            incarnation: 0,
            own_record,
            left: false,
            members: BTreeMap::new(),
            order: Vec::new(),
            next_index: 0,
            probes: Vec::new(),
            next_probe_ms: now_ms,
            seq: 0,
            relays: BTreeMap::new(),
            queue: Queue::default(),
            health: 0,
            next_gossip_ms: now_ms,
            next_reconnect_ms: now_ms + ms(tuning.reconnect_period),
            next_housekeeping_ms: now_ms + HOUSEKEEPING_MS,
            next_join_ms: now_ms,
            suspects: BTreeSet::new(),
            dead: BTreeSet::new(),
            rng: SmallRng::seed_from_u64(seed),
            tuning,
            out: Vec::new(),
            events: Vec::new(),
            stats: SwimStats::default(),
            stale_view: false,
            active: 0,
        }
    }

    /// This node.
    pub fn me(&self) -> &PeerId {
        &self.me
    }

    /// This node's incarnation.
    pub fn incarnation(&self) -> u32 {
        self.incarnation
    }

    /// Counters.
    pub fn stats(&self) -> SwimStats {
        SwimStats {
            health: self.health,
            ..self.stats
        }
    }

    /// Takes the packets to send and the events since the last call.
    pub fn drain(&mut self) -> (Vec<(PeerId, Packet)>, Vec<SwimEvent>) {
        (
            std::mem::take(&mut self.out),
            std::mem::take(&mut self.events),
        )
    }

    /// Every member known (dead ones until forgotten).
    pub fn members(&self) -> impl Iterator<Item = MemberView<'_>> {
        self.members.values().map(|m| MemberView {
            peer: &m.peer,
            state: m.state,
            incarnation: m.incarnation,
            last_seen_ms: m.last_seen_ms,
        })
    }

    /// Active members (alive or suspect, not blacklisted).
    pub fn active(&self) -> impl Iterator<Item = &PeerId> {
        self.members
            .values()
            .filter(|m| m.active())
            .map(|m| &m.peer)
    }

    /// How many members are active.
    pub fn active_count(&self) -> usize {
        self.active
    }

    /// The member `key`, if active.
    pub fn active_member(&self, key: &KeyId) -> Option<&PeerId> {
        self.members
            .get(key)
            .filter(|m| m.active())
            .map(|m| &m.peer)
    }

    /// The member `key` in any state.
    pub fn member(&self, key: &KeyId) -> Option<&PeerId> {
        self.members.get(key).map(|m| &m.peer)
    }

    /// What this node knows of members that are not alive, as updates (for a node that just
    /// learned their identities and would otherwise probe them all).
    pub fn down_updates<'a>(&self, keys: impl Iterator<Item = &'a KeyId>) -> Vec<Update> {
        keys.filter_map(|k| self.members.get(k))
            .filter(|m| matches!(m.state, MemberState::Dead | MemberState::Left))
            .map(|m| self.update_of(m))
            .collect()
    }

    /// Membership anti-entropy: a digest of each of `buckets` buckets (by the first byte of
    /// the key) over (key, generation, up or down) of every member, this node included.
    /// Suspicions and incarnations are left out: any two views differ in them for a moment.
    /// A member this node blacklisted counts as up: that is its own decision, not news to
    /// exchange.
    pub fn member_digests(&self, buckets: usize) -> Vec<[u8; 8]> {
        use sha2::{Digest, Sha256};
        let buckets = buckets.clamp(1, 256).next_power_of_two();
        let mut hashers: Vec<Sha256> = (0..buckets).map(|_| Sha256::new()).collect();
        let me = std::iter::once((&self.me.key, self.me.generation, true));
        let others = self.members.values().map(|m| {
            let up = m.blocked || matches!(m.state, MemberState::Alive | MemberState::Suspect);
            (&m.peer.key, m.peer.generation, up)
        });
        // Sorted by key: the same members hash in the same order everywhere.
        let mut all: Vec<(&KeyId, u64, bool)> = me.chain(others).collect();
        all.sort_by_key(|(k, _, _)| **k);
        for (k, g, up) in all {
            let h = &mut hashers[super::records::bucket_of(k, buckets)];
            h.update(k.0);
            h.update(g.to_be_bytes());
            h.update([u8::from(up)]);
        }
        hashers
            .into_iter()
            .map(|h| {
                let full: [u8; 32] = h.finalize().into();
                let mut d = [0u8; 8];
                d.copy_from_slice(&full[..8]);
                d
            })
            .collect()
    }

    /// This node's view of the members in the `covered` buckets, itself included (blacklisted
    /// members left out).
    pub fn member_view(&self, covered: &[u8], buckets: usize) -> Vec<Update> {
        let inside = |k: &KeyId| covered.contains(&(super::records::bucket_of(k, buckets) as u8));
        let me = inside(&self.me.key).then(|| self.my_update());
        me.into_iter()
            .chain(
                self.members
                    .values()
                    .filter(|m| !m.blocked && inside(&m.peer.key))
                    .map(|m| self.update_of(m)),
            )
            .take(super::wire::MAX_UPDATES)
            .collect()
    }

    /// Merges updates from `from` (gossip, or its view in anti-entropy). With `ask`, members
    /// this node has no identity for are reported (`SwimEvent::Unknown`) so that it asks for
    /// them; anti-entropy fetches identities by itself.
    pub fn merge(&mut self, from: KeyId, updates: &[Update], ask: bool, now_ms: u64) {
        for u in updates.iter().take(super::wire::MAX_UPDATES) {
            if self.apply(u, now_ms) {
                self.stats.news += 1;
                self.push_update(u.clone(), now_ms);
            } else if ask
                && u.key != self.me.key
                && matches!(u.state, MemberState::Alive | MemberState::Suspect)
                && self
                    .members
                    .get(&u.key)
                    .is_none_or(|m| m.peer.generation < u.generation)
            {
                self.events.push(SwimEvent::Unknown { key: u.key, from });
            }
        }
    }

    fn update_of(&self, m: &Member) -> Update {
        Update {
            key: m.peer.key,
            generation: m.peer.generation,
            incarnation: m.incarnation,
            state: m.state,
            accuser: m
                .suspicion
                .as_ref()
                .and_then(|s| s.accusers.first().copied()),
        }
    }

    /// Learns a member's identity from its verified record: a new member, or a newer process
    /// of a known one (which replaces the old, in whatever state).
    pub fn learn(&mut self, peer: PeerId, now_ms: u64) {
        if peer.key == self.me.key {
            return;
        }
        if let Some(m) = self.members.get(&peer.key)
            && m.peer.generation >= peer.generation
        {
            return;
        }
        let (blocked, seed) = self
            .members
            .get(&peer.key)
            .map_or((false, false), |m| (m.blocked, m.seed));
        let fresh = !self.members.contains_key(&peer.key);
        if self.members.get(&peer.key).is_some_and(Member::active) {
            self.active -= 1;
        }
        if !blocked {
            self.active += 1;
        }
        self.suspects.remove(&peer.key);
        self.dead.remove(&peer.key);
        self.members.insert(
            peer.key,
            Member {
                peer: peer.clone(),
                incarnation: 0,
                state: MemberState::Alive,
                since_ms: now_ms,
                suspicion: None,
                heard: false,
                last_seen_ms: 0,
                blocked,
                seed,
            },
        );
        if fresh {
            // SWIM §4.3: a new member goes to a random place in the probe order.
            let at = self.rng.random_range(0..=self.order.len());
            self.order.insert(at, peer.key);
        }
        if !blocked {
            self.events.push(SwimEvent::Up(peer));
        }
    }

    /// Marks a known member as a seed and pings it now (joining through it).
    pub fn join(&mut self, key: &KeyId) {
        if let Some(m) = self.members.get_mut(key) {
            m.seed = true;
            self.seq = self.seq.wrapping_add(1);
            let seq = self.seq;
            self.send(*key, Probe::Ping { seq });
        }
    }

    /// Queues a record to gossip (a new one of this node's, or one learned, one hop further).
    pub fn gossip_record(
        &mut self,
        item: Item,
        kind: RecordKind,
        author: KeyId,
        seq: u64,
        now_ms: u64,
    ) {
        let key = match kind {
            RecordKind::Blacklist => GossipKey::Record(kind, author, seq),
            _ => GossipKey::Record(kind, author, 0),
        };
        self.push(key, Gossip::Record(item), now_ms);
    }

    fn push(&mut self, key: GossipKey, what: Gossip, now_ms: u64) {
        if self.queue.is_empty() {
            // The first pending item goes out at once; after that, once per gossip period.
            self.next_gossip_ms = self.next_gossip_ms.max(now_ms);
        }
        self.queue.push(key, what);
    }

    fn push_update(&mut self, u: Update, now_ms: u64) {
        self.push(GossipKey::Member(u.key), Gossip::Update(u), now_ms);
    }

    /// Sends `updates` to `to` in a gossip packet of their own (plus whatever is pending).
    pub fn tell(&mut self, to: KeyId, updates: Vec<Update>) {
        if !updates.is_empty() {
            self.send_with(to, Probe::Gossip, updates);
        }
    }

    /// Sends a packet with `first` ahead of whatever it piggybacks.
    fn send_with(&mut self, to: KeyId, probe: Probe, first: Vec<Update>) {
        let before = self.out.len();
        self.send(to, probe);
        if let Some((_, p)) = self.out.get_mut(before) {
            let mut all = first;
            all.retain(|u| !p.updates.iter().any(|x| x.key == u.key));
            all.append(&mut p.updates);
            all.truncate(super::wire::MAX_UPDATES);
            p.updates = all;
        }
    }

    fn my_update(&self) -> Update {
        Update {
            key: self.me.key,
            generation: self.me.generation,
            incarnation: self.incarnation,
            state: MemberState::Alive,
            accuser: None,
        }
    }

    /// Blacklisted: stop probing and answering it, and ignore what others say of it. Not
    /// gossiped: other nodes decide by whom they trust.
    pub fn evict(&mut self, key: &KeyId, now_ms: u64) {
        let Some(m) = self.members.get(key) else {
            return;
        };
        if m.active() {
            self.set_state(key, MemberState::Dead, None, now_ms);
        }
        if let Some(m) = self.members.get_mut(key) {
            m.blocked = true;
        }
        self.dead.remove(key);
    }

    /// Leaves: tells a few members this node is going, and stops probing.
    pub fn leave(&mut self, now_ms: u64) {
        if self.left {
            return;
        }
        self.left = true;
        let u = Update {
            key: self.me.key,
            generation: self.me.generation,
            incarnation: self.incarnation,
            state: MemberState::Left,
            accuser: None,
        };
        self.push_update(u, now_ms);
        for to in self.random_active(self.tuning.gossip_fanout.max(1), &[]) {
            self.send(to, Probe::Gossip);
        }
    }

    /// The earliest time [`Swim::tick`] has work (ms); `u64::MAX` when none is due.
    pub fn next_wakeup(&self) -> u64 {
        if self.left {
            return u64::MAX;
        }
        let mut t = u64::MAX;
        let any_active = self.active > 0;
        for p in &self.probes {
            t = t.min(p.end_ms);
            if p.round < self.tuning.probe_rounds {
                t = t.min(p.next_round_ms);
            }
        }
        if any_active && !self.probes.iter().any(|p| !p.verify) {
            t = t.min(self.next_probe_ms);
        }
        if !any_active && self.members.values().any(|m| m.seed) {
            t = t.min(self.next_join_ms);
        }
        if let Some(r) = self.relays.values().map(|r| r.deadline_ms).min() {
            t = t.min(r);
        }
        for k in &self.suspects {
            if let Some(s) = self.members.get(k).and_then(|m| m.suspicion.as_ref())
                && !s.verifying
            {
                t = t.min(s.deadline_ms);
            }
        }
        if !self.queue.is_empty() && any_active {
            t = t.min(self.next_gossip_ms);
        }
        if !self.dead.is_empty() {
            t = t.min(self.next_reconnect_ms);
        }
        if self.members.len() > self.active {
            t = t.min(self.next_housekeeping_ms);
        }
        t
    }

    /// Does whatever is due at `now_ms`.
    pub fn tick(&mut self, now_ms: u64) {
        if self.left {
            return;
        }
        self.tick_probe(now_ms);
        self.tick_relays(now_ms);
        self.tick_suspects(now_ms);
        let any_active = self.active > 0;
        if !self.queue.is_empty() && any_active && now_ms >= self.next_gossip_ms {
            self.next_gossip_ms = now_ms + ms(self.tuning.gossip_period);
            for to in self.random_active(self.tuning.gossip_fanout, &[]) {
                if self.queue.is_empty() {
                    break;
                }
                self.send(to, Probe::Gossip);
            }
        }
        if now_ms >= self.next_reconnect_ms {
            self.next_reconnect_ms = now_ms + ms(self.tuning.reconnect_period);
            if !self.dead.is_empty() {
                let i = self.rng.random_range(0..self.dead.len());
                if let Some(k) = self.dead.iter().nth(i).copied() {
                    self.seq = self.seq.wrapping_add(1);
                    let seq = self.seq;
                    self.send(k, Probe::Ping { seq });
                }
            }
        }
        if !any_active && now_ms >= self.next_join_ms {
            self.next_join_ms = now_ms + JOIN_RETRY_MS;
            let seeds: Vec<KeyId> = self
                .members
                .values()
                .filter(|m| m.seed && !m.blocked)
                .map(|m| m.peer.key)
                .collect();
            for s in seeds {
                self.seq = self.seq.wrapping_add(1);
                let seq = self.seq;
                self.send(s, Probe::Ping { seq });
            }
        }
        if now_ms >= self.next_housekeeping_ms {
            self.next_housekeeping_ms = now_ms + HOUSEKEEPING_MS;
            self.forget_old(now_ms);
        }
    }

    fn period_ms(&self) -> u64 {
        ms(self.tuning.probe_period) * u64::from(1 + self.health)
    }

    fn tick_probe(&mut self, now_ms: u64) {
        // Probes that ran out, then further rounds of those still going.
        let (done, going): (Vec<ProbeState>, Vec<ProbeState>) = std::mem::take(&mut self.probes)
            .into_iter()
            .partition(|p| now_ms >= p.end_ms);
        self.probes = going;
        for p in done {
            self.probe_failed(p, now_ms);
        }
        let rounds = self.tuning.probe_rounds;
        let due: Vec<(KeyId, u32)> = self
            .probes
            .iter_mut()
            .filter(|p| p.round < rounds && now_ms >= p.next_round_ms)
            .map(|p| {
                p.round += 1;
                p.next_round_ms += p.round_ms;
                (p.target, p.seq)
            })
            .collect();
        for (target, seq) in due {
            // Off-spec (see the module docs): the direct ping again, with fresh relays.
            self.send(target, Probe::Ping { seq });
            let relays = self.random_active(self.tuning.indirect_probes, &[target]);
            if let Some(p) = self.probes.iter_mut().find(|p| p.seq == seq) {
                p.expected_nacks += relays.len() as u32;
                p.relays.extend(relays.iter().copied());
            }
            for r in relays {
                self.send(r, Probe::PingReq { seq, target });
            }
        }
        if self.probes.iter().any(|p| !p.verify) || now_ms < self.next_probe_ms {
            return;
        }
        self.next_probe_ms = now_ms + self.period_ms();
        if let Some(target) = self.next_target() {
            self.start_probe(target, false, now_ms);
        }
    }

    fn start_probe(&mut self, target: KeyId, verify: bool, now_ms: u64) {
        let period = self.period_ms();
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let round_ms = (period / u64::from(self.tuning.probe_rounds.max(1))).max(1);
        self.probes.push(ProbeState {
            verify,
            target,
            seq,
            round: 1,
            round_ms,
            next_round_ms: now_ms + round_ms,
            end_ms: now_ms + period,
            expected_nacks: 0,
            nacks: 0,
            relays: Vec::new(),
        });
        if !verify {
            self.stats.probes += 1;
        }
        self.send(target, Probe::Ping { seq });
    }

    /// SWIM §4.3: the next active member in a shuffled round-robin order.
    fn next_target(&mut self) -> Option<KeyId> {
        for _ in 0..=self.order.len() {
            if self.next_index >= self.order.len() {
                self.order = self.members.keys().copied().collect();
                for i in (1..self.order.len()).rev() {
                    let j = self.rng.random_range(0..=i);
                    self.order.swap(i, j);
                }
                self.next_index = 0;
                if self.order.is_empty() {
                    return None;
                }
            }
            let k = self.order[self.next_index];
            self.next_index += 1;
            if self.members.get(&k).is_some_and(Member::active) {
                return Some(k);
            }
        }
        None
    }

    fn probe_failed(&mut self, p: ProbeState, now_ms: u64) {
        let Some(m) = self.members.get(&p.target) else {
            return;
        };
        if p.verify {
            // The suspicion's last check failed too: dead, unless it changed meanwhile.
            if m.state == MemberState::Suspect && !m.blocked {
                let u = Update {
                    key: p.target,
                    generation: m.peer.generation,
                    incarnation: m.incarnation,
                    state: MemberState::Dead,
                    accuser: None,
                };
                if self.apply(&u, now_ms) {
                    self.stats.declared_dead += 1;
                    self.push_update(u, now_ms);
                }
            }
            return;
        }
        self.stats.probes_failed += 1;
        // Lifeguard §IV-A: relays that did not even nack suggest the fault is here.
        if p.expected_nacks == 0 || p.nacks < p.expected_nacks {
            self.health = (self.health + 1).min(self.tuning.max_health);
        }
        if !m.active() {
            return;
        }
        let u = Update {
            key: p.target,
            generation: m.peer.generation,
            incarnation: m.incarnation,
            state: MemberState::Suspect,
            accuser: Some(self.prefix),
        };
        if self.apply(&u, now_ms) {
            self.stats.suspected += 1;
            self.push_update(u, now_ms);
        }
    }

    fn tick_relays(&mut self, now_ms: u64) {
        let due: Vec<u32> = self
            .relays
            .iter()
            .filter(|(_, r)| r.deadline_ms <= now_ms)
            .map(|(s, _)| *s)
            .collect();
        for s in due {
            if let Some(r) = self.relays.remove(&s) {
                self.send(r.origin, Probe::Nack { seq: r.origin_seq });
            }
        }
    }

    /// Suspicions that ran out get one last probe from this node; only if that fails too is
    /// the member declared dead (see `probe_failed`).
    ///
    /// Off-spec: in SWIM and Lifeguard every node that heard a suspicion declares the member
    /// dead when its own timer runs out. With a thousand nodes, a refutation that misses even
    /// one of them (one in a few hundred at 20 % message loss) makes a false death; checking
    /// first turns that into a false death only if this node's own multi-round probe of a
    /// live member fails as well.
    fn tick_suspects(&mut self, now_ms: u64) {
        let due: Vec<KeyId> = self
            .suspects
            .iter()
            .filter_map(|k| self.members.get(k))
            .filter(|m| {
                m.suspicion
                    .as_ref()
                    .is_some_and(|s| !s.verifying && s.deadline_ms <= now_ms)
            })
            .map(|m| m.peer.key)
            .collect();
        for key in due {
            if let Some(s) = self
                .members
                .get_mut(&key)
                .and_then(|m| m.suspicion.as_mut())
            {
                s.verifying = true;
            }
            self.start_probe(key, true, now_ms);
        }
    }

    fn forget_old(&mut self, now_ms: u64) {
        let after = ms(self.tuning.forget_down_after);
        let old: Vec<(KeyId, u64)> = self
            .members
            .values()
            .filter(|m| {
                matches!(m.state, MemberState::Dead | MemberState::Left)
                    && m.since_ms.saturating_add(after) <= now_ms
            })
            .map(|m| (m.peer.key, m.peer.generation))
            .collect();
        for (k, g) in old {
            self.members.remove(&k);
            self.dead.remove(&k);
            self.suspects.remove(&k);
            self.events.push(SwimEvent::Forgotten(k, g));
        }
        if !self.order.is_empty() && self.order.len() > 2 * self.members.len() + 16 {
            self.order.retain(|k| self.members.contains_key(k));
            self.next_index = self.next_index.min(self.order.len());
        }
    }

    /// Up to `n` random active members other than `except`.
    fn random_active(&mut self, n: usize, except: &[KeyId]) -> Vec<KeyId> {
        let mut out = Vec::with_capacity(n);
        if n == 0 || self.order.is_empty() {
            return out;
        }
        // Sample from the probe order (every member is in it); a few misses are fine.
        for _ in 0..(4 * n + 8) {
            if out.len() >= n {
                break;
            }
            let k = self.order[self.rng.random_range(0..self.order.len())];
            if except.contains(&k) || out.contains(&k) {
                continue;
            }
            if self.members.get(&k).is_some_and(Member::active) {
                out.push(k);
            }
        }
        out
    }

    /// How many times one update is sent by one node (memberlist's rule).
    fn retransmit_limit(&self) -> u32 {
        let n = self.active + 1;
        let log = ((n + 1) as f64).log10().ceil().max(1.0) as u32;
        self.tuning.retransmit_mult.max(1) * log
    }

    fn send(&mut self, to: KeyId, probe: Probe) {
        let Some(m) = self.members.get(&to) else {
            return;
        };
        let peer = m.peer.clone();
        let intro = (!m.heard).then(|| self.own_record.clone());
        let mut updates = Vec::new();
        let mut records = Vec::new();
        let mut budget = self.tuning.piggyback_bytes;
        let mut skip = None;
        // Lifeguard §IV-C (buddy system): what this node holds against the receiver first.
        if !matches!(m.state, MemberState::Alive) {
            updates.push(self.update_of(m));
            budget = budget.saturating_sub(MIN_ITEM + 10);
            skip = Some(GossipKey::Member(to));
        }
        let limit = self.retransmit_limit();
        self.queue
            .take(budget, limit, skip, &mut updates, &mut records);
        self.out.push((
            peer,
            Packet {
                generation: self.me.generation,
                probe,
                intro,
                updates,
                records,
            },
        ));
    }

    /// A packet from `from` (its envelope and intro already handled by the caller).
    pub fn handle(
        &mut self,
        from: KeyId,
        generation: u64,
        probe: Probe,
        updates: &[Update],
        now_ms: u64,
    ) {
        if self.left {
            return;
        }
        let Some(m) = self.members.get_mut(&from) else {
            self.stats.unknown_sender += 1;
            return;
        };
        if m.blocked || generation < m.peer.generation {
            return;
        }
        if generation > m.peer.generation {
            self.events.push(SwimEvent::Unknown { key: from, from });
        } else {
            m.heard = true;
        }
        m.last_seen_ms = now_ms;
        self.stale_view = false;
        self.merge(from, updates, true, now_ms);
        // The sender holds an old suspicion or death of this node, one whose refutation has
        // long stopped travelling: correct it directly.
        let correction = if self.stale_view {
            vec![self.my_update()]
        } else {
            Vec::new()
        };
        match probe {
            Probe::Ping { seq } => {
                self.send_with(from, Probe::Ack { seq }, correction);
                return;
            }
            Probe::Ack { seq } => {
                if let Some(i) = self
                    .probes
                    .iter()
                    .position(|p| p.seq == seq && (p.target == from || p.relays.contains(&from)))
                {
                    let p = self.probes.swap_remove(i);
                    if p.verify {
                        self.verified_alive(&p.target, now_ms);
                    } else {
                        self.health = self.health.saturating_sub(1);
                    }
                } else if let Some(r) = self.relays.remove(&seq) {
                    self.send(r.origin, Probe::Ack { seq: r.origin_seq });
                }
            }
            Probe::PingReq { seq, target } => {
                if target == self.me.key {
                    self.send(from, Probe::Ack { seq });
                } else if self
                    .members
                    .get(&target)
                    .is_some_and(|m| !m.blocked && target != from)
                {
                    self.seq = self.seq.wrapping_add(1);
                    let own = self.seq;
                    let base =
                        ms(self.tuning.probe_period) / u64::from(self.tuning.probe_rounds.max(1));
                    self.relays.insert(
                        own,
                        Relay {
                            origin: from,
                            origin_seq: seq,
                            deadline_ms: now_ms + ((base as f64) * NACK_SHARE) as u64,
                        },
                    );
                    if self.relays.len() > 1024 {
                        // Bounded: the oldest requests go unanswered.
                        self.relays.pop_first();
                    }
                    self.send(target, Probe::Ping { seq: own });
                } else {
                    self.send(from, Probe::Nack { seq });
                }
            }
            Probe::Nack { seq } => {
                if let Some(p) = self
                    .probes
                    .iter_mut()
                    .find(|p| p.seq == seq && p.relays.contains(&from))
                {
                    p.nacks += 1;
                }
            }
            Probe::Gossip => {}
        }
        self.tell(from, correction);
    }

    /// Applies one update; true when it was news (to be passed on).
    fn apply(&mut self, u: &Update, now_ms: u64) -> bool {
        if u.key == self.me.key {
            self.about_me(u, now_ms);
            return false;
        }
        let Some(m) = self.members.get_mut(&u.key) else {
            return false;
        };
        if m.blocked || u.generation != m.peer.generation {
            return false;
        }
        let (inc, st) = (m.incarnation, m.state);
        let accuser = u.accuser.unwrap_or([0; 8]);
        match u.state {
            MemberState::Alive => {
                if st == MemberState::Left || u.incarnation <= inc {
                    return false;
                }
                m.incarnation = u.incarnation;
                self.set_state(&u.key, MemberState::Alive, None, now_ms);
                true
            }
            MemberState::Suspect => match st {
                MemberState::Alive if u.incarnation >= inc => {
                    m.incarnation = u.incarnation;
                    self.set_state(&u.key, MemberState::Suspect, Some(accuser), now_ms);
                    true
                }
                MemberState::Suspect if u.incarnation > inc => {
                    m.incarnation = u.incarnation;
                    self.set_state(&u.key, MemberState::Suspect, Some(accuser), now_ms);
                    true
                }
                MemberState::Suspect if u.incarnation == inc => {
                    // Lifeguard §IV-B: an independent accuser confirms the suspicion.
                    let Some(s) = m.suspicion.as_mut() else {
                        return false;
                    };
                    if accuser == self.prefix {
                        s.mine = true;
                    }
                    if s.accusers.contains(&accuser) || s.accusers.len() > s.k {
                        if accuser == self.prefix {
                            let s = s.clone();
                            let deadline = self.suspicion_deadline(&s);
                            if let Some(s) = self
                                .members
                                .get_mut(&u.key)
                                .and_then(|m| m.suspicion.as_mut())
                            {
                                s.deadline_ms = s.deadline_ms.min(deadline);
                            }
                        }
                        return false;
                    }
                    s.accusers.push(accuser);
                    let s = s.clone();
                    let deadline = self.suspicion_deadline(&s);
                    if let Some(s) = self
                        .members
                        .get_mut(&u.key)
                        .and_then(|m| m.suspicion.as_mut())
                    {
                        s.deadline_ms = deadline;
                    }
                    true
                }
                _ => false,
            },
            MemberState::Dead => match st {
                MemberState::Alive | MemberState::Suspect if u.incarnation >= inc => {
                    m.incarnation = u.incarnation;
                    self.set_state(&u.key, MemberState::Dead, None, now_ms);
                    true
                }
                MemberState::Dead if u.incarnation > inc => {
                    m.incarnation = u.incarnation;
                    false
                }
                _ => false,
            },
            MemberState::Left => {
                if st == MemberState::Left || u.incarnation < inc {
                    return false;
                }
                m.incarnation = u.incarnation;
                self.set_state(&u.key, MemberState::Left, None, now_ms);
                true
            }
        }
    }

    /// The suspect answered this node's last check: it lives. Its refutation usually came
    /// with the answer; if not, the suspicion starts over (the check carried the suspicion,
    /// so the refutation is on its way).
    fn verified_alive(&mut self, key: &KeyId, now_ms: u64) {
        let Some(s) = self.members.get(key).and_then(|m| m.suspicion.clone()) else {
            return;
        };
        let mut s = Suspicion {
            start_ms: now_ms,
            verifying: false,
            ..s
        };
        s.deadline_ms = self.suspicion_deadline(&s);
        if let Some(m) = self.members.get_mut(key) {
            m.suspicion = Some(s);
        }
    }

    /// SWIM §4.2: a suspicion (or death) of this node is refuted by a higher incarnation.
    fn about_me(&mut self, u: &Update, now_ms: u64) {
        if u.generation != self.me.generation || self.left {
            return;
        }
        match u.state {
            MemberState::Alive => self.incarnation = self.incarnation.max(u.incarnation),
            MemberState::Suspect | MemberState::Dead | MemberState::Left => {
                if u.incarnation < self.incarnation {
                    self.stale_view = true;
                    return;
                }
                // At u32::MAX nobody can be refuted; such an incarnation only comes from a
                // lying member, and saturating keeps this node from wrapping to 0.
                self.incarnation = u.incarnation.saturating_add(1);
                self.stats.refuted += 1;
                // Lifeguard §IV-A: being suspected is a sign of this node's own trouble.
                self.health = (self.health + 1).min(self.tuning.max_health);
                self.events.push(SwimEvent::Refuted {
                    dead: u.state != MemberState::Suspect,
                });
                let alive = self.my_update();
                self.push_update(alive.clone(), now_ms);
                // The accuser hears it directly too: it is the one about to declare this
                // node dead.
                if let Some(accuser) = u.accuser
                    && let Some(k) = self
                        .members
                        .values()
                        .find(|m| m.active() && prefix(&m.peer.key) == accuser)
                        .map(|m| m.peer.key)
                {
                    self.tell(k, vec![alive]);
                }
            }
        }
    }

    fn suspicion_deadline(&self, s: &Suspicion) -> u64 {
        let min = ms(self.tuning.suspicion_min) as f64;
        let max = min * f64::from(self.tuning.suspicion_max_mult.max(1));
        let confirmations = s.accusers.len().saturating_sub(1) as f64;
        let timeout = if s.k == 0 {
            min
        } else {
            // Lifeguard §IV-B: max − (max − min)·log(C + 1)/log(K + 1), at least min.
            (max - (max - min) * (confirmations + 1.0).ln() / (s.k as f64 + 1.0).ln()).max(min)
        };
        // A node that only heard of the suspicion waits a little longer than the accusers,
        // whose verdict usually reaches it first.
        let grace = if s.mine { 0.0 } else { min / 2.0 };
        s.start_ms + (timeout + grace) as u64
    }

    fn set_state(
        &mut self,
        key: &KeyId,
        state: MemberState,
        accuser: Option<[u8; 8]>,
        now_ms: u64,
    ) {
        let active_others = self.active;
        // memberlist: without enough other members to confirm, the minimum applies at once.
        let k = if active_others < self.tuning.suspicion_confirmations + 2 {
            0
        } else {
            self.tuning.suspicion_confirmations
        };
        let suspicion = accuser.map(|a| Suspicion {
            start_ms: now_ms,
            accusers: vec![a],
            k,
            deadline_ms: 0,
            mine: a == self.prefix,
            verifying: false,
        });
        let deadline = suspicion.as_ref().map(|s| self.suspicion_deadline(s));
        let Some(m) = self.members.get_mut(key) else {
            return;
        };
        let was_active = m.active();
        m.state = state;
        m.since_ms = now_ms;
        m.suspicion = suspicion.map(|mut s| {
            s.deadline_ms = deadline.unwrap_or(now_ms);
            s
        });
        let now_active = m.active();
        let peer = m.peer.clone();
        match (was_active, now_active) {
            (true, false) => self.active -= 1,
            (false, true) => self.active += 1,
            _ => {}
        }
        if state == MemberState::Suspect {
            self.suspects.insert(*key);
        } else {
            self.suspects.remove(key);
        }
        if state == MemberState::Dead {
            self.dead.insert(*key);
        } else {
            self.dead.remove(key);
        }
        if was_active && !now_active {
            self.events.push(SwimEvent::Down(peer));
        } else if !was_active && now_active {
            self.events.push(SwimEvent::Up(peer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::mesh::wire::{PeerRecord, Record};

    fn node(i: u8, generation: u64) -> (Identity, PeerId, SignedRecord) {
        let id = Identity::generate();
        let rec = PeerRecord {
            node: id.key_id(),
            generation,
            url: format!("http://10.0.0.{i}:4301"),
        };
        let signed = SignedRecord::sign(&id, &Record::Peer(rec.clone()));
        (id, PeerId::of(&rec), signed)
    }

    fn swim(p: &PeerId, r: &SignedRecord) -> Swim {
        Swim::new(p.clone(), r.clone(), Tuning::default(), 0, 1)
    }

    #[test]
    fn precedence_follows_incarnations_and_states() {
        let (_, a, ar) = node(1, 5);
        let (_, b, _) = node(2, 5);
        let mut s = swim(&a, &ar);
        s.learn(b.clone(), 0);
        let upd = |inc, state| Update {
            key: b.key,
            generation: 5,
            incarnation: inc,
            state,
            accuser: Some([9; 8]),
        };
        assert!(s.apply(&upd(0, MemberState::Suspect), 1));
        // The same suspicion again is no news; an alive at the same incarnation does not refute.
        assert!(!s.apply(&upd(0, MemberState::Suspect), 2));
        assert!(!s.apply(&upd(0, MemberState::Alive), 2));
        assert!(s.apply(&upd(1, MemberState::Alive), 3));
        assert!(s.apply(&upd(1, MemberState::Dead), 4));
        assert!(
            !s.apply(&upd(1, MemberState::Suspect), 5),
            "dead beats suspect"
        );
        assert!(
            s.apply(&upd(2, MemberState::Alive), 6),
            "a dead member may refute"
        );
        assert!(s.apply(&upd(2, MemberState::Left), 7));
        assert!(!s.apply(&upd(9, MemberState::Alive), 8), "left is final");
        assert_eq!(s.active_count(), 0);
        // Another generation's updates do not apply.
        let mut other = upd(50, MemberState::Alive);
        other.generation = 4;
        assert!(!s.apply(&other, 9));
    }

    #[test]
    fn suspicions_shrink_with_independent_accusers() {
        let (_, a, ar) = node(1, 1);
        let mut s = swim(&a, &ar);
        let others: Vec<PeerId> = (2..12).map(|i| node(i, 1).1).collect();
        for p in &others {
            s.learn(p.clone(), 0);
        }
        let b = &others[0];
        let sus = |acc: u8| Update {
            key: b.key,
            generation: 1,
            incarnation: 0,
            state: MemberState::Suspect,
            accuser: Some([acc; 8]),
        };
        assert!(s.apply(&sus(1), 1_000));
        let min = ms(s.tuning.suspicion_min);
        let max = min * u64::from(s.tuning.suspicion_max_mult);
        // This node only heard of it: it waits a grace period longer than the accusers.
        let grace = min / 2;
        let deadline = |s: &Swim| s.members[&b.key].suspicion.as_ref().unwrap().deadline_ms;
        assert_eq!(
            deadline(&s),
            1_000 + max + grace,
            "one accuser: the longest timeout"
        );
        let mut last = deadline(&s);
        for acc in 2..=(s.tuning.suspicion_confirmations as u8 + 1) {
            assert!(s.apply(&sus(acc), 2_000));
            assert!(deadline(&s) < last, "each confirmation shortens it");
            last = deadline(&s);
        }
        assert_eq!(last, 1_000 + min + grace, "k confirmations: the minimum");
        assert!(!s.apply(&sus(2), 3_000), "the same accuser counts once");
        s.drain();
        // When it runs out, this node checks the suspect itself before declaring it dead.
        s.tick(last);
        assert_eq!(s.members[&b.key].state, MemberState::Suspect);
        let (out, _) = s.drain();
        assert!(
            out.iter().any(|(to, p)| to.key == b.key
                && matches!(p.probe, Probe::Ping { .. })
                && p.updates
                    .iter()
                    .any(|u| u.key == b.key && u.state == MemberState::Suspect)),
            "a last check carrying the suspicion: {out:?}"
        );
        let mut now = last;
        while s.members[&b.key].state == MemberState::Suspect && now < last + 10_000 {
            now = s.next_wakeup().max(now + 1);
            s.tick(now);
        }
        assert_eq!(s.members[&b.key].state, MemberState::Dead);
        assert_eq!(
            now,
            last + ms(s.tuning.probe_period),
            "after one probe's rounds"
        );
        let (_, events) = s.drain();
        assert!(events.contains(&SwimEvent::Down(b.clone())));
    }

    #[test]
    fn a_suspected_node_refutes_and_its_health_drops() {
        let (_, a, ar) = node(1, 3);
        let (_, b, _) = node(2, 3);
        let mut s = swim(&a, &ar);
        s.learn(b.clone(), 0);
        let accuse = Update {
            key: a.key,
            generation: 3,
            incarnation: 0,
            state: MemberState::Suspect,
            accuser: Some([2; 8]),
        };
        s.handle(b.key, 3, Probe::Ping { seq: 7 }, &[accuse], 10);
        assert_eq!(s.incarnation(), 1);
        assert_eq!(s.stats().health, 1);
        // The ack carries the refutation.
        let (out, events) = s.drain();
        assert!(events.contains(&SwimEvent::Refuted { dead: false }));
        let (to, p) = &out[0];
        assert_eq!(to.key, b.key);
        assert_eq!(p.probe, Probe::Ack { seq: 7 });
        assert!(
            p.updates
                .iter()
                .any(|u| u.key == a.key && u.state == MemberState::Alive && u.incarnation == 1)
        );
        // An intro goes along until b has been heard from: it has now.
        assert!(p.intro.is_none());
    }

    #[test]
    fn a_probe_without_answers_suspects_after_its_rounds_and_raises_health() {
        let (_, a, ar) = node(1, 1);
        let mut s = swim(&a, &ar);
        let others: Vec<PeerId> = (2..6).map(|i| node(i, 1).1).collect();
        for p in &others {
            s.learn(p.clone(), 0);
        }
        let period = ms(s.tuning.probe_period);
        let mut now = 0;
        s.tick(now);
        let (out, _) = s.drain();
        assert_eq!(out.len(), 1, "round 1: one direct ping");
        let target = out[0].0.key;
        assert!(out[0].1.intro.is_some(), "first contact carries the intro");
        let mut pings = 1;
        let mut reqs = 0;
        while now < period {
            now = s.next_wakeup();
            s.tick(now);
            for (to, p) in s.drain().0 {
                match p.probe {
                    // The next period's probe starts in the same instant.
                    Probe::Ping { .. } if now == period && to.key != target => {}
                    Probe::Ping { .. } => {
                        assert_eq!(to.key, target);
                        pings += 1;
                    }
                    Probe::PingReq { target: t, .. } => {
                        assert_eq!(t, target);
                        assert_ne!(to.key, target);
                        reqs += 1;
                    }
                    _ => {}
                }
            }
        }
        assert_eq!(now, period, "decided at the end of the period");
        assert_eq!(pings, s.tuning.probe_rounds);
        assert!(reqs >= s.tuning.probe_rounds - 1);
        assert_eq!(s.members[&target].state, MemberState::Suspect);
        assert_eq!(s.stats().health, 1, "no nacks either: maybe it is us");
        assert_eq!(s.stats().suspected, 1);
    }

    #[test]
    fn relays_pass_on_acks_and_nack_silence() {
        let (_, a, ar) = node(1, 1);
        let (_, origin, _) = node(2, 1);
        let (_, target, _) = node(3, 1);
        let mut s = swim(&a, &ar);
        s.learn(origin.clone(), 0);
        s.learn(target.clone(), 0);
        s.handle(
            origin.key,
            1,
            Probe::PingReq {
                seq: 40,
                target: target.key,
            },
            &[],
            0,
        );
        let (out, _) = s.drain();
        let Probe::Ping { seq: own } = out[0].1.probe else {
            panic!("expected a ping to the target: {out:?}")
        };
        assert_eq!(out[0].0.key, target.key);
        s.handle(target.key, 1, Probe::Ack { seq: own }, &[], 5);
        let (out, _) = s.drain();
        assert_eq!(out[0].0.key, origin.key);
        assert_eq!(out[0].1.probe, Probe::Ack { seq: 40 });
        // A second request the target leaves unanswered ends in a nack.
        s.handle(
            origin.key,
            1,
            Probe::PingReq {
                seq: 41,
                target: target.key,
            },
            &[],
            10,
        );
        s.drain();
        s.tick(1_000);
        let (out, _) = s.drain();
        assert!(
            out.iter()
                .any(|(to, p)| to.key == origin.key && p.probe == Probe::Nack { seq: 41 }),
            "{out:?}"
        );
    }

    #[test]
    fn updates_go_out_a_bounded_number_of_times_fewest_first() {
        let mut q = Queue::default();
        let k = |i: u8| KeyId([i; 32]);
        let upd = |i: u8| Update {
            key: k(i),
            generation: 1,
            incarnation: 0,
            state: MemberState::Dead,
            accuser: None,
        };
        q.push(GossipKey::Member(k(1)), Gossip::Update(upd(1)));
        let (mut u, mut r) = (Vec::new(), Vec::new());
        q.take(1_000, 3, None, &mut u, &mut r);
        q.push(GossipKey::Member(k(2)), Gossip::Update(upd(2)));
        u.clear();
        // Room for one: the one sent fewer times goes first.
        q.take(60, 3, None, &mut u, &mut r);
        assert_eq!(u[0].key, k(2));
        let mut sent = 0;
        for _ in 0..10 {
            u.clear();
            q.take(1_000, 3, None, &mut u, &mut r);
            sent += u.iter().filter(|x| x.key == k(1)).count();
        }
        assert_eq!(sent, 2, "three transmissions in all, one already made");
        assert!(q.is_empty());
        // A newer update about the same member replaces the queued one.
        q.push(GossipKey::Member(k(3)), Gossip::Update(upd(3)));
        let mut newer = upd(3);
        newer.incarnation = 4;
        q.push(GossipKey::Member(k(3)), Gossip::Update(newer));
        u.clear();
        q.take(1_000, 3, None, &mut u, &mut r);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].incarnation, 4);
    }

    #[test]
    fn a_standalone_node_never_wakes() {
        let (_, a, ar) = node(1, 1);
        let mut s = swim(&a, &ar);
        assert_eq!(s.next_wakeup(), u64::MAX);
        s.tick(1_000_000);
        assert!(s.drain().0.is_empty());
    }

    #[test]
    fn an_evicted_member_is_down_and_stays_down() {
        let (_, a, ar) = node(1, 1);
        let (_, b, _) = node(2, 1);
        let (_, c, _) = node(3, 1);
        let mut s = swim(&a, &ar);
        s.learn(b.clone(), 0);
        s.learn(c.clone(), 0);
        assert_eq!(s.active_count(), 2);
        s.evict(&b.key, 5);
        assert_eq!(s.active_count(), 1);
        let (_, events) = s.drain();
        assert!(events.contains(&SwimEvent::Down(b.clone())));
        // What others say of it no longer counts, and it is neither probed nor pinged back.
        let revive = Update {
            key: b.key,
            generation: 1,
            incarnation: 9,
            state: MemberState::Alive,
            accuser: None,
        };
        assert!(!s.apply(&revive, 6));
        s.handle(b.key, 1, Probe::Ping { seq: 1 }, &[], 7);
        assert!(s.drain().0.is_empty());
        assert_eq!(s.active_count(), 1);
        assert_eq!(
            s.active_count(),
            s.members.values().filter(|m| m.active()).count()
        );
    }

    #[test]
    fn an_outdated_accusation_is_answered_with_the_current_incarnation() {
        let (_, a, ar) = node(1, 2);
        let (_, b, _) = node(2, 2);
        let mut s = swim(&a, &ar);
        s.learn(b.clone(), 0);
        let dead = |inc| Update {
            key: a.key,
            generation: 2,
            incarnation: inc,
            state: MemberState::Dead,
            accuser: None,
        };
        s.handle(b.key, 2, Probe::Gossip, &[dead(0)], 1);
        assert_eq!(s.incarnation(), 1);
        s.drain();
        // b still holds the old death (the refutation has stopped travelling): it is told.
        s.handle(b.key, 2, Probe::Gossip, &[dead(0)], 2);
        assert_eq!(s.incarnation(), 1, "no second refutation");
        let (out, _) = s.drain();
        assert!(
            out.iter().any(|(to, p)| to.key == b.key
                && p.updates.iter().any(|u| u.key == a.key
                    && u.state == MemberState::Alive
                    && u.incarnation == 1)),
            "{out:?}"
        );
    }

    #[test]
    fn only_the_target_or_its_relays_can_answer_a_probe() {
        let (_, a, ar) = node(1, 1);
        let mut s = swim(&a, &ar);
        let others: Vec<PeerId> = (2..5).map(|i| node(i, 1).1).collect();
        for p in &others {
            s.learn(p.clone(), 0);
        }
        s.tick(0);
        let (out, _) = s.drain();
        let (target, seq) = match (&out[0].0, out[0].1.probe) {
            (to, Probe::Ping { seq }) => (to.key, seq),
            other => panic!("{other:?}"),
        };
        let bystander = others.iter().find(|p| p.key != target).unwrap().key;
        s.handle(bystander, 1, Probe::Ack { seq }, &[], 10);
        assert_eq!(s.probes.len(), 1, "a bystander's ack does not count");
        s.handle(target, 1, Probe::Ack { seq }, &[], 20);
        assert!(s.probes.is_empty(), "the target's does");
    }
}

//! The mesh state machine of one node, free of I/O: SWIM membership ([`super::swim`]), signed
//! records gossiped on SWIM packets (bounded hops) and repaired by anti-entropy, and the
//! plumbing between them.
//!
//! Every input carries the current time; every output (messages to send, events for the rest of
//! the node) is collected and drained by the caller, who also calls [`Core::tick`] at
//! [`Core::next_wakeup`]. The node drives one `Core` from a tokio task over HTTP; the
//! simulation drives thousands over an in-memory network with a virtual clock. Both run exactly
//! this code.
//!
//! A node's identity (key, URL, generation) is itself a signed record ([`PeerRecord`]): learned
//! from `/identity` when joining, from an intro on a first message, by gossip, or by
//! anti-entropy. Membership messages then name members by key and generation only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::records::{Accepted, Records};
use super::swim::{Swim, SwimEvent, SwimStats};
use super::wire::{
    CapRecord, DigestEntry, Item, MemberState, Message, Offer, PeerId, PeerRecord, Record,
    RecordKind, SignedRecord, WireError,
};
use crate::identity::{Identity, KeyId};

/// Most hops a record travels from its author through piggybacked gossip (anti-entropy repairs
/// anything it did not reach).
pub const MAX_HOPS: u8 = 12;

/// Most record (or digest) bytes sent in one anti-entropy message (envelopes are capped at
/// 64 KiB by default).
pub const MAX_SYNC_BYTES: usize = 32 * 1024;

/// While an anti-entropy round still finds records to fetch, the next one follows this soon
/// (a node that just joined catches up in seconds, not in `sync_interval`s).
const CATCH_UP_MS: u64 = 300;

/// An identity this node lacks is asked for at most this often.
const ASK_AGAIN_MS: u64 = 5_000;

/// Anti-entropy digests hold about this many entries per bucket.
const ENTRIES_PER_BUCKET: usize = 64;

/// Bytes of one digest entry on the wire, at most (kind, 32-byte key, varint seq).
const DIGEST_ENTRY_BYTES: usize = 44;

/// Protocol timings and sizes. The defaults suit a LAN of up to a few thousand nodes; the
/// retransmission count grows with the membership on its own.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// SWIM protocol period: one probe per period (times 1 + local health).
    pub probe_period: Duration,
    /// Rounds of one probe (the first direct only, each later one a direct ping plus
    /// `indirect_probes` relays), evenly spread over the period.
    pub probe_rounds: u32,
    /// Members asked to probe indirectly in each round after the first.
    pub indirect_probes: usize,
    /// Shortest time a suspect has to refute (reached with `suspicion_confirmations`
    /// independent accusers).
    pub suspicion_min: Duration,
    /// The longest time, as a multiple of the shortest (a lone accuser).
    pub suspicion_max_mult: u32,
    /// Independent accusers that bring a suspicion down to `suspicion_min`.
    pub suspicion_confirmations: usize,
    /// Highest local-health score (probe period multiplier minus one).
    pub max_health: u32,
    /// Times each update is piggybacked by each node: this times ⌈log10(n + 1)⌉.
    pub retransmit_mult: u32,
    /// Pending updates are pushed this often...
    pub gossip_period: Duration,
    /// ...to this many random members.
    pub gossip_fanout: usize,
    /// Bytes of updates and records piggybacked on one message, at most.
    pub piggyback_bytes: usize,
    /// A random dead member is pinged this often (partitions heal).
    pub reconnect_period: Duration,
    /// Record anti-entropy with one random member this often.
    pub sync_interval: Duration,
    /// Dead members (and their records) are forgotten after this long.
    pub forget_down_after: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            probe_period: Duration::from_secs(1),
            probe_rounds: 5,
            indirect_probes: 2,
            suspicion_min: Duration::from_secs(5),
            suspicion_max_mult: 6,
            suspicion_confirmations: 3,
            max_health: 8,
            retransmit_mult: 3,
            gossip_period: Duration::from_millis(200),
            gossip_fanout: 3,
            piggyback_bytes: 1_200,
            reconnect_period: Duration::from_secs(5),
            sync_interval: Duration::from_secs(10),
            forget_down_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// A peer's membership state as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// Answering.
    Alive,
    /// Failed a probe; it has until its suspicion runs out to refute.
    Suspect,
    /// Declared dead, or left.
    Dead,
}

/// What the rest of the node hears from the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A peer joined or came back.
    PeerUp(PeerId),
    /// A peer was declared dead or left.
    PeerDown(PeerId),
    /// A record was learned (an identity, new capabilities, a blacklist entry).
    Record(Record),
    /// A task offer arrived.
    Offer {
        /// From.
        from: KeyId,
        /// The offer.
        offer: Offer,
    },
    /// The mesh suspected this node (or declared it dead) and it refuted.
    Refuted {
        /// It had been declared dead.
        dead: bool,
    },
}

/// Counters of what the core refused or did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CoreStats {
    /// SWIM packets refused (bounds, an intro that is not the sender's).
    pub swim_rejected: u64,
    /// Records refused (bad signature, malformed, over a limit).
    pub records_rejected: u64,
    /// Records learned.
    pub records_learned: u64,
    /// Messages dropped because their sender is blacklisted.
    pub blacklisted_dropped: u64,
    /// Anti-entropy rounds started.
    pub syncs: u64,
    /// Messages other than SWIM dropped because their sender is not an active member.
    pub not_member: u64,
    /// Membership counters.
    pub swim: SwimStats,
}

/// A peer as the node reports it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    /// Address and generation.
    pub id: PeerId,
    /// Membership state.
    pub state: PeerState,
    /// Last message received from it directly (ms since the epoch; 0: never).
    pub last_seen_ms: u64,
    /// SWIM incarnation (bumped by the peer each time it refutes a suspicion).
    pub incarnation: u32,
}

/// Outputs collected since the last drain.
#[derive(Debug, Default)]
pub struct Outputs {
    /// Messages to send.
    pub send: Vec<(PeerId, Message)>,
    /// Events.
    pub events: Vec<Event>,
}

/// The mesh state machine of one node.
pub struct Core {
    identity: Arc<Identity>,
    own_record: SignedRecord,
    swim: Swim,
    records: Records,
    tuning: Tuning,
    out: Outputs,
    stats: CoreStats,
    rng: SmallRng,
    next_sync_ms: u64,
    /// The member the last anti-entropy round still found records with.
    catch_up: Option<KeyId>,
    cap_seq: u64,
    asked: HashMap<KeyId, u64>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("me", self.swim.me())
            .finish_non_exhaustive()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Buckets for anti-entropy digests over `n` entries: about `ENTRIES_PER_BUCKET` each.
fn bucket_count(n: usize) -> usize {
    (n / ENTRIES_PER_BUCKET).next_power_of_two().clamp(1, 256)
}

fn valid_buckets(n: usize) -> bool {
    (1..=256).contains(&n) && n.is_power_of_two()
}

/// The bucket count of a digest answer, if valid and every covered bucket is within it.
fn valid_cover(buckets: u16, covered: &[u8]) -> Option<usize> {
    let n = usize::from(buckets);
    (valid_buckets(n) && covered.iter().all(|b| usize::from(*b) < n)).then_some(n)
}

/// Buckets whose digests differ (both lists of the same length).
fn differing(ours: &[[u8; 8]], theirs: &[[u8; 8]]) -> Vec<u8> {
    ours.iter()
        .zip(theirs)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i as u8)
        .collect()
}

impl Core {
    /// A node that knows no one yet, whose process generation is `now_ms`. `trusted`
    /// reporters' blacklist records are enforced (this node's own always are).
    pub fn new(
        identity: Arc<Identity>,
        url: &str,
        tuning: Tuning,
        trusted: impl IntoIterator<Item = KeyId>,
        now_ms: u64,
        seed: u64,
    ) -> Self {
        let me = PeerRecord {
            node: identity.key_id(),
            generation: now_ms,
            url: url.to_string(),
        };
        let own_record = SignedRecord::sign(&identity, &Record::Peer(me.clone()));
        let mut records = Records::new(trusted.into_iter().chain([identity.key_id()]));
        records.accept(&own_record);
        let swim = Swim::new(
            PeerId::of(&me),
            own_record.clone(),
            tuning.clone(),
            now_ms,
            seed,
        );
        Core {
            identity,
            own_record,
            swim,
            records,
            next_sync_ms: now_ms + ms(tuning.sync_interval),
            tuning,
            out: Outputs::default(),
            stats: CoreStats::default(),
            rng: SmallRng::seed_from_u64(seed ^ 0x5eed),
            catch_up: None,
            cap_seq: 0,
            asked: HashMap::new(),
        }
    }

    /// This node's address and generation.
    pub fn me(&self) -> &PeerId {
        self.swim.me()
    }

    /// This node's signed identity (what `/identity` hands out for joining).
    pub fn own_record(&self) -> &SignedRecord {
        &self.own_record
    }

    /// Counters.
    pub fn stats(&self) -> CoreStats {
        CoreStats {
            swim: self.swim.stats(),
            ..self.stats
        }
    }

    /// Takes what accumulated since the last call.
    pub fn drain(&mut self) -> Outputs {
        std::mem::take(&mut self.out)
    }

    /// When [`Core::tick`] has work next (ms since the epoch); `u64::MAX`: nothing is due (a
    /// node alone never wakes).
    pub fn next_wakeup(&self) -> u64 {
        let mut t = self.swim.next_wakeup();
        if self.swim.active_count() > 0 {
            t = t.min(self.next_sync_ms);
        }
        t
    }

    /// Joins through a peer whose signed identity was learned out of band (its `/identity`).
    ///
    /// # Errors
    /// The record does not verify or is not an identity.
    pub fn join(&mut self, record: &SignedRecord, now_ms: u64) -> Result<(), WireError> {
        let Record::Peer(p) = record.open()? else {
            return Err(WireError::Invalid("not a peer identity"));
        };
        if p.node == self.identity.key_id() {
            return Ok(());
        }
        self.accept(record, now_ms);
        self.swim.learn(PeerId::of(&p), now_ms);
        // This node's identity spreads by gossip from here, not only to the members it
        // happens to contact.
        let me = self.swim.me().clone();
        self.swim.gossip_record(
            Item {
                hops: 0,
                record: self.own_record.clone(),
            },
            RecordKind::Peer,
            me.key,
            me.generation,
            now_ms,
        );
        self.swim.join(&p.node);
        // Catch up on identities and capabilities with the seed as soon as it has answered
        // (it takes digests from members only), rather than at the next round.
        self.catch_up = Some(p.node);
        self.next_sync_ms = self.next_sync_ms.min(now_ms + CATCH_UP_MS);
        self.pump(now_ms);
        Ok(())
    }

    /// Does whatever is due: probes, suspicion timeouts, gossip, anti-entropy.
    pub fn tick(&mut self, now_ms: u64) {
        self.swim.tick(now_ms);
        if now_ms >= self.next_sync_ms {
            self.next_sync_ms = now_ms + ms(self.tuning.sync_interval);
            self.records
                .prune_tombstones(now_ms, ms(self.tuning.forget_down_after));
            let partner = self
                .catch_up
                .take()
                .filter(|k| self.swim.active_member(k).is_some())
                .or_else(|| {
                    let active: Vec<KeyId> = self.swim.active().map(|p| p.key).collect();
                    (!active.is_empty()).then(|| active[self.rng.random_range(0..active.len())])
                });
            if let Some(k) = partner {
                self.sync_with(k);
            }
        }
        self.pump(now_ms);
    }

    fn sync_with(&mut self, key: KeyId) {
        let Some(to) = self.swim.member(&key).cloned() else {
            return;
        };
        let buckets = bucket_count(self.records.len());
        let digests = self.records.bucket_digests(buckets);
        let members = self
            .swim
            .member_digests(bucket_count(self.swim.members().count() + 1));
        self.stats.syncs += 1;
        self.out.send.push((
            to,
            Message::SyncHello {
                buckets: digests,
                members,
            },
        ));
    }

    /// Stores a record if it is news and tells the rest of the node; the record when new.
    fn accept(&mut self, sr: &SignedRecord, now_ms: u64) -> Option<Record> {
        match self.records.accept(sr) {
            Accepted::New(r) => {
                self.stats.records_learned += 1;
                // A blacklisted node stays out, even under a new generation.
                if let Record::Peer(p) = &r
                    && !self.records.is_listed(&p.node)
                {
                    self.swim.learn(PeerId::of(p), now_ms);
                }
                self.out.events.push(Event::Record(r.clone()));
                Some(r)
            }
            Accepted::Invalid(_) => {
                self.stats.records_rejected += 1;
                None
            }
            Accepted::Known | Accepted::OutOfOrder => None,
        }
    }

    /// A record that arrived by gossip: stored if new, and passed on one hop further.
    fn gossiped(&mut self, item: Item, now_ms: u64) {
        if let Some(r) = self.accept(&item.record, now_ms)
            && item.hops < MAX_HOPS
        {
            self.swim.gossip_record(
                Item {
                    hops: item.hops + 1,
                    record: item.record,
                },
                r.kind(),
                r.author(),
                r.seq(),
                now_ms,
            );
        }
    }

    /// Moves what membership produced into the outputs.
    fn pump(&mut self, now_ms: u64) {
        let (packets, events) = self.swim.drain();
        for (to, p) in packets {
            self.out.send.push((to, Message::Swim(p)));
        }
        let mut unknown: Vec<(KeyId, KeyId)> = Vec::new();
        for e in events {
            match e {
                SwimEvent::Up(p) => self.out.events.push(Event::PeerUp(p)),
                SwimEvent::Down(p) => self.out.events.push(Event::PeerDown(p)),
                SwimEvent::Refuted { dead } => self.out.events.push(Event::Refuted { dead }),
                SwimEvent::Forgotten(k, g) => self.records.forget(&k, g, now_ms),
                SwimEvent::Unknown { key, from } => unknown.push((from, key)),
            }
        }
        self.ask_identities(unknown, now_ms);
    }

    /// Asks, in one message per member, for identity records that members mentioned and this
    /// node lacks; each key at most once per `ASK_AGAIN_MS`.
    fn ask_identities(&mut self, mut unknown: Vec<(KeyId, KeyId)>, now_ms: u64) {
        if unknown.is_empty() {
            return;
        }
        if self.asked.len() >= 4_096 {
            self.asked.retain(|_, t| now_ms < *t + ASK_AGAIN_MS);
        }
        unknown.sort_by_key(|(from, key)| (*key, *from));
        unknown.dedup_by_key(|(_, key)| *key);
        let mut by_member: std::collections::BTreeMap<KeyId, Vec<(RecordKind, KeyId)>> =
            Default::default();
        for (from, key) in unknown {
            if self.asked.len() >= 4_096
                || self
                    .asked
                    .get(&key)
                    .is_some_and(|t| now_ms < t + ASK_AGAIN_MS)
            {
                continue;
            }
            self.asked.insert(key, now_ms);
            by_member
                .entry(from)
                .or_default()
                .push((RecordKind::Peer, key));
        }
        for (from, want) in by_member {
            if let Some(to) = self.swim.member(&from).cloned() {
                self.out.send.push((to, Message::SyncWant(want)));
            }
        }
    }

    /// A verified message from `from` (its envelope checked by the caller).
    pub fn handle_message(&mut self, from: KeyId, msg: Message, now_ms: u64) {
        if self.records.is_listed(&from) {
            self.stats.blacklisted_dropped += 1;
            return;
        }
        if let Message::Swim(p) = msg {
            if p.check().is_err() {
                self.stats.swim_rejected += 1;
                return;
            }
            if let Some(intro) = &p.intro {
                // An intro is the sender's own identity for this very generation.
                match intro.peek() {
                    Ok(Record::Peer(r)) if r.node == from && r.generation == p.generation => {
                        // Passed on like a gossiped record: a new node becomes known
                        // everywhere, not only to those it contacts.
                        self.gossiped(
                            Item {
                                hops: 0,
                                record: intro.clone(),
                            },
                            now_ms,
                        );
                        if let Some(r) = self.records.peer_of(&from) {
                            let peer = PeerId::of(r);
                            self.swim.learn(peer, now_ms);
                        }
                    }
                    _ => {
                        self.stats.swim_rejected += 1;
                        return;
                    }
                }
            }
            self.swim
                .handle(from, p.generation, p.probe, &p.updates, now_ms);
            // Records only from members (a stranger's packet was counted and dropped above).
            if self.swim.member(&from).is_some() {
                for item in p.records.into_iter().take(super::wire::MAX_ITEMS) {
                    self.gossiped(item, now_ms);
                }
            }
            self.pump(now_ms);
            return;
        }
        // Everything but SWIM (how a node joins) comes from active members only: no records,
        // digests or offers from strangers.
        let Some(peer) = self.swim.active_member(&from).cloned() else {
            self.stats.not_member += 1;
            return;
        };
        match msg {
            Message::Swim(_) => {}
            Message::SyncHello { buckets, members } => {
                if !valid_buckets(buckets.len()) || !valid_buckets(members.len()) {
                    self.stats.records_rejected += 1;
                    return;
                }
                let m = members.len();
                let covered = differing(&self.swim.member_digests(m), &members);
                if !covered.is_empty() {
                    let updates = self.swim.member_view(&covered, m);
                    self.out.send.push((
                        peer.clone(),
                        Message::SyncMembers {
                            buckets: m as u16,
                            covered,
                            updates,
                            reply: true,
                        },
                    ));
                }
                let n = buckets.len();
                let mut covered = Vec::new();
                let mut entries: Vec<DigestEntry> = Vec::new();
                for b in differing(&self.records.bucket_digests(n), &buckets) {
                    let e = self.records.bucket_entries(usize::from(b), n);
                    if !covered.is_empty()
                        && (entries.len() + e.len()) * DIGEST_ENTRY_BYTES > MAX_SYNC_BYTES
                    {
                        break;
                    }
                    covered.push(b);
                    entries.extend(e);
                }
                if !covered.is_empty() {
                    self.out.send.push((
                        peer,
                        Message::SyncDigest {
                            buckets: n as u16,
                            covered,
                            entries,
                        },
                    ));
                }
            }
            Message::SyncDigest {
                buckets,
                covered,
                entries,
            } => {
                let Some(n) = valid_cover(buckets, &covered) else {
                    self.stats.records_rejected += 1;
                    return;
                };
                let (send, want) = self.records.diff(&entries, &covered, n);
                let send = cap_records(send);
                if !send.is_empty() {
                    self.out.send.push((peer.clone(), Message::Records(send)));
                }
                if !want.is_empty() {
                    self.catch_up = Some(from);
                    self.next_sync_ms = self.next_sync_ms.min(now_ms + CATCH_UP_MS);
                    let mut want = want;
                    want.truncate(4_096);
                    self.out.send.push((peer, Message::SyncWant(want)));
                }
            }
            Message::SyncMembers {
                buckets,
                covered,
                updates,
                reply,
            } => {
                let Some(n) = valid_cover(buckets, &covered) else {
                    self.stats.records_rejected += 1;
                    return;
                };
                // Our view first (taken before merging theirs), so that each side gets the
                // other's.
                let ours = reply.then(|| self.swim.member_view(&covered, n));
                self.swim.merge(from, &updates, false, now_ms);
                if let Some(updates) = ours {
                    self.out.send.push((
                        peer,
                        Message::SyncMembers {
                            buckets,
                            covered,
                            updates,
                            reply: false,
                        },
                    ));
                }
            }
            Message::SyncWant(want) => {
                let records = cap_records(
                    want.iter()
                        .take(4_096)
                        .flat_map(|(k, a)| self.records.newer_than(*k, a, 0))
                        .collect(),
                );
                if records.is_empty() {
                    return;
                }
                // Members this node knows to be gone go along, so that the asker does not
                // take them for alive and probe each one to find out.
                let down = self.swim.down_updates(
                    want.iter()
                        .filter(|(k, _)| *k == RecordKind::Peer)
                        .map(|(_, a)| a),
                );
                self.out.send.push((peer, Message::Records(records)));
                self.swim.tell(from, down);
            }
            Message::Records(records) => {
                for r in records.iter().take(4_096) {
                    self.accept(r, now_ms);
                }
            }
            Message::Offer(offer) => self.out.events.push(Event::Offer { from, offer }),
        }
        self.pump(now_ms);
    }

    /// Publishes this node's capabilities (a new version replaces the old everywhere).
    pub fn publish_caps(&mut self, mut caps: CapRecord, now_ms: u64) {
        self.cap_seq = (self.cap_seq + 1).max(now_ms.saturating_mul(1000));
        caps.node = self.identity.key_id();
        caps.seq = self.cap_seq;
        caps.issued_ms = now_ms;
        self.publish(Record::Caps(caps), now_ms);
    }

    /// Signs, stores and gossips a record authored by this node.
    pub fn publish(&mut self, record: Record, now_ms: u64) {
        let signed = SignedRecord::sign(&self.identity, &record);
        if let Accepted::New(r) = self.records.accept(&signed) {
            self.out.events.push(Event::Record(r.clone()));
            self.swim.gossip_record(
                Item {
                    hops: 0,
                    record: signed,
                },
                r.kind(),
                r.author(),
                r.seq(),
                now_ms,
            );
        }
        self.pump(now_ms);
    }

    /// Stops talking to a member at once (it was blacklisted).
    pub fn evict(&mut self, key: &KeyId, now_ms: u64) {
        self.swim.evict(key, now_ms);
        self.pump(now_ms);
    }

    /// Leaves the mesh (shutdown): tells a few members this node is going.
    pub fn leave(&mut self, now_ms: u64) {
        self.swim.leave(now_ms);
        self.pump(now_ms);
    }

    /// Every member known, with its state.
    pub fn peers(&self) -> Vec<PeerView> {
        self.swim
            .members()
            .map(|m| PeerView {
                id: m.peer.clone(),
                state: match m.state {
                    MemberState::Alive => PeerState::Alive,
                    MemberState::Suspect => PeerState::Suspect,
                    MemberState::Dead | MemberState::Left => PeerState::Dead,
                },
                last_seen_ms: m.last_seen_ms,
                incarnation: m.incarnation,
            })
            .collect()
    }

    /// Whether `key` is a member in any state (dead ones until forgotten).
    pub fn knows(&self, key: &KeyId) -> bool {
        self.swim.member(key).is_some()
    }

    /// How many members are active.
    pub fn active_count(&self) -> usize {
        self.swim.active_count()
    }

    /// Active members (alive or suspect).
    pub fn active(&self) -> impl Iterator<Item = &PeerId> {
        self.swim.active()
    }

    /// Runs `f` over the record store.
    pub fn with_records<R>(&self, f: impl FnOnce(&Records) -> R) -> R {
        f(&self.records)
    }
}

/// Keeps records, in order, up to [`MAX_SYNC_BYTES`] (the rest follows next round).
fn cap_records(records: Vec<SignedRecord>) -> Vec<SignedRecord> {
    let mut bytes = 0;
    records
        .into_iter()
        .take_while(|r| {
            bytes += r.body.len() + 70;
            bytes <= MAX_SYNC_BYTES
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::wire::{Packet, Probe, Update};

    fn core(url: &str) -> (Arc<Identity>, Core) {
        let id = Arc::new(Identity::generate());
        let c = Core::new(id.clone(), url, Tuning::default(), [], 1_000, 1);
        (id, c)
    }

    fn packet(generation: u64, intro: Option<SignedRecord>, records: Vec<Item>) -> Message {
        Message::Swim(Packet {
            generation,
            probe: Probe::Ping { seq: 1 },
            intro,
            updates: vec![],
            records,
        })
    }

    #[test]
    fn an_intro_must_be_the_senders_own_identity_of_that_generation() {
        let (_, mut a) = core("http://10.0.0.1:4301");
        let (x_id, x) = core("http://10.0.0.2:4301");
        let (s_id, s) = core("http://10.0.0.3:4301");
        // The stranger passes off x's identity as its own: refused, x not learned.
        a.handle_message(
            s_id.key_id(),
            packet(1_000, Some(x.own_record().clone()), vec![]),
            2_000,
        );
        assert_eq!(a.stats().swim_rejected, 1);
        assert!(!a.knows(&x_id.key_id()));
        // Its own identity, but claiming another generation: refused too.
        a.handle_message(
            s_id.key_id(),
            packet(999, Some(s.own_record().clone()), vec![]),
            2_000,
        );
        assert_eq!(a.stats().swim_rejected, 2);
        // Its own, for this generation: learned, and the ping answered.
        a.handle_message(
            s_id.key_id(),
            packet(1_000, Some(s.own_record().clone()), vec![]),
            2_000,
        );
        assert!(a.knows(&s_id.key_id()));
        let out = a.drain();
        assert!(out.send.iter().any(|(to, m)| to.key == s_id.key_id()
            && matches!(m, Message::Swim(p) if p.probe == Probe::Ack { seq: 1 })));
        assert!(
            out.events
                .iter()
                .any(|e| matches!(e, Event::PeerUp(p) if p.key == s_id.key_id()))
        );
    }

    #[test]
    fn strangers_are_not_answered_and_their_records_not_taken() {
        let (_, mut a) = core("http://10.0.0.1:4301");
        let (s_id, s) = core("http://10.0.0.3:4301");
        let (_, x) = core("http://10.0.0.2:4301");
        let item = Item {
            hops: 0,
            record: x.own_record().clone(),
        };
        a.handle_message(s_id.key_id(), packet(1_000, None, vec![item]), 2_000);
        assert_eq!(a.stats().swim.unknown_sender, 1);
        assert_eq!(a.with_records(|r| r.len()), 1, "only its own identity");
        assert!(a.drain().send.is_empty());
        // Nor digests or offers.
        a.handle_message(
            s_id.key_id(),
            Message::SyncHello {
                buckets: vec![[0; 8]],
                members: vec![[0; 8]],
            },
            2_000,
        );
        assert_eq!(a.stats().not_member, 1);
        drop(s);
    }

    #[test]
    fn a_joining_node_pings_its_seed_and_then_catches_up_from_it() {
        let (a_id, mut a) = core("http://10.0.0.1:4301");
        let (_, mut seed) = core("http://10.0.0.9:4301");
        let others: Vec<(Arc<Identity>, Core)> = (2..6)
            .map(|i| core(&format!("http://10.0.0.{i}:4301")))
            .collect();
        for (_, o) in &others {
            seed.handle_message(
                o.me().key,
                packet(1_000, Some(o.own_record().clone()), vec![]),
                1_500,
            );
        }
        seed.drain();
        let seed_key = seed.me().key;
        a.join(&seed.own_record().clone(), 2_000).unwrap();
        // Deliver messages between the two until quiet (every other node is away).
        let mut now = 2_000;
        for _ in 0..40 {
            now += 100;
            a.tick(now);
            seed.tick(now);
            let from_a = a.drain().send;
            let from_seed = seed.drain().send;
            for (to, m) in from_a {
                if to.key == seed_key {
                    seed.handle_message(a_id.key_id(), m, now);
                }
            }
            for (to, m) in from_seed {
                if to.key == a_id.key_id() {
                    a.handle_message(seed_key, m, now);
                }
            }
        }
        for (id, _) in &others {
            assert!(
                a.knows(&id.key_id()),
                "learned by anti-entropy from the seed"
            );
        }
        assert!(seed.knows(&a_id.key_id()));
        assert_eq!(
            a.with_records(|r| r.entries()),
            seed.with_records(|r| r.entries())
        );
    }

    /// Passes messages between two cores (and only them) until neither has anything to send.
    fn exchange(a: &mut Core, b: &mut Core, now: u64) {
        let (ak, bk) = (a.me().key, b.me().key);
        for _ in 0..20 {
            let from_a = a.drain().send;
            let from_b = b.drain().send;
            if from_a.is_empty() && from_b.is_empty() {
                return;
            }
            for (to, m) in from_a {
                if to.key == bk {
                    b.handle_message(ak, m, now);
                }
            }
            for (to, m) in from_b {
                if to.key == ak {
                    a.handle_message(bk, m, now);
                }
            }
        }
    }

    fn state_of(c: &Core, key: &KeyId) -> (PeerState, u32) {
        let p = c.peers().into_iter().find(|p| p.id.key == *key).unwrap();
        (p.state, p.incarnation)
    }

    #[test]
    fn membership_anti_entropy_repairs_a_missed_death_and_a_missed_refutation() {
        let (_, mut a) = core("http://10.0.0.1:4301");
        let (_, mut b) = core("http://10.0.0.2:4301");
        let (x_id, x) = core("http://10.0.0.3:4301");
        let (y_id, y) = core("http://10.0.0.4:4301");
        for c in [&mut a, &mut b] {
            for o in [&x, &y] {
                c.handle_message(
                    o.me().key,
                    packet(1_000, Some(o.own_record().clone()), vec![]),
                    1_100,
                );
            }
        }
        let (ar, br) = (a.own_record().clone(), b.own_record().clone());
        let (ak, bk) = (a.me().key, b.me().key);
        a.handle_message(bk, packet(1_000, Some(br), vec![]), 1_100);
        b.handle_message(ak, packet(1_000, Some(ar), vec![]), 1_100);
        exchange(&mut a, &mut b, 1_100);
        a.drain();
        b.drain();
        let update = |key: KeyId, incarnation, state| Update {
            key,
            generation: 1_000,
            incarnation,
            state,
            accuser: None,
        };
        let gossip = |u: Vec<Update>| {
            Message::Swim(Packet {
                generation: 1_000,
                probe: Probe::Gossip,
                intro: None,
                updates: u,
                records: vec![],
            })
        };
        // a heard that x died, and that y died; b missed the first, and heard y refute.
        a.handle_message(
            y_id.key_id(),
            gossip(vec![
                update(x_id.key_id(), 0, MemberState::Dead),
                update(y_id.key_id(), 0, MemberState::Dead),
            ]),
            1_200,
        );
        b.handle_message(
            y_id.key_id(),
            gossip(vec![update(y_id.key_id(), 1, MemberState::Alive)]),
            1_200,
        );
        assert_eq!(state_of(&a, &x_id.key_id()).0, PeerState::Dead);
        assert_eq!(state_of(&b, &x_id.key_id()).0, PeerState::Alive);
        assert_eq!(state_of(&a, &y_id.key_id()).0, PeerState::Dead);
        a.drain();
        b.drain();
        let b_key = b.me().key;
        a.sync_with(b_key);
        exchange(&mut a, &mut b, 1_300);
        assert_eq!(
            state_of(&b, &x_id.key_id()),
            (PeerState::Dead, 0),
            "b learns the death"
        );
        assert_eq!(
            state_of(&a, &y_id.key_id()),
            (PeerState::Alive, 1),
            "a the refutation"
        );
        assert_eq!(
            a.swim.member_digests(4),
            b.swim.member_digests(4),
            "and the views agree"
        );
    }
}

//! The mesh state machine, free of I/O: SWIM membership (foca), record dissemination
//! (piggybacked on SWIM packets, bounded hops) and anti-entropy.
//!
//! Every input carries the current time; every output (messages to send, timers to arm, events
//! for the rest of the node) is collected and drained by the caller. The node drives one `Core`
//! from a tokio task over HTTP; the simulation drives thousands over an in-memory network with a
//! virtual clock. Both run exactly this code.

use std::collections::HashMap;
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use foca::{BroadcastHandler, Foca, Invalidates, Member, OwnedNotification, PostcardCodec, Timer};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};

use super::records::{Accepted, Records};
use super::wire::{CapRecord, Message, Offer, PeerId, Record, RecordKind, SignedRecord};
use crate::identity::{Identity, KeyId};

/// Most hops a record travels from its author through piggybacked gossip (anti-entropy repairs
/// anything it did not reach).
pub const MAX_HOPS: u8 = 12;

/// Most record bytes sent in one anti-entropy answer (envelopes are capped at 64 KiB by default).
pub const MAX_SYNC_BYTES: usize = 32 * 1024;

/// While a node knows no active member it re-announces itself to its seeds this often.
pub const JOIN_RETRY: Duration = Duration::from_secs(2);

/// Protocol timings and sizes.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// SWIM probe period.
    pub probe_period: Duration,
    /// Wait for a direct ack before indirect probes.
    pub probe_rtt: Duration,
    /// Members asked to probe indirectly.
    pub indirect_probes: usize,
    /// How long a suspect has to refute before it is declared down.
    pub suspect_timeout: Duration,
    /// Times each update is piggybacked by each node.
    pub max_transmissions: u8,
    /// Periodic gossip of pending updates: period and fanout.
    pub gossip_period: Duration,
    /// Fanout of periodic gossip.
    pub gossip_fanout: usize,
    /// Periodic membership sync (foca announce) with one member.
    pub announce_period: Duration,
    /// Record anti-entropy with one member.
    pub sync_interval: Duration,
    /// Largest SWIM packet.
    pub max_packet: usize,
    /// Down members are forgotten after this long.
    pub forget_down_after: Duration,
}

impl Tuning {
    /// Defaults for a cluster of about `n` nodes on a LAN (memberlist's rules: suspicion and
    /// retransmissions grow with log10(n)).
    pub fn for_cluster(n: usize) -> Self {
        let log = (n.max(10) as f64).log10();
        Tuning {
            probe_period: Duration::from_secs(1),
            probe_rtt: Duration::from_millis(400),
            indirect_probes: 8,
            suspect_timeout: Duration::from_secs_f64(2.5 * log),
            max_transmissions: (4.0 * (log + 1.0)).ceil().min(255.0) as u8,
            gossip_period: Duration::from_millis(200),
            gossip_fanout: 3,
            announce_period: Duration::from_secs(10),
            sync_interval: Duration::from_secs(10),
            max_packet: 4096,
            forget_down_after: Duration::from_secs(24 * 3600),
        }
    }

    fn foca(&self) -> foca::Config {
        let mut c = foca::Config::simple();
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.num_indirect_probes =
            NonZeroUsize::new(self.indirect_probes.max(1)).unwrap_or(NonZeroUsize::MIN);
        c.max_transmissions =
            NonZeroU8::new(self.max_transmissions.max(1)).unwrap_or(NonZeroU8::MIN);
        c.suspect_to_down_after = self.suspect_timeout;
        c.remove_down_after = Some(self.forget_down_after);
        c.max_packet_size =
            NonZeroUsize::new(self.max_packet.max(512)).unwrap_or(NonZeroUsize::MIN);
        // Off: with it, a node that merely looked inactive to one peer (a conflicting or
        // unknown identity) was told it was down and rejoined; in the simulation at 5 % loss
        // that caused every false death seen. A node declared down still learns it from the
        // gossiped Down update and rejoins.
        c.notify_down_members = false;
        c.periodic_announce = Some(foca::PeriodicParams {
            frequency: self.announce_period,
            num_members: NonZeroUsize::MIN,
        });
        c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: self.announce_period,
            num_members: NonZeroUsize::MIN,
        });
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.gossip_period,
            num_members: NonZeroUsize::new(self.gossip_fanout.max(1)).unwrap_or(NonZeroUsize::MIN),
        });
        c
    }
}

/// A peer's membership state as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// Answering.
    Alive,
    /// Failed a probe; it has `suspect_timeout` to refute.
    Suspect,
    /// Declared dead (or left).
    Dead,
}

/// What the rest of the node hears from the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A peer joined or came back.
    PeerUp(PeerId),
    /// A peer was declared dead or left.
    PeerDown(PeerId),
    /// A record was learned (new capabilities, a blacklist entry).
    Record(Record),
    /// A task offer arrived.
    Offer {
        /// From.
        from: KeyId,
        /// The offer.
        offer: Offer,
    },
    /// This node was declared dead by the cluster and rejoined under a new generation.
    Rejoined,
}

/// Counters of what the core refused or did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CoreStats {
    /// SWIM packets foca could not decode or that carried bad identities.
    pub swim_rejected: u64,
    /// Records refused (bad signature, malformed).
    pub records_rejected: u64,
    /// Records learned.
    pub records_learned: u64,
    /// Messages dropped because their sender is blacklisted.
    pub blacklisted_dropped: u64,
    /// Anti-entropy rounds started.
    pub syncs: u64,
    /// Messages other than SWIM dropped because their sender is not an active member.
    pub not_member: u64,
}

/// A broadcast item's identity for foca's backlog: a newer version of the same record replaces
/// an older one still waiting to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemKey {
    kind: RecordKind,
    author: KeyId,
    seq: u64,
}

impl Invalidates for ItemKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.author == other.author
            && match self.kind {
                RecordKind::Caps => self.seq >= other.seq,
                RecordKind::Blacklist => self.seq == other.seq,
            }
    }
}

/// One gossiped item: a signed record and the hops it has travelled.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Item {
    hops: u8,
    record: SignedRecord,
}

/// Records shared between the core and foca's broadcast handler.
#[derive(Debug, Default)]
struct Shared {
    records: Records,
    /// Items learned from peers, to gossip on with one more hop.
    forward: Vec<Item>,
    learned: Vec<Record>,
    rejected: u64,
}

/// The broadcast handler never fails (bad items are counted and skipped).
#[derive(Debug, thiserror::Error)]
#[error("never returned")]
pub struct NoError;

struct Handler(Arc<Mutex<Shared>>);

impl BroadcastHandler<PeerId> for Handler {
    type Key = ItemKey;
    type Error = NoError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&PeerId>,
    ) -> Result<Option<ItemKey>, NoError> {
        // Never an error: a bad item must not make foca drop the SWIM packet it rode on.
        let Ok(item) = postcard::from_bytes::<Item>(data) else {
            lock(&self.0).rejected += 1;
            return Ok(None);
        };
        let key = |r: &Record| ItemKey {
            kind: r.kind(),
            author: r.author(),
            seq: r.seq(),
        };
        let mut s = lock(&self.0);
        if sender.is_none() {
            // Our own `add_broadcast`: the caller has stored it already.
            return Ok(item.record.open().ok().map(|r| key(&r)));
        }
        match s.records.accept(&item.record) {
            Accepted::New(r) => {
                if item.hops < MAX_HOPS {
                    s.forward.push(Item {
                        hops: item.hops + 1,
                        record: item.record,
                    });
                }
                s.learned.push(r);
            }
            Accepted::Invalid(_) => s.rejected += 1,
            Accepted::Known | Accepted::OutOfOrder => {}
        }
        Ok(None)
    }
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What foca asked for while handling one input.
#[derive(Default)]
struct Rt {
    send: Vec<(PeerId, Vec<u8>)>,
    timers: Vec<(Timer<PeerId>, Duration)>,
    notes: Vec<OwnedNotification<PeerId>>,
}

impl foca::Runtime<PeerId> for Rt {
    fn notify(&mut self, n: foca::Notification<'_, PeerId>) {
        self.notes.push(n.to_owned());
    }

    fn send_to(&mut self, to: PeerId, data: &[u8]) {
        self.send.push((to, data.to_vec()));
    }

    fn submit_after(&mut self, event: Timer<PeerId>, after: Duration) {
        self.timers.push((event, after));
    }
}

/// A peer as the node reports it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    /// Identity.
    pub id: PeerId,
    /// Membership state.
    pub state: PeerState,
    /// Last message received from it directly (ms since the epoch; 0: never).
    pub last_seen_ms: u64,
    /// SWIM incarnation (bumped by the peer each time it refutes a suspicion).
    pub incarnation: u16,
}

/// Outputs collected since the last drain.
#[derive(Debug, Default)]
pub struct Outputs {
    /// Messages to send.
    pub send: Vec<(PeerId, Message)>,
    /// Timers to arm: deliver `Timer` back through [`Core::handle_timer`] after the delay.
    pub timers: Vec<(Timer<PeerId>, Duration)>,
    /// Events.
    pub events: Vec<Event>,
}

/// The mesh state machine of one node.
pub struct Core {
    identity: Arc<Identity>,
    url: String,
    foca: Foca<PeerId, PostcardCodec, SmallRng, Handler>,
    shared: Arc<Mutex<Shared>>,
    tuning: Tuning,
    last_seen: HashMap<KeyId, u64>,
    out: Outputs,
    stats: CoreStats,
    rng: SmallRng,
    next_sync_ms: u64,
    cap_seq: u64,
    /// Peers joined through: re-announced to while this node knows no active member (a lost
    /// join, a restart of the whole mesh).
    seeds: Vec<PeerId>,
    next_retry_ms: u64,
    told_down: HashMap<KeyId, u64>,
    last_rejoin_ms: u64,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("me", self.foca.identity())
            .finish_non_exhaustive()
    }
}

impl Core {
    /// A node that knows no one yet. `trusted` reporters' blacklist records are enforced (this
    /// node's own always are).
    pub fn new(
        identity: Arc<Identity>,
        url: &str,
        tuning: Tuning,
        trusted: impl IntoIterator<Item = KeyId>,
        now_ms: u64,
        seed: u64,
    ) -> Self {
        let me = PeerId::new(&identity, url, now_ms);
        let shared = Arc::new(Mutex::new(Shared {
            records: Records::new(trusted.into_iter().chain([identity.key_id()])),
            ..Default::default()
        }));
        let foca = Foca::with_custom_broadcast(
            me,
            tuning.foca(),
            SmallRng::seed_from_u64(seed),
            PostcardCodec,
            Handler(shared.clone()),
        );
        Core {
            identity,
            url: url.to_string(),
            foca,
            shared,
            next_sync_ms: now_ms + tuning.sync_interval.as_millis() as u64,
            tuning,
            last_seen: HashMap::new(),
            out: Outputs::default(),
            stats: CoreStats::default(),
            rng: SmallRng::seed_from_u64(seed ^ 0x5eed),
            cap_seq: 0,
            seeds: Vec::new(),
            next_retry_ms: 0,
            told_down: HashMap::new(),
            last_rejoin_ms: 0,
        }
    }

    /// This node's current identity.
    pub fn me(&self) -> &PeerId {
        self.foca.identity()
    }

    /// Counters.
    pub fn stats(&self) -> CoreStats {
        let mut s = self.stats;
        s.records_rejected += lock(&self.shared).rejected;
        s
    }

    /// Takes what accumulated since the last call.
    pub fn drain(&mut self) -> Outputs {
        std::mem::take(&mut self.out)
    }

    fn absorb(&mut self, rt: Rt) {
        for (to, data) in rt.send {
            self.out.send.push((to, Message::Swim(data)));
        }
        self.out.timers.extend(rt.timers);
        for n in rt.notes {
            match n {
                OwnedNotification::MemberUp(p) => self.out.events.push(Event::PeerUp(p)),
                OwnedNotification::MemberDown(p) => self.out.events.push(Event::PeerDown(p)),
                OwnedNotification::Rename(old, new) => {
                    self.out.events.push(Event::PeerDown(old));
                    self.out.events.push(Event::PeerUp(new));
                }
                OwnedNotification::Defunct => self.rejoin(),
                _ => {}
            }
        }
        // Records learned from piggybacked items: report, and gossip on with one more hop.
        let (forward, learned) = {
            let mut s = lock(&self.shared);
            (
                std::mem::take(&mut s.forward),
                std::mem::take(&mut s.learned),
            )
        };
        self.stats.records_learned += learned.len() as u64;
        self.out
            .events
            .extend(learned.into_iter().map(Event::Record));
        for item in forward {
            self.queue_item(&item);
        }
    }

    fn queue_item(&mut self, item: &Item) {
        if let Ok(bytes) = postcard::to_allocvec(item) {
            let _ = self.foca.add_broadcast(&bytes);
        }
    }

    /// The cluster declared this identity dead (a partition, a long pause): come back under a
    /// newer generation, which wins over the old one everywhere.
    fn rejoin(&mut self) {
        let old = self.foca.identity().clone();
        let generation = old.generation + 1;
        let new = PeerId::new(&self.identity, &self.url, generation);
        let members: Vec<PeerId> = self.foca.iter_members().map(|m| m.id().clone()).collect();
        let mut rt = Rt::default();
        if self.foca.change_identity(new, &mut rt).is_ok() {
            for m in members.into_iter().take(3) {
                let _ = self.foca.announce(m, &mut rt);
            }
            self.out.events.push(Event::Rejoined);
        }
        // `absorb` would recurse into `rejoin` on a second Defunct; take the sends directly.
        for (to, data) in rt.send {
            self.out.send.push((to, Message::Swim(data)));
        }
        self.out.timers.extend(rt.timers);
    }

    /// Joins through a peer whose identity was learned out of band (its `/identity`).
    pub fn join(&mut self, peer: PeerId) {
        if peer.key == self.me().key {
            return;
        }
        self.seeds.retain(|s| s.key != peer.key);
        self.seeds.push(peer.clone());
        let mut rt = Rt::default();
        let _ = self.foca.announce(peer, &mut rt);
        self.absorb(rt);
    }

    /// A timer armed earlier fired.
    pub fn handle_timer(&mut self, timer: Timer<PeerId>) {
        let mut rt = Rt::default();
        let _ = self.foca.handle_timer(timer, &mut rt);
        self.absorb(rt);
    }

    /// Periodic work foca does not drive: record anti-entropy. Call at least once a second.
    pub fn tick(&mut self, now_ms: u64) {
        if now_ms >= self.next_retry_ms {
            self.next_retry_ms = now_ms + JOIN_RETRY.as_millis() as u64;
            if self.foca.num_members() == 0 && !self.seeds.is_empty() {
                let mut rt = Rt::default();
                for s in &self.seeds {
                    let _ = self.foca.announce(s.clone(), &mut rt);
                }
                self.absorb(rt);
            }
        }
        if now_ms < self.next_sync_ms {
            return;
        }
        self.next_sync_ms = now_ms + self.tuning.sync_interval.as_millis() as u64;
        let members: Vec<PeerId> = self.foca.iter_members().map(|m| m.id().clone()).collect();
        if members.is_empty() {
            return;
        }
        let i = rand::RngExt::random_range(&mut self.rng, 0..members.len());
        let (digest, count) = lock(&self.shared).records.digest();
        self.stats.syncs += 1;
        self.out
            .send
            .push((members[i].clone(), Message::SyncHello { digest, count }));
    }

    /// A verified message from `from` (its envelope checked by the caller).
    pub fn handle_message(&mut self, from: KeyId, msg: Message, now_ms: u64) {
        if lock(&self.shared).records.is_listed(&from) {
            self.stats.blacklisted_dropped += 1;
            return;
        }
        // Everything but SWIM (how a node joins) and the notice that it is dead comes from
        // active members only: no records, digests or offers from strangers.
        let member = self.member(&from).is_some();
        if !member && !matches!(msg, Message::Swim(_) | Message::YouAreDown { .. }) {
            self.stats.not_member += 1;
            return;
        }
        if self.last_seen.len() > 4 * self.foca.num_members() + 64 {
            let keys: std::collections::HashSet<KeyId> = self
                .foca
                .iter_membership_state()
                .map(|m| m.id().key)
                .collect();
            self.last_seen.retain(|k, _| keys.contains(k));
        }
        self.last_seen.insert(from, now_ms);
        match msg {
            Message::Swim(data) => {
                // The packet's source identity must be the envelope's signer: nobody speaks
                // (acks, refutes, gossips as the source) for another member.
                match postcard::take_from_bytes::<PeerId>(&data) {
                    Ok((src, _)) if src.key == from => {}
                    _ => {
                        self.stats.swim_rejected += 1;
                        return;
                    }
                }
                self.tell_if_down(from, now_ms);
                let mut rt = Rt::default();
                if self.foca.handle_data(&data, &mut rt).is_err() {
                    self.stats.swim_rejected += 1;
                }
                self.absorb(rt);
            }
            Message::SyncHello { digest, count } => {
                let (ours, n) = lock(&self.shared).records.digest();
                if (ours, n) != (digest, count)
                    && let Some(p) = self.member(&from)
                {
                    let entries = lock(&self.shared).records.entries();
                    self.out.send.push((p, Message::SyncDigest(entries)));
                }
            }
            Message::SyncDigest(theirs) => {
                let (send, want) = lock(&self.shared).records.diff(&theirs);
                if let Some(p) = self.member(&from) {
                    if !send.is_empty() {
                        self.out.send.push((p.clone(), Message::Records(send)));
                    }
                    if !want.is_empty() {
                        self.out.send.push((p, Message::SyncWant(want)));
                    }
                }
            }
            Message::SyncWant(want) => {
                let records: Vec<SignedRecord> = {
                    let s = lock(&self.shared);
                    let mut bytes = 0;
                    want.iter()
                        .take(4096)
                        .flat_map(|(k, a)| s.records.newer_than(*k, a, 0))
                        // Stay well inside the receiver's envelope limit; the rest follows in
                        // the next anti-entropy round.
                        .take_while(|r| {
                            bytes += r.body.len() + 70;
                            bytes <= MAX_SYNC_BYTES
                        })
                        .collect()
                };
                if !records.is_empty()
                    && let Some(p) = self.member(&from)
                {
                    self.out.send.push((p, Message::Records(records)));
                }
            }
            Message::Records(records) => {
                for r in records.iter().take(4096) {
                    let accepted = lock(&self.shared).records.accept(r);
                    match accepted {
                        Accepted::New(rec) => {
                            self.stats.records_learned += 1;
                            self.out.events.push(Event::Record(rec));
                        }
                        Accepted::Invalid(_) => self.stats.records_rejected += 1,
                        Accepted::Known | Accepted::OutOfOrder => {}
                    }
                }
            }
            Message::Offer(offer) => self.out.events.push(Event::Offer { from, offer }),
            Message::YouAreDown { generation } => {
                // At most one rejoin per suspicion timeout, whoever asks.
                let quiet =
                    now_ms >= self.last_rejoin_ms + self.tuning.suspect_timeout.as_millis() as u64;
                if generation == self.me().generation && quiet {
                    self.last_rejoin_ms = now_ms;
                    self.rejoin();
                    // Announce the new identity to the teller too: it may be on the other
                    // side of a healed partition, which this node holds as dead.
                    let teller = self
                        .foca
                        .iter_membership_state()
                        .find(|m| m.id().key == from)
                        .map(|m| m.id().clone());
                    if let Some(t) = teller {
                        let mut rt = Rt::default();
                        let _ = self.foca.announce(t, &mut rt);
                        self.absorb(rt);
                    }
                }
            }
        }
    }

    /// A member this node holds as dead is still talking (a healed partition, a node that
    /// missed its own death): tell it, at most once per `probe_period`, so that it rejoins
    /// under a newer generation.
    fn tell_if_down(&mut self, from: KeyId, now_ms: u64) {
        let down = self
            .foca
            .iter_membership_state()
            .find(|m| m.id().key == from && m.state() == foca::State::Down)
            .map(|m| m.id().clone());
        let Some(peer) = down else { return };
        let last = self.told_down.get(&from).copied().unwrap_or(0);
        if now_ms < last + self.tuning.probe_period.as_millis() as u64 {
            return;
        }
        if self.told_down.len() > 4096 {
            self.told_down.clear();
        }
        self.told_down.insert(from, now_ms);
        self.out.send.push((
            peer.clone(),
            Message::YouAreDown {
                generation: peer.generation,
            },
        ));
    }

    fn member(&self, key: &KeyId) -> Option<PeerId> {
        self.foca
            .iter_members()
            .find(|m| m.id().key == *key)
            .map(|m| m.id().clone())
    }

    /// Publishes this node's capabilities (a new version replaces the old everywhere).
    pub fn publish_caps(&mut self, mut caps: CapRecord, now_ms: u64) {
        self.cap_seq = (self.cap_seq + 1).max(now_ms.saturating_mul(1000));
        caps.node = self.identity.key_id();
        caps.seq = self.cap_seq;
        caps.issued_ms = now_ms;
        self.publish(Record::Caps(caps));
    }

    /// Signs, stores and gossips a record authored by this node.
    pub fn publish(&mut self, record: Record) {
        let signed = SignedRecord::sign(&self.identity, &record);
        if matches!(lock(&self.shared).records.accept(&signed), Accepted::New(_)) {
            self.out.events.push(Event::Record(record));
            self.queue_item(&Item {
                hops: 0,
                record: signed,
            });
        }
    }

    /// Declares a member down at once (it was blacklisted): stops probing and gossiping it.
    pub fn evict(&mut self, key: &KeyId) {
        if let Some(p) = self.member(key) {
            let mut rt = Rt::default();
            let _ = self
                .foca
                .apply_many(std::iter::once(Member::down(p)), true, &mut rt);
            self.absorb(rt);
        }
    }

    /// Leaves the cluster (shutdown): tells a few members this identity is down.
    pub fn leave(&mut self) {
        let mut rt = Rt::default();
        let _ = self.foca.leave_cluster(&mut rt);
        for (to, data) in rt.send {
            self.out.send.push((to, Message::Swim(data)));
        }
    }

    /// Every member known, with its state.
    pub fn peers(&self) -> Vec<PeerView> {
        self.foca
            .iter_membership_state()
            .map(|m| PeerView {
                id: m.id().clone(),
                state: match m.state() {
                    foca::State::Alive => PeerState::Alive,
                    foca::State::Suspect => PeerState::Suspect,
                    foca::State::Down => PeerState::Dead,
                },
                last_seen_ms: self.last_seen.get(&m.id().key).copied().unwrap_or(0),
                incarnation: m.incarnation(),
            })
            .collect()
    }

    /// Whether `key` is a member in any state (dead ones until forgotten).
    pub fn knows(&self, key: &KeyId) -> bool {
        self.foca
            .iter_membership_state()
            .any(|m| m.id().key == *key)
    }

    /// Active members (alive or suspect).
    pub fn active(&self) -> impl Iterator<Item = &PeerId> {
        self.foca.iter_members().map(|m| m.id())
    }

    /// Runs `f` over the record store.
    pub fn with_records<R>(&self, f: impl FnOnce(&Records) -> R) -> R {
        f(&lock(&self.shared).records)
    }
}

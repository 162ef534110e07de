//! Signed records every node keeps a copy of: membership identities and capability
//! announcements (latest per node), and blacklist chains (every record, per reporter), with the
//! bucketed digests anti-entropy compares.

use std::collections::{BTreeMap, HashMap, HashSet};

use sha2::{Digest, Sha256};

use super::wire::{
    BlacklistRecord, CapRecord, DigestEntry, PeerRecord, Record, RecordKind, SignedRecord,
    WireError,
};
use crate::identity::KeyId;

/// Most nodes whose identity and capability records are kept: beyond it, records of new nodes
/// are refused (keys are free to make; memory is not).
pub const MAX_NODES: usize = 16_384;

/// Most records in one reporter's blacklist chain.
pub const MAX_CHAIN: u64 = 1_024;

/// Most blacklist records kept from reporters this node does not trust (they are kept only to
/// relay them, so a stranger cannot make every node hold an unbounded chain).
pub const MAX_UNTRUSTED_LISTINGS: usize = 8_192;

/// Most forgotten identities remembered, so that a copy of a forgotten record still travelling
/// through anti-entropy is not learned again.
const MAX_TOMBSTONES: usize = 16_384;

/// What happened to a record offered to the store.
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted {
    /// New information, stored.
    New(Record),
    /// Already held, or older than what is held, or of a node forgotten on purpose.
    Known,
    /// A blacklist record that does not follow the reporter's chain as held (a gap or a fork);
    /// anti-entropy fetches the chain in order.
    OutOfOrder,
    /// Refused.
    Invalid(WireError),
}

/// The record store.
#[derive(Debug, Default)]
pub struct Records {
    peers: HashMap<KeyId, (SignedRecord, PeerRecord)>,
    caps: HashMap<KeyId, (SignedRecord, CapRecord)>,
    chains: HashMap<KeyId, Vec<(SignedRecord, BlacklistRecord)>>,
    untrusted_listings: usize,
    /// Reporters whose blacklist records are enforced (this node and configured keys).
    trusted: HashSet<KeyId>,
    /// Nodes blacklisted by a trusted reporter.
    listed: HashSet<KeyId>,
    /// Forgotten nodes: the newest generation forgotten, and when (ms).
    tombstones: HashMap<KeyId, (u64, u64)>,
    /// Bucket digests by bucket count, cleared on every change.
    digests: BTreeMap<usize, Vec<[u8; 8]>>,
}

/// The bucket of an author's records among `buckets` (a power of two up to 256).
pub fn bucket_of(author: &KeyId, buckets: usize) -> usize {
    usize::from(author.0[0]) >> (8 - buckets.clamp(1, 256).trailing_zeros())
}

impl Records {
    /// A store enforcing blacklist records from `trusted` reporters.
    pub fn new(trusted: impl IntoIterator<Item = KeyId>) -> Self {
        Records {
            trusted: trusted.into_iter().collect(),
            ..Default::default()
        }
    }

    /// Verifies and stores a record if it is new.
    ///
    /// A record that is not news (an older or equal version, a chain position already held) is
    /// answered `Known` without checking its signature: gossip delivers every record many
    /// times, and only a record that would be stored needs the (costly) verification.
    pub fn accept(&mut self, sr: &SignedRecord) -> Accepted {
        let record = match sr.peek() {
            Ok(r) => r,
            Err(e) => return Accepted::Invalid(e),
        };
        let author = record.author();
        let new_node = !self.peers.contains_key(&author) && !self.caps.contains_key(&author);
        match &record {
            Record::Peer(p) => {
                if self
                    .peers
                    .get(&p.node)
                    .is_some_and(|(_, old)| old.generation >= p.generation)
                    || self
                        .tombstones
                        .get(&p.node)
                        .is_some_and(|(g, _)| *g >= p.generation)
                {
                    return Accepted::Known;
                }
                if new_node && self.nodes() >= MAX_NODES {
                    return Accepted::Invalid(WireError::Invalid("too many nodes"));
                }
                if let Err(e) = sr.verify(&record) {
                    return Accepted::Invalid(e);
                }
                self.peers.insert(p.node, (sr.clone(), p.clone()));
            }
            Record::Caps(c) => {
                if self
                    .caps
                    .get(&c.node)
                    .is_some_and(|(_, old)| old.seq >= c.seq)
                    || self.tombstones.contains_key(&c.node) && !self.peers.contains_key(&c.node)
                {
                    return Accepted::Known;
                }
                if new_node && self.nodes() >= MAX_NODES {
                    return Accepted::Invalid(WireError::Invalid("too many nodes"));
                }
                if let Err(e) = sr.verify(&record) {
                    return Accepted::Invalid(e);
                }
                self.caps.insert(c.node, (sr.clone(), c.clone()));
            }
            Record::Blacklist(b) => {
                let head = self.chains.get(&b.reporter).map_or(0, |c| c.len() as u64);
                if b.seq <= head {
                    return Accepted::Known;
                }
                let prev = self
                    .chains
                    .get(&b.reporter)
                    .and_then(|c| c.last())
                    .map_or([0u8; 32], |(s, _)| s.body_hash());
                if b.seq != head + 1 || b.prev != prev {
                    return Accepted::OutOfOrder;
                }
                let trusted = self.trusted.contains(&b.reporter);
                if b.seq > MAX_CHAIN
                    || (!trusted && self.untrusted_listings >= MAX_UNTRUSTED_LISTINGS)
                {
                    return Accepted::Invalid(WireError::Invalid("blacklist chain limit reached"));
                }
                if let Err(e) = sr.verify(&record) {
                    return Accepted::Invalid(e);
                }
                self.chains
                    .entry(b.reporter)
                    .or_default()
                    .push((sr.clone(), b.clone()));
                if trusted {
                    self.listed.insert(b.target);
                } else {
                    self.untrusted_listings += 1;
                }
            }
        }
        self.digests.clear();
        Accepted::New(record)
    }

    fn nodes(&self) -> usize {
        self.peers.len().max(self.caps.len())
    }

    /// Whether `key` is blacklisted by a trusted reporter.
    pub fn is_listed(&self, key: &KeyId) -> bool {
        self.listed.contains(key)
    }

    /// Blacklisted nodes.
    pub fn listed(&self) -> impl Iterator<Item = &KeyId> {
        self.listed.iter()
    }

    /// A node's identity record.
    pub fn peer_of(&self, key: &KeyId) -> Option<&PeerRecord> {
        self.peers.get(key).map(|(_, p)| p)
    }

    /// A node's identity record as signed.
    pub fn signed_peer_of(&self, key: &KeyId) -> Option<&SignedRecord> {
        self.peers.get(key).map(|(s, _)| s)
    }

    /// The latest capability record of every node.
    pub fn caps(&self) -> impl Iterator<Item = &CapRecord> {
        self.caps.values().map(|(_, c)| c)
    }

    /// One node's capabilities.
    pub fn caps_of(&self, key: &KeyId) -> Option<&CapRecord> {
        self.caps.get(key).map(|(_, c)| c)
    }

    /// Every blacklist record, chain by chain.
    pub fn blacklist(&self) -> impl Iterator<Item = &BlacklistRecord> {
        self.chains.values().flat_map(|c| c.iter().map(|(_, b)| b))
    }

    /// The last record of `reporter`'s chain: (seq, body hash).
    pub fn chain_head(&self, reporter: &KeyId) -> (u64, [u8; 32]) {
        self.chains
            .get(reporter)
            .and_then(|c| c.last())
            .map_or((0, [0u8; 32]), |(s, b)| (b.seq, s.body_hash()))
    }

    /// Forgets a node that has been dead or gone for long: its identity up to `generation`
    /// and its capabilities. Copies of those records still travelling are not learned again;
    /// a newer generation (the node came back) is. Blacklist chains are kept: they are
    /// evidence.
    pub fn forget(&mut self, key: &KeyId, generation: u64, now_ms: u64) {
        if self
            .peers
            .get(key)
            .is_some_and(|(_, p)| p.generation <= generation)
        {
            self.peers.remove(key);
        }
        if !self.peers.contains_key(key) {
            self.caps.remove(key);
        }
        if self.tombstones.len() >= MAX_TOMBSTONES
            && let Some(oldest) = self
                .tombstones
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| *k)
        {
            self.tombstones.remove(&oldest);
        }
        self.tombstones.insert(*key, (generation, now_ms));
        self.digests.clear();
    }

    /// Drops tombstones older than `keep` (by then every node has forgotten the same records).
    pub fn prune_tombstones(&mut self, now_ms: u64, keep_ms: u64) {
        self.tombstones
            .retain(|_, (_, at)| at.saturating_add(keep_ms) > now_ms);
    }

    fn latest(&self) -> impl Iterator<Item = DigestEntry> + '_ {
        let peers = self.peers.values().map(|(_, p)| DigestEntry {
            kind: RecordKind::Peer,
            author: p.node,
            seq: p.generation,
        });
        let caps = self.caps.values().map(|(_, c)| DigestEntry {
            kind: RecordKind::Caps,
            author: c.node,
            seq: c.seq,
        });
        let chains = self.chains.iter().filter_map(|(k, c)| {
            Some(DigestEntry {
                kind: RecordKind::Blacklist,
                author: *k,
                seq: c.last()?.1.seq,
            })
        });
        peers.chain(caps).chain(chains)
    }

    /// (kind, author, seq) of everything held, sorted.
    pub fn entries(&self) -> Vec<DigestEntry> {
        let mut v: Vec<DigestEntry> = self.latest().collect();
        v.sort();
        v
    }

    /// How many (kind, author) entries the store holds.
    pub fn len(&self) -> usize {
        self.peers.len() + self.caps.len() + self.chains.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries of one bucket, sorted.
    pub fn bucket_entries(&self, bucket: usize, buckets: usize) -> Vec<DigestEntry> {
        let mut v: Vec<DigestEntry> = self
            .latest()
            .filter(|e| bucket_of(&e.author, buckets) == bucket)
            .collect();
        v.sort();
        v
    }

    /// A short hash of each bucket's entries; equal digests mean equal buckets.
    pub fn bucket_digests(&mut self, buckets: usize) -> Vec<[u8; 8]> {
        let buckets = buckets.clamp(1, 256).next_power_of_two();
        if let Some(d) = self.digests.get(&buckets) {
            return d.clone();
        }
        let mut hashers: Vec<Sha256> = (0..buckets).map(|_| Sha256::new()).collect();
        for e in self.entries() {
            let h = &mut hashers[bucket_of(&e.author, buckets)];
            h.update([e.kind as u8]);
            h.update(e.author.0);
            h.update(e.seq.to_be_bytes());
        }
        let out: Vec<[u8; 8]> = hashers
            .into_iter()
            .map(|h| {
                let full: [u8; 32] = h.finalize().into();
                let mut d = [0u8; 8];
                d.copy_from_slice(&full[..8]);
                d
            })
            .collect();
        if self.digests.len() > 4 {
            self.digests.clear();
        }
        self.digests.insert(buckets, out.clone());
        out
    }

    /// Compares a peer's entries of `covered` buckets with ours: what we should send it, and
    /// what we want from it.
    pub fn diff(
        &self,
        theirs: &[DigestEntry],
        covered: &[u8],
        buckets: usize,
    ) -> (Vec<SignedRecord>, Vec<(RecordKind, KeyId)>) {
        let their: BTreeMap<(RecordKind, KeyId), u64> =
            theirs.iter().map(|e| ((e.kind, e.author), e.seq)).collect();
        let covered: HashSet<usize> = covered.iter().map(|b| usize::from(*b)).collect();
        let mut send = Vec::new();
        let mut want = Vec::new();
        for e in self.entries() {
            if !covered.contains(&bucket_of(&e.author, buckets)) {
                continue;
            }
            match their.get(&(e.kind, e.author)) {
                Some(&s) if s >= e.seq => {}
                Some(&s) => send.extend(self.newer_than(e.kind, &e.author, s)),
                None => send.extend(self.newer_than(e.kind, &e.author, 0)),
            }
        }
        for e in theirs {
            if !covered.contains(&bucket_of(&e.author, buckets)) {
                continue;
            }
            let ours = match e.kind {
                RecordKind::Peer => self.peers.get(&e.author).map(|(_, p)| p.generation),
                RecordKind::Caps => self.caps.get(&e.author).map(|(_, c)| c.seq),
                RecordKind::Blacklist => self.chains.get(&e.author).map(|c| c.len() as u64),
            };
            if ours.is_none_or(|s| s < e.seq) {
                want.push((e.kind, e.author));
            }
        }
        want.sort();
        (send, want)
    }

    /// Records of (kind, author) newer than `seq`, oldest first.
    pub fn newer_than(&self, kind: RecordKind, author: &KeyId, seq: u64) -> Vec<SignedRecord> {
        match kind {
            RecordKind::Peer => self
                .peers
                .get(author)
                .filter(|(_, p)| p.generation > seq)
                .map(|(s, _)| s.clone())
                .into_iter()
                .collect(),
            RecordKind::Caps => self
                .caps
                .get(author)
                .filter(|(_, c)| c.seq > seq)
                .map(|(s, _)| s.clone())
                .into_iter()
                .collect(),
            RecordKind::Blacklist => self
                .chains
                .get(author)
                .map(|c| {
                    c.iter()
                        .filter(|(_, b)| b.seq > seq)
                        .map(|(s, _)| s.clone())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::model::{ResourceClass, TaskKind};
    use crate::identity::Identity;
    use crate::mesh::wire::BlacklistReason;

    fn caps(id: &Identity, seq: u64) -> SignedRecord {
        SignedRecord::sign(
            id,
            &Record::Caps(CapRecord {
                node: id.key_id(),
                seq,
                issued_ms: seq,
                url: "http://127.0.0.1:1".into(),
                x25519: [0; 32],
                kinds: vec![TaskKind::Probe],
                models: vec![],
                resource_class: ResourceClass::Tiny,
                slots: 1,
                free_slots: 1,
                load_pct: 0,
                price: 0,
                model_budget_mib: 0,
                throttled: false,
            }),
        )
    }

    fn peer(id: &Identity, generation: u64) -> SignedRecord {
        SignedRecord::sign(
            id,
            &Record::Peer(PeerRecord {
                node: id.key_id(),
                generation,
                url: "http://127.0.0.1:1".into(),
            }),
        )
    }

    fn listing(id: &Identity, seq: u64, prev: [u8; 32], target: KeyId) -> SignedRecord {
        SignedRecord::sign(
            id,
            &Record::Blacklist(BlacklistRecord {
                reporter: id.key_id(),
                seq,
                prev,
                target,
                reason: BlacklistReason::Manual,
                evidence: [7; 32],
                issued_ms: 1,
            }),
        )
    }

    #[test]
    fn newer_capabilities_replace_older_ones() {
        let a = Identity::generate();
        let mut r = Records::new([]);
        assert!(matches!(r.accept(&caps(&a, 2)), Accepted::New(_)));
        assert_eq!(r.accept(&caps(&a, 1)), Accepted::Known);
        assert_eq!(r.accept(&caps(&a, 2)), Accepted::Known);
        assert!(matches!(r.accept(&caps(&a, 3)), Accepted::New(_)));
        assert_eq!(r.caps_of(&a.key_id()).unwrap().seq, 3);
    }

    #[test]
    fn blacklist_chains_link_in_order_and_only_trusted_reporters_are_enforced() {
        let trusted = Identity::generate();
        let stranger = Identity::generate();
        let victim = Identity::generate().key_id();
        let mut r = Records::new([trusted.key_id()]);
        let first = listing(&trusted, 1, [0; 32], victim);
        let second = listing(
            &trusted,
            2,
            first.body_hash(),
            Identity::generate().key_id(),
        );
        // Out of order: held back until the first arrives.
        assert_eq!(r.accept(&second), Accepted::OutOfOrder);
        assert!(matches!(r.accept(&first), Accepted::New(_)));
        assert!(matches!(r.accept(&second), Accepted::New(_)));
        assert!(r.is_listed(&victim));
        // A record that does not link to the chain's head is refused.
        let fork = listing(&trusted, 3, [9; 32], victim);
        assert_eq!(r.accept(&fork), Accepted::OutOfOrder);
        // A stranger's records are kept and relayed but not enforced.
        let other_victim = Identity::generate().key_id();
        assert!(matches!(
            r.accept(&listing(&stranger, 1, [0; 32], other_victim)),
            Accepted::New(_)
        ));
        assert!(!r.is_listed(&other_victim));
    }

    #[test]
    fn bucket_digests_match_exactly_when_the_stores_do_and_diffs_repair_them() {
        let ids: Vec<Identity> = (0..40).map(|_| Identity::generate()).collect();
        let mut x = Records::new([]);
        let mut y = Records::new([]);
        for (i, id) in ids.iter().enumerate() {
            x.accept(&caps(id, 1));
            y.accept(&caps(id, 1));
            if i % 2 == 0 {
                x.accept(&peer(id, 5));
                y.accept(&peer(id, 5));
            }
        }
        for b in [1, 2, 16, 256] {
            assert_eq!(x.bucket_digests(b), y.bucket_digests(b));
            assert_eq!(x.bucket_digests(b).len(), b);
        }
        // x gains a newer version, y a record x lacks: only their buckets differ.
        x.accept(&caps(&ids[3], 2));
        y.accept(&caps(&Identity::generate(), 1));
        let (dx, dy) = (x.bucket_digests(16), y.bucket_digests(16));
        let differing: Vec<u8> = (0..16u8)
            .filter(|b| dx[*b as usize] != dy[*b as usize])
            .collect();
        assert!(
            !differing.is_empty() && differing.len() <= 2,
            "{differing:?}"
        );
        let theirs: Vec<DigestEntry> = differing
            .iter()
            .flat_map(|b| y.bucket_entries(usize::from(*b), 16))
            .collect();
        let (send, want) = x.diff(&theirs, &differing, 16);
        assert_eq!(send.len(), 1, "the newer capability record");
        assert_eq!(want.len(), 1, "the record y holds and x lacks");
        for s in &send {
            y.accept(s);
        }
        for (k, author) in want {
            for s in y.newer_than(k, &author, 0) {
                x.accept(&s);
            }
        }
        assert_eq!(x.bucket_digests(16), y.bucket_digests(16));
        assert_eq!(x.entries(), y.entries());
    }

    #[test]
    fn forgotten_nodes_are_not_learned_again_unless_they_come_back() {
        let a = Identity::generate();
        let mut r = Records::new([]);
        assert!(matches!(r.accept(&peer(&a, 10)), Accepted::New(_)));
        assert!(matches!(r.accept(&caps(&a, 1)), Accepted::New(_)));
        r.forget(&a.key_id(), 10, 1_000);
        assert!(r.peer_of(&a.key_id()).is_none());
        assert!(r.caps_of(&a.key_id()).is_none());
        // Copies still travelling are not learned again...
        assert_eq!(r.accept(&peer(&a, 10)), Accepted::Known);
        assert_eq!(r.accept(&caps(&a, 1)), Accepted::Known);
        // ...but a newer process of the node is, with its capabilities.
        assert!(matches!(r.accept(&peer(&a, 11)), Accepted::New(_)));
        assert!(matches!(r.accept(&caps(&a, 2)), Accepted::New(_)));
        r.prune_tombstones(10_000, 5_000);
        assert!(r.tombstones.is_empty());
    }

    #[test]
    fn blacklist_chains_are_capped() {
        let reporter = Identity::generate();
        let mut r = Records::new([]);
        let mut prev = [0u8; 32];
        for seq in 1..=MAX_CHAIN {
            let l = listing(&reporter, seq, prev, Identity::generate().key_id());
            prev = l.body_hash();
            assert!(matches!(r.accept(&l), Accepted::New(_)), "{seq}");
        }
        let over = listing(
            &reporter,
            MAX_CHAIN + 1,
            prev,
            Identity::generate().key_id(),
        );
        assert!(matches!(r.accept(&over), Accepted::Invalid(_)));
        assert_eq!(r.untrusted_listings, MAX_CHAIN as usize);
    }
}

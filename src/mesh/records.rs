//! Signed records every node keeps a copy of: capability announcements (latest per node) and
//! blacklist chains (every record, per reporter), with their digest for anti-entropy.

use std::collections::{BTreeMap, HashMap, HashSet};

use sha2::{Digest, Sha256};

use super::wire::{
    BlacklistRecord, CapRecord, DigestEntry, Record, RecordKind, SignedRecord, WireError,
};
use crate::identity::KeyId;

/// What happened to a record offered to the store.
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted {
    /// New information, stored.
    New(Record),
    /// Already held, or older than what is held.
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
    caps: HashMap<KeyId, (SignedRecord, CapRecord)>,
    chains: HashMap<KeyId, Vec<(SignedRecord, BlacklistRecord)>>,
    /// Reporters whose blacklist records are enforced (this node and configured keys).
    trusted: HashSet<KeyId>,
    /// Nodes blacklisted by a trusted reporter.
    listed: HashSet<KeyId>,
    digest: Option<([u8; 16], u32)>,
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
        match &record {
            Record::Caps(c) => {
                if self
                    .caps
                    .get(&c.node)
                    .is_some_and(|(_, old)| old.seq >= c.seq)
                {
                    return Accepted::Known;
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
                if let Err(e) = sr.verify(&record) {
                    return Accepted::Invalid(e);
                }
                self.chains
                    .entry(b.reporter)
                    .or_default()
                    .push((sr.clone(), b.clone()));
                if self.trusted.contains(&b.reporter) {
                    self.listed.insert(b.target);
                }
            }
        }
        self.digest = None;
        Accepted::New(record)
    }

    /// Whether `key` is blacklisted by a trusted reporter.
    pub fn is_listed(&self, key: &KeyId) -> bool {
        self.listed.contains(key)
    }

    /// Blacklisted nodes.
    pub fn listed(&self) -> impl Iterator<Item = &KeyId> {
        self.listed.iter()
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

    /// Forgets a node's capability record (it left or was declared dead long ago).
    pub fn forget_caps(&mut self, key: &KeyId) {
        if self.caps.remove(key).is_some() {
            self.digest = None;
        }
    }

    /// (kind, author, seq) of everything held, sorted.
    pub fn entries(&self) -> Vec<DigestEntry> {
        let mut v: Vec<DigestEntry> = self
            .caps
            .values()
            .map(|(_, c)| DigestEntry {
                kind: RecordKind::Caps,
                author: c.node,
                seq: c.seq,
            })
            .chain(self.chains.iter().filter_map(|(k, c)| {
                Some(DigestEntry {
                    kind: RecordKind::Blacklist,
                    author: *k,
                    seq: c.last()?.1.seq,
                })
            }))
            .collect();
        v.sort();
        v
    }

    /// A short hash of [`Records::entries`] and their count; equal digests mean equal stores.
    pub fn digest(&mut self) -> ([u8; 16], u32) {
        if let Some(d) = self.digest {
            return d;
        }
        let entries = self.entries();
        let mut h = Sha256::new();
        for e in &entries {
            h.update([e.kind as u8]);
            h.update(e.author.0);
            h.update(e.seq.to_be_bytes());
        }
        let full: [u8; 32] = h.finalize().into();
        let mut d = [0u8; 16];
        d.copy_from_slice(&full[..16]);
        let out = (d, entries.len() as u32);
        self.digest = Some(out);
        out
    }

    /// Compares a peer's digest entries with ours: what we should send it, and what we want.
    pub fn diff(&self, theirs: &[DigestEntry]) -> (Vec<SignedRecord>, Vec<(RecordKind, KeyId)>) {
        let their: BTreeMap<(RecordKind, KeyId), u64> =
            theirs.iter().map(|e| ((e.kind, e.author), e.seq)).collect();
        let mut send = Vec::new();
        let mut want = Vec::new();
        for e in self.entries() {
            match their.get(&(e.kind, e.author)) {
                Some(&s) if s >= e.seq => {}
                Some(&s) => send.extend(self.newer_than(e.kind, &e.author, s)),
                None => send.extend(self.newer_than(e.kind, &e.author, 0)),
            }
        }
        for e in theirs {
            let ours = match e.kind {
                RecordKind::Caps => self.caps.get(&e.author).map(|(_, c)| c.seq),
                RecordKind::Blacklist => self.chains.get(&e.author).map(|c| c.len() as u64),
            };
            if ours.is_none_or(|s| s < e.seq) {
                want.push((e.kind, e.author));
            }
        }
        (send, want)
    }

    /// Records of (kind, author) newer than `seq`, oldest first.
    pub fn newer_than(&self, kind: RecordKind, author: &KeyId, seq: u64) -> Vec<SignedRecord> {
        match kind {
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
    fn digests_match_exactly_when_the_stores_do_and_diffs_repair_them() {
        let (a, b, c) = (
            Identity::generate(),
            Identity::generate(),
            Identity::generate(),
        );
        let mut x = Records::new([]);
        let mut y = Records::new([]);
        for s in [caps(&a, 1), caps(&b, 5)] {
            x.accept(&s);
            y.accept(&s);
        }
        assert_eq!(x.digest(), y.digest());
        x.accept(&caps(&b, 6));
        y.accept(&caps(&c, 1));
        assert_ne!(x.digest(), y.digest());
        let (send, want) = x.diff(&y.entries());
        for s in &send {
            y.accept(s);
        }
        assert_eq!(want, vec![(RecordKind::Caps, c.key_id())]);
        for (k, author) in want {
            for s in y.newer_than(k, &author, 0) {
                x.accept(&s);
            }
        }
        assert_eq!(x.digest(), y.digest());
    }
}

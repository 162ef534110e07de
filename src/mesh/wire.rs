//! What travels between nodes: peer identities, signed records, messages and the envelope.
//!
//! Everything here is postcard. Two things carry signatures, each under its own domain tag so a
//! signature made for one purpose never verifies as another:
//!
//! * an envelope ([`seal`], [`open`]): every message between two nodes, signed by the sender over its exact
//!   bytes (`DOMAIN_ENVELOPE || body`);
//! * a [`SignedRecord`]: membership identities ([`PeerRecord`]: key, URL, generation),
//!   capability announcements and blacklist records, signed by their author and relayed
//!   unchanged over several hops, so no relay can alter them (nor bind someone else's key to
//!   its own URL).
//!
//! Decoding never panics and bounds every length (postcard reads lengths as varints; every
//! vector and string here is checked after decoding against the limits below, and the envelope
//! as a whole is capped before decoding starts).

use ed25519_dalek::{Signature, Signer, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::coordinator::model::{ResourceClass, TaskId, TaskKind};
use crate::identity::{Identity, KeyId};

/// Domain tag of envelope signatures.
pub const DOMAIN_ENVELOPE: &[u8] = b"edgecoder/mesh/envelope/v1\0";
/// Domain tag of record signatures.
pub const DOMAIN_RECORD: &[u8] = b"edgecoder/mesh/record/v1\0";
/// Wire format version in every envelope.
pub const VERSION: u8 = 2;
/// Longest URL a peer may advertise.
pub const MAX_URL: usize = 200;
/// Most models one capability record lists.
pub const MAX_MODELS: usize = 64;
/// Longest model name.
pub const MAX_MODEL_NAME: usize = 128;

/// An ed25519 signature (postcard: a length-prefixed byte string).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sig(pub [u8; 64]);

impl std::fmt::Debug for Sig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sig({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

impl Serialize for Sig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Sig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Sig, E> {
                let arr: [u8; 64] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Sig(arr))
            }
        }
        d.deserialize_bytes(V)
    }
}

fn sign(identity: &Identity, domain: &[u8], body: &[u8]) -> Sig {
    let mut msg = Vec::with_capacity(domain.len() + body.len());
    msg.extend_from_slice(domain);
    msg.extend_from_slice(body);
    Sig(identity.signing_key().sign(&msg).to_bytes())
}

fn verify(key: &KeyId, domain: &[u8], body: &[u8], sig: &Sig) -> bool {
    let Ok(vk) = VerifyingKey::from_bytes(&key.0) else {
        return false;
    };
    let mut msg = Vec::with_capacity(domain.len() + body.len());
    msg.extend_from_slice(domain);
    msg.extend_from_slice(body);
    vk.verify_strict(&msg, &Signature::from_bytes(&sig.0))
        .is_ok()
}

/// Whether a URL is one a peer may advertise: `http(s)://`, short, no whitespace.
pub fn valid_url(url: &str) -> bool {
    url.len() <= MAX_URL
        && (url.starts_with("http://") || url.starts_with("https://"))
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Where a member listens, as this node knows it from the member's signed [`PeerRecord`]: the
/// address every message to it goes to. (Only verified records produce one.)
#[derive(Clone, PartialEq, Eq, Hash, Serialize)]
pub struct PeerId {
    /// The node's ed25519 public key.
    pub key: KeyId,
    /// Its coordinator's base URL.
    pub url: String,
    /// Generation: the process's start time in ms; a newer generation is a newer process of the
    /// same node and replaces the older one.
    pub generation: u64,
}

impl PeerId {
    /// The address in a verified peer record.
    pub fn of(r: &PeerRecord) -> Self {
        PeerId {
            key: r.node,
            url: r.url.clone(),
            generation: r.generation,
        }
    }
}

impl std::fmt::Debug for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short: String = self.key.to_string().chars().take(8).collect();
        write!(f, "{short}@{}#{}", self.url, self.generation)
    }
}

/// A node's membership identity, signed by the node as a [`Record::Peer`]: who it is, where it
/// listens, and which process (generation) this is. Relayed unchanged like every record, so a
/// peer relaying membership ("peer exchange") cannot bind someone else's key to its own URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The node's key (the record's author).
    pub node: KeyId,
    /// The process's start time in ms (bumped by one if it ever must take a new identity); the
    /// record's version.
    pub generation: u64,
    /// Its coordinator's base URL.
    pub url: String,
}

/// A member's state as SWIM messages carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Answering.
    Alive,
    /// Failed a probe; it may refute by raising its incarnation.
    Suspect,
    /// Declared dead (a suspicion ran out); it may still refute and come back.
    Dead,
    /// Left on purpose (shutdown); final for this generation.
    Left,
}

/// A membership update, spread by piggybacking on SWIM messages (SWIM §4.1, "infection-style
/// dissemination"). It names the member by key and generation only: the member's address comes
/// from its signed [`PeerRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// The member.
    pub key: KeyId,
    /// Its process generation.
    pub generation: u64,
    /// Its incarnation: raised by the member itself to refute a suspicion (SWIM §4.2).
    pub incarnation: u32,
    /// The state.
    pub state: MemberState,
    /// For `Suspect`: the first 8 bytes of the accuser's key (Lifeguard counts independent
    /// accusers to shorten a suspicion, §IV-B).
    pub accuser: Option<[u8; 8]>,
}

/// A record travelling by gossip with the hops it has made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Hops from its author.
    pub hops: u8,
    /// The record.
    pub record: SignedRecord,
}

/// What a SWIM packet is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Probe {
    /// "Are you alive?": answered with an `Ack` of the same sequence number (SWIM §3).
    Ping {
        /// Chosen by the sender.
        seq: u32,
    },
    /// The answer to a `Ping`, or a relay passing on the target's answer to a `PingReq`.
    Ack {
        /// The `Ping`'s (or `PingReq`'s) sequence number.
        seq: u32,
    },
    /// "Probe `target` for me" (SWIM §3, indirect probing).
    PingReq {
        /// The asker's sequence number, echoed in the `Ack` or `Nack`.
        seq: u32,
        /// The member to probe.
        target: KeyId,
    },
    /// A relay's "the target did not answer me in time" (Lifeguard §IV-A: an asker that gets
    /// neither acks nor nacks learns that its own messages are not getting through).
    Nack {
        /// The `PingReq`'s sequence number.
        seq: u32,
    },
    /// Updates and records only.
    Gossip,
}

/// Most membership updates one packet may carry.
pub const MAX_UPDATES: usize = 512;
/// Most records one packet may carry.
pub const MAX_ITEMS: usize = 256;

/// A SWIM packet with what it piggybacks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Packet {
    /// The sender's generation (its key is the envelope's).
    pub generation: u64,
    /// What it is for.
    pub probe: Probe,
    /// The sender's own signed [`PeerRecord`], sent until the receiver has answered this
    /// generation once: without it a receiver that does not know the sender cannot reply.
    pub intro: Option<SignedRecord>,
    /// Membership updates.
    pub updates: Vec<Update>,
    /// Gossiped records.
    pub records: Vec<Item>,
}

impl Packet {
    /// Checks the bounds decoding cannot.
    ///
    /// # Errors
    /// Too many updates or records.
    pub fn check(&self) -> Result<(), WireError> {
        if self.updates.len() > MAX_UPDATES || self.records.len() > MAX_ITEMS {
            return Err(WireError::Invalid(
                "too many updates or records in one packet",
            ));
        }
        Ok(())
    }
}

/// What a node offers the mesh, announced by the node itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapRecord {
    /// The node's key (the record's author).
    pub node: KeyId,
    /// Version: a newer record replaces an older one.
    pub seq: u64,
    /// When it was made (ms since the epoch).
    pub issued_ms: u64,
    /// Coordinator URL.
    pub url: String,
    /// X25519 public key that task payloads for this node are encrypted to.
    pub x25519: [u8; 32],
    /// Task kinds it runs.
    pub kinds: Vec<TaskKind>,
    /// Models it serves.
    pub models: Vec<String>,
    /// Its resource class.
    pub resource_class: ResourceClass,
    /// Generation slots in total.
    pub slots: u32,
    /// Slots free when the record was made.
    pub free_slots: u32,
    /// Load: running and queued work per slot, in percent.
    pub load_pct: u16,
    /// Price in credits per 1,000 tokens (0: free).
    pub price: u32,
    /// Memory for model weights and KV cache from the hardware detection (MiB; 0 unknown).
    pub model_budget_mib: u32,
    /// The box runs below its capacity now (thermal throttling, capped frequency).
    pub throttled: bool,
}

/// Why a node is blacklisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlacklistReason {
    /// It signed contradictory or invalid results.
    BadResult,
    /// It flooded or attacked the mesh.
    Abuse,
    /// Its operator asked (manual).
    Manual,
}

/// A signed statement by `reporter` that `target` misbehaved. A reporter's records form a hash
/// chain: `prev` is the hash of the reporter's previous record (zero for the first), `seq` its
/// position, so a record cannot be dropped from or inserted into a chain unnoticed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlacklistRecord {
    /// Who says so (the record's author).
    pub reporter: KeyId,
    /// Position in the reporter's chain, from 1.
    pub seq: u64,
    /// Hash of the reporter's previous record's body (zeros for the first).
    pub prev: [u8; 32],
    /// The node blacklisted.
    pub target: KeyId,
    /// Why.
    pub reason: BlacklistReason,
    /// SHA-256 of the evidence (the offending message, a result), kept by the reporter.
    pub evidence: [u8; 32],
    /// When (ms since the epoch).
    pub issued_ms: u64,
}

/// A record authored and signed by one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    /// A membership identity.
    Peer(PeerRecord),
    /// Capabilities.
    Caps(CapRecord),
    /// A blacklist entry.
    Blacklist(BlacklistRecord),
}

/// Record kinds (for digests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RecordKind {
    /// [`Record::Peer`] (first: a node that catches up needs addresses before anything else).
    Peer,
    /// [`Record::Caps`].
    Caps,
    /// [`Record::Blacklist`].
    Blacklist,
}

impl Record {
    /// The signer.
    pub fn author(&self) -> KeyId {
        match self {
            Record::Peer(p) => p.node,
            Record::Caps(c) => c.node,
            Record::Blacklist(b) => b.reporter,
        }
    }

    /// Kind.
    pub fn kind(&self) -> RecordKind {
        match self {
            Record::Peer(_) => RecordKind::Peer,
            Record::Caps(_) => RecordKind::Caps,
            Record::Blacklist(_) => RecordKind::Blacklist,
        }
    }

    /// Version within (kind, author).
    pub fn seq(&self) -> u64 {
        match self {
            Record::Peer(p) => p.generation,
            Record::Caps(c) => c.seq,
            Record::Blacklist(b) => b.seq,
        }
    }

    fn check(&self) -> Result<(), &'static str> {
        match self {
            Record::Peer(p) => {
                if !valid_url(&p.url) {
                    return Err("peer URL is not a valid http(s) URL");
                }
                Ok(())
            }
            Record::Caps(c) => {
                if !valid_url(&c.url) {
                    return Err("capability URL is invalid");
                }
                if c.models.len() > MAX_MODELS || c.models.iter().any(|m| m.len() > MAX_MODEL_NAME)
                {
                    return Err("too many or too long model names");
                }
                if c.kinds.len() > 16 {
                    return Err("too many task kinds");
                }
                Ok(())
            }
            Record::Blacklist(b) => {
                if b.seq == 0 {
                    return Err("blacklist chains start at 1");
                }
                if b.target == b.reporter {
                    return Err("a node cannot blacklist itself");
                }
                Ok(())
            }
        }
    }
}

/// A record with its author's signature; relayed unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedRecord {
    /// postcard of the [`Record`].
    pub body: Vec<u8>,
    /// Author's signature over `DOMAIN_RECORD || body`.
    pub sig: Sig,
}

/// Why a record or envelope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Larger than allowed.
    #[error("too large ({0} bytes)")]
    TooLarge(usize),
    /// Not decodable.
    #[error("malformed: {0}")]
    Malformed(String),
    /// Signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// Outside the time window.
    #[error("sent {skew_ms} ms away from our clock")]
    Stale {
        /// How far off.
        skew_ms: i64,
    },
    /// Unknown version.
    #[error("unsupported version {0}")]
    Version(u8),
    /// Fails a content check.
    #[error("invalid: {0}")]
    Invalid(&'static str),
}

impl SignedRecord {
    /// Signs a record by `identity` (which must be its author).
    pub fn sign(identity: &Identity, record: &Record) -> Self {
        let body = postcard::to_allocvec(record).unwrap_or_default();
        let sig = sign(identity, DOMAIN_RECORD, &body);
        SignedRecord { body, sig }
    }

    /// Decodes, checks and verifies; returns the record.
    ///
    /// # Errors
    /// Malformed, invalid, or a signature that is not its author's.
    pub fn open(&self) -> Result<Record, WireError> {
        let record = self.peek()?;
        self.verify(&record)?;
        Ok(record)
    }

    /// Decodes and checks the record without verifying its signature: enough to tell whether
    /// it is news. Anything stored or acted on must pass [`SignedRecord::verify`] first.
    ///
    /// # Errors
    /// Malformed or invalid.
    pub fn peek(&self) -> Result<Record, WireError> {
        let record: Record =
            postcard::from_bytes(&self.body).map_err(|e| WireError::Malformed(e.to_string()))?;
        record.check().map_err(WireError::Invalid)?;
        Ok(record)
    }

    /// Verifies the author's signature over the body (`record` is this body, peeked).
    ///
    /// # Errors
    /// [`WireError::BadSignature`].
    pub fn verify(&self, record: &Record) -> Result<(), WireError> {
        if verify(&record.author(), DOMAIN_RECORD, &self.body, &self.sig) {
            Ok(())
        } else {
            Err(WireError::BadSignature)
        }
    }

    /// SHA-256 of the body (blacklist chains link by it).
    pub fn body_hash(&self) -> [u8; 32] {
        Sha256::digest(&self.body).into()
    }
}

/// One entry of a record digest: (kind, author, seq).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DigestEntry {
    /// Kind.
    pub kind: RecordKind,
    /// Author.
    pub author: KeyId,
    /// Latest seq held.
    pub seq: u64,
}

/// A task offered to a peer that advertises what it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The task, on the origin.
    pub task: TaskId,
    /// Its kind.
    pub kind: TaskKind,
    /// The model it needs.
    pub model: Option<String>,
    /// Smallest resource class.
    pub min_class: Option<ResourceClass>,
    /// The origin's coordinator URL, where the peer claims it.
    pub origin_url: String,
    /// The origin's X25519 key: the executor encrypts events and the result to it.
    pub origin_x25519: [u8; 32],
    /// The offer stands until then (ms since the epoch).
    pub expires_ms: u64,
}

/// A message between two nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// A SWIM packet: membership probes and everything piggybacked on them.
    Swim(Packet),
    /// Anti-entropy, step 1: the sender's record digest, split into buckets by the first byte
    /// of each record's author (`buckets.len()` is a power of two from 1 to 256), so that two
    /// stores that differ in a few records exchange only the entries of a few buckets.
    SyncHello {
        /// Truncated SHA-256 over each bucket's sorted (kind, author, seq) entries.
        buckets: Vec<[u8; 8]>,
        /// The same for membership: each bucket's (key, generation, up or down) of every member
        /// the sender knows, itself included.
        members: Vec<[u8; 8]>,
    },
    /// Membership anti-entropy, for buckets whose digests differ: the sender's view of every
    /// member in them, as updates. The receiver merges them like gossip and, if `reply`,
    /// answers with its own view of the same buckets.
    SyncMembers {
        /// The bucket count the hello used.
        buckets: u16,
        /// The buckets covered.
        covered: Vec<u8>,
        /// The sender's view.
        updates: Vec<Update>,
        /// Answer with this node's view.
        reply: bool,
    },
    /// Step 2, for buckets whose digests differ: every (kind, author, seq) the sender holds in
    /// them.
    SyncDigest {
        /// The bucket count the hello used.
        buckets: u16,
        /// The buckets these entries cover (whole buckets; the rest follows next round).
        covered: Vec<u8>,
        /// The entries.
        entries: Vec<DigestEntry>,
    },
    /// Step 3: records the sender lacks or holds older versions of.
    SyncWant(Vec<(RecordKind, KeyId)>),
    /// Records, pushed or asked for.
    Records(Vec<SignedRecord>),
    /// A task offer.
    Offer(Offer),
}

impl Message {
    /// A short name of the kind (for counters).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Message::Swim(p) => match p.probe {
                Probe::Ping { .. } => "ping",
                Probe::Ack { .. } => "ack",
                Probe::PingReq { .. } => "ping_req",
                Probe::Nack { .. } => "nack",
                Probe::Gossip => "gossip",
            },
            Message::SyncHello { .. } => "sync_hello",
            Message::SyncDigest { .. } => "sync_digest",
            Message::SyncMembers { .. } => "sync_members",
            Message::SyncWant(_) => "sync_want",
            Message::Records(_) => "records",
            Message::Offer(_) => "offer",
        }
    }
}

/// What is signed: sender, time, nonce and the message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Body {
    /// [`VERSION`].
    pub version: u8,
    /// The sender's key.
    pub sender: KeyId,
    /// When it was sent (ms since the epoch).
    pub sent_ms: u64,
    /// Random; (sender, nonce) is never accepted twice.
    pub nonce: [u8; 16],
    /// The message.
    pub msg: Message,
}

/// Encodes and signs a message: `signature (64 bytes) || postcard(Body)`.
pub fn seal(identity: &Identity, msg: Message, sent_ms: u64) -> Vec<u8> {
    let body = Body {
        version: VERSION,
        sender: identity.key_id(),
        sent_ms,
        nonce: crate::clock::random_bytes::<16>(),
        msg,
    };
    let bytes = postcard::to_allocvec(&body).unwrap_or_default();
    let sig = sign(identity, DOMAIN_ENVELOPE, &bytes);
    let mut out = Vec::with_capacity(64 + bytes.len());
    out.extend_from_slice(&sig.0);
    out.extend_from_slice(&bytes);
    out
}

/// The sender an envelope claims, read without decoding it (for rate limiting before any
/// parsing or signature work). `None` when the envelope is too short.
pub fn peek_sender(env: &[u8]) -> Option<KeyId> {
    // Body starts after the signature: version (one byte), then the 32 key bytes.
    let key: [u8; 32] = env.get(65..97)?.try_into().ok()?;
    Some(KeyId(key))
}

/// Checks an envelope: size, decoding, signature, version, time window. (Replays and the
/// blacklist are checked by the caller, which holds that state.)
///
/// # Errors
/// The first check that fails.
pub fn open(env: &[u8], max: usize, now_ms: u64, window_ms: u64) -> Result<Body, WireError> {
    if env.len() > max {
        return Err(WireError::TooLarge(env.len()));
    }
    if env.len() < 64 + 34 {
        return Err(WireError::Malformed("too short".into()));
    }
    let (sig, bytes) = env.split_at(64);
    let body: Body =
        postcard::from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    if body.version != VERSION {
        return Err(WireError::Version(body.version));
    }
    let sig = Sig(sig
        .try_into()
        .map_err(|_| WireError::Malformed("signature".into()))?);
    if !verify(&body.sender, DOMAIN_ENVELOPE, bytes, &sig) {
        return Err(WireError::BadSignature);
    }
    if body.sent_ms.abs_diff(now_ms) > window_ms {
        let skew = i64::try_from(i128::from(body.sent_ms) - i128::from(now_ms)).unwrap_or(
            if body.sent_ms > now_ms {
                i64::MAX
            } else {
                i64::MIN
            },
        );
        return Err(WireError::Stale { skew_ms: skew });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(id: &Identity, seq: u64) -> Record {
        Record::Caps(CapRecord {
            node: id.key_id(),
            seq,
            issued_ms: 1,
            url: "http://10.0.0.2:4301".into(),
            x25519: id.x25519_public().to_bytes(),
            kinds: vec![TaskKind::Chat],
            models: vec!["m".into()],
            resource_class: ResourceClass::Small,
            slots: 4,
            free_slots: 4,
            load_pct: 0,
            price: 0,
            model_budget_mib: 0,
            throttled: false,
        })
    }

    #[test]
    fn envelopes_verify_and_every_tampered_byte_is_refused() {
        let id = Identity::generate();
        let env = seal(&id, Message::SyncWant(vec![]), 1_000);
        let body = open(&env, 65_536, 1_500, 30_000).unwrap();
        assert_eq!(body.sender, id.key_id());
        assert_eq!(peek_sender(&env), Some(id.key_id()));
        for i in 0..env.len() {
            let mut bad = env.clone();
            bad[i] ^= 0x01;
            assert!(open(&bad, 65_536, 1_500, 30_000).is_err(), "byte {i}");
        }
        assert_eq!(
            open(&env, 10, 1_500, 30_000),
            Err(WireError::TooLarge(env.len()))
        );
        assert!(matches!(
            open(&env, 65_536, 100_000, 30_000),
            Err(WireError::Stale { .. })
        ));
        // Another key's signature over the same body.
        let other = Identity::generate();
        let mut forged = seal(&other, Message::SyncWant(vec![]), 1_000);
        forged[65..97].copy_from_slice(&id.key_id().0);
        assert!(open(&forged, 65_536, 1_500, 30_000).is_err());
    }

    #[test]
    fn peer_records_bind_a_key_to_its_url_and_generation() {
        let id = Identity::generate();
        let rec = Record::Peer(PeerRecord {
            node: id.key_id(),
            generation: 7,
            url: "http://127.0.0.2:4301".into(),
        });
        let signed = SignedRecord::sign(&id, &rec);
        let Record::Peer(p) = signed.open().unwrap() else {
            panic!("not a peer record")
        };
        assert_eq!(PeerId::of(&p).url, "http://127.0.0.2:4301");
        // Someone else's key bound to their URL does not verify.
        let mallory = Identity::generate();
        let hijack = SignedRecord::sign(
            &mallory,
            &Record::Peer(PeerRecord {
                node: id.key_id(),
                generation: 8,
                url: "http://10.6.6.6:4301".into(),
            }),
        );
        assert_eq!(hijack.open(), Err(WireError::BadSignature));
        // Nor does a URL that is not http(s).
        let bad = SignedRecord::sign(
            &id,
            &Record::Peer(PeerRecord {
                node: id.key_id(),
                generation: 9,
                url: "file:///etc/passwd".into(),
            }),
        );
        assert!(matches!(bad.open(), Err(WireError::Invalid(_))));
    }

    #[test]
    fn packets_round_trip_and_their_bounds_are_checked() {
        let id = Identity::generate();
        let update = Update {
            key: id.key_id(),
            generation: 1_700_000_000_000,
            incarnation: 3,
            state: MemberState::Suspect,
            accuser: Some([1; 8]),
        };
        let p = Packet {
            generation: 1_700_000_000_001,
            probe: Probe::PingReq {
                seq: 9,
                target: id.key_id(),
            },
            intro: None,
            updates: vec![update.clone()],
            records: vec![],
        };
        let env = seal(&id, Message::Swim(p.clone()), 1_000);
        let body = open(&env, 65_536, 1_000, 30_000).unwrap();
        assert_eq!(body.msg, Message::Swim(p.clone()));
        // A compact update: key, varint generation and incarnation, state, accuser prefix.
        assert!(postcard::to_allocvec(&update).unwrap().len() <= 50);
        let mut many = p;
        many.updates = vec![update; MAX_UPDATES + 1];
        assert!(many.check().is_err());
    }

    #[test]
    fn records_are_signed_by_their_author() {
        let id = Identity::generate();
        let r = SignedRecord::sign(&id, &caps(&id, 3));
        assert_eq!(r.open().unwrap().seq(), 3);
        // Signed by someone other than the author it names.
        let mallory = Identity::generate();
        let forged = SignedRecord::sign(&mallory, &caps(&id, 4));
        assert_eq!(forged.open(), Err(WireError::BadSignature));
        let mut tampered = r.clone();
        let last = tampered.body.len() - 1;
        tampered.body[last] ^= 1;
        assert!(tampered.open().is_err());
    }

    #[test]
    fn timestamps_at_the_ends_of_the_range_are_stale_not_a_panic() {
        let id = Identity::generate();
        for sent in [u64::MAX, 1 << 63, 0] {
            let env = seal(&id, Message::SyncWant(vec![]), sent);
            assert!(matches!(
                open(&env, 65_536, 1_700_000_000_000, 30_000),
                Err(WireError::Stale { .. })
            ));
        }
    }

    #[test]
    fn hostile_bytes_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..400 {
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            let _ = open(&v, 65_536, 0, 30_000);
            let _ = open(&v, 65_536, u64::MAX, 30_000);
            let _ = postcard::from_bytes::<Packet>(&v);
            let _ = postcard::from_bytes::<Message>(&v);
        }
    }
}

//! The mesh inside a running node: drives one [`Core`] from tokio over HTTP.
//!
//! # Transport
//! Every message is an envelope (`wire::seal`) POSTed to the peer's `/mesh/ingest`; the answer
//! carries nothing (SWIM replies are their own envelopes), so sending is fire-and-forget, like
//! the UDP that SWIM was designed for, with a bound on sends in flight. Ingress checks run
//! cheapest first: size cap, per-IP limit (the router's), per-sender limit (sender read without
//! decoding), decode, signature, time window, nonce, blacklist and allowlist.
//!
//! # Loops
//! A driver that sleeps until the core's next wake-up (probes, suspicion timeouts, gossip,
//! anti-entropy; a node alone never wakes) and is woken early when a message moves that time
//! forward, a bootstrap loop per configured URL (GET `/identity` until it answers, with
//! backoff), and a capability loop that republishes what this node's agents can run when it
//! changes (checked every 2 s) and every `mesh.caps_interval`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::core::{Core, Event, PeerState, Tuning};
use super::seal;
use super::wire::{
    self, BlacklistReason, BlacklistRecord, CapRecord, Message, Offer, PeerId, Record, WireError,
};
use crate::client::{ClientError, CoordinatorClient};
use crate::config::MeshConfig;
use crate::coordinator::model::{
    Capabilities, Claim, ClaimReply, ClaimedTask, EventKind, EventsAccepted, Heartbeat,
    HeartbeatReply, NewEvent, PostEvents, PostResult, RegisterAgent, Registered, ReportedOutcome,
    Requirements, ResourceClass, ResultAccepted, RunningTask, SubmitTask, TaskId, TaskKind,
    TaskState,
};
use crate::coordinator::state::CoordinatorState;
use crate::coordinator::state::{CursorItem, EventCursor, MESH_KEY_PREFIX, ResultWait};
use crate::http::ApiError;
use crate::identity::{Identity, KeyId};
use crate::security::{Principal, Role};
use sha2::Digest;

/// Envelopes in flight to peers at once; beyond it new sends are dropped (and counted), as a
/// full UDP socket buffer would drop them. SWIM tolerates loss by design.
const MAX_INFLIGHT: usize = 256;

/// Time limit of one envelope POST.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// How often capabilities are recomputed and published if they changed.
const CAPS_CHECK: Duration = Duration::from_secs(2);

/// Offers considered or run at once on this node.
const MAX_EXECUTING: usize = 64;

/// Offers from one origin considered or run at once: one busy (or hostile) origin cannot take
/// every place in `MAX_EXECUTING` from the others.
const MAX_PER_ORIGIN: usize = 16;

/// Most (sender, nonce) pairs remembered for replay checks.
const MAX_NONCES: usize = 500_000;

/// What `/identity` adds for the mesh: enough to join through this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshIdentity {
    /// The URL peers reach this coordinator at.
    pub url: String,
    /// This process's incarnation (ms since the epoch at boot; a newer one wins).
    pub generation: u64,
    /// base64url of the signed membership identity (postcard), for `join`.
    pub peer: String,
}

/// Ingress and egress counters (`GET /mesh/stats`).
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    too_large: AtomicU64,
    rate_limited: AtomicU64,
    malformed: AtomicU64,
    bad_signature: AtomicU64,
    stale: AtomicU64,
    replayed: AtomicU64,
    blacklisted: AtomicU64,
    not_allowed: AtomicU64,
    sent: AtomicU64,
    send_failed: AtomicU64,
    send_dropped: AtomicU64,
}

/// `GET /mesh/stats`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct MeshStats {
    /// Envelopes accepted.
    pub accepted: u64,
    /// Refused: over `mesh.max_envelope`.
    pub too_large: u64,
    /// Refused: sender over `mesh.per_peer_rate`.
    pub rate_limited: u64,
    /// Refused: not decodable.
    pub malformed: u64,
    /// Refused: signature does not verify (forged or tampered).
    pub bad_signature: u64,
    /// Refused: outside the time window (or sent before this process started).
    pub stale: u64,
    /// Refused: (sender, nonce) seen before.
    pub replayed: u64,
    /// Refused: sender blacklisted.
    pub blacklisted: u64,
    /// Refused: sender not in `mesh.peer_keys`.
    pub not_allowed: u64,
    /// Envelopes sent.
    pub sent: u64,
    /// Sends that failed (peer unreachable, error status).
    pub send_failed: u64,
    /// Sends dropped because too many were in flight.
    pub send_dropped: u64,
    /// SWIM packets refused by the membership layer (out of bounds, a false intro).
    pub swim_rejected: u64,
    /// SWIM packets from senders whose identity this node does not hold (dropped).
    pub unknown_sender: u64,
    /// Probes this node started.
    pub probes: u64,
    /// Probes that ended without an answer.
    pub probes_failed: u64,
    /// Suspicions this node raised.
    pub suspected: u64,
    /// Members this node declared dead.
    pub declared_dead: u64,
    /// Suspicions of this node it refuted.
    pub refuted: u64,
    /// Lifeguard local health score (0 healthy, up to 8: this node probes that much slower).
    pub health: u32,
    /// Gossiped records refused (bad signature, malformed).
    pub records_rejected: u64,
    /// Records learned.
    pub records_learned: u64,
    /// Anti-entropy rounds started.
    pub syncs: u64,
    /// Task offers sent to peers.
    pub offers_sent: u64,
    /// Task offers received.
    pub offers_received: u64,
    /// Task offers not considered: too many from that origin, or from all, at once.
    pub offers_refused: u64,
    /// Offered tasks this node claimed and ran.
    pub claims_won: u64,
    /// Offered tasks another peer claimed first.
    pub claims_lost: u64,
    /// Tasks run here for other nodes that succeeded.
    pub remote_succeeded: u64,
    /// Tasks run here for other nodes that failed or were abandoned.
    pub remote_failed: u64,
}

/// One peer in `GET /mesh/peers`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerInfo {
    /// Node id.
    pub node_id: String,
    /// Node key (base64url).
    pub key: String,
    /// Coordinator URL.
    pub url: String,
    /// Alive, suspect or dead.
    pub state: PeerState,
    /// Its process incarnation.
    pub generation: u64,
    /// Last envelope received from it (ms since the epoch; 0: none directly).
    pub last_seen_ms: u64,
    /// What it advertises, when known.
    pub capabilities: Option<CapsView>,
}

/// `GET /mesh/peers`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeersView {
    /// This node.
    pub node_id: String,
    /// This node's advertised URL.
    pub url: String,
    /// This node's incarnation.
    pub generation: u64,
    /// Every member known, dead ones included until forgotten.
    pub peers: Vec<PeerInfo>,
}

/// Capabilities as the API shows them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CapsView {
    /// Node id.
    pub node_id: String,
    /// Coordinator URL.
    pub url: String,
    /// Version (newer replaces older).
    pub seq: u64,
    /// When the node published it (ms since the epoch).
    pub issued_ms: u64,
    /// Task kinds its agents run.
    pub kinds: Vec<TaskKind>,
    /// Models it serves.
    pub models: Vec<String>,
    /// Its resource class.
    pub resource_class: ResourceClass,
    /// Task slots of its live agents.
    pub slots: u32,
    /// Slots not leased.
    pub free_slots: u32,
    /// Leased share of its slots, percent.
    pub load_pct: u16,
    /// Credits per task it asks (0: free).
    pub price: u32,
    /// Memory for models from its hardware detection (MiB; 0 unknown).
    pub model_budget_mib: u32,
    /// Whether it runs below capacity now (throttling).
    pub throttled: bool,
}

impl CapsView {
    fn of(c: &CapRecord) -> Self {
        CapsView {
            node_id: node_id(&c.node),
            url: c.url.clone(),
            seq: c.seq,
            issued_ms: c.issued_ms,
            kinds: c.kinds.clone(),
            models: c.models.clone(),
            resource_class: c.resource_class,
            slots: c.slots,
            free_slots: c.free_slots,
            load_pct: c.load_pct,
            price: c.price,
            model_budget_mib: c.model_budget_mib,
            throttled: c.throttled,
        }
    }
}

/// A blacklist record as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlacklistView {
    /// Who reported it (node key).
    pub reporter: String,
    /// Position in the reporter's chain.
    pub seq: u64,
    /// The blacklisted node's key.
    pub target: String,
    /// Why.
    pub reason: BlacklistReason,
    /// SHA-256 of the evidence, hex.
    pub evidence_sha256: String,
    /// When (ms since the epoch).
    pub issued_ms: u64,
    /// Whether this node drops the target's messages (the reporter is trusted).
    pub enforced: bool,
}

impl BlacklistView {
    fn of(b: &BlacklistRecord, enforced: bool) -> Self {
        BlacklistView {
            reporter: b.reporter.to_string(),
            seq: b.seq,
            target: b.target.to_string(),
            reason: b.reason,
            evidence_sha256: b.evidence.iter().map(|x| format!("{x:02x}")).collect(),
            issued_ms: b.issued_ms,
            enforced,
        }
    }
}

fn node_id(k: &KeyId) -> String {
    k.node_id().map(|n| n.to_string()).unwrap_or_default()
}

/// Remembers (sender, nonce) pairs for one window.
#[derive(Default)]
struct Nonces {
    seen: HashMap<(KeyId, [u8; 16]), u64>,
    order: VecDeque<(u64, KeyId, [u8; 16])>,
}

impl Nonces {
    /// `Ok(false)` when the pair was seen (a replay); `Err` when the cache is full of unexpired
    /// entries (refusing is safer than forgetting). `expires` is when it may be forgotten.
    fn insert(&mut self, key: KeyId, nonce: [u8; 16], now: u64, expires: u64) -> Result<bool, ()> {
        while let Some(&(t, k, n)) = self.order.front() {
            if t > now {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&(k, n));
        }
        if self.seen.contains_key(&(key, nonce)) {
            return Ok(false);
        }
        if self.seen.len() >= MAX_NONCES {
            return Err(());
        }
        self.seen.insert((key, nonce), expires);
        self.order.push_back((expires, key, nonce));
        Ok(true)
    }
}

struct Inner {
    identity: Arc<Identity>,
    cfg: MeshConfig,
    url: String,
    boot_ms: u64,
    core: Mutex<Core>,
    /// When the driver plans to wake next (ms): a change that needs it sooner notifies it.
    planned_wake: AtomicU64,
    wake: tokio::sync::Notify,
    client: reqwest::Client,
    nonces: Mutex<Nonces>,
    counters: Counters,
    inflight: Arc<Semaphore>,
    state: CoordinatorState,
    tracker: TaskTracker,
    token: CancellationToken,
    /// Tasks offered to peers: until when the offer stands (and the task is not offered
    /// again), and to whom. Only those peers may claim it.
    offered: Mutex<HashMap<TaskId, (u64, Vec<KeyId>)>>,
    /// Sessions held with origins this node runs tasks for, one lock per origin (registration
    /// is an HTTP round trip; other origins must not wait for it).
    origins: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Origin>>>>>,
    /// Origin tasks running here, per origin URL (sent when registering again, so that a new
    /// session does not release their leases).
    remote_running: Mutex<HashMap<String, HashMap<TaskId, u32>>>,
    /// This node's own agents besides its worker (`coordinator.agent_keys`).
    own_agents: Vec<KeyId>,
    /// The node's hardware detection (its resource class is what the mesh is told).
    hardware: crate::hw::HwSlot,
    /// Per (address, claimed sender) limit, checked before any decoding.
    sender_limits: crate::security::ratelimit::Limiter<(std::net::IpAddr, KeyId)>,
    /// Offers being considered or run here now.
    executing: Arc<Semaphore>,
    /// Offers considered or run now, per origin.
    per_origin: Mutex<HashMap<KeyId, usize>>,
    /// Task lease length and heartbeat period of this node (peers use the same defaults).
    heartbeat: Duration,
    pcounters: PlacementCounters,
    /// Origin tasks cancelled while running here (a heartbeat for one task may carry the
    /// cancellation of another run for the same origin).
    cancelled: Mutex<std::collections::HashSet<TaskId>>,
}

/// A session with an origin's coordinator, as one of its agents.
#[derive(Clone)]
struct Origin {
    client: Arc<CoordinatorClient>,
    session: u64,
}

#[derive(Debug, Default)]
struct PlacementCounters {
    offers_sent: AtomicU64,
    offers_received: AtomicU64,
    offers_refused: AtomicU64,
    claims_won: AtomicU64,
    claims_lost: AtomicU64,
    remote_succeeded: AtomicU64,
    remote_failed: AtomicU64,
}

/// The running mesh of one node.
#[derive(Clone)]
pub struct Mesh(Arc<Inner>);

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").field("url", &self.0.url).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Mesh {
    /// Starts the mesh: this node at `url`, its loops on `tracker` until `token` is cancelled.
    ///
    /// # Errors
    /// The HTTP client could not be built.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        cfg: &MeshConfig,
        identity: Arc<Identity>,
        url: String,
        state: CoordinatorState,
        heartbeat: Duration,
        own_agents: Vec<KeyId>,
        hardware: crate::hw::HwSlot,
        tracker: TaskTracker,
        token: CancellationToken,
    ) -> Result<Mesh, reqwest::Error> {
        let now = crate::clock::now_ms();
        let tuning = Tuning {
            probe_period: cfg.probe_period,
            suspicion_min: cfg.suspect_timeout,
            sync_interval: cfg.sync_interval,
            ..Tuning::default()
        };
        let core = Core::new(
            identity.clone(),
            &url,
            tuning,
            cfg.trusted_reporters.iter().copied(),
            now,
            u64::from_le_bytes(crate::clock::random_bytes::<8>()),
        );
        let client = crate::http::client_builder()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        let mesh = Mesh(Arc::new(Inner {
            identity,
            url,
            boot_ms: now,
            core: Mutex::new(core),
            planned_wake: AtomicU64::new(u64::MAX),
            wake: tokio::sync::Notify::new(),
            client,
            nonces: Mutex::new(Nonces::default()),
            counters: Counters::default(),
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT)),
            state,
            tracker: tracker.clone(),
            token: token.clone(),
            cfg: cfg.clone(),
            offered: Mutex::new(HashMap::new()),
            origins: Mutex::new(HashMap::new()),
            remote_running: Mutex::new(HashMap::new()),
            own_agents,
            hardware,
            sender_limits: crate::security::ratelimit::Limiter::new(
                cfg.per_peer_rate,
                cfg.per_peer_rate.saturating_mul(2),
            ),
            executing: Arc::new(Semaphore::new(MAX_EXECUTING)),
            per_origin: Mutex::new(HashMap::new()),
            heartbeat,
            pcounters: PlacementCounters::default(),
            cancelled: Mutex::new(std::collections::HashSet::new()),
        }));
        for u in &cfg.bootstrap_urls {
            let m = mesh.clone();
            let u = u.clone();
            tracker.spawn(async move { m.bootstrap(u).await });
        }
        let m = mesh.clone();
        tracker.spawn(async move { m.drive().await });
        let m = mesh.clone();
        tracker.spawn(async move { m.caps_loop().await });
        let m = mesh.clone();
        tracker.spawn(async move { m.placement_loop().await });
        tracing::info!(url = %mesh.0.url, bootstrap = ?cfg.bootstrap_urls, "mesh started");
        Ok(mesh)
    }

    /// What `/identity` adds.
    pub fn identity(&self) -> MeshIdentity {
        let core = lock(&self.0.core);
        let me = core.me();
        MeshIdentity {
            url: me.url.clone(),
            generation: me.generation,
            peer: URL_SAFE_NO_PAD
                .encode(postcard::to_allocvec(core.own_record()).unwrap_or_default()),
        }
    }

    /// Counters.
    pub fn stats(&self) -> MeshStats {
        let c = &self.0.counters;
        let core = lock(&self.0.core).stats();
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MeshStats {
            accepted: g(&c.accepted),
            too_large: g(&c.too_large),
            rate_limited: g(&c.rate_limited),
            malformed: g(&c.malformed),
            bad_signature: g(&c.bad_signature),
            stale: g(&c.stale),
            replayed: g(&c.replayed),
            blacklisted: g(&c.blacklisted) + core.blacklisted_dropped,
            not_allowed: g(&c.not_allowed),
            sent: g(&c.sent),
            send_failed: g(&c.send_failed),
            send_dropped: g(&c.send_dropped),
            swim_rejected: core.swim_rejected,
            unknown_sender: core.swim.unknown_sender,
            probes: core.swim.probes,
            probes_failed: core.swim.probes_failed,
            suspected: core.swim.suspected,
            declared_dead: core.swim.declared_dead,
            refuted: core.swim.refuted,
            health: core.swim.health,
            records_rejected: core.records_rejected,
            records_learned: core.records_learned,
            syncs: core.syncs,
            offers_sent: g(&self.0.pcounters.offers_sent),
            offers_received: g(&self.0.pcounters.offers_received),
            offers_refused: g(&self.0.pcounters.offers_refused),
            claims_won: g(&self.0.pcounters.claims_won),
            claims_lost: g(&self.0.pcounters.claims_lost),
            remote_succeeded: g(&self.0.pcounters.remote_succeeded),
            remote_failed: g(&self.0.pcounters.remote_failed),
        }
    }

    /// Every member with its state and capabilities.
    pub fn peers(&self) -> PeersView {
        let core = lock(&self.0.core);
        let me = core.me().clone();
        let mut peers: Vec<PeerInfo> = core
            .peers()
            .into_iter()
            .map(|p| PeerInfo {
                node_id: node_id(&p.id.key),
                key: p.id.key.to_string(),
                url: p.id.url.clone(),
                state: p.state,
                generation: p.id.generation,
                last_seen_ms: p.last_seen_ms,
                capabilities: core.with_records(|r| r.caps_of(&p.id.key).map(CapsView::of)),
            })
            .collect();
        peers.sort_by(|a, b| a.url.cmp(&b.url));
        PeersView {
            node_id: node_id(&me.key),
            url: me.url,
            generation: me.generation,
            peers,
        }
    }

    /// Every capability record held (this node's included).
    pub fn capabilities(&self) -> Vec<CapsView> {
        let core = lock(&self.0.core);
        let mut v: Vec<CapsView> = core.with_records(|r| r.caps().map(CapsView::of).collect());
        v.sort_by(|a, b| a.url.cmp(&b.url));
        v
    }

    /// Leaves the cluster: tells a few members this node is going, and waits briefly for
    /// those envelopes to go out.
    pub async fn leave(&self) {
        let out = {
            let mut core = lock(&self.0.core);
            core.leave(crate::clock::now_ms());
            core.drain()
        };
        let mut sends = Vec::new();
        for (to, msg) in out.send {
            let env = wire::seal(&self.0.identity, msg, crate::clock::now_ms());
            sends.push(self.post(to.url.clone(), env));
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            futures_util::future::join_all(sends),
        )
        .await;
    }

    /// Runs `f` on the core, then acts on what it produced (and wakes the driver if the core
    /// now has work sooner than it planned).
    fn with_core(&self, f: impl FnOnce(&mut Core)) {
        let (out, next) = {
            let mut core = lock(&self.0.core);
            f(&mut core);
            (core.drain(), core.next_wakeup())
        };
        if next < self.0.planned_wake.load(Ordering::Relaxed) {
            self.0.wake.notify_one();
        }
        self.act(out);
    }

    fn evict(&self, key: KeyId) {
        self.with_core(|c| c.evict(&key, crate::clock::now_ms()));
    }

    /// Sends what the core asked to send, arms its timers, reports its events.
    fn act(&self, out: super::core::Outputs) {
        for (to, msg) in out.send {
            self.send(to, msg);
        }
        for e in out.events {
            match e {
                Event::PeerUp(p) => {
                    tracing::info!(peer = %node_id(&p.key), url = %p.url, generation = p.generation, "mesh.peer up");
                }
                Event::PeerDown(p) => {
                    tracing::warn!(peer = %node_id(&p.key), url = %p.url, "mesh.peer down");
                }
                Event::Refuted { dead } => {
                    if dead {
                        tracing::warn!(
                            "mesh.refuted: the mesh had declared this node dead; it is back"
                        );
                    } else {
                        tracing::info!("mesh.refuted: a suspicion of this node was refuted");
                    }
                }
                Event::Record(Record::Blacklist(b)) => {
                    let enforced = lock(&self.0.core).with_records(|r| r.is_listed(&b.target));
                    tracing::warn!(target = %node_id(&b.target), reporter = %node_id(&b.reporter), reason = ?b.reason, enforced, "mesh.blacklist record");
                    if enforced {
                        self.evict(b.target);
                    }
                }
                Event::Offer { from, offer } => {
                    self.0
                        .pcounters
                        .offers_received
                        .fetch_add(1, Ordering::Relaxed);
                    let Some(slot) = OriginSlot::take(self, from) else {
                        self.0
                            .pcounters
                            .offers_refused
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(
                            "mesh.offer ignored: this origin has {MAX_PER_ORIGIN} offers here already"
                        );
                        continue;
                    };
                    match self.0.executing.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let m = self.clone();
                            self.0.tracker.spawn(async move {
                                m.consider(from, offer).await;
                                drop(permit);
                                drop(slot);
                            });
                        }
                        Err(_) => {
                            self.0
                                .pcounters
                                .offers_refused
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::debug!("mesh.offer ignored: busy with other offers");
                        }
                    }
                }
                Event::Record(Record::Caps(_) | Record::Peer(_)) => {}
            }
        }
    }

    fn send(&self, to: PeerId, msg: wire::Message) {
        let Ok(permit) = self.0.inflight.clone().try_acquire_owned() else {
            self.0.counters.send_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let env = wire::seal(&self.0.identity, msg, crate::clock::now_ms());
        let m = self.clone();
        self.0.tracker.spawn(async move {
            m.post(to.url, env).await;
            drop(permit);
        });
    }

    async fn post(&self, base: String, env: Vec<u8>) {
        let c = &self.0.counters;
        let r = self
            .0
            .client
            .post(format!("{}/mesh/ingest", base.trim_end_matches('/')))
            .header("content-type", "application/octet-stream")
            .timeout(SEND_TIMEOUT)
            .body(env)
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => {
                c.sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(resp) => {
                c.send_failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %base, status = %resp.status(), "mesh.send refused");
            }
            Err(e) => {
                c.send_failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %base, error = %e, "mesh.send failed");
            }
        }
    }

    /// Sleeps until the core's next wake-up (or until woken sooner), then ticks it.
    async fn drive(self) {
        let mut last_prune = crate::clock::now_ms();
        loop {
            let next = lock(&self.0.core).next_wakeup();
            self.0.planned_wake.store(next, Ordering::Relaxed);
            let now = crate::clock::now_ms();
            // A node alone has nothing due; it still tidies its rate limiter now and then.
            let wait = next.saturating_sub(now).min(60_000);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                _ = self.0.wake.notified() => continue,
                _ = self.0.token.cancelled() => return,
            }
            let now = crate::clock::now_ms();
            self.0.planned_wake.store(u64::MAX, Ordering::Relaxed);
            self.with_core(|c| c.tick(now));
            if now >= last_prune + 60_000 {
                last_prune = now;
                self.0.sender_limits.retain_recent();
            }
        }
    }

    /// Joins through one bootstrap URL: fetches its identity until it answers.
    async fn bootstrap(self, base: String) {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.fetch_peer(&base).await {
                Ok((key, _)) if key == self.0.identity.key_id() => {
                    tracing::debug!(url = %base, "mesh.bootstrap skips this node's own URL");
                    return;
                }
                Ok((key, record)) => {
                    tracing::info!(url = %base, peer = %node_id(&key), "mesh.bootstrap joining");
                    let now = crate::clock::now_ms();
                    self.with_core(|c| {
                        if let Err(e) = c.join(&record, now) {
                            tracing::warn!(url = %base, error = %e, "mesh.bootstrap identity refused");
                        }
                    });
                    return;
                }
                Err(e) => {
                    tracing::debug!(url = %base, error = %e, retry_in = ?delay, "mesh.bootstrap peer not reachable yet");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.0.token.cancelled() => return,
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    /// `GET /identity` of the node at `base`.
    async fn identity_of(&self, base: &str) -> anyhow::Result<crate::coordinator::IdentityView> {
        Ok(self
            .0
            .client
            .get(format!("{}/identity", base.trim_end_matches('/')))
            .timeout(SEND_TIMEOUT)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// The signed identity record `/identity` of the node at `base` hands out.
    async fn fetch_peer(&self, base: &str) -> anyhow::Result<(KeyId, wire::SignedRecord)> {
        let v = self.identity_of(base).await?;
        let m = v
            .mesh
            .ok_or_else(|| anyhow::anyhow!("the node at {base} does not take part in a mesh"))?;
        let bytes = URL_SAFE_NO_PAD.decode(m.peer)?;
        let record: wire::SignedRecord = postcard::from_bytes(&bytes)?;
        match record.open()? {
            Record::Peer(p) => Ok((p.node, record)),
            _ => anyhow::bail!("the node at {base} sent something other than its identity"),
        }
    }

    /// What this node can run now, from its live agents.
    fn current_caps(&self) -> CapRecord {
        let mut caps = CapRecord {
            node: self.0.identity.key_id(),
            seq: 0,
            issued_ms: 0,
            url: self.0.url.clone(),
            x25519: self.0.identity.x25519_public().to_bytes(),
            kinds: Vec::new(),
            models: Vec::new(),
            resource_class: ResourceClass::Tiny,
            slots: 0,
            free_slots: 0,
            load_pct: 0,
            price: 0,
            model_budget_mib: 0,
            throttled: false,
        };
        let mut leased = 0u32;
        for a in self
            .0
            .state
            .agents()
            .into_iter()
            .filter(|a| a.live && self.is_own_agent(a))
        {
            for k in &a.capabilities.kinds {
                if !caps.kinds.contains(k) {
                    caps.kinds.push(*k);
                }
            }
            for m in &a.capabilities.models {
                if !caps.models.contains(m) && caps.models.len() < wire::MAX_MODELS {
                    caps.models.push(m.clone());
                }
            }
            caps.resource_class = caps.resource_class.max(a.capabilities.resource_class);
            caps.slots = caps.slots.saturating_add(a.capabilities.slots);
            leased = leased.saturating_add(a.leases);
        }
        // The node's hardware detection, re-read on a timer, decides its class (a throttled or
        // memory-starved box advertises less); agents' own claims only raise it.
        if let Some(hw) = crate::hw::current(&self.0.hardware) {
            caps.resource_class = hw.class;
            caps.model_budget_mib =
                u32::try_from(hw.capacity.model_memory_budget >> 20).unwrap_or(u32::MAX);
            caps.throttled = hw.throttling.active();
        }
        caps.kinds.sort_by_key(|k| format!("{k:?}"));
        caps.models.sort();
        caps.free_slots = caps.slots.saturating_sub(leased);
        caps.load_pct = if caps.slots == 0 {
            0
        } else {
            (u64::from(leased.min(caps.slots)) * 100 / u64::from(caps.slots)) as u16
        };
        caps
    }

    async fn caps_loop(self) {
        let mut last: Option<CapRecord> = None;
        let mut last_at = 0u64;
        let every = self.0.cfg.caps_interval.as_millis() as u64;
        let mut t = tokio::time::interval(CAPS_CHECK);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = t.tick() => {}
                _ = self.0.token.cancelled() => return,
            }
            let caps = self.current_caps();
            let now = crate::clock::now_ms();
            let members = lock(&self.0.core).active_count();
            if caps_due(
                last.as_ref(),
                &caps,
                now.saturating_sub(last_at),
                load_interval(members),
                every,
            ) {
                last = Some(caps.clone());
                last_at = now;
                self.with_core(|c| c.publish_caps(caps, now));
            }
        }
    }

    /// Checks and delivers one envelope; the error is what the sender is told.
    fn ingest(&self, ip: std::net::IpAddr, env: &[u8]) -> Result<(), ApiError> {
        let c = &self.0.counters;
        let cfg = &self.0.cfg;
        let max = usize::try_from(cfg.max_envelope).unwrap_or(usize::MAX);
        if env.len() > max {
            c.too_large.fetch_add(1, Ordering::Relaxed);
            return Err(too_large(env.len(), max));
        }
        let Some(sender) = wire::peek_sender(env) else {
            c.malformed.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::bad_request("envelope too short"));
        };
        // Keyed by address and claimed sender: the sender is not verified yet, so a spoofer
        // elsewhere cannot use up an honest peer's allowance.
        if let Err(wait) = self.0.sender_limits.check(&(ip, sender)) {
            c.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "this sender is over mesh.per_peer_rate",
            )
            .retry_after(wait));
        }
        let now = crate::clock::now_ms();
        let window = cfg.window.as_millis() as u64;
        let body = match wire::open(env, max, now, window) {
            Ok(b) => b,
            Err(e) => return Err(self.refused(e)),
        };
        if body.sent_ms < self.0.boot_ms {
            c.stale.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "stale",
                "envelope sent before this node started",
            ));
        }
        if !cfg.peer_keys.is_empty() && !cfg.peer_keys.contains(&body.sender) {
            c.not_allowed.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "not_allowed",
                "sender is not in mesh.peer_keys",
            ));
        }
        match lock(&self.0.nonces).insert(body.sender, body.nonce, now, body.sent_ms + window) {
            Ok(true) => {}
            Ok(false) => {
                c.replayed.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "replayed",
                    "this envelope was delivered before",
                ));
            }
            Err(()) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    "replay cache full; retry shortly",
                )
                .retry_after(Duration::from_secs(1)));
            }
        }
        if lock(&self.0.core).with_records(|r| r.is_listed(&body.sender)) {
            c.blacklisted.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "blacklisted",
                "sender is blacklisted",
            ));
        }
        c.accepted.fetch_add(1, Ordering::Relaxed);
        self.with_core(|core| core.handle_message(body.sender, body.msg, now));
        Ok(())
    }

    fn refused(&self, e: WireError) -> ApiError {
        let c = &self.0.counters;
        match e {
            WireError::TooLarge(n) => {
                c.too_large.fetch_add(1, Ordering::Relaxed);
                too_large(n, self.0.cfg.max_envelope as usize)
            }
            WireError::BadSignature => {
                c.bad_signature.fetch_add(1, Ordering::Relaxed);
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "bad_signature",
                    "envelope signature does not verify",
                )
            }
            WireError::Stale { skew_ms } => {
                c.stale.fetch_add(1, Ordering::Relaxed);
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "stale",
                    format!("envelope sent {skew_ms} ms away from this node's clock"),
                )
            }
            other => {
                c.malformed.fetch_add(1, Ordering::Relaxed);
                ApiError::bad_request(format!("envelope {other}"))
            }
        }
    }
}

/// Whether capabilities are published now: at once when what the node can run changed, at
/// most every `load_every_ms` when only its load did, and every `every_ms` regardless (`since_ms`
/// since the last publication).
fn caps_due(
    last: Option<&CapRecord>,
    caps: &CapRecord,
    since_ms: u64,
    load_every_ms: u64,
    every_ms: u64,
) -> bool {
    let Some(last) = last else {
        return true;
    };
    let load_only = |c: &CapRecord| CapRecord {
        free_slots: 0,
        load_pct: 0,
        ..c.clone()
    };
    if load_only(last) != load_only(caps) {
        return true;
    }
    (last != caps && since_ms >= load_every_ms) || since_ms >= every_ms
}

/// How often load changes alone are published with `members` others in the mesh: every 2 s up
/// to 100 members, 2 s more for each further hundred, at most every 30 s. Every record reaches
/// every node, so the mesh-wide cost of load updates grows with the square of its size; this
/// keeps each node's share near 100 bytes/s of records however large the mesh.
fn load_interval(members: usize) -> u64 {
    (2_000 * members.div_ceil(100).max(1) as u64).min(30_000)
}

/// One origin's place among the offers considered or run here; given back on drop.
struct OriginSlot {
    mesh: Mesh,
    origin: KeyId,
}

impl OriginSlot {
    /// A place for `origin`, unless it holds `MAX_PER_ORIGIN` already.
    fn take(mesh: &Mesh, origin: KeyId) -> Option<OriginSlot> {
        admit(&mut lock(&mesh.0.per_origin), origin, MAX_PER_ORIGIN).then(|| OriginSlot {
            mesh: mesh.clone(),
            origin,
        })
    }
}

impl Drop for OriginSlot {
    fn drop(&mut self) {
        release(&mut lock(&self.mesh.0.per_origin), &self.origin);
    }
}

/// Counts one more for `origin` unless it has `max` already.
fn admit(counts: &mut HashMap<KeyId, usize>, origin: KeyId, max: usize) -> bool {
    let n = counts.entry(origin).or_insert(0);
    if *n >= max {
        return false;
    }
    *n += 1;
    true
}

/// Counts one less for `origin` (forgetting it at zero, so the map holds only origins with
/// work here).
fn release(counts: &mut HashMap<KeyId, usize>, origin: &KeyId) {
    if let Some(n) = counts.get_mut(origin) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(origin);
        }
    }
}

/// How often the origin looks for tasks to offer.
const PLACEMENT_TICK: Duration = Duration::from_millis(250);

/// Peers one task is offered to at once.
const OFFER_FANOUT: usize = 3;

/// An offer stands this long.
const OFFER_TTL_MS: u64 = 10_000;

/// An offered task still queued after this long is offered again (lost offers, an executor
/// whose lease expired).
const REOFFER_AFTER_MS: u64 = 3_000;

/// Unit of the claim delay: a fully loaded peer waits 4 units more than an idle one, a peer
/// two resource classes above what the task needs one unit more.
const CLAIM_UNIT_MS: f64 = 20.0;

/// Random spread added to every claim delay so that equal peers do not claim in lockstep (the
/// losers only get an empty answer, so this can be small).
const CLAIM_JITTER_MS: f64 = 4.0;

/// The delay before claiming an offer: grows with this node's load, and with how far its
/// resource class exceeds what the task needs (big nodes leave small tasks to small ones);
/// jittered so that equal peers do not claim in lockstep. An idle, exactly fitting peer
/// claims within `CLAIM_JITTER_MS`.
pub fn claim_delay(caps: &CapRecord, min_class: Option<ResourceClass>, jitter: f64) -> Duration {
    let load = if caps.slots == 0 {
        1.0
    } else {
        1.0 - f64::from(caps.free_slots.min(caps.slots)) / f64::from(caps.slots)
    };
    let surplus = caps.resource_class as u8 as f64 - min_class.unwrap_or_default() as u8 as f64;
    let ms = CLAIM_UNIT_MS * ((1.0 + 4.0 * load) * (1.0 + 0.5 * surplus.max(0.0)) - 1.0)
        + CLAIM_JITTER_MS * jitter.clamp(0.0, 1.0);
    Duration::from_micros((ms.max(0.0) * 1000.0) as u64)
}

/// The class a claimant's surplus is measured from: the smallest among the live members that
/// advertise free slots and what the task needs (this node included), and at least what the
/// task asks for. Among equal peers nobody waits for being big; a big peer still waits for
/// small ones that can take the task.
pub fn claim_floor(
    min_class: Option<ResourceClass>,
    own: ResourceClass,
    candidates: impl IntoIterator<Item = ResourceClass>,
) -> ResourceClass {
    let smallest = candidates.into_iter().fold(own, ResourceClass::min);
    smallest.max(min_class.unwrap_or_default())
}

fn caps_of(c: &CapRecord) -> Capabilities {
    Capabilities {
        kinds: c.kinds.clone(),
        models: c.models.clone(),
        resource_class: c.resource_class,
        slots: c.slots,
    }
}

impl Mesh {
    /// Whether `key` is a live member that may act as an agent of this coordinator (claim
    /// what it was offered): active in the membership, allowed, not blacklisted.
    pub fn is_peer(&self, key: &KeyId) -> bool {
        if *key == self.0.identity.key_id()
            || (!self.0.cfg.peer_keys.is_empty() && !self.0.cfg.peer_keys.contains(key))
        {
            return false;
        }
        // Any membership state: a peer suspected (or declared dead) while it runs a task may
        // still report it; claims also need an offer made to it (`was_offered`).
        let core = lock(&self.0.core);
        core.knows(key) && !core.with_records(|r| r.is_listed(key))
    }

    /// Whether `task` was offered to `key` and the offer still stands.
    pub fn was_offered(&self, key: &KeyId, task: TaskId) -> bool {
        let now = crate::clock::now_ms();
        lock(&self.0.offered)
            .get(&task)
            .is_some_and(|(reoffer_at, to)| {
                // The latest offer was made at reoffer_at - REOFFER_AFTER_MS.
                reoffer_at.saturating_sub(REOFFER_AFTER_MS) + OFFER_TTL_MS > now && to.contains(key)
            })
    }

    /// Whether this node holds `key`'s capability record (and so its encryption key).
    pub fn has_caps(&self, key: &KeyId) -> bool {
        lock(&self.0.core).with_records(|r| r.caps_of(key).is_some())
    }

    /// Whether `key` is one of this node's own agents (its worker, `coordinator.agent_keys`)
    /// rather than a mesh peer registered to run offered tasks.
    fn is_own_agent(&self, a: &crate::coordinator::model::AgentView) -> bool {
        a.local || self.0.own_agents.contains(&a.agent)
    }

    /// Seals a value to a peer's X25519 key (from its capability record).
    ///
    /// # Errors
    /// No capability record of the peer yet.
    pub fn seal_for(
        &self,
        key: &KeyId,
        aad: &str,
        v: &serde_json::Value,
    ) -> Result<serde_json::Value, ApiError> {
        let x = lock(&self.0.core).with_records(|r| r.caps_of(key).map(|c| c.x25519));
        let x = x.ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "peer_unknown",
                "no capability record (and so no encryption key) for this peer yet",
            )
        })?;
        Ok(seal::seal_json(&x, aad, v))
    }

    /// Opens a value a peer sealed to this node.
    ///
    /// # Errors
    /// Not sealed, or not to this node in this context.
    pub fn open_sealed(
        &self,
        aad: &str,
        v: &serde_json::Value,
    ) -> Result<serde_json::Value, ApiError> {
        seal::open_json(self.0.identity.x25519_secret(), aad, v)
            .map_err(|e| ApiError::bad_request(format!("sealed data: {e}")))
    }

    /// Publishes a blacklist record against `target` (signed by this node, chained to its
    /// previous records), stops talking to it, and returns the record as the API shows it.
    ///
    /// # Errors
    /// The target is this node.
    pub fn blacklist(
        &self,
        target: KeyId,
        reason: BlacklistReason,
        evidence: &[u8],
    ) -> Result<BlacklistView, ApiError> {
        let me = self.0.identity.key_id();
        if target == me {
            return Err(ApiError::bad_request("a node cannot blacklist itself"));
        }
        let now = crate::clock::now_ms();
        let mut rec = None;
        self.with_core(|c| {
            let (seq, prev) = c.with_records(|r| r.chain_head(&me));
            let r = BlacklistRecord {
                reporter: me,
                seq: seq + 1,
                prev,
                target,
                reason,
                evidence: sha2::Sha256::digest(evidence).into(),
                issued_ms: now,
            };
            c.publish(Record::Blacklist(r.clone()), now);
            c.evict(&target, now);
            rec = Some(r);
        });
        tracing::warn!(target = %node_id(&target), ?reason, "mesh.blacklist published");
        rec.map(|r| BlacklistView::of(&r, true))
            .ok_or_else(|| ApiError::bad_request("not recorded"))
    }

    /// Every blacklist record held, and whether this node enforces it.
    pub fn blacklist_view(&self) -> Vec<BlacklistView> {
        let core = lock(&self.0.core);
        core.with_records(|r| {
            r.blacklist()
                .map(|b| BlacklistView::of(b, r.is_listed(&b.target)))
                .collect()
        })
    }

    /// Models the mesh's other live nodes advertise.
    pub fn peer_models(&self) -> Vec<String> {
        let core = lock(&self.0.core);
        let mut v: Vec<String> = core
            .active()
            .filter_map(|p| core.with_records(|r| r.caps_of(&p.key).map(|c| c.models.clone())))
            .flatten()
            .collect();
        v.sort();
        v.dedup();
        v
    }

    async fn placement_loop(self) {
        let mut t = tokio::time::interval(PLACEMENT_TICK);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let state = self.0.state.clone();
        loop {
            // A submission wakes the loop at once (tasks no local agent can run are offered
            // without delay); the tick catches the rest (tasks that waited offer_after,
            // requeues, peers that appeared).
            let work = state.work_notified();
            tokio::pin!(work);
            work.as_mut().enable();
            self.place();
            tokio::select! {
                _ = t.tick() => {}
                _ = &mut work => {
                    // Let the submission's commit (and any right behind it) land first.
                    tokio::task::yield_now().await;
                }
                _ = self.0.token.cancelled() => return,
            }
        }
    }

    /// Offers queued tasks this node cannot run (soon enough) to peers that advertise a match.
    fn place(&self) {
        let now = crate::clock::now_ms();
        let offer_after = self.0.cfg.offer_after.as_millis() as u64;
        let peers: Vec<(PeerId, CapRecord)> = {
            let core = lock(&self.0.core);
            core.active()
                .filter_map(|p| {
                    core.with_records(|r| {
                        (!r.is_listed(&p.key))
                            .then(|| r.caps_of(&p.key).cloned())
                            .flatten()
                    })
                    .map(|c| (p.clone(), c))
                })
                .filter(|(p, _)| {
                    self.0.cfg.peer_keys.is_empty() || self.0.cfg.peer_keys.contains(&p.key)
                })
                .collect()
        };
        if peers.is_empty() {
            return;
        }
        let fits = |t: &crate::coordinator::model::TaskRecord, c: &CapRecord| {
            c.free_slots > 0 && caps_of(c).matches(t.kind, &t.requirements)
        };
        let tasks = {
            let offered = lock(&self.0.offered);
            self.0.state.offerable(
                now,
                offer_after,
                |k, local| local || self.0.own_agents.contains(k),
                // Offered a moment ago, or nobody can take it: not this round.
                |t| {
                    offered.get(&t.id).is_some_and(|(u, _)| *u > now)
                        || !peers.iter().any(|(_, c)| fits(t, c))
                },
                64,
            )
        };
        if tasks.is_empty() {
            return;
        }
        let me_x = self.0.identity.x25519_public().to_bytes();
        let mut sends = Vec::new();
        {
            let mut offered = lock(&self.0.offered);
            offered.retain(|_, (until, _)| *until + 60_000 > now);
            for t in tasks {
                let mut fit: Vec<&(PeerId, CapRecord)> =
                    peers.iter().filter(|(_, c)| fits(&t, c)).collect();
                if fit.is_empty() {
                    continue;
                }
                fit.sort_by_key(|(_, c)| (c.load_pct, std::cmp::Reverse(c.free_slots)));
                let offer = Offer {
                    task: t.id,
                    kind: t.kind,
                    model: t.requirements.model.clone(),
                    min_class: t.requirements.min_class,
                    origin_url: self.0.url.clone(),
                    origin_x25519: me_x,
                    expires_ms: now + OFFER_TTL_MS,
                };
                let entry = offered.entry(t.id).or_insert((0, Vec::new()));
                entry.0 = now + REOFFER_AFTER_MS;
                for (p, _) in fit.into_iter().take(OFFER_FANOUT) {
                    if !entry.1.contains(&p.key) {
                        entry.1.push(p.key);
                    }
                    sends.push((p.clone(), Message::Offer(offer.clone())));
                }
            }
        }
        for (p, m) in sends {
            self.0.pcounters.offers_sent.fetch_add(1, Ordering::Relaxed);
            self.send(p, m);
        }
    }

    /// An offer arrived: wait the claim delay, claim from the origin, run it here.
    async fn consider(self, from: KeyId, offer: Offer) {
        let now = crate::clock::now_ms();
        if offer.expires_ms <= now {
            return;
        }
        // Only the member that owns `origin_url` may offer work there: nobody can point this
        // node at a third party.
        let genuine = lock(&self.0.core)
            .active()
            .any(|p| p.key == from && p.url == offer.origin_url);
        // Results are sealed to the key the origin published in its own signed capability
        // record, never to one an offer names.
        let origin_x = lock(&self.0.core).with_records(|r| r.caps_of(&from).map(|c| c.x25519));
        if !genuine || origin_x != Some(offer.origin_x25519) {
            tracing::debug!(origin = %offer.origin_url, "mesh.offer not from the origin's owner, or no capability record of it; ignored");
            return;
        }
        let req = Requirements {
            model: offer.model.clone(),
            min_class: offer.min_class,
            max_tokens: None,
        };
        let caps = self.current_caps();
        if caps.free_slots == 0 || !caps_of(&caps).matches(offer.kind, &req) {
            return;
        }
        let jitter = f64::from(u16::from_le_bytes(crate::clock::random_bytes::<2>())) / 65535.0;
        let others: Vec<ResourceClass> = {
            let core = lock(&self.0.core);
            core.active()
                .filter_map(|p| core.with_records(|r| r.caps_of(&p.key).cloned()))
                .filter(|c| c.free_slots > 0 && caps_of(c).matches(offer.kind, &req))
                .map(|c| c.resource_class)
                .collect()
        };
        let floor = claim_floor(offer.min_class, caps.resource_class, others);
        let delay = claim_delay(&caps, Some(floor), jitter);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.0.token.cancelled() => return,
        }
        if self.current_caps().free_slots == 0 {
            return;
        }
        let mut reply = None;
        for _ in 0..2 {
            let origin = match self.origin(&offer.origin_url, from, &caps_of(&caps)).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::debug!(origin = %offer.origin_url, error = %e, "mesh.claim cannot register with the origin");
                    return;
                }
            };
            let claim = Claim {
                session: origin.session,
                max: 1,
                task: Some(offer.task),
            };
            match origin
                .client
                .post::<_, ClaimReply>("/agents/claim", &claim)
                .await
            {
                Ok(r) => {
                    reply = Some((origin, r));
                    break;
                }
                // A lapsed session (the origin restarted or reaped us): register again once,
                // listing what runs here for it so that those leases survive.
                Err(ClientError::Api { code, .. }) if code == "agent_not_registered" => {
                    self.forget_origin(&offer.origin_url, origin.session);
                }
                Err(e) => {
                    tracing::debug!(origin = %offer.origin_url, error = %e, "mesh.claim failed");
                    return;
                }
            }
        }
        let Some((origin, reply)) = reply else {
            return;
        };
        self.note_cancels(reply.cancel);
        let Some(task) = reply.tasks.into_iter().next() else {
            self.0.pcounters.claims_lost.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.0.pcounters.claims_won.fetch_add(1, Ordering::Relaxed);
        tracing::info!(task = %task.id, origin = %offer.origin_url, attempt = task.attempt, "mesh.claim won; running here");
        let id = task.id;
        lock(&self.0.remote_running)
            .entry(offer.origin_url.clone())
            .or_default()
            .insert(id, task.attempt);
        let ok = self.run_remote(&origin, &offer, from, task).await;
        if let Some(m) = lock(&self.0.remote_running).get_mut(&offer.origin_url) {
            m.remove(&id);
        }
        lock(&self.0.cancelled).remove(&id);
        let c = if ok {
            &self.0.pcounters.remote_succeeded
        } else {
            &self.0.pcounters.remote_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// This node's session with an origin, registering as its agent the first time. Before
    /// registering, the URL must answer `/identity` with the offering member's key: an offer
    /// cannot send this node to a third party.
    async fn origin(&self, url: &str, owner: KeyId, caps: &Capabilities) -> anyhow::Result<Origin> {
        let slot = lock(&self.0.origins)
            .entry(url.to_string())
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(o) = slot.as_ref() {
            return Ok(o.clone());
        }
        let ident = self.identity_of(url).await?;
        if ident.ed25519 != owner.to_string() {
            anyhow::bail!("{url} is not the node that offered the task");
        }
        let client = Arc::new(CoordinatorClient::new(url, self.0.identity.clone())?);
        let running: Vec<RunningTask> = lock(&self.0.remote_running)
            .get(url)
            .map(|m| {
                m.iter()
                    .map(|(task, attempt)| RunningTask {
                        task: *task,
                        attempt: *attempt,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let reg: Registered = client
            .post(
                "/agents/register",
                &RegisterAgent {
                    capabilities: caps.clone(),
                    running,
                },
            )
            .await?;
        let o = Origin {
            client,
            session: reg.session,
        };
        *slot = Some(o.clone());
        Ok(o)
    }

    /// Drops a session the origin no longer knows (if it is still the cached one).
    fn forget_origin(&self, url: &str, session: u64) {
        let slot = lock(&self.0.origins).get(url).cloned();
        if let Some(slot) = slot
            && let Ok(mut g) = slot.try_lock()
            && g.as_ref().is_some_and(|o| o.session == session)
        {
            *g = None;
        }
    }

    /// Remembers cancellations an origin sent (in any answer) for the runs they concern.
    fn note_cancels(&self, ids: Vec<TaskId>) {
        if ids.is_empty() {
            return;
        }
        let running: std::collections::HashSet<TaskId> = lock(&self.0.remote_running)
            .values()
            .flat_map(|m| m.keys().copied())
            .collect();
        let mut c = lock(&self.0.cancelled);
        c.extend(ids.into_iter().filter(|id| running.contains(id)));
    }

    /// Runs a claimed task as a local task, relaying its events, heartbeats and result to the
    /// origin, sealed to it. True when the result was delivered as a success.
    async fn run_remote(
        &self,
        origin: &Origin,
        offer: &Offer,
        from: KeyId,
        t: ClaimedTask,
    ) -> bool {
        let ctx = |purpose| crate::coordinator::seal_context(purpose, t.id, t.attempt);
        let secret = self.0.identity.x25519_secret();
        let report = |outcome: ReportedOutcome| PostResult {
            attempt: t.attempt,
            outcome,
            next: None,
        };
        let failed = |msg: String| {
            let sealed = seal::seal_json(
                &offer.origin_x25519,
                &ctx("result"),
                &serde_json::Value::String(msg),
            );
            ReportedOutcome::Failed {
                error: sealed.to_string(),
                retryable: true,
            }
        };
        let payload = match seal::open_json(secret, &ctx("payload"), &t.payload) {
            Ok(p) => p,
            Err(e) => {
                let _ = self
                    .post_result(origin, t.id, &report(failed(format!("payload: {e}"))))
                    .await;
                return false;
            }
        };
        let me = Principal {
            key: self.0.identity.key_id(),
            role: Role::Node,
        };
        let now = crate::clock::now_ms();
        let submit = SubmitTask {
            kind: t.kind,
            payload,
            requirements: t.requirements.clone(),
            priority: 0,
            timeout: Some(format!("{}ms", t.deadline_ms.saturating_sub(now).max(1000))),
            max_attempts: Some(1),
            idempotency_key: Some(format!(
                "{MESH_KEY_PREFIX}{}:{}:{}",
                node_id(&from),
                t.id,
                t.attempt
            )),
        };
        let local = match self.0.state.submit(&me, submit).await {
            Ok((v, _)) => v.id,
            Err(e) => {
                let _ = self
                    .post_result(origin, t.id, &report(failed(format!("executor: {e}"))))
                    .await;
                return false;
            }
        };
        let mut cursor = match EventCursor::open(&self.0.state, &me, local, 0).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "mesh.run cannot follow the local task");
                let _ = self.0.state.cancel(&me, local).await;
                let _ = self
                    .post_result(origin, t.id, &report(failed(format!("executor: {e}"))))
                    .await;
                return false;
            }
        };
        let running = [RunningTask {
            task: t.id,
            attempt: t.attempt,
        }];
        let mut hb = tokio::time::interval(self.0.heartbeat);
        hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lease_ttl = Duration::from_millis(t.lease_expires_ms.saturating_sub(now).max(1000));
        let mut last_ok = tokio::time::Instant::now();
        let events_path = format!("/tasks/{}/events", t.id);
        loop {
            tokio::select! {
                item = cursor.next() => match item {
                    CursorItem::Event(ev) if ev.kind == EventKind::State => {}
                    CursorItem::Event(ev) => {
                        let data: serde_json::Value =
                            serde_json::from_str(&ev.data).unwrap_or(serde_json::Value::Null);
                        let body = PostEvents {
                            attempt: t.attempt,
                            events: vec![NewEvent {
                                kind: ev.kind,
                                data: seal::seal_json(&offer.origin_x25519, &ctx("event"), &data),
                            }],
                        };
                        match origin.client.post::<_, EventsAccepted>(&events_path, &body).await {
                            Ok(_) => last_ok = tokio::time::Instant::now(),
                            Err(ClientError::Api { code, .. }) => {
                                tracing::info!(task = %t.id, %code, "mesh.run the origin refused events; stopping");
                                let _ = self.0.state.cancel(&me, local).await;
                                return false;
                            }
                            // A lost event is lost; the lease and the result matter more.
                            Err(e) => tracing::debug!(error = %e, "mesh.run event not delivered"),
                        }
                    }
                    CursorItem::End => break,
                    // This node is stopping: the origin re-offers the task once the lease ends.
                    CursorItem::Shutdown => return false,
                },
                _ = hb.tick() => {
                    let beat = Heartbeat { session: origin.session, running: running.to_vec() };
                    match origin.client.post::<_, HeartbeatReply>("/agents/heartbeat", &beat).await {
                        Ok(r) => {
                            last_ok = tokio::time::Instant::now();
                            self.note_cancels(r.cancel);
                            let mine = lock(&self.0.cancelled).remove(&t.id);
                            if mine {
                                tracing::info!(task = %t.id, "mesh.run cancelled by the origin");
                                let _ = self.0.state.cancel(&me, local).await;
                                return false;
                            }
                        }
                        Err(e) => {
                            if last_ok.elapsed() > lease_ttl {
                                tracing::warn!(task = %t.id, error = %e, "mesh.run origin unreachable past the lease; stopping");
                                let _ = self.0.state.cancel(&me, local).await;
                                return false;
                            }
                        }
                    }
                }
                _ = self.0.token.cancelled() => return false,
            }
        }
        let outcome = match self.0.state.result(&me, local, Duration::ZERO).await {
            Ok(ResultWait::Done(r)) if r.state == TaskState::Succeeded => {
                ReportedOutcome::Succeeded {
                    output: seal::seal_json(
                        &offer.origin_x25519,
                        &ctx("result"),
                        &r.output.unwrap_or(serde_json::Value::Null),
                    ),
                }
            }
            Ok(ResultWait::Done(r)) => failed(
                r.error
                    .unwrap_or_else(|| format!("ended {}", r.state.as_str())),
            ),
            Ok(ResultWait::Pending(_)) => failed("executor lost the result".into()),
            Err(e) => failed(format!("executor: {e}")),
        };
        let success = matches!(outcome, ReportedOutcome::Succeeded { .. });
        self.post_result(origin, t.id, &report(outcome)).await && success
    }

    /// Delivers a result, retrying transport failures for a few seconds.
    async fn post_result(&self, origin: &Origin, task: TaskId, body: &PostResult) -> bool {
        let path = format!("/tasks/{task}/result");
        for i in 0..5u32 {
            match origin.client.post::<_, ResultAccepted>(&path, body).await {
                Ok(_) => return true,
                Err(ClientError::Api { code, message, .. }) => {
                    tracing::info!(%task, %code, %message, "mesh.run the origin refused the result");
                    return false;
                }
                Err(e) => {
                    tracing::debug!(%task, error = %e, "mesh.run result not delivered yet");
                    tokio::time::sleep(Duration::from_millis(200 << i)).await;
                }
            }
        }
        false
    }
}

fn too_large(n: usize, max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("envelope of {n} bytes is over mesh.max_envelope ({max})"),
    )
}

/// `/mesh/*` routes (unsigned HTTP: envelopes carry their own signatures; the views are public,
/// like `/identity`).
pub fn router(slot: MeshSlot) -> Router {
    Router::new()
        .route("/mesh/ingest", post(ingest))
        .route("/mesh/peers", get(peers))
        .route("/mesh/capabilities", get(capabilities))
        .route("/mesh/stats", get(stats))
        .with_state(slot)
}

async fn ingest(
    State(slot): State<MeshSlot>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(mesh) = slot.get() else {
        return not_running();
    };
    let max = usize::try_from(mesh.0.cfg.max_envelope).unwrap_or(usize::MAX);
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = declared.filter(|n| *n > max) {
        mesh.0.counters.too_large.fetch_add(1, Ordering::Relaxed);
        return too_large(n, max).into_response();
    }
    let bytes = match axum::body::to_bytes(body, max).await {
        Ok(b) => b,
        Err(_) => {
            mesh.0.counters.too_large.fetch_add(1, Ordering::Relaxed);
            return too_large(max + 1, max).into_response();
        }
    };
    match mesh.ingest(peer.ip(), &bytes) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn peers(State(slot): State<MeshSlot>) -> Response {
    slot.get()
        .map_or_else(not_running, |m| Json(m.peers()).into_response())
}

async fn capabilities(State(slot): State<MeshSlot>) -> Response {
    slot.get()
        .map_or_else(not_running, |m| Json(m.capabilities()).into_response())
}

async fn stats(State(slot): State<MeshSlot>) -> Response {
    slot.get()
        .map_or_else(not_running, |m| Json(m.stats()).into_response())
}

/// The URL this node advertises: `mesh.advertise_url`, else the bound address (the default
/// route's address when bound to the wildcard).
pub fn advertise_url(cfg: &MeshConfig, bound: std::net::SocketAddr) -> String {
    if !cfg.advertise_url.is_empty() {
        return cfg.advertise_url.trim_end_matches('/').to_string();
    }
    let ip = if bound.ip().is_unspecified() {
        default_route_ip().unwrap_or_else(|| {
            tracing::warn!(
                "mesh: no default route; advertising 127.0.0.1 (set mesh.advertise_url for peers on other machines)"
            );
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        })
    } else {
        bound.ip()
    };
    format!("http://{}", std::net::SocketAddr::new(ip, bound.port()))
}

/// The source address the kernel would use for the default route (connecting a UDP socket
/// sends nothing).
fn default_route_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// Where the running mesh is found by routes built before it starts (it needs the bound
/// coordinator address). Empty while starting, and on nodes with `mesh.enabled = false`.
pub type MeshSlot = Arc<OnceLock<Mesh>>;

fn not_running() -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "mesh_disabled",
        "this node does not take part in a mesh (mesh.enabled = false) or is still starting",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(slots: u32, free: u32, class: ResourceClass) -> CapRecord {
        CapRecord {
            node: KeyId([0; 32]),
            seq: 1,
            issued_ms: 0,
            url: "http://10.0.0.1:4301".into(),
            x25519: [0; 32],
            kinds: vec![TaskKind::Probe],
            models: vec![],
            resource_class: class,
            slots,
            free_slots: free,
            load_pct: 0,
            price: 0,
            model_budget_mib: 0,
            throttled: false,
        }
    }

    #[test]
    fn capability_changes_go_out_at_once_and_load_changes_at_a_pace() {
        let base = caps(4, 4, ResourceClass::Small);
        assert!(caps_due(None, &base, 0, 2_000, 60_000), "the first one");
        assert!(!caps_due(Some(&base), &base, 1_000, 2_000, 60_000));
        assert!(
            caps_due(Some(&base), &base, 60_000, 2_000, 60_000),
            "periodically"
        );
        let busier = caps(4, 1, ResourceClass::Small);
        assert!(!caps_due(Some(&base), &busier, 1_000, 2_000, 60_000));
        assert!(caps_due(Some(&base), &busier, 2_000, 2_000, 60_000));
        let mut new_model = base.clone();
        new_model.models.push("qwen".into());
        assert!(
            caps_due(Some(&base), &new_model, 0, 20_000, 60_000),
            "at once"
        );
        assert_eq!(load_interval(3), 2_000);
        assert_eq!(load_interval(100), 2_000);
        assert_eq!(load_interval(1_000), 20_000);
        assert_eq!(load_interval(100_000), 30_000);
    }

    #[test]
    fn one_origin_cannot_take_every_offer_place() {
        let (a, b) = (KeyId([1; 32]), KeyId([2; 32]));
        let mut counts = HashMap::new();
        for _ in 0..3 {
            assert!(admit(&mut counts, a, 3));
        }
        assert!(!admit(&mut counts, a, 3), "a is at its limit");
        assert!(admit(&mut counts, b, 3), "b is not held back by a");
        release(&mut counts, &a);
        assert!(admit(&mut counts, a, 3));
        for _ in 0..3 {
            release(&mut counts, &a);
        }
        release(&mut counts, &b);
        assert!(counts.is_empty(), "origins with nothing here are forgotten");
    }

    #[test]
    fn the_claim_delay_grows_with_load_and_surplus_and_shrinks_with_fitness() {
        let idle = claim_delay(
            &caps(4, 4, ResourceClass::Small),
            Some(ResourceClass::Small),
            0.0,
        );
        let half = claim_delay(
            &caps(4, 2, ResourceClass::Small),
            Some(ResourceClass::Small),
            0.0,
        );
        let full = claim_delay(
            &caps(4, 0, ResourceClass::Small),
            Some(ResourceClass::Small),
            0.0,
        );
        let big = claim_delay(
            &caps(4, 4, ResourceClass::Large),
            Some(ResourceClass::Small),
            0.0,
        );
        assert_eq!(idle, Duration::ZERO, "an idle, fitting peer claims at once");
        assert!(idle < half && half < full, "{idle:?} {half:?} {full:?}");
        assert!(big > idle, "a bigger node leaves the task to a fitting one");
        let jittered = claim_delay(&caps(4, 4, ResourceClass::Tiny), None, 1.0);
        assert!(jittered <= Duration::from_millis(CLAIM_JITTER_MS as u64));
    }

    #[test]
    fn surplus_counts_from_the_smallest_peer_that_could_take_the_task() {
        use ResourceClass::{Large, Medium, Small, Tiny};
        // Peers all of one class: nobody waits for being big.
        let floor = claim_floor(None, Medium, [Medium, Medium]);
        assert_eq!(floor, Medium);
        assert_eq!(
            claim_delay(&caps(4, 4, Medium), Some(floor), 0.0),
            Duration::ZERO
        );
        // A small peer could take it: the medium one leaves it to it.
        assert_eq!(claim_floor(None, Medium, [Small, Large]), Small);
        // The task's own minimum is the floor when every candidate is above it...
        assert_eq!(claim_floor(Some(Small), Large, [Large]), Large);
        // ...and never below it.
        assert_eq!(claim_floor(Some(Medium), Medium, [Tiny]), Medium);
    }

    #[test]
    fn nonces_refuse_a_second_delivery_and_forget_after_the_window() {
        let mut n = Nonces::default();
        let k = KeyId([1; 32]);
        assert_eq!(n.insert(k, [2; 16], 1_000, 31_000), Ok(true));
        assert_eq!(n.insert(k, [2; 16], 2_000, 32_000), Ok(false));
        assert_eq!(n.insert(k, [3; 16], 2_000, 32_000), Ok(true));
        // After expiry the pair is forgotten (the time window refuses the envelope anyway).
        assert_eq!(n.insert(k, [2; 16], 40_000, 70_000), Ok(true));
    }

    #[test]
    fn the_advertised_url_prefers_configuration_then_the_bound_address() {
        let mut cfg = crate::config::Config::default().mesh;
        let bound: std::net::SocketAddr = "127.0.0.3:4301".parse().unwrap();
        assert_eq!(advertise_url(&cfg, bound), "http://127.0.0.3:4301");
        cfg.advertise_url = "http://box.lan:4301/".into();
        assert_eq!(advertise_url(&cfg, bound), "http://box.lan:4301");
    }
}

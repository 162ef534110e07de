//! EdgeCoder: the agent that makes an edge box (Raspberry Pi, Jetson, mini-PC) a member of a
//! mesh serving coding-model inference.
//!
//! One binary, `edgecoder`. `edgecoder run` starts the node: coordinator (:4301), inference
//! (:4302), control plane (:4303) and IDE provider (:4304) in one process, plus a supervised
//! worker process (`edgecoder worker`) that registers with the coordinator over signed HTTP and
//! executes tasks.
//!
//! # Layout
//! * [`node`] — boot and shutdown; the only module that wires services together.
//! * [`config`] — every configuration key, its default, and how layers combine.
//! * [`store`] — the LMDB environment and its single writer thread (group commit).
//! * [`identity`] — node and agent keys (ed25519 + x25519) and the ids derived from them.
//! * [`security`] — signed requests (RFC 9421 profile), replay cache, rate limits.
//! * [`coordinator`] — the task queue, leases, agents, task events and results (:4301).
//! * [`worker`] — the worker process and the node's supervisor for it.
//! * [`inference`], [`control_plane`], [`ide`] — the other three ports.
//! * [`mesh`] — nodes finding and watching each other (SWIM with Lifeguard), gossiped signed
//!   records, and tasks offered to peers.
//! * [`anchor_proxy`] — `edgecoder anchor-proxy` (:4311), a separate deployment that holds
//!   bitcoind credentials and writes hashes into Bitcoin with OP_RETURN for coordinators.
//! * [`portal`] — `edgecoder portal` (:4310), a separate deployment: accounts that sign in with
//!   passkeys (WebAuthn), and sessions.
//! * [`hw`] — what the node stands on: board, CPU, memory, GPUs, throttling, capacity.
//! * [`client`] — signed HTTP client for the coordinator API (worker, CLI, tests).
//! * [`cli`] — the client-side commands (`task`, `status`, `keygen`); [`mod@bench`] — `edgecoder bench`.
//! * [`standalone`] — what the separate deployments share (info file, serving loop).
//! * [`http`], [`metrics`], [`health`], [`systemd`], [`clock`] — shared plumbing.
//!
//! The architecture, APIs and operations are documented under `docs/` in the repository.

pub mod anchor_proxy;
pub mod bench;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod control_plane;
pub mod coordinator;
pub mod health;
pub mod http;
pub mod hw;
pub mod ide;
pub mod identity;
pub mod inference;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod portal;
pub mod security;
pub mod standalone;
pub mod store;
pub mod systemd;
pub mod worker;

/// Exit status for configuration errors (sysexits.h EX_CONFIG); the systemd unit does not
/// restart on it.
pub const EXIT_CONFIG: u8 = 78;

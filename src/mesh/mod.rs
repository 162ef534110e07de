//! The mesh: nodes find each other, watch each other and share work.
//!
//! * [`wire`]: identities, signed records, messages and the signed envelope.
//! * [`records`]: identity, capability and blacklist records every node keeps.
//! * [`swim`]: SWIM membership with Lifeguard's extensions, sans-IO.
//! * [`core`]: the sans-IO state machine of a node: membership, record gossip, anti-entropy.
//! * [`sim`]: many cores over a simulated network, for tests and benchmarks.
//! * [`seal`]: end-to-end encryption of task data between nodes (X25519, HKDF, AES-256-GCM).
//! * [`service`]: one core inside a running node, over HTTP (`/mesh/*` on the coordinator port).

pub mod core;
pub mod records;
pub mod seal;
pub mod service;
pub mod sim;
pub mod swim;
pub mod wire;

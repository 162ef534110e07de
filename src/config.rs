//! Node configuration: every key, its default, and how layers combine.
//!
//! Layers, lowest first: built-in defaults < board profile < the TOML file (`--config`,
//! `EDGECODER_CONFIG`, or `/etc/edgecoder/edgecoder.toml` / `$XDG_CONFIG_HOME/edgecoder/edgecoder.toml`
//! when present) < `EDGECODER_*` environment variables < command-line flags. An environment variable
//! names a key by upper-casing it and joining sections with a double underscore:
//! `EDGECODER_COORDINATOR__PORT=4401` sets `coordinator.port`; `EDGECODER_DATA_DIR` sets `data_dir`.
//!
//! Loading collects every problem (unknown keys, values of the wrong type, values out of range)
//! and reports them together in one [`ConfigError`]; `main` exits with 78 (EX_CONFIG) on it, which
//! the systemd unit lists in `RestartPreventExitStatus=` so a bad file does not cause a restart loop.
//! Every key is documented in `docs/configuration.md`; a test checks that the page names each one.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::identity::KeyId;

/// Default coordinator port (agents, peers, task API).
pub const COORDINATOR_PORT: u16 = 4301;
/// Default inference port (local services only).
pub const INFERENCE_PORT: u16 = 4302;
/// Default control-plane port (admin API).
pub const CONTROL_PLANE_PORT: u16 = 4303;
/// Default IDE provider port (OpenAI-compatible API for the LAN).
pub const IDE_PORT: u16 = 4304;
/// Default portal port.
pub const PORTAL_PORT: u16 = 4310;
/// Default anchor proxy port.
pub const ANCHOR_PROXY_PORT: u16 = 4311;

/// Configuration was rejected; every problem found is listed.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration ({} problem{}):\n  - {}", .problems.len(), if .problems.len() == 1 { "" } else { "s" }, .problems.join("\n  - "))]
pub struct ConfigError {
    /// One line per problem, each naming the key (and the layer it came from, where known).
    pub problems: Vec<String>,
}

/// Where a service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// Address to bind; `host` at the top level overrides it for every service.
    pub bind: IpAddr,
    /// TCP port; 0 picks a free port (tests, several nodes on one machine).
    pub port: u16,
}

impl Listen {
    fn new(bind: IpAddr, port: u16) -> Self {
        Listen { bind, port }
    }
}

/// The whole node configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory for the store, keys and runtime files.
    pub data_dir: PathBuf,
    /// When set, every service binds this address (ports stay per service).
    pub host: Option<IpAddr>,
    /// Log filter in `RUST_LOG` syntax.
    pub log: String,
    /// The coordinator service (:4301).
    pub coordinator: CoordinatorConfig,
    /// The inference service (:4302).
    pub inference: InferenceConfig,
    /// The control plane (:4303).
    pub control_plane: Listen,
    /// The IDE provider (:4304).
    pub ide: IdeConfig,
    /// The supervised worker process.
    pub worker: WorkerConfig,
    /// Request signing, replay protection and rate limits.
    pub security: SecurityConfig,
    /// The LMDB store.
    pub store: StoreConfig,
    /// HTTP server limits shared by every port.
    pub http: HttpConfig,
    /// The mesh: membership, capability gossip, task placement on peers.
    pub mesh: MeshConfig,
    /// The anchor proxy (`edgecoder anchor-proxy`, a separate deployment; DESIGN.md §2).
    pub anchor_proxy: AnchorProxyConfig,
    /// The portal (`edgecoder portal`, a separate deployment; DESIGN.md §2).
    pub portal: PortalConfig,
}

/// Portal settings: where it listens and the WebAuthn relying party it is.
#[derive(Debug, Clone)]
pub struct PortalConfig {
    /// Where the portal listens (0.0.0.0:4310).
    pub listen: Listen,
    /// The WebAuthn relying party id: the portal's host name (passkeys are bound to it).
    pub rp_id: String,
    /// The name browsers show for it.
    pub rp_name: String,
    /// The exact origins pages are served from (`https://portal.example.com`).
    pub origins: Vec<String>,
    /// How long a session lasts.
    pub session_ttl: Duration,
    /// How long a passkey ceremony may take.
    pub ceremony_timeout: Duration,
}

/// Anchor proxy settings: where bitcoind is, who may anchor, and what an anchor may cost.
#[derive(Clone)]
pub struct AnchorProxyConfig {
    /// Where the proxy listens (127.0.0.1:4311).
    pub listen: Listen,
    /// Bitcoin Core's JSON-RPC URL.
    pub rpc_url: String,
    /// RPC user (with `rpc_password`); empty when a cookie file is used.
    pub rpc_user: String,
    /// RPC password; keep it in secrets.toml.
    pub rpc_password: String,
    /// bitcoind's `.cookie` file, read on every connection (it changes when bitcoind restarts).
    pub rpc_cookie_file: Option<PathBuf>,
    /// The wallet that pays for anchors (`/wallet/<name>`); empty for bitcoind's only wallet.
    pub wallet: String,
    /// The chain bitcoind must be on: main, test, testnet4, signet or regtest.
    pub network: String,
    /// Keys (base64url ed25519) allowed to request anchors: the coordinators.
    pub client_keys: Vec<KeyId>,
    /// Most new anchors broadcast per hour, across all callers.
    pub max_per_hour: u32,
    /// Fee rate in sat/vB; 0 lets the wallet estimate it.
    pub fee_rate: u32,
    /// Highest fee one anchor may pay, in satoshis; a dearer transaction is not broadcast.
    pub max_fee: u64,
    /// How long one RPC call may take.
    pub rpc_timeout: Duration,
}

impl std::fmt::Debug for AnchorProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password never reaches logs or `check-config` output.
        f.debug_struct("AnchorProxyConfig")
            .field("listen", &self.listen)
            .field("rpc_url", &self.rpc_url)
            .field("rpc_user", &self.rpc_user)
            .field(
                "rpc_password",
                &if self.rpc_password.is_empty() {
                    ""
                } else {
                    "<set>"
                },
            )
            .field("rpc_cookie_file", &self.rpc_cookie_file)
            .field("wallet", &self.wallet)
            .field("network", &self.network)
            .field("client_keys", &self.client_keys)
            .field("max_per_hour", &self.max_per_hour)
            .field("fee_rate", &self.fee_rate)
            .field("max_fee", &self.max_fee)
            .field("rpc_timeout", &self.rpc_timeout)
            .finish()
    }
}

/// Mesh settings (DESIGN.md §6).
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Join the mesh at all (false: a standalone node that answers no mesh traffic).
    pub enabled: bool,
    /// Coordinator URLs of peers to join through (`COORDINATOR_BOOTSTRAP_URLS`, comma-separated,
    /// sets it too). Empty: this node waits for others to join it.
    pub bootstrap_urls: Vec<String>,
    /// The coordinator URL peers reach this node at. Empty: `http://<bound address>:<port>`,
    /// with the address of the default route when bound to the wildcard address.
    pub advertise_url: String,
    /// Keys allowed to take part; empty allows any key that signs correctly (blacklists still apply).
    pub peer_keys: Vec<KeyId>,
    /// Reporters whose blacklist records this node enforces (its own always are).
    pub trusted_reporters: Vec<KeyId>,
    /// Largest envelope accepted on `/mesh/ingest` (413 beyond it).
    pub max_envelope: u64,
    /// Envelopes per second one peer may send (and twice that as a burst) before 429.
    pub per_peer_rate: u32,
    /// How far an envelope's timestamp may be from our clock.
    pub window: Duration,
    /// SWIM probe period.
    pub probe_period: Duration,
    /// How long a suspect peer has to refute before it is declared dead.
    pub suspect_timeout: Duration,
    /// Record anti-entropy period.
    pub sync_interval: Duration,
    /// Capabilities are republished this often even when nothing changed.
    pub caps_interval: Duration,
    /// A queued task that a local agent could run but none has taken for this long is offered
    /// to peers (tasks no local agent can run are offered at once).
    pub offer_after: Duration,
}

/// Coordinator settings: task queue, leases, agents.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Where the coordinator listens.
    pub listen: Listen,
    /// How long a lease lasts without a heartbeat renewing it.
    pub lease_ttl: Duration,
    /// Attempts (leases) a task gets before it fails for good.
    pub max_attempts: u32,
    /// Deadline given to tasks that do not name one.
    pub default_deadline: Duration,
    /// Longest deadline a task may ask for.
    pub max_deadline: Duration,
    /// An agent that has not sent a heartbeat for this long is reaped and its leases released.
    pub agent_timeout: Duration,
    /// Longest a claim or a result wait may be held open.
    pub max_wait: Duration,
    /// Tasks queued or running at once; submissions beyond it get 503 with Retry-After.
    pub max_active_tasks: usize,
    /// How long finished tasks, their events and results are kept.
    pub task_retention: Duration,
    /// Public keys of remote agents allowed to register (the local worker is always allowed).
    pub agent_keys: Vec<KeyId>,
    /// Public keys allowed to submit and read tasks (the node's own key is always allowed).
    pub client_keys: Vec<KeyId>,
}

/// Inference settings.
#[derive(Debug, Clone)]
pub struct InferenceConfig {
    /// Where the inference service listens.
    pub listen: Listen,
    /// CPU threads a loaded model decodes with; 0 means the number of physical cores.
    pub threads: u32,
    /// Generations a loaded model runs at once, batched together; 0: the hardware capacity's.
    pub slots: u32,
    /// Requests waiting for a slot before new ones get 503.
    pub queue_depth: usize,
    /// Context length of each generation, in tokens (capped by the model's own).
    pub context: u32,
    /// Prompt tokens evaluated per step.
    pub batch: u32,
    /// Model layers offloaded to a GPU (needs a GPU build).
    pub gpu_layers: u32,
    /// Models kept loaded at once; loading another unloads the least recently used idle one.
    pub max_loaded_models: usize,
    /// An idle model is unloaded after this long.
    pub keep_alive: Duration,
    /// An Ollama server whose models are offered too, e.g. `http://127.0.0.1:11434`.
    pub ollama_url: Option<String>,
    /// Pull the default model on boot when no model is installed.
    pub auto_pull: bool,
    /// The model `auto_pull` fetches: a catalog name or an http(s) URL of a GGUF file (a fleet's
    /// own mirror, say). Empty: the catalog's default for this box's memory class.
    pub default_model: String,
}

/// IDE provider settings.
#[derive(Debug, Clone)]
pub struct IdeConfig {
    /// Where the OpenAI-compatible API listens.
    pub listen: Listen,
    /// Origins browsers may call the API from (CORS); `"*"` allows any.
    pub cors_origins: Vec<String>,
    /// Longest a request may take (queueing included) before it fails.
    pub task_timeout: Duration,
}

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Start the local worker process.
    pub enabled: bool,
    /// Tasks the worker runs at once.
    pub slots: u32,
    /// How often the worker renews its registration and leases.
    pub heartbeat_interval: Duration,
    /// First restart delay after the worker dies; doubles on each quick failure.
    pub restart_backoff_min: Duration,
    /// Largest restart delay.
    pub restart_backoff_max: Duration,
    /// Time between SIGTERM and SIGKILL when stopping the worker.
    pub stop_grace: Duration,
}

/// Request signing and rate limiting.
#[derive(Debug, Clone)]
pub struct SecurityConfig {
    /// Longest `expires - created` a signature may cover (at most 60 s).
    pub signature_window: Duration,
    /// Clock difference tolerated between signer and verifier.
    pub clock_skew: Duration,
    /// Requests per second allowed from one IP address before authentication.
    pub per_ip_rate: u32,
    /// Burst allowed from one IP address.
    pub per_ip_burst: u32,
    /// Requests per second allowed for one signing key after authentication.
    pub per_key_rate: u32,
    /// Burst allowed for one signing key.
    pub per_key_burst: u32,
    /// Most nonces remembered at once; beyond it new requests get 503 rather than weaker replay checks.
    pub nonce_cache_max: usize,
}

/// LMDB store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Maximum size of the database (rounded up to the page size at runtime).
    pub map_size: u64,
    /// Most write operations committed together in one transaction (group commit).
    pub max_batch: usize,
    /// Longest that low-value writes (events, telemetry) wait to be batched.
    pub bulk_flush_interval: Duration,
}

/// HTTP limits.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request body accepted (413 beyond it).
    pub max_body: u64,
    /// Time limit for ordinary requests (long polls and streams use their own `wait`).
    pub request_timeout: Duration,
    /// How long in-flight requests may finish after shutdown starts.
    pub drain_timeout: Duration,
}

/// The first directory systemd names in a `*_DIRECTORY` variable (`StateDirectory=` and friends).
fn systemd_dir(var: &str) -> Option<PathBuf> {
    let v = std::env::var(var).ok()?;
    v.split(':')
        .next()
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
}

fn default_data_dir() -> PathBuf {
    if let Some(d) = systemd_dir("STATE_DIRECTORY") {
        return d;
    }
    if is_root() {
        return PathBuf::from("/var/lib/edgecoder");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("edgecoder");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".local/share/edgecoder");
    }
    PathBuf::from("edgecoder-data")
}

/// The configuration file used when none is named.
pub fn default_config_path() -> PathBuf {
    if let Some(d) = systemd_dir("CONFIGURATION_DIRECTORY") {
        return d.join("edgecoder.toml");
    }
    if is_root() {
        return PathBuf::from("/etc/edgecoder/edgecoder.toml");
    }
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("edgecoder/edgecoder.toml");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".config/edgecoder/edgecoder.toml");
    }
    PathBuf::from("/etc/edgecoder/edgecoder.toml")
}

#[allow(unsafe_code)]
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl Default for Config {
    fn default() -> Self {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        Config {
            data_dir: default_data_dir(),
            host: None,
            log: "info".into(),
            coordinator: CoordinatorConfig {
                listen: Listen::new(any, COORDINATOR_PORT),
                lease_ttl: Duration::from_secs(30),
                max_attempts: 3,
                default_deadline: Duration::from_secs(600),
                max_deadline: Duration::from_secs(24 * 3600),
                agent_timeout: Duration::from_secs(15),
                max_wait: Duration::from_secs(60),
                max_active_tasks: 100_000,
                task_retention: Duration::from_secs(7 * 24 * 3600),
                agent_keys: Vec::new(),
                client_keys: Vec::new(),
            },
            inference: InferenceConfig {
                listen: Listen::new(local, INFERENCE_PORT),
                threads: 0,
                slots: 0,
                queue_depth: 8,
                context: 4096,
                batch: 512,
                gpu_layers: 0,
                max_loaded_models: 1,
                keep_alive: Duration::from_secs(30 * 60),
                ollama_url: None,
                auto_pull: true,
                default_model: String::new(),
            },
            control_plane: Listen::new(local, CONTROL_PLANE_PORT),
            ide: IdeConfig {
                listen: Listen::new(any, IDE_PORT),
                cors_origins: vec!["*".into()],
                task_timeout: Duration::from_secs(600),
            },
            worker: WorkerConfig {
                enabled: true,
                slots: 16,
                heartbeat_interval: Duration::from_secs(5),
                restart_backoff_min: Duration::from_millis(200),
                restart_backoff_max: Duration::from_secs(30),
                stop_grace: Duration::from_secs(5),
            },
            security: SecurityConfig {
                signature_window: Duration::from_secs(60),
                clock_skew: Duration::from_secs(30),
                per_ip_rate: 20_000,
                per_ip_burst: 40_000,
                per_key_rate: 10_000,
                per_key_burst: 20_000,
                nonce_cache_max: 1_000_000,
            },
            store: StoreConfig {
                map_size: 1 << 30,
                max_batch: 1024,
                bulk_flush_interval: Duration::from_secs(1),
            },
            http: HttpConfig {
                max_body: 1 << 20,
                request_timeout: Duration::from_secs(30),
                drain_timeout: Duration::from_secs(10),
            },
            mesh: MeshConfig {
                enabled: true,
                bootstrap_urls: Vec::new(),
                advertise_url: String::new(),
                peer_keys: Vec::new(),
                trusted_reporters: Vec::new(),
                max_envelope: 64 * 1024,
                per_peer_rate: 200,
                window: Duration::from_secs(30),
                probe_period: Duration::from_secs(1),
                suspect_timeout: Duration::from_secs(5),
                sync_interval: Duration::from_secs(10),
                caps_interval: Duration::from_secs(60),
                offer_after: Duration::from_secs(2),
            },
            anchor_proxy: AnchorProxyConfig {
                listen: Listen::new(local, ANCHOR_PROXY_PORT),
                rpc_url: "http://127.0.0.1:8332".into(),
                rpc_user: String::new(),
                rpc_password: String::new(),
                rpc_cookie_file: None,
                wallet: String::new(),
                network: "main".into(),
                client_keys: Vec::new(),
                max_per_hour: 10,
                fee_rate: 0,
                max_fee: 20_000,
                rpc_timeout: Duration::from_secs(30),
            },
            portal: PortalConfig {
                listen: Listen::new(any, PORTAL_PORT),
                rp_id: "localhost".into(),
                rp_name: "EdgeCoder".into(),
                origins: vec![format!("http://localhost:{PORTAL_PORT}")],
                session_ttl: Duration::from_secs(7 * 24 * 3600),
                ceremony_timeout: Duration::from_secs(300),
            },
        }
    }
}

/// Values given on the command line; they override every other layer.
#[derive(Debug, Clone, Default)]
pub struct CliOverrides {
    /// `--config`.
    pub config_file: Option<PathBuf>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--host`.
    pub host: Option<String>,
    /// `--coordinator-port`.
    pub coordinator_port: Option<u16>,
    /// `--inference-port`.
    pub inference_port: Option<u16>,
    /// `--control-plane-port`.
    pub control_plane_port: Option<u16>,
    /// `--ide-port`.
    pub ide_port: Option<u16>,
    /// `--set key=value`, any key.
    pub set: Vec<String>,
}

impl Config {
    /// A configuration for tests: everything on 127.0.0.1 with port 0, data in `dir`, short timers.
    pub fn for_test(dir: &Path) -> Self {
        let mut c = Config {
            data_dir: dir.to_path_buf(),
            host: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ..Config::default()
        };
        c.coordinator.listen.port = 0;
        c.inference.listen.port = 0;
        c.inference.auto_pull = false;
        c.control_plane.port = 0;
        c.ide.listen.port = 0;
        c
    }

    /// The address a service binds, after applying `host`.
    pub fn addr(&self, l: &Listen) -> SocketAddr {
        SocketAddr::new(self.host.unwrap_or(l.bind), l.port)
    }

    /// Loads the configuration from every layer: defaults, the file, `EDGECODER_*` variables from
    /// `env`, then `cli`.
    ///
    /// # Errors
    /// A [`ConfigError`] listing every problem found in any layer.
    pub fn load(
        cli: &CliOverrides,
        env: &[(String, String)],
    ) -> Result<(Config, Option<PathBuf>), ConfigError> {
        let mut problems = Vec::new();
        let mut table = toml::Table::new();

        let env_config = env
            .iter()
            .find(|(k, _)| k == "EDGECODER_CONFIG")
            .map(|(_, v)| PathBuf::from(v));
        let (path, explicit) = match (&cli.config_file, env_config) {
            (Some(p), _) => (p.clone(), true),
            (None, Some(p)) => (p, true),
            (None, None) => (default_config_path(), false),
        };
        let mut used_file = None;
        match std::fs::read_to_string(&path) {
            Ok(text) => match text.parse::<toml::Table>() {
                Ok(t) => {
                    table = t;
                    used_file = Some(path.clone());
                }
                Err(e) => problems.push(format!("{}: not valid TOML: {e}", path.display())),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {}
            Err(e) => problems.push(format!("{}: {e}", path.display())),
        }

        // Secrets handed over by systemd (LoadCredential=secrets.toml:...): a layer above the
        // file, so allowlists and fleet keys need not sit in a world-readable file.
        if let Some((_, dir)) = env.iter().find(|(k, _)| k == "CREDENTIALS_DIRECTORY") {
            let p = Path::new(dir).join("secrets.toml");
            match std::fs::read_to_string(&p) {
                Ok(text) => match text.parse::<toml::Table>() {
                    Ok(t) => merge(&mut table, t),
                    Err(e) => problems.push(format!("{}: not valid TOML: {e}", p.display())),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => problems.push(format!("{}: {e}", p.display())),
            }
        }
        // The original EdgeCoder's variable, kept: a comma-separated list of peer URLs.
        if let Some((_, v)) = env.iter().find(|(k, _)| k == "COORDINATOR_BOOTSTRAP_URLS") {
            let urls: Vec<toml::Value> = v
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(|u| toml::Value::String(u.to_string()))
                .collect();
            set_path(
                &mut table,
                &["mesh".into(), "bootstrap_urls".into()],
                toml::Value::Array(urls),
            );
        }
        for (k, v) in env {
            let Some(rest) = k.strip_prefix("EDGECODER_") else {
                continue;
            };
            if rest == "CONFIG" || rest.is_empty() {
                continue;
            }
            let dotted: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            set_path(&mut table, &dotted, env_value(v));
        }
        if let Some(d) = &cli.data_dir {
            set_path(
                &mut table,
                &["data_dir".into()],
                toml::Value::String(d.display().to_string()),
            );
        }
        if let Some(h) = &cli.host {
            set_path(&mut table, &["host".into()], toml::Value::String(h.clone()));
        }
        for (section, port) in [
            ("coordinator", cli.coordinator_port),
            ("inference", cli.inference_port),
            ("control_plane", cli.control_plane_port),
            ("ide", cli.ide_port),
        ] {
            if let Some(p) = port {
                set_path(
                    &mut table,
                    &[section.into(), "port".into()],
                    toml::Value::Integer(i64::from(p)),
                );
            }
        }
        for kv in &cli.set {
            match kv.split_once('=') {
                Some((k, v)) => {
                    let dotted: Vec<String> = k.split('.').map(str::to_string).collect();
                    set_path(&mut table, &dotted, env_value(v));
                }
                None => problems.push(format!("--set {kv:?}: expected key=value")),
            }
        }

        let mut reader = Reader::new(&mut problems);
        let cfg = reader.read(table);
        cfg.validate(&mut problems);
        if problems.is_empty() {
            Ok((cfg, used_file))
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Parses a configuration from TOML text alone (defaults for everything else).
    ///
    /// # Errors
    /// A [`ConfigError`] listing every problem.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e| ConfigError {
            problems: vec![format!("not valid TOML: {e}")],
        })?;
        let mut problems = Vec::new();
        let mut reader = Reader::new(&mut problems);
        let cfg = reader.read(table);
        cfg.validate(&mut problems);
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Every key this build understands, dotted (for documentation checks and `--set`).
    pub fn known_keys() -> Vec<String> {
        let mut problems = Vec::new();
        let mut reader = Reader::new(&mut problems);
        reader.read(toml::Table::new());
        reader.seen
    }

    fn validate(&self, p: &mut Vec<String>) {
        let c = &self.coordinator;
        if c.lease_ttl < Duration::from_secs(1) {
            p.push("coordinator.lease_ttl: must be at least 1s".into());
        }
        if !(1..=100).contains(&c.max_attempts) {
            p.push("coordinator.max_attempts: must be between 1 and 100".into());
        }
        if c.default_deadline > c.max_deadline {
            p.push("coordinator.default_deadline: must not exceed coordinator.max_deadline".into());
        }
        if c.default_deadline < Duration::from_secs(1) {
            p.push("coordinator.default_deadline: must be at least 1s".into());
        }
        if c.agent_timeout <= self.worker.heartbeat_interval {
            p.push(
                "coordinator.agent_timeout: must be longer than worker.heartbeat_interval, or live agents get reaped"
                    .into(),
            );
        }
        if c.max_wait < Duration::from_secs(1) {
            p.push("coordinator.max_wait: must be at least 1s".into());
        }
        if c.max_active_tasks == 0 {
            p.push("coordinator.max_active_tasks: must be at least 1".into());
        }
        if !(1..=4096).contains(&self.worker.slots) {
            p.push("worker.slots: must be between 1 and 4096".into());
        }
        if self.worker.heartbeat_interval < Duration::from_millis(100) {
            p.push("worker.heartbeat_interval: must be at least 100ms".into());
        }
        if self.worker.restart_backoff_min > self.worker.restart_backoff_max {
            p.push("worker.restart_backoff_min: must not exceed worker.restart_backoff_max".into());
        }
        let s = &self.security;
        if s.signature_window.is_zero() || s.signature_window > Duration::from_secs(60) {
            p.push("security.signature_window: must be between 1s and 60s".into());
        }
        if s.clock_skew > Duration::from_secs(300) {
            p.push("security.clock_skew: must be at most 5m".into());
        }
        for (k, v) in [
            ("per_ip_rate", s.per_ip_rate),
            ("per_ip_burst", s.per_ip_burst),
            ("per_key_rate", s.per_key_rate),
            ("per_key_burst", s.per_key_burst),
        ] {
            if v == 0 {
                p.push(format!("security.{k}: must be at least 1"));
            }
        }
        if s.nonce_cache_max < 1000 {
            p.push("security.nonce_cache_max: must be at least 1000".into());
        }
        let i = &self.inference;
        if i.slots > 64 {
            p.push("inference.slots: must be between 0 (from the hardware) and 64".into());
        }
        if i.threads > 1024 {
            p.push("inference.threads: must be at most 1024 (0 means physical cores)".into());
        }
        if i.queue_depth == 0 {
            p.push("inference.queue_depth: must be at least 1".into());
        }
        if !(64..=1 << 20).contains(&i.context) {
            p.push("inference.context: must be between 64 and 1048576 tokens".into());
        }
        if !(32..=8192).contains(&i.batch) {
            p.push("inference.batch: must be between 32 and 8192".into());
        }
        if i.max_loaded_models == 0 {
            p.push("inference.max_loaded_models: must be at least 1".into());
        }
        for o in &self.ide.cors_origins {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                p.push(format!(
                    "ide.cors_origins: {o:?} must be \"*\" or an http(s) origin"
                ));
            }
        }
        if self.ide.task_timeout < Duration::from_secs(1)
            || self.ide.task_timeout > self.coordinator.max_deadline
        {
            p.push("ide.task_timeout: must be between 1s and coordinator.max_deadline".into());
        }
        let dm = &i.default_model;
        if !dm.is_empty()
            && !dm.starts_with("http://")
            && !dm.starts_with("https://")
            && crate::inference::catalog::by_name(dm).is_none()
        {
            p.push(format!(
                "inference.default_model: {dm:?} is neither a catalog name (edgecoder model catalog) nor an http(s) URL"
            ));
        }
        if let Some(u) = &i.ollama_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            p.push(format!(
                "inference.ollama_url: {u:?} must start with http:// or https://"
            ));
        }
        let m = &self.mesh;
        for u in m
            .bootstrap_urls
            .iter()
            .chain(Some(&m.advertise_url).filter(|u| !u.is_empty()))
        {
            if !crate::mesh::wire::valid_url(u) {
                p.push(format!(
                    "mesh: {u:?} is not an http(s) URL of at most {} bytes",
                    crate::mesh::wire::MAX_URL
                ));
            }
        }
        if !(4096..=(16 << 20)).contains(&m.max_envelope) {
            p.push("mesh.max_envelope: must be between 4KiB and 16MiB".into());
        }
        if m.per_peer_rate == 0 {
            p.push("mesh.per_peer_rate: must be at least 1".into());
        }
        if m.window < Duration::from_secs(1) || m.window > Duration::from_secs(300) {
            p.push("mesh.window: must be between 1s and 5m".into());
        }
        if m.probe_period < Duration::from_millis(100) {
            p.push("mesh.probe_period: must be at least 100ms".into());
        }
        if m.suspect_timeout < m.probe_period {
            p.push("mesh.suspect_timeout: must be at least mesh.probe_period".into());
        }
        if m.sync_interval < Duration::from_millis(500) || m.caps_interval < Duration::from_secs(1)
        {
            p.push(
                "mesh.sync_interval must be at least 500ms and mesh.caps_interval at least 1s"
                    .into(),
            );
        }
        let a = &self.anchor_proxy;
        if !(a.rpc_url.starts_with("http://") || a.rpc_url.starts_with("https://")) {
            p.push(format!(
                "anchor_proxy.rpc_url: {:?} must start with http:// or https://",
                a.rpc_url
            ));
        }
        if bitcoin::Network::from_core_arg(&a.network).is_err() {
            p.push(format!(
                "anchor_proxy.network: {:?} is not one of main, test, testnet4, signet, regtest",
                a.network
            ));
        }
        if a.rpc_cookie_file.is_some() && !(a.rpc_user.is_empty() && a.rpc_password.is_empty()) {
            p.push(
                "anchor_proxy.rpc_cookie_file: set either it or rpc_user/rpc_password, not both"
                    .into(),
            );
        }
        if a.rpc_user.is_empty() != a.rpc_password.is_empty() {
            p.push("anchor_proxy.rpc_user and anchor_proxy.rpc_password go together".into());
        }
        if a.max_per_hour == 0 || a.max_per_hour > 3600 {
            p.push("anchor_proxy.max_per_hour: must be between 1 and 3600".into());
        }
        if a.fee_rate > 10_000 {
            p.push(
                "anchor_proxy.fee_rate: must be at most 10000 sat/vB (0: the wallet estimates)"
                    .into(),
            );
        }
        if a.max_fee < 200 || a.max_fee > 10_000_000 {
            p.push("anchor_proxy.max_fee: must be between 200 and 10000000 satoshis".into());
        }
        if a.rpc_timeout < Duration::from_secs(1) {
            p.push("anchor_proxy.rpc_timeout: must be at least 1s".into());
        }
        let po = &self.portal;
        if po.rp_id.is_empty() || po.rp_id.contains(['/', ':', ' ']) {
            p.push(format!(
                "portal.rp_id: {:?} must be a host name such as portal.example.com",
                po.rp_id
            ));
        }
        if po.origins.is_empty() {
            p.push("portal.origins: name at least one origin the portal is served from".into());
        }
        for o in &po.origins {
            // WebAuthn binds passkeys to the RP ID: every origin's host must be it or under it.
            let host = o
                .strip_prefix("https://")
                .or_else(|| o.strip_prefix("http://"))
                .map(|rest| rest.split([':', '/']).next().unwrap_or(""));
            match host {
                Some(h) if h == po.rp_id || h.ends_with(&format!(".{}", po.rp_id)) => {}
                Some(_) => p.push(format!(
                    "portal.origins: {o:?} is not on portal.rp_id {:?} or a subdomain of it",
                    po.rp_id
                )),
                None => p.push(format!("portal.origins: {o:?} must be an http(s) origin")),
            }
            if o.starts_with("http://") && po.rp_id != "localhost" {
                p.push(format!(
                    "portal.origins: {o:?}: browsers allow passkeys over plain http only on localhost; use https"
                ));
            }
        }
        if po.session_ttl < Duration::from_secs(60) {
            p.push("portal.session_ttl: must be at least 1m".into());
        }
        if po.ceremony_timeout < Duration::from_secs(10)
            || po.ceremony_timeout > Duration::from_secs(600)
        {
            p.push("portal.ceremony_timeout: must be between 10s and 10m".into());
        }
        if self.store.map_size < (1 << 20) {
            p.push("store.map_size: must be at least 1MiB".into());
        }
        if self.store.max_batch == 0 {
            p.push("store.max_batch: must be at least 1".into());
        }
        if self.http.max_body < 1024 {
            p.push("http.max_body: must be at least 1KiB".into());
        }
        if self.data_dir.as_os_str().is_empty() {
            p.push("data_dir: must not be empty".into());
        }
        let mut seen: Vec<(SocketAddr, &str)> = Vec::new();
        for (name, l) in [
            ("coordinator.port", &self.coordinator.listen),
            ("inference.port", &self.inference.listen),
            ("control_plane.port", &self.control_plane),
            ("ide.port", &self.ide.listen),
        ] {
            let a = self.addr(l);
            if a.port() == 0 {
                continue;
            }
            if let Some((_, other)) = seen
                .iter()
                .find(|(b, _)| b.port() == a.port() && overlaps(b.ip(), a.ip()))
            {
                p.push(format!("{name}: port {} is also {other}", a.port()));
            }
            seen.push((a, name));
        }
    }
}

fn overlaps(a: IpAddr, b: IpAddr) -> bool {
    a == b || a.is_unspecified() || b.is_unspecified()
}

/// Interprets an environment or `--set` value: TOML syntax when it parses (`4301`, `true`,
/// `["a"]`), otherwise the plain string (`0.0.0.0`, `/var/lib/x`).
fn env_value(v: &str) -> toml::Value {
    match format!("v = {v}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(v.into())),
        Err(_) => toml::Value::String(v.into()),
    }
}

/// Deep-merges `over` into `base` (tables merge, everything else replaces).
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut t = table;
    for p in parents {
        let entry = t
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        t = next;
    }
    t.insert(last.clone(), value);
}

/// Reads typed fields out of a TOML table, recording every problem instead of stopping at the
/// first, and every key it asks for (so unknown keys can be reported and docs checked).
struct Reader<'p> {
    problems: &'p mut Vec<String>,
    seen: Vec<String>,
}

impl<'p> Reader<'p> {
    fn new(problems: &'p mut Vec<String>) -> Self {
        Reader {
            problems,
            seen: Vec::new(),
        }
    }

    fn read(&mut self, mut root: toml::Table) -> Config {
        let mut c = Config::default();
        self.path(&mut root, "", "data_dir", &mut c.data_dir);
        let mut host: Option<String> = None;
        self.opt_string(&mut root, "", "host", &mut host);
        if let Some(h) = host {
            match h.parse::<IpAddr>() {
                Ok(ip) => c.host = Some(ip),
                Err(_) => self
                    .problems
                    .push(format!("host: {h:?} is not an IP address")),
            }
        }
        self.get(&mut root, "", "log", &mut c.log);

        let mut t = self.section(&mut root, "coordinator");
        let s = "coordinator.";
        self.listen(&mut t, s, &mut c.coordinator.listen);
        self.duration(&mut t, s, "lease_ttl", &mut c.coordinator.lease_ttl);
        self.get(&mut t, s, "max_attempts", &mut c.coordinator.max_attempts);
        self.duration(
            &mut t,
            s,
            "default_deadline",
            &mut c.coordinator.default_deadline,
        );
        self.duration(&mut t, s, "max_deadline", &mut c.coordinator.max_deadline);
        self.duration(&mut t, s, "agent_timeout", &mut c.coordinator.agent_timeout);
        self.duration(&mut t, s, "max_wait", &mut c.coordinator.max_wait);
        self.get(
            &mut t,
            s,
            "max_active_tasks",
            &mut c.coordinator.max_active_tasks,
        );
        self.duration(
            &mut t,
            s,
            "task_retention",
            &mut c.coordinator.task_retention,
        );
        self.keys(&mut t, s, "agent_keys", &mut c.coordinator.agent_keys);
        self.keys(&mut t, s, "client_keys", &mut c.coordinator.client_keys);
        self.finish(t, "coordinator");

        let mut t = self.section(&mut root, "inference");
        let s = "inference.";
        self.listen(&mut t, s, &mut c.inference.listen);
        self.get(&mut t, s, "threads", &mut c.inference.threads);
        self.get(&mut t, s, "slots", &mut c.inference.slots);
        self.get(&mut t, s, "queue_depth", &mut c.inference.queue_depth);
        self.get(&mut t, s, "context", &mut c.inference.context);
        self.get(&mut t, s, "batch", &mut c.inference.batch);
        self.get(&mut t, s, "gpu_layers", &mut c.inference.gpu_layers);
        self.get(
            &mut t,
            s,
            "max_loaded_models",
            &mut c.inference.max_loaded_models,
        );
        self.duration(&mut t, s, "keep_alive", &mut c.inference.keep_alive);
        self.opt_string(&mut t, s, "ollama_url", &mut c.inference.ollama_url);
        self.get(&mut t, s, "auto_pull", &mut c.inference.auto_pull);
        self.get(&mut t, s, "default_model", &mut c.inference.default_model);
        self.finish(t, "inference");

        let mut t = self.section(&mut root, "control_plane");
        self.listen(&mut t, "control_plane.", &mut c.control_plane);
        self.finish(t, "control_plane");

        let mut t = self.section(&mut root, "ide");
        let s = "ide.";
        self.listen(&mut t, s, &mut c.ide.listen);
        self.get(&mut t, s, "cors_origins", &mut c.ide.cors_origins);
        self.duration(&mut t, s, "task_timeout", &mut c.ide.task_timeout);
        self.finish(t, "ide");

        let mut t = self.section(&mut root, "worker");
        let s = "worker.";
        self.get(&mut t, s, "enabled", &mut c.worker.enabled);
        self.get(&mut t, s, "slots", &mut c.worker.slots);
        self.duration(
            &mut t,
            s,
            "heartbeat_interval",
            &mut c.worker.heartbeat_interval,
        );
        self.duration(
            &mut t,
            s,
            "restart_backoff_min",
            &mut c.worker.restart_backoff_min,
        );
        self.duration(
            &mut t,
            s,
            "restart_backoff_max",
            &mut c.worker.restart_backoff_max,
        );
        self.duration(&mut t, s, "stop_grace", &mut c.worker.stop_grace);
        self.finish(t, "worker");

        let mut t = self.section(&mut root, "security");
        let s = "security.";
        self.duration(
            &mut t,
            s,
            "signature_window",
            &mut c.security.signature_window,
        );
        self.duration(&mut t, s, "clock_skew", &mut c.security.clock_skew);
        self.get(&mut t, s, "per_ip_rate", &mut c.security.per_ip_rate);
        self.get(&mut t, s, "per_ip_burst", &mut c.security.per_ip_burst);
        self.get(&mut t, s, "per_key_rate", &mut c.security.per_key_rate);
        self.get(&mut t, s, "per_key_burst", &mut c.security.per_key_burst);
        self.get(
            &mut t,
            s,
            "nonce_cache_max",
            &mut c.security.nonce_cache_max,
        );
        self.finish(t, "security");

        let mut t = self.section(&mut root, "store");
        let s = "store.";
        self.bytes(&mut t, s, "map_size", &mut c.store.map_size);
        self.get(&mut t, s, "max_batch", &mut c.store.max_batch);
        self.duration(
            &mut t,
            s,
            "bulk_flush_interval",
            &mut c.store.bulk_flush_interval,
        );
        self.finish(t, "store");

        let mut t = self.section(&mut root, "http");
        let s = "http.";
        self.bytes(&mut t, s, "max_body", &mut c.http.max_body);
        self.duration(&mut t, s, "request_timeout", &mut c.http.request_timeout);
        self.duration(&mut t, s, "drain_timeout", &mut c.http.drain_timeout);
        self.finish(t, "http");

        let mut t = self.section(&mut root, "mesh");
        let s = "mesh.";
        let m = &mut c.mesh;
        self.get(&mut t, s, "enabled", &mut m.enabled);
        self.get(&mut t, s, "bootstrap_urls", &mut m.bootstrap_urls);
        self.get(&mut t, s, "advertise_url", &mut m.advertise_url);
        self.keys(&mut t, s, "peer_keys", &mut m.peer_keys);
        self.keys(&mut t, s, "trusted_reporters", &mut m.trusted_reporters);
        self.bytes(&mut t, s, "max_envelope", &mut m.max_envelope);
        self.get(&mut t, s, "per_peer_rate", &mut m.per_peer_rate);
        self.duration(&mut t, s, "window", &mut m.window);
        self.duration(&mut t, s, "probe_period", &mut m.probe_period);
        self.duration(&mut t, s, "suspect_timeout", &mut m.suspect_timeout);
        self.duration(&mut t, s, "sync_interval", &mut m.sync_interval);
        self.duration(&mut t, s, "caps_interval", &mut m.caps_interval);
        self.duration(&mut t, s, "offer_after", &mut m.offer_after);
        self.finish(t, "mesh");

        let mut t = self.section(&mut root, "anchor_proxy");
        let s = "anchor_proxy.";
        let a = &mut c.anchor_proxy;
        self.listen(&mut t, s, &mut a.listen);
        self.get(&mut t, s, "rpc_url", &mut a.rpc_url);
        self.get(&mut t, s, "rpc_user", &mut a.rpc_user);
        self.get(&mut t, s, "rpc_password", &mut a.rpc_password);
        let mut cookie: Option<String> = None;
        self.opt_string(&mut t, s, "rpc_cookie_file", &mut cookie);
        a.rpc_cookie_file = cookie.filter(|c| !c.is_empty()).map(PathBuf::from);
        self.get(&mut t, s, "wallet", &mut a.wallet);
        self.get(&mut t, s, "network", &mut a.network);
        self.keys(&mut t, s, "client_keys", &mut a.client_keys);
        self.get(&mut t, s, "max_per_hour", &mut a.max_per_hour);
        self.get(&mut t, s, "fee_rate", &mut a.fee_rate);
        self.get(&mut t, s, "max_fee", &mut a.max_fee);
        self.duration(&mut t, s, "rpc_timeout", &mut a.rpc_timeout);
        self.finish(t, "anchor_proxy");

        let mut t = self.section(&mut root, "portal");
        let s = "portal.";
        let p = &mut c.portal;
        self.listen(&mut t, s, &mut p.listen);
        self.get(&mut t, s, "rp_id", &mut p.rp_id);
        self.get(&mut t, s, "rp_name", &mut p.rp_name);
        self.get(&mut t, s, "origins", &mut p.origins);
        self.duration(&mut t, s, "session_ttl", &mut p.session_ttl);
        self.duration(&mut t, s, "ceremony_timeout", &mut p.ceremony_timeout);
        self.finish(t, "portal");

        self.finish(root, "");
        c
    }

    fn section(&mut self, root: &mut toml::Table, name: &str) -> toml::Table {
        match root.remove(name) {
            None => toml::Table::new(),
            Some(toml::Value::Table(t)) => t,
            Some(other) => {
                self.problems.push(format!(
                    "{name}: expected a [{name}] table, got a {}",
                    other.type_str()
                ));
                toml::Table::new()
            }
        }
    }

    fn finish(&mut self, rest: toml::Table, section: &str) {
        let known: BTreeSet<&str> = self
            .seen
            .iter()
            .filter_map(|k| {
                if section.is_empty() {
                    Some(k.split('.').next().unwrap_or(k))
                } else {
                    k.strip_prefix(section)?.strip_prefix('.')
                }
            })
            .collect();
        for k in rest.keys() {
            let full = if section.is_empty() {
                k.clone()
            } else {
                format!("{section}.{k}")
            };
            let hint = closest(k, &known)
                .map(|s| format!(" (did you mean {s:?}?)"))
                .unwrap_or_default();
            self.problems.push(format!("{full}: unknown key{hint}"));
        }
    }

    fn raw(&mut self, t: &mut toml::Table, prefix: &str, key: &str) -> Option<toml::Value> {
        self.seen.push(format!("{prefix}{key}"));
        t.remove(key)
    }

    fn get<T: serde::de::DeserializeOwned>(
        &mut self,
        t: &mut toml::Table,
        prefix: &str,
        key: &str,
        out: &mut T,
    ) {
        if let Some(v) = self.raw(t, prefix, key) {
            let shown = v.to_string();
            match v.try_into::<T>() {
                Ok(x) => *out = x,
                Err(e) => self.problems.push(format!(
                    "{prefix}{key}: invalid value {shown}: {}",
                    e.to_string().trim()
                )),
            }
        }
    }

    fn opt_string(
        &mut self,
        t: &mut toml::Table,
        prefix: &str,
        key: &str,
        out: &mut Option<String>,
    ) {
        let mut s = String::new();
        if t.contains_key(key) {
            self.get(t, prefix, key, &mut s);
            *out = Some(s);
        } else {
            self.seen.push(format!("{prefix}{key}"));
        }
    }

    fn path(&mut self, t: &mut toml::Table, prefix: &str, key: &str, out: &mut PathBuf) {
        let mut s = out.display().to_string();
        self.get(t, prefix, key, &mut s);
        *out = PathBuf::from(s);
    }

    fn listen(&mut self, t: &mut toml::Table, prefix: &str, out: &mut Listen) {
        self.get(t, prefix, "port", &mut out.port);
        let mut bind = out.bind.to_string();
        self.get(t, prefix, "bind", &mut bind);
        match bind.parse() {
            Ok(ip) => out.bind = ip,
            Err(_) => self
                .problems
                .push(format!("{prefix}bind: {bind:?} is not an IP address")),
        }
    }

    fn duration(&mut self, t: &mut toml::Table, prefix: &str, key: &str, out: &mut Duration) {
        if let Some(v) = self.raw(t, prefix, key) {
            match v.as_str().map(humantime::parse_duration) {
                Some(Ok(d)) => *out = d,
                Some(Err(e)) => self
                    .problems
                    .push(format!("{prefix}{key}: invalid duration {v}: {e}")),
                None => self.problems.push(format!(
                    "{prefix}{key}: expected a duration string such as \"30s\" or \"5m\", got {v}"
                )),
            }
        }
    }

    fn bytes(&mut self, t: &mut toml::Table, prefix: &str, key: &str, out: &mut u64) {
        if let Some(v) = self.raw(t, prefix, key) {
            let parsed = match &v {
                toml::Value::Integer(i) if *i >= 0 => Ok(*i as u64),
                toml::Value::String(s) => parse_bytes(s),
                other => Err(format!("expected bytes such as \"512MiB\", got {other}")),
            };
            match parsed {
                Ok(b) => *out = b,
                Err(e) => self.problems.push(format!("{prefix}{key}: {e}")),
            }
        }
    }

    fn keys(&mut self, t: &mut toml::Table, prefix: &str, key: &str, out: &mut Vec<KeyId>) {
        let mut texts: Vec<String> = Vec::new();
        if t.contains_key(key) {
            self.get(t, prefix, key, &mut texts);
            out.clear();
            for (i, s) in texts.iter().enumerate() {
                match KeyId::parse(s) {
                    Ok(k) => out.push(k),
                    Err(e) => self.problems.push(format!("{prefix}{key}[{i}]: {e}")),
                }
            }
        } else {
            self.seen.push(format!("{prefix}{key}"));
        }
    }
}

/// Parses sizes such as `1048576`, `512KiB`, `64MiB`, `1GiB`, `2GB`.
///
/// # Errors
/// When the text is not a number with an optional known unit.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as \"512MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB, GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// The known key closest to a misspelt one (edit distance at most 3).
fn closest<'a>(word: &str, known: &BTreeSet<&'a str>) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(word, k), *k))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.coordinator.listen.port, COORDINATOR_PORT);
        assert_eq!(c.addr(&c.inference.listen).to_string(), "127.0.0.1:4302");
        assert_eq!(c.addr(&c.ide.listen).to_string(), "0.0.0.0:4304");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = Config::from_toml(
            r#"
            colour = "blue"
            [coordinator]
            port = "many"
            lease_tll = "5s"
            max_attempts = 0
            [worker]
            heartbeat_interval = 5
            [store]
            map_size = "12 parsecs"
            [security]
            signature_window = "10m"
            "#,
        )
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "colour: unknown key",
            "coordinator.port: invalid value",
            "coordinator.lease_tll: unknown key (did you mean \"lease_ttl\"?)",
            "coordinator.max_attempts: must be between 1 and 100",
            "worker.heartbeat_interval: expected a duration string",
            "store.map_size:",
            "security.signature_window: must be between 1s and 60s",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert_eq!(err.problems.len(), 7, "{text}");
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "data_dir = \"/from/file\"\n[coordinator]\nport = 5000\nmax_attempts = 5\n",
        )
        .unwrap();
        let cli = CliOverrides {
            config_file: Some(file),
            data_dir: Some("/from/cli".into()),
            ide_port: Some(6000),
            set: vec!["worker.slots=3".into()],
            ..Default::default()
        };
        let env = vec![
            (
                "EDGECODER_COORDINATOR__PORT".to_string(),
                "5001".to_string(),
            ),
            ("EDGECODER_HOST".to_string(), "127.0.0.2".to_string()),
            ("EDGECODER_DATA_DIR".to_string(), "/from/env".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let (c, used) = Config::load(&cli, &env).unwrap();
        assert!(used.is_some());
        assert_eq!(c.data_dir, PathBuf::from("/from/cli"));
        assert_eq!(c.coordinator.listen.port, 5001);
        assert_eq!(c.coordinator.max_attempts, 5);
        assert_eq!(c.ide.listen.port, 6000);
        assert_eq!(c.worker.slots, 3);
        assert_eq!(c.addr(&c.inference.listen).to_string(), "127.0.0.2:4302");
    }

    #[test]
    fn unknown_env_keys_and_missing_explicit_file_are_errors() {
        let cli = CliOverrides {
            config_file: Some("/nonexistent/edgecoder.toml".into()),
            ..Default::default()
        };
        let env = vec![("EDGECODER_COORDINATOR__PROT".to_string(), "1".to_string())];
        let err = Config::load(&cli, &env).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/nonexistent/edgecoder.toml"), "{text}");
        assert!(text.contains("coordinator.prot: unknown key"), "{text}");
    }

    #[test]
    fn port_clash_is_reported() {
        let err = Config::from_toml("[ide]\nport = 4301\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("ide.port: port 4301 is also coordinator.port")
        );
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert!(parse_bytes("1XB").is_err());
        assert!(parse_bytes("99999999999999999999GiB").is_err());
    }

    #[test]
    fn every_key_is_documented() {
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/configuration.md"
        ))
        .unwrap();
        for key in Config::known_keys() {
            assert!(
                doc.contains(&format!("`{key}`")),
                "docs/configuration.md does not document `{key}`"
            );
        }
    }

    #[test]
    fn anchor_proxy_settings_are_checked_and_the_password_never_printed() {
        let c = Config::from_toml(
            "[anchor_proxy]\nrpc_user = \"a\"\nrpc_password = \"hunter2\"\nnetwork = \"signet\"\n",
        )
        .unwrap();
        assert_eq!(c.anchor_proxy.network, "signet");
        assert_eq!(c.anchor_proxy.listen.port, ANCHOR_PROXY_PORT);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("<set>"),
            "{shown}"
        );

        let e = Config::from_toml(
            "[anchor_proxy]\nnetwork = \"mainnet\"\nrpc_url = \"127.0.0.1:8332\"\nrpc_user = \"a\"\nrpc_cookie_file = \"/c\"\nmax_per_hour = 0\nmax_fee = 10\n",
        )
        .unwrap_err();
        for key in [
            "anchor_proxy.network",
            "anchor_proxy.rpc_url",
            "anchor_proxy.rpc_cookie_file",
            "anchor_proxy.rpc_user and anchor_proxy.rpc_password",
            "anchor_proxy.max_per_hour",
            "anchor_proxy.max_fee",
        ] {
            assert!(
                e.problems.iter().any(|p| p.starts_with(key)),
                "{key} not reported in {:?}",
                e.problems
            );
        }
    }

    #[test]
    fn systemd_credentials_are_a_layer_above_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edgecoder.toml");
        std::fs::write(
            &file,
            "[mesh]\nbootstrap_urls = [\"http://10.0.0.1:4301\"]\nmax_envelope = \"32KiB\"\n",
        )
        .unwrap();
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        let key = crate::identity::Identity::generate().key_id().to_string();
        std::fs::write(
            creds.join("secrets.toml"),
            format!("[mesh]\npeer_keys = [\"{key}\"]\nmax_envelope = \"16KiB\"\n"),
        )
        .unwrap();
        let cli = CliOverrides {
            config_file: Some(file),
            ..CliOverrides::default()
        };
        let env = vec![(
            "CREDENTIALS_DIRECTORY".to_string(),
            creds.display().to_string(),
        )];
        let (cfg, _) = Config::load(&cli, &env).unwrap();
        assert_eq!(cfg.mesh.peer_keys.len(), 1);
        assert_eq!(
            cfg.mesh.max_envelope,
            16 * 1024,
            "secrets win over the file"
        );
        assert_eq!(
            cfg.mesh.bootstrap_urls,
            ["http://10.0.0.1:4301"],
            "the file's other keys stay"
        );
        std::fs::write(creds.join("secrets.toml"), "[mesh\n").unwrap();
        let err = Config::load(&cli, &env).unwrap_err();
        assert!(err.problems[0].contains("secrets.toml"), "{err:?}");
        // systemd's default when the file is missing (SetCredential=secrets.toml:# no secrets).
        std::fs::write(creds.join("secrets.toml"), "# no secrets").unwrap();
        assert!(Config::load(&cli, &env).is_ok());
    }
}

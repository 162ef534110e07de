//! Command-line interface: argument definitions and the client-side commands.
//!
//! `main.rs` parses [`Cli`] and dispatches; the node (`run`) and the worker (`worker`) live in
//! their own modules, the commands that talk to a running node live here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use reqwest::Method;

use crate::client::{ClientError, CoordinatorClient};
use crate::config::{CliOverrides, Config};
use crate::coordinator::model::*;
use crate::identity::Identity;
use crate::node::{NodeInfo, identity_path};

/// EdgeCoder node agent.
#[derive(Debug, Parser)]
#[command(name = "edgecoder", version, about, propagate_version = true)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Configuration flags shared by commands that read the node's configuration.
#[derive(Debug, Args, Clone, Default)]
pub struct ConfigArgs {
    /// Configuration file (default /etc/edgecoder/edgecoder.toml, or $XDG_CONFIG_HOME/edgecoder/edgecoder.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory (store, keys, node.json).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Bind every service to this address.
    #[arg(long, value_name = "ADDR")]
    pub host: Option<String>,
    /// Coordinator port.
    #[arg(long, value_name = "PORT")]
    pub coordinator_port: Option<u16>,
    /// Inference port.
    #[arg(long, value_name = "PORT")]
    pub inference_port: Option<u16>,
    /// Control-plane port.
    #[arg(long, value_name = "PORT")]
    pub control_plane_port: Option<u16>,
    /// IDE provider port.
    #[arg(long, value_name = "PORT")]
    pub ide_port: Option<u16>,
    /// Set any configuration key, e.g. --set worker.slots=4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl ConfigArgs {
    /// The overrides these flags make.
    pub fn overrides(&self) -> CliOverrides {
        CliOverrides {
            config_file: self.config.clone(),
            data_dir: self.data_dir.clone(),
            host: self.host.clone(),
            coordinator_port: self.coordinator_port,
            inference_port: self.inference_port,
            control_plane_port: self.control_plane_port,
            ide_port: self.ide_port,
            set: self.set.clone(),
        }
    }
}

/// How the client-side commands reach the node.
#[derive(Debug, Args, Clone, Default)]
pub struct ConnectArgs {
    /// Coordinator URL (default: from the running node's node.json, else http://127.0.0.1:4301).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Key to sign requests with (default: the node's identity.key).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Print JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub config: ConfigArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node: coordinator, inference, control plane, IDE provider and a supervised worker.
    Run(ConfigArgs),
    /// Run a worker that registers with a coordinator (the node starts one itself).
    Worker(WorkerCmd),
    /// Submit and inspect tasks.
    #[command(subcommand)]
    Task(TaskCmd),
    /// Manage GGUF models on this node (pull, add, list, info, rm, load, unload).
    #[command(subcommand)]
    Model(ModelCmd),
    /// Manage API keys for the IDE provider (create, list, revoke).
    #[command(subcommand)]
    Apikey(ApiKeyCmd),
    /// Summarise a running node.
    Status(ConnectArgs),
    /// See the mesh: peers and what they advertise.
    #[command(subcommand)]
    Mesh(MeshCmd),
    /// What this box is: board, CPU, memory, temperatures, throttling, GPUs, and the resource
    /// class and capacity derived from them.
    Hw {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Read /proc and /sys under this directory instead of / (fixture trees).
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
    },
    /// Create a key file and print its key id (for coordinator.agent_keys / client_keys).
    Keygen {
        /// Where to write the key (mode 0600); an existing file is only read.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Check the configuration and print every problem, or the effective settings.
    CheckConfig(ConfigArgs),
    /// Measure a real node: boot time, idle memory, task throughput (see docs/PERFORMANCE.md).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Run the anchor proxy (:4311): holds bitcoind credentials and anchors hashes in Bitcoin
    /// for coordinators (a separate deployment; docs/api/anchor-proxy.md).
    AnchorProxy(ConfigArgs),
    /// Run the portal (:4310): user accounts that sign in with passkeys (a separate deployment;
    /// docs/api/portal.md).
    Portal(ConfigArgs),
    /// Anchor data through an anchor proxy, or look an anchor up.
    #[command(subcommand)]
    Anchor(AnchorCmd),
}

/// `edgecoder anchor ...`.
#[derive(Debug, Subcommand)]
pub enum AnchorCmd {
    /// Anchor hex data (1-80 bytes, e.g. a checkpoint hash); the same data again returns the
    /// existing anchor.
    Submit {
        /// The data, hex.
        data: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        proxy: ProxyArgs,
    },
    /// Show an anchor: its transaction and confirmations.
    Get {
        /// The data, hex.
        data: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        proxy: ProxyArgs,
    },
}

/// How `edgecoder anchor` reaches a proxy.
#[derive(Debug, Args, Clone)]
pub struct ProxyArgs {
    /// The anchor proxy's URL.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:4311")]
    pub proxy: String,
    /// Key to sign with (one of the proxy's anchor_proxy.client_keys; default: the node's
    /// identity.key).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Print JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub config: ConfigArgs,
}

/// `edgecoder anchor ...`.
///
/// # Errors
/// Configuration problems, an unreadable key, the proxy's refusal.
pub async fn anchor(cmd: AnchorCmd) -> anyhow::Result<u8> {
    let (data, proxy, submit) = match cmd {
        AnchorCmd::Submit { data, proxy } => (data, proxy, true),
        AnchorCmd::Get { data, proxy } => (data, proxy, false),
    };
    let identity = match &proxy.key {
        Some(k) => signing_key(k.clone())?,
        None => {
            let env: Vec<(String, String)> = std::env::vars().collect();
            let (cfg, _) = Config::load(&proxy.config.overrides(), &env)?;
            signing_key(identity_path(&cfg.data_dir))?
        }
    };
    let client = CoordinatorClient::new(&proxy.proxy, Arc::new(identity))?;
    let view: crate::anchor_proxy::anchors::AnchorView = if submit {
        let req = crate::anchor_proxy::AnchorRequest { data };
        client.post("/anchors", &req).await?
    } else {
        client.get(&format!("/anchors/{data}")).await?
    };
    if proxy.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        let conf = match (view.confirmations, &view.chain_error) {
            (Some(c), _) => format!("{c} confirmations"),
            (None, Some(e)) => format!("confirmations unknown ({e})"),
            (None, None) => "confirmations unknown".into(),
        };
        println!(
            "txid {} ({:?}, fee {} sat, {conf})",
            view.txid, view.state, view.fee_sats
        );
    }
    Ok(0)
}

/// `edgecoder mesh ...`.
#[derive(Debug, Subcommand)]
pub enum MeshCmd {
    /// Every member this node knows: state, URL, last seen, models.
    Peers(ConnectArgs),
    /// What every node advertises: models, resource class, free slots, load.
    Capabilities(ConnectArgs),
    /// Envelopes accepted and refused (by reason), sent and failed; offers and claims.
    Stats(ConnectArgs),
    /// Publish a signed blacklist record against a node: this node (and every node that lists
    /// this one in mesh.trusted_reporters) drops its messages.
    Blacklist {
        /// The node's key (base64url, from `edgecoder mesh peers --json`).
        target: String,
        /// bad_result, abuse or manual.
        #[arg(long, default_value = "manual")]
        reason: String,
        /// Evidence (only its SHA-256 is published).
        #[arg(long, default_value = "")]
        evidence: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
    /// Blacklist records this node holds, and which it enforces.
    Blacklisted(ConnectArgs),
}

/// `edgecoder bench ...`.
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Time from spawn to fully operational, first boots and restarts.
    Boot {
        /// Starts of each kind.
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// Resident memory of node and worker after idling.
    Idle {
        /// How long to idle first.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        settle: Duration,
    },
    /// End-to-end probe tasks per second and latency.
    Throughput {
        /// Concurrent clients, comma-separated.
        #[arg(long, default_value = "1,16", value_delimiter = ',')]
        clients: Vec<usize>,
        /// Measurement time per client count.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Time before measuring.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        warmup: Duration,
    },
    /// Added latency of a probe run on a mesh peer vs locally (three real nodes).
    Mesh {
        /// Tasks of each kind.
        #[arg(long, default_value_t = 300)]
        tasks: usize,
    },
}

/// `edgecoder worker`.
#[derive(Debug, Args)]
pub struct WorkerCmd {
    /// Coordinator URL.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:4301")]
    pub coordinator: String,
    /// Agent key file (created if missing; admit its key id with coordinator.agent_keys).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Tasks run at once.
    #[arg(long, default_value_t = 16)]
    pub slots: u32,
    /// Exit when this process stops being our parent (set by the node).
    #[arg(long, hide = true)]
    pub parent_pid: Option<u32>,
    /// Inference service URL; with it the worker runs chat and completion tasks.
    #[arg(long, value_name = "URL")]
    pub inference: Option<String>,
    /// Generations sent to the inference service at once (the node passes its slots plus queue).
    #[arg(long, default_value_t = 9)]
    pub generation_slots: u32,
    /// Resource class to advertise: tiny, small, medium, large, xlarge (the node passes what
    /// `edgecoder hw` derives).
    #[arg(long, default_value = "tiny", value_parser = parse_class)]
    pub resource_class: crate::coordinator::model::ResourceClass,
    /// Log filter.
    #[arg(long, default_value = "info")]
    pub log: String,
    /// Time running tasks get to finish after SIGTERM.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
}

/// `edgecoder apikey ...`.
#[derive(Debug, Subcommand)]
pub enum ApiKeyCmd {
    /// Create a key and print it (it is shown only now).
    Create {
        /// A name to recognise it by.
        #[arg(long, default_value = "unnamed")]
        name: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
    /// List keys (their ids, names and first characters; never the keys).
    List {
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
    /// Revoke a key by id; requests with it fail at once.
    Revoke {
        /// The key's id (from `apikey list`).
        id: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
}

/// Runs an `apikey` subcommand.
///
/// # Errors
/// Connection and API errors.
pub async fn apikey(cmd: ApiKeyCmd) -> anyhow::Result<u8> {
    match cmd {
        ApiKeyCmd::Create { name, conn } => {
            let client = connect_service(&conn, Service::ControlPlane)?;
            let k: crate::ide::keys::NewApiKey = client
                .post("/apikeys", &serde_json::json!({"name": name}))
                .await?;
            if conn.json {
                print_json(&k)?;
            } else {
                println!("{}", k.key);
                eprintln!(
                    "created key {} ({}); it is shown only now",
                    k.record.id, k.record.name
                );
            }
            Ok(0)
        }
        ApiKeyCmd::List { conn } => {
            let client = connect_service(&conn, Service::ControlPlane)?;
            let keys: Vec<crate::ide::keys::ApiKeyRecord> = client.get("/apikeys").await?;
            if conn.json {
                print_json(&keys)?;
            } else {
                for k in keys {
                    println!("{}  {:<20} {}...", k.id, k.name, k.prefix);
                }
            }
            Ok(0)
        }
        ApiKeyCmd::Revoke { id, conn } => {
            let client = connect_service(&conn, Service::ControlPlane)?;
            delete(&client, &format!("/apikeys/{id}")).await?;
            eprintln!("revoked {id}");
            Ok(0)
        }
    }
}

/// `edgecoder model ...`.
#[derive(Debug, Subcommand)]
pub enum ModelCmd {
    /// Download a GGUF model (resumable, verified) into the store. URL may also be a catalog name.
    Pull {
        /// https URL of a .gguf file, or a catalog name (see `model catalog`).
        #[arg(value_name = "URL")]
        source: String,
        /// Expected sha256 (hex); a mismatch stores nothing.
        #[arg(long)]
        sha256: Option<String>,
        /// Name in the store (default: from the URL).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
    /// Copy a local GGUF file into the store (it is validated first).
    Add {
        /// The file.
        file: PathBuf,
        /// Name in the store (default: from the file name).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
    /// List models from every backend.
    List {
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
    /// Show a model's architecture, size, context, quantisation and chat template.
    Info {
        /// Model name.
        name: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
    /// Remove a model from the store.
    Rm {
        /// Model name.
        name: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
    /// Load a model now (it also loads on first use).
    Load {
        /// Model name.
        name: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
    /// Unload a model.
    Unload {
        /// Model name.
        name: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
    /// The built-in catalog of default models per resource class.
    Catalog,
}

/// `edgecoder task ...`.
#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// Submit a task and print it (or, with --wait, its result).
    Submit {
        /// Task kind.
        #[arg(long, default_value = "probe")]
        kind: String,
        /// Payload as JSON.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Priority, -100..100.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// Deadline relative to now, e.g. 30s.
        #[arg(long)]
        timeout: Option<String>,
        /// Required model.
        #[arg(long)]
        model: Option<String>,
        /// Idempotency key: resubmitting with it returns the first task.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait for the result and print it.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
    /// Print a task.
    Get {
        /// Task id.
        id: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
    /// Wait for a task's result and print it; exits 2 if the task did not succeed.
    Wait {
        /// Task id.
        id: String,
        /// Give up after this long.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
    /// List tasks, newest last.
    List {
        /// Only tasks in this state.
        #[arg(long)]
        state: Option<String>,
        /// Most tasks to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
    /// Cancel a task.
    Cancel {
        /// Task id.
        id: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
    /// Follow a task's event stream until it finishes.
    Events {
        /// Task id.
        id: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        conn: ConnectArgs,
    },
}

/// The coordinator URL for `conn`, and the configuration it came from.
fn resolve(conn: &ConnectArgs) -> anyhow::Result<(String, Config)> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let (cfg, _) = Config::load(&conn.config.overrides(), &env)?;
    let url = match &conn.url {
        Some(u) => u.clone(),
        None => match NodeInfo::read(&cfg.data_dir) {
            Ok(info) => info.coordinator_url(),
            Err(_) => format!(
                "http://{}",
                crate::node::local_addr(cfg.addr(&cfg.coordinator.listen))
            ),
        },
    };
    Ok((url, cfg))
}

/// Reads the key a client command signs with.
fn signing_key(path: PathBuf) -> anyhow::Result<Identity> {
    Identity::load(&path).with_context(|| {
        format!(
            "cannot read the signing key {} (run as the node's user, or pass --key)",
            path.display()
        )
    })
}

/// A client for the node named by `conn`.
///
/// # Errors
/// Configuration problems, an unreadable key.
pub fn connect(conn: &ConnectArgs) -> anyhow::Result<CoordinatorClient> {
    let (url, cfg) = resolve(conn)?;
    let identity = signing_key(
        conn.key
            .clone()
            .unwrap_or_else(|| identity_path(&cfg.data_dir)),
    )?;
    Ok(CoordinatorClient::new(&url, Arc::new(identity))?)
}

/// Which of the node's signed APIs a command talks to.
#[derive(Debug, Clone, Copy)]
pub enum Service {
    /// :4302.
    Inference,
    /// :4303.
    ControlPlane,
}

/// A signed client for one of the node's local services (from node.json, else the config).
///
/// # Errors
/// Configuration problems, an unreadable key.
pub fn connect_service(conn: &ConnectArgs, service: Service) -> anyhow::Result<CoordinatorClient> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let (cfg, _) = Config::load(&conn.config.overrides(), &env)?;
    let identity = signing_key(
        conn.key
            .clone()
            .unwrap_or_else(|| identity_path(&cfg.data_dir)),
    )?;
    let info = NodeInfo::read(&cfg.data_dir).ok();
    let addr = match service {
        Service::Inference => info
            .map(|i| i.inference)
            .unwrap_or(cfg.addr(&cfg.inference.listen)),
        Service::ControlPlane => info
            .map(|i| i.control_plane)
            .unwrap_or(cfg.addr(&cfg.control_plane)),
    };
    let url = format!("http://{}", crate::node::local_addr(addr));
    Ok(CoordinatorClient::new(&url, Arc::new(identity))?)
}

/// "status: code: message" from an error answer in the common shape, or the raw text.
fn error_text(status: reqwest::StatusCode, body: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(v) if v["error"]["code"].is_string() => format!(
            "{status}: {}: {}",
            v["error"]["code"].as_str().unwrap_or(""),
            v["error"]["message"].as_str().unwrap_or("")
        ),
        _ => format!("{status}: {}", body.chars().take(300).collect::<String>()),
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Draws a one-line progress bar on stderr (only when it is a terminal).
fn progress_bar(done: u64, total: Option<u64>, started: std::time::Instant) {
    use std::io::{IsTerminal, Write};
    let mut err = std::io::stderr();
    if !err.is_terminal() {
        return;
    }
    let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
    let line = match total {
        Some(t) if t > 0 => {
            let frac = (done as f64 / t as f64).min(1.0);
            let width = 30;
            let filled = (frac * width as f64) as usize;
            format!(
                "\r[{}{}] {:>5.1}% {} / {}  {}/s   ",
                "#".repeat(filled),
                " ".repeat(width - filled),
                frac * 100.0,
                human_bytes(done),
                human_bytes(t),
                human_bytes(rate as u64)
            )
        }
        _ => format!("\r{}  {}/s   ", human_bytes(done), human_bytes(rate as u64)),
    };
    let _ = err.write_all(line.as_bytes());
    let _ = err.flush();
}

/// Runs a `model` subcommand; returns the exit code.
///
/// # Errors
/// Connection, API and argument errors.
pub async fn model(cmd: ModelCmd) -> anyhow::Result<u8> {
    use crate::inference::api::{AddRequest, ModelView, PullEvent, PullRequest};
    match cmd {
        ModelCmd::Catalog => {
            for e in crate::inference::catalog::CATALOG {
                println!(
                    "{:<40} {:>10}  class {:?}\n    {}",
                    e.name,
                    human_bytes(e.approx_size),
                    e.class,
                    e.url
                );
            }
            Ok(0)
        }
        ModelCmd::Pull {
            source,
            sha256,
            name,
            conn,
        } => {
            use futures_util::StreamExt;
            let client = connect_service(&conn, Service::Inference)?;
            let body = serde_json::to_vec(&PullRequest {
                url: source,
                sha256,
                name,
            })?;
            let target = client.base().join("/models/pull")?;
            let resp = client
                .signed(
                    Method::POST,
                    &target,
                    body,
                    Duration::from_secs(7 * 24 * 3600),
                )
                .send()
                .await?;
            if !resp.status().is_success() {
                let status = resp.status();
                bail!(
                    "{}",
                    error_text(status, &resp.text().await.unwrap_or_default())
                );
            }
            let started = std::time::Instant::now();
            let mut stream = resp.bytes_stream();
            let mut buf = Vec::new();
            while let Some(chunk) = stream.next().await {
                buf.extend_from_slice(&chunk?);
                while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    match serde_json::from_slice::<PullEvent>(&line)? {
                        PullEvent::Progress {
                            done,
                            total,
                            resumed_from,
                        } => {
                            if resumed_from > 0 && done == resumed_from {
                                eprintln!("resuming at {}", human_bytes(resumed_from));
                            }
                            progress_bar(done, total, started);
                        }
                        PullEvent::Verifying => eprintln!("\nverifying sha256 and GGUF structure"),
                        PullEvent::Done { model } => {
                            print_json(&model)?;
                            return Ok(0);
                        }
                        PullEvent::Error { code, message } => {
                            eprintln!();
                            bail!("{code}: {message}");
                        }
                    }
                }
            }
            bail!("the node ended the pull without a result")
        }
        ModelCmd::Add { file, name, conn } => {
            let client = connect_service(&conn, Service::Inference)?;
            let path =
                std::fs::canonicalize(&file).with_context(|| format!("{}", file.display()))?;
            let view: ModelView = client
                .post(
                    "/models/add",
                    &AddRequest {
                        path: path.display().to_string(),
                        name,
                    },
                )
                .await?;
            print_json(&view)?;
            Ok(0)
        }
        ModelCmd::List { conn } => {
            let client = connect_service(&conn, Service::Inference)?;
            let list: Vec<ModelView> = client.get("/models").await?;
            if conn.json {
                print_json(&list)?;
                return Ok(0);
            }
            if list.is_empty() {
                println!(
                    "no models; add one with `edgecoder model pull URL` or `edgecoder model add FILE.gguf`"
                );
            }
            for m in list {
                let detail = m.info.as_ref().map_or(String::new(), |i| {
                    format!(
                        "{} {:.2}B params {} ctx {}",
                        i.architecture,
                        i.parameters as f64 / 1e9,
                        i.quantization,
                        i.context_length
                    )
                });
                println!(
                    "{:<40} {:<7} {:>10} {}{}",
                    m.name,
                    m.backend,
                    m.size.map(human_bytes).unwrap_or_default(),
                    detail,
                    if m.loaded { "  (loaded)" } else { "" }
                );
            }
            Ok(0)
        }
        ModelCmd::Info { name, conn } => {
            let client = connect_service(&conn, Service::Inference)?;
            let m: ModelView = client.get(&format!("/models/{name}")).await?;
            print_json(&m)?;
            Ok(0)
        }
        ModelCmd::Rm { name, conn } => {
            let client = connect_service(&conn, Service::Inference)?;
            delete(&client, &format!("/models/{name}")).await?;
            eprintln!("removed {name}");
            Ok(0)
        }
        ModelCmd::Load { name, conn } => {
            let client = connect_service(&conn, Service::Inference)?;
            let v: serde_json::Value = client
                .send::<(), serde_json::Value>(
                    Method::POST,
                    &format!("/models/{name}/load"),
                    None,
                    Some(Duration::from_secs(600)),
                )
                .await?
                .body;
            print_json(&v)?;
            Ok(0)
        }
        ModelCmd::Unload { name, conn } => {
            let client = connect_service(&conn, Service::Inference)?;
            let v: serde_json::Value = client
                .send::<(), serde_json::Value>(
                    Method::POST,
                    &format!("/models/{name}/unload"),
                    None,
                    None,
                )
                .await?
                .body;
            print_json(&v)?;
            Ok(0)
        }
    }
}

/// A signed `DELETE` whose success answer has no body (204).
async fn delete(client: &CoordinatorClient, path: &str) -> anyhow::Result<()> {
    let url = client.base().join(path)?;
    let resp = client
        .signed(Method::DELETE, &url, Vec::new(), Duration::from_secs(30))
        .send()
        .await?;
    if !resp.status().is_success() {
        let status = resp.status();
        bail!(
            "{}",
            error_text(status, &resp.text().await.unwrap_or_default())
        );
    }
    Ok(())
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs a `task` subcommand; returns the process exit code.
///
/// # Errors
/// Connection, API and argument errors.
pub async fn task(cmd: TaskCmd) -> anyhow::Result<u8> {
    match cmd {
        TaskCmd::Submit {
            kind,
            payload,
            priority,
            timeout,
            model,
            idempotency_key,
            wait,
            conn,
        } => {
            let kind: TaskKind = kind.parse().map_err(anyhow::Error::msg)?;
            let payload: serde_json::Value =
                serde_json::from_str(&payload).context("--payload is not valid JSON")?;
            let client = connect(&conn)?;
            let req = SubmitTask {
                kind,
                payload,
                requirements: Requirements {
                    model,
                    ..Default::default()
                },
                priority,
                timeout,
                max_attempts: None,
                idempotency_key,
            };
            if !wait {
                let view: TaskView = client.post("/tasks", &req).await?;
                print_json(&view)?;
                return Ok(0);
            }
            // One round trip when the task finishes within 30 s; otherwise keep waiting.
            let view: TaskView = client
                .send(
                    Method::POST,
                    "/tasks?wait=30s",
                    Some(&req),
                    Some(Duration::from_secs(45)),
                )
                .await?
                .body;
            match view.result {
                Some(r) => {
                    print_json(&r)?;
                    Ok(if r.state == TaskState::Succeeded {
                        0
                    } else {
                        2
                    })
                }
                None => wait_result(&client, &view.id.to_string(), Duration::from_secs(600)).await,
            }
        }
        TaskCmd::Get { id, conn } => {
            let client = connect(&conn)?;
            let view: TaskView = client.get(&format!("/tasks/{id}")).await?;
            print_json(&view)?;
            Ok(0)
        }
        TaskCmd::Wait { id, timeout, conn } => {
            let client = connect(&conn)?;
            wait_result(&client, &id, timeout).await
        }
        TaskCmd::List { state, limit, conn } => {
            let client = connect(&conn)?;
            let mut path = format!("/tasks?limit={limit}");
            if let Some(s) = state {
                path.push_str(&format!("&state={s}"));
            }
            let list: TaskList = client.get(&path).await?;
            if conn.json {
                print_json(&list)?;
            } else {
                for t in &list.tasks {
                    println!(
                        "{}  {:<10} {:<9} attempts {}/{}",
                        t.id,
                        t.kind.as_str(),
                        t.state.as_str(),
                        t.attempts,
                        t.max_attempts
                    );
                }
                if let Some(n) = list.next {
                    println!("(more after {n})");
                }
            }
            Ok(0)
        }
        TaskCmd::Cancel { id, conn } => {
            let client = connect(&conn)?;
            let view: TaskView = client
                .send::<(), TaskView>(Method::DELETE, &format!("/tasks/{id}"), None, None)
                .await?
                .body;
            print_json(&view)?;
            Ok(0)
        }
        TaskCmd::Events { id, conn } => {
            let client = connect(&conn)?;
            follow_events(&client, &id).await
        }
    }
}

async fn wait_result(
    client: &CoordinatorClient,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<u8> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            bail!(
                "task {id} did not finish within {}",
                humantime::format_duration(timeout)
            );
        }
        let wait = left.min(Duration::from_secs(30)).as_secs().max(1);
        let ans = client
            .send::<(), serde_json::Value>(
                Method::GET,
                &format!("/tasks/{id}/result?wait={wait}s"),
                None,
                Some(Duration::from_secs(wait + 10)),
            )
            .await?;
        if ans.status == reqwest::StatusCode::OK {
            print_json(&ans.body)?;
            let ok = ans.body["state"] == "succeeded";
            return Ok(if ok { 0 } else { 2 });
        }
    }
}

async fn follow_events(client: &CoordinatorClient, id: &str) -> anyhow::Result<u8> {
    use futures_util::StreamExt;
    let url = client.base().join(&format!("/tasks/{id}/events"))?;
    let resp = client
        .signed(
            Method::GET,
            &url,
            Vec::new(),
            Duration::from_secs(24 * 3600),
        )
        .send()
        .await?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        bail!("{status}: {body}");
    }
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let mut event = "message";
            let mut data = String::new();
            for line in frame.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = if e.trim() == "end" { "end" } else { "data" };
                }
                if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            if !data.is_empty() {
                println!("{data}");
            }
            if event == "end" {
                return Ok(0);
            }
        }
    }
    Ok(0)
}

/// `edgecoder status`.
///
/// # Errors
/// Connection errors.
pub async fn status(conn: ConnectArgs) -> anyhow::Result<u8> {
    let v: serde_json::Value = get_json(&conn, "/status").await?;
    if conn.json {
        print_json(&v)?;
        return Ok(0);
    }
    println!("node        {}", v["node_id"].as_str().unwrap_or("?"));
    println!(
        "state       {}",
        if v["operational"] == true {
            "operational"
        } else {
            "starting"
        }
    );
    println!("version     {}", v["version"].as_str().unwrap_or("?"));
    println!(
        "uptime      {:.0}s",
        v["uptime_secs"].as_f64().unwrap_or(0.0)
    );
    if let Some(ports) = v["ports"].as_object() {
        for (name, addr) in ports {
            println!("{:<11} {}", name, addr.as_str().unwrap_or("?"));
        }
    }
    let q = &v["queue"];
    println!(
        "tasks       {} queued, {} leased, {} running",
        q["queued"], q["leased"], q["running"]
    );
    println!("agents      {}", v["agents"]);
    let w = &v["worker"];
    println!(
        "worker      {} (pid {}, {} restarts)",
        if w["registered"] == true {
            "registered"
        } else {
            "not registered"
        },
        w["pid"],
        w["restarts"]
    );
    Ok(0)
}

async fn get_json<T: serde::de::DeserializeOwned>(
    conn: &ConnectArgs,
    path: &str,
) -> anyhow::Result<T> {
    // /status and the mesh views are unsigned: no key needed.
    let (base, _) = resolve(conn)?;
    let url = reqwest::Url::parse(&base)?.join(path)?;
    let resp = crate::http::client_builder()
        .build()?
        .get(url.clone())
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .with_context(|| format!("cannot reach the node at {url}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        anyhow::bail!("{url}: {status}: {text}");
    }
    Ok(resp.json().await?)
}

fn ago(now: u64, ms: u64) -> String {
    if ms == 0 {
        "-".into()
    } else {
        format!("{:.1}s ago", now.saturating_sub(ms) as f64 / 1000.0)
    }
}

/// `edgecoder mesh ...`.
///
/// # Errors
/// Connection errors, or a node without a mesh.
pub async fn mesh(cmd: MeshCmd) -> anyhow::Result<u8> {
    use crate::mesh::service::{CapsView, MeshStats, PeersView};
    let now = crate::clock::now_ms();
    match cmd {
        MeshCmd::Peers(conn) => {
            let v: PeersView = get_json(&conn, "/mesh/peers").await?;
            if conn.json {
                print_json(&v)?;
                return Ok(0);
            }
            println!("this node {} at {}", v.node_id, v.url);
            if v.peers.is_empty() {
                println!("no peers (set mesh.bootstrap_urls or COORDINATOR_BOOTSTRAP_URLS)");
            } else {
                println!(
                    "{:<28} {:<8} {:<28} {:<12} models",
                    "NODE", "STATE", "URL", "LAST SEEN"
                );
            }
            for p in &v.peers {
                let models = p
                    .capabilities
                    .as_ref()
                    .map(|c| c.models.join(","))
                    .unwrap_or_else(|| "?".into());
                println!(
                    "{:<28} {:<8} {:<28} {:<12} {}",
                    p.node_id,
                    format!("{:?}", p.state).to_lowercase(),
                    p.url,
                    ago(now, p.last_seen_ms),
                    models
                );
            }
        }
        MeshCmd::Capabilities(conn) => {
            let v: Vec<CapsView> = get_json(&conn, "/mesh/capabilities").await?;
            if conn.json {
                print_json(&v)?;
                return Ok(0);
            }
            println!(
                "{:<28} {:<28} {:<7} {:<10} {:<5} models",
                "NODE", "URL", "CLASS", "FREE/SLOTS", "LOAD"
            );
            for c in &v {
                println!(
                    "{:<28} {:<28} {:<7} {:<10} {:<5} {}",
                    c.node_id,
                    c.url,
                    format!("{:?}", c.resource_class).to_lowercase(),
                    format!("{}/{}", c.free_slots, c.slots),
                    format!("{}%", c.load_pct),
                    c.models.join(",")
                );
            }
        }
        MeshCmd::Stats(conn) => {
            let v: MeshStats = get_json(&conn, "/mesh/stats").await?;
            print_json(&v)?;
        }
        MeshCmd::Blacklist {
            target,
            reason,
            evidence,
            conn,
        } => {
            let client = connect_service(&conn, Service::ControlPlane)?;
            let v: crate::mesh::service::BlacklistView = client
                .post(
                    "/mesh/blacklist",
                    &serde_json::json!({"target": target, "reason": reason, "evidence": evidence}),
                )
                .await?;
            if conn.json {
                print_json(&v)?;
            } else {
                println!(
                    "blacklisted {} ({:?}), record {} of this node's chain",
                    v.target, v.reason, v.seq
                );
            }
        }
        MeshCmd::Blacklisted(conn) => {
            let client = connect_service(&conn, Service::ControlPlane)?;
            let v: Vec<crate::mesh::service::BlacklistView> = client.get("/mesh/blacklist").await?;
            if conn.json {
                print_json(&v)?;
            } else {
                for b in v {
                    println!(
                        "{} by {} #{} {:?} {}",
                        b.target,
                        b.reporter,
                        b.seq,
                        b.reason,
                        if b.enforced {
                            "enforced"
                        } else {
                            "not enforced"
                        }
                    );
                }
            }
        }
    }
    Ok(0)
}

fn parse_class(s: &str) -> Result<crate::coordinator::model::ResourceClass, String> {
    serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase()))
        .map_err(|_| format!("{s:?}: expected tiny, small, medium, large or xlarge"))
}

/// `edgecoder hw`.
///
/// # Errors
/// Writing to stdout.
pub fn hw(json: bool, root: &std::path::Path) -> anyhow::Result<u8> {
    let info = crate::hw::detect(root, crate::hw::this_arch(), &crate::hw::nvml::NvmlProbe);
    if json {
        print_json(&info)?;
        return Ok(0);
    }
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    println!("board       {} ({})", info.model, info.board);
    println!(
        "cpu         {} {}, {} cores / {} threads{}{}",
        info.cpu.arch,
        info.cpu.model,
        info.cpu.physical,
        info.cpu.logical,
        if info.cpu.features.is_empty() {
            String::new()
        } else {
            format!(", {}", info.cpu.features.join(" "))
        },
        if info.cpu.max_khz > 0 {
            format!(", up to {:.2} GHz", info.cpu.max_khz as f64 / 1e6)
        } else {
            String::new()
        }
    );
    println!(
        "memory      {:.1} GiB total, {:.1} GiB available, {} KiB pages",
        gib(info.memory.total),
        gib(info.memory.available),
        info.page_size / 1024
    );
    if !info.thermal.is_empty() {
        let t: Vec<String> = info
            .thermal
            .iter()
            .map(|t| format!("{} {:.1} °C", t.zone, t.celsius))
            .collect();
        println!("thermal     {}", t.join(", "));
    }
    println!(
        "throttling  {}",
        if info.throttling.active() {
            format!("{:?}", info.throttling)
        } else if info.throttling.occurred_since_boot {
            "none now (some since boot)".into()
        } else {
            "none".into()
        }
    );
    if info.gpus.is_empty() {
        println!("gpu         none");
    }
    for g in &info.gpus {
        println!(
            "gpu         {} ({:?}): {:.1} GiB free of {:.1} GiB, {:.0}% busy{}{}",
            g.name,
            g.kind,
            gib(g.memory_free),
            gib(g.memory_total),
            g.utilisation_pct,
            g.temperature_c
                .map_or(String::new(), |t| format!(", {t:.0} °C")),
            g.power_w.map_or(String::new(), |w| format!(", {w:.0} W"))
        );
    }
    let c = &info.capacity;
    println!("class       {:?}", info.class);
    println!(
        "capacity    {:.1} GiB for models, {} slots, {} threads, GPU layers {}, default model {}",
        gib(c.model_memory_budget),
        c.slots,
        c.threads,
        if c.gpu_layers >= 999 {
            "all".to_string()
        } else {
            c.gpu_layers.to_string()
        },
        c.default_model
    );
    for d in &c.derated {
        println!("derated     {d}");
    }
    for d in &info.degraded {
        println!("degraded    {d}");
    }
    Ok(0)
}

/// Turns client errors into a readable message for the CLI.
pub fn describe(e: &anyhow::Error) -> String {
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Transport { url, .. }) => {
            format!("cannot reach the node at {url}; is `edgecoder run` running?")
        }
        _ => format!("{e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap checks argument names, conflicts and defaults here rather than at run time.
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}

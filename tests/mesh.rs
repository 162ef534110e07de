//! The mesh between real node processes on 127.0.0.x: membership, capability gossip, failure
//! detection, rejoin, and the ingress checks of `/mesh/ingest`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{BIN, Node, get, get_json};
use edgecoder::identity::Identity;
use edgecoder::mesh::wire::{self, Message, Packet, Probe};

/// Fast SWIM timers so the tests take seconds.
const FAST: &[&str] = &[
    "--set",
    "mesh.probe_period=300ms",
    "--set",
    "mesh.suspect_timeout=1500ms",
    "--set",
    "mesh.sync_interval=1s",
];

fn start(host: &str, bootstrap: Option<&str>) -> Node {
    let mut args = vec!["--host", host];
    args.extend_from_slice(FAST);
    let set;
    if let Some(b) = bootstrap {
        set = format!("mesh.bootstrap_urls=[\"{b}\"]");
        args.extend(["--set", &set]);
    }
    Node::start(&args)
}

fn peers(n: &Node) -> serde_json::Value {
    get_json(&format!("{}/mesh/peers", n.coordinator())).expect("/mesh/peers answers")
}

/// The state `observer` holds for the node at `url` ("alive", "suspect", "dead"), if known.
fn state_of(observer: &Node, url: &str) -> Option<String> {
    peers(observer)["peers"]
        .as_array()?
        .iter()
        .find(|p| p["url"] == url)
        .map(|p| p["state"].as_str().unwrap_or("").to_string())
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn all_alive(nodes: &[&Node]) -> bool {
    nodes.iter().all(|n| {
        nodes
            .iter()
            .filter(|m| m.coordinator() != n.coordinator())
            .all(|m| state_of(n, &m.coordinator()).as_deref() == Some("alive"))
    })
}

#[test]
fn nodes_converge_share_capabilities_detect_a_death_and_take_it_back() {
    let a = start("127.0.0.2", None);
    let seed = a.coordinator();
    let b = start("127.0.0.3", Some(&seed));
    let mut c = start("127.0.0.4", Some(&seed));
    let d = start("127.0.0.5", Some(&seed));

    // /identity says how to join.
    let ident = get_json(&format!("{seed}/identity")).unwrap();
    assert_eq!(ident["mesh"]["url"], seed);
    assert!(ident["mesh"]["peer"].as_str().unwrap().len() > 40);

    wait_until(
        "every node sees every other alive, and has heard from it directly",
        Duration::from_secs(30),
        || {
            all_alive(&[&a, &b, &c, &d])
                && [&a, &b, &c, &d].iter().all(|n| {
                    peers(n)["peers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|p| p["last_seen_ms"].as_u64().unwrap() > 0)
                })
        },
    );
    for n in [&a, &b, &c, &d] {
        let v = peers(n);
        assert_eq!(v["url"], n.coordinator());
        assert_eq!(v["peers"].as_array().unwrap().len(), 3, "{v}");
        for p in v["peers"].as_array().unwrap() {
            assert!(p["node_id"].as_str().unwrap().len() > 10, "{p}");
        }
    }

    // Every node's capabilities (its local worker: probe tasks, 16 slots) reach every node.
    wait_until("capabilities everywhere", Duration::from_secs(20), || {
        [&a, &b, &c, &d].iter().all(|n| {
            let caps = get_json(&format!("{}/mesh/capabilities", n.coordinator())).unwrap();
            let caps = caps.as_array().unwrap();
            caps.len() == 4
                && caps.iter().all(|c| {
                    // The hardware detection's budget rides along with the agents' slots.
                    c["model_budget_mib"].as_u64().unwrap_or(0) > 0
                        && c["throttled"].is_boolean()
                        && c["slots"] == 16
                        && c["kinds"].as_array().unwrap().iter().any(|k| k == "probe")
                })
        })
    });
    let v = peers(&a);
    let cp = v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["url"] == c.coordinator())
        .unwrap()
        .clone();
    assert_eq!(cp["capabilities"]["url"], c.coordinator());
    let old_generation = cp["generation"].as_u64().unwrap();

    // The CLI shows the same.
    let out = common::cli(["mesh", "peers", "--url", &seed]);
    let text = String::from_utf8_lossy(&out.stdout);
    for n in [&b, &c, &d] {
        assert!(text.contains(&n.coordinator()), "{text}");
    }
    assert!(text.contains("alive"), "{text}");
    let out = common::cli(["mesh", "capabilities", "--url", &seed]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("16/16")
            .count(),
        4
    );

    // kill -9: suspect, then dead on every other node.
    let c_url = c.coordinator();
    c.kill9();
    wait_until(
        "the killed node is dead everywhere",
        Duration::from_secs(20),
        || {
            [&a, &b, &d]
                .iter()
                .all(|n| state_of(n, &c_url).as_deref() == Some("dead"))
        },
    );

    // Back on the same data directory (same key, new process, new port): alive everywhere again
    // under a newer generation.
    c.restart();
    wait_until(
        "the restarted node is alive everywhere",
        Duration::from_secs(30),
        || all_alive(&[&a, &b, &c, &d]),
    );
    let v = peers(&b);
    let back = v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["url"] == c.coordinator())
        .unwrap();
    assert!(back["generation"].as_u64().unwrap() > old_generation);
}

/// POSTs raw bytes to `/mesh/ingest`; returns the status.
fn post(base: &str, body: &[u8]) -> u16 {
    use std::io::{Read, Write};
    let host = base.strip_prefix("http://").unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /mesh/ingest HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    // The server may answer (413) before reading a large body; a reset then is fine.
    let _ = s.write_all(body);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn stats(n: &Node) -> serde_json::Value {
    get_json(&format!("{}/mesh/stats", n.coordinator())).unwrap()
}

fn now_ms() -> u64 {
    edgecoder::clock::now_ms()
}

/// A well-formed SWIM packet that means nothing to a node that does not know its sender.
fn junk() -> Message {
    Message::Swim(Packet {
        generation: 1,
        probe: Probe::Gossip,
        intro: None,
        updates: vec![],
        records: vec![],
    })
}

#[test]
fn forged_tampered_replayed_expired_and_oversized_envelopes_are_refused_and_counted() {
    let a = start("127.0.0.6", None);
    let url = a.coordinator();
    let stranger = Identity::generate();
    let msg = junk;

    // A well-formed envelope from an unknown key is accepted (SWIM ignores the junk packet)...
    let good = wire::seal(&stranger, msg(), now_ms());
    assert_eq!(post(&url, &good), 204);
    // ...once.
    assert_eq!(post(&url, &good), 409, "replay");

    // Tampered: one byte of the signed body changed (in the nonce, so that it still decodes:
    // signature 64, version 1, sender 32, a 6-byte time, then 16 nonce bytes).
    let mut tampered = wire::seal(&stranger, msg(), now_ms());
    tampered[64 + 1 + 32 + 6 + 3] ^= 1;
    assert_eq!(post(&url, &tampered), 401);

    // Forged: signed by mallory, claiming to be the node itself.
    let mallory = Identity::generate();
    let mut forged = wire::seal(&mallory, msg(), now_ms());
    let node_key = Identity::load(&a.dir.join("identity.key"))
        .unwrap()
        .key_id();
    forged[65..97].copy_from_slice(&node_key.0);
    assert_eq!(post(&url, &forged), 401);

    // Expired: stamped two minutes ago (window 30 s).
    let old = wire::seal(&stranger, msg(), now_ms() - 120_000);
    assert_eq!(post(&url, &old), 401);

    // Oversized: over mesh.max_envelope (64 KiB), refused before decoding.
    let big = wire::seal(
        &stranger,
        Message::Records(vec![wire::SignedRecord {
            body: vec![1; 70_000],
            sig: wire::Sig([0; 64]),
        }]),
        now_ms(),
    );
    assert_eq!(post(&url, &big), 413);

    // Garbage.
    assert_eq!(post(&url, b"not an envelope at all, clearly not"), 400);

    let s = stats(&a);
    assert_eq!(s["accepted"], 1, "{s}");
    assert_eq!(s["replayed"], 1, "{s}");
    assert_eq!(s["bad_signature"], 2, "{s}");
    assert_eq!(s["stale"], 1, "{s}");
    assert_eq!(s["too_large"], 1, "{s}");
    assert_eq!(s["malformed"], 1, "{s}");
    // The node is unharmed.
    assert_eq!(get(&format!("{url}/health")).unwrap().0, 200);
}

#[test]
fn a_flooding_peer_is_throttled_while_the_mesh_keeps_working() {
    let a = start("127.0.0.7", None);
    let b = start("127.0.0.8", Some(&a.coordinator()));
    wait_until("a and b see each other", Duration::from_secs(20), || {
        all_alive(&[&a, &b])
    });
    let flooder = std::sync::Arc::new(Identity::generate());
    let url = a.coordinator();
    let mut refused = 0;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            let id = flooder.clone();
            std::thread::spawn(move || {
                let mut limited = 0;
                for _ in 0..400 {
                    let env = wire::seal(&id, junk(), now_ms());
                    if post(&url, &env) == 429 {
                        limited += 1;
                    }
                }
                limited
            })
        })
        .collect();
    for t in threads {
        refused += t.join().unwrap();
    }
    // 1,600 envelopes against 200/s with a burst of 400: most are refused.
    assert!(refused > 800, "only {refused} of 1600 throttled");
    let s = stats(&a);
    assert_eq!(s["rate_limited"], refused, "{s}");

    // Meanwhile b's envelopes still arrive: it is alive, and seen recently.
    let before = stats(&b)["sent"].as_u64().unwrap();
    wait_until("b keeps talking to a", Duration::from_secs(10), || {
        stats(&b)["sent"].as_u64().unwrap() > before + 5
    });
    assert!(all_alive(&[&a, &b]));
    let v = peers(&a);
    let bp = &v["peers"][0];
    assert!(
        now_ms() - bp["last_seen_ms"].as_u64().unwrap() < 5_000,
        "{bp}"
    );
}

fn worker_key(n: &Node) -> String {
    Identity::load(&n.dir.join("worker").join("agent.key"))
        .unwrap()
        .key_id()
        .to_string()
}

/// Waits until `n` holds a capability record for every node in `of` with free slots.
fn wait_caps(n: &Node, of: &[&Node]) {
    wait_until(
        "capabilities of the executors",
        Duration::from_secs(20),
        || {
            let caps = get_json(&format!("{}/mesh/capabilities", n.coordinator())).unwrap();
            of.iter().all(|m| {
                caps.as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["url"] == m.coordinator() && c["free_slots"].as_u64().unwrap() > 0)
            })
        },
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn tasks_a_node_cannot_run_run_on_peers_exactly_once_with_events_and_results_back() {
    // A has no worker: every task it takes must run elsewhere.
    let mut args = vec!["--host", "127.0.0.9", "--set", "worker.enabled=false"];
    args.extend_from_slice(FAST);
    let a = Node::start(&args);
    let seed = a.coordinator();
    let b = start("127.0.0.10", Some(&seed));
    let c = start("127.0.0.11", Some(&seed));
    let d = start("127.0.0.12", Some(&seed));
    wait_until("all alive", Duration::from_secs(30), || {
        all_alive(&[&a, &b, &c, &d])
    });
    wait_caps(&a, &[&b, &c, &d]);
    let workers = [worker_key(&b), worker_key(&c), worker_key(&d)];

    let rt = runtime();
    let client = a.client();
    const N: usize = 30;
    let ids: Vec<_> = rt.block_on(async {
        let mut ids = Vec::new();
        for i in 0..N {
            ids.push(
                common::submit_probe(&client, serde_json::json!({"echo": i, "events": 2})).await,
            );
        }
        ids
    });
    let mut ran_on = std::collections::HashMap::<String, usize>::new();
    for (i, id) in ids.iter().enumerate() {
        let r = rt.block_on(common::wait_result(&client, *id));
        assert_eq!(
            r.state,
            edgecoder::coordinator::model::TaskState::Succeeded,
            "{r:?}"
        );
        let out = r.output.unwrap();
        assert_eq!(out["echo"], i, "the result is this task's");
        let agent = out["agent"].as_str().unwrap().to_string();
        assert!(
            workers.contains(&agent),
            "ran on {agent}, not a peer's worker"
        );
        *ran_on.entry(agent).or_default() += 1;
        let v: edgecoder::coordinator::model::TaskView =
            rt.block_on(client.get(&format!("/tasks/{id}"))).unwrap();
        assert_eq!(v.attempts, 1, "one lease per task");
    }
    // Executions counted on the executors themselves: every origin task ran exactly once.
    let mut executed = 0;
    let mut won = 0;
    for n in [&b, &c, &d] {
        let list: edgecoder::coordinator::model::TaskList =
            rt.block_on(n.client().get("/tasks?limit=1000")).unwrap();
        executed += list.tasks.len();
        won += stats(n)["claims_won"].as_u64().unwrap();
    }
    assert_eq!(executed, N, "each task ran once across all nodes");
    assert_eq!(won, N as u64);
    assert!(stats(&a)["offers_sent"].as_u64().unwrap() >= N as u64);

    // The events streamed on the executor came back to A (through the CLI, a real client).
    let out = std::process::Command::new(BIN)
        .args([
            "task",
            "events",
            &ids[0].to_string(),
            "--url",
            &seed,
            "--key",
        ])
        .arg(a.dir.join("identity.key"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("\"type\":\"progress\"").count(), 2, "{text}");
    println!("ran on: {ran_on:?}");
}

#[test]
fn a_busy_node_overflows_to_a_peer() {
    let mut args = vec![
        "--host",
        "127.0.0.13",
        "--set",
        "worker.slots=1",
        "--set",
        "mesh.offer_after=300ms",
    ];
    args.extend_from_slice(FAST);
    let a = Node::start(&args);
    let b = start("127.0.0.14", Some(&a.coordinator()));
    wait_until("all alive", Duration::from_secs(30), || {
        all_alive(&[&a, &b])
    });
    wait_caps(&a, &[&b]);
    let rt = runtime();
    let client = a.client();
    let busy = rt.block_on(common::submit_probe(
        &client,
        serde_json::json!({"echo": "long", "busy": "4s"}),
    ));
    std::thread::sleep(Duration::from_millis(200));
    let quick = rt.block_on(common::submit_probe(
        &client,
        serde_json::json!({"echo": "quick"}),
    ));
    let r = rt.block_on(common::wait_result(&client, quick));
    assert_eq!(r.output.as_ref().unwrap()["agent"], worker_key(&b), "{r:?}");
    // The quick task finished on B while A's only slot was still busy.
    let v: edgecoder::coordinator::model::TaskView =
        rt.block_on(client.get(&format!("/tasks/{busy}"))).unwrap();
    assert!(
        matches!(v.state.as_str(), "leased" | "running"),
        "still on A's worker: {v:?}"
    );
    assert_eq!(v.lease.as_ref().unwrap().agent.to_string(), worker_key(&a));
    let r = rt.block_on(common::wait_result(&client, busy));
    assert_eq!(r.output.unwrap()["agent"], worker_key(&a));
}

#[test]
fn a_blacklisted_node_is_cut_off_by_the_reporter_and_by_nodes_that_trust_it() {
    let a = start("127.0.0.15", None);
    let a_key = Identity::load(&a.dir.join("identity.key"))
        .unwrap()
        .key_id()
        .to_string();
    let trust = format!("mesh.trusted_reporters=[\"{a_key}\"]");
    let bootstrap = format!("mesh.bootstrap_urls=[\"{}\"]", a.coordinator());
    let mut args = vec!["--host", "127.0.0.16", "--set", &trust, "--set", &bootstrap];
    args.extend_from_slice(FAST);
    let b = Node::start(&args);
    let c = start("127.0.0.17", Some(&a.coordinator()));
    wait_until("all alive", Duration::from_secs(30), || {
        all_alive(&[&a, &b, &c])
    });
    let c_key = Identity::load(&c.dir.join("identity.key"))
        .unwrap()
        .key_id()
        .to_string();

    let a_dir = a.dir.to_str().unwrap();
    common::cli([
        "mesh",
        "blacklist",
        &c_key,
        "--reason",
        "abuse",
        "--evidence",
        "flooded",
        "--data-dir",
        a_dir,
    ]);

    // The record reaches B through gossip, signed by A and enforced there.
    wait_until("b holds the record", Duration::from_secs(15), || {
        let out = std::process::Command::new(BIN)
            .args(["mesh", "blacklisted", "--json", "--data-dir"])
            .arg(&b.dir)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array().is_some_and(|l| {
            l.iter()
                .any(|r| r["target"] == c_key && r["reporter"] == a_key && r["enforced"] == true)
        })
    });
    // Both drop C's envelopes and stop counting it as alive.
    let c_url = c.coordinator();
    wait_until("a and b cut c off", Duration::from_secs(20), || {
        [&a, &b].iter().all(|n| {
            stats(n)["blacklisted"].as_u64().unwrap() > 0
                && state_of(n, &c_url).as_deref() != Some("alive")
        })
    });
    // A and B still see each other.
    assert!(all_alive(&[&a, &b]));
}

#[test]
fn a_peer_claims_only_what_it_was_offered() {
    let a = start("127.0.0.18", None);
    let b = start("127.0.0.19", Some(&a.coordinator()));
    wait_until("a and b see each other", Duration::from_secs(20), || {
        all_alive(&[&a, &b])
    });
    let rt = runtime();
    // B's key is a live member, so A lets it register as an agent...
    let b_id = std::sync::Arc::new(Identity::load(&b.dir.join("identity.key")).unwrap());
    let as_b = edgecoder::client::CoordinatorClient::new(&a.coordinator(), b_id).unwrap();
    let reg: edgecoder::coordinator::model::Registered = rt
        .block_on(as_b.post(
            "/agents/register",
            &serde_json::json!({"capabilities": {"kinds": ["probe"], "slots": 4}}),
        ))
        .unwrap();
    // ...but not drain A's queue: no general claims, no claims of tasks not offered to it.
    let queued = rt.block_on(common::submit_probe(
        &a.client(),
        serde_json::json!({"busy": "1s"}),
    ));
    for body in [
        serde_json::json!({"session": reg.session, "max": 4}),
        serde_json::json!({"session": reg.session, "max": 1, "task": queued.to_string()}),
    ] {
        let err = rt
            .block_on(as_b.post::<_, serde_json::Value>("/agents/claim", &body))
            .unwrap_err();
        assert_eq!(err.code(), Some("not_offered"), "{err}");
    }
    // A stranger's key is not an agent at all.
    let stranger = std::sync::Arc::new(Identity::generate());
    let as_stranger =
        edgecoder::client::CoordinatorClient::new(&a.coordinator(), stranger).unwrap();
    let err = rt
        .block_on(as_stranger.post::<_, serde_json::Value>(
            "/agents/register",
            &serde_json::json!({"capabilities": {"kinds": ["probe"], "slots": 4}}),
        ))
        .unwrap_err();
    assert_eq!(err.code(), Some("unknown_key"), "{err}");
}

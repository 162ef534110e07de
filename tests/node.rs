//! The node as a user runs it: real processes, real ports, real files.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::*;
use edgecoder::coordinator::model::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_all_ports_and_runs_200_probes() {
    let node = Node::start(&[]);
    for service in ["coordinator", "inference", "control_plane", "ide"] {
        let (status, body) = get(&format!("{}/health", node.url(service))).unwrap();
        assert_eq!(status, 200, "{service}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "ok", "{service}");
        assert_eq!(v["service"], service);
        assert_eq!(v["operational"], true);
        let st = get_json(&format!("{}/status", node.url(service))).unwrap();
        assert_eq!(st["node_id"], node.info.node_id);
        assert_eq!(st["worker"]["registered"], true);
        let (ms, metrics) = get(&format!("{}/metrics", node.url(service))).unwrap();
        assert_eq!(ms, 200);
        assert!(
            metrics.contains("edgecoder_process_resident_bytes"),
            "{service}"
        );
        assert!(metrics.trim_end().ends_with("# EOF"));
        let (nf, body) = get(&format!("{}/no/such/path", node.url(service))).unwrap();
        assert_eq!(nf, 404);
        assert!(body.contains("\"not_found\""));
    }

    let c = node.client();
    let mut ids = Vec::new();
    let mut handles = Vec::new();
    for i in 0..200 {
        let c = c.clone();
        handles.push(tokio::spawn(async move {
            submit_probe(&c, serde_json::json!({ "echo": i })).await
        }));
    }
    for h in handles {
        ids.push(h.await.unwrap());
    }
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), 200);
    for (i, id) in ids.iter().enumerate() {
        let r = wait_result(&c, *id).await;
        assert_eq!(r.state, TaskState::Succeeded, "{r:?}");
        assert_eq!(r.output.as_ref().unwrap()["echo"], i);
    }
    let list: TaskList = c.get("/tasks?state=succeeded&limit=1000").await.unwrap();
    assert_eq!(list.tasks.len(), 200);
    let metrics = get(&format!("{}/metrics", node.coordinator())).unwrap().1;
    assert!(
        metrics.contains("edgecoder_coordinator_tasks_submitted_total 200"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgecoder_coordinator_tasks_finished_total{state=\"succeeded\"} 200"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_is_restarted_and_its_task_completes_once() {
    let node = Node::start(&[]);
    let c = node.client();
    let first = node.wait_worker(None);
    let id = submit_probe(
        &c,
        serde_json::json!({ "busy": "2s", "events": 1, "echo": "x" }),
    )
    .await;
    wait_task(&c, id, "running", |t| t.state == TaskState::Running).await;
    signal(first, 9);
    let second = node.wait_worker(Some(first));
    assert_ne!(first, second);
    let r = wait_result(&c, id).await;
    assert_eq!(r.state, TaskState::Succeeded, "{r:?}");
    assert_eq!(
        r.attempt, 2,
        "the task ran again after the first worker died"
    );
    let t: TaskView = c.get(&format!("/tasks/{id}")).await.unwrap();
    assert_eq!(t.attempts, 2);
    assert_eq!(t.failures.len(), 1);
    assert!(
        t.failures[0].reason.contains("restarted"),
        "{:?}",
        t.failures
    );
    // Exactly one result: a late report for attempt 1 is refused.
    let late = PostResult {
        attempt: 1,
        outcome: ReportedOutcome::Succeeded {
            output: serde_json::json!("late"),
        },
        next: None,
    };
    let err = c
        .post::<_, ResultAccepted>(&format!("/tasks/{id}/result"), &late)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some("forbidden"),
        "the node key is not an agent"
    );
    let worker_key =
        edgecoder::identity::Identity::load(&node.dir.join("worker/agent.key")).unwrap();
    let as_worker = edgecoder::client::CoordinatorClient::new(
        &node.coordinator(),
        std::sync::Arc::new(worker_key),
    )
    .unwrap();
    let err = as_worker
        .post::<_, ResultAccepted>(&format!("/tasks/{id}/result"), &late)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some("lease_lost"),
        "a stale attempt cannot report"
    );
    let again = wait_result(&c, id).await;
    assert_eq!(again, r);
    let status = node.status();
    assert_eq!(status["worker"]["restarts"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_loses_no_acknowledged_task() {
    let mut node = Node::start(&["--set", "worker.slots=2"]);
    let c = node.client();
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(submit_probe(&c, serde_json::json!({ "busy": "300ms", "echo": i })).await);
    }
    // Wait until some finished and some are leased, then kill everything without warning.
    let early = wait_result(&c, ids[0]).await;
    assert_eq!(early.state, TaskState::Succeeded);
    let worker = node.worker_pid().unwrap();
    node.kill9();
    // The worker dies with the node (PR_SET_PDEATHSIG).
    let gone = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        !pid_alive(worker)
    });
    assert!(gone, "worker {worker} outlived its node");

    node.restart();
    let c = node.client();
    for (i, id) in ids.iter().enumerate() {
        let r = wait_result(&c, *id).await;
        assert_eq!(r.state, TaskState::Succeeded, "{r:?}");
        assert_eq!(r.output.as_ref().unwrap()["echo"], i);
    }
    // The result stored before the kill is the same one afterwards.
    assert_eq!(wait_result(&c, ids[0]).await, early);
    let list: TaskList = c.get("/tasks?limit=1000").await.unwrap();
    assert_eq!(list.tasks.len(), 20, "no task lost, none duplicated");
    assert!(list.tasks.iter().all(|t| t.state == TaskState::Succeeded));
}

#[test]
fn sigterm_stops_cleanly_and_systemd_hears_about_it() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    let child = spawn(
        &dir,
        &[],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let pid = child.id();
    let info = wait_ready(&dir, &child);
    let mut node = Node {
        dir: dir.clone(),
        child,
        info,
        extra: vec![],
        _tmp: None,
    };
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !seen.iter().any(|m: &String| m == "WATCHDOG=1") {
        let n = sock.recv(&mut buf).expect("a notification");
        seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert_eq!(seen[0], "READY=1", "{seen:?}");
    let worker = node.wait_worker(None);
    assert_eq!(node.terminate(), Some(0), "{}", node.log());
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING=1 before exit");
        if &buf[..n] == b"STOPPING=1" {
            break;
        }
    }
    assert!(!pid_alive(worker), "worker stopped with the node");
    assert!(
        !dir.join("node.json").exists(),
        "node.json removed on clean stop"
    );
    let _ = pid;
}

#[test]
fn a_data_dir_is_used_by_one_node_only() {
    let node = Node::start(&[]);
    let out = Command::new(BIN)
        .args(["run", "--data-dir"])
        .arg(&node.dir)
        .args([
            "--host",
            "127.0.0.1",
            "--coordinator-port",
            "0",
            "--inference-port",
            "0",
        ])
        .args(["--control-plane-port", "0", "--ide-port", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another edgecoder node"), "{err}");
}

#[test]
fn bad_configuration_exits_78_listing_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("edgecoder.toml");
    std::fs::write(
        &cfg,
        "[coordinator]\nlease_tll = \"5s\"\nmax_attempts = 0\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .args(["--data-dir"])
        .arg(tmp.path())
        .args(["--set", "worker.slots=0"])
        .env("EDGECODER_HOST", "not-an-ip")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "4 problems",
        "coordinator.lease_tll: unknown key",
        "coordinator.max_attempts",
        "worker.slots",
        "host: \"not-an-ip\" is not an IP address",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in {err}");
    }
}

#[test]
fn a_port_in_use_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["run", "--data-dir"])
        .arg(tmp.path())
        .args([
            "--host",
            "127.0.0.1",
            "--coordinator-port",
            "0",
            "--inference-port",
            "0",
        ])
        .args(["--control-plane-port", "0", "--ide-port", &port])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("ide: cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_nodes_run_side_by_side_on_their_own_addresses() {
    let a = Node::start(&["--host", "127.0.0.2"]);
    let b = Node::start(&["--host", "127.0.0.3"]);
    assert_eq!(a.info.coordinator.ip().to_string(), "127.0.0.2");
    assert_eq!(b.info.coordinator.ip().to_string(), "127.0.0.3");
    assert_ne!(a.info.node_id, b.info.node_id);
    for n in [&a, &b] {
        let c = n.client();
        let id = submit_probe(&c, serde_json::json!({ "echo": n.info.node_id })).await;
        let r = wait_result(&c, id).await;
        assert_eq!(r.output.unwrap()["echo"], n.info.node_id);
    }
}

#[test]
fn cli_submits_waits_lists_and_reports_status() {
    let node = Node::start(&[]);
    let dir = node.dir.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .args(["--data-dir", dir])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = run(&["task", "submit", "--payload", r#"{"echo":"cli"}"#, "--wait"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "succeeded");
    assert_eq!(v["output"]["echo"], "cli");

    let (code, out, _) = run(&["task", "submit", "--payload", r#"{"fail":"no"}"#, "--wait"]);
    assert_eq!(code, Some(2), "a failed task makes wait exit 2");
    assert!(out.contains("\"failed\""));

    let (code, out, _) = run(&["task", "submit", "--payload", r#"{"busy":"30s"}"#]);
    assert_eq!(code, Some(0));
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, out, _) = run(&["task", "cancel", &id]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"cancelled\""));
    let (code, _, err) = run(&["task", "cancel", &id]);
    assert_eq!(code, Some(1));
    assert!(err.contains("invalid_transition"), "{err}");

    let (code, out, _) = run(&["task", "list"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), 3, "{out}");
    let (code, out, _) = run(&["task", "get", &id]);
    assert_eq!(code, Some(0));
    assert!(out.contains(&id));

    let (code, out, _) = run(&["status"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("operational"), "{out}");
    assert!(out.contains(&node.info.node_id));

    let (code, _, err) = run(&["task", "get", "not-an-id"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("invalid_task_id"), "{err}");
}

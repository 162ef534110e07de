//! The coordinator's task API against a real node: bad input, idempotency, event streams,
//! deadlines, retries.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use edgecoder::client::ClientError;
use edgecoder::coordinator::model::*;
use futures_util::StreamExt;
use reqwest::Method;

fn submit(payload: serde_json::Value) -> SubmitTask {
    SubmitTask::probe(payload)
}

async fn raw(node: &Node, method: Method, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let c = node.client();
    let url = c.base().join(path).unwrap();
    let resp = c
        .signed(method, &url, body.to_vec(), Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let v = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, v)
}

fn code(v: &serde_json::Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_the_node_keeps_serving() {
    let node = Node::start(&["--set", "http.max_body=4KiB"]);
    let (s, v) = raw(&node, Method::POST, "/tasks", b"{not json").await;
    assert_eq!((s, code(&v)), (400, "malformed_json"), "{v}");
    let (s, v) = raw(
        &node,
        Method::POST,
        "/tasks",
        br#"{"kind":"probe","colour":"red"}"#,
    )
    .await;
    assert_eq!((s, code(&v)), (400, "invalid_request"), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("colour"));
    let (s, v) = raw(&node, Method::POST, "/tasks", br#"{"kind":"teleport"}"#).await;
    assert_eq!((s, code(&v)), (400, "invalid_request"), "{v}");
    let big = format!(r#"{{"kind":"probe","payload":"{}"}}"#, "x".repeat(10_000));
    let (s, v) = raw(&node, Method::POST, "/tasks", big.as_bytes()).await;
    assert_eq!((s, code(&v)), (413, "body_too_large"), "{v}");
    let (s, v) = raw(
        &node,
        Method::POST,
        "/tasks",
        br#"{"kind":"probe","priority":1000}"#,
    )
    .await;
    assert_eq!((s, code(&v)), (400, "invalid_request"), "{v}");
    let (s, v) = raw(
        &node,
        Method::POST,
        "/tasks",
        br#"{"kind":"probe","timeout":"forever"}"#,
    )
    .await;
    assert_eq!((s, code(&v)), (400, "invalid_request"), "{v}");
    let (s, v) = raw(&node, Method::GET, "/tasks/01ARZ3NDEKTSV4RRFFQ69G5FAV", b"").await;
    assert_eq!((s, code(&v)), (404, "task_not_found"), "{v}");
    let (s, v) = raw(&node, Method::GET, "/tasks/nope", b"").await;
    assert_eq!((s, code(&v)), (400, "invalid_task_id"), "{v}");
    let (s, v) = raw(&node, Method::GET, "/tasks?state=sideways", b"").await;
    assert_eq!((s, code(&v)), (400, "invalid_request"), "{v}");
    let (s, v) = raw(&node, Method::GET, "/tasks?limit=lots", b"").await;
    assert_eq!((s, code(&v)), (400, "invalid_request"), "{v}");
    let (s, v) = raw(&node, Method::PUT, "/tasks", b"").await;
    assert_eq!((s, code(&v)), (405, "method_not_allowed"), "{v}");
    let (s, v) = raw(
        &node,
        Method::POST,
        "/agents/claim",
        br#"{"session":1,"max":1}"#,
    )
    .await;
    assert_eq!(
        (s, code(&v)),
        (403, "forbidden"),
        "the node key is not an agent: {v}"
    );

    // A finished task cannot be cancelled.
    let c = node.client();
    let id = submit_probe(&c, serde_json::json!({})).await;
    wait_result(&c, id).await;
    let (s, v) = raw(&node, Method::DELETE, &format!("/tasks/{id}"), b"").await;
    assert_eq!((s, code(&v)), (409, "invalid_transition"), "{v}");

    // Still serving.
    let id = submit_probe(&c, serde_json::json!({"echo": "alive"})).await;
    assert_eq!(wait_result(&c, id).await.output.unwrap()["echo"], "alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_return_the_first_task() {
    let node = Node::start(&[]);
    let c = node.client();
    let mut req = submit(serde_json::json!({"echo": 1}));
    req.idempotency_key = Some("order-42".into());
    let a = c
        .send::<_, TaskView>(Method::POST, "/tasks", Some(&req), None)
        .await
        .unwrap();
    assert_eq!(a.status.as_u16(), 201);
    let b = c
        .send::<_, TaskView>(Method::POST, "/tasks", Some(&req), None)
        .await
        .unwrap();
    assert_eq!(b.status.as_u16(), 200);
    assert_eq!(a.body.id, b.body.id);
    wait_result(&c, a.body.id).await;
    // Still the same task after it finished.
    let c2 = c
        .send::<_, TaskView>(Method::POST, "/tasks", Some(&req), None)
        .await
        .unwrap();
    assert_eq!(c2.body.id, a.body.id);
    // Same key, different request: conflict.
    req.payload = serde_json::json!({"echo": 2});
    let err = c.post::<_, TaskView>("/tasks", &req).await.unwrap_err();
    assert_eq!(err.code(), Some("idempotency_conflict"));
    // The header form works too.
    let url = c.base().join("/tasks").unwrap();
    let body = serde_json::to_vec(&submit(serde_json::json!({"echo": 3}))).unwrap();
    let first: TaskView = c
        .signed(Method::POST, &url, body.clone(), Duration::from_secs(5))
        .header("idempotency-key", "hdr-1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let second: TaskView = c
        .signed(Method::POST, &url, body, Duration::from_secs(5))
        .header("idempotency-key", "hdr-1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first.id, second.id);
}

/// Reads SSE frames as (id, event, data).
async fn read_events(
    node: &Node,
    id: TaskId,
    last_event_id: Option<u32>,
) -> Vec<(Option<u32>, String, serde_json::Value)> {
    let c = node.client();
    let url = c.base().join(&format!("/tasks/{id}/events")).unwrap();
    let mut rb = c.signed(Method::GET, &url, Vec::new(), Duration::from_secs(30));
    if let Some(l) = last_event_id {
        rb = rb.header("last-event-id", l.to_string());
    }
    let resp = rb.send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let (mut eid, mut ev, mut data) = (None, String::from("message"), String::new());
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    eid = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    ev = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if data.is_empty() {
                continue;
            }
            let done = ev == "end";
            out.push((eid, ev, serde_json::from_str(&data).unwrap()));
            if done {
                return out;
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_live_and_resume_from_last_event_id() {
    let node = Node::start(&[]);
    let c = node.client();
    let id = submit_probe(&c, serde_json::json!({"events": 5, "busy": "300ms"})).await;
    let live = read_events(&node, id, None).await;
    let seqs: Vec<u32> = live.iter().filter_map(|e| e.0).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u32).collect::<Vec<_>>(),
        "in order, no gaps: {live:?}"
    );
    let kinds: Vec<&str> = live.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "progress").count(),
        5,
        "{kinds:?}"
    );
    assert_eq!(kinds.first(), Some(&"state"));
    assert_eq!(kinds.last(), Some(&"end"));
    assert_eq!(live.last().unwrap().2["state"], "succeeded");
    let states: Vec<String> = live
        .iter()
        .filter(|e| e.1 == "state")
        .map(|e| e.2["data"]["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, ["queued", "leased", "running", "succeeded"]);

    // Reconnect after event 3: only the rest, same content.
    let resumed = read_events(&node, id, Some(3)).await;
    assert_eq!(resumed.first().unwrap().0, Some(4));
    assert_eq!(&resumed[..resumed.len() - 1], &live[3..live.len() - 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_deadlines_retries_and_attempt_limits() {
    let node = Node::start(&[]);
    let c = node.client();

    // A result not ready within `wait` is a 202 with the current state.
    let slow = submit_probe(&c, serde_json::json!({"busy": "3s"})).await;
    let ans = c
        .send::<(), PendingView>(
            Method::GET,
            &format!("/tasks/{slow}/result?wait=200ms"),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(ans.status.as_u16(), 202);
    assert!(matches!(
        ans.body.state,
        TaskState::Queued | TaskState::Leased | TaskState::Running
    ));

    // Submit and wait in one round trip.
    let t = c
        .send::<_, TaskView>(
            Method::POST,
            "/tasks?wait=10s",
            Some(&submit(serde_json::json!({"echo": "sync"}))),
            None,
        )
        .await
        .unwrap();
    assert_eq!(t.status.as_u16(), 201);
    assert_eq!(t.body.state, TaskState::Succeeded);
    assert_eq!(t.body.attempts, 1, "the task as it is after finishing");
    assert_eq!(t.body.result.unwrap().output.unwrap()["echo"], "sync");
    let t = c
        .send::<_, TaskView>(
            Method::POST,
            "/tasks?wait=100ms",
            Some(&submit(serde_json::json!({"busy": "2s"}))),
            None,
        )
        .await
        .unwrap();
    assert!(t.body.result.is_none(), "not finished within the wait");
    assert!(!t.body.state.is_terminal());

    // The deadline wins over a long-running attempt.
    let mut req = submit(serde_json::json!({"busy": "5s"}));
    req.timeout = Some("500ms".into());
    let t: TaskView = c.post("/tasks", &req).await.unwrap();
    let r = wait_result(&c, t.id).await;
    assert_eq!(r.state, TaskState::Expired, "{r:?}");

    // A retryable failure is retried.
    let id = submit_probe(
        &c,
        serde_json::json!({"fail_attempts": 1, "echo": "second"}),
    )
    .await;
    let r = wait_result(&c, id).await;
    assert_eq!((r.state, r.attempt), (TaskState::Succeeded, 2));

    // Attempts run out: failed, every reason kept.
    let mut req = submit(serde_json::json!({"fail_attempts": 9}));
    req.max_attempts = Some(2);
    let t: TaskView = c.post("/tasks", &req).await.unwrap();
    let r = wait_result(&c, t.id).await;
    assert_eq!(r.state, TaskState::Failed);
    assert!(r.error.unwrap().contains("2 of 2"));
    let v: TaskView = c.get(&format!("/tasks/{}", t.id)).await.unwrap();
    assert_eq!(v.failures.len(), 2, "{:?}", v.failures);

    // Cancelling a running task stops it on the worker and frees the slot.
    let long = submit_probe(&c, serde_json::json!({"busy": "1h"})).await;
    wait_task(&c, long, "leased", |t| t.state != TaskState::Queued).await;
    let v = c
        .send::<(), TaskView>(Method::DELETE, &format!("/tasks/{long}"), None, None)
        .await
        .unwrap()
        .body;
    assert_eq!(v.state, TaskState::Cancelled);
    let r = wait_result(&c, long).await;
    assert_eq!(r.state, TaskState::Cancelled);

    // Agents are visible to the node key.
    let agents: Vec<AgentView> = c.get("/agents").await.unwrap();
    assert_eq!(agents.len(), 1);
    assert!(agents[0].local && agents[0].live);
    assert!(agents[0].capabilities.kinds.contains(&TaskKind::Probe));
    let err = c
        .get::<TaskView>("/tasks/01ARZ3NDEKTSV4RRFFQ69G5FAV")
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Api { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_agents_are_reaped_and_their_tasks_run_elsewhere() {
    use edgecoder::client::CoordinatorClient;
    use edgecoder::identity::Identity;
    use std::sync::Arc;
    let a = Identity::generate();
    let b = Identity::generate();
    let keys = format!(
        "coordinator.agent_keys=[\"{}\",\"{}\"]",
        a.key_id(),
        b.key_id()
    );
    let node = Node::start(&[
        "--set",
        "worker.enabled=false",
        "--set",
        &keys,
        "--set",
        "worker.heartbeat_interval=\"200ms\"",
        "--set",
        "coordinator.agent_timeout=\"1s\"",
    ]);
    let c = node.client();
    let agent_a = CoordinatorClient::new(&node.coordinator(), Arc::new(a)).unwrap();
    let agent_b = CoordinatorClient::new(&node.coordinator(), Arc::new(b)).unwrap();
    let caps = Capabilities {
        kinds: vec![TaskKind::Probe],
        models: vec![],
        resource_class: ResourceClass::Small,
        slots: 1,
    };
    let register = |cl: CoordinatorClient, caps: Capabilities| async move {
        cl.post::<_, Registered>(
            "/agents/register",
            &RegisterAgent {
                capabilities: caps,
                running: vec![],
            },
        )
        .await
        .unwrap()
    };
    let reg_a = register(agent_a.clone(), caps.clone()).await;
    assert_eq!(reg_a.heartbeat_interval_ms, 200);
    let id = submit_probe(&c, serde_json::json!({"echo": "reaped"})).await;
    let claim: ClaimReply = agent_a
        .post(
            "/agents/claim?wait=5s",
            &Claim {
                session: reg_a.session,
                max: 1,
                task: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(claim.tasks.len(), 1);
    assert_eq!(claim.tasks[0].id, id);
    // Agent A goes silent. After coordinator.agent_timeout it is reaped and the task requeued.
    let requeued = wait_task(&c, id, "requeued", |t| t.state == TaskState::Queued).await;
    assert_eq!(requeued.attempts, 1);
    assert!(
        requeued.failures[0].reason.contains("heartbeats"),
        "{:?}",
        requeued.failures
    );
    let agents: Vec<AgentView> = c.get("/agents").await.unwrap();
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert!(!agents[0].live, "a reaped agent is listed as not live");
    // A's late heartbeat tells it to register again; its late result is refused.
    let err = agent_a
        .post::<_, HeartbeatReply>(
            "/agents/heartbeat",
            &Heartbeat {
                session: reg_a.session,
                running: vec![],
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("agent_not_registered"));
    let late = PostResult {
        attempt: 1,
        outcome: ReportedOutcome::Succeeded {
            output: serde_json::json!("late"),
        },
        next: None,
    };
    let err = agent_a
        .post::<_, ResultAccepted>(&format!("/tasks/{id}/result"), &late)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("lease_lost"));
    // Agent B picks it up as attempt 2 and finishes it.
    let reg_b = register(agent_b.clone(), caps).await;
    let claim: ClaimReply = agent_b
        .post(
            "/agents/claim?wait=5s",
            &Claim {
                session: reg_b.session,
                max: 1,
                task: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(claim.tasks[0].attempt, 2);
    let done = PostResult {
        attempt: 2,
        outcome: ReportedOutcome::Succeeded {
            output: serde_json::json!({"by": "b"}),
        },
        next: None,
    };
    let ack: ResultAccepted = agent_b
        .post(&format!("/tasks/{id}/result"), &done)
        .await
        .unwrap();
    assert_eq!(ack.state, TaskState::Succeeded);
    // Repeating the same report (a lost answer) is acknowledged again, not double-stored.
    let ack: ResultAccepted = agent_b
        .post(&format!("/tasks/{id}/result"), &done)
        .await
        .unwrap();
    assert_eq!(ack.state, TaskState::Succeeded);
    let r = wait_result(&c, id).await;
    assert_eq!(
        (r.attempt, r.output.unwrap()["by"].as_str()),
        (2, Some("b"))
    );

    // A report for a task cancelled under the agent is refused, not taken as a repeat.
    let id2 = submit_probe(&c, serde_json::json!({})).await;
    let claim: ClaimReply = agent_b
        .post(
            "/agents/claim?wait=5s",
            &Claim {
                session: reg_b.session,
                max: 1,
                task: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(claim.tasks[0].id, id2);
    c.send::<(), TaskView>(Method::DELETE, &format!("/tasks/{id2}"), None, None)
        .await
        .unwrap();
    let late = PostResult {
        attempt: 1,
        outcome: ReportedOutcome::Succeeded {
            output: serde_json::json!({"by": "b"}),
        },
        next: None,
    };
    let err = agent_b
        .post::<_, ResultAccepted>(&format!("/tasks/{id2}/result"), &late)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("lease_lost"));
    assert_eq!(wait_result(&c, id2).await.state, TaskState::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_task_frees_the_workers_slot() {
    let node = Node::start(&["--set", "worker.slots=1"]);
    let c = node.client();
    let stuck = submit_probe(&c, serde_json::json!({"busy": "1h"})).await;
    wait_task(&c, stuck, "running", |t| {
        t.state == TaskState::Leased || t.state == TaskState::Running
    })
    .await;
    let next = submit_probe(&c, serde_json::json!({"echo": "after"})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v: TaskView = c.get(&format!("/tasks/{next}")).await.unwrap();
    assert_eq!(v.state, TaskState::Queued, "the only slot is busy");
    c.send::<(), TaskView>(Method::DELETE, &format!("/tasks/{stuck}"), None, None)
        .await
        .unwrap();
    // The worker stopped the cancelled task, so its one slot runs the next one.
    let r = wait_result(&c, next).await;
    assert_eq!(r.output.unwrap()["echo"], "after");
}

//! The `chat` and `completion` task kinds: generation through the node's inference service,
//! streamed back to the coordinator as `token` events.
//!
//! Payload: a generation request without the model (`messages` or `prompt`/`suffix`, and the
//! sampling fields of [`GenerateRequest`]); the model comes from the task's
//! `requirements.model` (or a `model` field in the payload). Output:
//! `{"text", "finish_reason", "usage", "timings", "model"}`.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::Method;
use tokio_util::sync::CancellationToken;

use super::probe::ProbeHost;
use crate::client::CoordinatorClient;
use crate::coordinator::model::{ClaimedTask, EventKind, NewEvent, ReportedOutcome, TaskKind};
use crate::inference::api::{GenEvent, GenerateRequest};

/// Tokens are sent to the coordinator in batches: when this many are waiting...
const FLUSH_TOKENS: usize = 32;
/// ...or when the oldest has waited this long.
const FLUSH_EVERY: Duration = Duration::from_millis(30);

fn request_for(task: &ClaimedTask) -> Result<GenerateRequest, String> {
    let mut payload = match &task.payload {
        serde_json::Value::Object(m) => m.clone(),
        serde_json::Value::Null => serde_json::Map::new(),
        _ => return Err("the payload must be a JSON object".into()),
    };
    if !payload.contains_key("model") {
        let model = task
            .requirements
            .model
            .clone()
            .ok_or("the task names no model (requirements.model)")?;
        payload.insert("model".into(), model.into());
    }
    let req: GenerateRequest = serde_json::from_value(serde_json::Value::Object(payload))
        .map_err(|e| format!("invalid payload: {e}"))?;
    match (task.kind, &req.messages) {
        (TaskKind::Chat, None) => return Err("a chat task needs messages".into()),
        (TaskKind::Completion, Some(_)) => {
            return Err("a completion task takes a prompt, not messages".into());
        }
        _ => {}
    }
    req.validate()?;
    Ok(req)
}

/// Runs a generation task. `None` means it was cancelled (nothing to report).
pub async fn run<H: ProbeHost + Sync>(
    inference: &CoordinatorClient,
    task: &ClaimedTask,
    host: &H,
    cancel: &CancellationToken,
) -> Option<ReportedOutcome> {
    let req = match request_for(task) {
        Ok(r) => r,
        Err(error) => {
            return Some(ReportedOutcome::Failed {
                error,
                retryable: false,
            });
        }
    };
    let url = match inference.base().join("/generate") {
        Ok(u) => u,
        Err(e) => {
            return Some(ReportedOutcome::Failed {
                error: e.to_string(),
                retryable: true,
            });
        }
    };
    let body = serde_json::to_vec(&req).unwrap_or_default();
    let send = inference
        .signed(Method::POST, &url, body, Duration::from_secs(24 * 3600))
        .send();
    let resp = tokio::select! {
        r = send => r,
        _ = cancel.cancelled() => return None,
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            return Some(ReportedOutcome::Failed {
                error: format!("inference service unreachable: {e}"),
                retryable: true,
            });
        }
    };
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let code = v["error"]["code"].as_str().unwrap_or("unknown").to_string();
        let message = v["error"]["message"].as_str().unwrap_or(&text).to_string();
        // Busy slots, a model being swapped: worth another attempt. A bad request is not.
        let retryable = status.as_u16() == 503 || status.is_server_error();
        return Some(ReportedOutcome::Failed {
            error: format!("{code}: {message}"),
            retryable,
        });
    }
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut text = String::new();
    let mut pending: Vec<NewEvent> = Vec::new();
    // When the oldest unsent token arrived; the first token of a task is sent at once.
    let mut pending_since: Option<Instant> = None;
    let mut sent_any = false;
    loop {
        let chunk = tokio::select! {
            c = stream.next() => c,
            // Dropping the stream closes the connection, which stops the generation.
            _ = cancel.cancelled() => return None,
        };
        let Some(chunk) = chunk else {
            return Some(ReportedOutcome::Failed {
                error: "the inference stream ended without a result".into(),
                retryable: true,
            });
        };
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                return Some(ReportedOutcome::Failed {
                    error: format!("inference stream failed: {e}"),
                    retryable: true,
                });
            }
        };
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let ev: GenEvent = match serde_json::from_slice(&line) {
                Ok(e) => e,
                Err(e) => {
                    return Some(ReportedOutcome::Failed {
                        error: format!("unreadable inference event: {e}"),
                        retryable: true,
                    });
                }
            };
            match ev {
                GenEvent::Start { .. } => {}
                GenEvent::Token { text: t } => {
                    text.push_str(&t);
                    pending.push(NewEvent {
                        kind: EventKind::Token,
                        data: serde_json::json!({ "text": t }),
                    });
                    let since = *pending_since.get_or_insert_with(Instant::now);
                    if !sent_any || pending.len() >= FLUSH_TOKENS || since.elapsed() >= FLUSH_EVERY
                    {
                        if !flush(host, &mut pending).await {
                            return None;
                        }
                        sent_any = true;
                        pending_since = None;
                    }
                }
                GenEvent::Done {
                    finish_reason,
                    usage,
                    timings,
                } => {
                    if !flush(host, &mut pending).await {
                        return None;
                    }
                    return Some(ReportedOutcome::Succeeded {
                        output: serde_json::json!({
                            "text": text,
                            "finish_reason": finish_reason,
                            "usage": usage,
                            "timings": timings,
                            "model": req.model,
                        }),
                    });
                }
                GenEvent::Error { code, message } => {
                    let _ = flush(host, &mut pending).await;
                    return Some(ReportedOutcome::Failed {
                        error: format!("{code}: {message}"),
                        retryable: false,
                    });
                }
            }
        }
    }
}

/// Sends the waiting token events; false when the task must stop (lease lost).
async fn flush<H: ProbeHost + Sync>(host: &H, pending: &mut Vec<NewEvent>) -> bool {
    if pending.is_empty() {
        return true;
    }
    let events = std::mem::take(pending);
    host.emit(events).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Ulid;
    use crate::coordinator::model::Requirements;

    fn task(kind: TaskKind, payload: serde_json::Value, model: Option<&str>) -> ClaimedTask {
        ClaimedTask {
            id: Ulid(1),
            kind,
            attempt: 1,
            payload,
            requirements: Requirements {
                model: model.map(str::to_string),
                ..Default::default()
            },
            lease_expires_ms: 0,
            deadline_ms: 0,
        }
    }

    #[test]
    fn requests_from_payloads() {
        let t = task(
            TaskKind::Chat,
            serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}),
            Some("m"),
        );
        let r = request_for(&t).unwrap();
        assert_eq!(r.model, "m");
        assert_eq!(r.max_tokens, Some(5));
        assert!(
            request_for(&task(
                TaskKind::Chat,
                serde_json::json!({"prompt": "x"}),
                Some("m")
            ))
            .is_err()
        );
        assert!(
            request_for(&task(
                TaskKind::Completion,
                serde_json::json!({"prompt": "x"}),
                None
            ))
            .is_err()
        );
        assert!(
            request_for(&task(
                TaskKind::Completion,
                serde_json::json!({"prompt": "x", "model": "n"}),
                None
            ))
            .is_ok()
        );
        assert!(
            request_for(&task(
                TaskKind::Completion,
                serde_json::json!([1]),
                Some("m")
            ))
            .is_err()
        );
        assert!(
            request_for(&task(
                TaskKind::Completion,
                serde_json::json!({"prompt": "x", "bogus": 1}),
                Some("m")
            ))
            .is_err()
        );
    }
}

//! The `probe` task kind: a diagnostic that exercises the whole task path without a model.
//!
//! Payload (every field optional):
//! ```json
//! {"echo": <any JSON>, "busy": "250ms", "events": 3, "fail": "message", "retryable": false,
//!  "fail_attempts": 1}
//! ```
//! * `echo` is returned unchanged in the output;
//! * `busy` waits that long (cancellable) before finishing;
//! * `events` emits that many `progress` events first;
//! * `fail` makes the attempt fail with that message (`retryable` says whether to try again);
//! * `fail_attempts: n` fails the first `n` attempts retryably, then succeeds (tests retries).
//!
//! Output: `{"echo": ..., "attempt": n, "agent": "<key id>"}`.

use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::coordinator::model::{NewEvent, ReportedOutcome};

/// Longest `busy` accepted: a probe is a diagnostic, not a way to pin a slot for hours.
const MAX_BUSY: Duration = Duration::from_secs(3600);

/// Most events a probe may emit.
const MAX_EVENTS: u32 = 10_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbePayload {
    #[serde(default)]
    echo: serde_json::Value,
    #[serde(default)]
    busy: Option<String>,
    #[serde(default)]
    events: u32,
    #[serde(default)]
    fail: Option<String>,
    #[serde(default)]
    retryable: bool,
    #[serde(default)]
    fail_attempts: u32,
}

/// What the probe needs from its host.
pub trait ProbeHost {
    /// Sends events for the running attempt; returns false if the task should stop (lease lost).
    fn emit(&self, events: Vec<NewEvent>) -> impl std::future::Future<Output = bool> + Send;
}

/// Runs a probe. `None` means it was cancelled (nothing to report).
pub async fn run<H: ProbeHost + Sync>(
    payload: &serde_json::Value,
    attempt: u32,
    agent: &str,
    host: &H,
    cancel: &CancellationToken,
) -> Option<ReportedOutcome> {
    let p: ProbePayload = if payload.is_null() {
        ProbePayload::default()
    } else {
        match serde_json::from_value(payload.clone()) {
            Ok(p) => p,
            Err(e) => {
                return Some(ReportedOutcome::Failed {
                    error: format!("invalid probe payload: {e}"),
                    retryable: false,
                });
            }
        }
    };
    let busy = match p.busy.as_deref().map(humantime::parse_duration) {
        None => Duration::ZERO,
        Some(Ok(d)) if d <= MAX_BUSY => d,
        Some(Ok(_)) => {
            return Some(ReportedOutcome::Failed {
                error: "probe busy is limited to 1h".into(),
                retryable: false,
            });
        }
        Some(Err(e)) => {
            return Some(ReportedOutcome::Failed {
                error: format!("invalid probe busy: {e}"),
                retryable: false,
            });
        }
    };
    if p.events > MAX_EVENTS {
        return Some(ReportedOutcome::Failed {
            error: format!("probe events is limited to {MAX_EVENTS}"),
            retryable: false,
        });
    }
    let per_post = crate::coordinator::model::MAX_EVENTS_PER_POST as u32;
    let mut i = 0;
    while i < p.events {
        let end = (i + per_post).min(p.events);
        let events = (i..end)
            .map(|i| NewEvent {
                kind: crate::coordinator::model::EventKind::Progress,
                data: serde_json::json!({ "i": i, "of": p.events }),
            })
            .collect();
        if !host.emit(events).await {
            return None;
        }
        i = end;
    }
    if !busy.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(busy) => {}
            _ = cancel.cancelled() => return None,
        }
    }
    if cancel.is_cancelled() {
        return None;
    }
    if attempt <= p.fail_attempts {
        return Some(ReportedOutcome::Failed {
            error: format!("probe told to fail attempt {attempt}"),
            retryable: true,
        });
    }
    if let Some(error) = p.fail {
        return Some(ReportedOutcome::Failed {
            error,
            retryable: p.retryable,
        });
    }
    Some(ReportedOutcome::Succeeded {
        output: serde_json::json!({ "echo": p.echo, "attempt": attempt, "agent": agent }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Sink(Mutex<Vec<NewEvent>>);

    impl ProbeHost for Sink {
        async fn emit(&self, events: Vec<NewEvent>) -> bool {
            assert!(events.len() <= crate::coordinator::model::MAX_EVENTS_PER_POST);
            self.0.lock().unwrap().extend(events);
            true
        }
    }

    #[tokio::test]
    async fn echoes_emits_and_fails_as_told() {
        let sink = Sink::default();
        let tok = CancellationToken::new();
        let out = run(
            &serde_json::json!({"echo": [1, 2], "events": 3}),
            1,
            "a",
            &sink,
            &tok,
        )
        .await
        .unwrap();
        let ReportedOutcome::Succeeded { output } = out else {
            panic!()
        };
        assert_eq!(output["echo"], serde_json::json!([1, 2]));
        assert_eq!(sink.0.lock().unwrap().len(), 3);

        let out = run(&serde_json::json!({"fail": "boom"}), 1, "a", &sink, &tok)
            .await
            .unwrap();
        assert!(
            matches!(out, ReportedOutcome::Failed { ref error, retryable: false } if error == "boom")
        );

        let out = run(
            &serde_json::json!({"fail_attempts": 1}),
            1,
            "a",
            &sink,
            &tok,
        )
        .await
        .unwrap();
        assert!(matches!(
            out,
            ReportedOutcome::Failed {
                retryable: true,
                ..
            }
        ));
        let out = run(
            &serde_json::json!({"fail_attempts": 1}),
            2,
            "a",
            &sink,
            &tok,
        )
        .await
        .unwrap();
        assert!(matches!(out, ReportedOutcome::Succeeded { .. }));

        let out = run(&serde_json::json!({"bogus": 1}), 1, "a", &sink, &tok)
            .await
            .unwrap();
        assert!(matches!(
            out,
            ReportedOutcome::Failed {
                retryable: false,
                ..
            }
        ));
        let out = run(&serde_json::json!({"busy": "2h"}), 1, "a", &sink, &tok)
            .await
            .unwrap();
        assert!(matches!(
            out,
            ReportedOutcome::Failed {
                retryable: false,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn busy_waits_and_cancellation_stops_it() {
        let sink = Sink::default();
        let tok = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let out = run(&serde_json::json!({"busy": "5s"}), 1, "a", &sink, &tok).await;
        assert!(out.is_some());
        assert_eq!(started.elapsed(), Duration::from_secs(5));

        let tok2 = tok.clone();
        let h = tokio::spawn(async move {
            let sink = Sink::default();
            run(&serde_json::json!({"busy": "1h"}), 1, "a", &sink, &tok2).await
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        tok.cancel();
        assert!(h.await.unwrap().is_none());
    }
}

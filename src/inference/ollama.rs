//! A client for an Ollama server (`inference.ollama_url`), speaking its documented HTTP API:
//! `GET /api/tags` for models, `POST /api/chat` and `POST /api/generate` with `"stream": true`
//! for generation (newline-delimited JSON). Its stream is normalised to our [`GenEvent`]s, so the
//! worker and the IDE provider cannot tell the backends apart.

use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::api::*;

/// How long to wait for Ollama to answer at all (loading a model can take a while).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence between two stream lines.
const READ_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest NDJSON line accepted from Ollama.
const MAX_LINE: usize = 1 << 20;

/// Ollama failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OllamaError {
    /// Not reachable.
    #[error("Ollama at {url} is not reachable: {reason}")]
    Unreachable {
        /// URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Ollama answered with an error.
    #[error("Ollama: {0}")]
    Api(String),
    /// The model is not in Ollama.
    #[error("Ollama has no model {0:?}")]
    NotFound(String),
}

/// One model in `GET /api/tags`.
#[derive(Debug, Clone, Deserialize)]
pub struct OllamaModel {
    /// Name such as `qwen2.5-coder:1.5b`.
    pub name: String,
    /// Size in bytes.
    #[serde(default)]
    pub size: Option<u64>,
}

#[derive(Deserialize)]
struct Tags {
    #[serde(default)]
    models: Vec<OllamaModel>,
}

#[derive(Deserialize)]
struct Line {
    #[serde(default)]
    message: Option<LineMessage>,
    #[serde(default)]
    response: Option<String>,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    done_reason: Option<String>,
    #[serde(default)]
    prompt_eval_count: Option<u32>,
    #[serde(default)]
    eval_count: Option<u32>,
    #[serde(default)]
    eval_duration: Option<u64>,
    #[serde(default)]
    total_duration: Option<u64>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct LineMessage {
    #[serde(default)]
    content: String,
}

/// Client for one Ollama server.
#[derive(Clone, Debug)]
pub struct OllamaClient {
    base: String,
    http: reqwest::Client,
    tracker: TaskTracker,
}

impl OllamaClient {
    /// A client for `base` (e.g. `http://127.0.0.1:11434`); streams run on `tracker`.
    ///
    /// # Errors
    /// The HTTP client cannot be built.
    pub fn new(base: &str, tracker: TaskTracker) -> Result<Self, OllamaError> {
        let http = crate::http::client_builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(|e| OllamaError::Api(e.to_string()))?;
        Ok(OllamaClient {
            base: base.trim_end_matches('/').to_string(),
            http,
            tracker,
        })
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Models the server has.
    ///
    /// # Errors
    /// Unreachable server or a bad answer.
    pub async fn models(&self) -> Result<Vec<OllamaModel>, OllamaError> {
        let url = format!("{}/api/tags", self.base);
        let resp = self
            .http
            .get(&url)
            .timeout(CONNECT_TIMEOUT)
            .send()
            .await
            .map_err(|e| OllamaError::Unreachable {
                url: self.base.clone(),
                reason: e.to_string(),
            })?;
        if !resp.status().is_success() {
            return Err(OllamaError::Api(format!(
                "GET /api/tags: HTTP {}",
                resp.status()
            )));
        }
        let tags: Tags = resp
            .json()
            .await
            .map_err(|e| OllamaError::Api(e.to_string()))?;
        Ok(tags.models)
    }

    /// Starts a generation; the receiver yields our events. Dropping it (or cancelling) closes
    /// the connection, which stops Ollama.
    ///
    /// # Errors
    /// Unreachable server, unknown model, refused request.
    pub async fn generate(
        &self,
        req: &GenerateRequest,
        cancel: CancellationToken,
    ) -> Result<mpsc::Receiver<GenEvent>, OllamaError> {
        let mut options = serde_json::Map::new();
        if let Some(t) = req.temperature {
            options.insert("temperature".into(), t.into());
        }
        if let Some(p) = req.top_p {
            options.insert("top_p".into(), p.into());
        }
        if let Some(k) = req.top_k {
            options.insert("top_k".into(), k.into());
        }
        if let Some(s) = req.seed {
            options.insert("seed".into(), s.into());
        }
        options.insert(
            "num_predict".into(),
            req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS).into(),
        );
        if !req.stop.is_empty() {
            options.insert("stop".into(), serde_json::json!(req.stop));
        }
        let (path, body) = match &req.messages {
            Some(m) => (
                "/api/chat",
                serde_json::json!({"model": req.model, "messages": m, "stream": true, "options": options}),
            ),
            None => {
                let mut b = serde_json::json!({
                    "model": req.model,
                    "prompt": req.prompt.clone().unwrap_or_default(),
                    "stream": true,
                    "options": options,
                });
                match &req.suffix {
                    // Ollama builds the fill-in-the-middle prompt from its template.
                    Some(s) => b["suffix"] = s.clone().into(),
                    // Our raw prompts are raw: no template around them.
                    None => b["raw"] = true.into(),
                }
                ("/api/generate", b)
            }
        };
        let url = format!("{}{path}", self.base);
        let resp = self.http.post(&url).json(&body).send().await.map_err(|e| {
            OllamaError::Unreachable {
                url: self.base.clone(),
                reason: e.to_string(),
            }
        })?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let msg = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(text);
            if status == reqwest::StatusCode::NOT_FOUND {
                return Err(OllamaError::NotFound(req.model.clone()));
            }
            return Err(OllamaError::Api(format!("HTTP {status}: {msg}")));
        }
        let (tx, rx) = mpsc::channel(64);
        let model = req.model.clone();
        self.tracker.spawn(async move {
            let started = std::time::Instant::now();
            let mut first: Option<std::time::Instant> = None;
            let mut body = resp.bytes_stream();
            let mut buf: Vec<u8> = Vec::new();
            let mut started_sent = false;
            let send = |e| tx.send(e);
            loop {
                let chunk = tokio::select! {
                    c = body.next() => c,
                    _ = cancel.cancelled() => return,
                    _ = tx.closed() => return,
                };
                let Some(chunk) = chunk else {
                    let _ = send(GenEvent::Error {
                        code: "backend_stream_ended".into(),
                        message: "Ollama closed the stream before it was done".into(),
                    })
                    .await;
                    return;
                };
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = send(GenEvent::Error {
                            code: "backend_failed".into(),
                            message: e.to_string(),
                        })
                        .await;
                        return;
                    }
                };
                buf.extend_from_slice(&chunk);
                if buf.len() > MAX_LINE && !buf.contains(&b'\n') {
                    let _ = send(GenEvent::Error {
                        code: "backend_failed".into(),
                        message: "Ollama sent an oversized line".into(),
                    })
                    .await;
                    return;
                }
                while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let parsed: Line = match serde_json::from_slice(&line) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = send(GenEvent::Error {
                                code: "backend_failed".into(),
                                message: format!("unreadable line from Ollama: {e}"),
                            })
                            .await;
                            return;
                        }
                    };
                    if let Some(err) = parsed.error {
                        let _ = send(GenEvent::Error {
                            code: "backend_failed".into(),
                            message: err,
                        })
                        .await;
                        return;
                    }
                    if !started_sent {
                        started_sent = true;
                        if send(GenEvent::Start {
                            model: model.clone(),
                            prompt_tokens: parsed.prompt_eval_count.unwrap_or(0),
                        })
                        .await
                        .is_err()
                        {
                            return;
                        }
                    }
                    let text = parsed
                        .message
                        .map(|m| m.content)
                        .or(parsed.response)
                        .unwrap_or_default();
                    if !text.is_empty() {
                        first.get_or_insert_with(std::time::Instant::now);
                        if send(GenEvent::Token { text }).await.is_err() {
                            return;
                        }
                    }
                    if parsed.done {
                        let finish = match parsed.done_reason.as_deref() {
                            Some("length") => FinishReason::Length,
                            _ => FinishReason::Stop,
                        };
                        let completion = parsed.eval_count.unwrap_or(0);
                        let tps = match parsed.eval_duration {
                            Some(ns) if ns > 0 => f64::from(completion) / (ns as f64 / 1e9),
                            _ => 0.0,
                        };
                        let _ = send(GenEvent::Done {
                            finish_reason: finish,
                            usage: Usage {
                                prompt_tokens: parsed.prompt_eval_count.unwrap_or(0),
                                completion_tokens: completion,
                            },
                            timings: Timings {
                                queue_ms: 0.0,
                                first_token_ms: first
                                    .map_or(0.0, |f| (f - started).as_secs_f64() * 1000.0),
                                tokens_per_second: tps,
                                total_ms: parsed
                                    .total_duration
                                    .map_or(started.elapsed().as_secs_f64() * 1000.0, |ns| {
                                        ns as f64 / 1e6
                                    }),
                            },
                        })
                        .await;
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

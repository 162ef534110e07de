//! The inference service's wire types: generation requests, the event stream, model listings.
//!
//! `POST /generate` answers with newline-delimited JSON: one [`GenEvent`] per line, `start`
//! first, then `token`s, then exactly one `done` or `error`. An `error` may also come alone, with
//! no `start` (for example `context_length_exceeded`, found before generation starts). The worker and the IDE provider
//! use the same types in process.

use serde::{Deserialize, Serialize};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or another role the template knows).
    pub role: String,
    /// Text.
    pub content: String,
}

/// A generation request: chat `messages`, or a raw `prompt` (with an optional `suffix` for
/// fill-in-the-middle).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// Model name (from `GET /models`).
    pub model: String,
    /// Chat messages, rendered with the model's chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// A raw prompt (no template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Text after the cursor, for fill-in-the-middle with `prompt` as the text before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// Most tokens to generate (default 256; never past the context).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature; 0 is greedy (default 0.8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling (default 0.95).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Top-k sampling (default 40; 0 disables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i32>,
    /// Seed for sampling; the same seed, request and model give the same text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u32>,
    /// Generation ends before any of these strings (which are not returned).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

/// Defaults applied when a request leaves a field out.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// Default temperature.
pub const DEFAULT_TEMPERATURE: f32 = 0.8;
/// Default top-p.
pub const DEFAULT_TOP_P: f32 = 0.95;
/// Default top-k.
pub const DEFAULT_TOP_K: i32 = 40;
/// Most stop strings per request.
pub const MAX_STOPS: usize = 16;

impl GenerateRequest {
    /// Checks the request's shape.
    ///
    /// # Errors
    /// A message naming the problem.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.messages, &self.prompt) {
            (Some(m), None) if !m.is_empty() => {}
            (Some(_), None) => return Err("messages must not be empty".into()),
            (None, Some(_)) => {}
            (Some(_), Some(_)) => return Err("give messages or prompt, not both".into()),
            (None, None) => return Err("give messages or prompt".into()),
        }
        if self.suffix.is_some() && self.prompt.is_none() {
            return Err("suffix needs a prompt (the text before the cursor)".into());
        }
        if let Some(t) = self.temperature
            && !(0.0..=5.0).contains(&t)
        {
            return Err("temperature must be between 0 and 5".into());
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err("top_p must be in (0, 1]".into());
        }
        if self.top_k.is_some_and(|k| k < 0) {
            return Err("top_k must not be negative".into());
        }
        if self.max_tokens == Some(0) {
            return Err("max_tokens must be at least 1".into());
        }
        if self.stop.len() > MAX_STOPS || self.stop.iter().any(|s| s.len() > 256) {
            return Err(format!(
                "at most {MAX_STOPS} stop strings of up to 256 bytes"
            ));
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
    /// The caller went away or cancelled.
    Cancelled,
}

/// Token counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// Timing of one generation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Timings {
    /// Time in the queue before a slot took the request, ms.
    pub queue_ms: f64,
    /// From request to first token, ms.
    pub first_token_ms: f64,
    /// Generated tokens per second after the first.
    pub tokens_per_second: f64,
    /// Total time, ms.
    pub total_ms: f64,
}

/// One line of a generation stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GenEvent {
    /// A slot took the request and evaluated the prompt.
    Start {
        /// Model.
        model: String,
        /// Prompt tokens.
        prompt_tokens: u32,
    },
    /// Generated text (whole characters, never part of a stop string).
    Token {
        /// Text.
        text: String,
    },
    /// The end.
    Done {
        /// Why.
        finish_reason: FinishReason,
        /// Counts.
        usage: Usage,
        /// Timing.
        timings: Timings,
    },
    /// Generation failed after it started.
    Error {
        /// Stable code.
        code: String,
        /// Message.
        message: String,
    },
}

/// A model as `GET /models` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelView {
    /// Name to request it by.
    pub name: String,
    /// `llama` (local GGUF) or `ollama`.
    pub backend: String,
    /// Whether it is loaded now (llama only).
    pub loaded: bool,
    /// File size in bytes, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Architecture, parameters, context, quantisation (llama only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<super::gguf::GgufInfo>,
    /// sha256 of the file (llama only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// `POST /models/pull`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    /// http(s) URL of a GGUF file.
    pub url: String,
    /// Expected sha256 (hex); the download is rejected if it differs.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Name in the store (default: from the URL).
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /models/add`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddRequest {
    /// Path of a GGUF file readable by the node.
    pub path: String,
    /// Name in the store (default: from the file name).
    #[serde(default)]
    pub name: Option<String>,
}

/// Progress lines of a pull (NDJSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PullEvent {
    /// Bytes so far, of `total` when known.
    Progress {
        /// Done.
        done: u64,
        /// Expected total.
        total: Option<u64>,
        /// Resumed from this offset.
        resumed_from: u64,
    },
    /// Verifying the file.
    Verifying,
    /// Stored.
    Done {
        /// The stored model.
        model: Box<ModelView>,
    },
    /// Failed; nothing was stored.
    Error {
        /// Stable code.
        code: String,
        /// Message.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let ok = GenerateRequest {
            model: "m".into(),
            prompt: Some("p".into()),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        let both = GenerateRequest {
            messages: Some(vec![ChatMessage {
                role: "user".into(),
                content: "x".into(),
            }]),
            ..ok.clone()
        };
        assert!(both.validate().is_err());
        assert!(
            GenerateRequest {
                temperature: Some(-1.0),
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            GenerateRequest {
                top_p: Some(0.0),
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            GenerateRequest {
                max_tokens: Some(0),
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            GenerateRequest {
                suffix: Some("s".into()),
                prompt: None,
                messages: None,
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn events_are_tagged_lines() {
        let e = GenEvent::Token { text: "hi".into() };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"token","text":"hi"}"#
        );
        let back: GenEvent = serde_json::from_str(r#"{"type":"done","finish_reason":"length","usage":{"prompt_tokens":3,"completion_tokens":4},"timings":{"queue_ms":0.0,"first_token_ms":1.0,"tokens_per_second":2.0,"total_ms":3.0}}"#).unwrap();
        assert!(matches!(
            back,
            GenEvent::Done {
                finish_reason: FinishReason::Length,
                ..
            }
        ));
    }
}

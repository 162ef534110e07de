//! OpenAI API shapes: the requests IDEs send and the answers and errors they expect.
//!
//! Requests accept what OpenAI clients send (unknown fields are ignored, as OpenAI-compatible
//! servers do, because clients add new ones all the time); answers follow OpenAI's field names
//! and object types exactly, since SDKs parse them strictly.

use serde::{Deserialize, Serialize};

/// A message's content: a string, or a list of parts of which the text parts are used.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts (`[{"type": "text", "text": "..."}]`).
    Parts(Vec<Part>),
}

/// One content part.
#[derive(Debug, Clone, Deserialize)]
pub struct Part {
    /// `text`, `image_url`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a text part.
    #[serde(default)]
    pub text: Option<String>,
}

impl Content {
    /// The text, or an error for parts this server cannot use.
    ///
    /// # Errors
    /// Non-text parts.
    pub fn text(&self) -> Result<String, String> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        (kind, _) => {
                            return Err(format!(
                                "content parts of type {kind:?} are not supported"
                            ));
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// A chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct InMessage {
    /// Role.
    pub role: String,
    /// Content (may be absent on assistant messages that only carry tool calls).
    #[serde(default)]
    pub content: Option<Content>,
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    /// As a list.
    pub fn list(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// Model id.
    pub model: String,
    /// Conversation.
    pub messages: Vec<InMessage>,
    /// Most tokens (older name).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Most tokens (newer name).
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Streaming and sampling options.
    #[serde(flatten)]
    pub common: Common,
}

/// Fields both `/v1/chat/completions` and `/v1/completions` take.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    /// Stream as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Temperature, 0 to 2.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Seed.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Number of choices; only 1.
    #[serde(default)]
    pub n: Option<u32>,
}

/// `prompt`: a string or a list of one string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One prompt.
    One(String),
    /// Several (only one is supported).
    Many(Vec<String>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// Model id.
    pub model: String,
    /// Text before the cursor.
    pub prompt: PromptInput,
    /// Text after the cursor (fill-in-the-middle).
    #[serde(default)]
    pub suffix: Option<String>,
    /// Most tokens (OpenAI's default is 16).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Echo the prompt; unsupported when true.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Streaming and sampling options.
    #[serde(flatten)]
    pub common: Common,
}

/// Token counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct OaUsage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_as_sdks_send_them() {
        let r: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null}
            ],
            "stream": true, "stream_options": {"include_usage": true},
            "stop": ["x", "y"], "seed": -5, "frequency_penalty": 0, "user": "u", "tools": []
        }))
        .unwrap();
        assert_eq!(
            r.messages[1].content.as_ref().unwrap().text().unwrap(),
            "ab"
        );
        assert!(r.messages[2].content.is_none());
        assert_eq!(r.common.stop.unwrap().list(), vec!["x", "y"]);
        assert!(r.common.stream_options.unwrap().include_usage);
        let img = Content::Parts(vec![Part {
            kind: "image_url".into(),
            text: None,
        }]);
        assert!(img.text().is_err());
        let c: CompletionRequest = serde_json::from_value(
            serde_json::json!({"model": "m", "prompt": ["p"], "suffix": "s", "stop": "\n"}),
        )
        .unwrap();
        assert!(matches!(c.prompt, PromptInput::Many(_)));
        assert_eq!(c.common.stop.unwrap().list(), vec!["\n"]);
    }

    #[test]
    fn errors_have_openais_shape() {
        use axum::response::IntoResponse;
        let e = crate::http::ApiError::bad_request("bad").param("n");
        let resp = e.into_response();
        assert_eq!(resp.status().as_u16(), 400);
    }
}

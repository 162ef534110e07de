//! A signed HTTP client for the coordinator API, used by the worker, the CLI and tests.
//!
//! Every request is signed with the caller's key (see [`crate::security::httpsig`]) with a fresh
//! nonce and a 30-second validity, so a retry is a new request, never a replay.

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::clock::{now_ms, random_bytes};
use crate::identity::Identity;
use crate::security::httpsig::{self, Params, RequestParts};

/// Validity of the signatures this client makes. Short: a captured request is useless soon.
const SIGNATURE_VALIDITY_SECS: u64 = 30;

/// Timeout for a request that is not a long poll.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong calling the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator answered with an error.
    #[error("{status}: {code}: {message}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// Stable error code.
        code: String,
        /// Message.
        message: String,
        /// Retry-After, when given.
        retry_after: Option<Duration>,
    },
    /// The request did not complete (connection refused, timeout).
    #[error("cannot reach {url}: {source}")]
    Transport {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// The answer was not the expected JSON.
    #[error("unexpected answer from {url}: {reason}")]
    Decode {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The base URL or path is not valid.
    #[error("invalid URL: {0}")]
    Url(String),
}

impl ClientError {
    /// The API error code, if the coordinator sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status, if there was an answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A response with its status.
#[derive(Debug)]
pub struct Answer<T> {
    /// HTTP status.
    pub status: StatusCode,
    /// Body.
    pub body: T,
}

/// Client for one coordinator, signing as one identity.
#[derive(Clone, Debug)]
pub struct CoordinatorClient {
    http: reqwest::Client,
    base: Url,
    identity: Arc<Identity>,
}

impl CoordinatorClient {
    /// A client for `base` (e.g. `http://127.0.0.1:4301`).
    ///
    /// # Errors
    /// An invalid URL.
    pub fn new(base: &str, identity: Arc<Identity>) -> Result<Self, ClientError> {
        let base = Url::parse(base).map_err(|e| ClientError::Url(format!("{base}: {e}")))?;
        let http = crate::http::client_builder()
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ClientError::Url(e.to_string()))?;
        Ok(CoordinatorClient {
            http,
            base,
            identity,
        })
    }

    /// The identity this client signs as.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The base URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// Sends a signed request. `timeout` overrides the default for long polls.
    ///
    /// # Errors
    /// Transport failures, error answers, undecodable answers.
    pub async fn send<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&B>,
        timeout: Option<Duration>,
    ) -> Result<Answer<R>, ClientError> {
        let url = self
            .base
            .join(path_and_query)
            .map_err(|e| ClientError::Url(format!("{path_and_query}: {e}")))?;
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ClientError::Url(e.to_string()))?,
            None => Vec::new(),
        };
        let resp = self
            .signed(method, &url, bytes, timeout.unwrap_or(REQUEST_TIMEOUT))
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.to_string(),
                source,
            })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.to_string(),
                source,
            })?;
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<serde_json::Value>(&text) {
                Ok(v) => (
                    v["error"]["code"].as_str().unwrap_or("unknown").to_string(),
                    v["error"]["message"].as_str().unwrap_or("").to_string(),
                ),
                Err(_) => (
                    "unknown".to_string(),
                    String::from_utf8_lossy(&text).chars().take(200).collect(),
                ),
            };
            return Err(ClientError::Api {
                status,
                code,
                message,
                retry_after,
            });
        }
        let body = serde_json::from_slice(&text).map_err(|e| ClientError::Decode {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Answer { status, body })
    }

    /// A signed request builder (for callers that want the raw response, e.g. event streams).
    pub fn signed(
        &self,
        method: Method,
        url: &Url,
        body: Vec<u8>,
        timeout: Duration,
    ) -> reqwest::RequestBuilder {
        let authority = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or("")),
            None => url.host_str().unwrap_or("").to_string(),
        };
        let created = now_ms() / 1000;
        let headers = httpsig::sign(
            self.identity.signing_key(),
            &RequestParts {
                method: method.as_str(),
                authority: &authority,
                path: url.path(),
                query: url.query(),
            },
            &body,
            &Params {
                created,
                expires: created + SIGNATURE_VALIDITY_SECS,
                nonce: random_bytes::<16>(),
                keyid: self.identity.key_id(),
            },
        );
        let mut rb = self
            .http
            .request(method, url.clone())
            .timeout(timeout)
            .header(httpsig::CONTENT_DIGEST, headers.content_digest)
            .header(httpsig::SIGNATURE_INPUT, headers.signature_input)
            .header(httpsig::SIGNATURE, headers.signature);
        if !body.is_empty() {
            rb = rb
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        rb
    }

    /// `GET` with a signed request.
    ///
    /// # Errors
    /// As [`CoordinatorClient::send`].
    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        Ok(self
            .send::<(), R>(Method::GET, path, None, None)
            .await?
            .body)
    }

    /// `POST` with a signed JSON body.
    ///
    /// # Errors
    /// As [`CoordinatorClient::send`].
    pub async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        Ok(self
            .send::<B, R>(Method::POST, path, Some(body), None)
            .await?
            .body)
    }
}

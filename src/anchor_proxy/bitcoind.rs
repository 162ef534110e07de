//! A client for Bitcoin Core's JSON-RPC interface: the few calls the anchor proxy makes.
//!
//! Requests use the legacy JSON-RPC 1.0 envelope that every bitcoind version answers
//! (`{"jsonrpc":"1.0","id":..,"method":..,"params":[..]}`), with HTTP Basic authentication from
//! a user and password or from bitcoind's `.cookie` file (read again on every call: bitcoind
//! writes a new one each time it starts). Wallet calls go to `/wallet/<name>`.
//!
//! bitcoind answers an RPC error with HTTP 500 (404 for an unknown method) and a JSON body that
//! carries `error.code` and `error.message`; a refused login with HTTP 401 and no body; an
//! overloaded server with HTTP 503 and a plain-text body. Each becomes its own [`RpcError`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bitcoin::hex::DisplayHex;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// Largest answer read from bitcoind. The proxy's calls return a transaction or a small object.
const MAX_ANSWER: usize = 4 << 20;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No answer: bitcoind is down, unreachable, or dropped the connection.
    #[error("bitcoind did not answer: {0}")]
    Transport(String),
    /// bitcoind refused the credentials (HTTP 401).
    #[error(
        "bitcoind refused the RPC credentials (HTTP 401): check anchor_proxy.rpc_user/rpc_password or rpc_cookie_file"
    )]
    Unauthorized,
    /// The cookie file could not be read.
    #[error("cannot read bitcoind's cookie file {path}: {reason}")]
    Cookie {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// bitcoind ran the call and reported an error.
    #[error("bitcoind error {code}: {message}")]
    Rpc {
        /// bitcoind's error code (`RPC_VERIFY_REJECTED` = -26 and so on).
        code: i64,
        /// Its message.
        message: String,
    },
    /// An HTTP answer that is not JSON-RPC (503 "Work queue depth exceeded", a proxy's page).
    #[error("bitcoind answered HTTP {status}: {body}")]
    Http {
        /// The status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The answer did not have the expected shape.
    #[error("unexpected answer to {method}: {reason}")]
    Shape {
        /// The call.
        method: &'static str,
        /// What was wrong.
        reason: String,
    },
}

/// bitcoind error codes the proxy acts on (src/rpc/protocol.h in Bitcoin Core).
pub mod code {
    /// `RPC_INVALID_ADDRESS_OR_KEY`: unknown transaction, bad address.
    pub const INVALID_ADDRESS_OR_KEY: i64 = -5;
    /// `RPC_VERIFY_ERROR`: the transaction was refused (inputs missing or spent, fee too high).
    pub const VERIFY_ERROR: i64 = -25;
    /// `RPC_VERIFY_REJECTED`: the transaction was refused by policy or consensus.
    pub const VERIFY_REJECTED: i64 = -26;
    /// `RPC_VERIFY_ALREADY_IN_CHAIN`: the transaction is already confirmed.
    pub const VERIFY_ALREADY_IN_CHAIN: i64 = -27;
}

/// How the client logs in.
#[derive(Clone)]
pub enum Auth {
    /// A fixed user and password (`rpcauth`/`rpcuser` in bitcoin.conf).
    UserPass(String, String),
    /// bitcoind's cookie file (`__cookie__:<hex>`).
    Cookie(PathBuf),
    /// No credentials (only for a server that asks for none).
    None,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::UserPass(u, _) => write!(f, "UserPass({u:?}, <password>)"),
            Auth::Cookie(p) => write!(f, "Cookie({})", p.display()),
            Auth::None => f.write_str("None"),
        }
    }
}

/// `getblockchaininfo`, the fields the proxy reads.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct ChainInfo {
    /// `main`, `test`, `testnet4`, `signet` or `regtest`.
    pub chain: String,
    /// Height of the best validated block.
    pub blocks: u64,
    /// Height of the best known header.
    #[serde(default)]
    pub headers: u64,
    /// Whether bitcoind is still syncing.
    #[serde(default)]
    pub initialblockdownload: bool,
}

/// `fundrawtransaction`'s answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Funded {
    /// The funded, unsigned transaction.
    pub hex: String,
    /// Its fee, in BTC.
    pub fee: f64,
    /// Where the change output went (-1: none).
    #[serde(default)]
    pub changepos: i64,
}

/// `signrawtransactionwithwallet`'s answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Signed {
    /// The signed transaction.
    pub hex: String,
    /// Whether every input is signed.
    pub complete: bool,
    /// What could not be signed, when incomplete.
    #[serde(default)]
    pub errors: Vec<Value>,
}

/// `gettransaction`'s answer, the fields the proxy reads.
#[derive(Debug, Clone, Deserialize)]
pub struct WalletTx {
    /// Confirmations: 0 in the mempool, negative when conflicted.
    pub confirmations: i64,
    /// The block that holds it.
    #[serde(default)]
    pub blockhash: Option<String>,
    /// That block's height.
    #[serde(default)]
    pub blockheight: Option<u64>,
}

/// `getaddressinfo`'s answer, the field the proxy reads.
#[derive(Debug, Clone, Deserialize)]
struct AddressInfo {
    ismine: bool,
}

/// A JSON-RPC client for one bitcoind and one wallet.
#[derive(Debug)]
pub struct Bitcoind {
    http: reqwest::Client,
    node_url: String,
    wallet_url: String,
    auth: Auth,
    next_id: AtomicU64,
}

impl Bitcoind {
    /// A client for the node at `url` (`http://127.0.0.1:8332`) using `wallet` ("" for the
    /// node's only wallet).
    ///
    /// # Errors
    /// The HTTP client cannot be built.
    pub fn new(url: &str, wallet: &str, auth: Auth, timeout: Duration) -> Result<Self, RpcError> {
        // No HTTP(S)_PROXY: the RPC password must go to bitcoind and nowhere else.
        let http = crate::http::client_builder()
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| RpcError::Transport(e.to_string()))?;
        let node_url = url.trim_end_matches('/').to_string();
        let wallet_url = if wallet.is_empty() {
            node_url.clone()
        } else {
            format!("{node_url}/wallet/{}", percent_encode(wallet))
        };
        Ok(Bitcoind {
            http,
            node_url,
            wallet_url,
            auth,
            next_id: AtomicU64::new(1),
        })
    }

    fn credentials(&self) -> Result<Option<(String, String)>, RpcError> {
        match &self.auth {
            Auth::UserPass(u, p) => Ok(Some((u.clone(), p.clone()))),
            Auth::None => Ok(None),
            Auth::Cookie(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| RpcError::Cookie {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                let (u, p) = text
                    .trim()
                    .split_once(':')
                    .ok_or_else(|| RpcError::Cookie {
                        path: path.clone(),
                        reason: "expected user:password".into(),
                    })?;
                Ok(Some((u.to_string(), p.to_string())))
            }
        }
    }

    /// Calls `method` with `params`; `wallet` sends it to the wallet's endpoint.
    ///
    /// # Errors
    /// See [`RpcError`].
    pub async fn call<T: DeserializeOwned>(
        &self,
        wallet: bool,
        method: &'static str,
        params: Value,
    ) -> Result<T, RpcError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({"jsonrpc": "1.0", "id": id, "method": method, "params": params});
        let url = if wallet {
            &self.wallet_url
        } else {
            &self.node_url
        };
        let mut req = self.http.post(url).json(&body);
        if let Some((u, p)) = self.credentials()? {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| RpcError::Transport(describe(&e)))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(RpcError::Unauthorized);
        }
        let bytes = read_capped(resp).await?;
        #[derive(Deserialize)]
        struct Envelope {
            #[serde(default)]
            result: Value,
            #[serde(default)]
            error: Option<RpcErrorBody>,
        }
        #[derive(Deserialize)]
        struct RpcErrorBody {
            code: i64,
            message: String,
        }
        let env: Envelope = match serde_json::from_slice(&bytes) {
            Ok(e) => e,
            Err(_) => {
                let text = String::from_utf8_lossy(&bytes);
                return Err(RpcError::Http {
                    status: status.as_u16(),
                    body: text.chars().take(200).collect(),
                });
            }
        };
        if let Some(e) = env.error {
            return Err(RpcError::Rpc {
                code: e.code,
                message: e.message,
            });
        }
        if !status.is_success() {
            return Err(RpcError::Http {
                status: status.as_u16(),
                body: "no error object".into(),
            });
        }
        serde_json::from_value(env.result).map_err(|e| RpcError::Shape {
            method,
            reason: e.to_string(),
        })
    }

    /// `getblockchaininfo`.
    ///
    /// # Errors
    /// See [`RpcError`].
    pub async fn chain_info(&self) -> Result<ChainInfo, RpcError> {
        self.call(false, "getblockchaininfo", json!([])).await
    }

    /// `getwalletinfo`'s wallet name (proves the wallet is loaded).
    ///
    /// # Errors
    /// See [`RpcError`].
    pub async fn wallet_name(&self) -> Result<String, RpcError> {
        #[derive(Deserialize)]
        struct W {
            walletname: String,
        }
        let w: W = self.call(true, "getwalletinfo", json!([])).await?;
        Ok(w.walletname)
    }

    /// `createrawtransaction [] [{"data": hex}]`: a transaction with one OP_RETURN output.
    ///
    /// # Errors
    /// See [`RpcError`].
    pub async fn create_data_tx(&self, data: &[u8]) -> Result<String, RpcError> {
        self.call(
            true,
            "createrawtransaction",
            json!([[], [{"data": data.to_lower_hex_string()}]]),
        )
        .await
    }

    /// `fundrawtransaction`, with a fee rate in sat/vB (`None`: the wallet estimates).
    ///
    /// # Errors
    /// See [`RpcError`].
    pub async fn fund(&self, tx_hex: &str, fee_rate: Option<u32>) -> Result<Funded, RpcError> {
        let mut options = serde_json::Map::new();
        if let Some(r) = fee_rate {
            options.insert("fee_rate".into(), json!(r));
        }
        self.call(true, "fundrawtransaction", json!([tx_hex, options]))
            .await
    }

    /// `signrawtransactionwithwallet`.
    ///
    /// # Errors
    /// See [`RpcError`].
    pub async fn sign(&self, tx_hex: &str) -> Result<Signed, RpcError> {
        self.call(true, "signrawtransactionwithwallet", json!([tx_hex]))
            .await
    }

    /// `getaddressinfo`'s `ismine`.
    ///
    /// # Errors
    /// See [`RpcError`].
    pub async fn is_mine(&self, address: &str) -> Result<bool, RpcError> {
        let a: AddressInfo = self.call(true, "getaddressinfo", json!([address])).await?;
        Ok(a.ismine)
    }

    /// `sendrawtransaction`, refusing fee rates above `max_fee_rate` BTC/kvB; returns the txid.
    ///
    /// # Errors
    /// See [`RpcError`].
    pub async fn send(&self, tx_hex: &str, max_fee_rate: f64) -> Result<String, RpcError> {
        self.call(false, "sendrawtransaction", json!([tx_hex, max_fee_rate]))
            .await
    }

    /// `gettxout txid vout true`: whether the output exists and nothing (the mempool included)
    /// spends it.
    ///
    /// # Errors
    /// See [`RpcError`].
    pub async fn is_unspent(&self, txid: &str, vout: u32) -> Result<bool, RpcError> {
        let v: Value = self
            .call(false, "gettxout", json!([txid, vout, true]))
            .await?;
        Ok(!v.is_null())
    }

    /// `gettransaction`: `None` when the wallet does not know the transaction.
    ///
    /// # Errors
    /// See [`RpcError`].
    pub async fn wallet_tx(&self, txid: &str) -> Result<Option<WalletTx>, RpcError> {
        match self.call(true, "gettransaction", json!([txid])).await {
            Ok(t) => Ok(Some(t)),
            Err(RpcError::Rpc { code, .. }) if code == code::INVALID_ADDRESS_OR_KEY => Ok(None),
            Err(e) => Err(e),
        }
    }
}

async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, RpcError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| RpcError::Transport(describe(&e)))?
    {
        if out.len() + chunk.len() > MAX_ANSWER {
            return Err(RpcError::Http {
                status: resp.status().as_u16(),
                body: format!("answer larger than {MAX_ANSWER} bytes"),
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// reqwest's error with its causes (the top level alone says only "error sending request").
fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Wallet names may hold any character; the URL path needs them escaped.
fn percent_encode(s: &str) -> String {
    use std::fmt::Write;
    s.bytes().fold(String::new(), |mut out, b| {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wallet_names_are_escaped_in_the_path() {
        assert_eq!(percent_encode("anchors"), "anchors");
        assert_eq!(percent_encode("my wallet/x"), "my%20wallet%2Fx");
    }

    #[test]
    fn the_password_stays_out_of_debug_output() {
        let a = Auth::UserPass("u".into(), "hunter2".into());
        assert!(!format!("{a:?}").contains("hunter2"));
    }
}

//! Anchoring: turn a hash into an OP_RETURN transaction on Bitcoin, once, at a bounded cost.
//!
//! The proxy asks the wallet to build, fund and sign the transaction, then checks what it got
//! before anything leaves: one zero-value OP_RETURN output carrying exactly the requested bytes,
//! every other output paying the wallet itself, signing changed neither inputs nor outputs, and
//! the fee within `anchor_proxy.max_fee`. The signed transaction is stored (a critical commit)
//! before it is broadcast, so a crash or a lost answer between the two leaves a record that the
//! next request for the same data broadcasts again: the same transaction, never a second one.
//! Requests are served one at a time (the wallet's coin selection and the record must not race).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bitcoin::hex::{DisplayHex, FromHex};
use bitcoin::script::PushBytesBuf;
use bitcoin::{Address, Network, ScriptBuf, Transaction};
use serde::{Deserialize, Serialize};

use super::bitcoind::{Bitcoind, RpcError, code};
use crate::http::ApiError;
use crate::identity::KeyId;
use crate::store::{Durability, Store, StoreError, decode, encode};

/// Most bytes one anchor carries: Bitcoin Core's default `-datacarriersize` (83 bytes of script)
/// less the OP_RETURN opcode and the push opcodes.
pub const MAX_DATA: usize = 80;

/// The window `anchor_proxy.max_per_hour` counts over.
const HOUR_MS: u64 = 3_600_000;
const HOUR: Duration = Duration::from_secs(3600);

/// Where an anchor stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnchorState {
    /// Signed and stored; not yet accepted by bitcoind (or its answer was lost).
    Signed,
    /// bitcoind accepted it (mempool or chain).
    Broadcast,
}

/// One anchor, as stored (postcard) under its data bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnchorRecord {
    /// The anchored bytes.
    pub data: Vec<u8>,
    /// The transaction id (internal byte order, as `Txid` stores it).
    pub txid: [u8; 32],
    /// The signed transaction.
    pub tx: Vec<u8>,
    /// Its fee in satoshis, as the wallet reported it.
    pub fee_sats: u64,
    /// Who asked first.
    pub requester: KeyId,
    /// When it was created (ms since the epoch).
    pub created_ms: u64,
    /// When bitcoind accepted it.
    pub broadcast_ms: Option<u64>,
    /// Where it stands.
    pub state: AnchorState,
}

impl AnchorRecord {
    fn txid(&self) -> bitcoin::Txid {
        use bitcoin::hashes::Hash;
        bitcoin::Txid::from_byte_array(self.txid)
    }
}

/// What the API shows of an anchor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnchorView {
    /// The anchored bytes, hex.
    pub data: String,
    /// The transaction id, hex (as block explorers show it).
    pub txid: String,
    /// The fee paid, in satoshis.
    pub fee_sats: u64,
    /// `signed` or `broadcast`.
    pub state: AnchorState,
    /// Who asked first (key id).
    pub requester: String,
    /// When it was created (ms since the epoch).
    pub created_ms: u64,
    /// When bitcoind accepted it.
    pub broadcast_ms: Option<u64>,
    /// Confirmations (0: in the mempool), when bitcoind was asked and answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmations: Option<i64>,
    /// The block that holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_hash: Option<String>,
    /// That block's height.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_height: Option<u64>,
    /// Why the confirmations are missing, when bitcoind could not be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_error: Option<String>,
    /// The signed transaction, hex.
    pub tx: String,
}

impl From<&AnchorRecord> for AnchorView {
    fn from(r: &AnchorRecord) -> Self {
        AnchorView {
            data: r.data.to_lower_hex_string(),
            txid: r.txid().to_string(),
            fee_sats: r.fee_sats,
            state: r.state,
            requester: r.requester.to_string(),
            created_ms: r.created_ms,
            broadcast_ms: r.broadcast_ms,
            confirmations: None,
            block_hash: None,
            block_height: None,
            chain_error: None,
            tx: r.tx.to_lower_hex_string(),
        }
    }
}

/// Why an anchor was not made.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    /// The data is not hex, or empty.
    #[error("data: {0}")]
    BadData(String),
    /// More than [`MAX_DATA`] bytes.
    #[error("data is {0} bytes; an anchor carries at most {MAX_DATA}")]
    TooLarge(usize),
    /// `anchor_proxy.max_per_hour` reached.
    #[error("{limit} anchors in the last hour (anchor_proxy.max_per_hour); try again later")]
    RateLimited {
        /// The limit.
        limit: u32,
        /// When a slot frees up.
        retry_after: Duration,
    },
    /// bitcoind is on another chain than `anchor_proxy.network`.
    #[error("bitcoind is on chain {got:?}, this proxy is configured for {expected:?}")]
    ChainMismatch {
        /// Configured.
        expected: String,
        /// Reported.
        got: String,
    },
    /// The fee the wallet chose is above `anchor_proxy.max_fee`.
    #[error(
        "the wallet asks a fee of {fee} sat, above anchor_proxy.max_fee ({max} sat); nothing was broadcast"
    )]
    FeeTooHigh {
        /// Asked.
        fee: u64,
        /// Allowed.
        max: u64,
    },
    /// The wallet built a transaction the proxy will not broadcast.
    #[error("the wallet's transaction was refused, nothing was broadcast: {0}")]
    WalletTx(String),
    /// bitcoind refused the transaction for good: its inputs are spent elsewhere, so it can
    /// never confirm (nothing was paid; the next request builds a new one).
    #[error("bitcoind refused the transaction, whose coins are now spent elsewhere: {0}")]
    Rejected(String),
    /// bitcoind refused the transaction for now (mempool full, fee below its minimum); it stays
    /// stored and is sent again by the next request for the same data.
    #[error("bitcoind refused the transaction for now; it is kept and sent again on retry: {0}")]
    Deferred(String),
    /// The wallet could not fund or sign (insufficient funds, locked wallet).
    #[error("the wallet could not build the transaction: {0}")]
    Wallet(RpcError),
    /// bitcoind could not be asked.
    #[error("{0}")]
    Bitcoind(RpcError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AnchorError {
    /// The HTTP error: status and a stable code.
    pub fn to_api(&self) -> ApiError {
        let (status, code) = match self {
            AnchorError::BadData(_) => (StatusCode::BAD_REQUEST, "invalid_data"),
            AnchorError::TooLarge(_) => (StatusCode::BAD_REQUEST, "data_too_large"),
            AnchorError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            AnchorError::ChainMismatch { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "chain_mismatch")
            }
            AnchorError::FeeTooHigh { .. } => (StatusCode::SERVICE_UNAVAILABLE, "fee_too_high"),
            AnchorError::WalletTx(_) => (StatusCode::BAD_GATEWAY, "wallet_tx_refused"),
            AnchorError::Rejected(_) => (StatusCode::BAD_GATEWAY, "broadcast_rejected"),
            AnchorError::Deferred(_) => (StatusCode::SERVICE_UNAVAILABLE, "broadcast_deferred"),
            AnchorError::Wallet(_) => (StatusCode::SERVICE_UNAVAILABLE, "wallet_error"),
            AnchorError::Bitcoind(_) => (StatusCode::BAD_GATEWAY, "bitcoind_unavailable"),
            AnchorError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let e = ApiError::new(status, code, self.to_string());
        match self {
            AnchorError::RateLimited { retry_after, .. } => e.retry_after(*retry_after),
            AnchorError::Deferred(_) => e.retry_after(Duration::from_secs(60)),
            _ => e,
        }
    }

    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            AnchorError::BadData(_) | AnchorError::TooLarge(_) => "bad_request",
            AnchorError::RateLimited { .. } => "rate_limited",
            AnchorError::ChainMismatch { .. } => "chain_mismatch",
            AnchorError::FeeTooHigh { .. } => "fee_too_high",
            AnchorError::WalletTx(_) => "wallet_tx_refused",
            AnchorError::Rejected(_) => "rejected",
            AnchorError::Deferred(_) => "deferred",
            AnchorError::Wallet(_) => "wallet_error",
            AnchorError::Bitcoind(_) => "bitcoind_unavailable",
            AnchorError::Store(_) => "internal",
        }
    }
}

/// Parses the hex data of a request.
///
/// # Errors
/// Not hex, empty, or longer than [`MAX_DATA`].
pub fn parse_data(hex: &str) -> Result<Vec<u8>, AnchorError> {
    if hex.len() > MAX_DATA * 2 {
        return Err(AnchorError::TooLarge(hex.len().div_ceil(2)));
    }
    let data =
        Vec::<u8>::from_hex(hex).map_err(|e| AnchorError::BadData(format!("not hex ({e})")))?;
    if data.is_empty() {
        return Err(AnchorError::BadData("empty".into()));
    }
    Ok(data)
}

/// The output script that carries `data`.
pub fn data_script(data: &[u8]) -> Result<ScriptBuf, AnchorError> {
    let push =
        PushBytesBuf::try_from(data.to_vec()).map_err(|_| AnchorError::TooLarge(data.len()))?;
    Ok(ScriptBuf::new_op_return(push))
}

/// Checks the wallet's funded transaction: exactly one OP_RETURN output, worth nothing, carrying
/// exactly `data`, and at least one input. Returns the other outputs' scripts, which must pay
/// the wallet (checked by the caller with `getaddressinfo`).
pub fn check_funded(tx: &Transaction, data: &[u8]) -> Result<Vec<ScriptBuf>, AnchorError> {
    let want = data_script(data)?;
    if tx.input.is_empty() {
        return Err(AnchorError::WalletTx("it has no inputs".into()));
    }
    let mut carriers = 0;
    let mut others = Vec::new();
    for (i, out) in tx.output.iter().enumerate() {
        if out.script_pubkey.is_op_return() {
            if out.script_pubkey != want {
                return Err(AnchorError::WalletTx(format!(
                    "output {i} is an OP_RETURN that does not carry the requested data"
                )));
            }
            if out.value.to_sat() != 0 {
                return Err(AnchorError::WalletTx(format!(
                    "output {i} burns {} sat in the OP_RETURN",
                    out.value.to_sat()
                )));
            }
            carriers += 1;
        } else {
            others.push(out.script_pubkey.clone());
        }
    }
    if carriers != 1 {
        return Err(AnchorError::WalletTx(format!(
            "{carriers} outputs carry the data; exactly one must"
        )));
    }
    Ok(others)
}

/// Checks that signing changed nothing but the signatures, and signed every input.
pub fn check_signed(funded: &Transaction, signed: &Transaction) -> Result<(), AnchorError> {
    if signed.output != funded.output {
        return Err(AnchorError::WalletTx(
            "signing changed the transaction's outputs".into(),
        ));
    }
    let outpoints = |t: &Transaction| {
        t.input
            .iter()
            .map(|i| i.previous_output)
            .collect::<Vec<_>>()
    };
    if outpoints(signed) != outpoints(funded)
        || signed.version != funded.version
        || signed.lock_time != funded.lock_time
    {
        return Err(AnchorError::WalletTx(
            "signing changed the transaction's inputs".into(),
        ));
    }
    if let Some(i) = signed
        .input
        .iter()
        .position(|i| i.witness.is_empty() && i.script_sig.is_empty())
    {
        return Err(AnchorError::WalletTx(format!("input {i} is not signed")));
    }
    Ok(())
}

/// BTC (as bitcoind's JSON numbers show it) to satoshis.
fn btc_to_sats(btc: f64) -> Result<u64, AnchorError> {
    bitcoin::Amount::from_btc(btc.abs())
        .map(|a| a.to_sat())
        .map_err(|e| AnchorError::WalletTx(format!("fee {btc} BTC: {e}")))
}

/// The anchoring service's state.
#[derive(Debug)]
pub struct Anchors {
    store: Store,
    rpc: Bitcoind,
    network: Network,
    fee_rate: Option<u32>,
    max_fee: u64,
    max_per_hour: u32,
    /// Serialises anchoring; holds when the last hour's new anchors were made, on the monotonic
    /// clock (a wall clock stepped by NTP on a board without an RTC neither frees nor blocks it).
    recent: tokio::sync::Mutex<VecDeque<Instant>>,
    /// Set once bitcoind has been seen on the configured chain.
    chain_ok: std::sync::atomic::AtomicBool,
}

impl Anchors {
    /// The service over `store`, reading the last hour's anchors from it.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn new(
        store: Store,
        rpc: Bitcoind,
        network: Network,
        fee_rate: Option<u32>,
        max_fee: u64,
        max_per_hour: u32,
    ) -> Result<Self, StoreError> {
        let since = crate::clock::now_ms().saturating_sub(HOUR_MS);
        let mut recent: Vec<u64> = store.read(|txn, t| {
            let mut v = Vec::new();
            for item in t.anchors.iter(txn)? {
                let (_, bytes) = item?;
                let r: AnchorRecord = decode("anchors", bytes)?;
                if r.created_ms >= since {
                    v.push(r.created_ms);
                }
            }
            Ok(v)
        })?;
        recent.sort_unstable();
        // Ages from the wall clock, clamped: a record "from the future" counts as just made.
        let now_ms = crate::clock::now_ms();
        let now = Instant::now();
        let recent: VecDeque<Instant> = recent
            .into_iter()
            .map(|t| {
                now.checked_sub(Duration::from_millis(now_ms.saturating_sub(t)))
                    .unwrap_or(now)
            })
            .collect();
        Ok(Anchors {
            store,
            rpc,
            network,
            fee_rate,
            max_fee,
            max_per_hour,
            recent: tokio::sync::Mutex::new(recent),
            chain_ok: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The bitcoind client.
    pub fn rpc(&self) -> &Bitcoind {
        &self.rpc
    }

    /// The configured chain, as bitcoind names it.
    pub fn chain(&self) -> &'static str {
        self.network.to_core_arg()
    }

    /// Asks bitcoind which chain it is on (once it has answered correctly, not again).
    ///
    /// # Errors
    /// bitcoind unreachable, or on another chain.
    pub async fn check_chain(&self) -> Result<(), AnchorError> {
        use std::sync::atomic::Ordering;
        if self.chain_ok.load(Ordering::Acquire) {
            return Ok(());
        }
        let info = self.rpc.chain_info().await.map_err(AnchorError::Bitcoind)?;
        if info.chain != self.chain() {
            return Err(AnchorError::ChainMismatch {
                expected: self.chain().into(),
                got: info.chain,
            });
        }
        self.chain_ok.store(true, Ordering::Release);
        Ok(())
    }

    fn load(&self, data: &[u8]) -> Result<Option<AnchorRecord>, StoreError> {
        self.store.read(|txn, t| {
            t.anchors
                .get(txn, data)?
                .map(|b| decode("anchors", b))
                .transpose()
        })
    }

    async fn save(&self, r: &AnchorRecord) -> Result<(), StoreError> {
        let key = r.data.clone();
        let value = encode(r);
        self.store
            .write(Durability::Critical, move |txn, t| {
                t.anchors.put(txn, &key, &value)?;
                Ok(())
            })
            .await
    }

    async fn forget(&self, data: &[u8]) -> Result<(), StoreError> {
        let key = data.to_vec();
        self.store
            .write(Durability::Critical, move |txn, t| {
                t.anchors.delete(txn, &key)?;
                Ok(())
            })
            .await
    }

    /// Anchors `data` for `requester`. Returns the record and whether this call created it.
    ///
    /// # Errors
    /// See [`AnchorError`].
    pub async fn anchor(
        &self,
        data: Vec<u8>,
        requester: KeyId,
    ) -> Result<(AnchorRecord, bool), AnchorError> {
        // Data already anchored is answered without waiting behind a new anchor being built.
        if let Some(r) = self.load(&data)?
            && r.state == AnchorState::Broadcast
            && !self.conflicted(&r).await
        {
            return Ok((r, false));
        }
        let mut recent = self.recent.lock().await;
        if let Some(r) = self.load(&data)? {
            match r.state {
                AnchorState::Broadcast if !self.conflicted(&r).await => return Ok((r, false)),
                AnchorState::Broadcast => {
                    // Another transaction spent its coins and confirmed: this one never will.
                    tracing::warn!(txid = %r.txid(), "anchor.conflicted: building a new one");
                    self.forget(&r.data).await?;
                }
                AnchorState::Signed => return self.broadcast(r).await.map(|r| (r, false)),
            }
        }
        let now = Instant::now();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= HOUR)
        {
            recent.pop_front();
        }
        if recent.len() >= self.max_per_hour as usize {
            let oldest = recent.front().copied().unwrap_or(now);
            return Err(AnchorError::RateLimited {
                limit: self.max_per_hour,
                retry_after: HOUR.saturating_sub(now.duration_since(oldest)),
            });
        }
        self.check_chain().await?;
        let record = self.build(&data, requester, crate::clock::now_ms()).await?;
        self.save(&record).await?;
        recent.push_back(now);
        tracing::info!(
            txid = %record.txid(),
            fee_sats = record.fee_sats,
            data = %record.data.to_lower_hex_string(),
            "anchor.signed"
        );
        self.broadcast(record).await.map(|r| (r, true))
    }

    /// Whether the wallet reports the record's transaction as conflicted (negative
    /// confirmations). Unknown, or bitcoind unreachable: not conflicted.
    async fn conflicted(&self, r: &AnchorRecord) -> bool {
        matches!(
            self.rpc.wallet_tx(&r.txid().to_string()).await,
            Ok(Some(t)) if t.confirmations < 0
        )
    }

    /// Has the wallet build, fund and sign the transaction, and checks it.
    async fn build(
        &self,
        data: &[u8],
        requester: KeyId,
        now: u64,
    ) -> Result<AnchorRecord, AnchorError> {
        let wallet = |e: RpcError| match e {
            RpcError::Rpc { .. } => AnchorError::Wallet(e),
            other => AnchorError::Bitcoind(other),
        };
        let raw = self.rpc.create_data_tx(data).await.map_err(wallet)?;
        let funded = self.rpc.fund(&raw, self.fee_rate).await.map_err(wallet)?;
        let fee = btc_to_sats(funded.fee)?;
        if fee > self.max_fee {
            return Err(AnchorError::FeeTooHigh {
                fee,
                max: self.max_fee,
            });
        }
        let funded_tx: Transaction = bitcoin::consensus::encode::deserialize_hex(&funded.hex)
            .map_err(|e| AnchorError::WalletTx(format!("funded transaction unreadable: {e}")))?;
        for script in check_funded(&funded_tx, data)? {
            let address = Address::from_script(&script, self.network).map_err(|e| {
                AnchorError::WalletTx(format!("an output pays a script with no address: {e}"))
            })?;
            let mine = self
                .rpc
                .is_mine(&address.to_string())
                .await
                .map_err(wallet)?;
            if !mine {
                return Err(AnchorError::WalletTx(format!(
                    "an output pays {address}, which is not the wallet's own"
                )));
            }
        }
        let signed = self.rpc.sign(&funded.hex).await.map_err(wallet)?;
        if !signed.complete {
            return Err(AnchorError::WalletTx(format!(
                "the wallet could not sign every input: {}",
                serde_json::Value::Array(signed.errors)
            )));
        }
        let signed_tx: Transaction = bitcoin::consensus::encode::deserialize_hex(&signed.hex)
            .map_err(|e| AnchorError::WalletTx(format!("signed transaction unreadable: {e}")))?;
        check_signed(&funded_tx, &signed_tx)?;
        use bitcoin::hashes::Hash;
        Ok(AnchorRecord {
            data: data.to_vec(),
            txid: signed_tx.compute_txid().to_byte_array(),
            tx: bitcoin::consensus::encode::serialize(&signed_tx),
            fee_sats: fee,
            requester,
            created_ms: now,
            broadcast_ms: None,
            state: AnchorState::Signed,
        })
    }

    /// Hands a signed record's transaction to bitcoind; marks it broadcast when accepted.
    async fn broadcast(&self, mut r: AnchorRecord) -> Result<AnchorRecord, AnchorError> {
        let tx: Transaction = bitcoin::consensus::encode::deserialize(&r.tx)
            .map_err(|e| AnchorError::WalletTx(format!("stored transaction unreadable: {e}")))?;
        // Fee rate ceiling for bitcoind's own check, in BTC/kvB, rounded up.
        let vsize = tx.vsize().max(1) as u64;
        let max_rate = (self.max_fee * 1000).div_ceil(vsize) as f64 / 1e8;
        let txid = r.txid().to_string();
        match self.rpc.send(&r.tx.to_lower_hex_string(), max_rate).await {
            Ok(got) if got == txid => {}
            Ok(got) => {
                return Err(AnchorError::Bitcoind(RpcError::Shape {
                    method: "sendrawtransaction",
                    reason: format!("returned txid {got}, expected {txid}"),
                }));
            }
            Err(RpcError::Rpc { code: c, .. }) if c == code::VERIFY_ALREADY_IN_CHAIN => {}
            Err(RpcError::Rpc { code: c, message })
                if c == code::VERIFY_ERROR || c == code::VERIFY_REJECTED =>
            {
                // Refused. Already in (its inputs spent by itself)? The wallet knows its own
                // transactions.
                let known = self
                    .rpc
                    .wallet_tx(&txid)
                    .await
                    .map_err(AnchorError::Bitcoind)?
                    .is_some_and(|t| t.confirmations >= 0);
                if !known {
                    // Forgotten only when it can never confirm: a coin it spends is spent
                    // elsewhere. Otherwise (mempool full, fee under the node's minimum) it stays
                    // valid, so it is kept: building another now could pay twice.
                    let mut spent_elsewhere = false;
                    for input in &tx.input {
                        let op = input.previous_output;
                        if !self
                            .rpc
                            .is_unspent(&op.txid.to_string(), op.vout)
                            .await
                            .map_err(AnchorError::Bitcoind)?
                        {
                            spent_elsewhere = true;
                            break;
                        }
                    }
                    if spent_elsewhere {
                        self.forget(&r.data).await?;
                        tracing::warn!(%txid, %message, "anchor.rejected: its coins are spent elsewhere");
                        return Err(AnchorError::Rejected(message));
                    }
                    tracing::warn!(%txid, %message, "anchor.deferred");
                    return Err(AnchorError::Deferred(message));
                }
            }
            Err(e) => return Err(AnchorError::Bitcoind(e)),
        }
        r.state = AnchorState::Broadcast;
        r.broadcast_ms = Some(crate::clock::now_ms());
        self.save(&r).await?;
        tracing::info!(%txid, "anchor.broadcast");
        Ok(r)
    }

    /// The record for `data` with its confirmations (when bitcoind answers).
    ///
    /// # Errors
    /// The store failed.
    pub async fn view(&self, data: &[u8]) -> Result<Option<AnchorView>, StoreError> {
        let Some(r) = self.load(data)? else {
            return Ok(None);
        };
        let mut v = AnchorView::from(&r);
        match self.rpc.wallet_tx(&v.txid).await {
            Ok(Some(t)) => {
                v.confirmations = Some(t.confirmations);
                v.block_hash = t.blockhash;
                v.block_height = t.blockheight;
            }
            Ok(None) => v.confirmations = None,
            Err(e) => v.chain_error = Some(e.to_string()),
        }
        Ok(Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::{Amount, OutPoint, Sequence, TxIn, TxOut, Witness, absolute, transaction};

    fn tx(outputs: Vec<TxOut>) -> Transaction {
        Transaction {
            version: transaction::Version::TWO,
            lock_time: absolute::LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint::null(),
                script_sig: ScriptBuf::new(),
                sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                witness: Witness::new(),
            }],
            output: outputs,
        }
    }

    fn carrier(data: &[u8]) -> TxOut {
        TxOut {
            value: Amount::ZERO,
            script_pubkey: data_script(data).expect("small"),
        }
    }

    fn change() -> TxOut {
        TxOut {
            value: Amount::from_sat(1000),
            script_pubkey: ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::from_byte_array([7; 20])),
        }
    }

    use bitcoin::hashes::Hash;

    #[test]
    fn data_must_be_short_non_empty_hex() {
        assert!(matches!(parse_data(""), Err(AnchorError::BadData(_))));
        assert!(matches!(parse_data("zz"), Err(AnchorError::BadData(_))));
        assert!(matches!(parse_data("abc"), Err(AnchorError::BadData(_))));
        assert!(matches!(
            parse_data(&"ab".repeat(81)),
            Err(AnchorError::TooLarge(81))
        ));
        assert_eq!(parse_data(&"ab".repeat(80)).expect("80 bytes").len(), 80);
    }

    #[test]
    fn a_funded_transaction_must_carry_exactly_the_data_once() {
        let data = [1u8; 32];
        let ok = tx(vec![change(), carrier(&data)]);
        assert_eq!(check_funded(&ok, &data).expect("ok").len(), 1);

        let other = tx(vec![carrier(&[2u8; 32]), change()]);
        assert!(matches!(
            check_funded(&other, &data),
            Err(AnchorError::WalletTx(_))
        ));

        let twice = tx(vec![carrier(&data), carrier(&data)]);
        assert!(matches!(
            check_funded(&twice, &data),
            Err(AnchorError::WalletTx(_))
        ));

        let none = tx(vec![change()]);
        assert!(matches!(
            check_funded(&none, &data),
            Err(AnchorError::WalletTx(_))
        ));

        let mut burn = carrier(&data);
        burn.value = Amount::from_sat(5);
        assert!(matches!(
            check_funded(&tx(vec![burn]), &data),
            Err(AnchorError::WalletTx(_))
        ));

        let mut no_inputs = ok.clone();
        no_inputs.input.clear();
        assert!(matches!(
            check_funded(&no_inputs, &data),
            Err(AnchorError::WalletTx(_))
        ));
    }

    #[test]
    fn signing_may_add_signatures_only() {
        let data = [1u8; 32];
        let funded = tx(vec![carrier(&data), change()]);
        let mut signed = funded.clone();
        assert!(
            matches!(check_signed(&funded, &signed), Err(AnchorError::WalletTx(m)) if m.contains("not signed"))
        );
        signed.input[0].witness.push([1u8; 71]);
        signed.input[0].witness.push([2u8; 33]);
        check_signed(&funded, &signed).expect("only signatures added");

        let mut more = signed.clone();
        more.output[1].value = Amount::from_sat(10);
        assert!(check_signed(&funded, &more).is_err());

        let mut moved = signed.clone();
        moved.input[0].previous_output.vout = 3;
        assert!(check_signed(&funded, &moved).is_err());
    }

    #[test]
    fn fees_convert_from_btc_exactly() {
        assert_eq!(btc_to_sats(0.0000141).expect("fee"), 1410);
        assert_eq!(btc_to_sats(0.00020000).expect("fee"), 20_000);
    }
}

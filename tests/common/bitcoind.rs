//! A double of Bitcoin Core's JSON-RPC interface, for tests; not bitcoind.
//!
//! [`BitcoindDouble`] listens on `127.0.0.1:<random port>` and answers the JSON-RPC calls an
//! anchoring service makes, the way Bitcoin Core (up to v29) answers them on the wire: a
//! hand-written HTTP/1.1 server (bitcoind uses libevent's evhttp, not a framework), Basic auth
//! (401 with an empty body and `WWW-Authenticate: Basic realm="jsonrpc"`, after a 250 ms pause
//! for a wrong password), legacy JSON-RPC 1.0 replies `{"result":..,"error":..,"id":..}\n` with
//! HTTP 200 / 400 / 404 / 500 by error code, JSON-RPC 2.0 replies when asked for (v28+), batches,
//! named parameters, keys in Core's order and amounts printed as Core prints them (`0.00001410`).
//!
//! The chain is simulated: a regtest chain at height 200, a mempool, a UTXO set, and a
//! descriptor wallet with three confirmed P2WPKH coins (0.5, 0.25 and 0.01 BTC) whose keys the
//! double holds, so signatures are real BIP143 ECDSA signatures and `sendrawtransaction`
//! verifies them. The node behaves as one with several wallets loaded: wallet methods must be
//! called on `/wallet/<name>` (`/` gives error -19).
//!
//! Where the double knowingly differs from Core:
//! - a transaction spending an input already spent in the mempool is refused with -25
//!   `bad-txns-inputs-missingorspent` (Core would evaluate it as a BIP125 replacement);
//! - coin selection is largest-first; the change position alternates between 0 and the end
//!   (Core picks it at random), so callers cannot assume an index;
//! - `getnewaddress` only makes bech32 (P2WPKH) addresses; `gettransaction` gives empty
//!   `details`; coinbase outputs of mined blocks are not tracked.
//!
//! [`Fault`]s make it misbehave the way a broken, compromised or overloaded node would.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bitcoin::absolute::LockTime;
use bitcoin::address::NetworkUnchecked;
use bitcoin::consensus::encode::{Decodable, Encodable};
use bitcoin::hashes::{Hash, hash160, sha256, sha256d};
use bitcoin::hex::{DisplayHex, FromHex};
use bitcoin::script::{Instruction, PushBytesBuf};
use bitcoin::secp256k1::{All, Message, PublicKey, Secp256k1, SecretKey};
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::transaction::Version;
use bitcoin::{
    Address, Amount, BlockHash, CompressedPublicKey, Network, OutPoint, ScriptBuf, Sequence,
    Transaction, TxIn, TxOut, Txid, Witness,
};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A way for the double to misbehave; set with [`BitcoindDouble::set_fault`].
#[derive(Clone, Debug)]
pub enum Fault {
    /// fundrawtransaction also adds an output of 10_000 sats paying an address the wallet does
    /// NOT own (a compromised or misconfigured wallet).
    ForeignOutput,
    /// fundrawtransaction reports and takes this fee (sats) instead of the honest one (change is
    /// reduced accordingly).
    Fee(u64),
    /// The next sendrawtransaction accepts the tx into the mempool, then drops the connection
    /// without any HTTP answer (then the fault clears itself).
    DropAfterSend,
    /// The next sendrawtransaction drops the connection without accepting (then clears itself).
    DropBeforeSend,
    /// signrawtransactionwithwallet changes the OP_RETURN payload's last byte before signing (a
    /// wallet that tampers).
    TamperOnSign,
    /// Every call answers HTTP 503 with body "Work queue depth exceeded" (bitcoind overloaded).
    Busy,
    /// The next sendrawtransaction is refused with this RPC error code and message, without
    /// accepting the transaction (e.g. -26 "mempool min fee not met"); then the fault clears.
    RejectSendOnce(i64, String),
}

/// A running double of bitcoind's JSON-RPC server. Dropping it stops it.
pub struct BitcoindDouble {
    /// `http://127.0.0.1:<port>`: the node endpoint (`/`).
    pub url: String,
    state: Arc<Mutex<State>>,
    listener: Arc<Mutex<Option<TcpListener>>>,
    stop_tx: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl BitcoindDouble {
    /// Binds `127.0.0.1:0` and serves on a tokio task. `user`/`password` are the RPC
    /// credentials (cookie style works the same: user `__cookie__`, password the cookie's hex);
    /// `wallet` is the name of the one wallet reachable at `/wallet/<wallet>`.
    pub async fn start(user: &str, password: &str, wallet: &str) -> BitcoindDouble {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::new(user, password, wallet)));
        let listener = Arc::new(Mutex::new(Some(listener)));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener.clone(), state.clone(), stop_rx));
        BitcoindDouble {
            url: format!("http://127.0.0.1:{port}"),
            state,
            listener,
            stop_tx,
            task,
        }
    }

    /// `url` + `/wallet/` + the wallet's name.
    pub fn wallet_url(&self) -> String {
        let st = self.state.lock().unwrap();
        format!("{}/wallet/{}", self.url, st.wallet)
    }

    /// Sets the chain `getblockchaininfo` reports (`main`, `test`, `testnet4`, `signet`,
    /// `regtest`); addresses are then made and parsed for that chain.
    pub fn set_chain(&self, chain: &str) {
        self.state.lock().unwrap().chain = chain.to_string();
    }

    /// Mines `blocks` blocks, the first with every mempool transaction (as generatetoaddress).
    pub fn mine(&self, blocks: u32) {
        self.state.lock().unwrap().mine_blocks(u64::from(blocks));
    }

    /// The mempool, in order of acceptance.
    pub fn mempool(&self) -> Vec<Transaction> {
        self.state.lock().unwrap().mempool.clone()
    }

    /// The transactions mined by the double (not the wallet's initial funding), in block order.
    pub fn confirmed(&self) -> Vec<Transaction> {
        self.state.lock().unwrap().mined.clone()
    }

    /// How many sendrawtransaction calls added a NEW transaction to the mempool.
    pub fn accepted(&self) -> usize {
        self.state.lock().unwrap().accepted
    }

    /// How many JSON-RPC requests named `method`, whatever the outcome (refused for auth, Busy,
    /// errors and dropped connections included).
    pub fn calls(&self, method: &str) -> usize {
        let st = self.state.lock().unwrap();
        st.calls.get(method).copied().unwrap_or(0)
    }

    /// Sets (or clears) the fault; it stays until changed, except the Drop* ones, which clear
    /// themselves once they have fired.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.state.lock().unwrap().fault = fault;
    }

    /// Makes the mempool transaction `txid` lose to a conflicting transaction (not shown) that
    /// spent its inputs and now has `depth` confirmations: it leaves the mempool, its outputs
    /// vanish, and `gettransaction` reports `confirmations: -depth` as Core does.
    pub fn conflict(&self, txid: Txid, depth: u64) {
        let mut st = self.state.lock().unwrap();
        let Some(i) = st.mempool.iter().position(|t| t.compute_txid() == txid) else {
            panic!("{txid} is not in the mempool");
        };
        let tx = st.mempool.remove(i);
        for input in &tx.input {
            st.spent_in_mempool.remove(&input.previous_output);
            st.unspent.remove(&input.previous_output);
        }
        for vout in 0..tx.output.len() as u32 {
            st.unspent.remove(&OutPoint { txid, vout });
        }
        st.conflicted.insert(txid, depth);
    }

    /// Spends `outpoint` in a transaction the double does not show (the wallet's coin used by
    /// someone else, or a conflicting transaction that confirmed): it is no longer unspent.
    pub fn spend_elsewhere(&self, outpoint: OutPoint) {
        let mut st = self.state.lock().unwrap();
        st.unspent.remove(&outpoint);
        st.spent_in_mempool.remove(&outpoint);
    }

    /// Stops serving: the listening socket is closed at once (connections are refused) and open
    /// connections are closed.
    pub fn stop(&self) {
        self.listener.lock().unwrap().take();
        self.stop_tx.send_replace(true);
        self.task.abort();
    }
}

impl Drop for BitcoindDouble {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// JSON with ordered keys and verbatim numbers (Core's UniValue keeps both; serde_json's Value
// sorts keys), so replies match Core byte for byte and `{"addr":1,"data":".."}` keeps its order.

#[derive(Clone, Debug, PartialEq)]
enum J {
    Null,
    Bool(bool),
    /// A number, as its JSON text.
    Num(String),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    fn type_name(&self) -> &'static str {
        match self {
            J::Null => "null",
            J::Bool(_) => "bool",
            J::Num(_) => "number",
            J::Str(_) => "string",
            J::Arr(_) => "array",
            J::Obj(_) => "object",
        }
    }

    /// The first value under `key` (as UniValue's `find_value`).
    fn get(&self, key: &str) -> Option<&J> {
        match self {
            J::Obj(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn write(&self, out: &mut String) {
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Num(n) => out.push_str(n),
            J::Str(s) => out.push_str(&serde_json::to_string(s).unwrap()),
            J::Arr(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write(out);
                }
                out.push(']');
            }
            J::Obj(kv) => {
                out.push('{');
                for (i, (k, v)) in kv.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }

    fn text(&self) -> String {
        let mut s = String::new();
        self.write(&mut s);
        s
    }
}

impl<'de> Deserialize<'de> for J {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<J, D::Error> {
        d.deserialize_any(JVisitor)
    }
}

struct JVisitor;

impl<'de> Visitor<'de> for JVisitor {
    type Value = J;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<J, E> {
        Ok(J::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<J, E> {
        Ok(J::Num(v.to_string()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<J, E> {
        Ok(J::Num(v.to_string()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<J, E> {
        // Shortest round-trip text, without exponent: 0.0001 stays "0.0001".
        Ok(J::Num(format!("{v}")))
    }
    fn visit_str<E>(self, v: &str) -> Result<J, E> {
        Ok(J::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<J, E> {
        Ok(J::Str(v))
    }
    fn visit_unit<E>(self) -> Result<J, E> {
        Ok(J::Null)
    }
    fn visit_none<E>(self) -> Result<J, E> {
        Ok(J::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<J, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element::<J>()? {
            items.push(v);
        }
        Ok(J::Arr(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<J, A::Error> {
        let mut kv = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, J>()? {
            kv.push((k, v));
        }
        Ok(J::Obj(kv))
    }
}

fn s(v: impl Into<String>) -> J {
    J::Str(v.into())
}

fn n(v: impl std::fmt::Display) -> J {
    J::Num(v.to_string())
}

/// An amount in sats as Core prints BTC amounts: `-0.00001410`.
fn amt(sats: i64) -> J {
    let sign = if sats < 0 { "-" } else { "" };
    let a = sats.unsigned_abs();
    J::Num(format!("{sign}{}.{:08}", a / 100_000_000, a % 100_000_000))
}

fn obj(kv: Vec<(&str, J)>) -> J {
    J::Obj(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

// ---------------------------------------------------------------------------------------------
// RPC errors (codes from Core's rpc/protocol.h).

#[derive(Debug)]
struct RpcError {
    code: i64,
    message: String,
}

fn err(code: i64, message: impl Into<String>) -> RpcError {
    RpcError {
        code,
        message: message.into(),
    }
}

const RPC_MISC_ERROR: i64 = -1;
const RPC_TYPE_ERROR: i64 = -3;
const RPC_WALLET_ERROR: i64 = -4;
const RPC_INVALID_ADDRESS_OR_KEY: i64 = -5;
const RPC_INVALID_PARAMETER: i64 = -8;
const RPC_WALLET_NOT_FOUND: i64 = -18;
const RPC_WALLET_NOT_SPECIFIED: i64 = -19;
const RPC_DESERIALIZATION_ERROR: i64 = -22;
const RPC_TRANSACTION_ERROR: i64 = -25;
const RPC_TRANSACTION_REJECTED: i64 = -26;
const RPC_TRANSACTION_ALREADY_IN_CHAIN: i64 = -27;
const RPC_INVALID_REQUEST: i64 = -32600;
const RPC_METHOD_NOT_FOUND: i64 = -32601;
const RPC_PARSE_ERROR: i64 = -32700;

fn type_err(got: &J, want: &str) -> RpcError {
    err(
        RPC_TYPE_ERROR,
        format!(
            "JSON value of type {} is not of expected type {want}",
            got.type_name()
        ),
    )
}

/// Parameter `i`, `None` when missing or null.
fn arg(p: &[J], i: usize) -> Option<&J> {
    p.get(i).filter(|v| **v != J::Null)
}

fn str_arg<'a>(p: &'a [J], i: usize, method: &str) -> Result<&'a str, RpcError> {
    match arg(p, i) {
        Some(J::Str(v)) => Ok(v),
        Some(other) => Err(type_err(other, "string")),
        None => Err(usage(method)),
    }
}

fn int_of(v: &J) -> Result<i64, RpcError> {
    match v {
        J::Num(t) => t
            .parse::<i64>()
            .map_err(|_| err(RPC_TYPE_ERROR, "JSON integer out of range")),
        other => Err(type_err(other, "number")),
    }
}

fn bool_of(v: &J) -> Result<bool, RpcError> {
    match v {
        J::Bool(b) => Ok(*b),
        other => Err(type_err(other, "bool")),
    }
}

/// Parses a decimal (optionally with exponent) into an integer scaled by 10^`decimals`;
/// `None` if it has more precision than that or is malformed (Core's ParseFixedPoint).
fn parse_fixed(text: &str, decimals: i32) -> Option<i128> {
    let (neg, t) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mant, exp) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], t[i + 1..].parse::<i32>().ok()?),
        None => (t, 0),
    };
    let (int, frac) = mant.split_once('.').unwrap_or((mant, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let digits = format!("{int}{frac}");
    if !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 30 {
        return None;
    }
    let mut v: i128 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    let scale = decimals + exp - frac.len() as i32;
    if scale >= 0 {
        for _ in 0..scale {
            v = v.checked_mul(10)?;
        }
    } else {
        for _ in 0..(-scale) {
            if v % 10 != 0 {
                return None;
            }
            v /= 10;
        }
    }
    Some(if neg { -v } else { v })
}

/// Core's AmountFromValue: a BTC number or string, in sats.
fn amount_from(v: &J) -> Result<i64, RpcError> {
    let text = match v {
        J::Num(t) | J::Str(t) => t,
        _ => return Err(err(RPC_TYPE_ERROR, "Amount is not a number or string")),
    };
    let sats = parse_fixed(text, 8).ok_or_else(|| err(RPC_TYPE_ERROR, "Invalid amount"))?;
    if !(0..=MAX_MONEY as i128).contains(&sats) {
        return Err(err(RPC_TYPE_ERROR, "Amount out of range"));
    }
    Ok(sats as i64)
}

fn usage(method: &str) -> RpcError {
    let args = param_names(method)
        .map(|names| names.join(" "))
        .unwrap_or_default();
    err(RPC_MISC_ERROR, format!("{method} {args}\n"))
}

// ---------------------------------------------------------------------------------------------
// The simulated node and wallet.

const COIN: i64 = 100_000_000;
const MAX_MONEY: i64 = 21_000_000 * COIN;
const START_HEIGHT: u64 = 200;
/// Core's MAX_SIZE: larger bodies are refused (413).
const MAX_BODY: usize = 0x0200_0000;
/// bitcoind's MAX_HEADERS_SIZE.
const MAX_HEADERS: usize = 8192;
/// The wallet's fee rate when fundrawtransaction is given none: 10 sat/vB (in sat/kvB).
const DEFAULT_FEE_RATE: i128 = 10_000;
/// sendrawtransaction's default maxfeerate: 0.10 BTC/kvB (in sat/kvB).
const DEFAULT_MAX_FEE_RATE: i128 = 10_000_000;
/// -minrelaytxfee: 1 sat/vB (in sat/kvB).
const MIN_RELAY_FEE_RATE: i128 = 1_000;
/// -maxtxfee: the most fee the wallet will pay.
const MAX_TX_FEE: i64 = COIN / 10;
const FOREIGN_OUTPUT_SATS: i64 = 10_000;
/// A P2WPKH output below this is dust (at the 3 sat/vB dust relay fee).
const P2WPKH_DUST: i64 = 294;

struct Block {
    hash: BlockHash,
    time: u64,
}

struct Key {
    sk: SecretKey,
    pk: CompressedPublicKey,
    change: bool,
}

struct WalletTx {
    tx: Transaction,
    time: u64,
    /// Some input spent a wallet coin.
    from_me: bool,
}

struct State {
    user: String,
    password: String,
    wallet: String,
    chain: String,
    secp: Secp256k1<All>,
    blocks: Vec<Block>,
    keys: Vec<Key>,
    /// scriptPubKey -> index in `keys`.
    mine: HashMap<ScriptBuf, usize>,
    /// Every output ever created (spent or not), for amounts and scripts.
    outputs: HashMap<OutPoint, TxOut>,
    /// Outputs of confirmed and mempool transactions that nothing has spent.
    unspent: HashSet<OutPoint>,
    /// Confirmed-or-mempool outputs spent by a mempool transaction.
    spent_in_mempool: HashSet<OutPoint>,
    /// Coins locked by fundrawtransaction's lockUnspents.
    locked: HashSet<OutPoint>,
    mempool: Vec<Transaction>,
    mined: Vec<Transaction>,
    /// txid -> (block height, index in block).
    confirmed: HashMap<Txid, (u64, usize)>,
    wallet_txs: HashMap<Txid, WalletTx>,
    accepted: usize,
    calls: HashMap<String, usize>,
    fault: Option<Fault>,
    /// Counts fundrawtransaction calls that chose the change position themselves.
    change_picks: u64,
    /// Wallet transactions displaced by a conflicting transaction, with its depth.
    conflicted: HashMap<Txid, u64>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn derive_key(secp: &Secp256k1<All>, tag: &str, i: u64) -> (SecretKey, CompressedPublicKey) {
    let mut data = tag.as_bytes().to_vec();
    data.extend_from_slice(&i.to_le_bytes());
    let sk = SecretKey::from_slice(&sha256::Hash::hash(&data).to_byte_array()).unwrap();
    (
        sk,
        CompressedPublicKey(PublicKey::from_secret_key(secp, &sk)),
    )
}

fn p2wpkh(pk: &CompressedPublicKey) -> ScriptBuf {
    ScriptBuf::new_p2wpkh(&pk.wpubkey_hash())
}

fn txid_hex(t: &Txid) -> String {
    t.to_string()
}

/// Core's COutPoint::ToString.
fn outpoint_str(op: &OutPoint) -> String {
    format!("COutPoint({}, {})", &op.txid.to_string()[..10], op.vout)
}

fn is_hex(v: &str) -> bool {
    !v.is_empty() && v.len().is_multiple_of(2) && v.bytes().all(|b| b.is_ascii_hexdigit())
}

fn hex_bytes(v: &str) -> Option<Vec<u8>> {
    if !is_hex(v) {
        return None;
    }
    Vec::<u8>::from_hex(v).ok()
}

/// Core's CheckTxScriptsSanity: every script parses and uses defined opcodes.
fn scripts_sane(tx: &Transaction) -> bool {
    let ok = |sc: &bitcoin::Script| {
        sc.len() <= 10_000
            && sc.instructions().all(|i| match i {
                Ok(Instruction::Op(op)) => op.to_u8() <= 0xb9,
                Ok(Instruction::PushBytes(_)) => true,
                Err(_) => false,
            })
    };
    tx.input.iter().all(|i| ok(&i.script_sig)) && tx.output.iter().all(|o| ok(&o.script_pubkey))
}

fn decode_legacy(bytes: &[u8]) -> Option<Transaction> {
    let mut r = bytes;
    let version = Version::consensus_decode(&mut r).ok()?;
    let input = Vec::<TxIn>::consensus_decode(&mut r).ok()?;
    let output = Vec::<TxOut>::consensus_decode(&mut r).ok()?;
    let lock_time = LockTime::consensus_decode(&mut r).ok()?;
    r.is_empty().then_some(Transaction {
        version,
        lock_time,
        input,
        output,
    })
}

/// Core's DecodeHexTx: tries the extended (segwit) and/or legacy serialization; a 0-input
/// transaction as createrawtransaction writes it only decodes the legacy way.
fn decode_tx(hex: &str, try_legacy: bool, try_witness: bool) -> Option<Transaction> {
    let bytes = hex_bytes(hex)?;
    let extended = if try_witness {
        bitcoin::consensus::deserialize::<Transaction>(&bytes).ok()
    } else {
        None
    };
    if let Some(tx) = &extended
        && scripts_sane(tx)
    {
        return extended;
    }
    let legacy = if try_legacy {
        decode_legacy(&bytes)
    } else {
        None
    };
    if let Some(tx) = &legacy
        && scripts_sane(tx)
    {
        return legacy;
    }
    extended.or(legacy)
}

/// Core's EncodeHexTx: the witness serialization only when some input has a witness (so a
/// 0-input transaction comes out in the legacy serialization, unlike rust-bitcoin's).
fn encode_tx(tx: &Transaction) -> String {
    if tx.input.iter().any(|i| !i.witness.is_empty()) {
        return bitcoin::consensus::encode::serialize_hex(tx);
    }
    let mut v = Vec::new();
    tx.version.consensus_encode(&mut v).unwrap();
    tx.input.consensus_encode(&mut v).unwrap();
    tx.output.consensus_encode(&mut v).unwrap();
    tx.lock_time.consensus_encode(&mut v).unwrap();
    v.to_lower_hex_string()
}

fn mandatory(e: &str) -> String {
    format!("mandatory-script-verify-flag-failed ({e})")
}

fn non_mandatory(e: &str) -> String {
    format!("non-mandatory-script-verify-flag ({e})")
}

/// The dust threshold of an output at the 3 sat/vB dust relay fee (Core's GetDustThreshold).
fn dust_threshold(out: &TxOut) -> i64 {
    if out.script_pubkey.is_op_return() {
        return 0;
    }
    let spk_len = out.script_pubkey.len();
    let varint = if spk_len < 253 { 1 } else { 3 };
    let size = 8 + varint + spk_len;
    let spend = if out.script_pubkey.is_witness_program() {
        32 + 4 + 1 + 107 / 4 + 4
    } else {
        32 + 4 + 1 + 107 + 4
    };
    3 * (size + spend) as i64
}

/// ceil(rate (sat/kvB) * vsize / 1000).
fn fee_at(rate: i128, vsize: usize) -> i64 {
    let f = rate * vsize as i128;
    ((f + 999) / 1000) as i64
}

fn sighash_type_of(name: &str) -> Option<EcdsaSighashType> {
    Some(match name {
        "DEFAULT" | "ALL" => EcdsaSighashType::All,
        "NONE" => EcdsaSighashType::None,
        "SINGLE" => EcdsaSighashType::Single,
        "ALL|ANYONECANPAY" => EcdsaSighashType::AllPlusAnyoneCanPay,
        "NONE|ANYONECANPAY" => EcdsaSighashType::NonePlusAnyoneCanPay,
        "SINGLE|ANYONECANPAY" => EcdsaSighashType::SinglePlusAnyoneCanPay,
        _ => return None,
    })
}

impl State {
    fn new(user: &str, password: &str, wallet: &str) -> State {
        let mut st = State {
            user: user.to_string(),
            password: password.to_string(),
            wallet: wallet.to_string(),
            chain: "regtest".to_string(),
            secp: Secp256k1::new(),
            blocks: Vec::new(),
            keys: Vec::new(),
            mine: HashMap::new(),
            outputs: HashMap::new(),
            unspent: HashSet::new(),
            spent_in_mempool: HashSet::new(),
            locked: HashSet::new(),
            mempool: Vec::new(),
            mined: Vec::new(),
            confirmed: HashMap::new(),
            wallet_txs: HashMap::new(),
            accepted: 0,
            calls: HashMap::new(),
            fault: None,
            change_picks: 0,
            conflicted: HashMap::new(),
        };
        let t0 = now() - 600 * START_HEIGHT;
        for h in 0..=START_HEIGHT {
            st.push_block(t0 + 600 * h);
        }
        // The wallet's three confirmed coins, each from its own funding transaction (spending a
        // made-up but well-formed outpoint), confirmed at heights 101..=103.
        for (i, sats) in [50_000_000i64, 25_000_000, 1_000_000]
            .into_iter()
            .enumerate()
        {
            let spk = st.new_key(false);
            let prev = sha256d::Hash::hash(&(i as u64).to_le_bytes()).to_byte_array();
            let tx = Transaction {
                version: Version::TWO,
                lock_time: LockTime::ZERO,
                input: vec![TxIn {
                    previous_output: OutPoint {
                        txid: Txid::from_byte_array(prev),
                        vout: 0,
                    },
                    script_sig: ScriptBuf::from_bytes(vec![0x51]),
                    sequence: Sequence::MAX,
                    witness: Witness::new(),
                }],
                output: vec![TxOut {
                    value: Amount::from_sat(sats as u64),
                    script_pubkey: spk,
                }],
            };
            let txid = tx.compute_txid();
            let height = 101 + i as u64;
            st.confirmed.insert(txid, (height, 1));
            st.add_outputs(&tx);
            let time = st.blocks[height as usize].time;
            st.wallet_txs.insert(
                txid,
                WalletTx {
                    tx,
                    time,
                    from_me: false,
                },
            );
        }
        st
    }

    fn network(&self) -> Network {
        match self.chain.as_str() {
            "main" => Network::Bitcoin,
            "test" => Network::Testnet,
            "testnet4" => Network::Testnet4,
            "signet" => Network::Signet,
            _ => Network::Regtest,
        }
    }

    fn tip(&self) -> u64 {
        self.blocks.len() as u64 - 1
    }

    fn push_block(&mut self, time: u64) {
        let h = self.blocks.len() as u64;
        let mut data = b"bitcoind-double block".to_vec();
        data.extend_from_slice(&h.to_le_bytes());
        let hash = BlockHash::from_byte_array(sha256d::Hash::hash(&data).to_byte_array());
        self.blocks.push(Block { hash, time });
    }

    /// A fresh wallet key; returns its P2WPKH scriptPubKey.
    fn new_key(&mut self, change: bool) -> ScriptBuf {
        let i = self.keys.len() as u64;
        let (sk, pk) = derive_key(&self.secp, "bitcoind-double wallet key", i);
        let spk = p2wpkh(&pk);
        self.mine.insert(spk.clone(), self.keys.len());
        self.keys.push(Key { sk, pk, change });
        spk
    }

    /// A P2WPKH script of a key the wallet does not hold.
    fn foreign_script(&self) -> ScriptBuf {
        let (_, pk) = derive_key(&self.secp, "bitcoind-double foreign key", 0);
        p2wpkh(&pk)
    }

    fn address(&self, spk: &bitcoin::Script) -> Option<String> {
        Address::from_script(spk, self.network())
            .ok()
            .map(|a| a.to_string())
    }

    fn parse_address(&self, text: &str) -> Option<Address> {
        text.parse::<Address<NetworkUnchecked>>()
            .ok()?
            .require_network(self.network())
            .ok()
    }

    fn add_outputs(&mut self, tx: &Transaction) {
        let txid = tx.compute_txid();
        for (vout, out) in tx.output.iter().enumerate() {
            let op = OutPoint {
                txid,
                vout: vout as u32,
            };
            self.outputs.insert(op, out.clone());
            if !out.script_pubkey.is_op_return() {
                self.unspent.insert(op);
            }
        }
    }

    fn is_mine(&self, spk: &ScriptBuf) -> bool {
        self.mine.contains_key(spk)
    }

    /// A coin the node can see (confirmed or mempool output, not spent in a block).
    fn coin(&self, op: &OutPoint) -> Option<&TxOut> {
        if self.unspent.contains(op) || self.spent_in_mempool.contains(op) {
            self.outputs.get(op)
        } else {
            None
        }
    }

    /// Whether the transaction that created `op` is confirmed or the wallet's own.
    fn trusted(&self, txid: &Txid) -> bool {
        self.confirmed.contains_key(txid) || self.wallet_txs.get(txid).is_some_and(|w| w.from_me)
    }

    /// Wallet coins available to fund with, largest first.
    fn spendable(&self) -> Vec<(OutPoint, i64)> {
        let mut coins: Vec<(OutPoint, i64)> = self
            .unspent
            .iter()
            .filter(|op| !self.locked.contains(op) && self.trusted(&op.txid))
            .filter_map(|op| {
                let out = &self.outputs[op];
                self.is_mine(&out.script_pubkey)
                    .then_some((*op, out.value.to_sat() as i64))
            })
            .collect();
        coins.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        coins
    }

    fn balance(&self) -> i64 {
        self.unspent
            .iter()
            .filter(|op| self.trusted(&op.txid))
            .map(|op| &self.outputs[op])
            .filter(|o| self.is_mine(&o.script_pubkey))
            .map(|o| o.value.to_sat() as i64)
            .sum()
    }

    fn mine_blocks(&mut self, count: u64) -> Vec<BlockHash> {
        let mut hashes = Vec::new();
        for k in 0..count {
            let height = self.blocks.len() as u64;
            let time = now().max(self.blocks[height as usize - 1].time + 1);
            self.push_block(time);
            if k == 0 {
                for (i, tx) in std::mem::take(&mut self.mempool).into_iter().enumerate() {
                    for input in &tx.input {
                        self.spent_in_mempool.remove(&input.previous_output);
                    }
                    self.confirmed.insert(tx.compute_txid(), (height, i + 1));
                    self.mined.push(tx);
                }
            }
            hashes.push(self.blocks[height as usize].hash);
        }
        hashes
    }

    fn sign_input(
        &self,
        tx: &Transaction,
        i: usize,
        prev: &TxOut,
        hash_type: EcdsaSighashType,
    ) -> Witness {
        let key = &self.keys[self.mine[&prev.script_pubkey]];
        let sighash = SighashCache::new(tx)
            .p2wpkh_signature_hash(i, &prev.script_pubkey, prev.value, hash_type)
            .unwrap();
        let msg = Message::from_digest(sighash.to_byte_array());
        let signature = self.secp.sign_ecdsa_low_r(&msg, &key.sk);
        let sig = bitcoin::ecdsa::Signature {
            signature,
            sighash_type: hash_type,
        };
        Witness::p2wpkh(&sig, &key.pk.0)
    }

    /// Script verification of input `i` (P2WPKH fully; other script types only for presence).
    fn verify_input(&self, tx: &Transaction, i: usize, prev: &TxOut) -> Result<(), String> {
        let input = &tx.input[i];
        let spk = &prev.script_pubkey;
        if !spk.is_witness_program() {
            if input.script_sig.is_empty() {
                return Err(mandatory("Operation not valid with the current stack size"));
            }
            return Ok(());
        }
        if !input.script_sig.is_empty() {
            return Err(mandatory("Witness requires empty scriptSig"));
        }
        if input.witness.is_empty() {
            return Err(mandatory("Witness program was passed an empty witness"));
        }
        if !spk.is_p2wpkh() {
            return Ok(());
        }
        if input.witness.len() != 2 {
            return Err(mandatory("Witness program hash mismatch"));
        }
        let sig = input.witness.nth(0).unwrap_or_default();
        let pk = input.witness.nth(1).unwrap_or_default();
        if hash160::Hash::hash(pk).as_byte_array()[..] != spk.as_bytes()[2..22] {
            return Err(mandatory("Script failed an OP_EQUALVERIFY operation"));
        }
        let Some((&hash_byte, der)) = sig.split_last() else {
            return Err(mandatory(
                "Script evaluated without error but finished with a false/empty top stack element",
            ));
        };
        let Ok(signature) = bitcoin::secp256k1::ecdsa::Signature::from_der(der) else {
            return Err(mandatory("Non-canonical DER signature"));
        };
        let Ok(hash_type) = EcdsaSighashType::from_standard(u32::from(hash_byte)) else {
            return Err(non_mandatory(
                "Signature hash type missing or not understood",
            ));
        };
        let mut normalized = signature;
        normalized.normalize_s();
        if normalized != signature {
            return Err(non_mandatory(
                "Non-canonical signature: S value is unnecessarily high",
            ));
        }
        if pk.len() != 33 {
            return Err(non_mandatory("Using non-compressed keys in segwit"));
        }
        let nullfail = mandatory("Signature must be zero for failed CHECK(MULTI)SIG operation");
        let Ok(pubkey) = PublicKey::from_slice(pk) else {
            return Err(nullfail);
        };
        let Ok(sighash) =
            SighashCache::new(tx).p2wpkh_signature_hash(i, spk, prev.value, hash_type)
        else {
            return Err(nullfail);
        };
        let msg = Message::from_digest(sighash.to_byte_array());
        self.secp
            .verify_ecdsa(&msg, &signature, &pubkey)
            .map_err(|_| nullfail)
    }

    // --- RPC methods -------------------------------------------------------------------------

    fn getblockchaininfo(&self) -> J {
        let tip = self.tip();
        let b = &self.blocks[tip as usize];
        obj(vec![
            ("chain", s(self.chain.clone())),
            ("blocks", n(tip)),
            ("headers", n(tip)),
            ("bestblockhash", s(b.hash.to_string())),
            ("bits", s("207fffff")),
            (
                "target",
                s("7fffff0000000000000000000000000000000000000000000000000000000000"),
            ),
            ("difficulty", n("4.656542373906925e-10")),
            ("time", n(b.time)),
            ("mediantime", n(b.time.saturating_sub(300))),
            ("verificationprogress", n(1)),
            ("initialblockdownload", J::Bool(false)),
            ("chainwork", s(format!("{:064x}", (tip + 1) * 2))),
            ("size_on_disk", n(250 * (tip + 1))),
            ("pruned", J::Bool(false)),
            ("warnings", J::Arr(vec![])),
        ])
    }

    fn sendrawtransaction(&mut self, p: &[J], drop_conn: &mut bool) -> Result<J, RpcError> {
        match self.fault {
            Some(Fault::DropBeforeSend) => {
                self.fault = None;
                *drop_conn = true;
                return Err(err(RPC_MISC_ERROR, "connection dropped"));
            }
            Some(Fault::DropAfterSend) => {
                self.fault = None;
                *drop_conn = true;
            }
            Some(Fault::RejectSendOnce(code, ref message)) => {
                let e = err(code, message.clone());
                self.fault = None;
                return Err(e);
            }
            _ => {}
        }
        let hex = str_arg(p, 0, "sendrawtransaction")?;
        let max_rate = match arg(p, 1) {
            None => DEFAULT_MAX_FEE_RATE,
            Some(v) => {
                let r = amount_from(v)? as i128;
                if r >= COIN as i128 {
                    return Err(err(
                        RPC_INVALID_PARAMETER,
                        "Fee rates larger than or equal to 1BTC/kvB are not accepted",
                    ));
                }
                r
            }
        };
        let max_burn = match arg(p, 2) {
            None => 0,
            Some(v) => amount_from(v)?,
        };
        let tx = decode_tx(hex, false, true).ok_or_else(|| {
            err(
                RPC_DESERIALIZATION_ERROR,
                "TX decode failed. Make sure the tx has at least one input.",
            )
        })?;
        for out in &tx.output {
            if out.script_pubkey.is_op_return() && out.value.to_sat() as i64 > max_burn {
                return Err(err(
                    RPC_TRANSACTION_ERROR,
                    "Unspendable output exceeds maximum configured by user (maxburnamount)",
                ));
            }
        }
        let txid = tx.compute_txid();
        if self.mempool.iter().any(|m| m.compute_txid() == txid) {
            return Ok(s(txid_hex(&txid)));
        }
        if self.confirmed.contains_key(&txid)
            && (0..tx.output.len() as u32).any(|vout| self.coin(&OutPoint { txid, vout }).is_some())
        {
            return Err(err(
                RPC_TRANSACTION_ALREADY_IN_CHAIN,
                "Transaction outputs already in utxo set",
            ));
        }
        let rejected = |reason: &str| err(RPC_TRANSACTION_REJECTED, reason);
        // CheckTransaction and IsStandardTx.
        if tx.input.is_empty() {
            return Err(rejected("bad-txns-vin-empty"));
        }
        if tx.output.is_empty() {
            return Err(rejected("bad-txns-vout-empty"));
        }
        let distinct: HashSet<OutPoint> = tx.input.iter().map(|i| i.previous_output).collect();
        if distinct.len() != tx.input.len() {
            return Err(rejected("bad-txns-inputs-duplicate"));
        }
        if tx
            .output
            .iter()
            .any(|o| o.value.to_sat() as i64 > MAX_MONEY)
        {
            return Err(rejected("bad-txns-vout-toolarge"));
        }
        if !(1..=3).contains(&tx.version.0) {
            return Err(rejected("version"));
        }
        let mut op_returns = 0;
        for out in &tx.output {
            let spk = &out.script_pubkey;
            if spk.is_op_return() {
                op_returns += 1;
                if spk.len() > 83 {
                    return Err(rejected("scriptpubkey"));
                }
            } else if !(spk.is_p2pkh()
                || spk.is_p2sh()
                || spk.is_p2wpkh()
                || spk.is_p2wsh()
                || spk.is_p2tr())
            {
                return Err(rejected("scriptpubkey"));
            } else if (out.value.to_sat() as i64) < dust_threshold(out) {
                return Err(rejected("dust"));
            }
        }
        if op_returns > 1 {
            return Err(rejected("multi-op-return"));
        }
        // Inputs.
        let mut prevs = Vec::new();
        for input in &tx.input {
            let op = input.previous_output;
            if !self.unspent.contains(&op) {
                return Err(err(RPC_TRANSACTION_ERROR, "bad-txns-inputs-missingorspent"));
            }
            prevs.push(self.outputs[&op].clone());
        }
        let in_sum: i64 = prevs.iter().map(|o| o.value.to_sat() as i64).sum();
        let out_sum: i64 = tx.output.iter().map(|o| o.value.to_sat() as i64).sum();
        if in_sum < out_sum {
            return Err(rejected("bad-txns-in-belowout"));
        }
        let fee = in_sum - out_sum;
        let vsize = tx.vsize();
        let min_fee = fee_at(MIN_RELAY_FEE_RATE, vsize);
        if fee < min_fee {
            return Err(rejected(&format!(
                "min relay fee not met, {fee} < {min_fee}"
            )));
        }
        for (i, prev) in prevs.iter().enumerate() {
            self.verify_input(&tx, i, prev)
                .map_err(|reason| rejected(&reason))?;
        }
        if max_rate > 0 && fee as i128 > max_rate * vsize as i128 / 1000 {
            return Err(err(
                RPC_TRANSACTION_ERROR,
                "Fee exceeds maximum configured by user (e.g. -maxtxfee, maxfeerate)",
            ));
        }
        // Accepted.
        let from_me = prevs.iter().any(|o| self.is_mine(&o.script_pubkey));
        let to_me = tx.output.iter().any(|o| self.is_mine(&o.script_pubkey));
        for input in &tx.input {
            self.unspent.remove(&input.previous_output);
            self.locked.remove(&input.previous_output);
            self.spent_in_mempool.insert(input.previous_output);
        }
        self.add_outputs(&tx);
        if from_me || to_me {
            self.wallet_txs.insert(
                txid,
                WalletTx {
                    tx: tx.clone(),
                    time: now(),
                    from_me,
                },
            );
        }
        self.mempool.push(tx);
        self.accepted += 1;
        Ok(s(txid_hex(&txid)))
    }

    fn createrawtransaction(&self, p: &[J]) -> Result<J, RpcError> {
        let inputs = match arg(p, 0) {
            Some(J::Arr(items)) => items,
            Some(other) => return Err(type_err(other, "array")),
            None => return Err(usage("createrawtransaction")),
        };
        let outputs = arg(p, 1).ok_or_else(|| usage("createrawtransaction"))?;
        let lock_time = match arg(p, 2) {
            None => 0,
            Some(v) => {
                let l = int_of(v)?;
                u32::try_from(l).map_err(|_| {
                    err(
                        RPC_INVALID_PARAMETER,
                        "Invalid parameter, locktime out of range",
                    )
                })?
            }
        };
        let rbf = match arg(p, 3) {
            None => false,
            Some(v) => bool_of(v)?,
        };
        let mut tx = Transaction {
            version: Version::TWO,
            lock_time: LockTime::from_consensus(lock_time),
            input: Vec::new(),
            output: Vec::new(),
        };
        for input in inputs {
            let J::Obj(_) = input else {
                return Err(type_err(input, "object"));
            };
            let txid = parse_txid(input.get("txid").unwrap_or(&J::Null))?;
            let vout = match input.get("vout") {
                Some(v @ J::Num(_)) => int_of(v)?,
                _ => {
                    return Err(err(
                        RPC_INVALID_PARAMETER,
                        "Invalid parameter, missing vout key",
                    ));
                }
            };
            if vout < 0 {
                return Err(err(
                    RPC_INVALID_PARAMETER,
                    "Invalid parameter, vout cannot be negative",
                ));
            }
            let default_seq = if rbf {
                0xFFFF_FFFD
            } else if lock_time != 0 {
                0xFFFF_FFFE
            } else {
                0xFFFF_FFFF
            };
            let sequence = match input.get("sequence") {
                None => default_seq,
                Some(v) => u32::try_from(int_of(v)?).map_err(|_| {
                    err(
                        RPC_INVALID_PARAMETER,
                        "Invalid parameter, sequence number is out of range",
                    )
                })?,
            };
            tx.input.push(TxIn {
                previous_output: OutPoint {
                    txid,
                    vout: vout as u32,
                },
                script_sig: ScriptBuf::new(),
                sequence: Sequence(sequence),
                witness: Witness::new(),
            });
        }
        // An array of one-key objects is flattened into one object, duplicates kept.
        let pairs: Vec<(String, J)> = match outputs {
            J::Obj(kv) => kv.clone(),
            J::Arr(items) => {
                let mut kv = Vec::new();
                for item in items {
                    let J::Obj(one) = item else {
                        return Err(err(
                            RPC_INVALID_PARAMETER,
                            "Invalid parameter, key-value pair not an object as expected",
                        ));
                    };
                    if one.len() != 1 {
                        return Err(err(
                            RPC_INVALID_PARAMETER,
                            "Invalid parameter, key-value pair must contain exactly one key",
                        ));
                    }
                    kv.extend(one.iter().cloned());
                }
                kv
            }
            other => return Err(type_err(other, "array")),
        };
        let mut has_data = false;
        let mut seen = HashSet::new();
        for (key, value) in &pairs {
            if key == "data" {
                if has_data {
                    return Err(err(
                        RPC_INVALID_PARAMETER,
                        "Invalid parameter, duplicate key: data",
                    ));
                }
                has_data = true;
                let text = match value {
                    J::Str(t) | J::Num(t) => t.clone(),
                    _ => String::new(),
                };
                let data = hex_bytes(&text).ok_or_else(|| {
                    err(
                        RPC_INVALID_PARAMETER,
                        format!("Data must be hexadecimal string (not '{text}')"),
                    )
                })?;
                let push = PushBytesBuf::try_from(data)
                    .map_err(|_| err(RPC_INVALID_PARAMETER, "Data too large"))?;
                tx.output.push(TxOut {
                    value: Amount::ZERO,
                    script_pubkey: ScriptBuf::new_op_return(push),
                });
            } else {
                let address = self.parse_address(key).ok_or_else(|| {
                    err(
                        RPC_INVALID_ADDRESS_OR_KEY,
                        format!("Invalid Bitcoin address: {key}"),
                    )
                })?;
                let spk = address.script_pubkey();
                if !seen.insert(spk.clone()) {
                    return Err(err(
                        RPC_INVALID_PARAMETER,
                        format!("Invalid parameter, duplicated address: {key}"),
                    ));
                }
                let sats = amount_from(value)?;
                tx.output.push(TxOut {
                    value: Amount::from_sat(sats as u64),
                    script_pubkey: spk,
                });
            }
        }
        Ok(s(encode_tx(&tx)))
    }

    fn fundrawtransaction(&mut self, p: &[J]) -> Result<J, RpcError> {
        let hex = str_arg(p, 0, "fundrawtransaction")?;
        let mut fee_rate = None;
        let mut change_position = None;
        let mut change_script = None;
        let mut lock_unspents = false;
        let mut add_inputs = true;
        match arg(p, 1) {
            None | Some(J::Bool(_)) => {}
            Some(J::Obj(kv)) => {
                const KNOWN: &[&str] = &[
                    "add_inputs",
                    "include_unsafe",
                    "minconf",
                    "maxconf",
                    "changeAddress",
                    "changePosition",
                    "change_type",
                    "includeWatching",
                    "lockUnspents",
                    "fee_rate",
                    "feeRate",
                    "subtractFeeFromOutputs",
                    "replaceable",
                    "conf_target",
                    "estimate_mode",
                    "input_weights",
                    "solving_data",
                    "max_tx_weight",
                ];
                if let Some((k, _)) = kv.iter().find(|(k, _)| !KNOWN.contains(&k.as_str())) {
                    return Err(err(RPC_TYPE_ERROR, format!("Unexpected key {k}")));
                }
                let opts = J::Obj(kv.clone());
                let present = |k: &str| opts.get(k).filter(|v| **v != J::Null);
                if present("fee_rate").is_some() && present("feeRate").is_some() {
                    return Err(err(
                        RPC_INVALID_PARAMETER,
                        "Cannot specify both fee_rate (sat/vB) and feeRate (BTC/kvB)",
                    ));
                }
                if let Some(v) = present("fee_rate") {
                    let text = match v {
                        J::Num(t) | J::Str(t) => t,
                        other => return Err(type_err(other, "number")),
                    };
                    let r = parse_fixed(text, 3)
                        .filter(|r| *r >= 0)
                        .ok_or_else(|| err(RPC_TYPE_ERROR, "Invalid amount"))?;
                    fee_rate = Some(r);
                }
                if let Some(v) = present("feeRate") {
                    fee_rate = Some(amount_from(v)? as i128);
                }
                if let Some(v) = present("changePosition") {
                    change_position = Some(int_of(v)?);
                }
                if let Some(v) = present("changeAddress") {
                    let J::Str(a) = v else {
                        return Err(type_err(v, "string"));
                    };
                    let address = self.parse_address(a).ok_or_else(|| {
                        err(
                            RPC_INVALID_ADDRESS_OR_KEY,
                            "Change address must be a valid bitcoin address",
                        )
                    })?;
                    change_script = Some(address.script_pubkey());
                }
                if let Some(v) = present("lockUnspents") {
                    lock_unspents = bool_of(v)?;
                }
                if let Some(v) = present("add_inputs") {
                    add_inputs = bool_of(v)?;
                }
                if let Some(J::Arr(a)) = present("subtractFeeFromOutputs")
                    && !a.is_empty()
                {
                    return Err(err(
                        RPC_INVALID_PARAMETER,
                        "subtractFeeFromOutputs is not implemented by the double",
                    ));
                }
            }
            Some(other) => return Err(type_err(other, "object")),
        }
        let mut tx = decode_tx(hex, true, true)
            .ok_or_else(|| err(RPC_DESERIALIZATION_ERROR, "TX decode failed"))?;
        if let Some(pos) = change_position
            && (pos < 0 || pos as usize > tx.output.len())
        {
            return Err(err(RPC_INVALID_PARAMETER, "changePosition out of bounds"));
        }
        let rate = fee_rate.unwrap_or(DEFAULT_FEE_RATE);
        if rate < MIN_RELAY_FEE_RATE {
            return Err(err(
                RPC_WALLET_ERROR,
                format!(
                    "Fee rate ({}.{:03} sat/vB) is lower than the minimum fee rate setting (1.000 sat/vB)",
                    rate / 1000,
                    rate % 1000
                ),
            ));
        }
        for out in &tx.output {
            if !out.script_pubkey.is_op_return()
                && (out.value.to_sat() as i64) < dust_threshold(out)
            {
                return Err(err(RPC_TRANSACTION_ERROR, "Transaction amount too small"));
            }
        }
        if matches!(self.fault, Some(Fault::ForeignOutput)) {
            tx.output.push(TxOut {
                value: Amount::from_sat(FOREIGN_OUTPUT_SATS as u64),
                script_pubkey: self.foreign_script(),
            });
        }
        let forced_fee = match self.fault {
            Some(Fault::Fee(f)) => Some(f as i64),
            _ => None,
        };
        // Pre-selected inputs must be wallet coins.
        let mut in_sum = 0i64;
        for input in &tx.input {
            let op = input.previous_output;
            let Some(out) = self.outputs.get(&op).filter(|_| self.unspent.contains(&op)) else {
                return Err(err(
                    RPC_WALLET_ERROR,
                    format!("Not found pre-selected input {}", outpoint_str(&op)),
                ));
            };
            if !self.is_mine(&out.script_pubkey) {
                return Err(err(
                    RPC_WALLET_ERROR,
                    format!("Not solvable pre-selected input {}", outpoint_str(&op)),
                ));
            }
            in_sum += out.value.to_sat() as i64;
        }
        let out_sum: i64 = tx.output.iter().map(|o| o.value.to_sat() as i64).sum();
        let mut pool = if add_inputs {
            self.spendable()
        } else {
            Vec::new()
        }
        .into_iter()
        .filter(|(op, _)| !tx.input.iter().any(|i| i.previous_output == *op))
        .collect::<Vec<_>>()
        .into_iter();
        let change_spk = change_script
            .clone()
            .unwrap_or_else(|| ScriptBuf::from(vec![0u8; 22]));
        // vsize once every input carries a low-R P2WPKH signature (71 bytes) and a pubkey.
        let signed_vsize = |tx: &Transaction| {
            let mut t = tx.clone();
            for i in &mut t.input {
                i.witness = Witness::from_slice(&[vec![0u8; 71], vec![2u8; 33]]);
            }
            t.vsize()
        };
        let change = loop {
            let fee_without = forced_fee.unwrap_or_else(|| fee_at(rate, signed_vsize(&tx)));
            let mut with = tx.clone();
            with.output.push(TxOut {
                value: Amount::ZERO,
                script_pubkey: change_spk.clone(),
            });
            let fee_with = forced_fee.unwrap_or_else(|| fee_at(rate, signed_vsize(&with)));
            if in_sum >= out_sum + fee_with + P2WPKH_DUST {
                break Some(in_sum - out_sum - fee_with);
            }
            if in_sum >= out_sum + fee_without
                && !tx.input.is_empty()
                && (forced_fee.is_none() || in_sum == out_sum + fee_without)
            {
                break None;
            }
            match pool.next() {
                Some((op, value)) => {
                    in_sum += value;
                    tx.input.push(TxIn {
                        previous_output: op,
                        script_sig: ScriptBuf::new(),
                        sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                        witness: Witness::new(),
                    });
                }
                None if !add_inputs => {
                    return Err(err(
                        RPC_WALLET_ERROR,
                        "The preselected coins total amount does not cover the transaction target. Please allow other inputs to be automatically selected or include more coins manually",
                    ));
                }
                None => return Err(err(RPC_WALLET_ERROR, "Insufficient funds")),
            }
        };
        let mut changepos = -1i64;
        if let Some(value) = change {
            let spk = match change_script {
                Some(spk) => spk,
                None => self.new_key(true),
            };
            let pos = match change_position {
                Some(pos) => pos as usize,
                None => {
                    self.change_picks += 1;
                    if self.change_picks % 2 == 1 {
                        0
                    } else {
                        tx.output.len()
                    }
                }
            };
            tx.output.insert(
                pos,
                TxOut {
                    value: Amount::from_sat(value as u64),
                    script_pubkey: spk,
                },
            );
            changepos = pos as i64;
        }
        let total_out: i64 = tx.output.iter().map(|o| o.value.to_sat() as i64).sum();
        let fee = in_sum - total_out;
        if forced_fee.is_none() && fee > MAX_TX_FEE {
            return Err(err(
                RPC_WALLET_ERROR,
                "Fee exceeds maximum configured by user (e.g. -maxtxfee, maxfeerate)",
            ));
        }
        if lock_unspents {
            for input in &tx.input {
                self.locked.insert(input.previous_output);
            }
        }
        Ok(obj(vec![
            ("hex", s(encode_tx(&tx))),
            ("fee", amt(fee)),
            ("changepos", n(changepos)),
        ]))
    }

    fn signrawtransactionwithwallet(&self, p: &[J]) -> Result<J, RpcError> {
        let hex = str_arg(p, 0, "signrawtransactionwithwallet")?;
        let mut tx = decode_tx(hex, true, true).ok_or_else(|| {
            err(
                RPC_DESERIALIZATION_ERROR,
                "TX decode failed. Make sure the tx has at least one input.",
            )
        })?;
        let hash_type = match arg(p, 2) {
            None => EcdsaSighashType::All,
            Some(J::Str(name)) => sighash_type_of(name).ok_or_else(|| {
                err(
                    RPC_INVALID_PARAMETER,
                    format!("'{name}' is not a valid sighash parameter."),
                )
            })?,
            Some(other) => return Err(type_err(other, "string")),
        };
        if matches!(self.fault, Some(Fault::TamperOnSign)) {
            for out in &mut tx.output {
                if out.script_pubkey.is_op_return() && out.script_pubkey.len() >= 3 {
                    let mut bytes = out.script_pubkey.to_bytes();
                    let last = bytes.len() - 1;
                    bytes[last] ^= 0x01;
                    out.script_pubkey = ScriptBuf::from_bytes(bytes);
                }
            }
        }
        let unsigned = tx.clone();
        let mut errors = Vec::new();
        for i in 0..tx.input.len() {
            let op = tx.input[i].previous_output;
            let problem = match self.coin(&op) {
                None => Some("Input not found or already spent".to_string()),
                Some(prev) if self.is_mine(&prev.script_pubkey) => {
                    tx.input[i].witness = self.sign_input(&unsigned, i, prev, hash_type);
                    None
                }
                Some(prev) => self.verify_input(&tx, i, prev).err().map(|e| {
                    e.trim_start_matches("mandatory-script-verify-flag-failed (")
                        .trim_start_matches("non-mandatory-script-verify-flag (")
                        .trim_end_matches(')')
                        .to_string()
                }),
            };
            if let Some(problem) = problem {
                let input = &tx.input[i];
                errors.push(obj(vec![
                    ("txid", s(txid_hex(&op.txid))),
                    ("vout", n(op.vout)),
                    (
                        "witness",
                        J::Arr(
                            input
                                .witness
                                .iter()
                                .map(|w| s(w.to_lower_hex_string()))
                                .collect(),
                        ),
                    ),
                    ("scriptSig", s(input.script_sig.to_hex_string())),
                    ("sequence", n(input.sequence.0)),
                    ("error", s(problem)),
                ]));
            }
        }
        let mut reply = vec![
            ("hex", s(encode_tx(&tx))),
            ("complete", J::Bool(errors.is_empty())),
        ];
        if !errors.is_empty() {
            reply.push(("errors", J::Arr(errors)));
        }
        Ok(obj(reply))
    }

    fn getwalletinfo(&self) -> J {
        let tip = self.tip();
        obj(vec![
            ("walletname", s(self.wallet.clone())),
            ("walletversion", n(169_900)),
            ("format", s("sqlite")),
            ("balance", amt(self.balance())),
            ("unconfirmed_balance", amt(0)),
            ("immature_balance", amt(0)),
            ("txcount", n(self.wallet_txs.len())),
            ("keypoolsize", n(1000)),
            ("keypoolsize_hd_internal", n(1000)),
            ("paytxfee", amt(0)),
            ("private_keys_enabled", J::Bool(true)),
            ("avoid_reuse", J::Bool(false)),
            ("scanning", J::Bool(false)),
            ("descriptors", J::Bool(true)),
            ("external_signer", J::Bool(false)),
            ("blank", J::Bool(false)),
            ("birthtime", n(self.blocks[0].time)),
            (
                "lastprocessedblock",
                obj(vec![
                    ("hash", s(self.blocks[tip as usize].hash.to_string())),
                    ("height", n(tip)),
                ]),
            ),
        ])
    }

    fn getaddressinfo(&self, p: &[J]) -> Result<J, RpcError> {
        let text = str_arg(p, 0, "getaddressinfo")?;
        let address = self
            .parse_address(text)
            .ok_or_else(|| err(RPC_INVALID_ADDRESS_OR_KEY, "Invalid address"))?;
        let spk = address.script_pubkey();
        let key = self.mine.get(&spk).map(|i| &self.keys[*i]);
        let mut info = vec![
            ("address", s(address.to_string())),
            ("scriptPubKey", s(spk.to_hex_string())),
            ("ismine", J::Bool(key.is_some())),
            ("solvable", J::Bool(key.is_some())),
            ("iswatchonly", J::Bool(false)),
            ("isscript", J::Bool(spk.is_p2sh() || spk.is_p2wsh())),
            ("iswitness", J::Bool(spk.is_witness_program())),
        ];
        if let Some(version) = spk.witness_version() {
            info.push(("witness_version", n(version.to_num())));
            info.push((
                "witness_program",
                s(spk.as_bytes()[2..].to_lower_hex_string()),
            ));
        }
        if let Some(key) = key {
            info.push(("pubkey", s(key.pk.to_bytes().to_lower_hex_string())));
            info.push(("ischange", J::Bool(key.change)));
            let labels = if key.change { vec![] } else { vec![s("")] };
            info.push(("labels", J::Arr(labels)));
        } else {
            info.push(("ischange", J::Bool(false)));
            info.push(("labels", J::Arr(vec![])));
        }
        Ok(obj(info))
    }

    /// `gettxout txid n (include_mempool=true)`: the coin, or null when it is spent (by the
    /// mempool too, unless include_mempool is false) or never existed.
    fn gettxout(&self, p: &[J]) -> Result<J, RpcError> {
        let txid = parse_txid(arg(p, 0).ok_or_else(|| usage("gettxout"))?)?;
        let vout = arg(p, 1)
            .and_then(|v| match v {
                J::Num(x) => x.parse::<u32>().ok(),
                _ => None,
            })
            .ok_or_else(|| usage("gettxout"))?;
        let include_mempool = !matches!(arg(p, 2), Some(J::Bool(false)));
        let op = OutPoint { txid, vout };
        let unspent =
            self.unspent.contains(&op) || (!include_mempool && self.spent_in_mempool.contains(&op));
        let Some(out) = self.outputs.get(&op).filter(|_| unspent) else {
            return Ok(J::Null);
        };
        let confirmations = self
            .confirmed
            .get(&txid)
            .map_or(0, |(h, _)| self.tip() - h + 1);
        let tip = self.tip();
        Ok(obj(vec![
            ("bestblock", s(self.blocks[tip as usize].hash.to_string())),
            ("confirmations", n(confirmations)),
            ("value", amt(out.value.to_sat() as i64)),
            (
                "scriptPubKey",
                obj(vec![("hex", s(out.script_pubkey.to_hex_string()))]),
            ),
            ("coinbase", J::Bool(false)),
        ]))
    }

    fn gettransaction(&self, p: &[J]) -> Result<J, RpcError> {
        let txid = parse_txid(arg(p, 0).ok_or_else(|| usage("gettransaction"))?)?;
        let wtx = self.wallet_txs.get(&txid).ok_or_else(|| {
            err(
                RPC_INVALID_ADDRESS_OR_KEY,
                "Invalid or non-wallet transaction id",
            )
        })?;
        let tx = &wtx.tx;
        let value = |o: &TxOut| o.value.to_sat() as i64;
        let credit: i64 = tx
            .output
            .iter()
            .filter(|o| self.is_mine(&o.script_pubkey))
            .map(value)
            .sum();
        let out_sum: i64 = tx.output.iter().map(value).sum();
        let debit: i64 = tx
            .input
            .iter()
            .filter_map(|i| self.outputs.get(&i.previous_output))
            .filter(|o| self.is_mine(&o.script_pubkey))
            .map(value)
            .sum();
        let mut info = Vec::new();
        if wtx.from_me {
            info.push(("amount", amt(credit - out_sum)));
            info.push(("fee", amt(out_sum - debit)));
        } else {
            info.push(("amount", amt(credit)));
        }
        match self.confirmed.get(&txid) {
            _ if self.conflicted.contains_key(&txid) => {
                let depth = self.conflicted[&txid];
                info.push(("confirmations", n(format!("-{depth}"))));
            }
            Some(&(height, index)) => {
                let block = &self.blocks[height as usize];
                info.push(("confirmations", n(self.tip() - height + 1)));
                info.push(("blockhash", s(block.hash.to_string())));
                info.push(("blockheight", n(height)));
                info.push(("blockindex", n(index)));
                info.push(("blocktime", n(block.time)));
            }
            None => {
                info.push(("confirmations", n(0)));
                info.push(("trusted", J::Bool(wtx.from_me)));
            }
        }
        let in_mempool = !self.confirmed.contains_key(&txid);
        let signals = tx.input.iter().any(|i| i.sequence.0 <= 0xFFFF_FFFD);
        info.extend([
            ("txid", s(txid_hex(&txid))),
            ("wtxid", s(tx.compute_wtxid().to_string())),
            ("walletconflicts", J::Arr(vec![])),
            ("mempoolconflicts", J::Arr(vec![])),
            ("time", n(wtx.time)),
            ("timereceived", n(wtx.time)),
            (
                "bip125-replaceable",
                s(if in_mempool && signals { "yes" } else { "no" }),
            ),
            ("details", J::Arr(vec![])),
            ("hex", s(encode_tx(tx))),
        ]);
        Ok(obj(info))
    }

    fn getnewaddress(&mut self, p: &[J]) -> Result<J, RpcError> {
        if let Some(label) = arg(p, 0)
            && !matches!(label, J::Str(_))
        {
            return Err(type_err(label, "string"));
        }
        match arg(p, 1) {
            None => {}
            Some(J::Str(t)) if t == "bech32" => {}
            Some(J::Str(t)) => {
                return Err(err(
                    RPC_INVALID_ADDRESS_OR_KEY,
                    format!("Unknown address type '{t}'"),
                ));
            }
            Some(other) => return Err(type_err(other, "string")),
        }
        let spk = self.new_key(false);
        Ok(s(self.address(&spk).unwrap()))
    }

    fn generatetoaddress(&mut self, p: &[J]) -> Result<J, RpcError> {
        let count = int_of(arg(p, 0).ok_or_else(|| usage("generatetoaddress"))?)?;
        let address = str_arg(p, 1, "generatetoaddress")?;
        if self.parse_address(address).is_none() {
            return Err(err(RPC_INVALID_ADDRESS_OR_KEY, "Error: Invalid address"));
        }
        let hashes = self.mine_blocks(count.max(0) as u64);
        Ok(J::Arr(hashes.iter().map(|h| s(h.to_string())).collect()))
    }
}

fn parse_txid(v: &J) -> Result<Txid, RpcError> {
    let J::Str(t) = v else {
        return Err(type_err(v, "string"));
    };
    if t.len() != 64 {
        return Err(err(
            RPC_INVALID_PARAMETER,
            format!("txid must be of length 64 (not {}, for '{t}')", t.len()),
        ));
    }
    t.parse::<Txid>().map_err(|_| {
        err(
            RPC_INVALID_PARAMETER,
            format!("txid must be hexadecimal string (not '{t}')"),
        )
    })
}

const NODE_METHODS: &[&str] = &[
    "getblockchaininfo",
    "sendrawtransaction",
    "createrawtransaction",
    "generatetoaddress",
    "gettxout",
];
const WALLET_METHODS: &[&str] = &[
    "getwalletinfo",
    "fundrawtransaction",
    "signrawtransactionwithwallet",
    "getaddressinfo",
    "gettransaction",
    "getnewaddress",
];

fn param_names(method: &str) -> Option<&'static [&'static str]> {
    Some(match method {
        "getblockchaininfo" | "getwalletinfo" => &[],
        "sendrawtransaction" => &["hexstring", "maxfeerate", "maxburnamount"],
        "createrawtransaction" => &["inputs", "outputs", "locktime", "replaceable"],
        "generatetoaddress" => &["nblocks", "address", "maxtries"],
        "fundrawtransaction" => &["hexstring", "options", "iswitness"],
        "signrawtransactionwithwallet" => &["hexstring", "prevtxs", "sighashtype"],
        "getaddressinfo" => &["address"],
        "gettransaction" => &["txid", "include_watchonly", "verbose"],
        "getnewaddress" => &["label", "address_type"],
        "gettxout" => &["txid", "n", "include_mempool"],
        _ => return None,
    })
}

/// Runs one call. `wallet` is the wallet named by the URI (`None` for `/`).
fn dispatch(
    st: &mut State,
    method: &str,
    params: &J,
    wallet: Option<&str>,
    drop_conn: &mut bool,
) -> Result<J, RpcError> {
    let names = param_names(method).ok_or_else(|| err(RPC_METHOD_NOT_FOUND, "Method not found"))?;
    let p: Vec<J> = match params {
        J::Arr(items) => items.clone(),
        J::Obj(kv) => {
            let mut p = Vec::new();
            for (k, v) in kv {
                let i = names.iter().position(|n| n == k).ok_or_else(|| {
                    err(
                        RPC_INVALID_PARAMETER,
                        format!("Unknown named parameter {k}"),
                    )
                })?;
                if p.len() <= i {
                    p.resize(i + 1, J::Null);
                }
                p[i] = v.clone();
            }
            p
        }
        _ => Vec::new(),
    };
    if p.len() > names.len() {
        return Err(usage(method));
    }
    if WALLET_METHODS.contains(&method) {
        match wallet {
            None => {
                return Err(err(
                    RPC_WALLET_NOT_SPECIFIED,
                    "Wallet file not specified (must request wallet RPC through /wallet/<filename> uri-path).",
                ));
            }
            Some(w) if w != st.wallet => {
                return Err(err(
                    RPC_WALLET_NOT_FOUND,
                    "Requested wallet does not exist or is not loaded",
                ));
            }
            Some(_) => {}
        }
    }
    debug_assert!(NODE_METHODS.contains(&method) || WALLET_METHODS.contains(&method));
    match method {
        "getblockchaininfo" => Ok(st.getblockchaininfo()),
        "sendrawtransaction" => st.sendrawtransaction(&p, drop_conn),
        "createrawtransaction" => st.createrawtransaction(&p),
        "generatetoaddress" => st.generatetoaddress(&p),
        "getwalletinfo" => Ok(st.getwalletinfo()),
        "fundrawtransaction" => st.fundrawtransaction(&p),
        "signrawtransactionwithwallet" => st.signrawtransactionwithwallet(&p),
        "getaddressinfo" => st.getaddressinfo(&p),
        "gettransaction" => st.gettransaction(&p),
        "getnewaddress" => st.getnewaddress(&p),
        "gettxout" => st.gettxout(&p),
        _ => Err(err(RPC_METHOD_NOT_FOUND, "Method not found")),
    }
}

// ---------------------------------------------------------------------------------------------
// JSON-RPC over HTTP (Core's httprpc.cpp and rpc/request.cpp).

#[derive(Clone, Copy, PartialEq)]
enum Version2 {
    Legacy,
    V2,
}

struct RpcRequest {
    /// `None` when the request has no "id" key.
    id: Option<J>,
    version: Version2,
    method: String,
    params: J,
}

/// Parses one request object; on failure, the error with whatever id/version was read.
fn parse_request(v: &J) -> Result<RpcRequest, (Option<J>, Version2, RpcError)> {
    let J::Obj(_) = v else {
        return Err((
            None,
            Version2::Legacy,
            err(RPC_INVALID_REQUEST, "Invalid Request object"),
        ));
    };
    let id = v.get("id").cloned();
    let fail = |version, e| Err((id.clone(), version, e));
    let version = match v.get("jsonrpc") {
        None | Some(J::Null) => Version2::Legacy,
        Some(J::Str(t)) if t == "1.0" => Version2::Legacy,
        Some(J::Str(t)) if t == "2.0" => Version2::V2,
        Some(J::Str(_)) => {
            return fail(
                Version2::Legacy,
                err(RPC_INVALID_REQUEST, "JSON-RPC version not supported"),
            );
        }
        Some(_) => {
            return fail(
                Version2::Legacy,
                err(RPC_INVALID_REQUEST, "jsonrpc field must be a string"),
            );
        }
    };
    let method = match v.get("method") {
        None | Some(J::Null) => return fail(version, err(RPC_INVALID_REQUEST, "Missing method")),
        Some(J::Str(m)) => m.clone(),
        Some(_) => {
            return fail(version, err(RPC_INVALID_REQUEST, "Method must be a string"));
        }
    };
    let params = match v.get("params") {
        None | Some(J::Null) => J::Arr(vec![]),
        Some(p @ (J::Arr(_) | J::Obj(_))) => p.clone(),
        Some(_) => {
            return fail(
                version,
                err(RPC_INVALID_REQUEST, "Params must be an array or object"),
            );
        }
    };
    Ok(RpcRequest {
        id,
        version,
        method,
        params,
    })
}

fn error_obj(e: &RpcError) -> J {
    obj(vec![("code", n(e.code)), ("message", s(e.message.clone()))])
}

fn reply_obj(result: Result<J, RpcError>, id: Option<J>, version: Version2) -> J {
    let id = id.unwrap_or(J::Null);
    match (version, result) {
        (Version2::Legacy, Ok(r)) => obj(vec![("result", r), ("error", J::Null), ("id", id)]),
        (Version2::Legacy, Err(e)) => obj(vec![
            ("result", J::Null),
            ("error", error_obj(&e)),
            ("id", id),
        ]),
        (Version2::V2, Ok(r)) => obj(vec![("jsonrpc", s("2.0")), ("result", r), ("id", id)]),
        (Version2::V2, Err(e)) => obj(vec![
            ("jsonrpc", s("2.0")),
            ("error", error_obj(&e)),
            ("id", id),
        ]),
    }
}

fn status_for(code: i64) -> u16 {
    match code {
        RPC_INVALID_REQUEST => 400,
        RPC_METHOD_NOT_FOUND => 404,
        _ => 500,
    }
}

struct Response {
    status: u16,
    content_type: Option<&'static str>,
    extra: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

const TEXT_HTML: &str = "text/html; charset=ISO-8859-1";

fn json_response(status: u16, body: &J) -> Response {
    Response {
        status,
        content_type: Some("application/json"),
        extra: Vec::new(),
        body: format!("{}\n", body.text()).into_bytes(),
    }
}

fn plain_response(status: u16, body: &str) -> Response {
    Response {
        status,
        content_type: (!body.is_empty()).then_some(TEXT_HTML),
        extra: Vec::new(),
        body: body.as_bytes().to_vec(),
    }
}

enum Outcome {
    Reply(Response),
    /// Close the connection without answering.
    Drop,
}

/// Counts the methods a body names (for `calls`), whether or not it is then served.
fn count_calls(st: &mut State, body: &J) {
    let items: Vec<&J> = match body {
        J::Arr(items) => items.iter().collect(),
        other => vec![other],
    };
    for item in items {
        if let Some(J::Str(m)) = item.get("method") {
            *st.calls.entry(m.clone()).or_default() += 1;
        }
    }
}

/// Serves the JSON-RPC body of an authorized POST.
fn serve_rpc(state: &Mutex<State>, wallet: Option<&str>, body: &[u8]) -> Outcome {
    let Ok(request) = serde_json::from_slice::<J>(body) else {
        let e = err(RPC_PARSE_ERROR, "Parse error");
        return Outcome::Reply(json_response(
            500,
            &reply_obj(Err(e), None, Version2::Legacy),
        ));
    };
    let mut st = state.lock().unwrap();
    let mut drop_conn = false;
    let response = match &request {
        J::Obj(_) => match parse_request(&request) {
            Err((id, version, e)) => {
                json_response(status_for(e.code), &reply_obj(Err(e), id, version))
            }
            Ok(req) => {
                let result = dispatch(&mut st, &req.method, &req.params, wallet, &mut drop_conn);
                match (req.version, &result) {
                    (Version2::V2, _) if req.id.is_none() => plain_response(204, ""),
                    (Version2::V2, _) => {
                        json_response(200, &reply_obj(result, req.id, req.version))
                    }
                    (Version2::Legacy, Ok(_)) => {
                        json_response(200, &reply_obj(result, req.id, req.version))
                    }
                    (Version2::Legacy, Err(e)) => {
                        let status = status_for(e.code);
                        json_response(status, &reply_obj(result, req.id, req.version))
                    }
                }
            }
        },
        J::Arr(items) => {
            let mut replies = Vec::new();
            for item in items {
                match parse_request(item) {
                    Err((id, version, e)) => replies.push(reply_obj(Err(e), id, version)),
                    Ok(req) => {
                        let result =
                            dispatch(&mut st, &req.method, &req.params, wallet, &mut drop_conn);
                        if !(req.version == Version2::V2 && req.id.is_none()) {
                            replies.push(reply_obj(result, req.id, req.version));
                        }
                    }
                }
            }
            json_response(200, &J::Arr(replies))
        }
        _ => {
            let e = err(RPC_PARSE_ERROR, "Top-level object parse error");
            json_response(500, &reply_obj(Err(e), None, Version2::Legacy))
        }
    };
    if drop_conn {
        Outcome::Drop
    } else {
        Outcome::Reply(response)
    }
}

fn percent_decode(text: &str) -> String {
    let b = text.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(hi), Some(lo)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct HttpRequest {
    method: String,
    uri: String,
    http10: bool,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn keep_alive(&self) -> bool {
        let conn = self.header("connection").unwrap_or("").to_ascii_lowercase();
        if self.http10 {
            conn.contains("keep-alive")
        } else {
            !conn.contains("close")
        }
    }
}

enum ReadError {
    /// The peer closed (or the socket failed) between requests.
    Closed,
    TooLarge,
    Bad,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a complete chunked body at the start of `data`: (body, bytes used), `Ok(None)` if
/// more data is needed.
fn dechunk(data: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ReadError> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(eol) = find(&data[at..], b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&data[at..at + eol]).map_err(|_| ReadError::Bad)?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| ReadError::Bad)?;
        if body.len() + size > MAX_BODY {
            return Err(ReadError::TooLarge);
        }
        at += eol + 2;
        if size == 0 {
            // Trailers end with an empty line.
            let Some(end) = find(&data[at..], b"\r\n") else {
                return Ok(None);
            };
            if end == 0 {
                return Ok(Some((body, at + 2)));
            }
            let Some(end) = find(&data[at..], b"\r\n\r\n") else {
                return Ok(None);
            };
            return Ok(Some((body, at + end + 4)));
        }
        if data.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&data[at..at + size]);
        at += size + 2;
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), ReadError> {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => Err(ReadError::Closed),
        Ok(k) => {
            buf.extend_from_slice(&chunk[..k]);
            Ok(())
        }
    }
}

/// Reads one request; bytes after it stay in `buf` (pipelining).
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<HttpRequest, ReadError> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEADERS {
            return Err(ReadError::TooLarge);
        }
        fill(stream, buf).await?;
    };
    if head_end > MAX_HEADERS {
        return Err(ReadError::TooLarge);
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(uri), Some(version)) = (first.next(), first.next(), first.next())
    else {
        return Err(ReadError::Bad);
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ReadError::Bad);
    }
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line.split_once(':').ok_or(ReadError::Bad)?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut req = HttpRequest {
        method: method.to_string(),
        uri: uri.to_string(),
        http10: version == "HTTP/1.0",
        headers,
        body: Vec::new(),
    };
    let start = head_end + 4;
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = match req.header("content-length") {
        Some(v) => Some(v.parse::<usize>().map_err(|_| ReadError::Bad)?),
        None => None,
    };
    if length.is_some_and(|l| l > MAX_BODY) {
        return Err(ReadError::TooLarge);
    }
    let wants_continue = req
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if wants_continue && (chunked || length.unwrap_or(0) > buf.len() - start) {
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
    }
    if chunked {
        loop {
            if let Some((body, used)) = dechunk(&buf[start..])? {
                req.body = body;
                buf.drain(..start + used);
                return Ok(req);
            }
            if buf.len() - start > MAX_BODY + 64 * 1024 {
                return Err(ReadError::TooLarge);
            }
            fill(stream, buf).await?;
        }
    }
    let length = length.unwrap_or(0);
    while buf.len() < start + length {
        fill(stream, buf).await?;
    }
    req.body = buf[start..start + length].to_vec();
    buf.drain(..start + length);
    Ok(req)
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Request Entity Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// An RFC 7231 date: `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

async fn write_response(
    stream: &mut TcpStream,
    http10: bool,
    resp: &Response,
    close: bool,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.{} {} {}\r\n",
        if http10 { 0 } else { 1 },
        resp.status,
        reason(resp.status)
    );
    for (k, v) in &resp.extra {
        let _ = write!(head, "{k}: {v}\r\n");
    }
    if let Some(ct) = resp.content_type {
        let _ = write!(head, "Content-Type: {ct}\r\n");
    }
    let _ = write!(head, "Date: {}\r\n", http_date(now()));
    if resp.status != 204 {
        let _ = write!(head, "Content-Length: {}\r\n", resp.body.len());
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&resp.body);
    stream.write_all(&bytes).await?;
    stream.flush().await
}

/// What the double does with one HTTP request (bitcoind's http_request_cb + HTTPReq_JSONRPC).
async fn handle(state: &Mutex<State>, req: &HttpRequest) -> Outcome {
    let parsed = serde_json::from_slice::<J>(&req.body).ok();
    let (busy, credentials) = {
        let mut st = state.lock().unwrap();
        if req.method == "POST"
            && let Some(body) = &parsed
        {
            count_calls(&mut st, body);
        }
        (
            matches!(st.fault, Some(Fault::Busy)),
            format!("{}:{}", st.user, st.password),
        )
    };
    let wallet = if req.uri == "/" {
        None
    } else if let Some(name) = req.uri.strip_prefix("/wallet/") {
        Some(percent_decode(name))
    } else {
        return Outcome::Reply(plain_response(404, ""));
    };
    if busy {
        return Outcome::Reply(plain_response(503, "Work queue depth exceeded"));
    }
    if req.method != "POST" {
        return Outcome::Reply(plain_response(
            405,
            "JSONRPC server handles only POST requests",
        ));
    }
    let unauthorized = || {
        let mut r = plain_response(401, "");
        r.extra
            .push(("WWW-Authenticate", "Basic realm=\"jsonrpc\"".to_string()));
        Outcome::Reply(r)
    };
    let Some(auth) = req.header("authorization") else {
        return unauthorized();
    };
    let authorized = auth
        .strip_prefix("Basic ")
        .and_then(|b64| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
        })
        .is_some_and(|userpass| userpass == credentials.as_bytes());
    if !authorized {
        // Deters brute-forcing, as bitcoind does.
        tokio::time::sleep(Duration::from_millis(250)).await;
        return unauthorized();
    }
    serve_rpc(state, wallet.as_deref(), &req.body)
}

async fn serve_connection(
    state: Arc<Mutex<State>>,
    mut stream: TcpStream,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = Vec::new();
    loop {
        let read = tokio::select! {
            r = read_request(&mut stream, &mut buf) => r,
            _ = stop.wait_for(|stopped| *stopped) => return,
        };
        let req = match read {
            Ok(req) => req,
            Err(ReadError::Closed) => return,
            Err(ReadError::TooLarge) => {
                let status = 413;
                let body = format!(
                    "<HTML><HEAD>\n<TITLE>{status} {r}</TITLE>\n</HEAD><BODY>\n<H1>{r}</H1>\n</BODY></HTML>\n",
                    r = reason(status)
                );
                let _ =
                    write_response(&mut stream, false, &plain_response(status, &body), true).await;
                return;
            }
            Err(ReadError::Bad) => {
                let _ = write_response(&mut stream, false, &plain_response(400, ""), true).await;
                return;
            }
        };
        let keep_alive = req.keep_alive() && !*stop.borrow();
        match handle(&state, &req).await {
            Outcome::Drop => return,
            Outcome::Reply(resp) => {
                if write_response(&mut stream, req.http10, &resp, !keep_alive)
                    .await
                    .is_err()
                    || !keep_alive
                {
                    return;
                }
            }
        }
    }
}

async fn accept_loop(
    listener: Arc<Mutex<Option<TcpListener>>>,
    state: Arc<Mutex<State>>,
    stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = std::future::poll_fn(|cx| {
            let guard = listener.lock().unwrap();
            match guard.as_ref() {
                Some(l) => l.poll_accept(cx).map(Some),
                None => std::task::Poll::Ready(None),
            }
        })
        .await;
        match accepted {
            Some(Ok((stream, _))) => {
                tokio::spawn(serve_connection(state.clone(), stream, stop.clone()));
            }
            Some(Err(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
            None => return,
        }
    }
}

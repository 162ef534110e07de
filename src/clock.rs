//! Wall-clock time and identifiers derived from it.
//!
//! Everything that is persisted or sent to another process carries wall-clock milliseconds since the
//! Unix epoch ([`now_ms`]); in-process timers use tokio's monotonic clock. Task ids are ULIDs
//! ([`Ulid`]): 48 bits of milliseconds and 80 random bits, so they sort by creation time, which is
//! what the task table's key order relies on.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, saturating at zero for clocks set before 1970.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Adds a duration to a millisecond timestamp without overflowing.
pub fn add_ms(at_ms: u64, d: Duration) -> u64 {
    at_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Fills `buf` from the operating system's CSPRNG.
///
/// # Panics
/// Never in practice: `getrandom` only fails when the kernel has no entropy source at all, and a node
/// that cannot create keys or nonces must not run, so that is treated as a broken invariant.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut buf).expect("invariant: the OS random source works");
    buf
}

/// Crockford's base32 alphabet, as the ULID specification uses.
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A ULID: 128 bits, the top 48 a millisecond timestamp, the rest random. Displayed as 26
/// Crockford base32 characters; stored as 16 big-endian bytes so byte order equals time order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ulid(pub u128);

/// Last ULID handed out, so ids made in the same millisecond still increase (the spec's
/// "monotonic" mode): a task submitted after another always sorts after it.
static LAST_ULID: Mutex<u128> = Mutex::new(0);

impl Ulid {
    /// A new ULID for the current time, strictly greater than any earlier one from this process.
    pub fn generate() -> Self {
        let ms = u128::from(now_ms() & 0xFFFF_FFFF_FFFF);
        let rand = u128::from_be_bytes(random_bytes::<16>()) & ((1u128 << 80) - 1);
        let fresh = (ms << 80) | rand;
        let mut last = LAST_ULID.lock().unwrap_or_else(|p| p.into_inner());
        let id = if (fresh >> 80) <= (*last >> 80) {
            last.wrapping_add(1)
        } else {
            fresh
        };
        *last = id;
        Ulid(id)
    }

    /// The millisecond timestamp in the id.
    pub fn timestamp_ms(self) -> u64 {
        u64::try_from(self.0 >> 80).unwrap_or(0)
    }

    /// The 16-byte big-endian form used as an LMDB key.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// Reads the 16-byte big-endian form.
    pub fn from_bytes(b: [u8; 16]) -> Self {
        Ulid(u128::from_be_bytes(b))
    }
}

impl fmt::Display for Ulid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; 26];
        let mut v = self.0;
        for slot in out.iter_mut().rev() {
            *slot = CROCKFORD[(v & 31) as usize];
            v >>= 5;
        }
        // The alphabet is ASCII, so this cannot fail.
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Ulid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a ULID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UlidParseError {
    /// Not 26 characters long.
    #[error("a task id has 26 characters, got {0}")]
    Length(usize),
    /// A character outside Crockford's base32 alphabet.
    #[error("a task id uses Crockford base32; {0:?} is not in it")]
    Character(char),
    /// The first character is above 7, which would overflow 128 bits.
    #[error("a task id's first character must be 0-7")]
    Overflow,
}

impl FromStr for Ulid {
    type Err = UlidParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 26 {
            return Err(UlidParseError::Length(s.chars().count()));
        }
        let mut v: u128 = 0;
        for (i, c) in s.chars().enumerate() {
            let d = match c.to_ascii_uppercase() {
                c @ '0'..='9' => c as u32 - '0' as u32,
                'O' => 0,
                'I' | 'L' => 1,
                c => match CROCKFORD.iter().position(|&a| a as char == c) {
                    Some(p) => p as u32,
                    None => return Err(UlidParseError::Character(c)),
                },
            };
            if i == 0 && d > 7 {
                return Err(UlidParseError::Overflow);
            }
            v = (v << 5) | u128::from(d);
        }
        Ok(Ulid(v))
    }
}

impl serde::Serialize for Ulid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_u128(self.0)
        }
    }
}

impl<'de> serde::Deserialize<'de> for Ulid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            Ok(Ulid(u128::deserialize(d)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulid_text_round_trip_and_order() {
        let a = Ulid::generate();
        let b = Ulid::generate();
        assert!(b > a, "later ids sort after earlier ones");
        assert!(
            b.to_string() > a.to_string(),
            "text order equals numeric order"
        );
        assert_eq!(a.to_string().parse::<Ulid>(), Ok(a));
        assert_eq!(Ulid::from_bytes(a.to_bytes()), a);
        assert!(a.timestamp_ms() <= now_ms());
    }

    #[test]
    fn ulid_rejects_bad_text() {
        assert_eq!("abc".parse::<Ulid>(), Err(UlidParseError::Length(3)));
        assert_eq!(
            "8ZZZZZZZZZZZZZZZZZZZZZZZZZ".parse::<Ulid>(),
            Err(UlidParseError::Overflow)
        );
        assert_eq!(
            "0000000000000000000000000U".parse::<Ulid>(),
            Err(UlidParseError::Character('U'))
        );
        assert_eq!(
            "7ZZZZZZZZZZZZZZZZZZZZZZZZZ".parse::<Ulid>(),
            Ok(Ulid(u128::MAX))
        );
    }

    #[test]
    fn ulid_serde_forms() {
        let a = Ulid::generate();
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, format!("\"{a}\""));
        assert_eq!(serde_json::from_str::<Ulid>(&json).unwrap(), a);
        let bin = postcard::to_allocvec(&a).unwrap();
        assert_eq!(postcard::from_bytes::<Ulid>(&bin).unwrap(), a);
    }
}

//! Push ids: every accepted push has one, so a backend can ask what became
//! of it. Generated ids are ULID-shaped (26 Crockford base32 characters:
//! 48 bits of Unix milliseconds, then a per-process tag and a counter), so
//! they sort by time as text; a backend may give its own instead.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A push's id. A generated one costs no allocation; its text form is
/// canonical, so a given id that reads as a generated one is one. Its 128
/// bits are kept as two `u64`s: 24 bytes in all, not the 32 a `u128`'s
/// alignment would make it in every receipt, tag and queued change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PushId {
    Generated([u64; 2]),
    Given(Arc<str>),
}

fn split(n: u128) -> [u64; 2] {
    [(n >> 64) as u64, n as u64]
}

fn join([hi, lo]: [u64; 2]) -> u128 {
    u128::from(hi) << 64 | u128::from(lo)
}

impl PushId {
    /// Longest id a backend may give.
    pub const MAX_LEN: usize = 64;

    /// What [`PushId::given`] refuses, for error messages.
    pub const RULE: &'static str = "1 to 64 bytes of letters, digits, '.', '_', ':' or '-'";

    /// A new, time-ordered id.
    pub fn generate() -> PushId {
        static TAG: OnceLock<u128> = OnceLock::new();
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tag = *TAG.get_or_init(|| u128::from(rand::random::<u16>()) << 64);
        let ms = u128::from(crate::utc::now_ms()) & ((1 << 48) - 1);
        let seq = u128::from(SEQ.fetch_add(1, Ordering::Relaxed));
        PushId::Generated(split(ms << 80 | tag | seq))
    }

    /// An id from a backend (or a generated one read back as text).
    pub fn given(text: &str) -> Option<PushId> {
        let ok = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-');
        if text.is_empty() || text.len() > Self::MAX_LEN || !text.bytes().all(ok) {
            return None;
        }
        Some(match decode(text) {
            Some(n) => PushId::Generated(split(n)),
            None => PushId::Given(Arc::from(text)),
        })
    }

    /// Unix milliseconds a generated id was made at.
    pub fn millis(&self) -> Option<u64> {
        match self {
            PushId::Generated(n) => Some((join(*n) >> 80) as u64),
            PushId::Given(_) => None,
        }
    }
}

/// The 128-bit value of a canonical 26-character id; `None` for any other text.
fn decode(text: &str) -> Option<u128> {
    let b = text.as_bytes();
    if b.len() != 26 || b[0] > b'7' {
        return None;
    }
    b.iter().try_fold(0u128, |n, c| {
        let d = CROCKFORD.iter().position(|x| x == c)?;
        Some(n << 5 | d as u128)
    })
}

impl fmt::Display for PushId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PushId::Given(s) => f.write_str(s),
            PushId::Generated(n) => {
                let n = join(*n);
                let mut out = [0u8; 26];
                for (i, c) in out.iter_mut().enumerate() {
                    *c = CROCKFORD[((n >> (5 * (25 - i))) & 31) as usize];
                }
                f.write_str(std::str::from_utf8(&out).expect("ASCII"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_sort_by_time_and_read_back() {
        let a = PushId::generate();
        let b = PushId::generate();
        let (ta, tb) = (a.to_string(), b.to_string());
        assert_eq!(ta.len(), 26);
        assert!(ta < tb, "{ta} < {tb}");
        assert_eq!(PushId::given(&ta), Some(a.clone()));
        let ms = a.millis().unwrap();
        assert!(ms.abs_diff(crate::utc::now_ms()) < 60_000);
    }

    #[test]
    fn given_ids_are_checked() {
        assert_eq!(
            PushId::given("order-17:a.b_c"),
            Some(PushId::Given("order-17:a.b_c".into()))
        );
        for bad in ["", "a b", "a/b", "é", &"x".repeat(65)] {
            assert_eq!(PushId::given(bad), None, "{bad:?}");
        }
        assert!(PushId::given(&"x".repeat(64)).is_some());
        // 26 characters but not canonical (lower case, or first over '7'): given.
        let lower = PushId::generate().to_string().to_lowercase();
        assert!(matches!(PushId::given(&lower), Some(PushId::Given(_))));
        let high = format!("8{}", &PushId::generate().to_string()[1..]);
        assert!(matches!(PushId::given(&high), Some(PushId::Given(_))));
    }
}

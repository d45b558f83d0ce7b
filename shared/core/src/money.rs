//! Exact money amounts and ISO 4217 currency codes.
//!
//! Amounts are integer micros (millionths), the unit Google uses, so summing refunds and
//! reconciling revenue never suffers binary floating-point drift.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(i64);

/// The largest accepted amount: far above any real deal, far below i64 overflow in sums.
pub const MAX_AMOUNT: f64 = 1e12;

impl Money {
    pub const ZERO: Money = Money(0);

    pub fn from_micros(m: i64) -> Self {
        Money(m)
    }

    pub fn micros(&self) -> i64 {
        self.0
    }

    /// `None` for NaN, infinities and amounts above [`MAX_AMOUNT`] in magnitude.
    pub fn from_f64(v: f64) -> Option<Self> {
        (v.is_finite() && v.abs() <= MAX_AMOUNT).then(|| Money((v * 1e6).round() as i64))
    }

    pub fn as_f64(&self) -> f64 {
        self.0 as f64 / 1e6
    }

    pub fn is_negative(&self) -> bool {
        self.0 < 0
    }

    pub fn saturating_sub(self, o: Money) -> Money {
        Money(self.0.saturating_sub(o.0))
    }

    pub fn saturating_add(self, o: Money) -> Money {
        Money(self.0.saturating_add(o.0))
    }
}

impl fmt::Display for Money {
    /// Decimal without trailing zeros: `129.5`, `0`, `-3.25`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let (whole, frac) = (abs / 1_000_000, abs % 1_000_000);
        if frac == 0 {
            write!(f, "{sign}{whole}")
        } else {
            let frac = format!("{frac:06}");
            write!(f, "{sign}{whole}.{}", frac.trim_end_matches('0'))
        }
    }
}

impl fmt::Debug for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.as_f64())
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        Money::from_f64(v).ok_or_else(|| serde::de::Error::custom("amount out of range"))
    }
}

/// Parses the decimal text written by `Display` (used by the DynamoDB adapter, whose numbers
/// are decimal strings).
impl std::str::FromStr for Money {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (neg, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if whole.is_empty()
            || frac.len() > 6
            || !whole
                .bytes()
                .chain(frac.bytes())
                .all(|b| b.is_ascii_digit())
        {
            return Err(());
        }
        let whole: i64 = whole.parse().map_err(|_| ())?;
        let frac: i64 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<6}").parse().map_err(|_| ())?
        };
        let m = whole
            .checked_mul(1_000_000)
            .and_then(|w| w.checked_add(frac))
            .ok_or(())?;
        Ok(Money(if neg { -m } else { m }))
    }
}

/// Active ISO 4217 codes (2026), including the funds codes platforms accept: a data file, one
/// code a line, sorted, so the list is updated as data. Each line is 4 bytes (3 letters and a
/// newline), so the file is searched in place.
const ISO_4217: &[u8] = include_bytes!("iso4217.txt");
const CODE_LINE: usize = 4;

/// The upper-case ISO 4217 code for `s` (any case), or `None` when it is not one.
pub fn currency_code(s: &str) -> Option<String> {
    let up = s.trim().to_ascii_uppercase();
    let code = |i: usize| ISO_4217.get(i * CODE_LINE..i * CODE_LINE + 3);
    // A binary search over the fixed-width lines.
    let (mut lo, mut hi) = (0, ISO_4217.len() / CODE_LINE);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match code(mid)?.cmp(up.as_bytes()) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return Some(up),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currency_table_is_sorted_for_binary_search() {
        let codes: Vec<&[u8]> = ISO_4217.chunks(CODE_LINE).collect();
        assert_eq!(codes.len(), 156);
        assert!(codes.iter().all(|c| c.len() == CODE_LINE
            && c[..3].iter().all(u8::is_ascii_uppercase)
            && c[3] == b'\n'));
        assert!(codes.windows(2).all(|w| w[0] < w[1]));
        for c in &codes {
            let code = std::str::from_utf8(&c[..3]).unwrap();
            assert_eq!(currency_code(&code.to_lowercase()).as_deref(), Some(code));
        }
        assert_eq!(currency_code("usd").as_deref(), Some("USD"));
        assert_eq!(currency_code("EUR").as_deref(), Some("EUR"));
        assert_eq!(currency_code("XYZ"), None);
        assert_eq!(currency_code("US"), None);
    }

    #[test]
    fn exact_sums_and_text() {
        let a = Money::from_f64(0.1)
            .unwrap()
            .saturating_add(Money::from_f64(0.2).unwrap());
        assert_eq!(a, Money::from_f64(0.3).unwrap());
        assert_eq!(Money::from_f64(129.5).unwrap().to_string(), "129.5");
        assert_eq!(Money::from_f64(-3.25).unwrap().to_string(), "-3.25");
        assert_eq!(Money::ZERO.to_string(), "0");
        for s in ["129.5", "0", "-3.25", "1000000", "0.000001"] {
            assert_eq!(s.parse::<Money>().unwrap().to_string(), s);
        }
        assert!("1.2.3".parse::<Money>().is_err());
        assert!("abc".parse::<Money>().is_err());
        assert!(Money::from_f64(f64::NAN).is_none());
        assert!(Money::from_f64(f64::INFINITY).is_none());
    }
}

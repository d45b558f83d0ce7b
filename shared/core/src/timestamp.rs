//! UTC instants with one canonical text form, so the same instant always hashes the same way.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime, UtcOffset};

/// An instant in UTC at millisecond precision.
///
/// Millisecond precision is the canonical form: inputs carrying micro- or nanoseconds are
/// truncated, so `12:00:00.123Z` and `12:00:00.123456Z` are one instant for event ids.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(OffsetDateTime);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimestampError {
    #[error("not an RFC 3339 date-time with an offset (e.g. 2026-11-28T14:05:00Z)")]
    NotRfc3339,
    #[error("out of the supported range (years 2000 to 2100)")]
    OutOfRange,
}

impl Timestamp {
    pub fn now() -> Self {
        Self::from_unix_ms(OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000)
    }

    /// Parses RFC 3339 in any offset and converts to UTC.
    pub fn parse_rfc3339(s: &str) -> Result<Self, TimestampError> {
        let t =
            OffsetDateTime::parse(s.trim(), &Rfc3339).map_err(|_| TimestampError::NotRfc3339)?;
        if !(2000..=2100).contains(&t.year()) {
            return Err(TimestampError::OutOfRange);
        }
        Ok(Self::from_unix_ms(
            (t.unix_timestamp_nanos() / 1_000_000) as i64,
        ))
    }

    pub fn from_unix_ms(ms: i64) -> Self {
        let t = OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        Timestamp(t)
    }

    pub fn from_unix_secs(secs: i64) -> Self {
        Self::from_unix_ms(secs.saturating_mul(1000))
    }

    pub fn unix_ms(&self) -> i64 {
        (self.0.unix_timestamp_nanos() / 1_000_000) as i64
    }

    pub fn unix_secs(&self) -> i64 {
        self.0.unix_timestamp()
    }

    /// The UTC date, `YYYY-MM-DD`.
    pub fn date(&self) -> String {
        let mut s = self.canonical();
        s.truncate(10);
        s
    }

    /// Saturating: a delay an outside party controls (a platform's retryDelay) can never
    /// overflow the calendar.
    pub fn plus_secs(&self, secs: i64) -> Self {
        Timestamp(
            self.0
                .checked_add(Duration::seconds(secs))
                .unwrap_or(if secs < 0 {
                    OffsetDateTime::UNIX_EPOCH
                } else {
                    Self::max().0
                }),
        )
    }

    pub fn plus_millis(&self, ms: i64) -> Self {
        Timestamp(
            self.0
                .checked_add(Duration::milliseconds(ms))
                .unwrap_or(if ms < 0 {
                    OffsetDateTime::UNIX_EPOCH
                } else {
                    Self::max().0
                }),
        )
    }

    pub fn minus_secs(&self, secs: i64) -> Self {
        self.plus_secs(secs.saturating_neg())
    }

    /// `self` plus a std duration, saturating.
    pub fn plus(&self, d: std::time::Duration) -> Self {
        self.plus_millis(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }

    /// The latest instant this type holds (the end of the supported range).
    pub fn max() -> Self {
        Timestamp(
            OffsetDateTime::from_unix_timestamp(4_133_980_799)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
        )
    }

    /// Seconds from `earlier` to `self` (negative when `earlier` is later).
    pub fn secs_since(&self, earlier: &Timestamp) -> i64 {
        (self.0 - earlier.0).whole_seconds()
    }

    /// The canonical text form: `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    pub fn canonical(&self) -> String {
        // Written digit by digit: every stored event serializes two or three of these on the
        // ingest hot path, and `format!` over the date's accessors cost several times more.
        let (year, month, day) = self.0.to_calendar_date();
        let (hour, minute, second, milli) = self.0.to_hms_milli();
        let mut out = String::with_capacity(24);
        // Years are 2000..=2100 when parsed (parse_rfc3339) and near now from the clock.
        push_digits(&mut out, year.clamp(0, 9999).unsigned_abs(), 4);
        out.push('-');
        push_digits(&mut out, u32::from(u8::from(month)), 2);
        out.push('-');
        push_digits(&mut out, u32::from(day), 2);
        out.push('T');
        push_digits(&mut out, u32::from(hour), 2);
        out.push(':');
        push_digits(&mut out, u32::from(minute), 2);
        out.push(':');
        push_digits(&mut out, u32::from(second), 2);
        out.push('.');
        push_digits(&mut out, u32::from(milli), 3);
        out.push('Z');
        out
    }

    /// Google Ads' `yyyy-mm-dd hh:mm:ss+hh:mm`, written in the given offset.
    pub fn google_ads_datetime(&self, offset: UtcOffset) -> String {
        let t = self.0.to_offset(offset);
        let (h, m, _) = offset.as_hms();
        let sign = if offset.is_negative() { '-' } else { '+' };
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}{sign}{:02}:{:02}",
            t.year(),
            t.month() as u8,
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            h.unsigned_abs(),
            m.unsigned_abs()
        )
    }
}

/// `value`'s last `width` decimal digits, zero-padded.
fn push_digits(out: &mut String, value: u32, width: u32) {
    for place in (0..width).rev() {
        let digit = (value / 10u32.pow(place)) % 10;
        out.push(char::from(b'0' + digit as u8));
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.canonical())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

/// A half-open period, `[from, to)`: what one reconciliation covers, and what it asks a CRM
/// for. One type, so every reader and every query agrees on which end is included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub from: Timestamp,
    pub to: Timestamp,
}

impl Window {
    pub fn new(from: Timestamp, to: Timestamp) -> Self {
        Window { from, to }
    }

    pub fn contains(&self, t: Timestamp) -> bool {
        t >= self.from && t < self.to
    }

    /// The window with `ms` more at each end (saturating).
    pub fn widened_ms(&self, ms: i64) -> Window {
        Window {
            from: Timestamp::from_unix_ms(self.from.unix_ms().saturating_sub(ms)),
            to: Timestamp::from_unix_ms(self.to.unix_ms().saturating_add(ms)),
        }
    }

    /// The UTC dates of its first and last millisecond, both included: the bounds a
    /// date-typed field (Salesforce's `CloseDate`) is compared with. An empty window is its
    /// first day.
    pub fn days(&self) -> Days {
        let last = self.to.unix_ms().saturating_sub(1).max(self.from.unix_ms());
        Days {
            first: self.from.date(),
            last: Timestamp::from_unix_ms(last).date(),
        }
    }
}

/// Dates (`YYYY-MM-DD`, UTC), both included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Days {
    pub first: String,
    pub last: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_holds_its_start_not_its_end_and_its_days_are_inclusive() {
        let at = |s: &str| Timestamp::parse_rfc3339(s).unwrap();
        let w = Window::new(at("2026-03-01T00:00:00Z"), at("2026-03-03T00:00:00Z"));
        assert!(w.contains(w.from));
        assert!(!w.contains(w.to));
        assert!(w.contains(at("2026-03-02T23:59:59.999Z")));
        let days = w.days();
        assert_eq!(
            (days.first.as_str(), days.last.as_str()),
            ("2026-03-01", "2026-03-02")
        );
        let empty = Window::new(w.from, w.from);
        assert!(!empty.contains(w.from));
        assert_eq!(empty.days().last, "2026-03-01");
        let wide = w.widened_ms(1_000);
        assert_eq!(wide.from, at("2026-02-28T23:59:59Z"));
        assert_eq!(wide.to, at("2026-03-03T00:00:01Z"));
    }

    #[test]
    fn same_instant_two_ways_is_one_canonical_form() {
        let a = Timestamp::parse_rfc3339("2026-03-01T12:00:00Z").unwrap();
        let b = Timestamp::parse_rfc3339("2026-03-01T07:00:00.000-05:00").unwrap();
        let c = Timestamp::parse_rfc3339("2026-03-01T13:00:00.000400+01:00").unwrap();
        assert_eq!(a.canonical(), "2026-03-01T12:00:00.000Z");
        assert_eq!(a, b);
        assert_eq!(a, c, "sub-millisecond digits are truncated");
    }

    /// The hand-written form is what RFC 3339 formatting gives, at millisecond precision, and
    /// parses back to the same instant, across the whole supported range.
    #[test]
    fn canonical_form_matches_rfc3339_and_round_trips() {
        let fmt = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        let mut rng = fastrand::Rng::with_seed(3);
        let (lo, hi) = (946_684_800_000i64, 4_133_980_799_999i64); // 2000-01-01 .. 2100-12-31
        for ms in [lo, hi, 1_764_255_600_250, 1_772_323_199_999]
            .into_iter()
            .chain((0..5000).map(|_| rng.i64(lo..=hi)))
        {
            let t = Timestamp::from_unix_ms(ms);
            assert_eq!(t.canonical(), t.0.format(&fmt).unwrap(), "{ms}");
            assert_eq!(Timestamp::parse_rfc3339(&t.canonical()), Ok(t), "{ms}");
        }
    }

    #[test]
    fn rejects_non_rfc3339() {
        assert_eq!(
            Timestamp::parse_rfc3339("2026-03-01 12:00:00"),
            Err(TimestampError::NotRfc3339)
        );
        assert_eq!(
            Timestamp::parse_rfc3339("2026-03-01T12:00:00"),
            Err(TimestampError::NotRfc3339)
        );
        assert_eq!(
            Timestamp::parse_rfc3339("1970-01-01T00:00:00Z"),
            Err(TimestampError::OutOfRange)
        );
    }

    #[test]
    fn google_format_carries_the_offset() {
        let t = Timestamp::parse_rfc3339("2026-04-17T17:34:56Z").unwrap();
        assert_eq!(
            t.google_ads_datetime(UtcOffset::UTC),
            "2026-04-17 17:34:56+00:00"
        );
        let cdt = UtcOffset::from_hms(-5, 0, 0).unwrap();
        assert_eq!(t.google_ads_datetime(cdt), "2026-04-17 12:34:56-05:00");
        let ist = UtcOffset::from_hms(5, 30, 0).unwrap();
        assert_eq!(t.google_ads_datetime(ist), "2026-04-17 23:04:56+05:30");
    }

    #[test]
    fn serde_round_trip() {
        let t = Timestamp::from_unix_ms(1_764_300_000_123);
        let s = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<Timestamp>(&s).unwrap(), t);
        assert_eq!(t.plus_secs(10).secs_since(&t), 10);
    }
}

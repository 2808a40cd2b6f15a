//! Event time: microseconds since the Unix epoch, UTC.
//!
//! Every decision in voxgate reads time from events or from an injected [`Clock`], never from the
//! wall directly, so that replay reproduces the same outputs.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A point in event time, microseconds since 1970-01-01T00:00:00Z.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub const fn from_micros(us: i64) -> Self {
        Self(us)
    }
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms.saturating_mul(1000))
    }
    pub const fn as_micros(self) -> i64 {
        self.0
    }
    pub const fn as_millis(self) -> i64 {
        self.0.div_euclid(1000)
    }
    /// `self + ms` milliseconds, saturating.
    pub const fn add_millis(self, ms: i64) -> Self {
        Self(self.0.saturating_add(ms.saturating_mul(1000)))
    }
    /// Microseconds from `earlier` to `self` (negative when `earlier` is later).
    pub const fn micros_since(self, earlier: Timestamp) -> i64 {
        self.0.saturating_sub(earlier.0)
    }

    /// RFC 3339 with millisecond precision, e.g. `2025-01-07T18:02:11.000Z`.
    pub fn rfc3339(self) -> String {
        self.to_string()
    }

    /// RFC 2822 as Twilio writes it in REST JSON: `Tue, 07 Jan 2025 18:02:11 +0000`.
    pub fn rfc2822(self) -> String {
        const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
        const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
        let secs = self.0.div_euclid(1_000_000);
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (y, mo, d) = civil_from_days(days);
        format!(
            "{}, {d:02} {} {y:04} {:02}:{:02}:{:02} +0000",
            DAYS[(days + 4).rem_euclid(7) as usize],
            MONTHS[(mo - 1).clamp(0, 11) as usize],
            sod / 3600,
            (sod / 60) % 60,
            sod % 60
        )
    }

    /// Parses RFC 2822 as Twilio sends it (`Tue, 07 Jan 2025 18:02:11 +0000`).
    pub fn parse_rfc2822(s: &str) -> Option<Self> {
        let s = s.trim();
        let s = match s.find(',') {
            Some(i) => s[i + 1..].trim_start(),
            None => s,
        };
        let mut it = s.split_ascii_whitespace();
        let day: i64 = it.next()?.parse().ok()?;
        let mon = match it.next()? {
            "Jan" => 1,
            "Feb" => 2,
            "Mar" => 3,
            "Apr" => 4,
            "May" => 5,
            "Jun" => 6,
            "Jul" => 7,
            "Aug" => 8,
            "Sep" => 9,
            "Oct" => 10,
            "Nov" => 11,
            "Dec" => 12,
            _ => return None,
        };
        let year: i64 = it.next()?.parse().ok()?;
        let mut hms = it.next()?.split(':');
        let h: i64 = hms.next()?.parse().ok()?;
        let m: i64 = hms.next()?.parse().ok()?;
        let sec: i64 = hms.next().unwrap_or("0").parse().ok()?;
        let zone = it.next().unwrap_or("+0000");
        let offset_min = match zone {
            "GMT" | "UT" | "UTC" | "Z" => 0,
            z if z.len() == 5 && z.is_ascii() && (z.starts_with('+') || z.starts_with('-')) => {
                let hh: i64 = z[1..3].parse().ok()?;
                let mm: i64 = z[3..5].parse().ok()?;
                let v = hh * 60 + mm;
                if z.starts_with('-') {
                    -v
                } else {
                    v
                }
            }
            _ => return None,
        };
        if !(1..=31).contains(&day) || !(0..=23).contains(&h) || !(0..=59).contains(&m) || !(0..=60).contains(&sec) {
            return None;
        }
        if !(1..=9999).contains(&year) {
            return None;
        }
        let days = days_from_civil(year, mon, day);
        let secs = days * 86_400 + h * 3600 + m * 60 + sec - offset_min * 60;
        Some(Self(secs.checked_mul(1_000_000)?))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.div_euclid(1_000_000);
        let micros = self.0.rem_euclid(1_000_000);
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (y, mo, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            sod / 3600,
            (sod / 60) % 60,
            sod % 60,
            micros / 1000
        )
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of a day number since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Where "now" comes from. Ingress stamps events with it; stages never call it (they use event
/// time), and tests inject a manual clock.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Timestamp(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000Z");
        let t = Timestamp::parse_rfc2822("Tue, 07 Jan 2025 18:02:11 +0000").unwrap();
        assert_eq!(t.to_string(), "2025-01-07T18:02:11.000Z");
        let t2 = Timestamp::parse_rfc2822("Tue, 07 Jan 2025 10:02:11 -0800").unwrap();
        assert_eq!(t, t2);
        assert_eq!(t.rfc2822(), "Tue, 07 Jan 2025 18:02:11 +0000");
        assert_eq!(Timestamp(0).rfc2822(), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(Timestamp::parse_rfc2822(&t.rfc2822()), Some(t));
    }

    #[test]
    fn civil_roundtrip() {
        for z in [-800_000, -1, 0, 1, 59, 60, 11_016, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }

    #[test]
    fn rejects_garbage_dates() {
        for s in [
            "",
            "Tue,",
            "Tue, 99 Jan 2025 18:02:11 +0000",
            "07 Foo 2025 18:02:11",
            "x y z",
            "Tue, 07 Jan 2025 18:02:11 +1é2",
            "Tue, 07 Jan 99999999999999 18:02:11 +0000",
            "Tue, 07 Jan 2025 -1:02:11 +0000",
        ] {
            assert!(Timestamp::parse_rfc2822(s).is_none(), "{s}");
        }
    }
}

/// CPU time (user and system, all threads) a process has used so far, in seconds, from
/// `/proc/{pid}/stat` (`None`: this process). For measuring load, never for decisions. `None` off
/// Linux or if the process is gone.
pub fn process_cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    parse_cpu_seconds(&std::fs::read_to_string(path).ok()?)
}

/// utime + stime of a `/proc/*/stat` line, in seconds (the kernel reports them in USER_HZ ticks,
/// 100 per second on Linux).
fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces; fields are counted after its closing ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

#[cfg(test)]
mod cpu_tests {
    use super::*;

    #[test]
    fn cpu_seconds_from_a_stat_line() {
        let line = "4242 (voxgate (x)) S 1 4242 4242 0 -1 4194560 12 0 0 0 250 75 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_cpu_seconds(line), Some(3.25));
        assert_eq!(parse_cpu_seconds("garbage"), None);
        assert!(process_cpu_seconds(None).is_some());
    }
}

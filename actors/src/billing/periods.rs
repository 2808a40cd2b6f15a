//! Calendar arithmetic in UTC on event time, and the periods usage records cover.
//!
//! Days, months and years are UTC (Twilio's usage dates are GMT). A window is a half-open
//! `(start, end)` pair of [`Timestamp`]s; usage records show it as inclusive dates, `start_date`
//! to `end_date` (the day holding `end - 1µs`). [`Period`] names the windows of Twilio's usage
//! record list resources; "now" is always passed in, never read.
//!
//! Default windows when a list has no `StartDate`/`EndDate`: `Today`, `Yesterday`, `LastMonth`
//! are whole days/months; `ThisMonth` runs from the 1st to the end of today; `AllTime` and `Yearly`
//! from 1970-01-01 (the usage book narrows that to the tenant's first activity) to the end of
//! today; `Daily` covers this month to date and `Monthly` this year to date.

use voxgate_protocol::time::{civil_from_days, days_from_civil};
use voxgate_protocol::Timestamp;

/// Microseconds in a day.
pub const DAY_US: i64 = 86_400_000_000;
/// The most sub-periods one split may produce (a `Daily` list over 27 years).
pub const MAX_PERIODS: usize = 10_000;

/// A half-open window of event time, `[start, end)`.
pub type Window = (Timestamp, Timestamp);

/// Why a date or a period was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeriodError {
    #[error("{0:?} is not a date (YYYY-MM-DD, or a relative offset like -30days)")]
    BadDate(String),
    #[error("{0:?} is not a month (YYYY-MM)")]
    BadMonth(String),
    #[error("end date {end} is before start date {start}")]
    Inverted { start: Date, end: Date },
    #[error("the range splits into more than {MAX_PERIODS} periods")]
    TooManyPeriods,
}

/// The UTC day (days since 1970-01-01) holding `t`.
pub fn day_of(t: Timestamp) -> i64 {
    t.0.div_euclid(DAY_US)
}

/// The first instant of a day.
pub fn day_start(day: i64) -> Timestamp {
    Timestamp(day.saturating_mul(DAY_US))
}

/// The month index (`year * 12 + month - 1`) of a day.
pub fn month_of_day(day: i64) -> i64 {
    let (y, m, _) = civil_from_days(day);
    y * 12 + m - 1
}

/// The first day of a month index.
pub fn month_first_day(index: i64) -> i64 {
    days_from_civil(index.div_euclid(12), index.rem_euclid(12) + 1, 1)
}

/// Whether `year` has a 29 February.
pub fn is_leap_year(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// Days in a month (1–12) of a year.
pub fn days_in_month(year: i64, month: u8) -> u8 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A UTC calendar date, `YYYY-MM-DD` (Twilio's `StartDate`, `EndDate`, `start_date`, `end_date`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Date {
    pub year: i32,
    pub month: u8,
    pub day: u8,
}

impl Date {
    /// A checked date (years 1 to 9999).
    pub fn new(year: i32, month: u8, day: u8) -> Option<Self> {
        if !(1..=9999).contains(&year) || !(1..=12).contains(&month) {
            return None;
        }
        if day == 0 || day > days_in_month(i64::from(year), month) {
            return None;
        }
        Some(Self { year, month, day })
    }

    /// Parses `YYYY-MM-DD` (four-digit year, two-digit month and day).
    pub fn parse(s: &str) -> Result<Self, PeriodError> {
        let bad = || PeriodError::BadDate(s.to_owned());
        let mut it = s.split('-');
        let (Some(y), Some(m), Some(d), None) = (it.next(), it.next(), it.next(), it.next()) else {
            return Err(bad());
        };
        if y.len() != 4 || m.len() != 2 || d.len() != 2 {
            return Err(bad());
        }
        let (y, m, d) = (digits(y).ok_or_else(bad)?, digits(m).ok_or_else(bad)?, digits(d).ok_or_else(bad)?);
        Self::new(y as i32, m as u8, d as u8).ok_or_else(bad)
    }

    /// The date of a day number (days since 1970-01-01).
    pub fn from_day(day: i64) -> Self {
        let (y, m, d) = civil_from_days(day);
        Self { year: y.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32, month: m as u8, day: d as u8 }
    }

    /// The UTC date holding `t`.
    pub fn of(t: Timestamp) -> Self {
        Self::from_day(day_of(t))
    }

    /// Days since 1970-01-01.
    pub fn day_number(self) -> i64 {
        days_from_civil(i64::from(self.year), i64::from(self.month), i64::from(self.day))
    }

    /// The first instant of the date.
    pub fn start(self) -> Timestamp {
        day_start(self.day_number())
    }

    /// The date `n` days later (earlier when negative).
    pub fn add_days(self, n: i64) -> Self {
        Self::from_day(self.day_number().saturating_add(n))
    }

    /// The month holding the date.
    pub fn month(self) -> Month {
        Month { year: self.year, month: self.month }
    }
}

impl std::fmt::Display for Date {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

impl std::fmt::Debug for Date {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Date {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses a `StartDate`/`EndDate` value: `YYYY-MM-DD`, or an offset in days from today (UTC day
/// of `now`) like `-30days` or `+30days`.
pub fn parse_date_param(s: &str, now: Timestamp) -> Result<Date, PeriodError> {
    let bad = || PeriodError::BadDate(s.to_owned());
    let rel = |rest: &str, sign: i64| -> Result<Date, PeriodError> {
        let n = rest.strip_suffix("days").and_then(digits).filter(|n| *n <= 3_660_000).ok_or_else(bad)?;
        let d = Date::of(now).add_days(sign * n);
        Date::new(d.year, d.month, d.day).ok_or_else(bad)
    };
    if let Some(rest) = s.strip_prefix('-') {
        return rel(rest, -1);
    }
    if let Some(rest) = s.strip_prefix('+') {
        return rel(rest, 1);
    }
    Date::parse(s)
}

/// A UTC calendar month.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Month {
    pub year: i32,
    /// 1 to 12.
    pub month: u8,
}

impl Month {
    /// A checked month (years 1 to 9999).
    pub fn new(year: i32, month: u8) -> Option<Self> {
        ((1..=9999).contains(&year) && (1..=12).contains(&month)).then_some(Self { year, month })
    }

    /// Parses `YYYY-MM`.
    pub fn parse(s: &str) -> Result<Self, PeriodError> {
        let bad = || PeriodError::BadMonth(s.to_owned());
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 {
            return Err(bad());
        }
        Self::new(digits(y).ok_or_else(bad)? as i32, digits(m).ok_or_else(bad)? as u8).ok_or_else(bad)
    }

    /// The month holding `t`.
    pub fn of(t: Timestamp) -> Self {
        Date::of(t).month()
    }

    /// `year * 12 + month - 1`: consecutive months have consecutive indexes.
    pub fn index(self) -> i64 {
        i64::from(self.year) * 12 + i64::from(self.month) - 1
    }

    pub fn from_index(index: i64) -> Self {
        let y = index.div_euclid(12).clamp(i64::from(i32::MIN), i64::from(i32::MAX));
        Self { year: y as i32, month: (index.rem_euclid(12) + 1) as u8 }
    }

    pub fn next(self) -> Self {
        Self::from_index(self.index() + 1)
    }

    pub fn prev(self) -> Self {
        Self::from_index(self.index() - 1)
    }

    pub fn first_date(self) -> Date {
        Date { year: self.year, month: self.month, day: 1 }
    }

    pub fn last_date(self) -> Date {
        Date { year: self.year, month: self.month, day: days_in_month(i64::from(self.year), self.month) }
    }

    /// The first instant of the month.
    pub fn start(self) -> Timestamp {
        self.first_date().start()
    }

    /// The first instant of the next month.
    pub fn end(self) -> Timestamp {
        self.next().start()
    }

    /// `[start, end)` of the month.
    pub fn window(self) -> Window {
        (self.start(), self.end())
    }
}

impl std::fmt::Display for Month {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl std::fmt::Debug for Month {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Month {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The first instant of a year.
pub fn year_start(year: i64) -> Timestamp {
    day_start(days_from_civil(year, 1, 1))
}

/// The sub-periods a list is split into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Day,
    Month,
    Year,
}

impl Granularity {
    /// The start of the next day/month/year strictly after the one holding `t`.
    pub fn next_boundary(self, t: Timestamp) -> Timestamp {
        match self {
            Self::Day => day_start(day_of(t).saturating_add(1)),
            Self::Month => Month::of(t).end(),
            Self::Year => year_start(i64::from(Date::of(t).year) + 1),
        }
    }

    /// The day/month/year holding `t`, as a window.
    pub fn window_of(self, t: Timestamp) -> Window {
        let start = match self {
            Self::Day => day_start(day_of(t)),
            Self::Month => Month::of(t).start(),
            Self::Year => year_start(i64::from(Date::of(t).year)),
        };
        (start, self.next_boundary(t))
    }
}

/// A usage-record list's period (the REST subresource), or an explicit date range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// One record per category per day (default: this month to date).
    Daily,
    /// One record per category per month (default: this year to date).
    Monthly,
    /// One record per category per year (default: all time).
    Yearly,
    AllTime,
    Today,
    Yesterday,
    /// From the 1st to the end of today.
    ThisMonth,
    LastMonth,
    /// Inclusive dates, like `StartDate`/`EndDate`; build it with [`Period::range`].
    Range {
        start_date: Date,
        end_date: Date,
    },
}

impl Period {
    /// The REST subresource name (`Daily`, `AllTime`, `ThisMonth`…).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "Daily" => Self::Daily,
            "Monthly" => Self::Monthly,
            "Yearly" => Self::Yearly,
            "AllTime" => Self::AllTime,
            "Today" => Self::Today,
            "Yesterday" => Self::Yesterday,
            "ThisMonth" => Self::ThisMonth,
            "LastMonth" => Self::LastMonth,
            _ => return None,
        })
    }

    /// A checked inclusive date range.
    pub fn range(start_date: Date, end_date: Date) -> Result<Self, PeriodError> {
        if end_date < start_date {
            return Err(PeriodError::Inverted { start: start_date, end: end_date });
        }
        Ok(Self::Range { start_date, end_date })
    }

    /// The window the period covers at `now`.
    pub fn resolve(&self, now: Timestamp) -> Window {
        let today = day_of(now);
        let tomorrow = day_start(today.saturating_add(1));
        let this_month = Month::of(now);
        match *self {
            Self::Today => (day_start(today), tomorrow),
            Self::Yesterday => (day_start(today - 1), day_start(today)),
            Self::ThisMonth | Self::Daily => (this_month.start(), tomorrow),
            Self::LastMonth => this_month.prev().window(),
            Self::Monthly => (year_start(i64::from(this_month.year)), tomorrow),
            Self::AllTime | Self::Yearly => (Timestamp(0), tomorrow),
            Self::Range { start_date, end_date } => {
                let start = start_date.start();
                (start, day_start(end_date.day_number().saturating_add(1)).max(start))
            }
        }
    }

    /// How the period's list is split: by day, month or year, or not at all.
    pub fn granularity(&self) -> Option<Granularity> {
        match self {
            Self::Daily => Some(Granularity::Day),
            Self::Monthly => Some(Granularity::Month),
            Self::Yearly => Some(Granularity::Year),
            _ => None,
        }
    }

    /// The period's window at `now`, split by its granularity (one window when it has none).
    pub fn split(&self, now: Timestamp) -> Result<Vec<Window>, PeriodError> {
        let w = self.resolve(now);
        match self.granularity() {
            Some(g) => split(w, g),
            None => Ok(vec![w]),
        }
    }
}

/// Cuts a window at every day/month/year boundary inside it; the first and last pieces are
/// clipped to the window. An empty window gives no pieces.
pub fn split(window: Window, g: Granularity) -> Result<Vec<Window>, PeriodError> {
    let (mut start, end) = window;
    let mut out = Vec::new();
    while start < end {
        if out.len() >= MAX_PERIODS {
            return Err(PeriodError::TooManyPeriods);
        }
        let next = g.next_boundary(start).min(end);
        out.push((start, next));
        start = next;
    }
    Ok(out)
}

/// The inclusive dates a window shows as (`end_date` is the day of `end - 1µs`).
pub fn window_dates(w: Window) -> (Date, Date) {
    (Date::of(w.0), Date::of(Timestamp(w.1 .0.saturating_sub(1)).max(w.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(s: &str) -> Date {
        Date::parse(s).unwrap()
    }

    fn at(s: &str, hour: i64) -> Timestamp {
        Timestamp(date(s).start().0 + hour * 3_600_000_000)
    }

    fn dates(w: Window) -> (String, String) {
        let (a, b) = window_dates(w);
        (a.to_string(), b.to_string())
    }

    #[test]
    fn parses_dates_strictly() {
        assert_eq!(date("2024-02-29"), Date { year: 2024, month: 2, day: 29 });
        assert_eq!(date("2000-02-29").to_string(), "2000-02-29");
        for bad in ["2023-02-29", "1900-02-29", "2024-13-01", "2024-00-10", "2024-04-31", "24-01-01", "2024-1-01"] {
            assert!(Date::parse(bad).is_err(), "{bad}");
        }
        for bad in ["", "2024-01-01-01", "2024/01/01", "2024-01-0a", "+024-01-01", "0000-01-01", "２０２４-01-01"] {
            assert!(Date::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Month::parse("2024-12"), Ok(Month { year: 2024, month: 12 }));
        assert!(Month::parse("2024-13").is_err());
        assert!(Month::parse("2024").is_err());
    }

    #[test]
    fn relative_dates_count_from_today() {
        let now = at("2024-03-01", 5);
        assert_eq!(parse_date_param("-1days", now), Ok(date("2024-02-29")));
        assert_eq!(parse_date_param("+30days", now), Ok(date("2024-03-31")));
        assert_eq!(parse_date_param("2024-01-05", now), Ok(date("2024-01-05")));
        for bad in ["-days", "-1day", "-x1days", "+99999999999999999999days", "- 1days"] {
            assert!(parse_date_param(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn day_and_month_boundaries() {
        let t = at("2024-12-31", 23);
        assert_eq!(Granularity::Day.window_of(t), (date("2024-12-31").start(), date("2025-01-01").start()));
        assert_eq!(Granularity::Month.window_of(t), (date("2024-12-01").start(), date("2025-01-01").start()));
        assert_eq!(Granularity::Year.window_of(t), (date("2024-01-01").start(), date("2025-01-01").start()));
        assert_eq!(Month::of(t).next(), Month { year: 2025, month: 1 });
        assert_eq!(Month { year: 2025, month: 1 }.prev(), Month { year: 2024, month: 12 });
        assert_eq!(Month { year: 2024, month: 2 }.last_date(), date("2024-02-29"));
        assert_eq!(Month { year: 2023, month: 2 }.last_date(), date("2023-02-28"));
        assert_eq!(Month { year: 2100, month: 2 }.last_date(), date("2100-02-28"));
        assert_eq!(month_first_day(Month::of(t).index()), date("2024-12-01").day_number());
        assert_eq!(month_of_day(date("2024-12-01").day_number()), Month::of(t).index());
        // Before the epoch too.
        assert_eq!(Date::of(Timestamp(-1)), date("1969-12-31"));
        assert_eq!(Month::of(Timestamp(-1)), Month { year: 1969, month: 12 });
    }

    #[test]
    fn fixed_periods() {
        let now = at("2024-03-01", 10);
        assert_eq!(dates(Period::Today.resolve(now)), ("2024-03-01".into(), "2024-03-01".into()));
        // Yesterday across a month boundary, in a leap year.
        assert_eq!(dates(Period::Yesterday.resolve(now)), ("2024-02-29".into(), "2024-02-29".into()));
        assert_eq!(dates(Period::LastMonth.resolve(now)), ("2024-02-01".into(), "2024-02-29".into()));
        assert_eq!(dates(Period::ThisMonth.resolve(now)), ("2024-03-01".into(), "2024-03-01".into()));
        // LastMonth in January is last December.
        let jan = at("2025-01-15", 0);
        assert_eq!(dates(Period::LastMonth.resolve(jan)), ("2024-12-01".into(), "2024-12-31".into()));
        assert_eq!(dates(Period::Yesterday.resolve(at("2025-01-01", 0))), ("2024-12-31".into(), "2024-12-31".into()));
        assert_eq!(dates(Period::AllTime.resolve(jan)), ("1970-01-01".into(), "2025-01-15".into()));
        assert_eq!(dates(Period::Monthly.resolve(jan)), ("2025-01-01".into(), "2025-01-15".into()));
        let r = Period::range(date("2023-02-27"), date("2023-03-01")).unwrap();
        assert_eq!(dates(r.resolve(jan)), ("2023-02-27".into(), "2023-03-01".into()));
        assert!(Period::range(date("2023-03-01"), date("2023-02-27")).is_err());
        assert_eq!(Period::parse("LastMonth"), Some(Period::LastMonth));
        assert_eq!(Period::parse("lastmonth"), None);
    }

    #[test]
    fn splits_clip_to_the_window() {
        let r = Period::range(date("2024-01-30"), date("2024-03-02")).unwrap();
        let w = r.resolve(Timestamp(0));
        let days = split(w, Granularity::Day).unwrap();
        assert_eq!(days.len(), 2 + 29 + 2);
        assert_eq!(dates(days[2]), ("2024-02-01".into(), "2024-02-01".into()));
        let months: Vec<_> = split(w, Granularity::Month).unwrap().into_iter().map(dates).collect();
        assert_eq!(
            months,
            vec![
                ("2024-01-30".into(), "2024-01-31".into()),
                ("2024-02-01".into(), "2024-02-29".into()),
                ("2024-03-01".into(), "2024-03-02".into())
            ]
        );
        let years = split((at("2023-06-01", 0), at("2025-02-01", 0)), Granularity::Year).unwrap();
        assert_eq!(
            years.into_iter().map(dates).collect::<Vec<_>>(),
            vec![
                ("2023-06-01".into(), "2023-12-31".into()),
                ("2024-01-01".into(), "2024-12-31".into()),
                ("2025-01-01".into(), "2025-01-31".into())
            ]
        );
        assert_eq!(Period::Daily.split(at("2024-02-10", 3)).unwrap().len(), 10);
        assert_eq!(Period::Today.split(at("2024-02-10", 3)).unwrap().len(), 1);
        let huge = Period::range(date("0001-01-01"), date("9999-12-31")).unwrap().resolve(Timestamp(0));
        assert_eq!(split(huge, Granularity::Day), Err(PeriodError::TooManyPeriods));
        assert_eq!(split(huge, Granularity::Year).unwrap().len(), 9999);
        assert!(split((Timestamp(5), Timestamp(5)), Granularity::Day).unwrap().is_empty());
    }
}

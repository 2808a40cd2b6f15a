//! Tiny `const fn` float helpers (sin, sqrt, exp, Bessel I0, rounding).
//!
//! They use only IEEE-754 add/sub/mul/div, so every result is bit-identical on every machine
//! (unlike libm, whose last bits can differ between platforms and versions). That keeps the
//! filter taps compile-time constants and the VAD thresholds reproducible for bit-exact replay.
//! Accuracy is ~1e-15 relative over the ranges used here, which is plenty.

use std::f64::consts::{LN_10, LN_2, PI};

/// `|x|`.
pub(crate) const fn abs(x: f64) -> f64 {
    if x < 0.0 {
        -x
    } else {
        x
    }
}

/// Rounds half away from zero. `|x|` must fit in an `i64`.
pub(crate) const fn round_i64(x: f64) -> i64 {
    if x >= 0.0 {
        (x + 0.5) as i64
    } else {
        -((-x + 0.5) as i64)
    }
}

/// `sin(x)`: reduction to `[-π, π]`, then the Taylor series.
pub(crate) const fn sin(x: f64) -> f64 {
    let two_pi = 2.0 * PI;
    let r = x - two_pi * (round_i64(x / two_pi) as f64);
    let r2 = r * r;
    let mut term = r;
    let mut sum = r;
    let mut n = 1;
    while n < 30 {
        term = -term * r2 / ((2 * n) as f64 * (2 * n + 1) as f64);
        sum += term;
        n += 1;
    }
    sum
}

/// `sqrt(x)` for `x >= 0` by Newton's iteration (0 for non-positive input).
pub(crate) const fn sqrt(x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    let mut y = if x > 1.0 { x } else { 1.0 };
    let mut i = 0;
    while i < 200 {
        let next = 0.5 * (y + x / y);
        if next >= y {
            break;
        }
        y = next;
        i += 1;
    }
    y
}

/// `e^x` for moderate `|x|` (range reduction by ln 2, then Taylor).
pub(crate) const fn exp(x: f64) -> f64 {
    if x > 700.0 {
        return f64::MAX;
    }
    if x < -700.0 {
        return 0.0;
    }
    let k = round_i64(x / LN_2);
    let r = x - (k as f64) * LN_2;
    let mut term = 1.0;
    let mut sum = 1.0;
    let mut n = 1;
    while n < 25 {
        term = term * r / (n as f64);
        sum += term;
        n += 1;
    }
    let mut k = k;
    while k > 0 {
        sum *= 2.0;
        k -= 1;
    }
    while k < 0 {
        sum *= 0.5;
        k += 1;
    }
    sum
}

/// Power ratio for a level difference in dB: `10^(db / 10)`.
pub(crate) const fn db_to_power(db: f64) -> f64 {
    exp(db * LN_10 / 10.0)
}

/// Modified Bessel function of the first kind, order 0 (for the Kaiser window).
pub(crate) const fn bessel_i0(x: f64) -> f64 {
    let half = x / 2.0;
    let mut term = 1.0;
    let mut sum = 1.0;
    let mut k = 1;
    while k < 100 {
        let t = half / (k as f64);
        term *= t * t;
        sum += term;
        if term < sum * 1e-18 {
            break;
        }
        k += 1;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agree_with_std() {
        for i in -200..=200 {
            let x = i as f64 * 0.37;
            assert!((sin(x) - x.sin()).abs() < 1e-12, "sin {x}");
            assert!((exp(x / 10.0) - (x / 10.0).exp()).abs() <= 1e-13 * (x / 10.0).exp(), "exp {x}");
            let y = abs(x);
            assert!((sqrt(y) - y.sqrt()).abs() < 1e-12, "sqrt {y}");
        }
        assert!((db_to_power(12.0) - 10f64.powf(1.2)).abs() < 1e-12);
        assert!((db_to_power(-50.0) - 1e-5).abs() < 1e-18);
        // I0(0) = 1, I0(1) = 1.2660658777520082.
        assert_eq!(bessel_i0(0.0), 1.0);
        assert!((bessel_i0(1.0) - 1.266_065_877_752_008_2).abs() < 1e-14);
        assert_eq!(round_i64(2.5), 3);
        assert_eq!(round_i64(-2.5), -3);
        assert_eq!(round_i64(-2.4), -2);
    }
}

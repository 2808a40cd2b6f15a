//! G.711 mu-law (the codec of Twilio Media Streams: 8 kHz, one byte a sample).
//!
//! Decoding is a lookup in [`DECODE_TABLE`], a 256-entry `const` table built at compile time by
//! [`decode_sample`]. Decoded values use the usual 16-bit scaling (the 14-bit G.711 linear value
//! shifted left by 2): they span −32124 ..= 32124, and both zero codes (0xFF and 0x7F) decode to 0.
//!
//! [`encode_sample`] is the classic (Sun / ITU-T G.191 compatible) encoder; voxgate only ever
//! decodes phone audio, so the encoder serves tests, benches and the call simulator.

/// Bias added to the magnitude before the segment search (33 in 14-bit units, 132 in 16-bit).
const BIAS: i32 = 0x84;
/// Largest magnitude the encoder represents; louder samples are clipped to it.
pub const CLIP: i32 = 32_635;

/// Decodes one mu-law byte to linear 16-bit PCM. `const`, so it also builds [`DECODE_TABLE`].
pub const fn decode_sample(code: u8) -> i16 {
    let u = !code;
    let exponent = ((u >> 4) & 0x07) as u32;
    let mantissa = (u & 0x0F) as i32;
    let magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS;
    if u & 0x80 != 0 {
        -magnitude as i16
    } else {
        magnitude as i16
    }
}

const fn build_table() -> [i16; 256] {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = decode_sample(i as u8);
        i += 1;
    }
    table
}

/// mu-law byte → linear PCM, computed at compile time.
pub const DECODE_TABLE: [i16; 256] = build_table();

/// The one in-memory copy of [`DECODE_TABLE`] that the decoders index.
static TABLE: [i16; 256] = DECODE_TABLE;

/// Decodes through the table (what the hot path uses).
#[inline(always)]
pub fn decode(code: u8) -> i16 {
    TABLE[code as usize]
}

/// Decodes `src` and appends the samples to `out` (no allocation once `out` has the capacity).
pub fn decode_into(src: &[u8], out: &mut Vec<i16>) {
    out.extend(src.iter().map(|&b| TABLE[b as usize]));
}

/// Encodes one linear 16-bit sample to mu-law (truncating quantiser, as G.711 / G.191).
///
/// `decode_sample(encode_sample(x))` differs from `x` by at most half a quantisation step of
/// `x`'s segment, plus the clipped excess for `|x| > CLIP` (see [`quantisation_bound`]).
pub const fn encode_sample(sample: i16) -> u8 {
    let mut pcm = sample as i32;
    let sign: u8 = if pcm < 0 {
        pcm = -pcm;
        0x80
    } else {
        0
    };
    if pcm > CLIP {
        pcm = CLIP;
    }
    pcm += BIAS;
    // Segment = position of the highest set bit among bits 7..=14, minus 7.
    let mut exponent: u8 = 7;
    while exponent > 0 && (pcm & (0x80 << exponent)) == 0 {
        exponent -= 1;
    }
    let mantissa = ((pcm >> (exponent + 3)) & 0x0F) as u8;
    !(sign | (exponent << 4) | mantissa)
}

/// The largest `|decode(encode(x)) - x|` that G.711 allows for `x`: half a quantisation step of
/// `x`'s segment (4, 8, …, 512) plus whatever exceeds the clip level.
pub const fn quantisation_bound(sample: i16) -> i32 {
    let mag = (sample as i32).abs();
    let clipped = if mag > CLIP { CLIP } else { mag };
    let biased = clipped + BIAS;
    let mut exponent = 7;
    while exponent > 0 && (biased & (0x80 << exponent)) == 0 {
        exponent -= 1;
    }
    (4 << exponent) + (mag - clipped)
}

/// Encodes `src` and appends the codes to `out`.
pub fn encode_into(src: &[i16], out: &mut Vec<u8>) {
    out.extend(src.iter().map(|&s| encode_sample(s)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ITU-T G.191 `ulaw_expand`, written the way the reference code computes it
    /// (sign, 1's complement, segment, step, half-step, minus 4·33), independently of
    /// [`decode_sample`].
    fn g191_expand(code: u8) -> i32 {
        let sign = if code < 0x80 { -1 } else { 1 };
        let m = !(code as i32);
        let exponent = (m >> 4) & 0x07;
        let segment = exponent + 1;
        let mantissa = m & 0x0F;
        let step = 4 << segment;
        sign * ((0x80 << exponent) + step * mantissa + step / 2 - 4 * 33)
    }

    #[test]
    fn zero_codes_decode_to_zero() {
        assert_eq!(decode(0xFF), 0);
        assert_eq!(decode(0x7F), 0);
        assert_eq!(encode_sample(0), 0xFF);
    }

    #[test]
    fn table_matches_g191_reference() {
        for code in 0..=255u8 {
            assert_eq!(decode(code) as i32, g191_expand(code), "code {code:#04x}");
            assert_eq!(DECODE_TABLE[code as usize], decode_sample(code));
        }
        // Well-known anchors of the 16-bit scaled table.
        assert_eq!(decode(0x00), -32_124);
        assert_eq!(decode(0x80), 32_124);
        assert_eq!(decode(0xFE), 8);
        assert_eq!(decode(0x7E), -8);
        assert_eq!(decode(0x8F), 16_764);
        assert_eq!(decode(0x90), 15_996);
    }

    #[test]
    fn table_follows_the_mu_255_law() {
        // The segmented G.711 table approximates F(x) = ln(1 + 255|x|) / ln(256): the code's
        // magnitude index (0..=127) stays within 2 steps of 127·F(|y| / 32124).
        for code in 0..=255u8 {
            let y = decode(code) as f64;
            let index = (127 - (code & 0x7F) as i32) as f64;
            let f = (1.0 + 255.0 * y.abs() / 32_124.0).ln() / 256f64.ln();
            assert!((index - 127.0 * f).abs() <= 2.0, "code {code:#04x}: {index} vs {}", 127.0 * f);
        }
        // Odd symmetry and monotonicity.
        for code in 0..=0x7Fu8 {
            assert_eq!(decode(code), -decode(code | 0x80));
        }
        for code in 0x80..0xFFu8 {
            assert!(decode(code) > decode(code + 1));
        }
    }

    #[test]
    fn round_trip_within_quantisation_bound_for_all_i16() {
        for x in i16::MIN..=i16::MAX {
            let y = decode(encode_sample(x)) as i32;
            let err = (y - x as i32).abs();
            assert!(err <= quantisation_bound(x), "x={x} y={y} err={err}");
        }
    }

    #[test]
    fn codes_round_trip() {
        for code in 0..=255u8 {
            let back = encode_sample(decode(code));
            // 0x7F is "negative zero"; it re-encodes as the positive zero 0xFF.
            let want = if code == 0x7F { 0xFF } else { code };
            assert_eq!(back, want, "code {code:#04x}");
        }
    }

    #[test]
    fn slices() {
        let pcm = [0i16, 1000, -1000, 32_767, -32_768];
        let mut codes = Vec::new();
        encode_into(&pcm, &mut codes);
        let mut back = vec![7i16];
        decode_into(&codes, &mut back);
        assert_eq!(back.len(), 6);
        assert_eq!(back[0], 7);
        for (x, y) in pcm.iter().zip(&back[1..]) {
            assert!((*x as i32 - *y as i32).abs() <= quantisation_bound(*x));
        }
    }
}

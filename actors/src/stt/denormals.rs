//! Subnormal floats flushed to zero on the threads that run Whisper.
//!
//! Attention's softmax over a real clip's encoder output leaves many weights below f32's normal
//! range (e⁻⁹⁰ and less); on x86 every multiply that reads or makes such a number takes a
//! microcode assist of a hundred cycles or more. Flushing them (MXCSR's FTZ and DAZ bits, what
//! PyTorch's `set_flush_denormal` and CTranslate2 do) changes values below 1.2e-38 only, which
//! no token choice can see. The bits are per thread: [`flush`] sets them on the calling thread
//! and on every thread candle computes on (the global rayon pool for f32 matrix products,
//! candle's own rayon pool, and its barrier pool for the 8-bit ones).

/// Sets (or clears) flush-to-zero and denormals-are-zero on the calling thread and on candle's
/// compute threads. A no-op on other architectures.
pub fn flush(on: bool) {
    set_here(on);
    rayon::broadcast(|_| set_here(on));
    candle_core::utils::with_threadpool(|| rayon::broadcast(|_| set_here(on)));
    candle_core::utils::barrier_pool().execute(|_| set_here(on));
}

/// Whether the calling thread flushes subnormals.
pub fn flushed() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        mxcsr() & FTZ_DAZ == FTZ_DAZ
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6).
#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = 0x8040;

#[cfg(target_arch = "x86_64")]
fn mxcsr() -> u32 {
    let mut csr: u32 = 0;
    // SAFETY: stmxcsr stores the 32-bit control register to a valid, aligned u32.
    unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags)) };
    csr
}

fn set_here(on: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        let csr = if on { mxcsr() | FTZ_DAZ } else { mxcsr() & !FTZ_DAZ };
        // SAFETY: ldmxcsr loads a valid MXCSR value (the current one with two mode bits
        // changed; no reserved bit set).
        unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags)) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = on;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn subnormals_become_zero_and_come_back() {
        let tiny = std::hint::black_box(f32::MIN_POSITIVE);
        flush(true);
        assert!(flushed());
        assert_eq!(std::hint::black_box(tiny) / std::hint::black_box(4.0f32), 0.0);
        flush(false);
        assert!(!flushed());
        assert!(std::hint::black_box(tiny) / std::hint::black_box(4.0f32) > 0.0);
    }
}

//! Sample-rate conversion of mono f32 audio through the system libsoxr, reproducing
//! python-soxr's `soxr.resample(x, from, to, quality="soxr_hq")` followed by the length fix-up of
//! transformers' `load_audio` (pad with zeros / trim to `ceil(n * to / from)`).
//!
//! python-soxr 1.1.0 (`csoxr_split_ch` for a contiguous 1-D array) creates one resampler with
//! `soxr_io_spec(FLOAT32, FLOAT32)`, `soxr_quality_spec(SOXR_HQ, 0)` and the default runtime spec,
//! feeds the input in chunks of `max(1000, 48000 * from / to)` frames, flushes once, and caps the
//! output at `floor(n * to / from) + 1` frames. We do the same steps, so the only possible difference
//! is the libsoxr build (python-soxr bundles its own 0.1.3 fork; we link Debian's 0.1.3).

use std::os::raw::{c_char, c_double, c_uint, c_ulong, c_void};

use crate::error::{Error, Result};

/// `soxr_datatype_t` value for planar ("split") 32-bit float, as python-soxr uses for 1-D input.
const SOXR_FLOAT32_S: c_uint = 4;
/// `SOXR_HQ` (= `SOXR_20_BITQ`): the recipe librosa and transformers ask for.
const SOXR_HQ: c_ulong = 4;

#[repr(C)]
struct SoxrIoSpec {
    itype: c_uint,
    otype: c_uint,
    scale: c_double,
    e: *mut c_void,
    flags: c_ulong,
}

#[repr(C)]
struct SoxrQualitySpec {
    precision: c_double,
    phase_response: c_double,
    passband_end: c_double,
    stopband_begin: c_double,
    e: *mut c_void,
    flags: c_ulong,
}

#[repr(C)]
struct SoxrOpaque {
    _private: [u8; 0],
}

type SoxrError = *const c_char;

#[link(name = "soxr")]
extern "C" {
    fn soxr_io_spec(itype: c_uint, otype: c_uint) -> SoxrIoSpec;
    fn soxr_quality_spec(recipe: c_ulong, flags: c_ulong) -> SoxrQualitySpec;
    fn soxr_create(
        input_rate: c_double,
        output_rate: c_double,
        num_channels: c_uint,
        error: *mut SoxrError,
        io_spec: *const SoxrIoSpec,
        quality_spec: *const SoxrQualitySpec,
        runtime_spec: *const c_void,
    ) -> *mut SoxrOpaque;
    fn soxr_process(
        resampler: *mut SoxrOpaque,
        input: *const c_void,
        ilen: usize,
        idone: *mut usize,
        output: *mut c_void,
        olen: usize,
        odone: *mut usize,
    ) -> SoxrError;
    fn soxr_delete(resampler: *mut SoxrOpaque);
}

/// Owns a `soxr_t` so it is freed on every path.
struct Resampler(*mut SoxrOpaque);

impl Drop for Resampler {
    fn drop(&mut self) {
        // SAFETY: the pointer came from a successful soxr_create and is deleted exactly once.
        unsafe { soxr_delete(self.0) }
    }
}

fn soxr_message(err: SoxrError) -> String {
    if err.is_null() {
        return "unknown libsoxr error".into();
    }
    // SAFETY: libsoxr errors are static NUL-terminated strings.
    unsafe { std::ffi::CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned()
}

/// Number of output samples transformers keeps: `ceil(n * to / from)`.
pub fn output_len(n: usize, from: u32, to: u32) -> usize {
    let num = n as u128 * to as u128;
    num.div_ceil(from as u128) as usize
}

/// Resamples mono `samples` from `from` Hz to `to` Hz exactly as transformers' `load_audio` does
/// (soxr HQ, then zero-pad / trim to `ceil(n * to / from)`). Equal rates return the input unchanged.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>> {
    if from == 0 || to == 0 {
        return Err(Error::input(
            format!("{from} Hz -> {to} Hz"),
            "a sample rate of 0 Hz",
            "positive sample rates",
        ));
    }
    if from == to {
        return Ok(samples.to_vec());
    }
    let target = output_len(samples.len(), from, to);
    let mut out = soxr_hq(samples, from as f64, to as f64)?;
    out.resize(target, 0.0);
    Ok(out)
}

/// One python-soxr `resample(..., quality="soxr_hq")` call on a mono float32 signal.
fn soxr_hq(x: &[f32], in_rate: f64, out_rate: f64) -> Result<Vec<f32>> {
    let ilen = x.len();
    // python-soxr: `olen = ilen * out_rate / in_rate + 1` evaluated in double, truncated.
    let olen = (ilen as f64 * out_rate / in_rate + 1.0) as usize;
    let div_len = (48000.0 * in_rate / out_rate).max(1000.0) as usize;
    let mut y = vec![0f32; olen];

    // SAFETY: plain-data constructors of libsoxr.
    let io = unsafe { soxr_io_spec(SOXR_FLOAT32_S, SOXR_FLOAT32_S) };
    let quality = unsafe { soxr_quality_spec(SOXR_HQ, 0) };
    let mut err: SoxrError = std::ptr::null();
    // SAFETY: the spec pointers outlive the call; a null runtime spec selects libsoxr's default.
    let raw = unsafe {
        soxr_create(
            in_rate,
            out_rate,
            1,
            &mut err,
            &io,
            &quality,
            std::ptr::null(),
        )
    };
    if !err.is_null() || raw.is_null() {
        return Err(Error::Runtime(anyhow::anyhow!(
            "libsoxr could not create a {in_rate} Hz -> {out_rate} Hz resampler: {}",
            soxr_message(err)
        )));
    }
    let soxr = Resampler(raw);

    let mut out_pos = 0usize;
    let mut step = |input: Option<&[f32]>, out_pos: &mut usize| -> Result<()> {
        // Split ("_S") I/O takes an array of one pointer per channel.
        let in_ptrs: [*const f32; 1] = [input.map_or(std::ptr::null(), |c| c.as_ptr())];
        let in_arg: *const c_void = match input {
            Some(_) => in_ptrs.as_ptr().cast(),
            None => std::ptr::null(),
        };
        let ilen = input.map_or(0, |c| c.len());
        let out_ptrs: [*mut f32; 1] = [y[*out_pos..].as_mut_ptr()];
        let mut odone = 0usize;
        // SAFETY: the input chunk holds `ilen` floats, the output slice `olen - out_pos`.
        let e = unsafe {
            soxr_process(
                soxr.0,
                in_arg,
                ilen,
                std::ptr::null_mut(),
                out_ptrs.as_ptr() as *mut c_void,
                olen - *out_pos,
                &mut odone,
            )
        };
        if !e.is_null() {
            return Err(Error::Runtime(anyhow::anyhow!(
                "libsoxr failed while resampling: {}",
                soxr_message(e)
            )));
        }
        *out_pos += odone;
        Ok(())
    };
    for chunk in x.chunks(div_len) {
        step(Some(chunk), &mut out_pos)?;
    }
    step(None, &mut out_pos)?;
    drop(soxr);
    y.truncate(out_pos);
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_length_is_ceil_of_ratio() {
        assert_eq!(output_len(44100, 44100, 16000), 16000);
        assert_eq!(output_len(44101, 44100, 16000), 16001);
        assert_eq!(output_len(3, 48000, 16000), 1);
        assert_eq!(output_len(0, 8000, 16000), 0);
        for (n, from, to) in [
            (12345usize, 44100u32, 16000u32),
            (999, 8000, 16000),
            (7, 48000, 16000),
        ] {
            let x: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.01).sin()).collect();
            let y = resample(&x, from, to).expect("resample");
            assert_eq!(y.len(), output_len(n, from, to));
        }
    }

    #[test]
    fn equal_rates_are_identity_and_zero_rate_is_an_input_error() {
        let x = [0.1f32, -0.2, 0.3];
        assert_eq!(resample(&x, 16000, 16000).expect("same rate"), x.to_vec());
        assert!(matches!(resample(&x, 0, 16000), Err(Error::Input { .. })));
    }
}

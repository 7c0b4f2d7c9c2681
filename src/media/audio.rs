//! Audio decoding to mono f32, reproducing transformers 5.23 `audio_utils.load_audio` with its
//! soundfile backend (the one `librosa.load` also matches):
//! `sf.SoundFile(..).read(dtype="float32", always_2d=True).T`, `mean(axis=0)` over channels in
//! float32, then `soxr.resample(.., quality="soxr_hq")` padded/trimmed to `ceil(n * to / from)`.
//!
//! WAV goes through hound with libsndfile's int->float rule (`x * 2^-(bits-1)`, 8-bit WAV being
//! unsigned with a 128 offset); anything hound cannot read (other formats, or WAV codecs such as
//! ADPCM and 64-bit float) is decoded by the system `ffmpeg` to float32 at the native rate and
//! channel count, and downmixed here (never with ffmpeg's `-ac 1`, whose matrix is not a mean).
//! `.npy` arrays are the `(array, sampling_rate)` form of the reference.
//!
//! Measured against the reference: WAV (u8/i16/i24/i32/f32, 1–10 channels) and FLAC bit-exact at
//! the native rate and at 16 kHz; MP3 within 1.1e-6 and Ogg Vorbis within 2.4e-7 (ffmpeg's decoders
//! vs libsndfile's mpg123/libvorbis). Not reproduced on purpose: transformers' `backend="auto"`
//! switches to torchcodec when that is installed, which downmixes stereo as `(L + R) / sqrt(2)`
//! and resamples with FFmpeg (0.19 max-abs from the soundfile path on stereo speech); SPEC §8
//! names the soundfile + soxr HQ path as the reference.

use std::io::Read;

use super::ffmpeg::{self, Invocation, ReadEnd, TempFile};
use super::npy;
use super::resample::resample;
use super::Audio;
use crate::error::{Error, Result};

const EXPECTED: &str = "an audio file (WAV, MP3, FLAC, OGG, M4A, …) with at least one sample";

/// Audio longer than this is refused while it is decoded: `MMLLM_MAX_AUDIO_SECONDS`, else an
/// hour. A few kilobytes of compressed silence can otherwise decode to gigabytes.
pub const DEFAULT_MAX_AUDIO_SECONDS: u64 = 3600;
/// Decoded float32 samples kept at most, whatever the duration (many channels at a high rate).
const MAX_DECODED_BYTES: u64 = 2 << 30;

fn max_seconds() -> Result<u64> {
    Ok(super::env_u64("MMLLM_MAX_AUDIO_SECONDS")?.unwrap_or(DEFAULT_MAX_AUDIO_SECONDS))
}

/// Refuses `frames` samples per channel at `rate` when they last longer than `max_s` seconds or
/// hold more than [`MAX_DECODED_BYTES`]; checked before the samples are decoded or copied.
fn check_length(frames: u64, channels: u64, rate: u32, max_s: u64, input: &str) -> Result<()> {
    if frames > max_s.saturating_mul(u64::from(rate)) {
        return Err(Error::input(
            input,
            format!("the audio lasts more than {max_s} s ({frames} samples at {rate} Hz)",),
            "shorter audio, or a larger MMLLM_MAX_AUDIO_SECONDS",
        ));
    }
    if frames.saturating_mul(channels).saturating_mul(4) > MAX_DECODED_BYTES {
        return Err(Error::input(
            input,
            format!("{frames} samples × {channels} channels decode to more than 2 GiB"),
            "audio with fewer channels or samples",
        ));
    }
    Ok(())
}

/// Interleaved float32 samples as decoded, before the downmix.
struct Decoded {
    samples: Vec<f32>,
    channels: usize,
    rate: u32,
}

/// Decodes audio bytes (any container ffmpeg knows; WAV natively) to mono f32, resampled to
/// `target_rate` when given. `input` names the audio in errors.
pub fn decode_audio(bytes: &[u8], input: &str, target_rate: Option<u32>) -> Result<Audio> {
    if bytes.is_empty() {
        return Err(Error::input(input, "the audio file is empty", EXPECTED));
    }
    let decoded = match decode_wav(bytes, input) {
        Some(result) => result?,
        None => decode_with_ffmpeg(bytes, input)?,
    };
    finish(decoded, input, target_rate)
}

/// Builds audio from a `.npy` float array: 1-D mono, or 2-D channels-first `(channels, samples)`,
/// sampled at `sample_rate` (the `--sample-rate` flag); resampled to `target_rate` when given.
/// float64 arrays are rounded to float32 first (our resampler, like the model, runs in float32).
pub fn audio_from_npy(
    bytes: &[u8],
    input: &str,
    sample_rate: u32,
    target_rate: Option<u32>,
) -> Result<Audio> {
    if sample_rate == 0 {
        return Err(Error::input(
            input,
            "a sample rate of 0 Hz",
            "--sample-rate with the array's rate in Hz",
        ));
    }
    let arr = npy::parse(bytes, input)?;
    let (channels, frames) = match arr.shape.as_slice() {
        [n] => (1, *n),
        [c, n] if *c <= MAX_NPY_CHANNELS => (*c, *n),
        other => {
            return Err(Error::input(
                input,
                format!("an array of shape {other:?}"),
                format!(
                    "a 1-D array of samples or a 2-D (channels, samples) array with at most \
                     {MAX_NPY_CHANNELS} channels"
                ),
            ))
        }
    };
    check_length(
        frames as u64,
        channels as u64,
        sample_rate,
        max_seconds()?,
        input,
    )?;
    let values = npy::to_f32(&arr, input)?;
    // Channels-first to interleaved, so every path shares one downmix.
    let mut interleaved = vec![0f32; values.len()];
    for c in 0..channels {
        for i in 0..frames {
            interleaved[i * channels + c] = values[c * frames + i];
        }
    }
    finish(
        Decoded {
            samples: interleaved,
            channels,
            rate: sample_rate,
        },
        input,
        target_rate,
    )
}

/// A 2-D array with more rows than this is almost surely `(samples, channels)`; refuse it.
const MAX_NPY_CHANNELS: usize = 64;

fn finish(decoded: Decoded, input: &str, target_rate: Option<u32>) -> Result<Audio> {
    if decoded.samples.is_empty() || decoded.channels == 0 {
        return Err(Error::input(input, "the audio has no samples", EXPECTED));
    }
    let mono = downmix(&decoded.samples, decoded.channels);
    match target_rate {
        Some(to) if to != decoded.rate => Ok(Audio {
            samples: resample(&mono, decoded.rate, to)?,
            sample_rate: to,
        }),
        _ => Ok(Audio {
            samples: mono,
            sample_rate: decoded.rate,
        }),
    }
}

/// Mean over channels of interleaved samples, as NumPy's float32 `mean(axis=0)` computes it:
/// a float32 sum in channel order (pairwise in blocks of 8 from 8 channels on, like NumPy's
/// `pairwise_sum`), divided by the channel count in float32.
pub fn downmix(interleaved: &[f32], channels: usize) -> Vec<f32> {
    if channels <= 1 {
        return interleaved.to_vec();
    }
    let c = channels as f32;
    interleaved
        .chunks_exact(channels)
        .map(|frame| numpy_sum(frame) / c)
        .collect()
}

/// NumPy's float32 `pairwise_sum` for short runs (up to its 128-element block).
fn numpy_sum(x: &[f32]) -> f32 {
    if x.len() < 8 {
        let mut s = 0f32;
        for &v in x {
            s += v;
        }
        return s;
    }
    if x.len() > 128 {
        let half = (x.len() / 2) & !7;
        return numpy_sum(&x[..half]) + numpy_sum(&x[half..]);
    }
    let mut r = [0f32; 8];
    r.copy_from_slice(&x[..8]);
    let mut i = 8;
    while i + 8 <= x.len() {
        for j in 0..8 {
            r[j] += x[i + j];
        }
        i += 8;
    }
    let mut s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for &v in &x[i..] {
        s += v;
    }
    s
}

/// WAV through hound. `None` when hound cannot handle the file (not WAV, or a WAV codec or
/// sample layout it does not read), so the caller falls back to ffmpeg.
fn decode_wav(bytes: &[u8], input: &str) -> Option<Result<Decoded>> {
    if bytes.len() < 12 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return None;
    }
    let reader = hound::WavReader::new(std::io::Cursor::new(bytes)).ok()?;
    let spec = reader.spec();
    let bits = spec.bits_per_sample;
    // Only whole-byte containers whose valid bits fill the container: libsndfile scales by the
    // container size, so anything else (e.g. 24 valid bits in 4 bytes) is left to ffmpeg.
    if spec.channels == 0 || wav_container_bits(bytes, spec.channels) != Some(bits) {
        return None;
    }
    let channels = spec.channels as usize;
    // The data chunk's declared length bounds what hound reads, so it is checked first.
    let max_s = match max_seconds() {
        Ok(s) => s,
        Err(e) => return Some(Err(e)),
    };
    if let Err(e) = check_length(
        u64::from(reader.duration()),
        channels as u64,
        spec.sample_rate,
        max_s,
        input,
    ) {
        return Some(Err(e));
    }
    let samples = match (spec.sample_format, bits) {
        (hound::SampleFormat::Int, 8) => collect(reader.into_samples::<i8>(), |v| v as f32 / 128.0),
        (hound::SampleFormat::Int, 16) => {
            collect(reader.into_samples::<i16>(), |v| v as f32 / 32768.0)
        }
        // libsndfile reads 24-bit as `x << 8` and scales by 2^-31: the same as 2^-23, exactly.
        (hound::SampleFormat::Int, 24) => {
            collect(reader.into_samples::<i32>(), |v| v as f32 / 8_388_608.0)
        }
        // int32 -> float32 rounds to nearest, as C's `(float) x` does, then an exact 2^-31.
        (hound::SampleFormat::Int, 32) => {
            collect(reader.into_samples::<i32>(), |v| v as f32 / 2_147_483_648.0)
        }
        (hound::SampleFormat::Float, 32) => collect(reader.into_samples::<f32>(), |v| v),
        _ => return None,
    };
    let mut samples = match samples {
        Ok(s) => s,
        Err(problem) => {
            return Some(Err(Error::input(
                input,
                format!("corrupt WAV data: {problem}"),
                EXPECTED,
            )))
        }
    };
    // A data chunk cut short keeps its whole frames, as libsndfile does.
    samples.truncate(samples.len() / channels * channels);
    Some(Ok(Decoded {
        samples,
        channels,
        rate: spec.sample_rate,
    }))
}

/// Bits of one sample's container, from the fmt chunk's block alignment.
fn wav_container_bits(bytes: &[u8], channels: u16) -> Option<u16> {
    let mut pos = 12usize;
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let len = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]);
        let body = pos + 8;
        if id == b"fmt " {
            let align = bytes.get(body + 12..body + 14)?;
            let block_align = u16::from_le_bytes([align[0], align[1]]);
            return (block_align % channels == 0).then(|| block_align / channels * 8);
        }
        // Chunks are padded to an even length.
        pos = body
            .checked_add(len as usize)?
            .checked_add(len as usize & 1)?;
    }
    None
}

/// Reads samples until the end, stopping quietly at a truncated data chunk.
fn collect<S, I>(iter: I, convert: impl Fn(S) -> f32) -> std::result::Result<Vec<f32>, String>
where
    I: Iterator<Item = hound::Result<S>>,
{
    let mut out = Vec::new();
    for s in iter {
        match s {
            Ok(v) => out.push(convert(v)),
            Err(hound::Error::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(out)
}

/// Short, safe file-name suffix from the input's extension (helps ffmpeg with raw streams).
fn suffix_of(input: &str) -> String {
    let name = input.rsplit(['/', '\\']).next().unwrap_or(input);
    let name = name.split(['?', '#']).next().unwrap_or(name);
    match name.rsplit_once('.') {
        Some((_, ext))
            if !ext.is_empty()
                && ext.len() <= 5
                && ext.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            format!(".{}", ext.to_ascii_lowercase())
        }
        _ => String::new(),
    }
}

fn decode_with_ffmpeg(bytes: &[u8], input: &str) -> Result<Decoded> {
    let file = TempFile::with_bytes(bytes, &suffix_of(input))?;

    let probe = Invocation::probe(
        file.path(),
        "a:0",
        "stream=sample_rate,channels,time_base,duration_ts",
    )
    .run_to_end(input)?;
    if !probe.success {
        return Err(Error::input(
            input,
            format!(
                "not a decodable audio file ({})",
                ffmpeg::last_line(&probe.stderr)
            ),
            EXPECTED,
        ));
    }
    let (rate, channels, duration) = parse_probe(&probe.value)
        .ok_or_else(|| Error::input(input, "the file has no audio stream", EXPECTED))?;

    // Native rate and channels; float32 little-endian, interleaved. The output is read up to
    // the length cap only, so a decompression bomb stops there and ffmpeg is killed.
    let max_s = max_seconds()?;
    let frame_bytes = 4 * channels as u64;
    let limit = max_s
        .saturating_mul(u64::from(rate))
        .saturating_mul(frame_bytes)
        .min(MAX_DECODED_BYTES);
    let out = Invocation::decode(
        file.path(),
        "0:a:0",
        &["-f", "f32le", "-acodec", "pcm_f32le"],
    )
    .run(input, move |out| {
        let mut buf = Vec::new();
        out.take(limit + 1).read_to_end(&mut buf)?;
        let end = if buf.len() as u64 > limit {
            ReadEnd::Stopped
        } else {
            ReadEnd::Eof
        };
        Ok((buf, end))
    })?;
    if out.value.len() as u64 > limit {
        // Past the limit by at least one byte: one frame more than `check_length` allows.
        check_length(limit / frame_bytes + 1, channels as u64, rate, max_s, input)?;
    }
    if !out.success {
        return Err(Error::input(
            input,
            format!(
                "ffmpeg could not decode it ({})",
                ffmpeg::last_line(&out.stderr)
            ),
            EXPECTED,
        ));
    }
    let mut samples: Vec<f32> = out
        .value
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    samples.truncate(samples.len() / channels * channels);
    // ffmpeg 5.1 leaves the encoder's end padding on short Ogg/MP4 streams; libsndfile stops at
    // the container's exact length (Ogg granule), so cut to the stream duration when it is
    // counted in samples.
    if let Some(frames) = duration {
        samples.truncate(frames.saturating_mul(channels).max(channels));
    }
    Ok(Decoded {
        samples,
        channels,
        rate,
    })
}

/// `(sample_rate, channels, duration in samples)` of the first audio stream in ffprobe's JSON;
/// the duration only when the stream's time base is one sample.
fn parse_probe(json: &[u8]) -> Option<(u32, usize, Option<usize>)> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    let stream = v.get("streams")?.as_array()?.first()?;
    let rate = match stream.get("sample_rate")? {
        serde_json::Value::String(s) => s.parse::<u32>().ok()?,
        other => u32::try_from(other.as_u64()?).ok()?,
    };
    let channels = usize::try_from(stream.get("channels")?.as_u64()?).ok()?;
    let per_sample = stream.get("time_base").and_then(|t| t.as_str()) == Some(&format!("1/{rate}"));
    let duration = stream
        .get("duration_ts")
        .and_then(|d| d.as_u64())
        .filter(|&d| per_sample && d > 0)
        .and_then(|d| usize::try_from(d).ok());
    (rate > 0 && channels > 0).then_some((rate, channels, duration))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downmix_is_float32_mean() {
        let x = [1.0f32, 0.5, -0.25, 0.75];
        assert_eq!(downmix(&x, 2), vec![0.75, 0.25]);
        assert_eq!(downmix(&x, 1), x.to_vec());
        let three = [0.1f32, 0.2, 0.3];
        assert_eq!(downmix(&three, 3), vec![((0.1f32 + 0.2) + 0.3) / 3.0]);
    }

    #[test]
    fn probe_json_is_read() {
        let j = br#"{"programs":[],"streams":[{"sample_rate":"44100","channels":2}]}"#;
        assert_eq!(parse_probe(j), Some((44100, 2, None)));
        let j = br#"{"streams":[{"sample_rate":"22050","channels":1,"time_base":"1/22050","duration_ts":3307}]}"#;
        assert_eq!(parse_probe(j), Some((22050, 1, Some(3307))));
        let j = br#"{"streams":[{"sample_rate":"22050","channels":1,"time_base":"1/14112000","duration_ts":9}]}"#;
        assert_eq!(parse_probe(j), Some((22050, 1, None)));
        assert_eq!(parse_probe(br#"{"streams":[]}"#), None);
    }

    #[test]
    fn suffix_comes_from_a_plain_extension() {
        assert_eq!(suffix_of("dir/a.MP3"), ".mp3");
        assert_eq!(suffix_of("https://x.org/s.ogg?x=1"), ".ogg");
        assert_eq!(suffix_of("stdin"), "");
        assert_eq!(suffix_of("a.b/c"), "");
    }
}

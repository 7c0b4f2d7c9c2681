//! The Whisper log-mel front end shared by every audio family (Whisper, Qwen2-Audio, Ultravox).
//!
//! Reproduces transformers' `WhisperFeatureExtractor` (its numpy path): pad or truncate to
//! 30 s, centred STFT with reflect padding, periodic Hann window, power spectrum, Slaney mel
//! filters, `log10(max(mel, 1e-10))`, clamp to `max - 8`, then `(x + 4) / 4`. The STFT and the
//! mel projection run in f64 as numpy does, so features agree with it to ~1e-6; transformers'
//! torch path (f32 STFT) differs from both by up to ~3e-5.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::media::resample::resample;
use crate::media::Audio;

/// Sample rate every Whisper-style extractor expects.
pub const SAMPLE_RATE: u32 = 16_000;

/// Parameters of the extractor (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct MelConfig {
    pub n_mels: usize,
    pub n_fft: usize,
    pub hop_length: usize,
    pub sampling_rate: u32,
    /// Padding/truncation target in samples (`chunk_length * sampling_rate`).
    pub n_samples: usize,
}

impl MelConfig {
    /// Whisper's defaults with `n_mels` bins (80, or 128 for large-v3 and Qwen2-Audio).
    pub fn whisper(n_mels: usize) -> Self {
        Self {
            n_mels,
            n_fft: 400,
            hop_length: 160,
            sampling_rate: SAMPLE_RATE,
            n_samples: 30 * SAMPLE_RATE as usize,
        }
    }

    /// Seconds of audio the features cover (`n_samples` at `sampling_rate`); longer audio
    /// is cut.
    pub fn window_s(&self) -> f64 {
        self.n_samples as f64 / f64::from(self.sampling_rate)
    }

    /// Reads `feature_size`, `n_fft`, `hop_length`, `sampling_rate`, `chunk_length` /
    /// `n_samples` from a `preprocessor_config.json` value (absent keys keep Whisper's defaults).
    pub fn from_preprocessor(value: &serde_json::Value, what: &str) -> Result<Self> {
        let get = |key: &str, default: usize| -> Result<usize> {
            match value.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    Error::input(what, format!("`{key}` is {v}"), "a non-negative integer")
                }),
            }
        };
        let n_mels = get("feature_size", 80)?;
        let n_fft = get("n_fft", 400)?;
        let hop_length = get("hop_length", 160)?;
        let sampling_rate = get("sampling_rate", SAMPLE_RATE as usize)?;
        let chunk = get("chunk_length", 30)?;
        let n_samples = get("n_samples", chunk * sampling_rate)?;
        if n_mels == 0 || n_fft < 2 || hop_length == 0 || sampling_rate == 0 || n_samples == 0 {
            return Err(Error::input(
                what,
                "zero or too small feature_size / n_fft / hop_length / sampling_rate / n_samples",
                "a Whisper feature extractor configuration",
            ));
        }
        Ok(Self {
            n_mels,
            n_fft,
            hop_length,
            sampling_rate: sampling_rate as u32,
            n_samples,
        })
    }
}

/// How the waveform is brought to a length before the STFT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// `padding="max_length", truncation=True`: exactly `n_samples` (30 s), zero padded.
    MaxLength,
    /// No padding (`padding="longest"` for one item): the audio's own length.
    None,
    /// `padding="max_length", truncation=True, max_length=n`: exactly `n` samples.
    ToLength(usize),
}

/// How an audio family brings a resampled waveform to the extractor's input length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// [`Padding::MaxLength`]: padded or truncated to 30 s (Whisper, Qwen2-Audio).
    MaxLength,
    /// At least two hops of samples (zeros added count as audio), then zero padded to a whole
    /// hop and never truncated (`UltravoxProcessor`).
    WholeHops,
}

/// Log-mel features of one waveform.
#[derive(Debug, Clone)]
pub struct LogMel {
    /// Row-major `(n_mels, frames)`.
    pub data: Vec<f32>,
    pub n_mels: usize,
    pub frames: usize,
    /// Frames covering real (unpadded) samples: the sum of HF's `attention_mask`.
    pub valid_frames: usize,
}

impl LogMel {
    /// HF's `attention_mask` over frames: 1 for the first `valid_frames`, 0 after.
    pub fn attention_mask(&self) -> Vec<u32> {
        (0..self.frames)
            .map(|i| u32::from(i < self.valid_frames))
            .collect()
    }

    /// `(1, n_mels, frames)` tensor, as the model's `input_features`.
    pub fn to_tensor(
        &self,
        device: &candle_core::Device,
        dtype: candle_core::DType,
    ) -> Result<candle_core::Tensor> {
        let t = candle_core::Tensor::from_slice(&self.data, (1, self.n_mels, self.frames), device)?;
        Ok(t.to_dtype(dtype)?)
    }
}

/// A reusable extractor: the window, mel filters and FFT plan are built once.
#[derive(Debug, Clone)]
pub struct MelExtractor {
    config: MelConfig,
    window: Vec<f64>,
    /// Row-major `(n_mels, n_fft / 2 + 1)`.
    filters: Vec<f64>,
    /// Per filter, the bins `[start, end)` outside which its weights are zero (skipping
    /// zeros leaves the f64 sums unchanged).
    support: Vec<(usize, usize)>,
    fft: Fft,
}

impl MelExtractor {
    pub fn new(config: MelConfig) -> Self {
        let n = config.n_fft;
        // Periodic Hann: numpy's hanning(n + 1) without its last point.
        let window = (0..n)
            .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos())
            .collect();
        let filters = slaney_mel_filters(
            n / 2 + 1,
            config.n_mels,
            0.0,
            8000.0,
            config.sampling_rate as f64,
        );
        let n_freq = n / 2 + 1;
        let support = filters
            .chunks(n_freq)
            .map(|row| {
                let start = row.iter().position(|&w| w != 0.0).unwrap_or(0);
                let end = row.iter().rposition(|&w| w != 0.0).map_or(0, |e| e + 1);
                (start, end.max(start))
            })
            .collect();
        Self {
            window,
            filters,
            support,
            fft: Fft::new(n),
            config,
        }
    }

    pub fn config(&self) -> &MelConfig {
        &self.config
    }

    /// Features of one audio item as the families' processors compute them: audio at another
    /// rate is first resampled to the extractor's rate with soxr HQ (as transformers'
    /// `load_audio`, librosa, does), then brought to length per `fit`.
    pub fn log_mel(&self, audio: &Audio, fit: Fit) -> Result<LogMel> {
        let rate = self.config.sampling_rate;
        let mut samples = if audio.sample_rate == rate {
            Cow::Borrowed(audio.samples.as_slice())
        } else {
            Cow::Owned(resample(&audio.samples, audio.sample_rate, rate)?)
        };
        let padding = match fit {
            Fit::MaxLength => Padding::MaxLength,
            Fit::WholeHops => {
                let hop = self.config.hop_length;
                if samples.len() < 2 * hop {
                    samples.to_mut().resize(2 * hop, 0.0);
                }
                Padding::ToLength(samples.len().div_ceil(hop) * hop)
            }
        };
        self.compute(&samples, padding, "audio")
    }

    /// Features of mono `samples` at the configured rate; `what` names the input in errors.
    pub fn compute(&self, samples: &[f32], padding: Padding, what: &str) -> Result<LogMel> {
        let cfg = &self.config;
        if samples.is_empty() {
            return Err(Error::input(
                what,
                "no audio samples",
                "at least one sample",
            ));
        }
        if let Some(bad) = samples.iter().find(|s| !s.is_finite()) {
            return Err(Error::input(
                what,
                format!("sample value {bad}"),
                "finite audio samples",
            ));
        }
        let len = match padding {
            Padding::MaxLength => cfg.n_samples,
            Padding::None => samples.len(),
            Padding::ToLength(n) => n,
        };
        let valid_samples = samples.len().min(len);
        let half = cfg.n_fft / 2;
        if len <= half {
            return Err(Error::input(
                what,
                format!("{len} samples are too short for reflect padding"),
                format!("more than {half} samples"),
            ));
        }
        // Waveform as HF pads it (f32 zeros), then reflect-padded by n_fft/2 on both sides.
        let wave: Vec<f64> = (0..len)
            .map(|i| samples.get(i).map_or(0.0, |&s| f64::from(s)))
            .collect();
        let mut padded = Vec::with_capacity(len + 2 * half);
        padded.extend((1..=half).rev().map(|i| wave[i]));
        padded.extend_from_slice(&wave);
        padded.extend((1..=half).map(|i| wave[len - 1 - i]));

        // HF computes 1 + len / hop frames and drops the last one.
        let frames = len / cfg.hop_length;
        let n_freq = cfg.n_fft / 2 + 1;
        // Frames in parallel, each into its own row of `by_frame` (frames, n_mels).
        let mut by_frame = vec![0.0f32; frames * cfg.n_mels];
        let scratch = || {
            let zero = Complex::default();
            (
                vec![0.0f64; n_freq],
                vec![zero; cfg.n_fft],
                vec![zero; cfg.n_fft],
            )
        };
        by_frame
            .par_chunks_mut(cfg.n_mels)
            .enumerate()
            .for_each_init(scratch, |(power, buf, scratch), (t, out)| {
                let window = &padded[t * cfg.hop_length..t * cfg.hop_length + cfg.n_fft];
                // A window of zeros (the padding after a short utterance) has a spectrum of
                // zeros: every mel value is then log10 of the 1e-10 floor, as computed below.
                if window.iter().all(|&x| x == 0.0) {
                    out.fill(1e-10f64.log10() as f32);
                    return;
                }
                for ((c, &x), &w) in buf.iter_mut().zip(window).zip(&self.window) {
                    *c = Complex { re: x * w, im: 0.0 };
                }
                self.fft.run(buf, scratch);
                for (p, c) in power.iter_mut().zip(buf.iter()) {
                    // numpy stores the spectrum as complex64 before taking |.|^2 in f64.
                    let re = f64::from(c.re as f32);
                    let im = f64::from(c.im as f32);
                    *p = re * re + im * im;
                }
                for (m, &(lo, hi)) in self.support.iter().enumerate() {
                    let row = &self.filters[m * n_freq + lo..m * n_freq + hi];
                    let mel: f64 = row.iter().zip(&power[lo..hi]).map(|(w, p)| w * p).sum();
                    out[m] = mel.max(1e-10).log10() as f32;
                }
            });
        let mut logmel = vec![0.0f32; cfg.n_mels * frames];
        for (t, row) in by_frame.chunks_exact(cfg.n_mels).enumerate() {
            for (m, &v) in row.iter().enumerate() {
                logmel[m * frames + t] = v;
            }
        }
        let max = logmel.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let floor = max - 8.0;
        for v in &mut logmel {
            *v = (v.max(floor) + 4.0) / 4.0;
        }
        // HF: attention_mask[::hop] over the padded length, minus its last entry when the
        // length is not a multiple of hop (matching the dropped frame).
        let hop = cfg.hop_length;
        let mut valid_frames = valid_samples.div_ceil(hop);
        if len % hop != 0 && (len.div_ceil(hop) - 1) * hop < valid_samples {
            valid_frames -= 1;
        }
        Ok(LogMel {
            data: logmel,
            n_mels: cfg.n_mels,
            frames,
            valid_frames,
        })
    }
}

fn hz_to_mel_slaney(hz: f64) -> f64 {
    let logstep = 27.0 / 6.4f64.ln();
    if hz >= 1000.0 {
        15.0 + (hz / 1000.0).ln() * logstep
    } else {
        3.0 * hz / 200.0
    }
}

fn mel_to_hz_slaney(mel: f64) -> f64 {
    let logstep = 6.4f64.ln() / 27.0;
    if mel >= 15.0 {
        1000.0 * (logstep * (mel - 15.0)).exp()
    } else {
        200.0 * mel / 3.0
    }
}

/// numpy's `linspace(start, stop, num)` (endpoint included, exact last value).
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| start + i as f64 * step).collect();
    v[num - 1] = stop;
    v
}

/// transformers' `mel_filter_bank(norm="slaney", mel_scale="slaney")`, transposed to
/// row-major `(n_mels, n_freq)`.
pub fn slaney_mel_filters(
    n_freq: usize,
    n_mels: usize,
    f_min: f64,
    f_max: f64,
    sampling_rate: f64,
) -> Vec<f64> {
    let mels = linspace(hz_to_mel_slaney(f_min), hz_to_mel_slaney(f_max), n_mels + 2);
    let edges: Vec<f64> = mels.into_iter().map(mel_to_hz_slaney).collect();
    // numpy: linspace(0, sampling_rate // 2, n_freq).
    let fft_freqs = linspace(0.0, (sampling_rate / 2.0).floor(), n_freq);
    let mut out = vec![0.0; n_mels * n_freq];
    for m in 0..n_mels {
        let enorm = 2.0 / (edges[m + 2] - edges[m]);
        for (k, &f) in fft_freqs.iter().enumerate() {
            let down = -(edges[m] - f) / (edges[m + 1] - edges[m]);
            let up = (edges[m + 2] - f) / (edges[m + 2] - edges[m + 1]);
            out[m * n_freq + k] = 0.0f64.max(down.min(up)) * enorm;
        }
    }
    out
}

#[derive(Debug, Clone, Copy, Default)]
struct Complex {
    re: f64,
    im: f64,
}

impl Complex {
    fn mul(self, o: Complex) -> Complex {
        Complex {
            re: self.re * o.re - self.im * o.im,
            im: self.re * o.im + self.im * o.re,
        }
    }
}

/// Mixed-radix decimation-in-time FFT for any length (factors 2, 3, 4, 5 get small
/// butterflies; other primes a direct DFT of that size). 400 = 4·4·5·5.
#[derive(Debug, Clone)]
struct Fft {
    n: usize,
    factors: Vec<usize>,
    /// `exp(-2πi k / n)` for k in 0..n.
    twiddles: Vec<Complex>,
}

impl Fft {
    fn new(n: usize) -> Self {
        let mut factors = Vec::new();
        let mut rest = n;
        for p in [4, 2, 3, 5] {
            while rest.is_multiple_of(p) {
                factors.push(p);
                rest /= p;
            }
        }
        let mut p = 7;
        while rest > 1 {
            while rest.is_multiple_of(p) {
                factors.push(p);
                rest /= p;
            }
            p += 2;
        }
        let twiddles = (0..n)
            .map(|k| {
                let a = -2.0 * std::f64::consts::PI * k as f64 / n as f64;
                Complex {
                    re: a.cos(),
                    im: a.sin(),
                }
            })
            .collect();
        Self {
            n,
            factors,
            twiddles,
        }
    }

    /// In-place forward transform of `data` (`scratch` of the same length).
    fn run(&self, data: &mut [Complex], scratch: &mut [Complex]) {
        debug_assert_eq!(data.len(), self.n);
        scratch.copy_from_slice(data);
        self.step(scratch, 1, data, &self.factors, 1);
    }

    /// Transforms `input[0], input[stride], ...` (n / tw_stride items) into `out`.
    fn step(
        &self,
        input: &[Complex],
        stride: usize,
        out: &mut [Complex],
        factors: &[usize],
        tw_stride: usize,
    ) {
        let n = out.len();
        let Some((&p, rest)) = factors.split_first() else {
            out[0] = input[0];
            return;
        };
        let m = n / p;
        for j in 0..p {
            self.step(
                &input[j * stride..],
                stride * p,
                &mut out[j * m..(j + 1) * m],
                rest,
                tw_stride * p,
            );
        }
        // Butterflies: out[q*m + k] = sum_j W_n^{j(k + q m)} sub_j[k].
        let mut t = [Complex::default(); 8];
        let mut big = Vec::new();
        let terms: &mut [Complex] = if p <= t.len() {
            &mut t[..p]
        } else {
            big.resize(p, Complex::default());
            &mut big
        };
        for k in 0..m {
            for (j, term) in terms.iter_mut().enumerate() {
                let w = self.twiddles[(j * k * tw_stride) % self.n];
                *term = out[j * m + k].mul(w);
            }
            for q in 0..p {
                let mut acc = Complex::default();
                for (j, term) in terms.iter().enumerate() {
                    // W_p^{jq} = W_n^{jq m tw_stride}
                    let w = self.twiddles[(j * q * m * tw_stride) % self.n];
                    let v = term.mul(w);
                    acc.re += v.re;
                    acc.im += v.im;
                }
                out[q * m + k] = acc;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_dft(x: &[Complex]) -> Vec<Complex> {
        let n = x.len();
        (0..n)
            .map(|k| {
                let mut acc = Complex::default();
                for (i, v) in x.iter().enumerate() {
                    let a = -2.0 * std::f64::consts::PI * ((i * k) % n) as f64 / n as f64;
                    let w = Complex {
                        re: a.cos(),
                        im: a.sin(),
                    };
                    let p = v.mul(w);
                    acc.re += p.re;
                    acc.im += p.im;
                }
                acc
            })
            .collect()
    }

    #[test]
    fn fft_matches_direct_dft_for_mixed_radix_lengths() {
        for n in [1, 2, 3, 5, 8, 12, 14, 25, 400, 512] {
            let x: Vec<Complex> = (0..n)
                .map(|i| Complex {
                    re: ((i * 7919) % 97) as f64 / 97.0 - 0.5,
                    im: ((i * 104_729) % 89) as f64 / 89.0 - 0.5,
                })
                .collect();
            let want = naive_dft(&x);
            let fft = Fft::new(n);
            let mut got = x.clone();
            let mut scratch = x.clone();
            fft.run(&mut got, &mut scratch);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g.re - w.re).abs() < 1e-9 && (g.im - w.im).abs() < 1e-9,
                    "n={n}"
                );
            }
        }
    }

    #[test]
    fn mel_filters_are_slaney_normalised_triangles() {
        let f = slaney_mel_filters(201, 80, 0.0, 8000.0, 16000.0);
        for m in 0..80 {
            let row = &f[m * 201..(m + 1) * 201];
            assert!(row.iter().all(|&w| w >= 0.0));
            assert!(row.iter().any(|&w| w > 0.0), "filter {m} empty");
        }
        // The first filter starts at 0 Hz: bin 0 has weight 0, bin 1 is on its rising edge.
        assert_eq!(f[0], 0.0);
        assert!(f[1] > 0.0);
    }

    #[test]
    fn silence_and_short_input() {
        let ex = MelExtractor::new(MelConfig::whisper(80));
        let out = ex
            .compute(&vec![0.0; 16000], Padding::MaxLength, "a.wav")
            .unwrap();
        assert_eq!((out.n_mels, out.frames, out.valid_frames), (80, 3000, 100));
        // All-zero power clamps to 1e-10 -> log10 = -10 everywhere -> (-10 + 4) / 4.
        assert!(out.data.iter().all(|&v| v == -1.5));
        // A length that is not a multiple of hop: one frame fewer than the mask's stride count.
        let out = ex
            .compute(&[0.1; 1000], Padding::ToLength(1050), "a.wav")
            .unwrap();
        assert_eq!((out.frames, out.valid_frames), (6, 6));
        let out = ex
            .compute(&[0.1; 800], Padding::ToLength(1050), "a.wav")
            .unwrap();
        assert_eq!((out.frames, out.valid_frames), (6, 5));
        let err = ex.compute(&[], Padding::None, "a.wav").unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = ex.compute(&[0.5; 100], Padding::None, "a.wav").unwrap_err();
        assert!(err.to_string().contains("too short"), "{err}");
    }
}

//! Next-token selection from one step's logits, following Hugging Face `generate`: repetition
//! penalty, then greedy argmax (temperature 0) or temperature, top-k, top-p and a seeded draw.
//! Also the log-softmax and top-N helpers behind `--logprobs`. Pure: no model, no tensors.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Ordering;

use crate::error::{Error, Result};

/// The sampling flags of one request (`--temperature`, `--top-p`, `--top-k`,
/// `--repetition-penalty`, `--seed`). The default is greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability sums to `>= top_p`.
    pub top_p: Option<f64>,
    /// Keep only the `top_k` most probable tokens (ties with the k-th are kept, as in HF).
    pub top_k: Option<usize>,
    /// HF's `repetition_penalty`: > 1 discourages tokens already in the prompt or output.
    pub repetition_penalty: Option<f32>,
    /// Seed of the random draw; the same seed reproduces the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: None,
            top_k: None,
            repetition_penalty: None,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Rejects values HF `generate` would reject or that make no sense (exit 2).
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(Error::usage(format!(
                "--temperature: got {t}, expected a finite number >= 0 (0 = greedy)"
            )));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::usage(format!(
                    "--top-p: got {p}, expected a number in (0, 1]"
                )));
            }
        }
        if self.top_k == Some(0) {
            return Err(Error::usage(
                "--top-k: got 0, expected a positive integer (leave it out to disable top-k)",
            ));
        }
        if let Some(r) = self.repetition_penalty {
            if !(r.is_finite() && r > 0.0) {
                return Err(Error::usage(format!(
                    "--repetition-penalty: got {r}, expected a finite number > 0 (1 = no penalty)"
                )));
            }
        }
        Ok(())
    }

    /// True when no random draw happens (temperature 0; unvalidated values that are not a
    /// positive finite number count as greedy too).
    pub fn is_greedy(&self) -> bool {
        !(self.temperature > 0.0 && self.temperature.is_finite())
    }
}

/// Picks tokens for one sequence; owns that sequence's random generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch buffers reused across steps (vocabularies reach 150k+ entries).
    scores: Vec<f32>,
    weights: Vec<f64>,
}

impl Sampler {
    /// `params` should have passed [`SamplingParams::validate`]; out-of-range values are
    /// clamped to the nearest meaningful behaviour rather than panicking.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler {
            params,
            rng,
            scores: Vec::new(),
            weights: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// True when the choice is the argmax of the raw logits (greedy, no repetition penalty),
    /// so it can be taken where the logits are (on the GPU, copying one id back).
    pub fn is_plain_argmax(&self) -> bool {
        self.params.is_greedy() && self.params.repetition_penalty.is_none_or(|p| p == 1.0)
    }

    /// Chooses the next token from `logits` (one row, vocabulary-sized). `context` holds the
    /// ids the repetition penalty looks at: the prompt's input ids followed by the generated
    /// ids, exactly as HF's `input_ids` at that step.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        self.penalize(logits, context);
        if self.params.is_greedy() || !self.fill_weights() {
            return argmax(&self.scores);
        }
        let total: f64 = self.weights.iter().sum();
        let target = self.rng.random::<f64>() * total;
        let mut acc = 0.0;
        let mut last_kept = 0;
        for (i, &w) in self.weights.iter().enumerate() {
            if w > 0.0 {
                last_kept = i;
                acc += w;
                if acc > target {
                    return i as u32;
                }
            }
        }
        // Rounding can leave `acc` a hair under `target`: take the last kept token.
        last_kept as u32
    }

    /// The distribution [`sample`](Self::sample) would draw from for these logits, after
    /// every transform (one-hot on the argmax when greedy). Does not advance the generator.
    pub fn probabilities(&mut self, logits: &[f32], context: &[u32]) -> Vec<f64> {
        if logits.is_empty() {
            return Vec::new();
        }
        self.penalize(logits, context);
        if self.params.is_greedy() || !self.fill_weights() {
            let mut p = vec![0.0; logits.len()];
            p[argmax(&self.scores) as usize] = 1.0;
            return p;
        }
        let total: f64 = self.weights.iter().sum();
        self.weights.iter().map(|w| w / total).collect()
    }

    /// `scores` := logits after the repetition penalty (HF applies it before any warper).
    fn penalize(&mut self, logits: &[f32], context: &[u32]) {
        self.scores.clear();
        self.scores.extend_from_slice(logits);
        if let Some(penalty) = self.params.repetition_penalty {
            apply_repetition_penalty(&mut self.scores, context, penalty);
        }
    }

    /// `weights` := unnormalised probabilities after temperature, top-k and top-p. False when
    /// there is nothing to weigh (all logits masked, or an infinite one): take the argmax.
    fn fill_weights(&mut self) -> bool {
        let max = self
            .scores
            .iter()
            .copied()
            .filter(|x| !x.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        if max.is_infinite() {
            return false;
        }
        let t = self.params.temperature;
        // exp((x - max) / t): the same distribution as softmax(x / t), without overflow for
        // tiny temperatures. NaN logits get no weight.
        self.weights.clear();
        self.weights.extend(self.scores.iter().map(|&x| {
            if x.is_nan() {
                0.0
            } else {
                ((f64::from(x) - f64::from(max)) / t).exp()
            }
        }));
        if let Some(k) = self.params.top_k {
            top_k_filter(&mut self.weights, k.max(1));
        }
        if let Some(p) = self.params.top_p {
            if p < 1.0 {
                top_p_filter(&mut self.weights, p);
            }
        }
        let total: f64 = self.weights.iter().sum();
        total > 0.0 && total.is_finite()
    }
}

/// HF's `RepetitionPenaltyLogitsProcessor`: every distinct id in `context` has its logit divided
/// by `penalty` when positive and multiplied by it when negative. Ids outside the vocabulary
/// are ignored.
pub fn apply_repetition_penalty(scores: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; scores.len()];
    for &id in context {
        let i = id as usize;
        if i < scores.len() && !seen[i] {
            seen[i] = true;
            let s = scores[i];
            scores[i] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// Index of the largest value; ties go to the lowest index and a NaN wins, like `torch.argmax`.
pub fn argmax(values: &[f32]) -> u32 {
    crate::kernels::argmax_slice(values)
}

/// HF's `TopKLogitsWarper`: zero every weight below the k-th largest (ties with it survive).
fn top_k_filter(w: &mut [f64], k: usize) {
    if k >= w.len() {
        return;
    }
    let mut sorted: Vec<f64> = w.to_vec();
    // Descending; the k-th largest ends up at index k - 1.
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = *kth;
    for x in w.iter_mut() {
        if *x < threshold {
            *x = 0.0;
        }
    }
}

/// HF's `TopPLogitsWarper`: a token survives unless the tokens strictly more probable than it
/// already hold `>= top_p` of the mass; the most probable token always survives.
fn top_p_filter(w: &mut [f64], top_p: f64) {
    let total: f64 = w.iter().sum();
    if !(total > 0.0 && total.is_finite()) {
        return;
    }
    let mut order: Vec<u32> = (0..w.len() as u32)
        .filter(|&i| w[i as usize] > 0.0)
        .collect();
    let by_weight_desc = |a: &u32, b: &u32| -> Ordering {
        w[*b as usize]
            .total_cmp(&w[*a as usize])
            .then_with(|| a.cmp(b))
    };
    // Sort only as much of the head as the nucleus needs: it is usually a few hundred tokens
    // out of a vocabulary of 32k-150k.
    let mut sorted_len = 0usize;
    let mut chunk = 64usize;
    let mut acc = 0.0f64;
    let mut keep = None;
    while keep.is_none() && sorted_len < order.len() {
        let len = order.len();
        let end = (sorted_len + chunk).min(len);
        let rest = &mut order[sorted_len..];
        if end < len {
            rest.select_nth_unstable_by(end - sorted_len - 1, by_weight_desc);
        }
        rest[..end - sorted_len].sort_unstable_by(by_weight_desc);
        for (j, &i) in order[sorted_len..end].iter().enumerate() {
            if acc / total >= top_p {
                keep = Some(sorted_len + j);
                break;
            }
            acc += w[i as usize];
        }
        sorted_len = end;
        chunk *= 4;
    }
    if let Some(n) = keep {
        for &i in &order[n.max(1)..] {
            w[i as usize] = 0.0;
        }
    }
}

/// Numerically stable log-softmax over one row (f64 accumulation). Entries of `-inf` stay
/// `-inf`; a row with no finite entry yields all `-inf`.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return vec![f32::NEG_INFINITY; logits.len()];
    }
    let max = f64::from(max);
    let sum: f64 = logits
        .iter()
        .map(|&x| (f64::from(x) - max).exp())
        .filter(|e| e.is_finite())
        .sum();
    let lse = max + sum.ln();
    logits
        .iter()
        .map(|&x| (f64::from(x) - lse) as f32)
        .collect()
}

/// The `n` best entries of a log-prob row as `(token_id, logprob)`, best first; equal values
/// are ordered by lower id, and NaN sorts last.
pub fn top_logprobs(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let n = n.min(logprobs.len());
    if n == 0 {
        return Vec::new();
    }
    let cmp = |a: &(u32, f32), b: &(u32, f32)| -> Ordering {
        match (a.1.is_nan(), b.1.is_nan()) {
            (true, true) => a.0.cmp(&b.0),
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)),
        }
    };
    let mut all: Vec<(u32, f32)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, v))
        .collect();
    if n < all.len() {
        all.select_nth_unstable_by(n - 1, cmp);
        all.truncate(n);
    }
    all.sort_unstable_by(cmp);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f64, top_k: Option<usize>, top_p: Option<f64>, seed: u64) -> Sampler {
        Sampler::new(SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
            ..SamplingParams::default()
        })
    }

    #[test]
    fn validate_rejects_out_of_range_values() {
        let ok = SamplingParams::default();
        assert!(ok.validate().is_ok());
        let bad = [
            SamplingParams {
                temperature: -0.1,
                ..ok.clone()
            },
            SamplingParams {
                temperature: f64::NAN,
                ..ok.clone()
            },
            SamplingParams {
                top_p: Some(0.0),
                ..ok.clone()
            },
            SamplingParams {
                top_p: Some(1.01),
                ..ok.clone()
            },
            SamplingParams {
                top_k: Some(0),
                ..ok.clone()
            },
            SamplingParams {
                repetition_penalty: Some(0.0),
                ..ok.clone()
            },
            SamplingParams {
                repetition_penalty: Some(-1.0),
                ..ok.clone()
            },
        ];
        for p in bad {
            let err = p.validate().expect_err("must be rejected");
            assert_eq!(err.exit_code(), 2, "{p:?}");
        }
        let fine = SamplingParams {
            temperature: 0.7,
            top_p: Some(1.0),
            top_k: Some(1),
            repetition_penalty: Some(1.3),
            seed: 7,
        };
        assert!(fine.validate().is_ok());
    }

    #[test]
    fn argmax_takes_lowest_index_on_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[-5.0, -1.0, -1.0]), 1);
    }

    #[test]
    fn top_k_keeps_ties_with_the_kth() {
        let mut w = vec![0.1, 0.4, 0.2, 0.2, 0.05];
        top_k_filter(&mut w, 2);
        assert_eq!(w, vec![0.0, 0.4, 0.2, 0.2, 0.0]);
    }

    #[test]
    fn top_p_keeps_the_smallest_covering_set() {
        // Probabilities 0.5, 0.3, 0.15, 0.05: 0.5 + 0.3 = 0.8 >= 0.8 keeps two tokens.
        let mut w = vec![0.15, 0.5, 0.05, 0.3];
        top_p_filter(&mut w, 0.8);
        assert_eq!(w, vec![0.0, 0.5, 0.0, 0.3]);
        // 0.81 needs the third.
        let mut w = vec![0.15, 0.5, 0.05, 0.3];
        top_p_filter(&mut w, 0.81);
        assert_eq!(w, vec![0.15, 0.5, 0.0, 0.3]);
        // A tiny top_p still keeps the best token.
        let mut w = vec![0.15, 0.5, 0.05, 0.3];
        top_p_filter(&mut w, 1e-9);
        assert_eq!(w, vec![0.0, 0.5, 0.0, 0.0]);
    }

    #[test]
    fn top_p_over_a_large_vocabulary_matches_a_full_sort() {
        // Exercises the chunked partial sort past its first chunks.
        let n = 5000;
        let w: Vec<f64> = (0..n)
            .map(|i| 1.0 + ((i * 7919) % 1000) as f64 / 1000.0)
            .collect();
        let mut fast = w.clone();
        top_p_filter(&mut fast, 0.9);
        let total: f64 = w.iter().sum();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
        let mut acc = 0.0;
        let mut expected = vec![0.0; n];
        for &i in &order {
            if acc / total >= 0.9 {
                break;
            }
            expected[i] = w[i];
            acc += w[i];
        }
        assert_eq!(fast, expected);
        assert!(fast.iter().filter(|&&x| x > 0.0).count() > 64 * 5);
    }

    #[test]
    fn tiny_temperature_does_not_overflow() {
        let mut s = sampling(1e-30, None, None, 1);
        for _ in 0..20 {
            assert_eq!(s.sample(&[1.0, 3.0, 2.9], &[]), 1);
        }
    }

    #[test]
    fn masked_logits_are_never_drawn() {
        let mut s = sampling(1.0, None, None, 3);
        let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0];
        for _ in 0..200 {
            let id = s.sample(&logits, &[]);
            assert!(id == 1 || id == 3, "{id}");
        }
    }

    #[test]
    fn log_softmax_of_all_masked_row_is_all_neg_inf() {
        let out = log_softmax(&[f32::NEG_INFINITY; 3]);
        assert!(out.iter().all(|&x| x == f32::NEG_INFINITY));
    }

    #[test]
    fn top_logprobs_handles_n_larger_than_vocab_and_nan() {
        let got = top_logprobs(&[-1.0, f32::NAN, -0.5], 10);
        assert_eq!(got[0], (2, -0.5));
        assert_eq!(got[1], (0, -1.0));
        assert_eq!(got[2].0, 1);
        assert!(top_logprobs(&[-1.0], 0).is_empty());
    }
}

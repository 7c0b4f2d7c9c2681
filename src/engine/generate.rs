//! The generation loop for one sequence: prefill of text + media embeddings, then decode with
//! the sampler, EOS and stop strings, emitting events as text becomes valid UTF-8.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;
use tokenizers::Tokenizer;

use super::detok::Detokenizer;
use super::sampler::{log_softmax, top_logprobs, Sampler, SamplingParams};
use super::stop::StopMatcher;
use crate::error::{Error, Result};
use crate::models::kv::KvCache;
use crate::models::{EncodedItem, Model};
use crate::prompt::Spliced;

/// Everything the engine needs to run one prompt.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt ids with every media placeholder expanded to its slots.
    pub prompt: Spliced,
    /// Encoded media, indexed by `Span::item`.
    pub items: Vec<EncodedItem>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Token ids that end generation (not emitted).
    pub eos: Vec<u32>,
    /// Report the top-N log-probabilities of every step.
    pub logprobs: Option<usize>,
    /// When the request began (before its media were encoded): time to first token and total
    /// time count from here, so the vision or audio encoder is part of TTFT.
    pub started: Instant,
}

/// Something the engine reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Prefill finished: the first token is about to be sampled.
    Started { prompt_tokens: usize },
    /// Newly completed text (never a split UTF-8 character).
    Text(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TopLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    pub top: Vec<TopLogprob>,
}

/// The result of one prompt.
#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Seconds from the request's start (media encoding included) to the first sampled token.
    pub ttft_s: f64,
    /// Seconds from the request's start to the end.
    pub total_s: f64,
}

/// Runs `req` to completion, calling `on_event` as text becomes available.
pub fn generate(
    model: &dyn Model,
    tokenizer: &Arc<Tokenizer>,
    req: &Request,
    on_event: &mut dyn FnMut(Event) -> Result<()>,
) -> Result<Completion> {
    let mut seq = Sequence::prefill(model, tokenizer, req, on_event)?;
    while let Some(id) = seq.step(req, on_event)? {
        let logits = model.decode(id, &mut seq.cache)?;
        seq.set_logits(logits);
    }
    seq.finish(req, on_event)
}

/// One sequence being generated: its cache, sampler, detokenizer and stop matcher, and the
/// output so far. [`generate`] drives one; the scheduler drives many, batching their decode
/// steps. Either way the per-token logic below is the same, so results are too.
pub struct Sequence {
    /// The sequence's own KV cache, lent to the model for each decode.
    pub cache: KvCache,
    capacity: usize,
    start: Instant,
    logits: Option<Tensor>,
    sampler: Sampler,
    detok: Detokenizer,
    stops: StopMatcher,
    ttft_s: Option<f64>,
    context: Vec<u32>,
    token_ids: Vec<u32>,
    text: String,
    logprobs: Option<Vec<TokenLogprob>>,
    finish_reason: FinishReason,
    stopped_by_string: bool,
    done: bool,
}

impl Sequence {
    /// KV positions `req` needs (prompt plus generated tokens, within the model's limit).
    pub fn capacity(model: &dyn Model, req: &Request) -> usize {
        req.prompt
            .ids
            .len()
            .saturating_add(req.max_tokens)
            .min(model.info().max_positions)
    }

    /// Checks the prompt fits, runs the prefill and reports [`Event::Started`].
    pub fn prefill(
        model: &dyn Model,
        tokenizer: &Arc<Tokenizer>,
        req: &Request,
        on_event: &mut dyn FnMut(Event) -> Result<()>,
    ) -> Result<Self> {
        let start = req.started;
        let prompt_len = req.prompt.ids.len();
        let max_positions = model.info().max_positions;
        if prompt_len >= max_positions {
            return Err(Error::input(
                "prompt",
                format!("{prompt_len} tokens with media expanded"),
                format!("fewer than the model's {max_positions} positions"),
            ));
        }
        let capacity = Self::capacity(model, req);
        let mut cache = model.new_cache(capacity)?;
        let logits = model.prefill(&req.prompt, &req.items, &mut cache)?;
        on_event(Event::Started {
            prompt_tokens: prompt_len,
        })?;
        Ok(Self {
            cache,
            capacity,
            start,
            logits: Some(logits),
            sampler: Sampler::new(req.sampling.clone()),
            detok: Detokenizer::new(Arc::clone(tokenizer), true),
            stops: StopMatcher::new(req.stop.clone()),
            ttft_s: None,
            context: req.prompt.ids.clone(),
            token_ids: Vec::new(),
            text: String::new(),
            logprobs: req.logprobs.map(|_| Vec::new()),
            finish_reason: FinishReason::Length,
            stopped_by_string: false,
            done: req.max_tokens == 0,
        })
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.token_ids.len()
    }

    /// Hands over the logits of the decode of the token [`Sequence::step`] returned.
    pub fn set_logits(&mut self, logits: Tensor) {
        self.logits = Some(logits);
    }

    /// Samples the next token from the pending logits and emits its text. Returns the token
    /// to decode next, or `None` once the sequence is finished (then call
    /// [`Sequence::finish`]).
    pub fn step(
        &mut self,
        req: &Request,
        on_event: &mut dyn FnMut(Event) -> Result<()>,
    ) -> Result<Option<u32>> {
        if self.done {
            return Ok(None);
        }
        let Some(logits) = self.logits.take() else {
            return Err(anyhow::anyhow!("sequence stepped without logits").into());
        };
        // Greedy without logprobs needs only the argmax: on the GPU one id crosses to the host
        // instead of the vocabulary's logits.
        let on_device = req.logprobs.is_none()
            && self.sampler.is_plain_argmax()
            && !matches!(logits.device(), candle_core::Device::Cpu);
        let (id, row) = if on_device {
            (crate::kernels::argmax(&logits)?, Vec::new())
        } else {
            let row: Vec<f32> = logits.to_vec1()?;
            (self.sampler.sample(&row, &self.context), row)
        };
        let start = self.start;
        self.ttft_s
            .get_or_insert_with(|| start.elapsed().as_secs_f64());
        if req.eos.contains(&id) {
            self.finish_reason = FinishReason::Stop;
            self.done = true;
            return Ok(None);
        }
        if let (Some(n), Some(list)) = (req.logprobs, self.logprobs.as_mut()) {
            let lp = log_softmax(&row);
            list.push(TokenLogprob {
                token_id: id,
                logprob: lp[id as usize],
                top: top_logprobs(&lp, n)
                    .into_iter()
                    .map(|(token_id, logprob)| TopLogprob { token_id, logprob })
                    .collect(),
            });
        }
        self.token_ids.push(id);
        self.context.push(id);
        let piece = self.detok.push(id)?;
        let step = self.stops.push(&piece);
        if !step.emit.is_empty() {
            self.text.push_str(&step.emit);
            on_event(Event::Text(step.emit))?;
        }
        if step.stopped {
            self.finish_reason = FinishReason::Stop;
            self.stopped_by_string = true;
            self.done = true;
            return Ok(None);
        }
        if self.token_ids.len() >= req.max_tokens || self.cache.len() >= self.capacity {
            self.done = true;
            return Ok(None);
        }
        Ok(Some(id))
    }

    /// Flushes the detokenizer and stop matcher and returns the completion.
    pub fn finish(
        mut self,
        req: &Request,
        on_event: &mut dyn FnMut(Event) -> Result<()>,
    ) -> Result<Completion> {
        if !self.stopped_by_string {
            let tail = self.detok.finish()?;
            let step = self.stops.push(&tail);
            let mut rest = step.emit;
            if step.stopped {
                self.finish_reason = FinishReason::Stop;
            } else {
                rest.push_str(&self.stops.finish());
            }
            if !rest.is_empty() {
                self.text.push_str(&rest);
                on_event(Event::Text(rest))?;
            }
        }
        let start = self.start;
        Ok(Completion {
            text: self.text,
            token_ids: self.token_ids,
            finish_reason: self.finish_reason,
            prompt_tokens: req.prompt.ids.len(),
            logprobs: self.logprobs,
            ttft_s: self.ttft_s.unwrap_or_else(|| start.elapsed().as_secs_f64()),
            total_s: start.elapsed().as_secs_f64(),
        })
    }
}

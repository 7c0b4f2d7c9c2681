//! The generation loop for one sequence: prefill of text + media embeddings, then decode with
//! the sampler, EOS and stop strings, emitting events as text becomes valid UTF-8.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokenizers::Tokenizer;

use super::detok::Detokenizer;
use super::sampler::{log_softmax, top_logprobs, Sampler, SamplingParams};
use super::stop::StopMatcher;
use crate::error::{Error, Result};
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
    let capacity = (prompt_len + req.max_tokens).min(max_positions);
    let mut cache = model.new_cache(capacity)?;
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut detok = Detokenizer::new(Arc::clone(tokenizer), true);
    let mut stops = StopMatcher::new(req.stop.clone());

    let mut logits = model.prefill(&req.prompt, &req.items, &mut cache)?;
    on_event(Event::Started {
        prompt_tokens: prompt_len,
    })?;
    let mut ttft_s = None;
    let mut context: Vec<u32> = req.prompt.ids.clone();
    let mut token_ids = Vec::new();
    let mut text = String::new();
    let mut logprobs = req.logprobs.map(|_| Vec::new());
    let mut finish_reason = FinishReason::Length;
    let mut stopped_by_string = false;
    while token_ids.len() < req.max_tokens {
        let row: Vec<f32> = logits.to_vec1()?;
        let id = sampler.sample(&row, &context);
        ttft_s.get_or_insert_with(|| start.elapsed().as_secs_f64());
        if req.eos.contains(&id) {
            finish_reason = FinishReason::Stop;
            break;
        }
        if let (Some(n), Some(list)) = (req.logprobs, logprobs.as_mut()) {
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
        token_ids.push(id);
        context.push(id);
        let piece = detok.push(id)?;
        let step = stops.push(&piece);
        if !step.emit.is_empty() {
            text.push_str(&step.emit);
            on_event(Event::Text(step.emit))?;
        }
        if step.stopped {
            finish_reason = FinishReason::Stop;
            stopped_by_string = true;
            break;
        }
        if token_ids.len() == req.max_tokens || cache.len() >= capacity {
            break;
        }
        logits = model.decode(id, &mut cache)?;
    }
    if !stopped_by_string {
        let tail = detok.finish()?;
        let step = stops.push(&tail);
        let mut rest = step.emit;
        if step.stopped {
            finish_reason = FinishReason::Stop;
        } else {
            rest.push_str(&stops.finish());
        }
        if !rest.is_empty() {
            text.push_str(&rest);
            on_event(Event::Text(rest))?;
        }
    }
    Ok(Completion {
        text,
        token_ids,
        finish_reason,
        prompt_tokens: prompt_len,
        logprobs,
        ttft_s: ttft_s.unwrap_or_else(|| start.elapsed().as_secs_f64()),
        total_s: start.elapsed().as_secs_f64(),
    })
}

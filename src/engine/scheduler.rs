//! Continuous batching: many requests for one model run at once. Up to `max_seqs` sequences
//! are in flight; each step decodes one token for all of them with a single
//! [`Model::decode_batch`]. A finished sequence leaves at once and the next queued request is
//! prefilled and joins at the following step. Admission also respects a cap on the KV
//! positions reserved by the sequences in flight. Each sequence keeps its own sampler,
//! detokenizer and stop matcher ([`Sequence`]), so its result is the one [`generate`] gives.
//!
//! [`generate`]: super::generate::generate

use std::sync::Arc;

use tokenizers::Tokenizer;

use super::generate::{Completion, Event, Request, Sequence};
use crate::error::{Error, Result};
use crate::models::kv::KvCache;
use crate::models::Model;

/// Limits on what runs at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences decoded together (at least 1).
    pub max_seqs: usize,
    /// Total KV positions the sequences in flight may reserve. A request that alone exceeds
    /// it still runs, by itself.
    pub max_kv_positions: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_seqs: 8,
            max_kv_positions: usize::MAX,
        }
    }
}

/// Counters of one [`run`], for reports and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Batched decode steps run.
    pub steps: usize,
    /// Most sequences decoded in one step.
    pub peak_seqs: usize,
}

struct Active {
    index: usize,
    req: Request,
    seq: Box<Sequence>,
    reserved: usize,
    /// The token to decode at the next step.
    next: u32,
}

/// What a [`Feed`] has for the scheduler.
// One value per request handed over, never stored in bulk: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Next {
    /// A request (or the error that stopped it being built) under the caller's index.
    Ready(usize, Result<Request>),
    /// Nothing right now; more may come (a server between requests).
    Nothing,
    /// Nothing ever again: finish what is in flight and return.
    End,
}

/// Where requests come from and where their events and results go: an iterator for `batch`,
/// a channel of client requests for `serve`.
pub trait Feed {
    /// The next request. `idle` is true when nothing is in flight, so the feed may wait.
    fn next(&mut self, idle: bool) -> Next;
    /// Text and progress of request `index` as it decodes. An error cancels that request
    /// (its client went away); it then gets [`Feed::done`] with the error.
    fn event(&mut self, index: usize, event: Event) -> Result<()>;
    /// Whether request `index` should stop now (checked before every step).
    fn cancelled(&mut self, index: usize) -> bool;
    /// Request `index` finished with its completion or error (in completion order); an
    /// error returned here stops the run.
    fn done(&mut self, index: usize, result: Result<Completion>) -> Result<()>;
}

/// Runs every request that `requests` yields, `(index, request)` pairs pulled one at a time as
/// room frees up (so media for later jobs is encoded only when it is about to run). An `Err`
/// item is passed straight to `on_done`. `on_done` receives each request's index with its
/// completion or error, in completion order; an error it returns stops the run.
pub fn run(
    model: &dyn Model,
    tokenizer: &Arc<Tokenizer>,
    config: SchedulerConfig,
    requests: &mut dyn Iterator<Item = (usize, Result<Request>)>,
    on_done: &mut dyn FnMut(usize, Result<Completion>) -> Result<()>,
) -> Result<Stats> {
    struct IterFeed<'a> {
        requests: &'a mut dyn Iterator<Item = (usize, Result<Request>)>,
        on_done: &'a mut dyn FnMut(usize, Result<Completion>) -> Result<()>,
    }
    impl Feed for IterFeed<'_> {
        fn next(&mut self, _idle: bool) -> Next {
            match self.requests.next() {
                Some((index, req)) => Next::Ready(index, req),
                None => Next::End,
            }
        }
        fn event(&mut self, _index: usize, _event: Event) -> Result<()> {
            Ok(())
        }
        fn cancelled(&mut self, _index: usize) -> bool {
            false
        }
        fn done(&mut self, index: usize, result: Result<Completion>) -> Result<()> {
            (self.on_done)(index, result)
        }
    }
    run_feed(
        model,
        tokenizer,
        config,
        &mut IterFeed { requests, on_done },
    )
}

/// Runs the requests of `feed` until it says [`Next::End`] and all in flight are done.
pub fn run_feed(
    model: &dyn Model,
    tokenizer: &Arc<Tokenizer>,
    config: SchedulerConfig,
    feed: &mut dyn Feed,
) -> Result<Stats> {
    let max_seqs = config.max_seqs.max(1);
    let mut stats = Stats::default();
    let mut active: Vec<Active> = Vec::new();
    // The next request, pulled but not yet admitted.
    let mut waiting: Option<(usize, Request)> = None;
    let mut exhausted = false;
    let mut reserved = 0usize;
    loop {
        // Admit in arrival order while there is room; a request that does not fit waits
        // (later ones do not overtake it) until sequences finish.
        while active.len() < max_seqs {
            if waiting.is_none() && !exhausted {
                match feed.next(active.is_empty()) {
                    Next::Ready(index, Ok(req)) => waiting = Some((index, req)),
                    Next::Ready(index, Err(e)) => {
                        feed.done(index, Err(e))?;
                        continue;
                    }
                    Next::Nothing => break,
                    Next::End => exhausted = true,
                }
            }
            let Some((_, req)) = &waiting else {
                break;
            };
            let need = Sequence::capacity(model, req);
            if !active.is_empty() && reserved.saturating_add(need) > config.max_kv_positions {
                break;
            }
            let Some((index, req)) = waiting.take() else {
                break;
            };
            match start(model, tokenizer, &req, &mut |ev| feed.event(index, ev)) {
                Started::Running(seq, next) => {
                    reserved += need;
                    active.push(Active {
                        index,
                        req,
                        seq,
                        reserved: need,
                        next,
                    });
                }
                Started::Finished(done) => feed.done(index, done)?,
            }
        }
        // A cancelled sequence leaves now, freeing its cache and its place.
        let mut kept = Vec::with_capacity(active.len());
        for a in active.drain(..) {
            if feed.cancelled(a.index) {
                reserved -= a.reserved;
                feed.done(a.index, Err(Error::Runtime(anyhow::anyhow!("cancelled"))))?;
            } else {
                kept.push(a);
            }
        }
        active = kept;
        if active.is_empty() {
            if exhausted && waiting.is_none() {
                return Ok(stats);
            }
            continue;
        }

        stats.steps += 1;
        stats.peak_seqs = stats.peak_seqs.max(active.len());
        let ids: Vec<u32> = active.iter().map(|a| a.next).collect();
        let decoded = {
            let mut caches: Vec<&mut KvCache> =
                active.iter_mut().map(|a| &mut a.seq.cache).collect();
            model.decode_batch(&ids, &mut caches)
        };
        let logits = match decoded {
            Ok(logits) if logits.len() == active.len() => logits,
            Ok(logits) => {
                return Err(anyhow::anyhow!(
                    "decode_batch returned {} logits for {} sequences",
                    logits.len(),
                    active.len()
                )
                .into())
            }
            Err(e) => {
                // A failed step leaves every cache in flight in an unknown state: all of
                // those requests fail with the same message; queued ones still run.
                let message = format!("{}", DisplayError(&e));
                for a in active.drain(..) {
                    reserved -= a.reserved;
                    feed.done(a.index, Err(Error::Runtime(anyhow::anyhow!("{message}"))))?;
                }
                continue;
            }
        };
        let mut still = Vec::with_capacity(active.len());
        for (mut a, row) in active.drain(..).zip(logits) {
            a.seq.set_logits(row);
            let index = a.index;
            match a.seq.step(&a.req, &mut |ev| feed.event(index, ev)) {
                Ok(Some(id)) => {
                    a.next = id;
                    still.push(a);
                }
                Ok(None) => {
                    reserved -= a.reserved;
                    let done = a.seq.finish(&a.req, &mut |ev| feed.event(index, ev));
                    feed.done(index, done)?;
                }
                Err(e) => {
                    reserved -= a.reserved;
                    feed.done(index, Err(e))?;
                }
            }
        }
        active = still;
    }
}

/// Error text with the whole cause chain of runtime errors.
struct DisplayError<'a>(&'a Error);

impl std::fmt::Display for DisplayError<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Error::Runtime(e) => write!(f, "{e:#}"),
            other => write!(f, "{other}"),
        }
    }
}

enum Started {
    /// In flight, with the token to decode next.
    Running(Box<Sequence>, u32),
    /// Finished at its first token (end of sequence, a stop string, `max_tokens` of 0 or 1)
    /// or failed.
    Finished(Result<Completion>),
}

/// Prefills `req` and samples its first token.
fn start(
    model: &dyn Model,
    tokenizer: &Arc<Tokenizer>,
    req: &Request,
    on_event: &mut dyn FnMut(Event) -> Result<()>,
) -> Started {
    let mut seq = match Sequence::prefill(model, tokenizer, req, on_event) {
        Ok(seq) => seq,
        Err(e) => return Started::Finished(Err(e)),
    };
    match seq.step(req, on_event) {
        Ok(Some(id)) => Started::Running(Box::new(seq), id),
        Ok(None) => Started::Finished(seq.finish(req, on_event)),
        Err(e) => Started::Finished(Err(e)),
    }
}

//! The server's one engine thread: requests from every connection join the same
//! continuous-batching scheduler `batch` uses ([`scheduler::run_feed`]). Each request carries
//! its own channel for events and its result (mistral.rs's shape); a request whose channel
//! closed (its client went away) is cancelled at the next step and its cache freed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use crate::app::pipeline::{self, Loaded, Resolved};
use crate::app::plan::{MediaInput, Plan};
use crate::engine::generate::{Completion, Event, Request};
use crate::engine::scheduler::{self, Feed, Next, SchedulerConfig};
use crate::error::{Error, Result};

/// What the engine sends back to a request's handler.
#[derive(Debug)]
pub enum Msg {
    Event(Event),
    Done(Result<Completion>),
}

/// A request ready for the engine: its plan and decoded media.
pub struct Job {
    pub plan: Plan,
    pub media: Vec<MediaInput>,
    pub reply: UnboundedSender<Msg>,
}

struct ServeFeed<'a> {
    jobs: Receiver<Job>,
    resolved: &'a Resolved,
    loaded: &'a Loaded,
    group: usize,
    ready: VecDeque<(usize, Result<Request>)>,
    replies: HashMap<usize, UnboundedSender<Msg>>,
    next_index: usize,
    metrics: Arc<Metrics>,
}

impl ServeFeed<'_> {
    /// Takes the waiting jobs (up to a group) and encodes their media together, as batch does.
    fn fill(&mut self, first: Job) {
        let mut jobs = vec![first];
        while jobs.len() < self.group {
            match self.jobs.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        self.metrics
            .waiting
            .fetch_sub(jobs.len() as i64, Ordering::Relaxed);
        // A client that left while waiting costs nothing more.
        jobs.retain(|j| {
            let gone = j.reply.is_closed();
            if gone {
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            !gone
        });
        let batch: Vec<(&Plan, &[MediaInput])> =
            jobs.iter().map(|j| (&j.plan, j.media.as_slice())).collect();
        let built = pipeline::requests_batched(self.resolved, self.loaded, &batch);
        for (job, request) in jobs.into_iter().zip(built) {
            let index = self.next_index;
            self.next_index += 1;
            self.replies.insert(index, job.reply);
            self.metrics.running.fetch_add(1, Ordering::Relaxed);
            self.ready.push_back((index, request));
        }
    }
}

impl Feed for ServeFeed<'_> {
    fn next(&mut self, idle: bool) -> Next {
        if self.ready.is_empty() {
            let job = if idle {
                match self.jobs.recv() {
                    Ok(job) => job,
                    Err(_) => return Next::End,
                }
            } else {
                match self.jobs.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty) => return Next::Nothing,
                    Err(TryRecvError::Disconnected) => return Next::End,
                }
            };
            self.fill(job);
        }
        match self.ready.pop_front() {
            Some((index, request)) => Next::Ready(index, request),
            None => Next::Nothing,
        }
    }

    fn event(&mut self, index: usize, event: Event) -> Result<()> {
        match self.replies.get(&index) {
            Some(tx) if tx.send(Msg::Event(event)).is_ok() => Ok(()),
            _ => Err(Error::Runtime(anyhow::anyhow!("client disconnected"))),
        }
    }

    fn cancelled(&mut self, index: usize) -> bool {
        self.replies.get(&index).is_none_or(|tx| tx.is_closed())
    }

    fn done(&mut self, index: usize, result: Result<Completion>) -> Result<()> {
        self.metrics.running.fetch_sub(1, Ordering::Relaxed);
        if let Some(tx) = self.replies.remove(&index) {
            if tx.send(Msg::Done(result)).is_err() {
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// Runs the engine until every sender of `jobs` is gone and the last request finished.
pub fn run(
    resolved: Arc<Resolved>,
    loaded: Loaded,
    config: SchedulerConfig,
    jobs: Receiver<Job>,
    metrics: Arc<Metrics>,
) {
    let mut feed = ServeFeed {
        jobs,
        resolved: &resolved,
        loaded: &loaded,
        group: config.max_seqs,
        ready: VecDeque::new(),
        replies: HashMap::new(),
        next_index: 0,
        metrics,
    };
    if let Err(e) = scheduler::run_feed(loaded.model.as_ref(), &loaded.tokenizer, config, &mut feed)
    {
        eprintln!("mmllm: serve: engine stopped: {e}");
    }
}

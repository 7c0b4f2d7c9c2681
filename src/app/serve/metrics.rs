//! Counters for `GET /metrics`, in Prometheus' text format (names after vLLM's, `mmllm:`
//! prefixed): requests by status, prompt and generated tokens, time to first token and time
//! per output token, running and waiting sequences, cancelled requests.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
const TPOT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];

struct Histogram {
    buckets: &'static [f64],
    /// Per-bucket counts (not cumulative), then the sum and the count.
    state: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    fn new(buckets: &'static [f64]) -> Self {
        Self {
            buckets,
            state: Mutex::new((vec![0; buckets.len()], 0.0, 0)),
        }
    }

    fn observe(&self, v: f64) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        if let Some(i) = self.buckets.iter().position(|b| v <= *b) {
            s.0[i] += 1;
        }
        s.1 += v;
        s.2 += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let Ok(s) = self.state.lock() else {
            return;
        };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in self.buckets.iter().zip(&s.0) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", s.2);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", s.1);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", s.2);
    }
}

pub struct Metrics {
    requests: Mutex<BTreeMap<u16, u64>>,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    ttft: Histogram,
    tpot: Histogram,
    /// Sequences handed to the scheduler and not finished.
    pub running: AtomicI64,
    /// Requests accepted and queued for the engine, not yet taken by it.
    pub waiting: AtomicI64,
    /// Requests whose client went away before the answer was complete.
    pub cancelled: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BUCKETS),
            tpot: Histogram::new(TPOT_BUCKETS),
            running: AtomicI64::new(0),
            waiting: AtomicI64::new(0),
            cancelled: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn request(&self, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry(status).or_insert(0) += 1;
        }
    }

    /// A finished generation: token counts and timings.
    pub fn finished(&self, prompt_tokens: usize, generated: usize, ttft_s: f64, total_s: f64) {
        self.prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        self.generation_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
        self.ttft.observe(ttft_s);
        if generated > 1 {
            self.tpot
                .observe((total_s - ttft_s).max(0.0) / (generated - 1) as f64);
        }
    }

    pub fn render(&self, model: &str) -> String {
        let labels = format!("model_name=\"{}\"", model.replace(['"', '\\', '\n'], "_"));
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{labels}}} {v}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {}",
                v.max(0)
            );
        };
        let _ = writeln!(
            out,
            "# HELP mmllm:requests_total HTTP requests answered, by status code.\n\
             # TYPE mmllm:requests_total counter"
        );
        if let Ok(m) = self.requests.lock() {
            for (status, n) in m.iter() {
                let _ = writeln!(
                    out,
                    "mmllm:requests_total{{{labels},status=\"{status}\"}} {n}"
                );
            }
        }
        counter(
            &mut out,
            "mmllm:prompt_tokens_total",
            "Prompt tokens (media slots included) of finished requests.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "mmllm:generation_tokens_total",
            "Generated tokens of finished requests.",
            self.generation_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "mmllm:requests_cancelled_total",
            "Requests whose client disconnected before the end; their sequences were freed.",
            self.cancelled.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "mmllm:num_requests_running",
            "Sequences in the engine's batch (or about to join it).",
            self.running.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "mmllm:num_requests_waiting",
            "Requests queued for the engine.",
            self.waiting.load(Ordering::Relaxed),
        );
        self.ttft.render(
            &mut out,
            "mmllm:time_to_first_token_seconds",
            "Seconds from a request's start (media encoding included) to its first token.",
            &labels,
        );
        self.tpot.render(
            &mut out,
            "mmllm:time_per_output_token_seconds",
            "Seconds per generated token after the first.",
            &labels,
        );
        out
    }
}

//! Consumers of engine events and results: streamed text and JSONL on stdout, batch output
//! (`batch`), progress on stderr (only on a terminal). Knows nothing of models or the
//! command line.

pub mod batch;

use std::io::{IsTerminal, Write};

use serde::Serialize;

use crate::engine::generate::{Completion, Event, FinishReason, TokenLogprob};

/// Streams generated text to `out` as it arrives, flushing each piece; one newline at the end.
pub struct TextSink<W: Write> {
    out: W,
}

impl<W: Write> TextSink<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }

    pub fn event(&mut self, event: &Event) -> std::io::Result<()> {
        if let Event::Text(text) = event {
            self.out.write_all(text.as_bytes())?;
            self.out.flush()?;
        }
        Ok(())
    }

    pub fn finish(&mut self) -> std::io::Result<()> {
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct Timing {
    pub load_ms: f64,
    pub ttft_ms: f64,
    pub total_ms: f64,
    pub tokens_per_s: f64,
}

/// One result line of `--output jsonl` (SPEC §1).
#[derive(Debug, Serialize)]
pub struct JsonResult<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub text: &'a str,
    pub token_ids: &'a [u32],
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timing: Timing,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<&'a [TokenLogprob]>,
}

impl<'a> JsonResult<'a> {
    pub fn new(id: &'a str, model: &'a str, c: &'a Completion, load_s: f64) -> Self {
        let decode_s = c.total_s - c.ttft_s;
        let tokens_per_s = if c.token_ids.len() > 1 && decode_s > 0.0 {
            (c.token_ids.len() - 1) as f64 / decode_s
        } else {
            0.0
        };
        Self {
            id,
            model,
            text: &c.text,
            token_ids: &c.token_ids,
            finish_reason: c.finish_reason,
            usage: Usage {
                prompt_tokens: c.prompt_tokens,
                completion_tokens: c.token_ids.len(),
            },
            timing: Timing {
                load_ms: round3(load_s * 1e3),
                ttft_ms: round3(c.ttft_s * 1e3),
                total_ms: round3(c.total_s * 1e3),
                tokens_per_s: round3(tokens_per_s),
            },
            logprobs: c.logprobs.as_deref(),
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// Writes `value` as one JSON line and flushes, so a line is never left half written by us.
pub fn write_json_line<W: Write + ?Sized, T: Serialize>(
    out: &mut W,
    value: &T,
) -> std::io::Result<()> {
    let line = serde_json::to_string(value).map_err(std::io::Error::other)?;
    write_line(out, &line)
}

/// Writes `line` and a newline in one write, then flushes: every result line goes out whole,
/// so a kill leaves at most one unfinished line.
pub fn write_line<W: Write + ?Sized>(out: &mut W, line: &str) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    out.write_all(&bytes)?;
    out.flush()
}

/// A spinner with a message on stderr, only when stderr is a terminal.
pub fn spinner(message: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_message(message.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    Some(bar)
}

//! One prompt from the command line (`image`, `video`, `audio`, `embeds`): plan, resolve the
//! model, check limits and decode media, then load, generate and print.

use std::io::Write;

use serde_json::json;

use super::pipeline::{self, Resolved};
use super::plan::{MediaInput, Plan};
use crate::cli::{Command, OutputFormat};
use crate::engine::generate::{generate, Event};
use crate::error::{Error, Result};
use crate::media::MediaItem;
use crate::sink::{self, JsonResult, TextSink};

/// Runs a prompting command end to end.
pub fn run(cmd: &Command) -> Result<()> {
    let mut stdin = std::io::stdin().lock();
    let plan = Plan::from_command(cmd, &mut stdin)?;
    let resolved = pipeline::resolve(&plan.model)?;
    let media = pipeline::prepare_media(&plan, &resolved, &mut stdin)?;
    let mut stdout = std::io::stdout().lock();
    if plan.dry_run {
        pipeline::check_text_length(&plan, &resolved)?;
        sink::write_json_line(&mut stdout, &dry_run_report(&plan, &resolved, &media))?;
        return Ok(());
    }
    let loaded = pipeline::load(&resolved, plan.device, plan.dtype)?;
    let request = pipeline::request(&plan, &resolved, &loaded, &media)?;
    let (model, tokenizer) = (loaded.model.as_ref(), &loaded.tokenizer);
    match plan.output {
        OutputFormat::Text => {
            let mut text_sink = TextSink::new(&mut stdout);
            let mut on_event = |e: Event| text_sink.event(&e).map_err(Error::from);
            generate(model, tokenizer, &request, &mut on_event)?;
            text_sink.finish()?;
        }
        OutputFormat::Jsonl => {
            let done = generate(model, tokenizer, &request, &mut |_| Ok(()))?;
            let line = JsonResult::new(&plan.id, &plan.model, &done, loaded.load_s);
            sink::write_json_line(&mut stdout, &line)?;
        }
    }
    stdout.flush()?;
    Ok(())
}

/// What `--dry-run` prints: the validated plan and the decoded media, without weights.
fn dry_run_report(plan: &Plan, resolved: &Resolved, media: &[MediaInput]) -> serde_json::Value {
    let defaults = &resolved.defaults;
    let items: Vec<serde_json::Value> = media
        .iter()
        .map(|m| match &m.item {
            MediaItem::Image(img) => json!({"input": m.input, "kind": "image",
                "width": img.width(), "height": img.height()}),
            MediaItem::Video(v) => json!({"input": m.input, "kind": "video",
                "frames": v.frames.len(), "timestamps": v.timestamps,
                "width": v.frames.first().map(|f| f.width()),
                "height": v.frames.first().map(|f| f.height())}),
            MediaItem::Audio(a) => json!({"input": m.input, "kind": "audio",
                "samples": a.samples.len(), "sample_rate": a.sample_rate,
                "seconds": a.samples.len() as f64 / f64::from(a.sample_rate.max(1))}),
            MediaItem::Embeds(e) => json!({"input": m.input, "kind": "embeds",
                "modality": e.modality.name(),
                "tensors": e.tensors.iter().map(|(k, t)| (k.clone(), json!(t.dims()))).collect::<serde_json::Map<_, _>>()}),
        })
        .collect();
    let limits: serde_json::Map<String, serde_json::Value> = defaults
        .limits
        .iter()
        .map(|(m, n)| {
            (
                m.to_string(),
                json!(plan.limits.get(m).copied().unwrap_or(*n)),
            )
        })
        .collect();
    json!({
        "id": plan.id,
        "model": plan.model,
        "model_dir": resolved.dir.root.display().to_string(),
        "family": resolved.family.name,
        "prompt": plan.prompt,
        "raw": plan.raw,
        "media": items,
        "limits": limits,
        "max_tokens": plan.gen.max_tokens,
    })
}

//! Using mmllm as a library: the same steps `mmllm image` takes, without the command line.
//!
//!     cargo run --example library -- tests/fixtures/llava-tiny tests/data/llava_photo_1.jpg "What is in this image?"

use std::io::Write;

use mmllm::app::pipeline;
use mmllm::app::plan::{Plan, RunOptions};
use mmllm::cli::OutputFormat;
use mmllm::engine::device::{DTypeChoice, DeviceChoice};
use mmllm::engine::generate::{generate, Event};
use mmllm::manifest::Settings;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, image, prompt] = args.as_slice() else {
        return Err("usage: library MODEL IMAGE PROMPT".into());
    };
    // The settings a manifest job (or the command line) would give; unset ones take defaults.
    let settings = Settings {
        model: Some(model.clone()),
        prompt: Some(prompt.clone()),
        images: Some(vec![image.clone()]),
        max_tokens: Some(32),
        ..Settings::default()
    };
    let run = RunOptions {
        id: "example".into(),
        output: OutputFormat::Text,
        device: DeviceChoice::Cpu,
        dtype: DTypeChoice::F32,
        dry_run: false,
        // Media URLs on private addresses are refused, as the CLI does by default.
        fetch: Default::default(),
    };
    let plan = Plan::from_settings(&settings, run, None)?;
    let resolved = pipeline::resolve(&plan.model)?;
    let media = pipeline::prepare_media(&plan, &resolved, &mut std::io::empty())?;
    let loaded = pipeline::load(&resolved, plan.device, plan.dtype)?;
    let request = pipeline::request(&plan, &resolved, &loaded, &media)?;
    let mut stdout = std::io::stdout();
    let done = generate(
        loaded.model.as_ref(),
        &loaded.tokenizer,
        &request,
        &mut |e| {
            if let Event::Text(t) = e {
                stdout.write_all(t.as_bytes())?;
                stdout.flush()?;
            }
            Ok(())
        },
    )?;
    eprintln!(
        "\n{} prompt tokens, {} generated ({:?})",
        done.prompt_tokens,
        done.token_ids.len(),
        done.finish_reason
    );
    Ok(())
}

//! Using mmllm as a library: the same steps `mmllm image` takes, without the command line.
//!
//!     cargo run --example library -- tests/fixtures/llava-tiny tests/data/llava_photo_1.jpg "What is in this image?"

use std::io::Write;

use mmllm::app::pipeline;
use mmllm::cli::plan::{DeviceChoice, GenSettings, InputKind, MediaArg, Plan};
use mmllm::cli::{DTypeArg, OutputFormat};
use mmllm::engine::generate::{generate, Event};
use mmllm::engine::sampler::SamplingParams;
use mmllm::media::source::Source;
use mmllm::media::video::FrameSampling;
use mmllm::media::Modality;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, image, prompt] = args.as_slice() else {
        return Err("usage: library MODEL IMAGE PROMPT".into());
    };
    let plan = Plan {
        model: model.clone(),
        id: "example".into(),
        prompt: prompt.clone(),
        system: None,
        raw: false,
        chat_template: None,
        media: vec![MediaArg {
            source: Source::parse(image)?,
            kind: InputKind::Media(Modality::Image),
        }],
        extra_tensors: Vec::new(),
        limits: Default::default(),
        frames: FrameSampling::Default,
        as_images: false,
        sample_rate: None,
        min_pixels: None,
        max_pixels: None,
        gen: GenSettings {
            sampling: SamplingParams::default(),
            max_tokens: 32,
            stop: Vec::new(),
            logprobs: None,
            ignore_eos: false,
        },
        output: OutputFormat::Text,
        device: DeviceChoice::Cpu,
        dtype: DTypeArg::F32,
        dry_run: false,
    };
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

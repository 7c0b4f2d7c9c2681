//! The `mmllm` binary: parse, run, map the error to an exit code.

use std::process::ExitCode;

use clap::Parser;
use mmllm::cli::{Cli, Command};
use mmllm::error::Error;

fn main() -> ExitCode {
    mmllm::kernels::cpu::keep_freed_memory();
    // Ctrl-C: stop at once with the conventional status; finished output was already flushed.
    let _ = ctrlc::set_handler(|| {
        // Destructors do not run on exit: remove the temp copies of media ffmpeg is reading.
        mmllm::media::remove_temp_files();
        std::process::exit(130)
    });
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let result = match &cli.command {
        Command::GenerateDocs { out_dir } => {
            mmllm::cli::generate_docs(out_dir).map_err(Error::from)
        }
        Command::Batch(args) => mmllm::app::batch::run(args),
        Command::Merge(args) => mmllm::app::merge::run(args),
        Command::Serve(args) => mmllm::app::serve::run(args),
        Command::ProfileDecode {
            model,
            device,
            dtype,
            context,
            steps,
            image,
        } => mmllm::app::profile::run(model, device, *dtype, *context, *steps, image.as_deref()),
        Command::ProfilePreprocess {
            image,
            processor,
            config,
            runs,
            dump,
        } => mmllm::app::profile::preprocess(
            image,
            *processor,
            config.as_deref(),
            *runs,
            dump.as_deref(),
        ),
        cmd => mmllm::app::oneshot::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mmllm: error: {}", chain(&e));
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// clap's own errors in the form of ours (`mmllm: error: …`, exit 2); `--help` and
/// `--version` print as clap prints them.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let rendered = e.render().to_string();
    let message = rendered.strip_prefix("error: ").unwrap_or(&rendered);
    eprint!("mmllm: error: {message}");
    ExitCode::from(2)
}

/// A reader that closed our stdout early (`| head`) is not an error.
fn is_broken_pipe(e: &Error) -> bool {
    match e {
        Error::Runtime(err) => err.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        }),
        _ => false,
    }
}

/// The error and its causes, `: `-joined.
fn chain(e: &Error) -> String {
    match e {
        Error::Runtime(err) => format!("{err:#}"),
        other => other.to_string(),
    }
}

//! Running the system `ffmpeg` / `ffprobe` executables for audio and video decoding: locating them
//! (ffmpeg-sidecar's lookup: next to our executable, else `PATH`; nothing is ever downloaded),
//! wall-clock timeouts with kill, stderr capture for error messages, and temporary files for
//! media that arrives as bytes (containers such as MP4 need a seekable input, not a pipe).
//!
//! We spawn the processes with `std::process::Command` rather than `FfmpegCommand`: we need raw
//! binary stdout read incrementally (stopping early once the wanted video frames arrived), a
//! timeout that kills the child, and `ffprobe`'s JSON output, none of which sidecar's event parser
//! adds anything to.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Default limit for one ffmpeg/ffprobe run; `MMLLM_FFMPEG_TIMEOUT` (seconds) overrides it.
const DEFAULT_TIMEOUT_S: u64 = 300;
/// How much of stderr we keep for error messages.
const STDERR_KEEP: usize = 4096;

/// Which executable to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tool {
    Ffmpeg,
    Ffprobe,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Ffmpeg => "ffmpeg",
            Tool::Ffprobe => "ffprobe",
        }
    }

    pub(crate) fn path(self) -> PathBuf {
        match self {
            Tool::Ffmpeg => ffmpeg_sidecar::paths::ffmpeg_path(),
            Tool::Ffprobe => ffmpeg_sidecar::ffprobe::ffprobe_path(),
        }
    }
}

/// The wall-clock limit for one run.
pub(crate) fn timeout() -> Duration {
    let secs = std::env::var("MMLLM_FFMPEG_TIMEOUT")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(DEFAULT_TIMEOUT_S);
    Duration::from_secs(secs)
}

/// What a finished run left behind.
pub(crate) struct Finished<T> {
    pub value: T,
    /// `true` when the process exited with status 0 (or was stopped by us after `read` asked to stop).
    pub success: bool,
    /// The tail of stderr, trimmed.
    pub stderr: String,
}

/// Whether `read` consumed stdout to the end or stopped early (then the child is killed).
pub(crate) enum ReadEnd {
    Eof,
    Stopped,
}

/// Runs `tool` with `args`, hands its stdout to `read` on a helper thread, and enforces `limit`.
/// `input` names the media in errors.
pub(crate) fn run<T: Send + 'static>(
    tool: Tool,
    program: &Path,
    args: &[OsString],
    input: &str,
    limit: Duration,
    read: impl FnOnce(&mut ChildStdout) -> std::io::Result<(T, ReadEnd)> + Send + 'static,
) -> Result<Finished<T>> {
    let mut child = spawn(tool, program, args)?;
    let deadline = Instant::now() + limit;
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        kill(&mut child);
        return Err(Error::Runtime(anyhow::anyhow!(
            "{} started without pipes",
            tool.name()
        )));
    };
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        let start = buf.len().saturating_sub(STDERR_KEEP);
        String::from_utf8_lossy(&buf[start..]).trim().to_string()
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(read(&mut stdout));
    });
    let outcome = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    let timed_out = || {
        Error::input(
            input,
            format!(
                "{} did not finish within {} s",
                tool.name(),
                limit.as_secs()
            ),
            "media that decodes in time (raise MMLLM_FFMPEG_TIMEOUT for very long files)",
        )
    };
    let (value, end) = match outcome {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            kill(&mut child);
            return Err(Error::Runtime(anyhow::anyhow!(
                "reading {}'s output for {input}: {e}",
                tool.name()
            )));
        }
        Err(_) => {
            kill(&mut child);
            return Err(timed_out());
        }
    };
    let success = match end {
        ReadEnd::Stopped => {
            kill(&mut child);
            true
        }
        ReadEnd::Eof => loop {
            match child.try_wait()? {
                Some(status) => break status.success(),
                None if Instant::now() >= deadline => {
                    kill(&mut child);
                    return Err(timed_out());
                }
                None => std::thread::sleep(Duration::from_millis(2)),
            }
        },
    };
    let stderr = err_thread.join().unwrap_or_default();
    Ok(Finished {
        value,
        success,
        stderr,
    })
}

/// One ffmpeg or ffprobe command line over a media file, with what every run shares: only
/// errors on stderr (no banner, no stats), no stdin, JSON from ffprobe, the output on stdout
/// for ffmpeg, the executable from [`Tool::path`] and the [`timeout`] limit. Inputs may use
/// only the `file` and `pipe` protocols ([`INPUT_PROTOCOLS`]) and only the demuxers of
/// [`INPUT_FORMATS`]: a crafted HLS playlist, concat list or image-sequence pattern can make
/// ffmpeg neither fetch URLs nor open other local files.
pub(crate) struct Invocation {
    tool: Tool,
    args: Vec<OsString>,
}

/// The protocols an input may open (`-protocol_whitelist`).
const INPUT_PROTOCOLS: &str = "file,pipe";

/// The demuxers an input may be read with (`-format_whitelist`; ffmpeg matches any name of a
/// demuxer's list, so `mov` admits MP4/M4A/3GP and `matroska` admits WebM): single-file audio
/// and video containers and raw streams. Left out on purpose: `hls`, `dash`, `concat`, `image2`
/// and the other demuxers that open further files or URLs named inside the input.
pub(crate) const INPUT_FORMATS: &str = "wav,w64,aiff,caf,flac,mp3,ogg,aac,amr,wv,ape,au,\
    mov,matroska,avi,asf,flv,mpeg,mpegts,mpegvideo,m4v,h264,hevc,mjpeg,yuv4mpegpipe,ivf,gif,nut";

impl Invocation {
    /// `ffprobe -v error -protocol_whitelist file,pipe -select_streams <streams>
    /// -show_entries <entries> -of json <path>`.
    pub(crate) fn probe(path: &Path, streams: &str, entries: &str) -> Invocation {
        let mut args: Vec<OsString> = ["-v", "error", "-protocol_whitelist", INPUT_PROTOCOLS]
            .into_iter()
            .chain(["-format_whitelist", INPUT_FORMATS])
            .chain(["-select_streams", streams])
            .chain(["-show_entries", entries, "-of", "json"])
            .map(OsString::from)
            .collect();
        args.push(path.into());
        Invocation {
            tool: Tool::Ffprobe,
            args,
        }
    }

    /// `ffmpeg -nostdin -hide_banner -loglevel error -protocol_whitelist file,pipe -i <path>
    /// -map <stream> <output…> pipe:1`: `output` holds the output options (format, codec, pixel
    /// format, …).
    pub(crate) fn decode(path: &Path, stream: &str, output: &[&str]) -> Invocation {
        let mut args: Vec<OsString> = ["-nostdin", "-hide_banner", "-loglevel", "error"]
            .into_iter()
            .chain(["-protocol_whitelist", INPUT_PROTOCOLS])
            .chain(["-format_whitelist", INPUT_FORMATS, "-i"])
            .map(OsString::from)
            .collect();
        args.push(path.into());
        args.extend(
            ["-map", stream]
                .iter()
                .chain(output)
                .chain(&["pipe:1"])
                .map(OsString::from),
        );
        Invocation {
            tool: Tool::Ffmpeg,
            args,
        }
    }

    /// [`run`] with this command line.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        input: &str,
        read: impl FnOnce(&mut ChildStdout) -> std::io::Result<(T, ReadEnd)> + Send + 'static,
    ) -> Result<Finished<T>> {
        run(
            self.tool,
            &self.tool.path(),
            &self.args,
            input,
            timeout(),
            read,
        )
    }

    /// Runs to completion and returns all of stdout (for ffprobe and audio decoding).
    pub(crate) fn run_to_end(&self, input: &str) -> Result<Finished<Vec<u8>>> {
        self.run(input, |out| {
            let mut buf = Vec::new();
            out.read_to_end(&mut buf)?;
            Ok((buf, ReadEnd::Eof))
        })
    }
}

fn spawn(tool: Tool, program: &Path, args: &[OsString]) -> Result<Child> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Runtime(anyhow::anyhow!(
                "the `{}` executable was not found (looked for {}); install ffmpeg from your \
                 system's packages (e.g. `apt install ffmpeg`, `brew install ffmpeg`)",
                tool.name(),
                program.display()
            )),
            _ => Error::Runtime(anyhow::anyhow!(
                "could not start `{}` ({}): {e}",
                tool.name(),
                program.display()
            )),
        })
}

fn kill(child: &mut Child) {
    // The child may already have exited; either way we reap it so no zombie is left.
    let _ = child.kill();
    let _ = child.wait();
}

/// Last line of ffmpeg's stderr, the one that usually says what went wrong.
pub(crate) fn last_line(stderr: &str) -> &str {
    stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no diagnostic from ffmpeg")
}

/// A file in the system temp folder holding media bytes, readable by the user alone (0600),
/// removed on drop, or by [`remove_temp_files`] when the process is interrupted.
pub(crate) struct TempFile {
    path: PathBuf,
}

/// Temp files alive now, for [`remove_temp_files`].
static LIVE_TEMP_FILES: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Removes every temp file still alive: for the Ctrl-C handler, which ends the process
/// without running destructors.
pub fn remove_temp_files() {
    if let Ok(live) = LIVE_TEMP_FILES.lock() {
        for path in live.iter() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl TempFile {
    pub(crate) fn with_bytes(bytes: &[u8], suffix: &str) -> Result<TempFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir();
        for _ in 0..16 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let path = dir.join(format!(
                "mmllm-{}-{n}-{nanos:08x}{suffix}",
                std::process::id()
            ));
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            match options.open(&path) {
                Ok(mut f) => {
                    if let Ok(mut live) = LIVE_TEMP_FILES.lock() {
                        live.push(path.clone());
                    }
                    let file = TempFile { path };
                    std::io::Write::write_all(&mut f, bytes)?;
                    return Ok(file);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Runtime(anyhow::anyhow!(
            "could not create a temporary file in {}",
            dir.display()
        )))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Ok(mut live) = LIVE_TEMP_FILES.lock() {
            live.retain(|p| p != &self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_says_how_to_install() {
        let err = run(
            Tool::Ffmpeg,
            Path::new("/nonexistent/ffmpeg-for-mmllm-test"),
            &[],
            "clip.mp4",
            Duration::from_secs(5),
            |_| Ok(((), ReadEnd::Eof)),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.contains("install ffmpeg from your system's packages"),
            "{err}"
        );
    }

    #[test]
    fn hung_process_is_killed_at_the_deadline() {
        let started = Instant::now();
        let res = run(
            Tool::Ffmpeg,
            Path::new("sleep"),
            &["30".into()],
            "slow.mp4",
            Duration::from_millis(300),
            |out| {
                let mut buf = Vec::new();
                out.read_to_end(&mut buf)?;
                Ok((buf, ReadEnd::Eof))
            },
        );
        assert!(matches!(res, Err(Error::Input { .. })));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn temp_file_is_private_and_removed_on_drop_or_interrupt() {
        let kept = TempFile::with_bytes(b"xyz", ".bin").expect("temp file");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(kept.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        remove_temp_files();
        assert!(
            !kept.path().exists(),
            "interrupt cleanup removes live files"
        );
        drop(kept);
        let f = TempFile::with_bytes(b"abc", ".bin").expect("temp file");
        let p = f.path().to_path_buf();
        assert_eq!(std::fs::read(&p).expect("read back"), b"abc");
        drop(f);
        assert!(!p.exists());
    }
}

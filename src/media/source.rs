//! Where a media item's bytes come from: a local path, an `http(s)://` URL, a `data:` URL or
//! stdin. Owns argument parsing (malformed `data:` URLs fail here, before any work), the
//! per-modality fetch timeouts (`MMLLM_*_FETCH_TIMEOUT`) and the byte caps on every read.
//! Knows nothing about decoding: it hands raw bytes to the decoders next to it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;

pub use super::fetch::{
    default_fetch_timeout, fetch_timeout, fetch_timeout_var, fetch_timeout_with, FetchPolicy,
};
use super::fetch::{over_cap, percent_decode, read_capped, redact_userinfo};
use super::Modality;
use crate::error::{Error, Result};

/// Where one media item's bytes come from, as given on the command line or in a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local file (or, for video, a directory of frames: the video decoder handles that case).
    Path(PathBuf),
    /// An `http://` or `https://` URL, fetched with a per-modality timeout.
    Url(String),
    /// An inline `data:` URL, already decoded at parse time.
    DataUrl { mime: String, bytes: Vec<u8> },
    /// `-`: the bytes of stdin (one item per prompt at most; the caller enforces that).
    Stdin,
}

/// What a media argument may be, for error messages.
const EXPECTED_SOURCE: &str = "a file path, an http(s):// URL, a data: URL or - for stdin";

/// Longest prefix of an argument quoted in errors (data: URLs can be megabytes long).
const MAX_QUOTED_CHARS: usize = 60;

impl Source {
    /// Classifies a media argument. `data:` URLs are decoded here so that a malformed one is
    /// a usage-time error naming the argument.
    pub fn parse(arg: &str) -> Result<Source> {
        if arg == "-" {
            return Ok(Source::Stdin);
        }
        if arg.is_empty() {
            return Err(Error::input(
                "\"\"",
                "empty media argument",
                EXPECTED_SOURCE,
            ));
        }
        let lower_prefix: String = arg.chars().take(8).collect::<String>().to_ascii_lowercase();
        if lower_prefix.starts_with("http://") || lower_prefix.starts_with("https://") {
            return Ok(Source::Url(arg.to_string()));
        }
        if lower_prefix.starts_with("data:") {
            return parse_data_url(arg);
        }
        if lower_prefix.starts_with("file://") {
            return Err(Error::input(
                abbreviate(arg),
                "file:// URLs are not accepted on the command line",
                "a plain path (drop the file:// prefix)",
            ));
        }
        if let Some(scheme) = url_scheme(arg) {
            // A path that looks like `s3://bucket/x` is almost surely a mistyped URL; saying so
            // beats "no such file".
            return Err(Error::input(
                abbreviate(arg),
                format!("unsupported URL scheme {scheme}://"),
                EXPECTED_SOURCE,
            ));
        }
        Ok(Source::Path(PathBuf::from(arg)))
    }

    /// What errors call this input: the path, the URL, `data:<mime>,…` or `<stdin>`.
    pub fn display(&self) -> String {
        match self {
            Source::Path(p) => p.display().to_string(),
            Source::Url(u) => redact_userinfo(u),
            Source::DataUrl { mime, bytes } => format!("data:{mime},… ({} bytes)", bytes.len()),
            Source::Stdin => "<stdin>".to_string(),
        }
    }

    /// Reads the item's bytes, refusing more than `cap` bytes. URLs are fetched under
    /// `policy` with the modality's timeout (see [`fetch_timeout`]).
    pub fn read(
        &self,
        modality: Modality,
        cap: u64,
        policy: &FetchPolicy,
        stdin: &mut dyn Read,
    ) -> Result<Vec<u8>> {
        let timeout = match self {
            // Only a URL needs the timeout: a bad env value must not break local files.
            Source::Url(_) => fetch_timeout(modality)?,
            _ => Duration::ZERO,
        };
        self.read_with_timeout(modality, cap, timeout, policy, stdin)
    }

    /// [`Source::read`] with the URL fetch timeout given explicitly (for callers that resolved
    /// it once, and for tests that must not touch the process environment). A zero timeout
    /// means no limit.
    pub fn read_with_timeout(
        &self,
        modality: Modality,
        cap: u64,
        timeout: Duration,
        policy: &FetchPolicy,
        stdin: &mut dyn Read,
    ) -> Result<Vec<u8>> {
        match self {
            Source::Path(p) => read_file(p, modality, cap),
            Source::Url(u) => super::fetch::fetch_url(u, modality, cap, timeout, policy),
            Source::DataUrl { bytes, .. } => {
                if bytes.len() as u64 > cap {
                    return Err(over_cap(self.display(), modality, cap));
                }
                Ok(bytes.clone())
            }
            Source::Stdin => {
                let bytes = read_capped(stdin, cap)
                    .map_err(|e| Error::input("<stdin>", os_reason(&e), "readable stdin"))?;
                if bytes.len() as u64 > cap {
                    return Err(over_cap("<stdin>".into(), modality, cap));
                }
                Ok(bytes)
            }
        }
    }
}

/// Parses `data:[<mediatype>][;base64],<data>` (RFC 2397).
fn parse_data_url(arg: &str) -> Result<Source> {
    let rest = &arg["data:".len()..];
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(Error::input(
            abbreviate(arg),
            "malformed data: URL: no comma before the payload",
            "data:<mime>;base64,<base64 bytes>",
        ));
    };
    let (mime_part, is_base64) = match meta.rsplit_once(';') {
        Some((m, last)) if last.eq_ignore_ascii_case("base64") => (m, true),
        _ => (meta, false),
    };
    let mime = if mime_part.is_empty() {
        // RFC 2397's default media type.
        "text/plain".to_string()
    } else {
        mime_part.to_string()
    };
    let bytes = if is_base64 {
        // Base64 in URLs is often line-wrapped or percent-escaped (`%2B`, `%3D`).
        let decoded = percent_decode(data).map_err(|problem| {
            Error::input(
                abbreviate(arg),
                format!("malformed data: URL: {problem}"),
                "data:<mime>;base64,<base64 bytes>",
            )
        })?;
        let compact: Vec<u8> = decoded
            .into_iter()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        base64_engine().decode(&compact).map_err(|e| {
            Error::input(
                abbreviate(arg),
                format!("malformed data: URL: invalid base64 payload ({e})"),
                "data:<mime>;base64,<base64 bytes>",
            )
        })?
    } else {
        percent_decode(data).map_err(|problem| {
            Error::input(
                abbreviate(arg),
                format!("malformed data: URL: {problem}"),
                "data:<mime>,<percent-encoded bytes> or data:<mime>;base64,<base64 bytes>",
            )
        })?
    };
    Ok(Source::DataUrl { mime, bytes })
}

/// Standard alphabet, padding optional (browsers accept both).
fn base64_engine() -> base64::engine::GeneralPurpose {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
}

/// `scheme` if `arg` starts with `scheme://` (RFC 3986 scheme characters).
fn url_scheme(arg: &str) -> Option<&str> {
    let (scheme, _) = arg.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

/// The argument as quoted in errors: at most [`MAX_QUOTED_CHARS`] characters.
fn abbreviate(arg: &str) -> String {
    if arg.chars().count() <= MAX_QUOTED_CHARS {
        arg.to_string()
    } else {
        let head: String = arg.chars().take(MAX_QUOTED_CHARS).collect();
        format!("{head}…")
    }
}

/// The OS's words for an I/O error, without Rust's "(os error N)" suffix.
fn os_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

fn read_file(path: &Path, modality: Modality, cap: u64) -> Result<Vec<u8>> {
    let input = path.display().to_string();
    let expected = format!("a readable {modality} file");
    let meta =
        std::fs::metadata(path).map_err(|e| Error::input(&input, os_reason(&e), &expected))?;
    if meta.is_dir() {
        return Err(Error::input(&input, "is a directory", expected));
    }
    if meta.len() > cap {
        return Err(over_cap(input, modality, cap));
    }
    let mut file =
        std::fs::File::open(path).map_err(|e| Error::input(&input, os_reason(&e), &expected))?;
    // Re-check while reading: pipes and growing files report a misleading length.
    let bytes =
        read_capped(&mut file, cap).map_err(|e| Error::input(&input, os_reason(&e), &expected))?;
    if bytes.len() as u64 > cap {
        return Err(over_cap(input, modality, cap));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_not_shown() {
        for (url, shown) in [
            (
                "https://me:secret@example.org/a@b.jpg?x=1",
                "https://me:***@example.org/a@b.jpg?x=1",
            ),
            (
                "https://me@example.org/p.jpg",
                "https://me@example.org/p.jpg",
            ),
            (
                "http://example.org/u:p@x.jpg",
                "http://example.org/u:p@x.jpg",
            ),
        ] {
            assert_eq!(Source::Url(url.into()).display(), shown);
        }
    }

    #[test]
    fn classifies_arguments() {
        assert_eq!(Source::parse("-").ok(), Some(Source::Stdin));
        assert_eq!(
            Source::parse("HTTPS://x.org/a.jpg").ok(),
            Some(Source::Url("HTTPS://x.org/a.jpg".into()))
        );
        assert_eq!(
            Source::parse("dir/a b.jpg").ok(),
            Some(Source::Path("dir/a b.jpg".into()))
        );
        assert!(matches!(
            Source::parse("file:///a.jpg"),
            Err(Error::Input { .. })
        ));
        assert!(matches!(
            Source::parse("s3://b/a.jpg"),
            Err(Error::Input { .. })
        ));
    }

    #[test]
    fn data_url_variants() {
        let Ok(Source::DataUrl { mime, bytes }) = Source::parse("data:image/png;base64,AAEC/w")
        else {
            panic!("unpadded base64 should parse");
        };
        assert_eq!(mime, "image/png");
        assert_eq!(bytes, vec![0, 1, 2, 255]);
        let Ok(Source::DataUrl { mime, bytes }) = Source::parse("data:,a%20b") else {
            panic!("plain data URL should parse");
        };
        assert_eq!(mime, "text/plain");
        assert_eq!(bytes, b"a b");
    }

    #[test]
    fn timeout_env_values() {
        let none = |_: &str| None;
        assert_eq!(
            fetch_timeout_with(Modality::Video, &none).ok(),
            Some(Duration::from_secs(30))
        );
        let half = |_: &str| Some("0.5".to_string());
        assert_eq!(
            fetch_timeout_with(Modality::Audio, &half).ok(),
            Some(Duration::from_millis(500))
        );
        for bad in ["abc", "0", "-3", "inf", ""] {
            let lookup = move |_: &str| Some(bad.to_string());
            match fetch_timeout_with(Modality::Image, &lookup) {
                Err(Error::Usage(msg)) => assert!(msg.contains("MMLLM_IMAGE_FETCH_TIMEOUT")),
                other => panic!("{bad:?} should be a usage error, got {other:?}"),
            }
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(super::super::fetch::human_bytes(10), "10 bytes");
        assert_eq!(super::super::fetch::human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}

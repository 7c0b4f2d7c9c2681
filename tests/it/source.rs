//! Where media bytes come from: paths, data: URLs, HTTP(S) fetches with timeouts and caps.

use std::io::Cursor;
use std::time::{Duration, Instant};

use base64::Engine as _;
use mmllm::error::Error;
use mmllm::media::source::{fetch_timeout_with, Source};
use mmllm::media::Modality;

use crate::util::input_error;
use crate::util_http::{Reply, Server};

const CAP: u64 = 1 << 20;

fn small_png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 50, 128]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encode a PNG in memory");
    out.into_inner()
}

fn read(src: &Source, cap: u64, timeout: Duration) -> Result<Vec<u8>, Error> {
    src.read_with_timeout(Modality::Image, cap, timeout, &mut std::io::empty())
}

#[test]
fn data_url_equals_file_bytes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let png = small_png();
    let path = dir.path().join("a.png");
    std::fs::write(&path, &png).expect("write png");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let url = format!("data:image/png;base64,{b64}");
    let src = Source::parse(&url).expect("valid data URL");
    assert!(matches!(&src, Source::DataUrl { mime, .. } if mime == "image/png"));
    assert!(src.display().starts_with("data:image/png"));
    assert!(
        src.display().len() < 60,
        "display abbreviates: {}",
        src.display()
    );
    let from_url = read(&src, CAP, Duration::from_secs(1)).expect("read data URL");
    let file_src = Source::parse(path.to_str().expect("utf-8 temp path")).expect("path");
    let from_file = read(&file_src, CAP, Duration::from_secs(1)).expect("read file");
    assert_eq!(from_url, from_file);
    assert_eq!(from_file, png);
    // Both decode to the same image.
    let a = image::load_from_memory(&from_url)
        .expect("decode")
        .to_rgb8();
    assert_eq!(a.dimensions(), (7, 5));
    // The data URL's bytes count against the cap too.
    let (_, problem, _) = input_error(read(&src, 10, Duration::from_secs(1)));
    assert!(problem.contains("cap"), "{problem}");
}

#[test]
fn malformed_data_urls_are_rejected_at_parse_time() {
    for bad in [
        "data:image/png;base64",          // no comma
        "data:image/png;base64,@@@@",     // not base64
        "data:image/png;base64,AAAA=AAA", // padding in the middle
        "data:image/png;base64,A",        // truncated
        "data:text/plain,%zz",            // bad percent escape
    ] {
        let (input, problem, _) = input_error(Source::parse(bad));
        assert!(
            bad.starts_with(input.trim_end_matches('…')),
            "{input} names {bad}"
        );
        assert!(problem.contains("malformed data: URL"), "{bad}: {problem}");
    }
    let long = format!("data:image/png;base64,{}!", "A".repeat(10_000));
    let (input, _, _) = input_error(Source::parse(&long));
    assert!(
        input.len() < 100,
        "a long data URL is abbreviated in errors"
    );
}

#[test]
fn argument_kinds() {
    assert_eq!(Source::parse("-").ok(), Some(Source::Stdin));
    assert_eq!(Source::Stdin.display(), "<stdin>");
    assert!(matches!(
        Source::parse("http://h/x.jpg"),
        Ok(Source::Url(_))
    ));
    assert!(matches!(
        Source::parse("https://h/x.jpg"),
        Ok(Source::Url(_))
    ));
    assert!(matches!(Source::parse("photo.jpg"), Ok(Source::Path(_))));
    let (input, problem, _) = input_error(Source::parse("file:///tmp/a.jpg"));
    assert_eq!(input, "file:///tmp/a.jpg");
    assert!(problem.contains("file://"), "{problem}");
}

#[test]
fn stdin_is_read_with_the_cap() {
    let mut stdin = Cursor::new(b"abcdef".to_vec());
    let bytes = Source::Stdin
        .read(Modality::Audio, 6, &mut stdin)
        .expect("read stdin");
    assert_eq!(bytes, b"abcdef");
    let mut stdin = Cursor::new(b"abcdefg".to_vec());
    let (input, _, _) = input_error(Source::Stdin.read(Modality::Audio, 6, &mut stdin));
    assert_eq!(input, "<stdin>");
}

#[test]
fn missing_file_directory_and_oversized_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nope.jpg");
    let src = Source::Path(missing.clone());
    let (input, problem, _) = input_error(src.read(Modality::Image, CAP, &mut std::io::empty()));
    assert_eq!(input, missing.display().to_string());
    assert!(problem.contains("No such file"), "{problem}");

    let src = Source::Path(dir.path().to_path_buf());
    let (_, problem, _) = input_error(src.read(Modality::Image, CAP, &mut std::io::empty()));
    assert!(problem.contains("directory"), "{problem}");

    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![0u8; 2000]).expect("write");
    let src = Source::Path(big.clone());
    let (input, problem, _) = input_error(src.read(Modality::Video, 1999, &mut std::io::empty()));
    assert_eq!(input, big.display().to_string());
    assert!(problem.contains("cap"), "{problem}");
    assert_eq!(
        src.read(Modality::Video, 2000, &mut std::io::empty())
            .expect("exactly at the cap")
            .len(),
        2000
    );
}

#[test]
fn http_fetch_404_and_cap() {
    let payload: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    let served = payload.clone();
    let server = Server::start(move |req| match req.path.as_str() {
        "/img.png" => Reply::ok(served.clone()),
        "/unsized.bin" => Reply::Unsized(served.clone()),
        _ => Reply::status(404),
    });
    let t = Duration::from_secs(5);
    let url = server.url("/img.png");
    let src = Source::parse(&url).expect("url");
    assert_eq!(read(&src, CAP, t).expect("fetch"), payload);
    assert_eq!(src.display(), url);

    let missing = server.url("/missing.png");
    let (input, problem, _) = input_error(read(&Source::Url(missing.clone()), CAP, t));
    assert_eq!(input, missing);
    assert!(problem.contains("404"), "{problem}");

    // Over the cap, announced by Content-Length and discovered while streaming.
    for path in ["/img.png", "/unsized.bin"] {
        let (_, problem, _) = input_error(read(&Source::Url(server.url(path)), 1000, t));
        assert!(problem.contains("cap"), "{path}: {problem}");
    }
    assert_eq!(
        read(&Source::Url(server.url("/unsized.bin")), CAP, t).expect("unsized fetch"),
        payload
    );
}

#[test]
fn fetch_times_out_with_a_clear_error() {
    let server = Server::start(|_| Reply::Hang);
    let url = server.url("/slow.jpg");
    let start = Instant::now();
    let (input, problem, expected) =
        input_error(read(&Source::Url(url.clone()), CAP, Duration::from_secs(1)));
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert_eq!(input, url);
    assert!(problem.contains("timed out after 1 s"), "{problem}");
    assert!(expected.contains("MMLLM_IMAGE_FETCH_TIMEOUT"), "{expected}");
}

#[test]
fn fetch_timeout_defaults_and_overrides() {
    let none = |_: &str| None;
    assert_eq!(
        fetch_timeout_with(Modality::Image, &none).ok(),
        Some(Duration::from_secs(5))
    );
    assert_eq!(
        fetch_timeout_with(Modality::Video, &none).ok(),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        fetch_timeout_with(Modality::Audio, &none).ok(),
        Some(Duration::from_secs(10))
    );
    let env = |name: &str| (name == "MMLLM_AUDIO_FETCH_TIMEOUT").then(|| "2".to_string());
    assert_eq!(
        fetch_timeout_with(Modality::Audio, &env).ok(),
        Some(Duration::from_secs(2))
    );
    assert_eq!(
        fetch_timeout_with(Modality::Image, &env).ok(),
        Some(Duration::from_secs(5))
    );
    let bad = |_: &str| Some("soon".to_string());
    match fetch_timeout_with(Modality::Video, &bad) {
        Err(e @ Error::Usage(_)) => {
            assert!(e.to_string().contains("MMLLM_VIDEO_FETCH_TIMEOUT"), "{e}");
            assert_eq!(e.exit_code(), 2);
        }
        other => panic!("expected a usage error, got {other:?}"),
    }
}

/// Redirects are followed one hop at a time: each target must be http(s), at most 5 hops, and
/// a password in the URL never appears in the error.
#[test]
fn redirects_are_checked_at_every_hop() {
    let png = small_png();
    let server = Server::start(move |req| match req.path.as_str() {
        "/start" => Reply::status(302).header("Location", "/middle"),
        "/middle" => Reply::status(301).header("Location", "end.png"),
        "/end.png" => Reply::ok(png.clone()),
        "/file" => Reply::status(302).header("Location", "file:///etc/passwd"),
        "/loop" => Reply::status(307).header("Location", "/loop"),
        _ => Reply::status(404),
    });
    let get = |path: &str| {
        let src = Source::parse(&server.url(path)).expect("url");
        read(&src, CAP, Duration::from_secs(5))
    };
    assert_eq!(get("/start").expect("two redirects"), small_png());

    let (_, problem, expected) = input_error(get("/file"));
    assert!(
        problem.contains("file:///etc/passwd") && problem.contains("not http(s)"),
        "{problem}"
    );
    assert!(expected.contains("http"), "{expected}");

    let before = server.requests().len();
    let (_, problem, _) = input_error(get("/loop"));
    assert!(problem.contains("more than 5 redirects"), "{problem}");
    assert_eq!(
        server.requests().len() - before,
        6,
        "the first request and 5 hops"
    );

    let with_password = server
        .url("/file")
        .replacen("http://", "http://me:secret@", 1);
    let src = Source::parse(&with_password).expect("url");
    let (input, _, _) = input_error(read(&src, CAP, Duration::from_secs(5)));
    assert!(
        !input.contains("secret") && input.contains("me:***@"),
        "{input}"
    );
}

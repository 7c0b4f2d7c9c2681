//! Where media bytes come from: paths, data: URLs, HTTP(S) fetches with timeouts and caps.

use std::io::Cursor;
use std::time::{Duration, Instant};

use base64::Engine as _;
use mmllm::error::Error;
use mmllm::media::source::{fetch_timeout_with, FetchPolicy, Source};
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
    src.read_with_timeout(
        Modality::Image,
        cap,
        timeout,
        &FetchPolicy::permissive(),
        &mut std::io::empty(),
    )
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
        .read(Modality::Audio, 6, &FetchPolicy::default(), &mut stdin)
        .expect("read stdin");
    assert_eq!(bytes, b"abcdef");
    let mut stdin = Cursor::new(b"abcdefg".to_vec());
    let (input, _, _) =
        input_error(Source::Stdin.read(Modality::Audio, 6, &FetchPolicy::default(), &mut stdin));
    assert_eq!(input, "<stdin>");
}

#[test]
fn missing_file_directory_and_oversized_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nope.jpg");
    let src = Source::Path(missing.clone());
    let (input, problem, _) = input_error(src.read(
        Modality::Image,
        CAP,
        &FetchPolicy::default(),
        &mut std::io::empty(),
    ));
    assert_eq!(input, missing.display().to_string());
    assert!(problem.contains("No such file"), "{problem}");

    let src = Source::Path(dir.path().to_path_buf());
    let (_, problem, _) = input_error(src.read(
        Modality::Image,
        CAP,
        &FetchPolicy::default(),
        &mut std::io::empty(),
    ));
    assert!(problem.contains("directory"), "{problem}");

    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![0u8; 2000]).expect("write");
    let src = Source::Path(big.clone());
    let (input, problem, _) = input_error(src.read(
        Modality::Video,
        1999,
        &FetchPolicy::default(),
        &mut std::io::empty(),
    ));
    assert_eq!(input, big.display().to_string());
    assert!(problem.contains("cap"), "{problem}");
    assert_eq!(
        src.read(
            Modality::Video,
            2000,
            &FetchPolicy::default(),
            &mut std::io::empty()
        )
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

/// Loopback, private and metadata addresses are refused unless allowed; the check runs on the
/// resolved address (a name such as `localhost` is no way around it), and at every redirect hop
/// the domain list applies again.
#[test]
fn private_addresses_and_domains_are_refused_unless_allowed() {
    let png = small_png();
    let server = Server::start(move |req| match req.path.as_str() {
        "/a.png" => Reply::ok(png.clone()),
        "/away" => Reply::status(302).header("Location", "http://elsewhere.test/a.png"),
        _ => Reply::status(404),
    });
    let fetch = |url: &str, policy: &FetchPolicy| {
        Source::parse(url).expect("url").read_with_timeout(
            Modality::Image,
            CAP,
            Duration::from_secs(5),
            policy,
            &mut std::io::empty(),
        )
    };
    let url = server.url("/a.png");
    let by_name = url.replacen("127.0.0.1", "localhost", 1);
    for u in [&url, &by_name] {
        let (input, problem, expected) = input_error(fetch(u, &FetchPolicy::default()));
        assert_eq!(&input, u);
        assert!(problem.contains("loopback address"), "{problem}");
        assert!(
            expected.contains("--allow-private-media-urls"),
            "{expected}"
        );
    }
    assert!(server.requests().is_empty(), "nothing may be sent");
    assert_eq!(
        fetch(&url, &FetchPolicy::permissive()).expect("allowed"),
        small_png()
    );

    let listed = FetchPolicy::permissive()
        .with_domains("127.0.0.1")
        .expect("domains");
    assert!(fetch(&url, &listed).is_ok());
    let (_, problem, _) = input_error(fetch(&server.url("/away"), &listed));
    assert!(
        problem.contains("\"elsewhere.test\" is not an allowed media domain"),
        "{problem}"
    );
    let (_, problem, _) = input_error(fetch(&by_name, &listed));
    assert!(problem.contains("\"localhost\""), "{problem}");
}

/// The command line applies the same rules: a loopback URL needs --allow-private-media-urls.
#[test]
fn cli_refuses_loopback_media_urls_without_the_flag() {
    let png = small_png();
    let server = Server::start(move |_| Reply::ok(png.clone()));
    let model = crate::util::repo().join("tests/fixtures/qwen2-vl-tiny");
    let url = server.url("/a.png");
    let run = |extra: &[&str]| {
        let mut args = vec!["image", "--model", model.to_str().unwrap(), "--dry-run"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[&url, "hi"]);
        crate::util::run_mmllm(&args)
    };
    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("loopback address") && stderr.contains("--allow-private-media-urls"),
        "{stderr}"
    );
    let out = run(&["--allow-private-media-urls"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn file_urls_stay_below_the_allowed_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("media");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("a.png"), small_png()).unwrap();
    std::fs::write(dir.path().join("secret.png"), small_png()).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(dir.path().join("secret.png"), root.join("link.png")).unwrap();
    let policy = FetchPolicy::default().with_local_root(&root).unwrap();
    let url = |p: &std::path::Path| format!("file://{}", p.display());
    let inside = policy
        .local_file(&url(&root.join("a.png")))
        .expect("inside");
    assert_eq!(inside, root.canonicalize().unwrap().join("a.png"));
    for escape in [
        root.join("../secret.png"),
        root.join("link.png"),
        dir.path().join("secret.png"),
        std::path::PathBuf::from("/etc/passwd"),
    ] {
        let (_, problem, expected) = input_error(policy.local_file(&url(&escape)));
        assert!(problem.contains("not below"), "{escape:?}: {problem}");
        assert!(expected.contains("media"), "{expected}");
    }
    let (_, problem, _) = input_error(FetchPolicy::default().local_file(&url(&root.join("a.png"))));
    assert!(problem.contains("not allowed"), "{problem}");
}

/// Batch manifests follow the same rules: a loopback URL fails its job unless
/// `mmllm batch --allow-private-media-urls`.
#[test]
fn batch_refuses_loopback_media_urls_without_the_flag() {
    let png = small_png();
    let server = Server::start(move |_| Reply::ok(png.clone()));
    let dir = tempfile::tempdir().unwrap();
    let model = crate::util::repo().join("tests/fixtures/qwen2-vl-tiny");
    let manifest = dir.path().join("jobs.yaml");
    std::fs::write(
        &manifest,
        format!(
            "defaults: {{model: {}, max_tokens: 1}}\njobs:\n  - {{id: a, prompt: hi, images: [\"{}\"]}}\n",
            model.display(),
            server.url("/a.png")
        ),
    )
    .unwrap();
    let out_path = dir.path().join("out.jsonl");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "batch",
            manifest.to_str().unwrap(),
            "-o",
            out_path.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = crate::util::run_mmllm(&args);
        (
            out.status.code(),
            std::fs::read_to_string(&out_path).unwrap(),
        )
    };
    let (code, lines) = run(&[]);
    assert_eq!(code, Some(1), "{lines}");
    assert!(
        lines.contains("loopback address") && lines.contains("\"error\""),
        "{lines}"
    );
    let (code, lines) = run(&["--allow-private-media-urls"]);
    assert_eq!(code, Some(0), "{lines}");
    assert!(lines.contains("\"token_ids\""), "{lines}");
}

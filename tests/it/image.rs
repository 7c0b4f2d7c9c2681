//! Image decoding, Pillow-exact resizing and the CLIP processor against the Pillow 13 /
//! transformers 5.23 references written by tests/fixtures/gen_image_fixtures.py.

use std::path::PathBuf;

use mmllm::error::Error;
use mmllm::media::image::{decode_image, probe_image, ImageLimits};
use mmllm::media::RgbImage;
use mmllm::models::common::clip_processor::ClipProcessorConfig;
use mmllm::models::common::resize::{resize, Filter};

use crate::util::{read_json, repo};

fn data(name: &str) -> Vec<u8> {
    let p = repo().join("tests/data/image").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn fixture_path(rel: &str) -> PathBuf {
    repo().join("tests/fixtures/image").join(rel)
}

/// A reference image stored as a lossless RGB PNG.
fn fixture_rgb(rel: &str) -> RgbImage {
    let p = fixture_path(rel);
    image::open(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8()
}

fn cases() -> serde_json::Value {
    read_json(&fixture_path("cases.json"))
}

fn decode(name: &str) -> RgbImage {
    decode_image(&data(name), name, &ImageLimits::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Number of differing bytes and the largest difference.
fn diff(a: &RgbImage, b: &RgbImage) -> (usize, u8) {
    assert_eq!(a.dimensions(), b.dimensions(), "dimensions differ");
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .filter(|(x, y)| x != y)
        .fold((0, 0), |(n, m), (x, y)| (n + 1, m.max(x.abs_diff(*y))))
}

#[test]
fn decoded_pixels_equal_pillow() {
    let cases = cases();
    let modes = cases["pillow_modes"].as_object().expect("pillow_modes");
    assert!(modes.len() >= 30);
    let mut failures = Vec::new();
    for name in modes.keys() {
        let ours = decode(name);
        let want = fixture_rgb(&format!("decoded/{name}.png"));
        if ours.dimensions() != want.dimensions() {
            failures.push(format!(
                "{name}: {:?} vs Pillow {:?}",
                ours.dimensions(),
                want.dimensions()
            ));
            continue;
        }
        let (n, max) = diff(&ours, &want);
        if n != 0 {
            failures.push(format!(
                "{name} ({}): {n} bytes differ, max {max}",
                modes[name]["mode"]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn exif_orientations_decode_upright() {
    let upright = decode("exif_o1.jpg");
    assert_eq!(upright.dimensions(), (61, 37));
    for o in 5..=8 {
        let name = format!("exif_o{o}.jpg");
        assert_eq!(decode(&name).dimensions(), (37, 61), "{name}");
        let probed = probe_image(&data(&name), &name, &ImageLimits::default()).unwrap();
        assert_eq!(probed, (37, 61), "{name}");
    }
    // Orientation 3 is a half turn: same pixels as orientation 1 read backwards (the JPEG data
    // is identical, only the tag differs).
    let rotated = decode("exif_o3.jpg");
    let (w, h) = upright.dimensions();
    for (x, y, p) in rotated.enumerate_pixels() {
        assert_eq!(p, upright.get_pixel(w - 1 - x, h - 1 - y));
    }
    assert_eq!(decode("exif_o6.png").dimensions(), (37, 61));
    assert_eq!(decode("xmp_o3.jpg"), rotated);
}

#[test]
fn rgba_is_composited_on_white() {
    let img = decode("alpha_table.png");
    // Row = alpha: fully transparent is white, fully opaque is the colour itself.
    for x in 0..256u32 {
        assert_eq!(img.get_pixel(x, 0).0, [255, 255, 255]);
        let v = x as u8;
        assert_eq!(img.get_pixel(x, 255).0[..2], [v, 255 - v]);
    }
    let want = fixture_rgb("decoded/rgba_gradient.png.png");
    assert_eq!(decode("rgba_gradient.png"), want);
}

#[test]
fn resize_equals_pillow() {
    let cases = cases();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases["resize"].as_array().expect("resize cases") {
        let input = case["input"].as_str().unwrap();
        let filter = match case["filter"].as_str().unwrap() {
            "bilinear" => Filter::Bilinear,
            "bicubic" => Filter::Bicubic,
            "lanczos" => Filter::Lanczos,
            other => panic!("unknown filter {other}"),
        };
        let (w, h) = (
            case["width"].as_u64().unwrap() as u32,
            case["height"].as_u64().unwrap() as u32,
        );
        // A lossless input (a PNG read by the `image` crate, or Pillow's own decode of a JPEG),
        // so only the resize is under test.
        let src = if input.ends_with(".png") {
            let p = repo().join("tests/data/image").join(input);
            image::open(&p).expect("resize input").to_rgb8()
        } else {
            fixture_rgb(&format!("decoded/{input}.png"))
        };
        let ours = resize(&src, w, h, filter);
        let want = fixture_rgb(&format!("resize/{}", case["output"].as_str().unwrap()));
        let (n, max) = diff(&ours, &want);
        if n != 0 {
            failures.push(format!(
                "{input} {filter:?} {w}x{h}: {n} bytes differ, max {max}"
            ));
        }
        checked += 1;
    }
    assert!(checked >= 30);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// HF's pixel_values, rebuilt losslessly from the uint8 crop and the per-channel value table.
fn hf_pixel_values(name: &str) -> Vec<f32> {
    let crop = fixture_rgb(&format!("clip/{name}.crop.png"));
    let bytes = std::fs::read(fixture_path(&format!("clip/{name}.lut.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let lut = st.tensor("lut").unwrap();
    assert_eq!(lut.shape(), [3, 256]);
    let lut: Vec<f32> = lut
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let (w, h) = crop.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in crop.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = lut[c * 256 + p.0[c] as usize];
        }
    }
    out
}

#[test]
fn clip_pixel_values_match_hf() {
    let text = std::fs::read_to_string(fixture_path("llava15_preprocessor_config.json")).unwrap();
    let cfg = ClipProcessorConfig::from_json(&text).unwrap();
    assert_eq!(cfg.resample, Filter::Bicubic);
    let cases = cases();
    let names = cases["clip"].as_array().unwrap();
    assert!(names.len() >= 3);
    for name in names {
        let name = name.as_str().unwrap();
        let img = decode(name);
        let pv = cfg.preprocess(&img).unwrap();
        assert_eq!((pv.height, pv.width), (336, 336), "{name}");
        let want = hf_pixel_values(name);
        assert_eq!(pv.data.len(), want.len());
        let max = pv
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{name}: CLIP pixel_values max abs error {max:e}");
        assert!(max <= 1e-5, "{name}: max abs error {max}");
    }
}

#[test]
fn clip_resize_sizes_follow_hf() {
    let text = std::fs::read_to_string(fixture_path("llava15_preprocessor_config.json")).unwrap();
    let cfg = ClipProcessorConfig::from_json(&text).unwrap();
    // int(336 * long / short) on the long side.
    assert_eq!(cfg.resized_size(333, 517), (336, 521));
    assert_eq!(cfg.resized_size(517, 333), (521, 336));
    assert_eq!(cfg.resized_size(187, 251), (336, 450));
    assert_eq!(cfg.resized_size(336, 336), (336, 336));
}

fn assert_input_error(err: Error, name: &str, needle: &str) {
    let msg = err.to_string();
    assert_eq!(err.exit_code(), 2, "{msg}");
    assert!(matches!(err, Error::Input { .. }), "{msg}");
    assert!(msg.starts_with(name), "{msg}");
    assert!(msg.contains(needle), "{msg}");
}

#[test]
fn decompression_bomb_is_refused_from_the_header() {
    let limits = ImageLimits::default();
    assert_eq!(limits.max_pixels, 178_956_970);
    let bomb = data("bomb.png");
    let err = decode_image(&bomb, "bomb.png", &limits).unwrap_err();
    assert_input_error(err, "bomb.png", "decompression bomb");
    let err = probe_image(&bomb, "bomb.png", &limits).unwrap_err();
    assert_input_error(err, "bomb.png", "10000000000 pixels");
    // The caps are configurable: a normal photo over a tight pixel or byte cap is refused too.
    let photo = data("china_517x333.jpg");
    let tight = ImageLimits {
        max_pixels: 517 * 333 - 1,
        ..limits
    };
    assert_input_error(
        decode_image(&photo, "p.jpg", &tight).unwrap_err(),
        "p.jpg",
        "pixels",
    );
    let tight = ImageLimits {
        max_bytes: 1000,
        ..limits
    };
    assert_input_error(
        decode_image(&photo, "p.jpg", &tight).unwrap_err(),
        "p.jpg",
        "bytes",
    );
}

#[test]
fn broken_and_unsupported_files_are_input_errors() {
    let limits = ImageLimits::default();
    let err = decode_image(&data("truncated.jpg"), "truncated.jpg", &limits).unwrap_err();
    assert_input_error(err, "truncated.jpg", "JPEG");
    let err = decode_image(&data("not_an_image.txt"), "notes.txt", &limits).unwrap_err();
    assert_input_error(err, "notes.txt", "unsupported image format");
    assert!(err_expected(&data("not_an_image.txt")).contains("JPEG, PNG, WebP, GIF or BMP"));
    // A PNG cut inside its pixel data.
    let png = data("china_251x187.png");
    let err = decode_image(&png[..png.len() / 2], "cut.png", &limits).unwrap_err();
    assert_input_error(err, "cut.png", "PNG");
    // Header only.
    let err = decode_image(&png[..20], "hdr.png", &limits).unwrap_err();
    assert_input_error(err, "hdr.png", "PNG");
    let err = decode_image(&[], "empty", &limits).unwrap_err();
    assert_input_error(err, "empty", "unsupported image format");
}

fn err_expected(bytes: &[u8]) -> String {
    match decode_image(bytes, "x", &ImageLimits::default()) {
        Err(Error::Input { expected, .. }) => expected,
        other => panic!("expected an input error, got {other:?}"),
    }
}

/// The f32 values of a `.npy` file written by `profile-preprocess --dump`.
fn npy_values(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    assert!(bytes.starts_with(b"\x93NUMPY\x01\x00"));
    let header = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[10 + header..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn profile_preprocess_times_and_dumps_the_processors_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let name = cases()["clip"][0].as_str().unwrap().to_string();
    let image = repo().join("tests/data/image").join(&name);
    let image = image.to_str().unwrap();
    let config = fixture_path("llava15_preprocessor_config.json");
    let dump = dir.path().join("pv.npy");
    let run = |args: &[&str]| {
        crate::util::run_mmllm(
            &[
                &[
                    "profile-preprocess",
                    "--runs",
                    "2",
                    "--dump",
                    dump.to_str().unwrap(),
                ],
                args,
                &[image],
            ]
            .concat(),
        )
    };
    // CLIP with LLaVA-1.5's config: HF's 336x336 pixel values (the fixture), and exactly the
    // library's.
    let line = crate::util::json_line(&run(&[
        "--processor",
        "clip",
        "--config",
        config.to_str().unwrap(),
    ]));
    assert_eq!(line["shape"], serde_json::json!([1, 3, 336, 336]));
    assert_eq!(line["runs"], 2);
    for key in ["decode_ms", "preprocess_ms", "total_ms"] {
        assert!(line[key].as_f64().unwrap() > 0.0, "{key}: {line}");
    }
    let got = npy_values(&dump);
    let want = hf_pixel_values(&name);
    assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-5));
    let text = std::fs::read_to_string(&config).unwrap();
    let cfg = ClipProcessorConfig::from_json(&text).unwrap();
    assert_eq!(got, cfg.preprocess(&decode(&name)).unwrap().data);
    // Without --config, transformers' defaults: a 224x224 crop.
    let line = crate::util::json_line(&run(&["--processor", "clip"]));
    assert_eq!(line["shape"], serde_json::json!([1, 3, 224, 224]));
    // Qwen2-VL: the patch rows of the library's image processor.
    let line = crate::util::json_line(&run(&["--processor", "qwen2-vl"]));
    let cfg = mmllm::models::qwen2_vl::config::ProcessorConfig::image_default();
    let want =
        mmllm::models::qwen2_vl::preprocessor::preprocess_image(&decode(&name), &cfg).unwrap();
    assert_eq!(
        line["shape"],
        serde_json::json!([want.num_patches(), want.patch_dim])
    );
    assert_eq!(npy_values(&dump), want.pixel_values);
    // A config the processor cannot use, and no runs, are usage/input errors.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"resample": 0}"#).unwrap();
    let out = run(&["--processor", "clip", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.json"));
    let out = crate::util::run_mmllm(&[
        "profile-preprocess",
        "--processor",
        "clip",
        "--runs",
        "0",
        image,
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// The hidden profiling commands read an image through the same byte cap as the real commands:
/// an over-cap file is an input error naming it (exit 2), before any weights load, and an
/// endless one (/dev/zero) is refused after `cap + 1` bytes instead of being read whole.
#[test]
fn profile_commands_refuse_an_image_over_the_byte_cap() {
    let image = repo()
        .join("tests/data/image")
        .join(cases()["clip"][0].as_str().unwrap());
    let image = image.to_str().unwrap();
    let size = std::fs::metadata(image).unwrap().len();
    let model = repo().join("tests/fixtures/llava-tiny");
    let model = model.to_str().unwrap();
    let run = |args: &[&str], file: &str, cap: u64| {
        let mut child = crate::util::mmllm()
            .args(args)
            .arg(file)
            .env("MMLLM_MAX_IMAGE_BYTES", cap.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // An uncapped read of /dev/zero never ends: fail instead of hanging.
        let start = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > std::time::Duration::from_secs(60) {
                child.kill().unwrap();
                panic!("{args:?} {file}: still running after 60 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    };
    let commands: [&[&str]; 2] = [
        &["profile-preprocess", "--processor", "clip"],
        &[
            "profile-decode",
            "--model",
            model,
            "--device",
            "cpu",
            "--context",
            "4",
            "--steps",
            "2",
            "--image",
        ],
    ];
    for args in commands {
        for (file, cap) in [(image, size - 1), ("/dev/zero", 1 << 20)] {
            let out = run(args, file, cap);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?} {file}: {stderr}");
            assert!(stderr.contains(file), "{args:?}: {stderr}");
            assert!(stderr.contains("cap"), "{args:?}: {stderr}");
        }
        // At the file's size it is read.
        let out = run(args, image, size);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

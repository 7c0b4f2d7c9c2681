//! Audio, video and embeddings decoding (src/media/{audio,resample,video,embeds}.rs).
//! Data: tests/data/{audio,video,embeds} from tests/fixtures/gen_audio_fixtures.py and
//! gen_video_embeds_data.py; reference outputs of transformers' `load_audio` (soundfile + soxr HQ)
//! in tests/fixtures/audio_expected.safetensors.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};
use mmllm::error::Error;
use mmllm::media::audio::{audio_from_npy, decode_audio};
use mmllm::media::embeds::{load_embeds, merge_embeds};
use mmllm::media::video::{
    decode_video, decode_video_bytes, probe_video, video_from_dir, FrameSampling,
};
use mmllm::media::{Modality, RgbImage};

use crate::util::{max_abs_diff, repo, tensors};

fn data(rel: &str) -> PathBuf {
    repo().join("tests/data").join(rel)
}

fn read(rel: &str) -> Vec<u8> {
    let p = data(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn expected() -> HashMap<String, Vec<f32>> {
    tensors(&repo().join("tests/fixtures/audio_expected.safetensors"))
        .into_iter()
        .map(|(k, t)| (k, t.to_vec1::<f32>().expect("1-D f32")))
        .collect()
}

fn decode(rel: &str, rate: Option<u32>) -> mmllm::media::Audio {
    decode_audio(&read(rel), rel, rate).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

// ---- audio ----------------------------------------------------------------------------------

#[test]
fn wav_sample_formats_decode_to_the_same_mono_signal() {
    let f32_ref = decode("audio/speech_f32.wav", None);
    assert_eq!(f32_ref.sample_rate, 22050);
    assert_eq!(f32_ref.samples.len(), 3307);
    // The files were written from one float signal; each integer format is off by its
    // quantization step plus libsndfile's 2^(b-1)-1 write scale vs 2^(b-1) read scale.
    for (name, tol) in [
        ("u8", 1.5 / 128.0),
        ("i16", 1.5 / 32768.0),
        ("i24", 1.5 / 8_388_608.0),
        ("i32", 1e-7),
    ] {
        let a = decode(&format!("audio/speech_{name}.wav"), None);
        assert_eq!(a.sample_rate, 22050, "{name}");
        let err = max_abs_diff(&a.samples, &f32_ref.samples);
        assert!(err <= tol, "{name}: max-abs {err} > {tol}");
    }
}

#[test]
fn wav_int_to_float_and_downmix_match_soundfile_exactly() {
    let exp = expected();
    for name in ["u8", "i24", "i32"] {
        let a = decode(&format!("audio/speech_{name}.wav"), Some(22050));
        let want = &exp[&format!("speech_{name}_native")];
        assert_eq!(
            &a.samples, want,
            "{name}: native-rate samples differ from soundfile's"
        );
    }
}

#[test]
fn wav_to_16k_matches_transformers_load_audio() {
    let exp = expected();
    for name in ["i16", "f32"] {
        let a = decode(&format!("audio/speech_{name}.wav"), Some(16000));
        assert_eq!(a.sample_rate, 16000);
        // Measured bit-exact against python-soxr 1.1.0 on x86-64; 1e-6 leaves room for libsoxr's
        // SIMD paths on other CPUs.
        let err = max_abs_diff(&a.samples, &exp[&format!("speech_{name}_16k")]);
        assert!(err <= 1e-6, "{name}: max-abs {err}");
    }
}

#[test]
fn flac_is_lossless_and_mp3_ogg_match_soundfile() {
    let wav = decode("audio/speech_mono.wav", None);
    let flac = decode("audio/speech.flac", None);
    assert_eq!(flac.sample_rate, wav.sample_rate);
    assert_eq!(
        flac.samples, wav.samples,
        "FLAC must decode to the WAV it was made from"
    );

    let exp = expected();
    // ffmpeg's own mp3/vorbis decoders vs libsndfile's (mpg123, libvorbis): different float
    // arithmetic, measured 1.07e-6 (mp3) and 2.4e-7 (ogg) max-abs on this clip.
    for (ext, tol) in [("mp3", 2e-6f32), ("ogg", 5e-7)] {
        let a = decode(&format!("audio/speech.{ext}"), None);
        assert_eq!(a.sample_rate, 22050, "{ext}");
        let err = max_abs_diff(&a.samples, &exp[&format!("speech_{ext}_native")]);
        assert!(err <= tol, "{ext}: max-abs {err} vs soundfile > {tol}");
    }
}

#[test]
fn lossy_encodings_of_the_same_speech_stay_close_to_it() {
    let wav = decode("audio/speech_mono.wav", None);
    let energy: f32 = wav.samples.iter().map(|x| x * x).sum();
    for ext in ["mp3", "m4a"] {
        let a = decode(&format!("audio/speech.{ext}"), None);
        assert_eq!(a.sample_rate, 22050, "{ext}");
        let n = a.samples.len().min(wav.samples.len());
        assert!(
            a.samples.len().abs_diff(wav.samples.len()) <= 1024,
            "{ext}: length {}",
            a.samples.len()
        );
        let noise: f32 = (0..n)
            .map(|i| (a.samples[i] - wav.samples[i]).powi(2))
            .sum();
        let snr_db = 10.0 * (energy / noise).log10();
        assert!(snr_db > 10.0, "{ext}: SNR {snr_db:.1} dB");
    }
}

#[test]
fn sine_resampled_44k_to_16k_keeps_frequency_amplitude_and_matches_soxr() {
    let a = audio_from_npy(
        &read("audio/sine440_44k.npy"),
        "sine440_44k.npy",
        44100,
        Some(16000),
    )
    .expect("npy audio");
    assert_eq!(a.sample_rate, 16000);
    assert_eq!(a.samples.len(), 1600); // ceil(4410 * 16000 / 44100)
    let err = max_abs_diff(&a.samples, &expected()["sine440_16k"]);
    assert!(err <= 1e-6, "max-abs {err} vs python-soxr HQ");

    // Away from the edges: project on sin/cos over a whole number of cycles (22 cycles = 800).
    let fit = |freq: f64| {
        let (mut s, mut c) = (0.0f64, 0.0f64);
        let seg = 400..1200;
        let n = seg.len() as f64;
        for i in seg {
            let ph = 2.0 * std::f64::consts::PI * freq * i as f64 / 16000.0;
            s += a.samples[i] as f64 * ph.sin();
            c += a.samples[i] as f64 * ph.cos();
        }
        (2.0 / n) * (s * s + c * c).sqrt()
    };
    let amp = fit(440.0);
    assert!((amp - 0.5).abs() < 1e-3, "amplitude {amp}");
    assert!(
        fit(420.0) < 0.05 && fit(460.0) < 0.05,
        "energy is not at 440 Hz"
    );
}

/// The generator script's 32-bit LCG noise, in [-1, 1).
fn lcg_noise(n: usize) -> Vec<f32> {
    let mut x: u32 = 12345;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            ((x >> 16) as u16 as i16) as f32 / 32768.0
        })
        .collect()
}

#[test]
fn resampling_8k_and_48k_to_16k_matches_python_soxr_hq() {
    let exp = expected();
    for rate in [8000u32, 48000] {
        let x = lcg_noise(rate as usize / 10);
        let y = mmllm::media::resample::resample(&x, rate, 16000).expect("resample");
        let err = max_abs_diff(&y, &exp[&format!("noise_{}k_16k", rate / 1000)]);
        assert!(err <= 1e-6, "{rate} Hz: max-abs {err}");
    }
}

#[test]
fn npy_audio_downmixes_channels_first_and_keeps_native_rate() {
    let bytes = crate::util::npy_f32(&[2, 3], &[0.5, 1.0, -1.0, 0.25, 0.0, 0.5]);
    let a = audio_from_npy(&bytes, "two.npy", 8000, None).expect("npy");
    assert_eq!(a.sample_rate, 8000);
    assert_eq!(a.samples, vec![0.375, 0.5, -0.25]);
    assert!(matches!(
        audio_from_npy(&bytes, "two.npy", 0, None),
        Err(Error::Input { .. })
    ));
}

#[test]
fn corrupt_empty_and_unsupported_audio_are_input_errors() {
    let garbage = b"this is certainly not an audio file ".repeat(20);
    let wav = read("audio/speech_i16.wav");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty.wav", Vec::new()),
        ("garbage.mp3", garbage.clone()),
        ("header-only.wav", wav[..30].to_vec()),
        ("notes.txt", b"hello".to_vec()),
    ];
    for (name, bytes) in cases {
        match decode_audio(&bytes, name, Some(16000)) {
            Err(Error::Input { input, .. }) => assert_eq!(input, name),
            other => panic!("{name}: expected an input error, got {other:?}"),
        }
    }
    // A video without an audio stream is not audio.
    let err = decode_audio(&read("video/counter.mp4"), "counter.mp4", None);
    assert!(matches!(err, Err(Error::Input { .. })), "{err:?}");
}

// ---- video ----------------------------------------------------------------------------------

/// Which frame of counter.* this is: red = 5 * index (lossy coding moves it a little).
fn frame_index(img: &RgbImage) -> usize {
    let n = (img.width() * img.height()) as f64;
    let red: f64 = img.pixels().map(|p| p[0] as f64).sum::<f64>() / n;
    let green: f64 = img.pixels().map(|p| p[1] as f64).sum::<f64>() / n;
    // Neighbouring frames differ by 5 in red and in green: use both to tell them apart.
    let k = ((red + 255.0 - green) / 10.0).round();
    assert!(
        (red - 5.0 * k).abs() < 5.0 && (green - (255.0 - 5.0 * k)).abs() < 5.0,
        "red {red} green {green} fit no frame"
    );
    k as usize
}

#[test]
fn probe_reports_header_metadata() {
    for file in ["video/counter.mp4", "video/counter.webm"] {
        let info = probe_video(&data(file), file).expect("probe");
        assert_eq!((info.width, info.height), (64, 48), "{file}");
        assert_eq!(info.total_frames, 50, "{file}");
        assert!((info.fps - 10.0).abs() < 1e-9, "{file}: fps {}", info.fps);
        assert!((info.duration - 5.0).abs() < 1e-9, "{file}");
    }
}

#[test]
fn num_frames_are_sampled_uniformly_with_timestamps() {
    for file in ["video/counter.mp4", "video/counter.webm"] {
        let v = decode_video(&data(file), file, &FrameSampling::NumFrames(8)).expect("decode");
        // np.arange(8) * 50 // 8
        let want = [0usize, 6, 12, 18, 25, 31, 37, 43];
        assert_eq!(v.frames.len(), 8, "{file}");
        let got: Vec<usize> = v.frames.iter().map(frame_index).collect();
        assert_eq!(got, want, "{file}");
        let ts: Vec<f64> = want.iter().map(|&i| i as f64 / 10.0).collect();
        assert_eq!(v.timestamps, ts, "{file}");
        assert_eq!(v.frames[0].dimensions(), (64, 48));
        assert!((v.source_fps - 10.0).abs() < 1e-9 && (v.duration - 5.0).abs() < 1e-9);
    }
}

#[test]
fn fps_and_default_sampling() {
    let p = data("video/counter.mp4");
    let v = decode_video(&p, "counter.mp4", &FrameSampling::Fps(2.0)).expect("fps");
    let got: Vec<usize> = v.frames.iter().map(frame_index).collect();
    assert_eq!(got, (0..10).map(|i| i * 5).collect::<Vec<_>>());
    let all = decode_video(&p, "counter.mp4", &FrameSampling::Default).expect("all");
    let got: Vec<usize> = all.frames.iter().map(frame_index).collect();
    assert_eq!(got, (0..50).collect::<Vec<_>>());
    assert_eq!(all.timestamps[49], 4.9);
}

#[test]
fn video_from_bytes_matches_video_from_path() {
    let bytes = read("video/counter.mp4");
    let s = FrameSampling::NumFrames(4);
    let a = decode_video_bytes(&bytes, "stdin", &s).expect("bytes");
    let b = decode_video(&data("video/counter.mp4"), "counter.mp4", &s).expect("path");
    assert_eq!(a.timestamps, b.timestamps);
    assert!(a.frames.iter().zip(&b.frames).all(|(x, y)| x == y));
}

#[test]
fn bad_videos_and_requests_are_input_errors() {
    let mp4 = read("video/counter.mp4");
    let s = FrameSampling::NumFrames(2);
    for (name, bytes) in [
        ("garbage.mp4", b"definitely not a video ".repeat(40)),
        ("truncated.mp4", mp4[..300].to_vec()),
        ("empty.mp4", Vec::new()),
        ("speech.wav", read("audio/speech_i16.wav")),
    ] {
        match decode_video_bytes(&bytes, name, &s) {
            Err(Error::Input { input, .. }) => assert_eq!(input, name),
            other => panic!(
                "{name}: expected an input error, got {:?}",
                other.map(|v| v.frames.len())
            ),
        }
    }
    let too_many = decode_video(
        &data("video/counter.mp4"),
        "counter.mp4",
        &FrameSampling::NumFrames(51),
    );
    assert!(matches!(too_many, Err(Error::Input { .. })));
}

#[test]
fn frames_and_metadata_match_transformers_torchcodec_reader() {
    let exp = tensors(&repo().join("tests/fixtures/video_expected.safetensors"));
    // 8-bit 4:2:0 H.264; a 10-bit clip (where bilinear swscale flags would be off by up to 103);
    // a variable-frame-rate clip (where header counts and rates differ from torchcodec's scan);
    // a clip with a quarter-turn display matrix (frames come out rotated, 32x48).
    for (key, file) in [
        ("counter_mp4_n3", "video/counter.mp4"),
        ("p10_mp4_n3", "video/p10.mp4"),
        ("vfr_mp4_n3", "video/vfr.mp4"),
        ("rot90_mp4_n3", "video/rot90.mp4"),
    ] {
        let meta = exp[&format!("{key}_meta")].to_vec1::<f64>().expect("meta");
        let info = probe_video(&data(file), file).expect("probe");
        assert_eq!(
            (info.total_frames as f64, info.fps, info.duration),
            (meta[0], meta[1], meta[2]),
            "{key}: (frames, fps, duration)"
        );
        let want = &exp[key];
        let indices = exp[&format!("{key}_indices")]
            .to_vec1::<i64>()
            .expect("indices");
        let v = decode_video(&data(file), file, &FrameSampling::NumFrames(indices.len()))
            .expect("decode");
        let ts: Vec<f64> = indices.iter().map(|&i| i as f64 / meta[1]).collect();
        assert_eq!(v.timestamps, ts, "{key}");
        let dims = want.dims();
        assert_eq!(v.frames.len(), dims[0], "{key}");
        for (k, frame) in v.frames.iter().enumerate() {
            assert_eq!(
                (frame.height() as usize, frame.width() as usize),
                (dims[1], dims[2]),
                "{key}"
            );
            let want_k = want
                .get(k)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<u8>())
                .expect("frame");
            assert!(
                frame.as_raw() == &want_k,
                "{key}: frame {k} differs from torchcodec's"
            );
        }
    }
}

fn png_decoder(bytes: &[u8], input: &str) -> mmllm::error::Result<RgbImage> {
    image::load_from_memory(bytes)
        .map(|i| i.to_rgb8())
        .map_err(|e| Error::input(input, e.to_string(), "an image"))
}

#[test]
fn directory_of_images_is_a_video_in_name_order() {
    let dir = data("video/frames");
    let all = video_from_dir(&dir, "frames", &FrameSampling::Default, &png_decoder).expect("dir");
    let reds: Vec<u8> = all.frames.iter().map(|f| f.get_pixel(0, 0)[0]).collect();
    assert_eq!(
        reds,
        vec![0, 40, 80, 120, 160],
        "frames must be sorted by name; notes.txt skipped"
    );
    assert_eq!(all.timestamps, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
    let three =
        video_from_dir(&dir, "frames", &FrameSampling::NumFrames(3), &png_decoder).expect("3");
    let reds: Vec<u8> = three.frames.iter().map(|f| f.get_pixel(0, 0)[0]).collect();
    assert_eq!(reds, vec![0, 40, 120]); // np.arange(3) * 5 // 3 = [0, 1, 3]
}

#[test]
fn directory_with_mixed_frame_sizes_or_no_images_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        video_from_dir(tmp.path(), "empty", &FrameSampling::Default, &png_decoder),
        Err(Error::Input { .. })
    ));
    std::fs::copy(data("video/frames/frame_000.png"), tmp.path().join("a.png")).expect("copy");
    RgbImage::new(3, 3)
        .save(tmp.path().join("b.png"))
        .expect("write png");
    let err = video_from_dir(tmp.path(), "mixed", &FrameSampling::Default, &png_decoder);
    match err {
        Err(Error::Input { input, .. }) => assert!(input.ends_with("b.png"), "{input}"),
        other => panic!(
            "expected an input error, got {:?}",
            other.map(|v| v.frames.len())
        ),
    }
}

// ---- embeddings -----------------------------------------------------------------------------

fn embeds_values() -> Vec<f32> {
    (0..24).map(|i| i as f32 / 8.0 - 1.5).collect()
}

fn flat_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 values")
}

fn grid_of(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_vec2::<i64>().expect("i64 grid")
}

#[test]
fn embeds_round_trip_in_every_format() {
    for file in [
        "embeds/embeds.safetensors",
        "embeds/single.safetensors",
        "embeds/embeds.npy",
        "embeds/embeds.pt",
        "embeds/embeds_dict.pt",
    ] {
        let e = load_embeds(&read(file), file, Modality::Image)
            .unwrap_or_else(|err| panic!("{file}: {err}"));
        assert_eq!(e.modality, Modality::Image);
        let main = &e.tensors["image_embeds"];
        assert_eq!(main.dims(), &[2, 3, 4], "{file}");
        assert_eq!(flat_f32(main), embeds_values(), "{file}");
    }
    let st = load_embeds(&read("embeds/embeds.safetensors"), "st", Modality::Image).expect("st");
    assert_eq!(
        grid_of(&st.tensors["image_grid_thw"]),
        vec![vec![1, 2, 2], vec![1, 4, 2]]
    );

    let pt = load_embeds(&read("embeds/embeds_dict.pt"), "pt", Modality::Image).expect("pt");
    assert_eq!(pt.tensors["image_embeds"].dtype(), DType::BF16);
    assert_eq!(
        grid_of(&pt.tensors["image_grid_thw"]),
        vec![vec![1, 2, 2], vec![1, 4, 2]]
    );
    let tr = &pt.tensors["transposed"];
    assert_eq!(tr.dims(), &[4, 3]);
    assert_eq!(
        flat_f32(tr),
        vec![0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]
    );

    let video = load_embeds(&read("embeds/embeds.npy"), "v.npy", Modality::Video).expect("video");
    assert!(video.tensors.contains_key("video_embeds") && video.tensors.len() == 1);
}

#[test]
fn side_tensors_merge_from_separate_files() {
    let e = load_embeds(&read("embeds/embeds.npy"), "e.npy", Modality::Image).expect("npy");
    let e = merge_embeds(e, "image_grid_thw", &read("embeds/grid.npy"), "grid.npy").expect("merge");
    assert_eq!(
        grid_of(&e.tensors["image_grid_thw"]),
        vec![vec![1, 2, 2], vec![1, 4, 2]]
    );
    // Picked by name out of a multi-tensor file.
    let e2 = load_embeds(&read("embeds/embeds.pt"), "e.pt", Modality::Image).expect("pt");
    let e2 = merge_embeds(e2, "image_grid_thw", &read("embeds/embeds_dict.pt"), "d.pt")
        .expect("by name");
    assert_eq!(
        grid_of(&e2.tensors["image_grid_thw"]),
        vec![vec![1, 2, 2], vec![1, 4, 2]]
    );
    // Given twice.
    assert!(matches!(
        merge_embeds(e, "image_grid_thw", &read("embeds/grid.npy"), "grid.npy"),
        Err(Error::Input { .. })
    ));
}

#[test]
fn undecodable_embeds_are_input_errors() {
    let st = read("embeds/embeds.safetensors");
    let pt = read("embeds/embeds.pt");
    let npy = read("embeds/embeds.npy");
    let cases: Vec<(&str, Vec<u8>, Modality)> = vec![
        (
            "truncated.safetensors",
            st[..st.len() - 10].to_vec(),
            Modality::Image,
        ),
        ("truncated.pt", pt[..pt.len() / 2].to_vec(), Modality::Image),
        (
            "truncated.npy",
            npy[..npy.len() - 4].to_vec(),
            Modality::Image,
        ),
        (
            "garbage.bin",
            b"\x00\x01\x02 nothing".to_vec(),
            Modality::Image,
        ),
        // Two tensors and none named audio_embeds.
        ("embeds.safetensors", st.clone(), Modality::Audio),
    ];
    for (name, bytes, modality) in cases {
        match load_embeds(&bytes, name, modality) {
            Err(Error::Input { input, .. }) => assert_eq!(input, name),
            other => panic!(
                "{name}: expected an input error, got {:?}",
                other.map(|e| e.tensors.len())
            ),
        }
    }
}

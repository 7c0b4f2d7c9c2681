//! Video decoding to RGB8 frames through the system `ffprobe`/`ffmpeg`, and directories of images
//! as videos. Reproduces transformers 5.23 `read_video_torchcodec` (the reader its video
//! processors fetch with): metadata from torchcodec's exact-mode scan (see [`probe_video`]),
//! indices from `default_sample_indices_fn` (`arange(n) * total // n`; for a rate `f`,
//! `n = max(1, int(total / fps * f))`; every frame otherwise), frames counted in presentation
//! order, and timestamps `index / fps`.
//!
//! Frames are converted to RGB by ffmpeg's swscale with bicubic flags. Measured against torchcodec
//! 0.17 (the backend transformers' video processors fetch with) on the same FFmpeg 5.1 libraries:
//! bit-exact for 8-bit yuv420p/yuv444p/yuvj420p (also equal to PyAV 18.1) and for 10-bit
//! yuv420p10le (bilinear differs there by up to 103). Display-matrix rotation is applied (ffmpeg's
//! autorotate), as torchcodec does.

use std::io::Read;
use std::path::Path;

use super::ffmpeg::{self, Invocation, ReadEnd, TempFile};
use super::{RgbImage, Video};
use crate::error::{Error, Result};

const EXPECTED: &str = "a video file ffmpeg can decode (MP4, WebM, MKV, AVI, MOV, GIF, …)";
/// File name extensions taken as frames when a directory is given as a video.
const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "gif", "bmp"];

/// How frames are picked from a video.
#[derive(Debug, Clone, PartialEq)]
pub enum FrameSampling {
    /// `N` frames spread uniformly over the whole clip (`--num-frames`).
    NumFrames(usize),
    /// About `F` frames per second of video (`--fps`).
    Fps(f64),
    /// Every frame (what transformers does when neither is given; callers pass the model's
    /// default as `NumFrames`/`Fps` instead).
    Default,
}

/// Stream metadata, as the reference's video metadata reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoInfo {
    /// Seconds from the first frame's time to the end of the last one.
    pub duration: f64,
    /// Average frame rate: `total_frames / duration`.
    pub fps: f64,
    /// Number of frames (packets) of the first video stream.
    pub total_frames: usize,
    pub width: u32,
    pub height: u32,
}

/// Frame indices transformers' `default_sample_indices_fn` picks. `input` names the video in errors.
pub fn sample_indices(
    total_frames: usize,
    fps: f64,
    sampling: &FrameSampling,
    input: &str,
) -> Result<Vec<usize>> {
    if total_frames == 0 {
        return Err(Error::input(input, "the video has no frames", EXPECTED));
    }
    let num = match *sampling {
        FrameSampling::Default => total_frames,
        FrameSampling::NumFrames(n) => n,
        FrameSampling::Fps(f) => {
            if !(f.is_finite() && f > 0.0) {
                return Err(Error::input(
                    input,
                    format!("a sampling rate of {f} frames per second"),
                    "--fps greater than 0",
                ));
            }
            if !(fps.is_finite() && fps > 0.0) {
                return Err(Error::input(
                    input,
                    "the video reports no frame rate, so it cannot be sampled by rate",
                    "--num-frames instead of --fps for this video",
                ));
            }
            // Python's `int()` truncates toward zero.
            ((total_frames as f64 / fps * f) as usize).max(1)
        }
    };
    if num == 0 {
        return Err(Error::input(
            input,
            "0 frames requested",
            "--num-frames of at least 1",
        ));
    }
    if num > total_frames {
        return Err(Error::input(
            input,
            format!("{num} frames requested but the video has only {total_frames}"),
            "--num-frames / --fps asking for at most as many frames as the video has",
        ));
    }
    let max = max_frames()?;
    if num > max {
        return Err(Error::input(
            input,
            format!("{num} frames would be decoded (at most {max} per video)"),
            "--num-frames N or --fps F choosing fewer frames, or a larger MMLLM_MAX_VIDEO_FRAMES",
        ));
    }
    Ok((0..num).map(|i| i * total_frames / num).collect())
}

/// Frames decoded per video at most: `MMLLM_MAX_VIDEO_FRAMES`, else 1024. Checked before any
/// frame is decoded, so a long clip costs a probe, not gigabytes.
pub const DEFAULT_MAX_VIDEO_FRAMES: usize = 1024;

fn max_frames() -> Result<usize> {
    Ok(super::env_u64("MMLLM_MAX_VIDEO_FRAMES")?.map_or(DEFAULT_MAX_VIDEO_FRAMES, |n| n as usize))
}

/// Reads the first video stream's (attached cover pictures excluded) size, frame count and frame
/// rate with `ffprobe`, the way
/// torchcodec's exact seek mode does: the frame count is the number of packets (those not flagged
/// discard), the duration runs from the smallest packet time to the largest packet time plus its
/// duration, and the rate is count / duration (the header's `r_frame_rate` when that is 0).
pub fn probe_video(path: &Path, input: &str) -> Result<VideoInfo> {
    let out = Invocation::probe(
        path,
        "V:0",
        "stream=width,height,r_frame_rate,time_base:stream_side_data=rotation:packet=pts,dts,duration,flags",
    )
    .run_to_end(input)?;
    if !out.success {
        return Err(Error::input(
            input,
            format!("not a decodable video ({})", ffmpeg::last_line(&out.stderr)),
            EXPECTED,
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.value).map_err(|e| {
        Error::Runtime(anyhow::anyhow!(
            "ffprobe printed unreadable JSON for {input}: {e}"
        ))
    })?;
    let stream = v
        .get("streams")
        .and_then(|s| s.as_array())
        .and_then(|s| s.first())
        .ok_or_else(|| Error::input(input, "the file has no video stream", EXPECTED))?;
    let width = json_i64(stream, "width")
        .unwrap_or(0)
        .clamp(0, u32::MAX as i64) as u32;
    let height = json_i64(stream, "height")
        .unwrap_or(0)
        .clamp(0, u32::MAX as i64) as u32;
    if width == 0 || height == 0 {
        return Err(Error::input(
            input,
            "the video stream has no frame size",
            EXPECTED,
        ));
    }
    // Frames come out rotated by the display matrix (ffmpeg's autorotate, like torchcodec), so
    // a quarter turn swaps the frame size.
    let quarter_turns = stream
        .get("side_data_list")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten()
        .find_map(|d| d.get("rotation").and_then(|r| r.as_f64()))
        .map(|deg| (deg / 90.0).round() as i64)
        .unwrap_or(0);
    let (width, height) = if quarter_turns.rem_euclid(2) == 1 {
        (height, width)
    } else {
        (width, height)
    };
    let header_fps = stream
        .get("r_frame_rate")
        .and_then(|r| r.as_str())
        .and_then(parse_rate);
    let (tb_num, tb_den) = stream
        .get("time_base")
        .and_then(|t| t.as_str())
        .and_then(|t| t.split_once('/'))
        .and_then(|(n, d)| Some((n.trim().parse::<i64>().ok()?, d.trim().parse::<i64>().ok()?)))
        .filter(|&(_, d)| d > 0)
        .unwrap_or((1, 1));

    let mut total_frames = 0usize;
    let (mut begin, mut end) = (i64::MAX, i64::MIN);
    for packet in v
        .get("packets")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
    {
        let flags = packet.get("flags").and_then(|f| f.as_str()).unwrap_or("");
        if flags.contains('D') {
            continue;
        }
        total_frames += 1;
        if let Some(t) = json_i64(packet, "pts").or_else(|| json_i64(packet, "dts")) {
            let dur = json_i64(packet, "duration").unwrap_or(0);
            begin = begin.min(t);
            end = end.max(t.saturating_add(dur));
        }
    }
    if total_frames == 0 {
        return Err(Error::input(input, "the video has no frames", EXPECTED));
    }
    // torchcodec's pts_to_seconds: multiply before dividing, in double.
    let seconds = |pts: i64| pts as f64 * tb_num as f64 / tb_den as f64;
    let duration = if begin <= end {
        seconds(end) - seconds(begin)
    } else {
        0.0
    };
    let fps = if duration != 0.0 {
        total_frames as f64 / duration
    } else {
        header_fps.unwrap_or(0.0)
    };
    Ok(VideoInfo {
        duration,
        fps,
        total_frames,
        width,
        height,
    })
}

/// An integer field that ffprobe prints either as a number or as a string ("N/A" when unknown).
fn json_i64(v: &serde_json::Value, key: &str) -> Option<i64> {
    match v.get(key)? {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// `"30000/1001"` -> 29.97; `"0/0"` -> None.
fn parse_rate(s: &str) -> Option<f64> {
    let (n, d) = s.split_once('/').unwrap_or((s, "1"));
    let (n, d): (f64, f64) = (n.trim().parse().ok()?, d.trim().parse().ok()?);
    (n > 0.0 && d > 0.0)
        .then(|| n / d)
        .filter(|r| r.is_finite())
}

/// Bytes of decoded RGB frames one video may take (8 GiB).
const MAX_DECODED_VIDEO_BYTES: usize = 8 << 30;

/// Decodes the sampled frames of the video at `path` to RGB8.
pub fn decode_video(path: &Path, input: &str, sampling: &FrameSampling) -> Result<Video> {
    let info = probe_video(path, input)?;
    // Each frame is held to the image pixel cap, as a directory of frames is.
    let max_pixels = super::image::ImageLimits::from_env()?.max_pixels;
    let pixels = u64::from(info.width) * u64::from(info.height);
    if pixels > max_pixels {
        return Err(Error::input(
            input,
            format!(
                "frames of {}x{} ({pixels} pixels, at most {max_pixels})",
                info.width, info.height
            ),
            "a video with smaller frames, or a larger MMLLM_MAX_IMAGE_PIXELS",
        ));
    }
    let indices = sample_indices(info.total_frames, info.fps, sampling, input)?;
    let frame_bytes = info.width as usize * info.height as usize * 3;
    let total = frame_bytes.saturating_mul(indices.len());
    if total > MAX_DECODED_VIDEO_BYTES {
        return Err(Error::input(
            input,
            format!(
                "{} frames of {}x{} would decode to {total} bytes",
                indices.len(),
                info.width,
                info.height
            ),
            format!(
                "at most {MAX_DECODED_VIDEO_BYTES} bytes of frames: --num-frames N or --fps F \
                 choosing fewer frames"
            ),
        ));
    }
    // `-fps_mode` is ffmpeg >= 5.1; older releases only know `-vsync` (same meaning).
    let mut out = run_decoder(path, input, "-fps_mode", &indices, frame_bytes)?;
    if !out.success && out.value.is_empty() && out.stderr.contains("fps_mode") {
        out = run_decoder(path, input, "-vsync", &indices, frame_bytes)?;
    }
    if out.value.is_empty() {
        let why = if out.success {
            "ffmpeg produced no frames".to_string()
        } else {
            format!(
                "ffmpeg could not decode it ({})",
                ffmpeg::last_line(&out.stderr)
            )
        };
        return Err(Error::input(input, why, EXPECTED));
    }
    let mut frames = Vec::with_capacity(out.value.len());
    let mut timestamps = Vec::with_capacity(out.value.len());
    for (index, data) in out.value {
        let frame = RgbImage::from_raw(info.width, info.height, data).ok_or_else(|| {
            Error::Runtime(anyhow::anyhow!(
                "frame buffer of {input} has the wrong size"
            ))
        })?;
        frames.push(frame);
        timestamps.push(if info.fps > 0.0 {
            index as f64 / info.fps
        } else {
            0.0
        });
    }
    Ok(Video {
        frames,
        timestamps,
        source_fps: info.fps,
        duration: info.duration,
    })
}

/// A frame's index in the stream and its RGB24 bytes.
type IndexedFrame = (usize, Vec<u8>);

/// Runs ffmpeg over the whole stream as RGB24 and keeps the frames at `indices` (sorted).
fn run_decoder(
    path: &Path,
    input: &str,
    sync_flag: &str,
    indices: &[usize],
    frame_bytes: usize,
) -> Result<ffmpeg::Finished<Vec<IndexedFrame>>> {
    let decoder = Invocation::decode(
        path,
        "0:V:0",
        &[
            // One output frame per decoded frame, in presentation order, so output index ==
            // frame index.
            sync_flag,
            "passthrough",
            "-sws_flags",
            "bicubic",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
        ],
    );
    let wanted = indices.to_vec();
    decoder.run(input, move |stdout| {
        let mut frames: Vec<IndexedFrame> = Vec::with_capacity(wanted.len());
        let mut buf = vec![0u8; frame_bytes];
        let mut next = 0usize;
        let mut index = 0usize;
        while next < wanted.len() {
            if !read_full(stdout, &mut buf)? {
                return Ok((frames, ReadEnd::Eof));
            }
            // Indices are strictly increasing, so one comparison per frame suffices.
            if wanted[next] == index {
                frames.push((index, buf.clone()));
                next += 1;
            }
            index += 1;
        }
        Ok((frames, ReadEnd::Stopped))
    })
}

/// Fills `buf` from `r`; `false` at a clean end of stream before the first byte.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Decodes a video held in memory (URL or stdin) through a temporary file.
pub fn decode_video_bytes(bytes: &[u8], input: &str, sampling: &FrameSampling) -> Result<Video> {
    if bytes.is_empty() {
        return Err(Error::input(input, "the video file is empty", EXPECTED));
    }
    let file = TempFile::with_bytes(bytes, "")?;
    decode_video(file.path(), input, sampling)
}

/// A directory of images, sorted by file name, as a video at 1 frame per second. Only files
/// with an image extension (png, jpg, jpeg, webp, gif, bmp; any case) are frames; `decode` turns
/// one file's bytes into RGB (it gets the file's path as its input name). All frames must have
/// the same size.
pub fn video_from_dir(
    dir: &Path,
    input: &str,
    sampling: &FrameSampling,
    decode: &dyn Fn(&[u8], &str) -> Result<RgbImage>,
) -> Result<Video> {
    let expected = "a directory of same-sized images (png, jpg, webp, gif, bmp) sorted by name";
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::input(input, format!("cannot list the directory: {e}"), expected))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| {
            Error::input(input, format!("cannot list the directory: {e}"), expected)
        })?;
        let path = entry.path();
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if is_image && !hidden && path.is_file() {
            files.push((entry.file_name(), path));
        }
    }
    if files.is_empty() {
        return Err(Error::input(
            input,
            "the directory holds no image files",
            expected,
        ));
    }
    files.sort();
    let fps = 1.0;
    let indices = sample_indices(files.len(), fps, sampling, input)?;
    let mut frames: Vec<RgbImage> = Vec::with_capacity(indices.len());
    for &i in &indices {
        let path = &files[i].1;
        let name = path.display().to_string();
        let bytes = std::fs::read(path)
            .map_err(|e| Error::input(&name, format!("cannot read the frame: {e}"), expected))?;
        let frame = decode(&bytes, &name)?;
        if let Some(first) = frames.first() {
            if first.dimensions() != frame.dimensions() {
                return Err(Error::input(
                    &name,
                    format!(
                        "frame is {}x{} but the first frame is {}x{}",
                        frame.width(),
                        frame.height(),
                        first.width(),
                        first.height()
                    ),
                    expected,
                ));
            }
        }
        frames.push(frame);
    }
    Ok(Video {
        frames,
        timestamps: indices.iter().map(|&i| i as f64 / fps).collect(),
        source_fps: fps,
        duration: files.len() as f64 / fps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_follow_transformers_default_sampler() {
        let idx = |t, f, s: FrameSampling| sample_indices(t, f, &s, "v").expect("indices");
        assert_eq!(
            idx(50, 10.0, FrameSampling::NumFrames(4)),
            vec![0, 12, 25, 37]
        );
        assert_eq!(idx(10, 10.0, FrameSampling::NumFrames(3)), vec![0, 3, 6]);
        // int(50 / 10 * 2) = 10 frames.
        assert_eq!(idx(50, 10.0, FrameSampling::Fps(2.0)).len(), 10);
        assert_eq!(idx(5, 25.0, FrameSampling::Fps(0.1)), vec![0]);
        assert_eq!(idx(3, 1.0, FrameSampling::Default), vec![0, 1, 2]);
        assert!(sample_indices(3, 1.0, &FrameSampling::NumFrames(4), "v").is_err());
        assert!(sample_indices(3, 1.0, &FrameSampling::NumFrames(0), "v").is_err());
        assert!(sample_indices(3, 0.0, &FrameSampling::Fps(1.0), "v").is_err());
    }

    #[test]
    fn rates_parse_as_fractions() {
        assert_eq!(parse_rate("10/1"), Some(10.0));
        assert!((parse_rate("30000/1001").unwrap_or(0.0) - 29.97).abs() < 1e-3);
        assert_eq!(parse_rate("0/0"), None);
    }
}

//! Model-agnostic media decoding: bytes from a [`source::Source`] become a [`MediaItem`].
//! Knows no model; must not import `models`, `engine`, `prompt`, `cli` or `app`.

pub mod audio;
pub mod embeds;
pub mod fetch;
mod ffmpeg;
pub mod image;
mod npy;
pub mod resample;
pub mod source;
pub mod video;

use std::collections::BTreeMap;

pub use crate::limits::env_u64;
pub use ::image::RgbImage;
pub use ffmpeg::remove_temp_files;

/// The kind of a media item, as counted by `--limit-mm-per-prompt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Modality {
    Image,
    Video,
    Audio,
}

impl Modality {
    pub fn name(self) -> &'static str {
        match self {
            Modality::Image => "image",
            Modality::Video => "video",
            Modality::Audio => "audio",
        }
    }
}

impl std::fmt::Display for Modality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Decoded video: RGB8 frames with their presentation times in seconds.
#[derive(Debug, Clone)]
pub struct Video {
    pub frames: Vec<RgbImage>,
    pub timestamps: Vec<f64>,
    /// Frame rate of the source (for a directory of images: 1.0 unless told otherwise).
    pub source_fps: f64,
    /// Duration of the source in seconds.
    pub duration: f64,
}

/// Decoded audio: mono f32 samples in [-1, 1] at `sample_rate`.
#[derive(Debug, Clone)]
pub struct Audio {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
}

/// Precomputed embeddings: named tensors (`image_embeds`, optionally `image_grid_thw`, `image_sizes`).
#[derive(Debug, Clone)]
pub struct Embeds {
    pub modality: Modality,
    pub tensors: BTreeMap<String, candle_core::Tensor>,
}

/// One decoded media item of a prompt.
#[derive(Debug, Clone)]
pub enum MediaItem {
    Image(RgbImage),
    Video(Video),
    Audio(Audio),
    Embeds(Embeds),
}

impl MediaItem {
    pub fn modality(&self) -> Modality {
        match self {
            MediaItem::Image(_) => Modality::Image,
            MediaItem::Video(_) => Modality::Video,
            MediaItem::Audio(_) => Modality::Audio,
            MediaItem::Embeds(e) => e.modality,
        }
    }
}

/// Byte caps for reading each kind of input (downloads stop past them).
pub const MAX_AUDIO_BYTES: u64 = 512 << 20;
pub const MAX_VIDEO_BYTES: u64 = 2 << 30;
pub const MAX_EMBEDS_BYTES: u64 = 2 << 30;

/// How to decode one media argument.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub images: image::ImageLimits,
    pub frames: video::FrameSampling,
    /// Sample rate of `.npy` audio, which carries none.
    pub npy_sample_rate: Option<u32>,
    /// What URLs may reach.
    pub fetch: source::FetchPolicy,
}

/// Reads `source` and decodes it as `modality` (or as embeddings of it when `embeds`).
pub fn load(
    source: &source::Source,
    modality: Modality,
    embeds: bool,
    opts: &LoadOptions,
    stdin: &mut dyn std::io::Read,
) -> crate::error::Result<MediaItem> {
    let input = source.display();
    if embeds {
        let bytes = source.read(modality, MAX_EMBEDS_BYTES, &opts.fetch, stdin)?;
        return Ok(MediaItem::Embeds(embeds::load_embeds(
            &bytes, &input, modality,
        )?));
    }
    match modality {
        Modality::Image => {
            let bytes = source.read(modality, opts.images.max_bytes, &opts.fetch, stdin)?;
            Ok(MediaItem::Image(image::decode_image(
                &bytes,
                &input,
                &opts.images,
            )?))
        }
        Modality::Audio => {
            let bytes = source.read(modality, MAX_AUDIO_BYTES, &opts.fetch, stdin)?;
            let is_npy = bytes.starts_with(b"\x93NUMPY");
            let audio = match (is_npy, opts.npy_sample_rate) {
                (true, Some(rate)) => audio::audio_from_npy(&bytes, &input, rate, None)?,
                (true, None) => {
                    return Err(crate::error::Error::input(
                        &input,
                        "a .npy array carries no sample rate",
                        "--sample-rate HZ with .npy audio",
                    ))
                }
                (false, Some(_)) => {
                    return Err(crate::error::Error::input(
                        &input,
                        "--sample-rate is given but this file is not a .npy array (its \
                         header has the rate)",
                        "--sample-rate only with .npy audio",
                    ))
                }
                (false, None) => audio::decode_audio(&bytes, &input, None)?,
            };
            Ok(MediaItem::Audio(audio))
        }
        Modality::Video => {
            let decode_frame =
                |bytes: &[u8], name: &str| image::decode_image(bytes, name, &opts.images);
            let video = match source {
                source::Source::Path(p) if p.is_dir() => {
                    video::video_from_dir(p, &input, &opts.frames, &decode_frame)?
                }
                source::Source::Path(p) if p.is_file() => {
                    video::decode_video(p, &input, &opts.frames)?
                }
                _ => {
                    let bytes = source.read(modality, MAX_VIDEO_BYTES, &opts.fetch, stdin)?;
                    video::decode_video_bytes(&bytes, &input, &opts.frames)?
                }
            };
            Ok(MediaItem::Video(video))
        }
    }
}

//! Model-agnostic media decoding: bytes from a [`source::Source`] become a [`MediaItem`].
//! Knows no model; must not import `models`, `engine`, `prompt`, `cli` or `app`.

pub mod audio;
pub mod embeds;
mod ffmpeg;
pub mod image;
mod npy;
pub mod resample;
pub mod source;
pub mod video;

use std::collections::BTreeMap;

pub use ::image::RgbImage;

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

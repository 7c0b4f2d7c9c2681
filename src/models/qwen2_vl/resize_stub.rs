//! TEMPORARY stand-in for `crate::models::common::resize` (Pillow-exact resampling), which is
//! built on another branch. Same signature; the integrator deletes this file and points
//! `preprocessor.rs` at the real module. `image`'s Catmull-Rom is NOT Pillow's antialiased
//! bicubic, so pixel parity with transformers needs the real one.

use image::imageops::FilterType;

use crate::media::RgbImage;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)]
pub enum Filter {
    Bilinear,
    Bicubic,
    Lanczos,
}

pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    if img.width() == width && img.height() == height {
        return img.clone();
    }
    let f = match filter {
        Filter::Bilinear => FilterType::Triangle,
        Filter::Bicubic => FilterType::CatmullRom,
        Filter::Lanczos => FilterType::Lanczos3,
    };
    image::imageops::resize(img, width, height, f)
}

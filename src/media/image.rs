//! Image decoding to upright RGB8, pixel for pixel what transformers sees.
//!
//! The reference is `PIL.Image.open` + `ImageOps.exif_transpose` (as in `load_image`) followed
//! by the image processor's `convert_to_rgb` (transparency composited on white with
//! `Image.alpha_composite`). JPEG goes through libjpeg-turbo (islow IDCT, fancy upsampling, like
//! Pillow); PNG, GIF, WebP and BMP through the `image` crate, with Pillow's mode conversions
//! (16-bit samples, CMYK, palettes, alpha) reproduced here. Decompression bombs are refused from
//! the header, before any pixel is decoded. Knows no model.
//!
//! Known limits of the match: `load_image(path)` alone converts with `.convert("RGB")`, which
//! drops alpha instead of compositing; we follow the processor (`convert_to_rgb`), which is what
//! a PIL image passed to a processor gets. Not verified against Pillow: 16-bit PNGs with a tRNS
//! colour key, GIFs whose first frame is smaller than the logical screen, animated WebP/APNG
//! (first frame is used), EXIF stored only in PNG "Raw profile type exif" text chunks (ignored).

use std::io::Cursor;

use ::image::{ColorType, ImageDecoder};
use rayon::prelude::*;

use super::RgbImage;
use crate::error::{Error, Result};

const SUPPORTED: &str = "JPEG, PNG, WebP, GIF or BMP";

/// Caps applied to every image before its pixels are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted `width * height`.
    pub max_pixels: u64,
    /// Largest accepted encoded size in bytes.
    pub max_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            // Pillow raises DecompressionBombError above 2 * MAX_IMAGE_PIXELS.
            max_pixels: 2 * 89_478_485,
            max_bytes: 64 << 20,
        }
    }
}

impl ImageLimits {
    /// The defaults, overridden by `MMLLM_MAX_IMAGE_PIXELS` / `MMLLM_MAX_IMAGE_BYTES`.
    pub fn from_env() -> Result<Self> {
        let mut limits = ImageLimits::default();
        if let Some(v) = super::env_u64("MMLLM_MAX_IMAGE_PIXELS")? {
            limits.max_pixels = v;
        }
        if let Some(v) = super::env_u64("MMLLM_MAX_IMAGE_BYTES")? {
            limits.max_bytes = v;
        }
        Ok(limits)
    }
}

/// Container formats recognised from their magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
    WebP,
    Gif,
    Bmp,
}

impl ImageFormat {
    /// The format announced by the first bytes, if it is one we decode.
    pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageFormat::Jpeg)
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(ImageFormat::Png)
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Some(ImageFormat::WebP)
        } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
            Some(ImageFormat::Gif)
        } else if bytes.starts_with(b"BM") {
            Some(ImageFormat::Bmp)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Png => "PNG",
            ImageFormat::WebP => "WebP",
            ImageFormat::Gif => "GIF",
            ImageFormat::Bmp => "BMP",
        }
    }
}

/// Checks the byte cap, the format and the header's dimensions against the pixel cap without
/// decoding pixels. Returns the upright `(width, height)` (EXIF orientation applied).
pub fn probe_image(bytes: &[u8], input: &str, limits: &ImageLimits) -> Result<(u32, u32)> {
    let format = check_bytes_and_sniff(bytes, input, limits)?;
    let (w, h) = header_dimensions(format, bytes, input)?;
    check_pixels(w, h, input, limits)?;
    if format == ImageFormat::Gif {
        let (cw, ch) = gif_canvas(bytes, (w, h));
        check_pixels(cw, ch, input, limits)?;
    }
    // Only 5..=8 transpose; other values (0, 9, …) leave the image as is, as in Pillow.
    Ok(if (5..=8).contains(&orientation(format, bytes)) {
        (h, w)
    } else {
        (w, h)
    })
}

/// Decodes an image file to upright RGB8 exactly as Pillow + transformers do.
pub fn decode_image(bytes: &[u8], input: &str, limits: &ImageLimits) -> Result<RgbImage> {
    let format = check_bytes_and_sniff(bytes, input, limits)?;
    let (w, h) = header_dimensions(format, bytes, input)?;
    check_pixels(w, h, input, limits)?;
    if format == ImageFormat::Gif {
        let (cw, ch) = gif_canvas(bytes, (w, h));
        check_pixels(cw, ch, input, limits)?;
    }
    let rgb = match format {
        ImageFormat::Jpeg => decode_jpeg(bytes, input)?,
        _ => decode_with_image_crate(format, bytes, input)?,
    };
    Ok(apply_orientation(rgb, orientation(format, bytes)))
}

fn check_bytes_and_sniff(bytes: &[u8], input: &str, limits: &ImageLimits) -> Result<ImageFormat> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(Error::input(
            input,
            format!(
                "image file is {} bytes, over the limit of {} bytes",
                bytes.len(),
                limits.max_bytes
            ),
            "a smaller image, or a larger MMLLM_MAX_IMAGE_BYTES",
        ));
    }
    ImageFormat::sniff(bytes).ok_or_else(|| {
        Error::input(
            input,
            "unsupported image format (unrecognised file signature)",
            SUPPORTED,
        )
    })
}

fn check_pixels(w: u32, h: u32, input: &str, limits: &ImageLimits) -> Result<()> {
    let pixels = u64::from(w) * u64::from(h);
    if pixels == 0 {
        return Err(Error::input(
            input,
            format!("image has no pixels ({w}x{h})"),
            "an image at least 1x1",
        ));
    }
    if pixels > limits.max_pixels {
        return Err(Error::input(
            input,
            format!(
                "image is {w}x{h} = {pixels} pixels, over the limit of {} (possible decompression bomb)",
                limits.max_pixels
            ),
            "a smaller image, or a larger MMLLM_MAX_IMAGE_PIXELS",
        ));
    }
    Ok(())
}

fn corrupt(input: &str, format: ImageFormat, err: impl std::fmt::Display) -> Error {
    Error::input(
        input,
        format!("cannot decode {} data: {err}", format.name()),
        format!("a complete, valid {} file", format.name()),
    )
}

fn header_dimensions(format: ImageFormat, bytes: &[u8], input: &str) -> Result<(u32, u32)> {
    let dims = match format {
        ImageFormat::Jpeg => {
            let header = turbojpeg::read_header(bytes).map_err(|e| corrupt(input, format, e))?;
            match (u32::try_from(header.width), u32::try_from(header.height)) {
                (Ok(w), Ok(h)) => Ok((w, h)),
                _ => return Err(corrupt(input, format, "dimensions out of range")),
            }
        }
        ImageFormat::Png => dims_of(::image::codecs::png::PngDecoder::new(Cursor::new(bytes))),
        ImageFormat::Gif => dims_of(::image::codecs::gif::GifDecoder::new(Cursor::new(bytes))),
        ImageFormat::WebP => dims_of(::image::codecs::webp::WebPDecoder::new(Cursor::new(bytes))),
        ImageFormat::Bmp => dims_of(::image::codecs::bmp::BmpDecoder::new(Cursor::new(bytes))),
    };
    dims.map_err(|e| corrupt(input, format, e))
}

/// The canvas Pillow opens a GIF at: the logical screen grown to cover the first frame
/// (`GifImagePlugin._seek`), which its decompression-bomb check sees. Without this check a
/// tiny GIF whose frame is far larger than its screen was decoded in full (found by fuzzing).
fn gif_canvas(bytes: &[u8], (w, h): (u32, u32)) -> (u32, u32) {
    let u16_at = |i: usize| {
        bytes
            .get(i..i + 2)
            .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]])))
    };
    // Header (6) and logical screen descriptor (7), then the global colour table if flagged.
    let mut p = 13usize;
    if let Some(flags) = bytes.get(10).filter(|f| *f & 0x80 != 0) {
        p += 3 << ((flags & 7) + 1);
    }
    loop {
        match bytes.get(p) {
            // Extension: introducer, label, then data sub-blocks up to an empty one.
            Some(0x21) => {
                p += 2;
                loop {
                    let Some(&n) = bytes.get(p) else {
                        return (w, h);
                    };
                    p += 1 + n as usize;
                    if n == 0 {
                        break;
                    }
                }
            }
            // Image descriptor: left, top, width, height.
            Some(0x2C) => {
                return match (u16_at(p + 1), u16_at(p + 3), u16_at(p + 5), u16_at(p + 7)) {
                    (Some(x), Some(y), Some(fw), Some(fh)) => (w.max(x + fw), h.max(y + fh)),
                    _ => (w, h),
                };
            }
            _ => return (w, h),
        }
    }
}

fn dims_of<D: ImageDecoder>(decoder: ::image::ImageResult<D>) -> ::image::ImageResult<(u32, u32)> {
    decoder.map(|d| d.dimensions())
}

// ---------------------------------------------------------------------------------------- JPEG

fn decode_jpeg(bytes: &[u8], input: &str) -> Result<RgbImage> {
    match decode_jpeg_split(bytes, input, SPLIT_DECODE_PIXELS)? {
        Some(img) => Ok(img),
        None => decode_jpeg_whole(bytes, input),
    }
}

fn decode_jpeg_whole(bytes: &[u8], input: &str) -> Result<RgbImage> {
    let fmt = ImageFormat::Jpeg;
    let mut dec = turbojpeg::Decompressor::new().map_err(|e| corrupt(input, fmt, e))?;
    let header = dec.read_header(bytes).map_err(|e| corrupt(input, fmt, e))?;
    let (w, h) = (header.width, header.height);
    match header.colorspace {
        turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK => {
            let mut cmyk = turbojpeg::Image {
                pixels: vec![0u8; w * h * 4],
                width: w,
                pitch: w * 4,
                height: h,
                format: turbojpeg::PixelFormat::CMYK,
            };
            tolerate_warnings(dec.decompress(bytes, cmyk.as_deref_mut()), input)?;
            let mut rgb = Vec::with_capacity(w * h * 3);
            for px in cmyk.pixels.chunks_exact(4) {
                // Pillow reads CMYK JPEGs as "CMYK;I" (Adobe polarity), then converts to RGB.
                let inv = [255 - px[0], 255 - px[1], 255 - px[2], 255 - px[3]];
                rgb.extend_from_slice(&cmyk_to_rgb(inv));
            }
            rgb_image(w as u32, h as u32, rgb, input)
        }
        _ => {
            let mut out = turbojpeg::Image {
                pixels: vec![0u8; w * h * 3],
                width: w,
                pitch: w * 3,
                height: h,
                format: turbojpeg::PixelFormat::RGB,
            };
            tolerate_warnings(dec.decompress(bytes, out.as_deref_mut()), input)?;
            rgb_image(w as u32, h as u32, out.pixels, input)
        }
    }
}

/// Images at least this large are decoded by two threads, each decoding half of the rows.
const SPLIT_DECODE_PIXELS: usize = 1 << 21;

/// A baseline JPEG decoded in two parts at once: the top rows by one libjpeg-turbo decoder,
/// the rest by another that skips the top (entropy decoding only, no IDCT, upsampling or
/// colour conversion). libjpeg-turbo's skip and crop produce exactly the rows of a full
/// decode (its croptest checks this), and each half writes its own rows of the buffer.
/// `None` when the image is not one this applies to (progressive, arithmetic, lossless, not
/// YCbCr/gray, small, or a single thread); the caller then decodes it whole.
fn decode_jpeg_split(bytes: &[u8], input: &str, min_pixels: usize) -> Result<Option<RgbImage>> {
    use turbojpeg::raw as sys;
    if rayon::current_num_threads() < 2 {
        return Ok(None);
    }
    let header = Decoder::new(input)?;
    if header.read_header(bytes, input).is_err() {
        // The whole-image path reports the error.
        return Ok(None);
    }
    let get = |p| header.get(p);
    let (w, h) = (
        get(sys::TJPARAM_TJPARAM_JPEGWIDTH),
        get(sys::TJPARAM_TJPARAM_JPEGHEIGHT),
    );
    let colorspace = get(sys::TJPARAM_TJPARAM_COLORSPACE);
    let plain = get(sys::TJPARAM_TJPARAM_PROGRESSIVE) == 0
        && get(sys::TJPARAM_TJPARAM_ARITHMETIC) == 0
        && get(sys::TJPARAM_TJPARAM_LOSSLESS) == 0
        && !matches!(colorspace as u32, sys::TJCS_TJCS_CMYK | sys::TJCS_TJCS_YCCK);
    let (w, h) = (
        usize::try_from(w).unwrap_or(0),
        usize::try_from(h).unwrap_or(0),
    );
    if !plain || w * h < min_pixels || h < 32 {
        return Ok(None);
    }
    // The bottom decoder entropy-decodes the top rows too (about half the cost of decoding
    // them), so the top part is the larger: 2/3 balances the two.
    let split = h * 2 / 3;
    let mut pixels = vec![0u8; w * h * 3];
    let (top, bottom) = pixels.split_at_mut(split * w * 3);
    let (a, b) = rayon::join(
        || decode_rows(bytes, input, top, w, 0, split),
        || decode_rows(bytes, input, bottom, w, split, h - split),
    );
    a?;
    b?;
    rgb_image(w as u32, h as u32, pixels, input).map(Some)
}

/// Decodes rows `y..y + rows` of a JPEG `w` pixels wide into `out` as RGB.
fn decode_rows(
    bytes: &[u8],
    input: &str,
    out: &mut [u8],
    w: usize,
    y: usize,
    rows: usize,
) -> Result<()> {
    use turbojpeg::raw as sys;
    let dec = Decoder::new(input)?;
    dec.read_header(bytes, input)?;
    let region = sys::tjregion {
        x: 0,
        y: y as i32,
        w: 0,
        h: rows as i32,
    };
    // SAFETY: the handle is valid (owned by `dec`).
    if unsafe { sys::tj3SetCroppingRegion(dec.0, region) } != 0 {
        return Err(dec.error(input));
    }
    debug_assert_eq!(out.len(), w * rows * 3);
    // SAFETY: `out` holds `rows` rows of `w * 3` bytes, the cropped region's size; the
    // decoder writes only those and reads `bytes` within its length.
    let rc = unsafe {
        sys::tj3Decompress8(
            dec.0,
            bytes.as_ptr(),
            bytes.len() as _,
            out.as_mut_ptr(),
            (w * 3) as i32,
            sys::TJPF_TJPF_RGB,
        )
    };
    if rc != 0 {
        tolerate_warnings(Err(turbojpeg::Error::TurboJpegError(dec.message())), input)?;
    }
    Ok(())
}

/// An owned TurboJPEG decompressor handle.
struct Decoder(turbojpeg::raw::tjhandle);

impl Decoder {
    fn new(input: &str) -> Result<Self> {
        // SAFETY: plain constructor; a null handle is checked.
        let handle =
            unsafe { turbojpeg::raw::tj3Init(turbojpeg::raw::TJINIT_TJINIT_DECOMPRESS as i32) };
        if handle.is_null() {
            return Err(corrupt(input, ImageFormat::Jpeg, "cannot create a decoder"));
        }
        Ok(Decoder(handle))
    }

    fn read_header(&self, bytes: &[u8], input: &str) -> Result<()> {
        // SAFETY: valid handle; `bytes` is read within its length.
        if unsafe { turbojpeg::raw::tj3DecompressHeader(self.0, bytes.as_ptr(), bytes.len() as _) }
            != 0
        {
            return Err(self.error(input));
        }
        Ok(())
    }

    fn get(&self, param: turbojpeg::raw::TJPARAM) -> i32 {
        // SAFETY: valid handle.
        unsafe { turbojpeg::raw::tj3Get(self.0, param as i32) }
    }

    fn message(&self) -> String {
        // SAFETY: valid handle; the error string is NUL-terminated and lives in the handle.
        unsafe { std::ffi::CStr::from_ptr(turbojpeg::raw::tj3GetErrorStr(self.0)) }
            .to_string_lossy()
            .into_owned()
    }

    fn error(&self, input: &str) -> Error {
        corrupt(input, ImageFormat::Jpeg, self.message())
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { turbojpeg::raw::tj3Destroy(self.0) }
    }
}

/// TurboJPEG reports libjpeg warnings as failures after decoding the whole image. Pillow ignores
/// warnings (corrupt-but-recoverable data such as extraneous bytes before a marker) but refuses a
/// truncated file, which libjpeg signals with the "Premature end of JPEG file" warning.
fn tolerate_warnings(res: turbojpeg::Result<()>, input: &str) -> Result<()> {
    const WARNINGS: [&str; 5] = [
        "Corrupt JPEG data",
        "Warning:",
        "Invalid SOS parameters",
        "Inconsistent progression sequence",
        "Unknown Adobe color transform",
    ];
    match res {
        Ok(()) => Ok(()),
        Err(turbojpeg::Error::TurboJpegError(msg)) if WARNINGS.iter().any(|w| msg.contains(w)) => {
            Ok(())
        }
        Err(e) => Err(corrupt(input, ImageFormat::Jpeg, e)),
    }
}

/// Pillow's `cmyk2rgb` (libImaging/Convert.c) on one pixel.
fn cmyk_to_rgb(px: [u8; 4]) -> [u8; 3] {
    let nk = 255 - i32::from(px[3]);
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let ch = |c: u8| (nk - muldiv255(i32::from(c), nk)).clamp(0, 255) as u8;
    [ch(px[0]), ch(px[1]), ch(px[2])]
}

fn rgb_image(w: u32, h: u32, pixels: Vec<u8>, input: &str) -> Result<RgbImage> {
    RgbImage::from_raw(w, h, pixels).ok_or_else(|| {
        Error::Runtime(anyhow::anyhow!(
            "{input}: decoded buffer does not match {w}x{h}"
        ))
    })
}

// ------------------------------------------------------------------------ PNG, GIF, WebP, BMP

fn decode_with_image_crate(format: ImageFormat, bytes: &[u8], input: &str) -> Result<RgbImage> {
    let err = |e: ::image::ImageError| corrupt(input, format, e);
    let (w, h, color, buf) = match format {
        ImageFormat::Png => {
            read_all(::image::codecs::png::PngDecoder::new(Cursor::new(bytes)).map_err(err)?)
        }
        ImageFormat::Gif => {
            read_all(::image::codecs::gif::GifDecoder::new(Cursor::new(bytes)).map_err(err)?)
        }
        ImageFormat::WebP => {
            read_all(::image::codecs::webp::WebPDecoder::new(Cursor::new(bytes)).map_err(err)?)
        }
        ImageFormat::Bmp => {
            read_all(::image::codecs::bmp::BmpDecoder::new(Cursor::new(bytes)).map_err(err)?)
        }
        ImageFormat::Jpeg => unreachable!("JPEG is decoded by libjpeg-turbo"),
    }
    .map_err(err)?;
    let n = w as usize * h as usize;
    let mut rgb = Vec::with_capacity(n * 3);
    match color {
        ColorType::Rgb8 => rgb = buf,
        ColorType::L8 => buf.iter().for_each(|&l| rgb.extend_from_slice(&[l, l, l])),
        ColorType::Rgba8 if format == ImageFormat::Bmp && !bmp_has_alpha(bytes) => {
            // Pillow reads 32-bit BI_RGB bitmaps as "BGRX": the fourth byte is padding.
            buf.chunks_exact(4)
                .for_each(|p| rgb.extend_from_slice(&p[..3]));
        }
        ColorType::Rgba8 => buf
            .chunks_exact(4)
            .for_each(|p| rgb.extend_from_slice(&composite_on_white([p[0], p[1], p[2]], p[3]))),
        ColorType::La8 => buf
            .chunks_exact(2)
            .for_each(|p| rgb.extend_from_slice(&composite_on_white([p[0]; 3], p[1]))),
        // 16-bit PNGs: Pillow keeps the high byte of colour samples ("RGB;16B", "LA;16B") but
        // opens 16-bit gray as "I;16", whose conversion to 8 bits clips at 255.
        ColorType::Rgb16 => u16s(&buf).for_each(|v| rgb.push((v >> 8) as u8)),
        ColorType::Rgba16 => {
            let v: Vec<u16> = u16s(&buf).collect();
            v.chunks_exact(4).for_each(|p| {
                let c = [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8];
                rgb.extend_from_slice(&composite_on_white(c, (p[3] >> 8) as u8));
            })
        }
        ColorType::L16 => u16s(&buf).for_each(|v| {
            let l = v.min(255) as u8;
            rgb.extend_from_slice(&[l, l, l]);
        }),
        ColorType::La16 => {
            let v: Vec<u16> = u16s(&buf).collect();
            v.chunks_exact(2).for_each(|p| {
                let l = (p[0] >> 8) as u8;
                rgb.extend_from_slice(&composite_on_white([l; 3], (p[1] >> 8) as u8));
            })
        }
        other => {
            return Err(Error::input(
                input,
                format!("unsupported {} pixel layout {other:?}", format.name()),
                "8- or 16-bit gray, gray+alpha, RGB or RGBA",
            ))
        }
    }
    rgb_image(w, h, rgb, input)
}

type Raw = (u32, u32, ColorType, Vec<u8>);

fn read_all<D: ImageDecoder>(decoder: D) -> ::image::ImageResult<Raw> {
    let (w, h) = decoder.dimensions();
    let color = decoder.color_type();
    let mut buf = vec![0u8; decoder.total_bytes() as usize];
    decoder.read_image(&mut buf)?;
    Ok((w, h, color, buf))
}

/// The `image` crate hands 16-bit samples over in native byte order.
fn u16s(buf: &[u8]) -> impl Iterator<Item = u16> + '_ {
    buf.chunks_exact(2)
        .map(|b| u16::from_ne_bytes([b[0], b[1]]))
}

/// Whether a 32-bit BMP declares an alpha mask (BITFIELDS with a V3+ header); Pillow ignores the
/// fourth byte otherwise.
fn bmp_has_alpha(bytes: &[u8]) -> bool {
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let header_size = u32_at(14).unwrap_or(0);
    let compression = u32_at(30).unwrap_or(0);
    // BI_BITFIELDS (3) or BI_ALPHABITFIELDS (6) with the alpha mask at offset 54.
    (compression == 3 || compression == 6) && header_size >= 56 && u32_at(66).unwrap_or(0) != 0
}

/// `Image.alpha_composite(white, src)` for one pixel (libImaging/AlphaComposite.c, dst = opaque
/// white), then the alpha channel is dropped as `.convert("RGB")` does.
pub fn composite_on_white(rgb: [u8; 3], alpha: u8) -> [u8; 3] {
    if alpha == 0 {
        return [255, 255, 255];
    }
    const PRECISION_BITS: u32 = 7;
    let sa = u32::from(alpha);
    let blend = 255 * (255 - sa);
    let outa255 = sa * 255 + blend;
    let coef1 = sa * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let shift_div255 = |a: u32| ((a >> 8) + a) >> 8;
    rgb.map(|c| {
        let tmp = u32::from(c) * coef1 + 255 * coef2;
        (shift_div255(tmp + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
    })
}

// --------------------------------------------------------------------------------- orientation

/// The EXIF orientation (1..=8) Pillow's `exif_transpose` would act on; 1 when absent.
/// EXIF IFD0 first, then XMP `tiff:Orientation` as Pillow's `getexif` falls back to it.
fn orientation(format: ImageFormat, bytes: &[u8]) -> u32 {
    if !matches!(
        format,
        ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP
    ) {
        return 1;
    }
    let exif = ::exif::Reader::new().read_from_container(&mut Cursor::new(bytes));
    if let Ok(exif) = &exif {
        if let Some(field) = exif.get_field(::exif::Tag::Orientation, ::exif::In::PRIMARY) {
            return field.value.get_uint(0).unwrap_or(1);
        }
    }
    xmp_packet(format, bytes)
        .and_then(|xmp| xmp_orientation(&xmp))
        .unwrap_or(1)
}

fn xmp_packet(format: ImageFormat, bytes: &[u8]) -> Option<Vec<u8>> {
    match format {
        ImageFormat::Jpeg => jpeg_xmp(bytes),
        ImageFormat::Png => ::image::codecs::png::PngDecoder::new(Cursor::new(bytes))
            .ok()?
            .xmp_metadata()
            .ok()?,
        ImageFormat::WebP => ::image::codecs::webp::WebPDecoder::new(Cursor::new(bytes))
            .ok()?
            .xmp_metadata()
            .ok()?,
        _ => None,
    }
}

/// The payload of the first XMP APP1 segment before the image data.
fn jpeg_xmp(bytes: &[u8]) -> Option<Vec<u8>> {
    const XMP_ID: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";
    let mut pos = 2;
    while pos + 4 <= bytes.len() {
        if bytes[pos] != 0xFF {
            return None;
        }
        let marker = bytes[pos + 1];
        if marker == 0xFF {
            pos += 1;
            continue;
        }
        if marker == 0xDA || marker == 0xD9 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([bytes[pos + 2], bytes[pos + 3]]));
        let seg = bytes.get(pos + 4..pos + 2 + len)?;
        if marker == 0xE1 && seg.starts_with(XMP_ID) {
            return Some(seg[XMP_ID.len()..].to_vec());
        }
        pos += 2 + len;
    }
    None
}

/// Pillow's `re.search(r'tiff:Orientation(="|>)([0-9])', xmp)`.
fn xmp_orientation(xmp: &[u8]) -> Option<u32> {
    const KEY: &[u8] = b"tiff:Orientation";
    let mut i = 0;
    while i + KEY.len() <= xmp.len() {
        if &xmp[i..i + KEY.len()] == KEY {
            let rest = &xmp[i + KEY.len()..];
            let digit = match rest {
                [b'=', b'"', d, ..] | [b'>', d, ..] => Some(*d),
                _ => None,
            };
            if let Some(d) = digit.filter(u8::is_ascii_digit) {
                return Some(u32::from(d - b'0'));
            }
        }
        i += 1;
    }
    None
}

/// `Image.transpose` as `exif_transpose` maps orientations 2..=8 to it.
fn apply_orientation(img: RgbImage, orientation: u32) -> RgbImage {
    let (w, h) = (img.width() as isize, img.height() as isize);
    // The source pixel of output pixel (x, y) is `start + x * dx + y * dy` (in pixels):
    // an affine map for each orientation.
    let (start, dx, dy) = match orientation {
        2 => (w - 1, -1, w),                // FLIP_LEFT_RIGHT: (w-1-x, y)
        3 => ((h - 1) * w + w - 1, -1, -w), // ROTATE_180: (w-1-x, h-1-y)
        4 => ((h - 1) * w, 1, -w),          // FLIP_TOP_BOTTOM: (x, h-1-y)
        5 => (0, w, 1),                     // TRANSPOSE: (y, x)
        6 => ((h - 1) * w, -w, 1),          // ROTATE_270 (90 degrees clockwise): (y, h-1-x)
        7 => ((h - 1) * w + w - 1, -w, -1), // TRANSVERSE: (w-1-y, h-1-x)
        8 => (w - 1, w, -1),                // ROTATE_90 (90 degrees counter-clockwise): (w-1-y, x)
        _ => return img,
    };
    let (ow, oh) = if orientation >= 5 { (h, w) } else { (w, h) };
    let src = img.as_raw();
    let mut out = vec![0u8; (ow * oh * 3) as usize];
    // Bands of rows in parallel, each copied in square tiles so that a rotation reads each
    // source cache line while it is still cached (column-wise reads of a 12-MP image miss on
    // every pixel otherwise).
    const TILE: usize = 64;
    let row_bytes = (ow * 3) as usize;
    out.par_chunks_mut(row_bytes * TILE)
        .enumerate()
        .for_each(|(band, rows)| {
            for x0 in (0..ow as usize).step_by(TILE) {
                let x1 = (x0 + TILE).min(ow as usize);
                for (r, row) in rows.chunks_exact_mut(row_bytes).enumerate() {
                    let y = (band * TILE + r) as isize;
                    let mut p = start + y * dy + x0 as isize * dx;
                    for px in row[x0 * 3..x1 * 3].chunks_exact_mut(3) {
                        let i = p as usize * 3;
                        px.copy_from_slice(&src[i..i + 3]);
                        p += dx;
                    }
                }
            }
        });
    RgbImage::from_raw(ow as u32, oh as u32, out).unwrap_or_else(|| RgbImage::new(0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_from_env() {
        // The only test touching these variables.
        std::env::set_var("MMLLM_MAX_IMAGE_PIXELS", "1000");
        std::env::remove_var("MMLLM_MAX_IMAGE_BYTES");
        let l = ImageLimits::from_env().unwrap();
        assert_eq!((l.max_pixels, l.max_bytes), (1000, 64 << 20));
        std::env::set_var("MMLLM_MAX_IMAGE_PIXELS", "lots");
        let err = ImageLimits::from_env().unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("MMLLM_MAX_IMAGE_PIXELS"));
        std::env::remove_var("MMLLM_MAX_IMAGE_PIXELS");
    }

    #[test]
    fn sniffs_magic_bytes() {
        assert_eq!(
            ImageFormat::sniff(b"\xFF\xD8\xFF\xE0"),
            Some(ImageFormat::Jpeg)
        );
        assert_eq!(ImageFormat::sniff(b"GIF89a.."), Some(ImageFormat::Gif));
        assert_eq!(
            ImageFormat::sniff(b"RIFF\0\0\0\0WEBPVP8 "),
            Some(ImageFormat::WebP)
        );
        assert_eq!(ImageFormat::sniff(b"RIFF\0\0\0\0WAVEfmt "), None);
        assert_eq!(ImageFormat::sniff(b"%PDF-1.7"), None);
    }

    #[test]
    fn composite_extremes() {
        assert_eq!(composite_on_white([10, 20, 30], 255), [10, 20, 30]);
        assert_eq!(composite_on_white([10, 20, 30], 0), [255, 255, 255]);
    }

    /// Every JPEG of the test data, and 12-MP ones encoded here (4:2:0, 4:2:2, 4:4:4, gray),
    /// decoded in two parts equal the whole decode.
    #[test]
    fn split_decode_equals_whole_decode() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        for dir in [data.clone(), data.join("image")] {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let bytes = std::fs::read(&path).unwrap_or_default();
                if ImageFormat::sniff(&bytes) == Some(ImageFormat::Jpeg) {
                    files.push((path.display().to_string(), bytes));
                }
            }
        }
        assert!(files.len() >= 10, "{}", files.len());
        let photo = decode_image(&files[0].1, &files[0].0, &ImageLimits::default()).unwrap();
        let big = crate::media::RgbImage::from_fn(4001, 2999, |x, y| {
            let p = photo.get_pixel(x % photo.width(), y % photo.height()).0;
            let n = ((x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)) >> 7) % 7;
            ::image::Rgb(p.map(|v| v.saturating_add(n as u8)))
        });
        for subsamp in [
            turbojpeg::Subsamp::Sub2x2,
            turbojpeg::Subsamp::Sub2x1,
            turbojpeg::Subsamp::None,
            turbojpeg::Subsamp::Gray,
        ] {
            let image = turbojpeg::Image {
                pixels: big.as_raw().as_slice(),
                width: 4001,
                pitch: 4001 * 3,
                height: 2999,
                format: turbojpeg::PixelFormat::RGB,
            };
            let jpeg = turbojpeg::compress(image, 90, subsamp).unwrap();
            files.push((format!("12 MP {subsamp:?}"), jpeg.to_vec()));
        }
        let mut split = 0;
        for (name, bytes) in &files {
            let whole = decode_jpeg_whole(bytes, name);
            match pool.install(|| decode_jpeg_split(bytes, name, 0)) {
                Ok(Some(img)) => {
                    split += 1;
                    assert!(img == whole.unwrap(), "{name}");
                }
                Ok(None) => {}
                Err(e) => assert!(whole.is_err(), "{name}: {e}"),
            }
        }
        assert!(split >= 10, "{split}");
    }

    #[test]
    fn cmyk_extremes() {
        assert_eq!(cmyk_to_rgb([0, 0, 0, 0]), [255, 255, 255]);
        assert_eq!(cmyk_to_rgb([0, 0, 0, 255]), [0, 0, 0]);
        assert_eq!(cmyk_to_rgb([255, 0, 0, 0]), [0, 255, 255]);
    }

    #[test]
    fn xmp_orientation_forms() {
        assert_eq!(xmp_orientation(b"<a tiff:Orientation=\"6\"/>"), Some(6));
        assert_eq!(
            xmp_orientation(b"<tiff:Orientation>3</tiff:Orientation>"),
            Some(3)
        );
        assert_eq!(xmp_orientation(b"tiff:Orientation='6'"), None);
    }

    /// The tiled copy equals Pillow's per-pixel definitions on an image of several odd tiles.
    #[test]
    fn tiled_orientations_equal_the_per_pixel_maps() {
        let (w, h) = (150u32, 131u32);
        let img = RgbImage::from_fn(w, h, |x, y| ::image::Rgb([x as u8, y as u8, (x ^ y) as u8]));
        for o in 2..=8u32 {
            let got = apply_orientation(img.clone(), o);
            let (ow, oh) = if o >= 5 { (h, w) } else { (w, h) };
            let want = RgbImage::from_fn(ow, oh, |x, y| {
                let (sx, sy) = match o {
                    2 => (w - 1 - x, y),
                    3 => (w - 1 - x, h - 1 - y),
                    4 => (x, h - 1 - y),
                    5 => (y, x),
                    6 => (y, h - 1 - x),
                    7 => (w - 1 - y, h - 1 - x),
                    _ => (w - 1 - y, x),
                };
                *img.get_pixel(sx, sy)
            });
            assert!(got == want, "orientation {o}");
        }
    }

    #[test]
    fn orientation_maps_corners() {
        // 3x2 image whose pixel value encodes its position.
        let img = RgbImage::from_fn(3, 2, |x, y| ::image::Rgb([x as u8, y as u8, 0]));
        let r = apply_orientation(img.clone(), 6);
        assert_eq!(r.dimensions(), (2, 3));
        // Rotated 90 degrees clockwise: the top-left output is the bottom-left input.
        assert_eq!(r.get_pixel(0, 0).0[..2], [0, 1]);
        assert_eq!(r.get_pixel(1, 0).0[..2], [0, 0]);
        let r = apply_orientation(img, 3);
        assert_eq!(r.get_pixel(0, 0).0[..2], [2, 1]);
    }
}

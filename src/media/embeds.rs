//! Precomputed embeddings read from safetensors, NumPy `.npy` or PyTorch `.pt` files (no Python),
//! with the format sniffed from the first bytes. Only undecodable files are refused here; whether
//! shapes and dtypes fit a model is the model's business.
//!
//! Naming rule. The main tensor is stored as `<modality>_embeds` (`image_embeds`, `video_embeds`,
//! `audio_embeds`). In a file holding several named tensors (safetensors, or a `.pt` dict) it is
//! the tensor of that name, or else the file's only tensor; every other tensor is kept under its
//! own name (e.g. `image_grid_thw`, `image_sizes`). A `.npy` file or a `.pt` holding a bare tensor
//! is the main tensor. Side tensors in separate files are added with [`merge_embeds`].

use std::collections::BTreeMap;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use super::npy::{self, NpyDtype};
use super::{Embeds, Modality};
use crate::error::{Error, Result};

const EXPECTED: &str = "a safetensors, NumPy .npy or PyTorch .pt (torch.save) tensor file";

/// Serialized tensor container formats we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbedsFormat {
    Safetensors,
    Npy,
    Pt,
}

/// Recognizes the format from magic bytes: `\x93NUMPY` (npy), a zip `PK\x03\x04` (torch.save),
/// or an 8-byte little-endian header length followed by `{` (safetensors).
pub fn sniff_format(bytes: &[u8]) -> Option<EmbedsFormat> {
    if bytes.starts_with(npy::MAGIC) {
        return Some(EmbedsFormat::Npy);
    }
    if bytes.starts_with(b"PK\x03\x04") {
        return Some(EmbedsFormat::Pt);
    }
    if bytes.len() > 8 && bytes[8] == b'{' {
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[..8]);
        let header = u64::from_le_bytes(len);
        if header >= 2 && header <= bytes.len() as u64 - 8 {
            return Some(EmbedsFormat::Safetensors);
        }
    }
    None
}

/// Loads an embeddings file; see the module docs for which tensor becomes `<modality>_embeds`.
pub fn load_embeds(bytes: &[u8], input: &str, modality: Modality) -> Result<Embeds> {
    let main = format!("{}_embeds", modality.name());
    let tensors = match load_tensors(bytes, input)? {
        Loaded::Single(t) => BTreeMap::from([(main, t)]),
        Loaded::Named(mut named) => {
            if !named.contains_key(&main) {
                if named.len() != 1 {
                    let names: Vec<&str> = named.keys().map(String::as_str).collect();
                    return Err(Error::input(
                        input,
                        format!("no tensor named {main:?} among {names:?}"),
                        format!("a tensor named {main:?}, or a file holding a single tensor"),
                    ));
                }
                let only = named.pop_first().map(|(_, t)| t);
                if let Some(t) = only {
                    named.insert(main, t);
                }
            }
            named
        }
    };
    for (name, t) in &tensors {
        check_finite(t, name, input)?;
    }
    Ok(Embeds { modality, tensors })
}

/// Refuses NaN and infinite values: a model fed them produces garbage (token 0 with a null
/// logprob, every step) instead of an error.
fn check_finite(t: &Tensor, name: &str, input: &str) -> Result<()> {
    if !t.dtype().is_float() {
        return Ok(());
    }
    let bad = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map(|v| v.iter().filter(|x| !x.is_finite()).count())
        .map_err(|e| {
            Error::input(
                input,
                format!("cannot read {name:?}: {e}"),
                "a numeric tensor",
            )
        })?;
    if bad > 0 {
        return Err(Error::input(
            input,
            format!("{name:?} holds {bad} NaN or infinite value(s)"),
            "finite numbers only",
        ));
    }
    Ok(())
}

/// Adds the tensor `name` (e.g. `image_grid_thw`, `image_sizes`) from a separate file to
/// `embeds`. The file must hold a tensor of that name or a single tensor; a name `embeds` already
/// has is an error rather than a silent replacement.
pub fn merge_embeds(mut embeds: Embeds, name: &str, bytes: &[u8], input: &str) -> Result<Embeds> {
    if embeds.tensors.contains_key(name) {
        return Err(Error::input(
            input,
            format!("{name:?} is given twice (already in the embeddings file)"),
            format!("{name:?} in only one file"),
        ));
    }
    let tensor = match load_tensors(bytes, input)? {
        Loaded::Single(t) => t,
        Loaded::Named(mut named) => {
            let names: Vec<String> = named.keys().cloned().collect();
            let picked = match named.remove(name) {
                Some(t) => Some(t),
                None if named.len() == 1 => named.pop_first().map(|(_, t)| t),
                None => None,
            };
            picked.ok_or_else(|| {
                Error::input(
                    input,
                    format!("no tensor named {name:?} among {names:?}"),
                    format!("a tensor named {name:?}, or a file holding a single tensor"),
                )
            })?
        }
    };
    check_finite(&tensor, name, input)?;
    embeds.tensors.insert(name.to_string(), tensor);
    Ok(embeds)
}

/// A file's tensors: one anonymous tensor, or named ones.
enum Loaded {
    Single(Tensor),
    Named(BTreeMap<String, Tensor>),
}

fn load_tensors(bytes: &[u8], input: &str) -> Result<Loaded> {
    let loaded = match sniff_format(bytes) {
        Some(EmbedsFormat::Npy) => Loaded::Single(npy_tensor(bytes, input)?),
        Some(EmbedsFormat::Safetensors) => {
            let map = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| {
                Error::input(input, format!("unreadable safetensors file: {e}"), EXPECTED)
            })?;
            Loaded::Named(map.into_iter().collect())
        }
        Some(EmbedsFormat::Pt) => pt_tensors(bytes, input)?,
        None => {
            return Err(Error::input(
                input,
                "not a recognized tensor file",
                EXPECTED,
            ))
        }
    };
    if let Loaded::Named(m) = &loaded {
        if m.is_empty() {
            return Err(Error::input(input, "the file holds no tensors", EXPECTED));
        }
    }
    Ok(loaded)
}

fn npy_tensor(bytes: &[u8], input: &str) -> Result<Tensor> {
    let arr = npy::parse(bytes, input)?;
    let dtype = match arr.dtype {
        NpyDtype::F16 => DType::F16,
        NpyDtype::F32 => DType::F32,
        NpyDtype::F64 => DType::F64,
        NpyDtype::U8 | NpyDtype::Bool => DType::U8,
        NpyDtype::I16 => DType::I16,
        NpyDtype::I32 => DType::I32,
        NpyDtype::I64 => DType::I64,
        NpyDtype::U32 => DType::U32,
    };
    Tensor::from_raw_buffer(&arr.data, dtype, &arr.shape, &Device::Cpu)
        .map_err(|e| Error::input(input, format!("unreadable .npy data: {e}"), EXPECTED))
}

// ---- PyTorch zip archives -------------------------------------------------------------------

fn pt_error(input: &str, problem: impl Into<String>) -> Error {
    Error::input(
        input,
        problem,
        "a PyTorch .pt file written by torch.save (zip format)",
    )
}

/// One stored (uncompressed) member of a zip archive.
struct ZipEntry {
    name: String,
    data_start: usize,
    size: usize,
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Lists the members of a zip held in memory (torch.save writes them uncompressed).
fn zip_entries(b: &[u8], input: &str) -> Result<Vec<ZipEntry>> {
    let broken = || pt_error(input, "corrupt zip archive");
    // End of central directory: 22 bytes plus a comment of at most 64 KiB, at the very end.
    let lowest = b.len().saturating_sub(22 + 65535);
    let eocd = (lowest..=b.len().saturating_sub(22))
        .rev()
        .find(|&i| le_u32(b, i) == Some(0x0605_4b50))
        .ok_or_else(broken)?;
    let mut count = le_u16(b, eocd + 10).ok_or_else(broken)? as u64;
    let mut cd_offset = le_u32(b, eocd + 16).ok_or_else(broken)? as u64;
    if cd_offset == 0xFFFF_FFFF || count == 0xFFFF {
        // Zip64: the locator sits just before the classic record.
        let loc = eocd.checked_sub(20).ok_or_else(broken)?;
        if le_u32(b, loc) != Some(0x0706_4b50) {
            return Err(broken());
        }
        let rec = le_u64(b, loc + 8).ok_or_else(broken)? as usize;
        if le_u32(b, rec) != Some(0x0606_4b50) {
            return Err(broken());
        }
        count = le_u64(b, rec + 32).ok_or_else(broken)?;
        cd_offset = le_u64(b, rec + 48).ok_or_else(broken)?;
    }
    let mut entries = Vec::new();
    let mut p = usize::try_from(cd_offset).map_err(|_| broken())?;
    for _ in 0..count {
        if le_u32(b, p) != Some(0x0201_4b50) {
            return Err(broken());
        }
        let method = le_u16(b, p + 10).ok_or_else(broken)?;
        let mut size = le_u32(b, p + 24).ok_or_else(broken)? as u64;
        let name_len = le_u16(b, p + 28).ok_or_else(broken)? as usize;
        let extra_len = le_u16(b, p + 30).ok_or_else(broken)? as usize;
        let comment_len = le_u16(b, p + 32).ok_or_else(broken)? as usize;
        let mut local = le_u32(b, p + 42).ok_or_else(broken)? as u64;
        let name_bytes = b.get(p + 46..p + 46 + name_len).ok_or_else(broken)?;
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        let extra = b
            .get(p + 46 + name_len..p + 46 + name_len + extra_len)
            .ok_or_else(broken)?;
        let compressed32 = le_u32(b, p + 20).ok_or_else(broken)?;
        // Zip64 extended information (id 1) holds the fields whose classic value is all ones,
        // in the order: uncompressed size, compressed size, local header offset.
        let mut q = 0;
        while q + 4 <= extra.len() {
            let id = le_u16(extra, q).ok_or_else(broken)?;
            let len = le_u16(extra, q + 2).ok_or_else(broken)? as usize;
            if id == 1 {
                let mut r = q + 4;
                if size == 0xFFFF_FFFF {
                    size = le_u64(extra, r).ok_or_else(broken)?;
                    r += 8;
                }
                if compressed32 == 0xFFFF_FFFF {
                    r += 8;
                }
                if local == 0xFFFF_FFFF {
                    local = le_u64(extra, r).ok_or_else(broken)?;
                }
            }
            q += 4 + len;
        }
        if method != 0 {
            return Err(pt_error(
                input,
                format!("zip member {name:?} is compressed (method {method})"),
            ));
        }
        let local = usize::try_from(local).map_err(|_| broken())?;
        if le_u32(b, local) != Some(0x0403_4b50) {
            return Err(broken());
        }
        let lname = le_u16(b, local + 26).ok_or_else(broken)? as usize;
        let lextra = le_u16(b, local + 28).ok_or_else(broken)? as usize;
        let data_start = local + 30 + lname + lextra;
        let size = usize::try_from(size).map_err(|_| broken())?;
        if data_start.checked_add(size).is_none_or(|end| end > b.len()) {
            return Err(broken());
        }
        entries.push(ZipEntry {
            name,
            data_start,
            size,
        });
        p += 46 + name_len + extra_len + comment_len;
    }
    Ok(entries)
}

/// Reads a torch.save archive: a bare tensor, or a dict of tensors (other values are skipped).
fn pt_tensors(bytes: &[u8], input: &str) -> Result<Loaded> {
    let entries = zip_entries(bytes, input)?;
    let pkl = entries
        .iter()
        .find(|e| e.name.ends_with("data.pkl"))
        .ok_or_else(|| pt_error(input, "no data.pkl in the archive"))?;
    let dir = pkl.name.trim_end_matches(".pkl").to_string();
    let mut reader = &bytes[pkl.data_start..pkl.data_start + pkl.size];
    let obj = candle_pickle(input, "unreadable pickle", || {
        let mut stack = Stack::empty();
        stack.read_loop(&mut reader)?;
        stack.finalize()
    })?;
    let load = |value: Object, name: Object| -> Result<Option<(String, Tensor)>> {
        let info = candle_pickle(input, "unreadable tensor record", || {
            value.into_tensor_info(name, std::path::Path::new(&dir))
        })?;
        let Some(info) = info else { return Ok(None) };
        let entry = entries
            .iter()
            .find(|e| e.name == info.path)
            .ok_or_else(|| pt_error(input, format!("missing tensor storage {:?}", info.path)))?;
        let storage = &bytes[entry.data_start..entry.data_start + entry.size];
        Ok(Some((
            info.name.clone(),
            tensor_from_storage(&info, storage, input)?,
        )))
    };
    match obj {
        Object::Dict(items) => {
            let mut named = BTreeMap::new();
            for (k, v) in items {
                if let Some((name, t)) = load(v, k)? {
                    named.insert(name, t);
                }
            }
            Ok(Loaded::Named(named))
        }
        other => match load(other, Object::Unicode("embeds".into()))? {
            Some((_, t)) => Ok(Loaded::Single(t)),
            None => Err(pt_error(
                input,
                "the file holds neither a tensor nor a dict of tensors",
            )),
        },
    }
}

/// Runs candle's pickle reader, which indexes records without checks and panics on some
/// malformed files (found by fuzzing): a panic becomes an input error, its message kept off
/// stderr. `what` starts the error's problem.
fn candle_pickle<T>(
    input: &str,
    what: &str,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    match result {
        Ok(r) => r.map_err(|e| pt_error(input, format!("{what}: {e}"))),
        Err(_) => Err(pt_error(input, format!("{what}: malformed records"))),
    }
}

/// Builds a tensor from its storage bytes and recorded layout (C- or Fortran-contiguous).
fn tensor_from_storage(
    info: &candle_core::pickle::TensorInfo,
    storage: &[u8],
    input: &str,
) -> Result<Tensor> {
    let layout = &info.layout;
    let elem = info.dtype.size_in_bytes();
    let numel = layout.shape().elem_count();
    // candle's pickle reader records torch's storage offset already in bytes.
    let start = layout.start_offset();
    let data = numel
        .checked_mul(elem)
        .and_then(|n| start.checked_add(n))
        .and_then(|end| storage.get(start..end))
        .ok_or_else(|| {
            pt_error(
                input,
                format!("tensor {:?} is larger than its storage", info.name),
            )
        })?;
    let dims = layout.dims();
    let bad = |e: candle_core::Error| pt_error(input, format!("tensor {:?}: {e}", info.name));
    if layout.is_contiguous() {
        Tensor::from_raw_buffer(data, info.dtype, dims, &Device::Cpu).map_err(bad)
    } else if layout.is_fortran_contiguous() {
        let reversed: Vec<usize> = dims.iter().rev().copied().collect();
        let perm: Vec<usize> = (0..dims.len()).rev().collect();
        Tensor::from_raw_buffer(data, info.dtype, reversed.as_slice(), &Device::Cpu)
            .and_then(|t| t.permute(perm))
            .and_then(|t| t.contiguous())
            .map_err(bad)
    } else {
        Err(pt_error(
            input,
            format!(
                "tensor {:?} is a non-contiguous view (save a .contiguous() copy)",
                info.name
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `torch.save(torch.arange(24.).reshape(6, 4)[2:], …)`: a view 8 elements into its storage.
    #[test]
    fn torch_views_with_a_storage_offset_load() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/embeds/view_offset.pt"
        );
        let bytes = std::fs::read(path).unwrap();
        let e = load_embeds(&bytes, "view_offset.pt", Modality::Image).unwrap();
        let t = &e.tensors["image_embeds"];
        assert_eq!(t.dims(), &[4, 4]);
        let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(values, (8..24).map(|x| x as f32).collect::<Vec<_>>());
    }

    #[test]
    fn sniffs_magic_bytes() {
        assert_eq!(sniff_format(b"\x93NUMPY\x01\x00"), Some(EmbedsFormat::Npy));
        assert_eq!(sniff_format(b"PK\x03\x04rest"), Some(EmbedsFormat::Pt));
        let mut st = 2u64.to_le_bytes().to_vec();
        st.extend_from_slice(b"{}");
        assert_eq!(sniff_format(&st), Some(EmbedsFormat::Safetensors));
        assert_eq!(sniff_format(b"hello world"), None);
        assert!(matches!(
            load_embeds(b"hello world", "x.bin", Modality::Image),
            Err(Error::Input { .. })
        ));
    }
}

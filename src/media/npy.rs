//! Minimal reader for NumPy `.npy` files held in memory (format versions 1–3): the header's
//! dtype, shape and order, and the raw data bytes. Used for audio arrays and embeddings.

use crate::error::{Error, Result};

pub(crate) const MAGIC: &[u8] = b"\x93NUMPY";

/// Element types we accept from `.npy` files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NpyDtype {
    F16,
    F32,
    F64,
    U8,
    I16,
    I32,
    I64,
    U32,
    Bool,
}

impl NpyDtype {
    pub(crate) fn size(self) -> usize {
        match self {
            NpyDtype::U8 | NpyDtype::Bool => 1,
            NpyDtype::F16 | NpyDtype::I16 => 2,
            NpyDtype::F32 | NpyDtype::I32 | NpyDtype::U32 => 4,
            NpyDtype::F64 | NpyDtype::I64 => 8,
        }
    }
}

/// A parsed `.npy` array. `data` is little-endian, in C order.
#[derive(Debug)]
pub(crate) struct Npy {
    pub dtype: NpyDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

fn bad(input: &str, problem: impl Into<String>) -> Error {
    Error::input(
        input,
        problem,
        "a NumPy .npy file (np.save) of a numeric array",
    )
}

/// Parses `.npy` bytes. Big-endian data is swapped and Fortran order is converted to C order.
pub(crate) fn parse(bytes: &[u8], input: &str) -> Result<Npy> {
    if !bytes.starts_with(MAGIC) || bytes.len() < 10 {
        return Err(bad(input, "not a .npy file (missing the \\x93NUMPY magic)"));
    }
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad(input, "truncated .npy header"));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => {
            return Err(bad(
                input,
                format!(".npy format version {v} is not supported"),
            ))
        }
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad(input, "truncated .npy header"))?;
    let header = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| bad(input, "the .npy header is not text"))?;

    let descr = dict_value(header, "descr")
        .and_then(|v| v.strip_prefix('\''))
        .and_then(|v| v.split('\'').next())
        .ok_or_else(|| bad(input, "the .npy header has no 'descr'"))?;
    let fortran = match dict_value(header, "fortran_order") {
        Some(v) if v.starts_with("True") => true,
        Some(v) if v.starts_with("False") => false,
        _ => return Err(bad(input, "the .npy header has no 'fortran_order'")),
    };
    let shape_text = dict_value(header, "shape")
        .and_then(|v| v.strip_prefix('('))
        .and_then(|v| v.split(')').next())
        .ok_or_else(|| bad(input, "the .npy header has no 'shape'"))?;
    let mut shape = Vec::new();
    for part in shape_text
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        shape.push(
            part.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| bad(input, format!("bad dimension {part:?} in the .npy shape")))?,
        );
    }

    let (big_endian, code) = match descr.as_bytes().first() {
        Some(b'<') | Some(b'|') | Some(b'=') => (false, &descr[1..]),
        Some(b'>') => (true, &descr[1..]),
        _ => (false, descr),
    };
    let dtype = match code {
        "f2" => NpyDtype::F16,
        "f4" => NpyDtype::F32,
        "f8" => NpyDtype::F64,
        "u1" => NpyDtype::U8,
        "b1" => NpyDtype::Bool,
        "i2" => NpyDtype::I16,
        "i4" => NpyDtype::I32,
        "i8" => NpyDtype::I64,
        "u4" => NpyDtype::U32,
        other => {
            return Err(bad(
                input,
                format!("unsupported .npy dtype {other:?} (descr {descr:?})"),
            ))
        }
    };

    // The product of the non-zero dimensions must fit too: strides multiply them even when
    // another dimension is 0.
    let count = shape
        .iter()
        .filter(|&&d| d > 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.size()))
        .map(|_| shape.iter().product::<usize>())
        .ok_or_else(|| bad(input, "the .npy shape is too large"))?;
    let nbytes = count
        .checked_mul(dtype.size())
        .ok_or_else(|| bad(input, "the .npy shape is too large"))?;
    let payload = &bytes[end..];
    if payload.len() < nbytes {
        return Err(bad(
            input,
            format!(
                "the .npy data is truncated ({} bytes for shape {shape:?}, need {nbytes})",
                payload.len()
            ),
        ));
    }
    let mut data = payload[..nbytes].to_vec();
    if big_endian && dtype.size() > 1 {
        for elem in data.chunks_exact_mut(dtype.size()) {
            elem.reverse();
        }
    }
    if fortran && shape.len() > 1 {
        data = fortran_to_c(&data, &shape, dtype.size());
    }
    Ok(Npy { dtype, shape, data })
}

/// Text after `'key':` in the header dict.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("'{key}':");
    let at = header.find(&pat)?;
    Some(header[at + pat.len()..].trim_start())
}

/// Reorders column-major element bytes into row-major.
fn fortran_to_c(data: &[u8], shape: &[usize], size: usize) -> Vec<u8> {
    let count: usize = shape.iter().product();
    let mut out = vec![0u8; data.len()];
    let rank = shape.len();
    let mut idx = vec![0usize; rank];
    for c_pos in 0..count {
        // Column-major offset of the current (row-major ordered) multi-index.
        let mut f_pos = 0usize;
        let mut stride = 1usize;
        for d in 0..rank {
            f_pos += idx[d] * stride;
            stride *= shape[d];
        }
        out[c_pos * size..(c_pos + 1) * size]
            .copy_from_slice(&data[f_pos * size..(f_pos + 1) * size]);
        for d in (0..rank).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// The array's values as f32 (floats only; f64 is rounded to nearest as NumPy's `astype` does).
pub(crate) fn to_f32(npy: &Npy, input: &str) -> Result<Vec<f32>> {
    match npy.dtype {
        NpyDtype::F32 => Ok(npy
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        NpyDtype::F64 => Ok(npy
            .data
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f64::from_le_bytes(b) as f32
            })
            .collect()),
        NpyDtype::F16 => Ok(npy
            .data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        other => Err(Error::input(
            input,
            format!("a .npy array of {other:?} values"),
            "a float array (float16, float32 or float64)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn parses_c_fortran_and_big_endian() {
        let vals = [1f32, 2., 3., 4., 5., 6.];
        let le: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let a = parse(&npy("<f4", false, "(2, 3)", &le), "a.npy").expect("c order");
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(to_f32(&a, "a.npy").expect("f32"), vals.to_vec());

        // The same 2x3 matrix stored column-major: 1 4 2 5 3 6.
        let f: Vec<u8> = [1f32, 4., 2., 5., 3., 6.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let b = parse(&npy("<f4", true, "(2, 3)", &f), "b.npy").expect("fortran");
        assert_eq!(to_f32(&b, "b.npy").expect("f32"), vals.to_vec());

        let be: Vec<u8> = vals
            .iter()
            .flat_map(|v| (*v as f64).to_be_bytes())
            .collect();
        let c = parse(&npy(">f8", false, "(6,)", &be), "c.npy").expect("big endian");
        assert_eq!(c.shape, vec![6]);
        assert_eq!(to_f32(&c, "c.npy").expect("f32"), vals.to_vec());
    }

    #[test]
    fn rejects_truncated_and_foreign_data() {
        let le: Vec<u8> = [1f32, 2.].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(matches!(
            parse(&npy("<f4", false, "(3,)", &le), "t.npy"),
            Err(Error::Input { .. })
        ));
        assert!(matches!(
            parse(b"RIFF....", "x.npy"),
            Err(Error::Input { .. })
        ));
        assert!(matches!(
            parse(&npy("<c8", false, "(1,)", &le), "c.npy"),
            Err(Error::Input { .. })
        ));
        let ints = parse(&npy("<i4", false, "(2,)", &le), "i.npy").expect("ints parse");
        assert!(matches!(to_f32(&ints, "i.npy"), Err(Error::Input { .. })));
    }
}

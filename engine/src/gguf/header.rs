//! A checking pass over a GGUF header, run before candle's reader sees the file.
//!
//! candle's `gguf_file::Content::read` trusts more of the header than a file from someone else
//! deserves: it divides by `general.alignment` (0 panics), it turns every element of a metadata
//! array into a 32-byte `Value` (a 64 MB byte array costs 2 GB), and it multiplies tensor
//! dimensions without checking for overflow. This pass walks the same bytes without keeping
//! them, with checked arithmetic throughout, and refuses a file unless:
//!
//! - every declared length fits in what remains of the file;
//! - metadata holds at most [`MAX_METADATA_VALUES`] values in all (array elements included),
//!   with no nested arrays and no duplicate keys;
//! - `general.alignment`, when present, is a non-zero power of two stored as an integer;
//! - every tensor has a known ggml type, at most four dimensions, an element count that is a
//!   whole number of blocks and fits in memory arithmetic, an aligned offset, and a byte range
//!   inside the file; tensor names are unique.
//!
//! Once it passes, what candle allocates is bounded by the file's size (times a small factor).

use std::collections::HashSet;
use std::io::{self, Read, Seek};

use candle_core::quantized::GgmlDType;

/// Most metadata values in one file, counting each array element. The largest vocabularies
/// (256k tokens, with a score, a type and up to as many merges each) need about a million; 4M
/// bounds what candle's reader allocates (32 bytes a value) to about 128 MiB.
pub const MAX_METADATA_VALUES: u64 = 1 << 22;

/// Longest metadata key or tensor name accepted: llama.cpp allows 64-byte tensor names and keys
/// are short dotted paths, so 64 KiB is generous and keeps names printable in errors.
const MAX_NAME: u64 = 1 << 16;

/// The alignment of the tensor data when `general.alignment` is absent (GGUF spec).
const DEFAULT_ALIGNMENT: u64 = 32;

/// Value type ids of the GGUF spec.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// The ggml types candle reads (its `GgmlDType::from_u32`, which is private to candle).
pub fn ggml_type(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// The user-facing message for a tensor type the importer cannot read.
pub fn unsupported_type_message(id: &str) -> String {
    format!(
        "unsupported quantization type: a tensor has ggml type id {id} (an i-quant or a newer ggml type); \
         supported types are F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K \
         — requantize the model to one of them (e.g. llama-quantize ... Q4_1)"
    )
}

/// What the check learned: enough for the importer to bound its work before reading tensors.
#[derive(Debug, Clone)]
pub struct Checked {
    /// Number of tensors.
    pub tensors: u64,
    /// Elements over all tensors (what dequantizing to f32 costs, in 4-byte units).
    pub elements: u64,
}

struct Cursor<R> {
    reader: R,
    pos: u64,
    size: u64,
    /// Whether lengths and counts are 32-bit (GGUF v1) rather than 64-bit.
    v1: bool,
}

fn short() -> String {
    "not a readable GGUF file: it ends inside its header (truncated?)".into()
}

impl<R: Read + Seek> Cursor<R> {
    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.reader.read_exact(&mut b).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => short(),
            _ => format!("cannot read the header: {e}"),
        })?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.bytes::<8>().map(u64::from_le_bytes)
    }

    /// A length or count: u32 in GGUF v1, u64 after.
    fn len(&mut self) -> Result<u64, String> {
        if self.v1 {
            self.u32().map(u64::from)
        } else {
            self.u64()
        }
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), String> {
        if n > self.remaining() {
            return Err(format!(
                "{what} declares {n} bytes but only {} remain in the file",
                self.remaining()
            ));
        }
        // `seek_relative` keeps a `BufReader`'s buffer when the skip lands inside it (a vocabulary
        // is tens of thousands of short strings).
        self.reader
            .seek_relative(n as i64)
            .map_err(|e| format!("cannot read the header: {e}"))?;
        self.pos += n;
        Ok(())
    }

    /// Skips a string, returning its length.
    fn skip_string(&mut self, what: &str) -> Result<u64, String> {
        let n = self.len()?;
        self.skip(n, what)?;
        Ok(n)
    }

    /// Reads a short string (a key or tensor name).
    fn name(&mut self, what: &str) -> Result<String, String> {
        let n = self.len()?;
        if n > MAX_NAME {
            return Err(format!(
                "{what} is {n} bytes long, more than the {MAX_NAME} allowed"
            ));
        }
        if n > self.remaining() {
            return Err(format!(
                "{what} declares {n} bytes but only {} remain in the file",
                self.remaining()
            ));
        }
        let mut b = vec![0u8; n as usize];
        self.reader.read_exact(&mut b).map_err(|_| short())?;
        self.pos += n;
        // Same reading as candle: trailing NULs dropped, invalid UTF-8 replaced.
        while b.last() == Some(&0) {
            b.pop();
        }
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
}

/// On-disk size of a fixed-size value type, `None` for strings and arrays.
fn fixed_size(t: u32) -> Option<u64> {
    match t {
        T_U8 | T_I8 | T_BOOL => Some(1),
        T_U16 | T_I16 => Some(2),
        T_U32 | T_I32 | T_F32 => Some(4),
        T_U64 | T_I64 | T_F64 => Some(8),
        _ => None,
    }
}

/// Checks the header of a GGUF file of `size` bytes read from the start of `reader`.
///
/// Errors are messages without the path (the caller names the file).
pub fn check<R: Read + Seek>(reader: R, size: u64) -> Result<Checked, String> {
    let mut c = Cursor {
        reader,
        pos: 0,
        size,
        v1: false,
    };
    let magic = c.u32()?;
    // candle accepts the magic in either byte order.
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return Err(format!(
            "not a readable GGUF file (its magic number is 0x{magic:08x})"
        ));
    }
    let version = c.u32()?;
    if !(1..=3).contains(&version) {
        return Err(format!(
            "unsupported GGUF version {version} (versions 1 to 3 are read)"
        ));
    }
    c.v1 = version == 1;
    let tensor_count = c.len()?;
    let kv_count = c.len()?;
    let prefix = if c.v1 { 4 } else { 8 };
    // Smallest possible entries: a key, a type and a one-byte value; a name, a dimension count,
    // a type and an offset.
    let needed = kv_count.checked_mul(prefix + 4 + 1).and_then(|a| {
        tensor_count
            .checked_mul(prefix + 16)
            .and_then(|b| a.checked_add(b))
    });
    if needed.is_none_or(|n| n > c.remaining()) {
        return Err(format!(
            "the header declares {tensor_count} tensors and {kv_count} metadata entries, \
             more than a file of {size} bytes can hold"
        ));
    }

    let mut values: u64 = 0;
    let mut keys = HashSet::new();
    let mut alignment = DEFAULT_ALIGNMENT;
    for _ in 0..kv_count {
        let key = c.name("a metadata key")?;
        let t = c.u32()?;
        values += 1;
        if key == "general.alignment" {
            let a = match t {
                T_U8 => u64::from(c.bytes::<1>()?[0]),
                T_U16 => u64::from(u16::from_le_bytes(c.bytes::<2>()?)),
                T_U32 => u64::from(c.u32()?),
                // candle reads these too when non-negative.
                T_I8 => i8::from_le_bytes(c.bytes::<1>()?).max(-1) as u64,
                T_I16 => i16::from_le_bytes(c.bytes::<2>()?).max(-1) as u64,
                T_I32 => i32::from_le_bytes(c.bytes::<4>()?).max(-1) as u64,
                _ => return Err("metadata `general.alignment` must be a u32".into()),
            };
            if a == 0 || !a.is_power_of_two() {
                return Err(format!(
                    "metadata `general.alignment` is {}; it must be a power of two",
                    a as i64
                ));
            }
            alignment = a;
        } else {
            let what = format!("metadata `{key}`");
            match t {
                T_STRING => {
                    c.skip_string(&what)?;
                }
                T_ARRAY => {
                    let et = c.u32()?;
                    let n = c.len()?;
                    values = values.saturating_add(n);
                    if values > MAX_METADATA_VALUES {
                        return Err(format!(
                            "{what} brings the metadata to more than {MAX_METADATA_VALUES} values \
                             (its array has {n} elements)"
                        ));
                    }
                    match (et, fixed_size(et)) {
                        (_, Some(each)) => {
                            let bytes = n.saturating_mul(each);
                            c.skip(bytes, &what)?;
                        }
                        (T_STRING, None) => {
                            if n.saturating_mul(prefix) > c.remaining() {
                                return Err(format!(
                                    "{what} declares {n} strings, more than the file can hold"
                                ));
                            }
                            for _ in 0..n {
                                c.skip_string(&what)?;
                            }
                        }
                        (T_ARRAY, None) => {
                            return Err(format!(
                                "{what} is an array of arrays, which GGUF readers do not support"
                            ));
                        }
                        _ => return Err(format!("{what} has unknown element type {et}")),
                    }
                }
                _ => match fixed_size(t) {
                    Some(n) => c.skip(n, &what)?,
                    None => return Err(format!("{what} has unknown value type {t}")),
                },
            }
        }
        if !keys.insert(key.clone()) {
            return Err(format!("metadata key `{key}` appears twice"));
        }
    }

    struct Info {
        name: String,
        bytes: u64,
        offset: u64,
    }
    let mut infos: Vec<Info> = Vec::new();
    let mut names = HashSet::new();
    let mut elements: u64 = 0;
    for _ in 0..tensor_count {
        let name = c.name("a tensor name")?;
        let n_dims = c.u32()?;
        if n_dims > 4 {
            return Err(format!(
                "tensor `{name}` has {n_dims} dimensions; GGUF tensors have at most 4"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(if c.v1 { u64::from(c.u32()?) } else { c.u64()? });
        }
        let type_id = c.u32()?;
        let dtype =
            ggml_type(type_id).ok_or_else(|| unsupported_type_message(&type_id.to_string()))?;
        let offset = c.u64()?;
        let count = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            // Element counts become `usize` products inside candle; keep them far from overflow.
            .filter(|&n| n <= (1 << 48))
            .ok_or_else(|| format!("tensor `{name}` has dimensions {dims:?} too large to hold"))?;
        let block = dtype.block_size() as u64;
        // ggml stores rows of the first (innermost) dimension in whole blocks.
        if dims.first().is_some_and(|d| d % block != 0) || count % block != 0 {
            return Err(format!(
                "tensor `{name}` has dimensions {dims:?}, not whole blocks of {block} elements \
                 as its type {dtype:?} requires"
            ));
        }
        let bytes = count / block * dtype.type_size() as u64;
        if offset % alignment != 0 {
            return Err(format!(
                "tensor `{name}` has offset {offset}, not a multiple of the alignment {alignment}"
            ));
        }
        if !names.insert(name.clone()) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        elements = elements.saturating_add(count);
        infos.push(Info {
            name,
            bytes,
            offset,
        });
    }
    // The data section starts at the next multiple of the alignment.
    let data_start = c
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| "the tensor data offset overflows".to_string())?;
    for info in &infos {
        let end = data_start
            .checked_add(info.offset)
            .and_then(|s| s.checked_add(info.bytes));
        if end.is_none_or(|e| e > size) {
            return Err(format!(
                "tensor `{}` ({} bytes at offset {}) extends past the end of the file ({size} bytes)",
                info.name, info.bytes, info.offset
            ));
        }
    }
    Ok(Checked {
        tensors: tensor_count,
        elements,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file assembled by hand, so that every field can be forged.
    #[derive(Default)]
    struct Raw {
        kvs: Vec<u8>,
        n_kv: u64,
        infos: Vec<u8>,
        n_tensors: u64,
        data: Vec<u8>,
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    impl Raw {
        fn kv(mut self, key: &str, t: u32, value: &[u8]) -> Self {
            string(&mut self.kvs, key);
            self.kvs.extend(t.to_le_bytes());
            self.kvs.extend(value);
            self.n_kv += 1;
            self
        }

        fn tensor(mut self, name: &str, dims: &[u64], t: u32, offset: u64) -> Self {
            string(&mut self.infos, name);
            self.infos.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                self.infos.extend(d.to_le_bytes());
            }
            self.infos.extend(t.to_le_bytes());
            self.infos.extend(offset.to_le_bytes());
            self.n_tensors += 1;
            self
        }

        fn bytes(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(3u32.to_le_bytes());
            out.extend(self.n_tensors.to_le_bytes());
            out.extend(self.n_kv.to_le_bytes());
            out.extend(&self.kvs);
            out.extend(&self.infos);
            while !out.len().is_multiple_of(32) {
                out.push(0);
            }
            out.extend(&self.data);
            out
        }
    }

    fn run(raw: &Raw) -> Result<Checked, String> {
        let bytes = raw.bytes();
        check(std::io::Cursor::new(&bytes), bytes.len() as u64)
    }

    fn array(t: u32, n: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = t.to_le_bytes().to_vec();
        v.extend(n.to_le_bytes());
        v.extend(payload);
        v
    }

    #[test]
    fn a_well_formed_header_passes_and_is_measured() {
        let mut raw = Raw::default()
            .kv("general.architecture", T_STRING, &{
                let mut v = Vec::new();
                string(&mut v, "llama");
                v
            })
            .kv("a.list", T_ARRAY, &array(T_U32, 2, &[0; 8]))
            .tensor("w", &[32, 2], 0, 0)
            .tensor("q", &[32], 8, 256);
        raw.data = vec![0; 256 + 34];
        let checked = run(&raw).unwrap();
        assert_eq!(checked.tensors, 2);
        assert_eq!(checked.elements, 96);
    }

    #[test]
    fn alignment_zero_or_not_a_power_of_two_is_refused() {
        for a in [0u32, 3, 48] {
            let raw = Raw::default().kv("general.alignment", T_U32, &a.to_le_bytes());
            let err = run(&raw).unwrap_err();
            assert!(
                err.contains("general.alignment") && err.contains("power of two"),
                "{err}"
            );
        }
        let raw = Raw::default().kv("general.alignment", T_STRING, &[0; 8]);
        assert!(run(&raw).unwrap_err().contains("must be a u32"));
    }

    #[test]
    fn metadata_lengths_beyond_the_file_are_refused_before_allocating() {
        // A 64M-element array declared in a file of a few bytes.
        let raw = Raw::default().kv("big", T_ARRAY, &array(T_U8, 64 << 20, &[]));
        let err = run(&raw).unwrap_err();
        assert!(err.contains("`big`"), "{err}");
        // A string longer than the file.
        let raw = Raw::default().kv("s", T_STRING, &u64::MAX.to_le_bytes());
        assert!(run(&raw).unwrap_err().contains("`s`"));
        // An array whose byte size overflows u64.
        let raw = Raw::default().kv("o", T_ARRAY, &array(T_U64, u64::MAX / 4, &[]));
        assert!(run(&raw).unwrap_err().contains("`o`"));
        // Counts that cannot fit in the file.
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(u64::MAX.to_le_bytes());
        bytes.extend(u64::MAX.to_le_bytes());
        let err = check(std::io::Cursor::new(&bytes), bytes.len() as u64).unwrap_err();
        assert!(err.contains("more than a file"), "{err}");
    }

    #[test]
    fn metadata_arrays_that_really_are_huge_are_refused() {
        // Present in full in the file (4 MiB + 1 byte elements), yet more values than allowed:
        // candle's reader would spend 32 bytes on each.
        let n = MAX_METADATA_VALUES;
        let raw = Raw::default().kv("huge", T_ARRAY, &array(T_U8, n, &vec![0; n as usize]));
        let err = run(&raw).unwrap_err();
        assert!(err.contains("`huge`") && err.contains("values"), "{err}");
    }

    #[test]
    fn nested_arrays_duplicate_keys_and_unknown_types_are_refused() {
        let raw = Raw::default().kv("n", T_ARRAY, &array(T_ARRAY, 1, &[0; 12]));
        assert!(run(&raw).unwrap_err().contains("array of arrays"));
        let raw = Raw::default().kv("k", T_U8, &[1]).kv("k", T_U8, &[2]);
        assert!(run(&raw).unwrap_err().contains("appears twice"));
        let raw = Raw::default().kv("k", 99, &[0; 8]);
        assert!(run(&raw).unwrap_err().contains("unknown value type"));
    }

    #[test]
    fn tensor_infos_are_checked_against_the_file() {
        // Past the end of the data.
        let mut raw = Raw::default().tensor("w", &[32, 4], 0, 0);
        raw.data = vec![0; 100];
        let err = run(&raw).unwrap_err();
        assert!(err.contains("`w`") && err.contains("past the end"), "{err}");
        // An offset that overflows when added to the data start.
        let raw = Raw::default().tensor("w", &[32], 0, u64::MAX - 31);
        assert!(run(&raw).unwrap_err().contains("past the end"));
        // Dimensions whose product overflows.
        let raw = Raw::default().tensor("w", &[1 << 32, 1 << 32, 1 << 32], 0, 0);
        assert!(run(&raw).unwrap_err().contains("too large"));
        // Not whole blocks of a quantized type (Q4_0 has 32-element blocks).
        let raw = Raw::default().tensor("w", &[30, 32], 2, 0);
        assert!(run(&raw).unwrap_err().contains("whole blocks"));
        // Misaligned, duplicated, too many dimensions, unknown type.
        let raw = Raw::default().tensor("w", &[1], 0, 4);
        assert!(run(&raw).unwrap_err().contains("alignment"));
        let mut raw = Raw::default()
            .tensor("w", &[1], 0, 0)
            .tensor("w", &[1], 0, 0);
        raw.data = vec![0; 4];
        assert!(run(&raw).unwrap_err().contains("appears twice"));
        let raw = Raw::default().tensor("w", &[1, 1, 1, 1, 1], 0, 0);
        assert!(run(&raw).unwrap_err().contains("dimensions"));
        let raw = Raw::default().tensor("w", &[1], 20, 0);
        assert!(run(&raw).unwrap_err().contains("ggml type id 20"));
    }

    #[test]
    fn truncated_headers_are_refused() {
        let bytes = Raw::default().kv("k", T_U32, &[1, 2, 3, 4]).bytes();
        for len in [0, 3, 8, 20, 30] {
            let err = check(std::io::Cursor::new(&bytes[..len]), len as u64).unwrap_err();
            assert!(!err.is_empty());
        }
    }
}

//! Reads safetensors weight files into tensors, without memory-mapping them.
//!
//! Why no mmap: a mapped file's pages count in the process's resident set as they are
//! touched, and candle's mmap backend then copies every tensor out of the mapping, so
//! loading peaked at about twice the weights (6.7 GB for a 3.3 GB UNet). Here each
//! tensor's final buffer is allocated once and its bytes are read straight into it with a
//! positioned read: the weights exist once in the process (the page cache is the kernel's,
//! not ours), and a cold load costs about what reading the file costs.
//!
//! Each tensor is moved to the device as soon as it is read, so host memory never holds
//! more than one tensor beyond what stays there. One stored in another floating-point
//! dtype than the one asked for is then converted once (on the device), so only one
//! tensor-sized temporary exists at a time; integer tensors (such as CLIP's
//! `position_ids`) keep their own dtype.

#[cfg(target_endian = "big")]
compile_error!(
    "safetensors data is little-endian and is read in place: big-endian hosts are not supported"
);

use std::alloc::Layout;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, WithDType};
use half::{bf16, f16};
use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
use safetensors::tensor::{Metadata, TensorInfo};

use super::{InComponent, PipelineError};

/// Largest safetensors header we accept (the format allows 100 MB).
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// How far beyond the tensor being read the kernel is asked to fetch the file.
const READ_AHEAD_BYTES: u64 = 64 * 1024 * 1024;

/// The element types a weight file may store.
const SUPPORTED: &str = "F32, F16, BF16, F64 (converted to the requested dtype), \
                         I64, I32, I16, U32, U8 (kept as they are)";

/// Reads every tensor of `files` (the shards of one component), converting floating-point
/// tensors to `dtype` and moving them to `device`. A tensor name found in two files is an
/// error.
pub(crate) fn load_tensors(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    component: &'static str,
) -> Result<HashMap<String, Tensor>, PipelineError> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut origin: HashMap<String, usize> = HashMap::new();
    for (index, path) in files.iter().enumerate() {
        let (file, entries) = read_header(path)?;
        for entry in &entries {
            if let Some(&first) = origin.get(&entry.name) {
                return Err(bad(
                    path,
                    format!(
                        "tensor `{}` is also in {}; a tensor must be in one shard only",
                        entry.name,
                        files[first].display()
                    ),
                ));
            }
        }
        let mut read_ahead = ReadAhead::default();
        for entry in entries {
            read_ahead.before(&file, &entry);
            let tensor = read_tensor(&file, path, &entry, component)?;
            let tensor = tensor.to_device(device).in_component(component)?;
            let tensor = if entry.dtype.is_float() && tensor.dtype() != dtype {
                tensor.to_dtype(dtype).in_component(component)?
            } else {
                tensor
            };
            origin.insert(entry.name.clone(), index);
            tensors.insert(entry.name, tensor);
        }
    }
    Ok(tensors)
}

/// An element type as safetensors names it, limited to those we load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    U32,
    U8,
}

impl FileDtype {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "F64" => Self::F64,
            "F32" => Self::F32,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            "I64" => Self::I64,
            "I32" => Self::I32,
            "I16" => Self::I16,
            "U32" => Self::U32,
            "U8" => Self::U8,
            _ => return None,
        })
    }

    fn is_float(self) -> bool {
        matches!(self, Self::F64 | Self::F32 | Self::F16 | Self::BF16)
    }
}

/// One tensor of a file, validated against the file's length.
#[derive(Debug)]
pub(crate) struct Entry {
    pub name: String,
    dtype: FileDtype,
    pub shape: Vec<usize>,
    /// How many elements it has.
    pub elements: usize,
    /// Absolute position of the first byte in the file.
    offset: u64,
    /// Length of the data in the file.
    bytes: u64,
}

/// Asks the kernel to start reading the next stretch of the file while the current
/// tensor is copied out of the page cache, so the disk and the copy overlap. A positioned
/// read of a large tensor otherwise waits for each readahead window in turn: on a cold
/// page cache this made a full-size SD 1.5 load take about 1.6 times as long.
#[derive(Default)]
struct ReadAhead {
    /// The end of what the kernel was already asked for.
    requested_to: u64,
}

impl ReadAhead {
    fn before(&mut self, file: &File, entry: &Entry) {
        let end = entry
            .offset
            .saturating_add(entry.bytes)
            .saturating_add(READ_AHEAD_BYTES);
        let start = self.requested_to.max(entry.offset);
        if let (Ok(offset), Ok(len)) = (i64::try_from(start), i64::try_from(end - start)) {
            if len > 0 {
                // Advice only: where the kernel does not take it, the reads are just slower.
                let _ = posix_fadvise(file, offset, len, PosixFadviseAdvice::POSIX_FADV_WILLNEED);
                self.requested_to = end;
            }
        }
    }
}

fn bad(path: &Path, problem: String) -> PipelineError {
    PipelineError::BadConfig {
        file: path.to_path_buf(),
        problem,
    }
}

fn io_error(path: &Path, what: &str, source: std::io::Error) -> PipelineError {
    PipelineError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(source.kind(), format!("{what}: {source}")),
    }
}

/// Opens a safetensors file and reads its header with the `safetensors` crate (which
/// checks that the offsets follow each other and match each tensor's shape and dtype),
/// then checks it against the file's length. The entries come in file order, so reading
/// them is sequential. This is the one reader of safetensors headers: the loader and the
/// memory estimate both use it.
pub(crate) fn read_header(path: &Path) -> Result<(File, Vec<Entry>), PipelineError> {
    let (file, metadata, file_len) = parse_header(path)?;
    let data_start = 8 + header_len(&file, path, file_len)?;
    let mut entries = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| entry(path, name, info, data_start))
        .collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|entry| entry.offset);
    if let Some(cut) = entries.iter().find(|e| e.offset + e.bytes > file_len) {
        return Err(bad(
            path,
            format!(
                "truncated: tensor `{}` ends at byte {} of the data, the file holds {} bytes of data",
                cut.name,
                cut.offset + cut.bytes - data_start,
                file_len - data_start
            ),
        ));
    }
    Ok((file, entries))
}

/// The `__metadata__` text entries of a safetensors header (a LoRA's
/// `lora_adapter_metadata`, `format`), empty when it has none.
pub(crate) fn read_text_metadata(path: &Path) -> Result<HashMap<String, String>, PipelineError> {
    let (_, metadata, _) = parse_header(path)?;
    Ok(metadata.metadata().clone().unwrap_or_default())
}

/// Opens a safetensors file (a regular file only) and parses its header.
fn parse_header(path: &Path) -> Result<(File, Metadata, u64), PipelineError> {
    let (file, _) = protocol::input::open_regular(path).map_err(|source| PipelineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file_len = file
        .metadata()
        .map_err(|source| PipelineError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let header_len = header_len(&file, path, file_len)?;
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8)
        .map_err(|e| io_error(path, "the header", e))?;
    let metadata: Metadata = serde_json::from_slice(&header)
        .map_err(|e| bad(path, format!("malformed safetensors header: {e}")))?;
    Ok((file, metadata, file_len))
}

/// The header's length, read from the file's first 8 bytes and checked against its size.
fn header_len(file: &File, path: &Path, file_len: u64) -> Result<u64, PipelineError> {
    if file_len < 8 {
        return Err(bad(
            path,
            format!("not a safetensors file: {file_len} bytes, shorter than a header"),
        ));
    }
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0)
        .map_err(|e| io_error(path, "the header length", e))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES || header_len > file_len - 8 {
        return Err(bad(
            path,
            format!(
                "not a safetensors file, or truncated: a header of {header_len} bytes in a file of {file_len}"
            ),
        ));
    }
    Ok(header_len)
}

/// One tensor's entry, in a dtype we load.
fn entry(
    path: &Path,
    name: String,
    info: &TensorInfo,
    data_start: u64,
) -> Result<Entry, PipelineError> {
    let stored = info.dtype.to_string();
    let dtype = FileDtype::parse(&stored).ok_or_else(|| {
        bad(
            path,
            format!("tensor `{name}` has dtype {stored}, which cannot be loaded; supported: {SUPPORTED}"),
        )
    })?;
    let (start, end) = info.data_offsets;
    Ok(Entry {
        name,
        dtype,
        shape: info.shape.clone(),
        // The crate checked that the shape's product fits and matches the data's length.
        elements: info.shape.iter().product(),
        offset: data_start + start as u64,
        bytes: (end - start) as u64,
    })
}

/// Reads one tensor into a buffer of its own element type, allocated once.
fn read_tensor(
    file: &File,
    path: &Path,
    entry: &Entry,
    component: &'static str,
) -> Result<Tensor, PipelineError> {
    match entry.dtype {
        FileDtype::F64 => read_as::<f64>(file, path, entry, component),
        FileDtype::F32 => read_as::<f32>(file, path, entry, component),
        FileDtype::F16 => read_as::<f16>(file, path, entry, component),
        FileDtype::BF16 => read_as::<bf16>(file, path, entry, component),
        FileDtype::I64 => read_as::<i64>(file, path, entry, component),
        FileDtype::I32 => read_as::<i32>(file, path, entry, component),
        FileDtype::I16 => read_as::<i16>(file, path, entry, component),
        FileDtype::U32 => read_as::<u32>(file, path, entry, component),
        FileDtype::U8 => read_as::<u8>(file, path, entry, component),
    }
}

fn read_as<T: Pod>(
    file: &File,
    path: &Path,
    entry: &Entry,
    component: &'static str,
) -> Result<Tensor, PipelineError> {
    let what = || format!("tensor `{}`", entry.name);
    let mut values: Vec<T> = zeroed_vec(entry.elements).ok_or_else(|| {
        io_error(
            path,
            &what(),
            std::io::Error::new(std::io::ErrorKind::OutOfMemory, "too large to allocate"),
        )
    })?;
    file.read_exact_at(as_bytes_mut(&mut values), entry.offset)
        .map_err(|e| io_error(path, &what(), e))?;
    Tensor::from_vec(values, entry.shape.clone(), &Device::Cpu).in_component(component)
}

/// Plain numbers: no padding, and every bit pattern is a valid value, so a buffer of them
/// may be filled byte by byte (with little-endian data on a little-endian host).
///
/// # Safety
///
/// Only for types with those two properties.
unsafe trait Pod: WithDType + Copy {}
// SAFETY: primitive numbers, no padding, every bit pattern valid.
unsafe impl Pod for f64 {}
// SAFETY: as above.
unsafe impl Pod for f32 {}
// SAFETY: `half::f16` is a `repr(transparent)` `u16`.
unsafe impl Pod for f16 {}
// SAFETY: `half::bf16` is a `repr(transparent)` `u16`.
unsafe impl Pod for bf16 {}
// SAFETY: primitive numbers, no padding, every bit pattern valid.
unsafe impl Pod for i64 {}
// SAFETY: as above.
unsafe impl Pod for i32 {}
// SAFETY: as above.
unsafe impl Pod for i16 {}
// SAFETY: as above.
unsafe impl Pod for u32 {}
// SAFETY: as above.
unsafe impl Pod for u8 {}

/// A vector of `len` zeros from zeroed memory: a large one comes as fresh pages from the
/// kernel, untouched until the read fills them (no pass writing zeros first). `None` when
/// the size overflows.
fn zeroed_vec<T: Pod>(len: usize) -> Option<Vec<T>> {
    if len == 0 || std::mem::size_of::<T>() == 0 {
        return Some(Vec::new());
    }
    let layout = Layout::array::<T>(len).ok()?;
    // SAFETY: the layout has a non-zero size (len > 0 and T is not zero-sized).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: `ptr` comes from the global allocator with the layout of `[T; len]`, so the
    // capacity is `len`; its bytes are zero, a valid `T` (`Pod`), so all `len` are
    // initialised.
    Some(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// The bytes of a slice of plain numbers, to read into.
fn as_bytes_mut<T: Pod>(values: &mut [T]) -> &mut [u8] {
    let len = std::mem::size_of_val(values);
    // SAFETY: the pointer and length cover exactly the slice's memory, which stays
    // exclusively borrowed for the returned lifetime; `u8` needs no alignment, `T` has no
    // padding (so every byte is initialised) and any bytes written are a valid `T` (`Pod`).
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMPONENT: &str = "test";

    fn save(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
        let path = dir.join(name);
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(name, tensor)| (name.to_string(), tensor.clone()))
            .collect();
        candle_core::safetensors::save(&map, &path).unwrap();
        path
    }

    /// A safetensors file written by hand: `header` is the JSON, `data` the bytes after it.
    fn raw(dir: &Path, name: &str, header: &str, data: &[u8]) -> PathBuf {
        let path = dir.join(name);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn load(files: &[PathBuf], dtype: DType) -> Result<HashMap<String, Tensor>, PipelineError> {
        load_tensors(files, dtype, &Device::Cpu, COMPONENT)
    }

    fn error(files: &[PathBuf], dtype: DType) -> String {
        load(files, dtype).unwrap_err().to_string()
    }

    #[test]
    fn an_f32_file_loads_bit_exact() {
        let dir = tempfile::tempdir().unwrap();
        let values = [
            1.0f32,
            -0.0,
            f32::MIN_POSITIVE,
            f32::from_bits(0x7fc0_1234),
            f32::MAX,
            1e-42,
        ];
        let w = Tensor::from_slice(&values, (2, 3), &Device::Cpu).unwrap();
        let b = Tensor::from_slice(&[0.5f32], (), &Device::Cpu).unwrap();
        let file = save(dir.path(), "w.safetensors", &[("w", w), ("b", b)]);
        let tensors = load(&[file], DType::F32).unwrap();
        assert_eq!(tensors.len(), 2);
        let w = &tensors["w"];
        assert_eq!(w.dtype(), DType::F32);
        assert_eq!(w.dims(), &[2, 3]);
        let got: Vec<u32> = w
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let want: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want);
        assert_eq!(tensors["b"].dims(), &[] as &[usize]);
        assert_eq!(tensors["b"].to_scalar::<f32>().unwrap(), 0.5);
    }

    #[test]
    fn an_f16_file_asked_for_as_f32_is_converted() {
        let dir = tempfile::tempdir().unwrap();
        let values = [0.5f32, -2.0, 1024.0, 0.099975586];
        let w = Tensor::from_slice(&values, 4, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let file = save(dir.path(), "w.safetensors", &[("w", w)]);
        let w = &load(&[file], DType::F32).unwrap()["w"];
        assert_eq!(w.dtype(), DType::F32);
        assert_eq!(w.to_vec1::<f32>().unwrap(), values);
    }

    #[test]
    fn an_f32_file_asked_for_as_f16_or_bf16_is_converted() {
        let dir = tempfile::tempdir().unwrap();
        let values = [0.5f32, -2.0, 1.0 / 3.0];
        let w = Tensor::from_slice(&values, 3, &Device::Cpu).unwrap();
        let file = save(dir.path(), "w.safetensors", &[("w", w)]);
        let f = &load(std::slice::from_ref(&file), DType::F16).unwrap()["w"];
        assert_eq!(f.dtype(), DType::F16);
        let want: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
        assert_eq!(f.to_vec1::<f16>().unwrap(), want);
        let b = &load(&[file], DType::BF16).unwrap()["w"];
        assert_eq!(b.dtype(), DType::BF16);
        let want: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
        assert_eq!(b.to_vec1::<bf16>().unwrap(), want);
    }

    #[test]
    fn a_bf16_file_loads_as_bf16() {
        let dir = tempfile::tempdir().unwrap();
        let want: Vec<bf16> = [1.5f32, -3.0].iter().map(|&v| bf16::from_f32(v)).collect();
        let w = Tensor::from_slice(&want, 2, &Device::Cpu).unwrap();
        let file = save(dir.path(), "w.safetensors", &[("w", w)]);
        let w = &load(&[file], DType::BF16).unwrap()["w"];
        assert_eq!(w.dtype(), DType::BF16);
        assert_eq!(w.to_vec1::<bf16>().unwrap(), want);
    }

    #[test]
    fn an_integer_tensor_keeps_its_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<i64> = (0..77).collect();
        let position_ids = Tensor::from_slice(&ids, (1, 77), &Device::Cpu).unwrap();
        let w = Tensor::ones(2, DType::F32, &Device::Cpu).unwrap();
        let file = save(
            dir.path(),
            "te.safetensors",
            &[("position_ids", position_ids), ("w", w)],
        );
        let tensors = load(&[file], DType::F16).unwrap();
        let position_ids = &tensors["position_ids"];
        assert_eq!(position_ids.dtype(), DType::I64);
        assert_eq!(position_ids.to_vec2::<i64>().unwrap(), vec![ids]);
        assert_eq!(tensors["w"].dtype(), DType::F16);
    }

    #[test]
    fn a_truncated_file_is_refused_naming_the_file_and_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::ones((4, 4), DType::F32, &Device::Cpu).unwrap();
        let full = save(dir.path(), "full.safetensors", &[("big.weight", w)]);
        let bytes = std::fs::read(&full).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
        let e = error(&[cut], DType::F32);
        assert!(e.contains("cut.safetensors"), "{e}");
        assert!(e.contains("`big.weight`"), "{e}");
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn data_offsets_beyond_the_end_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"far":{"dtype":"F32","shape":[2],"data_offsets":[1000,1008]}}"#;
        let file = raw(dir.path(), "far.safetensors", header, &[0u8; 16]);
        let e = error(&[file], DType::F32);
        assert!(e.contains("far.safetensors"), "{e}");
        assert!(e.contains("invalid offset for tensor `far`"), "{e}");
    }

    #[test]
    fn a_header_lying_about_sizes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let header = r#"{"liar":{"dtype":"F32","shape":[3,3],"data_offsets":[0,16]}}"#;
        let file = raw(dir.path(), "liar.safetensors", header, &[0u8; 64]);
        let e = error(&[file], DType::F32);
        // The safetensors crate checks each shape against its data, without naming it.
        assert!(e.contains("liar.safetensors"), "{e}");
        assert!(e.contains("invalid shape, data type, or offset"), "{e}");

        let header =
            r#"{"huge":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}}"#;
        let file = raw(dir.path(), "huge.safetensors", header, &[0u8; 16]);
        let e = error(&[file], DType::F32);
        assert!(
            e.contains("huge.safetensors") && e.contains("overflow"),
            "{e}"
        );

        let header = r#"{"backwards":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#;
        let file = raw(dir.path(), "backwards.safetensors", header, &[0u8; 16]);
        let e = error(&[file], DType::F32);
        assert!(e.contains("`backwards`"), "{e}");
    }

    #[test]
    fn a_broken_header_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let tiny = dir.path().join("tiny.safetensors");
        std::fs::write(&tiny, [1u8, 2, 3]).unwrap();
        let e = error(&[tiny], DType::F32);
        assert!(e.contains("tiny.safetensors"), "{e}");

        let long = dir.path().join("long.safetensors");
        std::fs::write(&long, [0xffu8; 16]).unwrap();
        let e = error(&[long], DType::F32);
        assert!(e.contains("long.safetensors"), "{e}");

        let junk = raw(dir.path(), "junk.safetensors", "{not json", &[]);
        let e = error(&[junk], DType::F32);
        assert!(e.contains("junk.safetensors"), "{e}");

        let header = r#"{"w":{"dtype":"F32","shape":"two","data_offsets":[0,8]}}"#;
        let shape = raw(dir.path(), "shape.safetensors", header, &[0u8; 8]);
        let e = error(&[shape], DType::F32);
        assert!(
            e.contains("shape.safetensors") && e.contains("\"two\""),
            "{e}"
        );
    }

    #[test]
    fn an_unsupported_dtype_is_refused_naming_the_tensor_and_the_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let header = r#"{"__metadata__":{"format":"pt"},"mask":{"dtype":"BOOL","shape":[4],"data_offsets":[0,4]}}"#;
        let file = raw(dir.path(), "bool.safetensors", header, &[0u8; 4]);
        let e = error(&[file], DType::F32);
        assert!(e.contains("bool.safetensors"), "{e}");
        assert!(e.contains("`mask`") && e.contains("BOOL"), "{e}");
    }

    #[test]
    fn shards_merge_and_a_name_in_two_shards_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let one = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        let two = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        let a = save(dir.path(), "a.safetensors", &[("one", one.clone())]);
        let b = save(dir.path(), "b.safetensors", &[("two", two.clone())]);
        let tensors = load(&[a.clone(), b], DType::F32).unwrap();
        assert_eq!(tensors.len(), 2);
        assert_eq!(tensors["one"].to_vec1::<f32>().unwrap(), vec![1.0; 3]);
        assert_eq!(tensors["two"].dims(), &[2, 2]);

        let again = save(dir.path(), "c.safetensors", &[("two", two), ("one", one)]);
        let e = error(&[a, again], DType::F32);
        assert!(
            e.contains("c.safetensors") && e.contains("a.safetensors"),
            "{e}"
        );
        assert!(e.contains("`one`"), "{e}");
    }
}

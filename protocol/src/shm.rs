//! Output tensors in shared memory.
//!
//! The daemon writes each output once into an anonymous memfd, seals it against shrinking,
//! growing and further writes, and passes the descriptor to the client, which maps it
//! read-only. A memfd has no name: only the holder of the descriptor can map it, and the
//! kernel frees it when the last descriptor and mapping go away, crash or not.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use memmap2::{Mmap, MmapMut, MmapOptions};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};

/// The seals a segment carries once written; the client checks for them before mapping.
fn required_seals() -> SealFlag {
    SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_FUTURE_WRITE
}

/// A segment being written by the daemon.
pub struct OutputSegment {
    file: File,
    map: MmapMut,
}

impl OutputSegment {
    /// Creates a zero-filled segment of `len` bytes (at least one).
    pub fn create(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an output segment cannot be empty",
            ));
        }
        let fd = memfd_create(
            c"dwd-output",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(io::Error::from)?;
        let file = File::from(fd);
        file.set_len(len as u64)?;
        // SAFETY: the memfd is ours alone until it is sealed and sent; nobody else can
        // truncate it under this mapping.
        let map = unsafe { MmapOptions::new().len(len).map_mut(&file)? };
        Ok(OutputSegment { file, map })
    }

    /// The writable bytes of the segment.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }

    /// Seals the segment and drops the writable mapping; the returned descriptor is what
    /// travels to the client.
    pub fn seal(self) -> io::Result<SealedSegment> {
        fcntl(
            &self.file,
            FcntlArg::F_ADD_SEALS(required_seals() | SealFlag::F_SEAL_SEAL),
        )
        .map_err(io::Error::from)?;
        let len = self.map.len();
        drop(self.map);
        Ok(SealedSegment {
            fd: OwnedFd::from(self.file),
            len,
        })
    }
}

/// A written, sealed segment ready to be sent.
pub struct SealedSegment {
    fd: OwnedFd,
    len: usize,
}

impl SealedSegment {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A segment received by the client, mapped read-only.
pub struct MappedOutput {
    map: Mmap,
    len: usize,
}

impl MappedOutput {
    /// Maps the first `byte_len` bytes of a received segment. Refuses a segment that is
    /// smaller than announced or not sealed (it could shrink under the mapping).
    pub fn map(fd: OwnedFd, byte_len: usize) -> io::Result<Self> {
        let file = File::from(fd);
        let seals = fcntl(&file, FcntlArg::F_GET_SEALS).map_err(io::Error::from)?;
        let seals = SealFlag::from_bits_truncate(seals);
        if !seals.contains(required_seals()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "received an output segment that is not sealed",
            ));
        }
        let size = file.metadata()?.len();
        if size < byte_len as u64 || byte_len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("output segment holds {size} bytes, {byte_len} announced"),
            ));
        }
        // SAFETY: the segment is sealed against shrinking and writing, so the mapped bytes
        // stay valid and unchanged for the mapping's lifetime.
        let map = unsafe { MmapOptions::new().len(byte_len).map(&file)? };
        Ok(MappedOutput { map, len: byte_len })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_bytes_are_read_back_through_the_descriptor() {
        let mut seg = OutputSegment::create(1000).unwrap();
        seg.bytes_mut()[..5].copy_from_slice(b"hello");
        seg.bytes_mut()[999] = 7;
        let sealed = seg.seal().unwrap();
        let fd = sealed.fd().try_clone_to_owned().unwrap();
        let mapped = MappedOutput::map(fd, 1000).unwrap();
        assert_eq!(&mapped.bytes()[..5], b"hello");
        assert_eq!(mapped.bytes()[999], 7);
    }

    #[test]
    fn a_sealed_segment_cannot_be_written_or_resized_by_the_receiver() {
        let seg = OutputSegment::create(4096).unwrap();
        let sealed = seg.seal().unwrap();
        let file = File::from(sealed.fd().try_clone_to_owned().unwrap());
        assert!(file.set_len(10).is_err(), "shrinking must be refused");
        assert!(file.set_len(1 << 20).is_err(), "growing must be refused");
        assert!(unsafe { MmapOptions::new().len(4096).map_mut(&file) }.is_err());
    }

    #[test]
    fn an_unsealed_or_short_segment_is_refused() {
        let fd = memfd_create(c"t", MFdFlags::MFD_ALLOW_SEALING).unwrap();
        let file = File::from(fd);
        file.set_len(16).unwrap();
        assert!(MappedOutput::map(OwnedFd::from(file), 16).is_err());

        let sealed = OutputSegment::create(16).unwrap().seal().unwrap();
        let err = MappedOutput::map(sealed.fd().try_clone_to_owned().unwrap(), 17)
            .err()
            .unwrap();
        assert!(err.to_string().contains("17 announced"), "{err}");
    }
}

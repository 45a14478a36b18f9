//! The shared-memory handoff of outputs: bytes are copied once into a sealed memfd whose
//! descriptor travels to the client beside the frame that describes it.

use protocol::shm::{OutputSegment, SealedSegment};

/// A sealed segment holding a copy of `bytes`.
pub fn segment_with(bytes: &[u8]) -> std::io::Result<SealedSegment> {
    let mut segment = OutputSegment::create(bytes.len())?;
    segment.bytes_mut().copy_from_slice(bytes);
    segment.seal()
}

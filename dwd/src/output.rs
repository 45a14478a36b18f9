//! The shared-memory handoff of outputs: bytes are copied once into a sealed memfd whose
//! descriptor travels to the client beside the frame that describes it.
//!
//! Segments come from one [`Spares`] pool per daemon: a pre-faulted spare of the last
//! output size is made on a background thread after each handoff, and sent segments are
//! unmapped and freed on that thread too, so the reply path is one copy, a seal and a send.

use std::sync::OnceLock;

use protocol::shm::{OutputSegment, SealedSegment, Spares, RETIRE_AFTER};

/// At most this much is kept in ready spares (one 48 MiB tensor, or 4-16 images).
const SPARE_BYTES: usize = 64 << 20;

fn spares() -> Option<&'static Spares> {
    static SPARES: OnceLock<Option<Spares>> = OnceLock::new();
    SPARES
        .get_or_init(|| match Spares::new(SPARE_BYTES, RETIRE_AFTER) {
            Ok(spares) => Some(spares),
            Err(e) => {
                tracing::warn!("no spare output segments ({e}); each output makes its own");
                None
            }
        })
        .as_ref()
}

/// A sealed segment holding a copy of `bytes`.
pub fn segment_with(bytes: &[u8]) -> std::io::Result<SealedSegment> {
    let mut segment = match spares() {
        Some(spares) => spares.take(bytes.len())?,
        None => OutputSegment::create(bytes.len())?,
    };
    segment.bytes_mut().copy_from_slice(bytes);
    segment.seal()
}

/// Hands a sent segment to the background thread, which unmaps and closes it later.
pub fn retire(segment: SealedSegment) {
    match spares() {
        Some(spares) => spares.retire(segment),
        None => drop(segment),
    }
}

/// Frees the ready spares and the sent segments not freed yet (for `dwctl clear`); returns
/// the bytes freed. The next output makes its own segment and the pool starts over.
pub fn release_spares() -> u64 {
    spares().map_or(0, |spares| spares.release() as u64)
}

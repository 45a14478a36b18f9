//! Feeds arbitrary bytes to the frame reader as a stream of frames, as a peer could send
//! them, once as `ClientMessage`s and once as `ServerMessage`s, reading until the first
//! error.
//!
//! Checks that:
//! - reading never panics;
//! - no single allocation made while reading one frame is larger than `MAX_FRAME_LEN`
//!   (the announced length is checked before the body is allocated);
//! - a frame that decodes consumed exactly its header plus the length it announced, and
//!   at most `HEADER_LEN + MAX_FRAME_LEN` bytes;
//! - every decoded message survives `encode` and a second `read_frame` unchanged
//!   (compared by their `Debug` text). `encode` may refuse with `TooLarge` only when the
//!   received body was already within a few hundred bytes of the limit: a peer may send
//!   structs as compact MessagePack arrays, which `encode` writes back as maps with field
//!   names.

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Debug;
use std::io::Cursor;
use std::sync::atomic::{AtomicUsize, Ordering};

use libfuzzer_sys::fuzz_target;
use protocol::frame::{self, FrameError, HEADER_LEN, MAX_FRAME_LEN};
use protocol::message::{ClientMessage, ServerMessage};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// How much bigger a message may get when re-encoded with field names.
const NAMED_ENCODING_SLACK: usize = 512;

/// Records the largest single allocation (or reallocation) since the last reset.
struct LargestAllocation;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

fuzz_target!(|data: &[u8]| {
    read_stream::<ClientMessage>(data);
    read_stream::<ServerMessage>(data);
});

/// Reads frames from `data` until the first error, checking each one.
fn read_stream<T: DeserializeOwned + Serialize + Debug>(data: &[u8]) {
    let mut cursor = Cursor::new(data);
    loop {
        let start = cursor.position() as usize;
        LARGEST.store(0, Ordering::Relaxed);
        let result = frame::read_frame::<T>(&mut cursor);
        let largest = LARGEST.load(Ordering::Relaxed);
        let consumed = cursor.position() as usize - start;
        assert!(
            largest <= MAX_FRAME_LEN,
            "reading one frame allocated {largest} bytes at once (limit {MAX_FRAME_LEN})"
        );
        assert!(
            consumed <= HEADER_LEN + MAX_FRAME_LEN,
            "one frame consumed {consumed} bytes"
        );
        let Ok(message) = result else { break };

        let header: [u8; HEADER_LEN] = data[start..start + HEADER_LEN].try_into().unwrap();
        let announced = u32::from_be_bytes(header) as usize;
        assert_eq!(
            consumed,
            HEADER_LEN + announced,
            "a decoded frame consumed other than its header and announced body"
        );
        round_trip(&message, announced);
    }
}

/// Encodes `message` again and checks that it reads back the same.
fn round_trip<T: DeserializeOwned + Serialize + Debug>(message: &T, received_body_len: usize) {
    let encoded = match frame::encode(message) {
        Ok(encoded) => encoded,
        Err(FrameError::TooLarge { .. })
            if received_body_len + NAMED_ENCODING_SLACK > MAX_FRAME_LEN =>
        {
            return
        }
        Err(e) => panic!("a decoded message does not encode again: {e}\n{message:?}"),
    };
    let mut cursor = Cursor::new(&encoded);
    let back: T = frame::read_frame(&mut cursor).unwrap_or_else(|e| {
        panic!("a re-encoded message does not decode: {e}\n{message:?}\n{encoded:02x?}")
    });
    assert_eq!(
        cursor.position() as usize,
        encoded.len(),
        "a re-encoded frame was not read to its end"
    );
    let (before, after) = (format!("{message:?}"), format!("{back:?}"));
    assert_eq!(before, after, "a message changed in a round trip");
}

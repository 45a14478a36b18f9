//! Output tensors in shared memory.
//!
//! The daemon writes each output once into an anonymous memfd, seals it against shrinking,
//! growing and further writes, and passes the descriptor to the client, which maps it
//! read-only. A memfd has no name: only the holder of the descriptor can map it, and the
//! kernel frees it when the last descriptor and mapping go away, crash or not.
//!
//! What costs time in a handoff is pages, not bytes: a new segment's pages are allocated
//! and zeroed on first touch, and unmapping touched pages (and freeing them) takes
//! milliseconds for tens of MiB. [`Spares`] keeps pre-faulted segments ready and lets
//! sent segments go on a background thread, so the reply path is one copy, a seal and a
//! `sendmsg`. A spare is a fresh segment made ahead of time: it is handed out once and a
//! sent segment is never written again nor reused.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use memmap2::{Advice, Mmap, MmapMut, MmapOptions};
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

    /// Creates a segment whose pages are already allocated and mapped writable, so that
    /// filling it costs one copy and no page faults. Slow (the kernel allocates and zeroes
    /// every page): make it ahead of time, off the path of a reply.
    pub fn create_prefaulted(len: usize) -> io::Result<Self> {
        let mut segment = OutputSegment::create(len)?;
        // MADV_POPULATE_WRITE (Linux 5.14) maps every page writable in one call; where it
        // is missing, writing one byte per page does the same.
        if segment.map.advise(Advice::PopulateWrite).is_err() {
            segment.map.iter_mut().step_by(4096).for_each(|b| *b = 0);
        }
        Ok(segment)
    }

    /// The segment's size in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Never true: a segment holds at least one byte.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The writable bytes of the segment.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }

    /// Seals the segment; the returned descriptor is what travels to the client. The
    /// writable mapping goes into the sealed segment, which never writes through it, and
    /// is unmapped when that is dropped (hand it to [`Spares::retire`] to do that off the
    /// reply path). `F_SEAL_FUTURE_WRITE` allows exactly this: no new writable mapping,
    /// while the existing one may stay until it is unmapped.
    pub fn seal(self) -> io::Result<SealedSegment> {
        fcntl(
            &self.file,
            FcntlArg::F_ADD_SEALS(required_seals() | SealFlag::F_SEAL_SEAL),
        )
        .map_err(io::Error::from)?;
        let len = self.map.len();
        Ok(SealedSegment {
            fd: OwnedFd::from(self.file),
            len,
            _written: self.map,
        })
    }
}

/// A written, sealed segment ready to be sent.
pub struct SealedSegment {
    fd: OwnedFd,
    len: usize,
    /// The mapping it was written through, kept only to be unmapped when this is dropped.
    _written: MmapMut,
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

/// Pre-faulted segments kept ready, and sent segments waiting to be freed; a background
/// thread makes the first and frees the second, off the reply path.
///
/// [`Spares::take`] hands out a ready segment of exactly the asked size when there is one,
/// else a new one; either way it is a segment nobody else has seen, and it leaves the pool
/// for good. How many are kept follows demand: one per size at first, one more each time a
/// burst of outputs of that size found none ready, within `max_bytes`. Asking for another
/// size drops the spares of the old one.
///
/// [`Spares::retire`] keeps a sent segment a while (`retire_after`; dwd:
/// [`RETIRE_AFTER`]) before it is closed and unmapped, so that the client unmapping its copy does not have to free the pages (its
/// exit is then faster); dropping it earlier would be as correct, only slower for the
/// client.
pub struct Spares {
    shared: Arc<SparesShared>,
}

/// How long after the last take a new spare is made.
const BURST_GAP: Duration = Duration::from_millis(20);

/// How long dwd keeps a sent segment before its pages are freed.
pub const RETIRE_AFTER: Duration = Duration::from_secs(2);

/// The most spares kept ready, whatever their size: each holds a descriptor.
pub const MAX_READY: usize = 8;

/// The most sent segments kept before they are freed; past it the oldest goes at once, so
/// a burst of small outputs cannot pile up descriptors.
pub const MAX_RETIRED: usize = 64;

struct SparesShared {
    state: Mutex<SparesState>,
    wake: Condvar,
}

#[derive(Default)]
struct SparesState {
    /// The size spares are made for (the last size asked for).
    len: usize,
    /// How many spares of `len` to keep ready.
    want: usize,
    ready: Vec<OutputSegment>,
    retired: VecDeque<(Instant, SealedSegment)>,
    retire_after: Duration,
    /// When a segment was last taken: spares are made once a burst of outputs is over,
    /// not during it, where they would compete with the handoff for the CPU.
    last_take: Option<Instant>,
    max_bytes: usize,
    stop: bool,
}

impl Spares {
    /// Starts the background thread; at most `max_bytes` are kept in ready spares, and
    /// sent segments are freed `retire_after` they were retired.
    pub fn new(max_bytes: usize, retire_after: Duration) -> io::Result<Spares> {
        let shared = Arc::new(SparesShared {
            state: Mutex::new(SparesState {
                max_bytes,
                retire_after,
                ..SparesState::default()
            }),
            wake: Condvar::new(),
        });
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("dw-spares".to_string())
            .spawn(move || worker.run())?;
        Ok(Spares { shared })
    }

    /// A segment of `len` bytes never handed out before: a ready spare when one of that
    /// size is there, else a new (not pre-faulted) one.
    pub fn take(&self, len: usize) -> io::Result<OutputSegment> {
        let (spare, stale) = {
            let mut state = self.shared.lock();
            let resized = state.len != len;
            let stale = if resized {
                state.len = len;
                state.want = 1;
                std::mem::take(&mut state.ready)
            } else {
                Vec::new()
            };
            let spare = state.ready.pop();
            state.last_take = Some(Instant::now());
            if spare.is_none()
                && !resized
                && state.want < MAX_READY
                && (state.want + 1).saturating_mul(len) <= state.max_bytes
            {
                // A burst found the pool empty: keep one more ready next time.
                state.want += 1;
            }
            (spare, stale)
        };
        self.shared.wake.notify_one();
        drop(stale);
        match spare {
            Some(segment) => Ok(segment),
            None => OutputSegment::create(len),
        }
    }

    /// Keeps a sent segment until the background thread frees it (see [`RETIRE_AFTER`]).
    pub fn retire(&self, segment: SealedSegment) {
        let mut state = self.shared.lock();
        let at = Instant::now() + state.retire_after;
        state.retired.push_back((at, segment));
        let overflow = match state.retired.len() > MAX_RETIRED {
            true => state.retired.pop_front(),
            false => None,
        };
        drop(state);
        drop(overflow);
        self.shared.wake.notify_one();
    }

    /// Frees every ready spare and every retired segment now, and makes no new spare
    /// until the next [`Spares::take`]; returns the bytes freed. For `dwctl clear`: after
    /// it, the daemon holds nothing for outputs either.
    pub fn release(&self) -> usize {
        let (ready, retired) = {
            let mut state = self.shared.lock();
            state.len = 0;
            state.want = 0;
            (
                std::mem::take(&mut state.ready),
                std::mem::take(&mut state.retired),
            )
        };
        ready.iter().map(OutputSegment::len).sum::<usize>()
            + retired
                .iter()
                .map(|(_, segment)| segment.len())
                .sum::<usize>()
    }

    /// How many spares are ready now, and of which size.
    pub fn ready(&self) -> (usize, usize) {
        let state = self.shared.lock();
        (state.ready.len(), state.len)
    }

    /// How many retired segments are not freed yet.
    pub fn retired(&self) -> usize {
        self.shared.lock().retired.len()
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
    }
}

impl SparesShared {
    fn lock(&self) -> MutexGuard<'_, SparesState> {
        // A panic while holding the lock leaves plain data behind; go on with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The background thread: frees retired segments when due, tops the spares up.
    fn run(&self) {
        let mut state = self.lock();
        loop {
            if state.stop {
                return;
            }
            let now = Instant::now();
            let due = state
                .retired
                .iter()
                .take_while(|(at, _)| *at <= now)
                .count();
            if due > 0 {
                let freed: Vec<_> = state.retired.drain(..due).collect();
                drop(state);
                drop(freed);
                state = self.lock();
                continue;
            }
            let fits = state.len > 0 && state.len <= state.max_bytes;
            let want = state.want.min(state.max_bytes / state.len.max(1));
            let quiet_for = state
                .last_take
                .map_or(BURST_GAP, |at| now.saturating_duration_since(at));
            if fits && state.ready.len() < want && quiet_for < BURST_GAP {
                state = self
                    .wake
                    .wait_timeout(state, BURST_GAP - quiet_for)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            if fits && state.ready.len() < want {
                let len = state.len;
                drop(state);
                let made = OutputSegment::create_prefaulted(len);
                state = self.lock();
                match made {
                    Ok(segment) if state.len == len && state.ready.len() < want => {
                        state.ready.push(segment)
                    }
                    Ok(unwanted) => {
                        drop(state);
                        drop(unwanted);
                        state = self.lock();
                    }
                    // Out of memory or descriptors: no spare now; `take` makes its own.
                    Err(_) => {
                        state = self
                            .wake
                            .wait_timeout(state, Duration::from_secs(1))
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
                continue;
            }
            state = match state.retired.front() {
                Some((at, _)) => {
                    let wait = at.saturating_duration_since(now);
                    self.wake
                        .wait_timeout(state, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.wake.wait(state).unwrap_or_else(|e| e.into_inner()),
            };
        }
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

    fn inode(segment: &OutputSegment) -> u64 {
        use std::os::unix::fs::MetadataExt;
        segment.file.metadata().unwrap().ino()
    }

    /// Waits until `spares` holds `count` ready segments of `len`.
    fn wait_ready(spares: &Spares, count: usize, len: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while spares.ready() != (count, len) {
            assert!(Instant::now() < deadline, "{:?}", spares.ready());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_spare_is_made_ahead_zeroed_and_handed_out_once() {
        let spares = Spares::new(1 << 20, RETIRE_AFTER).unwrap();
        let len = 3 * 4096 + 5;
        let mut seen = std::collections::HashSet::new();
        // The first one of a size is new; a spare is then made in the background.
        let first = spares.take(len).unwrap();
        assert!(seen.insert(inode(&first)));
        wait_ready(&spares, 1, len);
        for _ in 0..5 {
            let mut segment = spares.take(len).unwrap();
            assert_eq!(segment.len(), len);
            assert!(segment.bytes_mut().iter().all(|&b| b == 0), "not zeroed");
            assert!(
                seen.insert(inode(&segment)),
                "a segment was handed out twice"
            );
            segment.bytes_mut()[0] = 1;
            spares.retire(segment.seal().unwrap());
        }
        // A burst that found the pool empty asks for more spares next time.
        let (ready, _) = spares.ready();
        assert!(ready <= (1 << 20) / len);
    }

    // A burst of many small outputs used to keep one descriptor per output.
    #[test]
    fn a_burst_of_small_outputs_keeps_a_bounded_number_of_segments() {
        let spares = Spares::new(64 << 20, RETIRE_AFTER).unwrap();
        for _ in 0..300 {
            spares.retire(spares.take(4096).unwrap().seal().unwrap());
        }
        assert!(spares.retired() <= MAX_RETIRED, "{}", spares.retired());
        std::thread::sleep(Duration::from_millis(100));
        assert!(spares.ready().0 <= MAX_READY, "{:?}", spares.ready());
    }

    #[test]
    fn retired_segments_are_freed_after_their_delay() {
        let spares = Spares::new(1 << 20, Duration::from_millis(20)).unwrap();
        spares.retire(spares.take(4096).unwrap().seal().unwrap());
        assert_eq!(spares.retired(), 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while spares.retired() > 0 {
            assert!(Instant::now() < deadline, "never freed");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn spares_follow_the_size_asked_for_and_stay_within_the_budget() {
        let spares = Spares::new(64 * 1024, RETIRE_AFTER).unwrap();
        drop(spares.take(4096).unwrap());
        wait_ready(&spares, 1, 4096);
        drop(spares.take(8192).unwrap());
        wait_ready(&spares, 1, 8192);
        // Larger than the budget: never kept ready.
        drop(spares.take(128 * 1024).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(spares.ready(), (0, 128 * 1024));
    }

    #[test]
    fn release_frees_spares_and_retired_segments_and_makes_no_more_until_the_next_take() {
        let spares = Spares::new(1 << 20, RETIRE_AFTER).unwrap();
        drop(spares.take(4096).unwrap());
        wait_ready(&spares, 1, 4096);
        spares.retire(spares.take(4096).unwrap().seal().unwrap());
        wait_ready(&spares, 1, 4096);
        assert_eq!(spares.release(), 2 * 4096);
        assert_eq!((spares.ready().0, spares.retired()), (0, 0));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            spares.ready().0,
            0,
            "a released pool stays empty while idle"
        );
        drop(spares.take(4096).unwrap());
        wait_ready(&spares, 1, 4096);
    }

    #[test]
    fn a_taken_spare_is_refused_by_the_client_until_sealed() {
        let spares = Spares::new(1 << 20, RETIRE_AFTER).unwrap();
        drop(spares.take(4096).unwrap());
        wait_ready(&spares, 1, 4096);
        let mut spare = spares.take(4096).unwrap();
        let unsealed = spare.file.try_clone().unwrap();
        let err = MappedOutput::map(OwnedFd::from(unsealed), 4096)
            .err()
            .unwrap();
        assert!(err.to_string().contains("not sealed"), "{err}");
        spare.bytes_mut()[4095] = 9;
        let sealed = spare.seal().unwrap();
        let mapped = MappedOutput::map(sealed.fd().try_clone_to_owned().unwrap(), 4096).unwrap();
        // Retiring the daemon's side leaves the client's mapping intact.
        spares.retire(sealed);
        assert_eq!(mapped.bytes()[4095], 9);
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

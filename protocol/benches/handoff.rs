//! How long it takes to hand an output from the daemon to the client, against the physical
//! floor of one memcpy, for 4 images of 1024x1024x3 u8 and one 48 MiB f32 tensor.
//!
//! - `memfd, new`: a new sealed memfd per output, written once, its descriptor passed with
//!   SCM_RIGHTS, unmapped at once; the client maps it, reads every byte and unmaps it
//!   (what dwd did before it kept spares).
//! - `memfd, spares`: what dwd does now: segments from a [`Spares`] pool (pre-faulted on
//!   its background thread, which also unmaps and frees sent segments); the client stops
//!   the clock once it has read every byte and unmaps afterwards (as `dwctl` does after
//!   writing its file). The pool is given time to refill, and to free the last round's
//!   segments, between rounds, as the decode between a daemon's jobs gives it.
//! - `socket`: the bytes written through the Unix socket and read into a buffer.
//! - `memcpy`: one copy into an already touched buffer, then the same read.
//!
//! Run: `cargo bench -p protocol --bench handoff` (medians of 15 rounds).

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use protocol::fdpass::{send_with_fd, FdFrameReader};
use protocol::frame::encode;
use protocol::message::ClientMessage;
use protocol::shm::{MappedOutput, OutputSegment, Spares};

const ROUNDS: usize = 15;

/// Reads every byte, as a client encoding the output must.
fn read_all(bytes: &[u8]) -> u64 {
    bytes.chunks(8).fold(0u64, |sum, chunk| {
        sum.wrapping_add(chunk.iter().map(|&b| u64::from(b)).sum::<u64>())
    })
}

fn median(mut samples: Vec<Duration>) -> (Duration, Duration, Duration) {
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[0],
        samples[samples.len() - 1],
    )
}

/// Hands `outputs` over through new memfds, unmapped on the spot on both sides.
fn memfd_new(outputs: &[Vec<u8>]) -> Duration {
    let (daemon, client) = UnixStream::pair().expect("socket pair");
    let frame = encode(&ClientMessage::Ping).expect("frame");
    let started = Instant::now();
    let receiver = std::thread::spawn(move || {
        let mut reader = FdFrameReader::new(client);
        let mut sum = 0;
        while let Ok(ClientMessage::Ping) = reader.read_message() {
            let mapped = map_received(&mut reader);
            sum += read_all(mapped.bytes());
        }
        sum
    });
    for output in outputs {
        let mut segment = OutputSegment::create(output.len()).expect("segment");
        segment.bytes_mut().copy_from_slice(output);
        let sealed = segment.seal().expect("seal");
        send_with_fd(daemon.as_raw_fd(), &frame, sealed.fd()).expect("send");
    }
    drop(daemon);
    std::hint::black_box(receiver.join().expect("receiver"));
    started.elapsed()
}

/// Hands `outputs` over as dwd does: segments from `spares`, retired once sent; the
/// client's clock stops when it has read everything, before it unmaps.
fn memfd_spares(outputs: &[Vec<u8>], spares: &Spares) -> Duration {
    // Give the background thread the time the decode between outputs gives it in dwd.
    let deadline = Instant::now() + Duration::from_secs(5);
    while (spares.ready().0 < outputs.len() || spares.retired() > 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(20));
    let (daemon, client) = UnixStream::pair().expect("socket pair");
    let frame = encode(&ClientMessage::Ping).expect("frame");
    let started = Instant::now();
    let receiver = std::thread::spawn(move || {
        let mut reader = FdFrameReader::new(client);
        let mut sum = 0;
        let mut read = Vec::new();
        while let Ok(ClientMessage::Ping) = reader.read_message() {
            let mapped = map_received(&mut reader);
            sum += read_all(mapped.bytes());
            read.push(mapped);
        }
        let done = Instant::now();
        drop(read);
        (sum, done)
    });
    for output in outputs {
        let mut segment = spares.take(output.len()).expect("segment");
        segment.bytes_mut().copy_from_slice(output);
        let sealed = segment.seal().expect("seal");
        send_with_fd(daemon.as_raw_fd(), &frame, sealed.fd()).expect("send");
        spares.retire(sealed);
    }
    drop(daemon);
    let (sum, done) = receiver.join().expect("receiver");
    std::hint::black_box(sum);
    done - started
}

fn map_received(reader: &mut FdFrameReader) -> MappedOutput {
    let fd = reader.take_fd().expect("a descriptor");
    let len = std::fs::File::from(fd.try_clone().expect("dup"))
        .metadata()
        .expect("stat")
        .len() as usize;
    MappedOutput::map(fd, len).expect("map")
}

/// Sends the bytes through the socket itself.
fn socket(outputs: &[Vec<u8>]) -> Duration {
    let (mut daemon, mut client) = UnixStream::pair().expect("socket pair");
    let total: usize = outputs.iter().map(Vec::len).sum();
    let started = Instant::now();
    let receiver = std::thread::spawn(move || {
        let mut buffer = vec![0u8; total];
        client.read_exact(&mut buffer).expect("read");
        read_all(&buffer)
    });
    for output in outputs {
        daemon.write_all(output).expect("write");
    }
    std::hint::black_box(receiver.join().expect("receiver"));
    started.elapsed()
}

/// One copy into touched memory, then the read.
fn memcpy(outputs: &[Vec<u8>], targets: &mut [Vec<u8>]) -> Duration {
    let started = Instant::now();
    let mut sum = 0;
    for (output, target) in outputs.iter().zip(targets.iter_mut()) {
        target.copy_from_slice(output);
        sum += read_all(target);
    }
    std::hint::black_box(sum);
    started.elapsed()
}

fn report(name: &str, outputs: &[Vec<u8>]) {
    let mut targets: Vec<Vec<u8>> = outputs.iter().map(|o| vec![1u8; o.len()]).collect();
    // Retired segments are freed after a round (dwd: 2 s after), and before the next one
    // starts (below), so that freeing one round's pages does not land in another's clock.
    let spares = Spares::new(64 << 20, Duration::from_millis(300)).expect("spares");
    let cases: [(&str, &mut dyn FnMut() -> Duration); 4] = [
        ("memcpy", &mut || memcpy(outputs, &mut targets)),
        ("memfd, new", &mut || memfd_new(outputs)),
        ("memfd, spares", &mut || memfd_spares(outputs, &spares)),
        ("socket", &mut || socket(outputs)),
    ];
    let mut floor = None;
    println!("{name}");
    for (case, run) in cases {
        run(); // warm-up (and, for spares, the burst that sizes the pool)
        let (median, min, max) = median((0..ROUNDS).map(|_| run()).collect());
        let floor = *floor.get_or_insert(median);
        println!(
            "  {case:<13} median {:7.2} ms  range {:6.2}-{:6.2} ms  {:4.2}x memcpy",
            median.as_secs_f64() * 1e3,
            min.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            median.as_secs_f64() / floor.as_secs_f64()
        );
    }
}

fn main() {
    let image = |seed: u8| {
        (0..1024 * 1024 * 3)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>()
    };
    report(
        "4 images, 1024x1024x3 u8 (12 MiB)",
        &[image(1), image(2), image(3), image(4)],
    );
    let tensor: Vec<u8> = (0..48 * 1024 * 1024 / 4)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    report("one f32 tensor, 48 MiB", &[tensor]);
    let _ = std::io::stdout().as_fd();
}

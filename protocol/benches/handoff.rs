//! How long it takes to hand an output from the daemon to the client, against the physical
//! floor of one memcpy, for 4 images of 1024x1024x3 u8 and one 48 MiB f32 tensor.
//!
//! - `memfd, new`: a new sealed memfd per output, written once, its descriptor passed with
//!   SCM_RIGHTS; the client maps it and reads every byte (what dwd does today).
//! - `memfd, spare`: the same with a segment created and pre-faulted beforehand, off the
//!   request path; the timed part is the copy, seal, pass, map and read.
//! - `socket`: the bytes written through the Unix socket and read into a buffer.
//! - `memcpy`: one copy into an already touched buffer, then the same read.
//!
//! Run: `cargo bench -p protocol --bench handoff` (medians of 15 rounds).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use protocol::fdpass::{send_with_fd, FdFrameReader};
use protocol::frame::encode;
use protocol::message::ClientMessage;
use protocol::shm::{MappedOutput, OutputSegment};

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

/// Hands `outputs` over through memfds; `spare` pre-faults each segment before timing.
fn memfd(outputs: &[Vec<u8>], spare: bool) -> Duration {
    let (daemon, client) = UnixStream::pair().expect("socket pair");
    let mut segments: Vec<Option<OutputSegment>> = outputs
        .iter()
        .map(|o| {
            spare.then(|| {
                let mut segment = OutputSegment::create(o.len()).expect("segment");
                segment
                    .bytes_mut()
                    .iter_mut()
                    .step_by(4096)
                    .for_each(|b| *b = 0);
                segment
            })
        })
        .collect();
    let frame = encode(&ClientMessage::Ping).expect("frame");
    let started = Instant::now();
    let receiver = std::thread::spawn(move || {
        let mut reader = FdFrameReader::new(client);
        let mut sum = 0;
        for _ in 0..4096 {
            let Ok(ClientMessage::Ping) = reader.read_message() else {
                break;
            };
            let fd = reader.take_fd().expect("a descriptor");
            let len = std::fs::File::from(fd.try_clone().expect("dup"))
                .metadata()
                .expect("stat")
                .len() as usize;
            let mapped = MappedOutput::map(fd, len).expect("map");
            sum += read_all(mapped.bytes());
        }
        sum
    });
    for (output, segment) in outputs.iter().zip(segments.iter_mut()) {
        let mut segment = match segment.take() {
            Some(s) => s,
            None => OutputSegment::create(output.len()).expect("segment"),
        };
        segment.bytes_mut().copy_from_slice(output);
        let sealed = segment.seal().expect("seal");
        send_with_fd(
            std::os::fd::AsRawFd::as_raw_fd(&daemon),
            &frame,
            sealed.fd(),
        )
        .expect("send");
    }
    drop(daemon);
    std::hint::black_box(receiver.join().expect("receiver"));
    started.elapsed()
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
    let cases: [(&str, &mut dyn FnMut() -> Duration); 4] = [
        ("memcpy", &mut || memcpy(outputs, &mut targets)),
        ("memfd, new", &mut || memfd(outputs, false)),
        ("memfd, spare", &mut || memfd(outputs, true)),
        ("socket", &mut || socket(outputs)),
    ];
    let mut floor = None;
    println!("{name}");
    for (case, run) in cases {
        run(); // warm-up
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

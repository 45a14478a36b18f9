//! Frames that carry a file descriptor.
//!
//! The daemon hands each output's memfd to the client with SCM_RIGHTS on the same socket,
//! attached to the first bytes of the frame that describes it. A descriptor travels with
//! particular bytes, so the client must read every frame with `recvmsg` itself and never
//! read ahead: [`FdFrameReader`] reads exactly one frame at a time and queues whatever
//! descriptors arrive, close-on-exec (`MSG_CMSG_CLOEXEC`).

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::de::DeserializeOwned;

use crate::frame::{read_frame, FrameError};

/// Most descriptors one `recvmsg` accepts; the daemon sends one per frame.
const MAX_FDS_PER_READ: usize = 4;

/// Sends as much of `bytes` as the socket takes in one `sendmsg`, with `fd` attached.
/// Returns how many bytes went out (the descriptor went with them); the caller writes the
/// rest with plain writes. On a non-blocking socket this may fail with `WouldBlock`.
pub fn send_with_fd(socket: RawFd, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(bytes)];
    sendmsg::<()>(socket, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
}

/// Reads frames from a blocking Unix stream with `recvmsg`, collecting passed descriptors.
pub struct FdFrameReader {
    stream: UnixStream,
    fds: VecDeque<OwnedFd>,
}

impl FdFrameReader {
    pub fn new(stream: UnixStream) -> Self {
        FdFrameReader {
            stream,
            fds: VecDeque::new(),
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Reads exactly one frame and decodes it (with [`read_frame`], the one frame reader),
    /// keeping any descriptors that came with it.
    pub fn read_message<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        read_frame(self)
    }

    /// The oldest descriptor received and not yet taken.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS_PER_READ]);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = recvmsg::<()>(
            self.stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let bytes = msg.bytes;
        for cmsg in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for fd in fds {
                    // SAFETY: the kernel just installed this descriptor in our table for us;
                    // nothing else owns it.
                    self.fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::other(
                "a passed file descriptor was truncated (too many descriptors in one message)",
            ));
        }
        Ok(bytes)
    }
}

/// Bytes as they arrive, descriptors set aside for [`FdFrameReader::take_fd`].
impl io::Read for FdFrameReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode;
    use crate::message::ClientMessage;
    use std::io::{Read, Seek, Write};

    #[test]
    fn a_descriptor_sent_with_a_frame_arrives_with_it_and_is_usable() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"hello through a descriptor").unwrap();
        let frame = encode(&ClientMessage::Ping).unwrap();
        let sent = send_with_fd(a.as_raw_fd(), &frame, std::os::fd::AsFd::as_fd(&file)).unwrap();
        assert_eq!(sent, frame.len());
        // A second frame without a descriptor must not be confused with the first.
        (&a).write_all(&encode(&ClientMessage::Status).unwrap())
            .unwrap();

        let mut reader = FdFrameReader::new(b);
        let first: ClientMessage = reader.read_message().unwrap();
        assert!(matches!(first, ClientMessage::Ping));
        let fd = reader
            .take_fd()
            .expect("descriptor delivered with the first frame");
        let second: ClientMessage = reader.read_message().unwrap();
        assert!(matches!(second, ClientMessage::Status));
        assert!(reader.take_fd().is_none());

        let mut received = std::fs::File::from(fd);
        received.rewind().unwrap();
        let mut text = String::new();
        received.read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello through a descriptor");
    }

    #[test]
    fn a_received_descriptor_is_close_on_exec() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let frame = encode(&ClientMessage::Ping).unwrap();
        send_with_fd(a.as_raw_fd(), &frame, std::os::fd::AsFd::as_fd(&file)).unwrap();
        let mut reader = FdFrameReader::new(b);
        let _: ClientMessage = reader.read_message().unwrap();
        let fd = reader.take_fd().unwrap();
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert!(flags & libc::FD_CLOEXEC != 0);
    }

    #[test]
    fn a_peer_that_hangs_up_mid_frame_is_reported_as_truncated() {
        let (a, b) = UnixStream::pair().unwrap();
        let frame = encode(&ClientMessage::Status).unwrap();
        (&a).write_all(&frame[..frame.len() - 2]).unwrap();
        drop(a);
        let mut reader = FdFrameReader::new(b);
        let err = reader.read_message::<ClientMessage>().unwrap_err();
        assert!(matches!(err, FrameError::Truncated { .. }), "{err}");
    }
}

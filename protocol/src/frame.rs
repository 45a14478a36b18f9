//! Frames: a 4-byte big-endian length, then one MessagePack map of that many bytes.
//!
//! The length is checked against [`MAX_FRAME_LEN`] before anything is allocated, so a peer
//! that announces 4 GiB costs nothing. Maps are written with field names
//! (`rmp_serde::to_vec_named`) so an added optional field never breaks an older peer.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest frame body either side accepts. Image bytes never travel in frames.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// What can go wrong reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes", max = MAX_FRAME_LEN)]
    TooLarge { len: usize },
    #[error("empty frame: a frame holds one MessagePack map")]
    Empty,
    #[error("connection closed in the middle of a frame ({got} of {expected} bytes read)")]
    Truncated { got: usize, expected: usize },
    #[error("connection closed")]
    Closed,
    #[error("malformed message: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
    #[error("cannot encode message: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("i/o error on the socket: {0}")]
    Io(#[from] io::Error),
}

/// Encodes `message` as a complete frame: length prefix and body.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut frame = vec![0u8; HEADER_LEN];
    rmp_serde::encode::write_named(&mut frame, message)?;
    let len = frame.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge { len })?;
    frame[..HEADER_LEN].copy_from_slice(&prefix.to_be_bytes());
    Ok(frame)
}

/// Reads the body length from a frame header, refusing lengths over the limit.
pub fn body_len(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    Ok(len)
}

/// Decodes a frame body (without its length prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(rmp_serde::from_slice(body)?)
}

/// Writes one frame to a blocking writer.
pub fn write_frame<T: Serialize>(writer: &mut impl Write, message: &T) -> Result<(), FrameError> {
    writer.write_all(&encode(message)?)?;
    Ok(())
}

/// Reads one frame from a blocking reader. A clean end of stream before the first byte is
/// [`FrameError::Closed`]; an end of stream inside a frame is [`FrameError::Truncated`].
pub fn read_frame<T: DeserializeOwned>(reader: &mut impl Read) -> Result<T, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(reader, &mut header)?;
    let len = header_read(got, header)?;
    let mut body = vec![0u8; len];
    let got = read_full(reader, &mut body)?;
    body_read(got, &body)
}

/// The body length once `got` bytes of a header were read (fewer than a header: the
/// stream ended there). Every frame reader, blocking or not, goes through this and
/// [`body_read`], so they end frames the same way.
pub fn header_read(got: usize, header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    match got {
        0 => Err(FrameError::Closed),
        got if got < HEADER_LEN => Err(FrameError::Truncated {
            got,
            expected: HEADER_LEN,
        }),
        _ => body_len(header),
    }
}

/// The message once `got` bytes of its `body` were read.
pub fn body_read<T: DeserializeOwned>(got: usize, body: &[u8]) -> Result<T, FrameError> {
    if got < body.len() {
        return Err(FrameError::Truncated {
            got,
            expected: body.len(),
        });
    }
    decode(body)
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ClientMessage, ServerMessage};
    use std::io::Cursor;

    #[test]
    fn a_message_survives_a_round_trip() {
        let frame = encode(&ClientMessage::Ping).unwrap();
        let back: ClientMessage = read_frame(&mut Cursor::new(frame)).unwrap();
        assert!(matches!(back, ClientMessage::Ping));
    }

    #[test]
    fn an_announced_length_over_the_limit_is_refused_before_allocating() {
        let mut bytes = (u32::MAX).to_be_bytes().to_vec();
        bytes.extend_from_slice(b"junk");
        let err = read_frame::<ClientMessage>(&mut Cursor::new(bytes)).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len } if len == u32::MAX as usize));
    }

    #[test]
    fn a_frame_one_byte_over_the_limit_is_refused_and_one_at_the_limit_is_read() {
        let over = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(body_len(over), Err(FrameError::TooLarge { .. })));
        let at = (MAX_FRAME_LEN as u32).to_be_bytes();
        assert_eq!(body_len(at).unwrap(), MAX_FRAME_LEN);
    }

    #[test]
    fn encoding_a_message_larger_than_the_limit_fails() {
        let message = ServerMessage::Log {
            job_id: 1,
            level: crate::message::LogLevel::Info,
            message: "x".repeat(MAX_FRAME_LEN + 10),
        };
        assert!(matches!(encode(&message), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn a_truncated_header_is_reported_as_truncated() {
        let err = read_frame::<ClientMessage>(&mut Cursor::new(vec![0, 0])).unwrap_err();
        assert!(matches!(
            err,
            FrameError::Truncated {
                got: 2,
                expected: 4
            }
        ));
    }

    #[test]
    fn a_truncated_body_is_reported_with_the_byte_counts() {
        let mut frame = encode(&ClientMessage::Status).unwrap();
        let full = frame.len() - HEADER_LEN;
        frame.truncate(frame.len() - 1);
        let err = read_frame::<ClientMessage>(&mut Cursor::new(frame)).unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { got, expected } if got == full - 1 && expected == full)
        );
    }

    #[test]
    fn an_empty_stream_is_a_clean_close() {
        let err = read_frame::<ClientMessage>(&mut Cursor::new(Vec::new())).unwrap_err();
        assert!(matches!(err, FrameError::Closed));
    }

    #[test]
    fn a_zero_length_frame_is_refused() {
        let err = read_frame::<ClientMessage>(&mut Cursor::new(vec![0, 0, 0, 0])).unwrap_err();
        assert!(matches!(err, FrameError::Empty));
    }

    #[test]
    fn garbage_of_a_valid_length_is_malformed() {
        let mut frame = 5u32.to_be_bytes().to_vec();
        frame.extend_from_slice(&[0xc1, 0xff, 0x00, 0x13, 0x37]);
        let err = read_frame::<ClientMessage>(&mut Cursor::new(frame)).unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)));
    }

    #[test]
    fn a_well_formed_map_naming_an_unknown_request_is_malformed_and_says_so() {
        #[derive(serde::Serialize)]
        enum Future {
            #[serde(rename = "teleport")]
            Teleport { to: String },
        }
        let frame = encode(&Future::Teleport { to: "mars".into() }).unwrap();
        let err = read_frame::<ClientMessage>(&mut Cursor::new(frame)).unwrap_err();
        assert!(err.to_string().contains("teleport"), "{err}");
    }

    #[test]
    fn an_unknown_extra_field_is_ignored_so_newer_peers_can_add_fields() {
        #[derive(serde::Serialize)]
        enum Newer {
            #[serde(rename = "clear")]
            Clear {
                model: Option<String>,
                new_flag: bool,
            },
        }
        let frame = encode(&Newer::Clear {
            model: Some("m".into()),
            new_flag: true,
        })
        .unwrap();
        let back: ClientMessage = read_frame(&mut Cursor::new(frame)).unwrap();
        assert!(matches!(back, ClientMessage::Clear { model: Some(m) } if m == "m"));
    }
}

//! Length-prefixed framing for protobuf messages on a byte stream.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of protobuf.
//! The blocking helpers serve workers (plain threads); the agent reads the same
//! frames with tokio through [`decode_len`] and [`prost::Message::decode`].

use std::io::{self, Read, Write};

use prost::Message;

/// Frames larger than this are refused: the channel carries reports, not tensors.
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// Encodes `msg` as one frame.
pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    let len = msg.encoded_len();
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut buf).expect("a Vec grows as needed");
    buf
}

/// Validates a frame header and returns the body length.
pub fn decode_len(header: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit of {MAX_FRAME_BYTES}"),
        ));
    }
    Ok(len)
}

/// Writes one frame and flushes.
pub fn write<M: Message, W: Write>(w: &mut W, msg: &M) -> io::Result<()> {
    w.write_all(&encode(msg))?;
    w.flush()
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub fn read<M: Message + Default, R: Read>(r: &mut R) -> io::Result<Option<M>> {
    let mut header = [0u8; 4];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut body = vec![0u8; decode_len(header)?];
    r.read_exact(&mut body)?;
    M::decode(body.as_slice())
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{Hello, WorkerMessage, worker_message::Kind};

    #[test]
    fn round_trip_and_clean_eof() {
        let msg = WorkerMessage {
            kind: Some(Kind::Hello(Hello {
                local_rank: 3,
                pid: 42,
                ring_addr: "127.0.0.1:9".into(),
            })),
        };
        let mut buf = Vec::new();
        write(&mut buf, &msg).unwrap();
        write(&mut buf, &msg).unwrap();
        let mut r = buf.as_slice();
        assert_eq!(read::<WorkerMessage, _>(&mut r).unwrap(), Some(msg.clone()));
        assert_eq!(read::<WorkerMessage, _>(&mut r).unwrap(), Some(msg));
        assert_eq!(read::<WorkerMessage, _>(&mut r).unwrap(), None);
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(read::<WorkerMessage, _>(&mut r).is_err());
        let mut r: &[u8] = &[0, 0, 0, 10, 1, 2];
        assert!(read::<WorkerMessage, _>(&mut r).is_err());
    }
}

//! The agent <-> worker channel: length-prefixed prost frames read from a
//! byte stream, in both directions (`AgentMessage` to workers,
//! `WorkerMessage` to the agent).
#![no_main]

use kiln_proto::frame;
use kiln_proto::worker::{AgentMessage, WorkerMessage};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    // A stream of frames, read until it ends or fails, as each side does.
    let mut stream = data;
    while let Ok(Some(msg)) = frame::read::<WorkerMessage, _>(&mut stream) {
        // Whatever decodes encodes back into a frame that decodes the same.
        let again = frame::read::<WorkerMessage, _>(&mut frame::encode(&msg).as_slice());
        assert_eq!(again.ok().flatten().as_ref(), Some(&msg));
    }
    let mut stream = data;
    while let Ok(Some(msg)) = frame::read::<AgentMessage, _>(&mut stream) {
        let again = frame::read::<AgentMessage, _>(&mut frame::encode(&msg).as_slice());
        assert_eq!(again.ok().flatten().as_ref(), Some(&msg));
    }
    // The agent's async path: header checked by `decode_len`, body decoded.
    if let Some((header, body)) = data.split_first_chunk::<4>()
        && let Ok(len) = frame::decode_len(*header)
    {
        let body = &body[..len.min(body.len())];
        let _ = WorkerMessage::decode(body);
        let _ = AgentMessage::decode(body);
    }
});

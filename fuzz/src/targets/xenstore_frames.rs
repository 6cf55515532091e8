// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The xenstore stream decoder (`transport_xen::xen::wire::FrameDecoder`): bytes from xenstored arrive in
//! arbitrary pieces and must reassemble into exactly the messages a one-shot model parser finds.
//!
//! Layout: `u8 n`, `n` × `u16` piece lengths (used cyclically; 0 means 1), then the stream.
//!
//! Invariants: the decoder yields the model's frames in order, each re-encoding (`encode_message`) to exactly the
//! bytes it came from; it fails exactly where the model finds a header announcing more than
//! `XENSTORE_PAYLOAD_MAX` bytes, and stays failed (pushing more changes nothing); otherwise it buffers exactly
//! the bytes not yet consumed.

use transport_xen::xen::wire::{
    encode_message, Frame, FrameDecoder, Header, MsgType, HEADER_LEN, XENSTORE_PAYLOAD_MAX,
};

use crate::input::{Reader, Writer};

/// What the model parser finds in a whole stream.
struct Model {
    frames: Vec<(Frame, std::ops::Range<usize>)>,
    oversized: bool,
    consumed: usize,
}

fn model(stream: &[u8]) -> Model {
    let mut frames = Vec::new();
    let mut pos = 0;
    loop {
        let Some(head) = stream.get(pos..pos + HEADER_LEN) else {
            return Model { frames, oversized: false, consumed: pos };
        };
        let word = |i: usize| u32::from_ne_bytes([head[4 * i], head[4 * i + 1], head[4 * i + 2], head[4 * i + 3]]);
        let header = Header { ty: MsgType(word(0)), req_id: word(1), tx_id: word(2), len: word(3) };
        let len = header.len as usize;
        if len > XENSTORE_PAYLOAD_MAX {
            return Model { frames, oversized: true, consumed: pos };
        }
        let end = pos + HEADER_LEN + len;
        let Some(payload) = stream.get(pos + HEADER_LEN..end) else {
            return Model { frames, oversized: false, consumed: pos };
        };
        frames.push((Frame { header, payload: payload.to_vec() }, pos..end));
        pos = end;
    }
}

/// Run one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let n = usize::from(r.u8());
    let cuts: Vec<usize> = (0..n).map(|_| usize::from(r.u16()).max(1)).collect();
    let stream = r.rest();
    let expected = model(stream);

    let mut dec = FrameDecoder::new();
    let mut got: Vec<Frame> = Vec::new();
    let mut failed = false;
    let mut pushed = 0;
    let mut cut = cuts.iter().cycle();
    while pushed < stream.len() {
        let len = cut.next().copied().unwrap_or(stream.len()).min(stream.len() - pushed);
        dec.push(&stream[pushed..pushed + len]);
        pushed += len;
        loop {
            match dec.next_frame() {
                Ok(Some(frame)) => {
                    assert!(!failed, "a frame after the stream failed");
                    got.push(frame);
                }
                Ok(None) => {
                    assert!(!failed, "the decoder recovered from an oversized header");
                    break;
                }
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
    }

    assert_eq!(got.len(), expected.frames.len(), "frame count differs from the model");
    for (frame, (want, range)) in got.iter().zip(&expected.frames) {
        assert_eq!(frame, want);
        assert_eq!(frame.payload.len(), frame.header.len as usize);
        assert!(frame.payload.len() <= XENSTORE_PAYLOAD_MAX);
        assert_eq!(Header::decode(&frame.header.encode()), frame.header);
        let h = frame.header;
        assert_eq!(encode_message(h.ty, h.req_id, h.tx_id, &frame.payload), &stream[range.clone()]);
    }
    assert_eq!(failed, expected.oversized, "decoder and model disagree on the stream's validity");
    if failed {
        let before = dec.buffered();
        dec.push(&[0; HEADER_LEN]);
        assert!(dec.next_frame().is_err(), "a poisoned decoder must stay poisoned");
        assert_eq!(dec.buffered(), before, "a poisoned decoder must not buffer");
    } else {
        assert_eq!(dec.buffered(), stream.len() - expected.consumed);
    }
}

fn input(cuts: &[u16], stream: &[u8]) -> Vec<u8> {
    let mut w = Writer::new();
    w.u8(cuts.len() as u8);
    for &c in cuts {
        w.u16(c);
    }
    w.bytes(stream);
    w.finish()
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut stream = encode_message(MsgType::READ, 1, 0, b"4");
    stream.extend(encode_message(MsgType::WATCH_EVENT, 0, 0, b"/local/domain/7/device/vbd/51712\0fe\0"));
    stream.extend(encode_message(MsgType::ERROR, 2, 0, b"ENOENT\0"));
    stream.extend(encode_message(MsgType::DIRECTORY, 3, 5, b"51712\x0051728\0"));
    stream.extend(encode_message(MsgType::TRANSACTION_START, 4, 0, b"17\0"));
    let mut oversized = encode_message(MsgType::READ, 5, 0, b"x");
    oversized[12..16].copy_from_slice(&(XENSTORE_PAYLOAD_MAX as u32 + 1).to_ne_bytes());
    let big = encode_message(MsgType::READ, 6, 0, &[b'v'; XENSTORE_PAYLOAD_MAX]);
    vec![
        input(&[], &stream),
        input(&[1], &stream[..40]),
        input(&[3, 16, 7], &stream),
        input(&[16], &[&stream[..20], &oversized[..]].concat()),
        input(&[100, 4000], &big),
        input(&[5], &stream[..stream.len() - 3]),
    ]
}

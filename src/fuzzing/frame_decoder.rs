//! The `frame_decoder` target: a byte stream in arbitrary chunks through `FrameDecoder`.

use super::{Input, XorShift};
use crate::error::reply_code;
use crate::protocol::frame::{
    FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, FRAME_MIN_SIZE,
    FRAME_OVERHEAD, FrameDecoder, FrameError, READ_CHUNK,
};

/// The frames of `stream` decoded in one go by a straightforward reading of the spec,
/// the error (if any) that stops decoding, and how many bytes are left undecoded.
/// A frame: type, channel, payload.
type RefFrame<'a> = (u8, u16, &'a [u8]);

fn reference_frames(stream: &[u8], frame_max: u32) -> (Vec<RefFrame<'_>>, Option<u16>, usize) {
    let mut frames = Vec::new();
    let mut rest = stream;
    loop {
        if rest.len() < 7 {
            return (frames, None, rest.len());
        }
        let kind = rest[0];
        let channel = u16::from_be_bytes([rest[1], rest[2]]);
        let size = u32::from_be_bytes([rest[3], rest[4], rest[5], rest[6]]) as u64;
        let known = matches!(kind, FRAME_METHOD | FRAME_HEADER | FRAME_BODY)
            || (kind == FRAME_HEARTBEAT && channel == 0 && size == 0);
        if !known || size + FRAME_OVERHEAD as u64 > u64::from(frame_max) {
            return (frames, Some(reply_code::FRAME_ERROR), rest.len());
        }
        let total = size as usize + FRAME_OVERHEAD;
        if rest.len() < total {
            return (frames, None, rest.len());
        }
        if rest[total - 1] != FRAME_END {
            return (frames, Some(reply_code::FRAME_ERROR), rest.len());
        }
        frames.push((kind, channel, &rest[7..total - 1]));
        rest = &rest[total..];
    }
}

/// Harness: a byte stream cut into arbitrary chunks and fed to [`FrameDecoder`] the way
/// the reactor does (`read_buf`, `filled`, then every whole frame).
///
/// Input: a frame_max selector, an 8-byte seed for the chunk sizes, then the stream.
/// Checks: the frames and the error equal those of decoding the whole stream at once;
/// every frame respects frame_max; the decoder's buffer never exceeds frame_max plus one
/// read chunk; `read_buf` always offers room.
pub fn frame_decoder(data: &[u8]) {
    let mut inp = Input::new(data);
    let frame_max = match inp.u8() % 4 {
        0 => FRAME_MIN_SIZE,
        1 => FRAME_MIN_SIZE + u32::from(inp.u16()),
        2 => 131_072,
        _ => 1 << 20,
    };
    let mut rng = XorShift::new(inp.u64());
    let stream = inp.rest();
    let (want_frames, want_err, want_left) = reference_frames(stream, frame_max);

    let bound = frame_max as usize + READ_CHUNK;
    let mut dec = FrameDecoder::new(frame_max);
    let mut got = 0usize;
    let mut pos = 0usize;
    let mut err: Option<FrameError> = None;
    'feed: while pos < stream.len() {
        let chunk = match rng.below(4) {
            0 => 1 + rng.below(8),
            1 => 1 + rng.below(300),
            2 => 1 + rng.below(70_000),
            _ => stream.len() as u64,
        } as usize;
        let buf = dec.read_buf();
        assert!(!buf.is_empty(), "read_buf offers no room");
        let n = buf.len().min(chunk).min(stream.len() - pos);
        buf[..n].copy_from_slice(&stream[pos..pos + n]);
        dec.filled(n);
        pos += n;
        assert!(
            dec.capacity() <= bound,
            "decoder buffer {} > frame_max {frame_max} + read chunk",
            dec.capacity()
        );
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    assert!(f.payload.len() + FRAME_OVERHEAD <= frame_max as usize);
                    let (kind, channel, payload) = want_frames
                        .get(got)
                        .copied()
                        .expect("incremental decoder returned an extra frame");
                    assert_eq!((f.kind, f.channel), (kind, channel));
                    assert_eq!(f.payload, payload);
                    got += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    err = Some(e);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(got, want_frames.len(), "frames missed");
    assert_eq!(err.as_ref().map(|e| e.code), want_err, "{err:?}");
    if let Some(e) = &err {
        assert!(!e.text.is_empty());
    } else {
        assert_eq!(dec.buffered(), want_left);
        assert_eq!(dec.pending().len(), want_left);
    }
    assert!(dec.capacity() <= bound);
}

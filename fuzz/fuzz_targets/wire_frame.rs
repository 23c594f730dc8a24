//! The pool's frame decoder as a pool or client meets it: a header, then a control payload
//! decoded as a request and as a response, and a stream of frames read back to back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use torpor_image::wire::{
    decode_control, read_frame, Frame, FrameHeader, Request, Response, HEADER_LEN,
};

fuzz_target!(|data: &[u8]| {
    if let Some(h) = data.first_chunk::<HEADER_LEN>() {
        if let Ok(header) = FrameHeader::decode(h) {
            // What decode accepted re-encodes to the same bytes, reserved bytes aside.
            let again = header.encode();
            assert_eq!(again[..6], h[..6]);
            assert_eq!(again[8..], h[8..]);
        }
    }
    let _ = decode_control::<Request>(data);
    let _ = decode_control::<Response>(data);
    let mut r = data;
    let mut buf = Vec::new();
    while let Ok(frame) = read_frame(&mut r, &mut buf) {
        if let Frame::Control(p) = frame {
            let _ = decode_control::<Request>(p);
        }
    }
});

//! What torpor parses of CRIU's images and protocol: the `stats-dump` image and the image
//! streamer's length-prefixed requests.
#![no_main]

use libfuzzer_sys::fuzz_target;
use torpor_criu::{stats::parse_dump_stats, streamer::read_request};

fuzz_target!(|data: &[u8]| {
    let _ = parse_dump_stats(data);
    let mut r = data;
    while let Ok(Some(_)) = read_request(&mut r) {}
});

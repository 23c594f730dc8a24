//! A manifest from an untrusted peer: JSON, then validate; a valid one round-trips and its
//! sizes and offsets are computable without overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use torpor_image::{snapfile, Manifest};

fuzz_target!(|data: &[u8]| {
    let Ok(m) = serde_json::from_slice::<Manifest>(data) else {
        return;
    };
    if m.validate().is_err() {
        return;
    }
    let total = m.total_bytes();
    let offsets = snapfile::file_offsets(&m, snapfile::SNAPFILE_HEADER_LEN);
    assert_eq!(offsets.len(), m.files.len());
    assert!(offsets
        .iter()
        .all(|&o| o <= snapfile::SNAPFILE_HEADER_LEN + total));
    let back: Manifest = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
    assert_eq!(back, m);
});

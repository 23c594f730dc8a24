//! A spilled snapshot file's header and manifest, as the pool reads them at start-up: the
//! input as a whole file (with its own length and with a length taken from the input), and
//! the input as the manifest behind a well-formed header, so the fuzzer gets past the checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use torpor_image::snapfile::{decode_prefix, encode_prefix, SNAPFILE_MAGIC, SNAPFILE_VERSION};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = decode_prefix(&mut &data[..], data.len() as u64) {
        // What was accepted encodes back to a prefix of the same length.
        assert_eq!(encode_prefix(&p.manifest).len() as u64, p.data_offset);
    }
    if let Some((len, rest)) = data.split_first_chunk::<8>() {
        let _ = decode_prefix(&mut &rest[..], u64::from_le_bytes(*len));
    }
    let mut file = SNAPFILE_MAGIC.to_vec();
    file.extend(SNAPFILE_VERSION.to_le_bytes());
    file.extend((data.len() as u32).to_le_bytes());
    file.extend(crc32c::crc32c(data).to_le_bytes());
    file.extend(0u32.to_le_bytes());
    file.extend(data);
    if let Ok(p) = decode_prefix(&mut &file[..], file.len() as u64) {
        // Only a manifest of empty files fits a file with no data after it.
        assert_eq!(p.manifest.total_bytes(), 0);
    }
});

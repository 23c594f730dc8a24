//! CRC32C arithmetic the `crc32c` crate makes slow: combining the CRCs of two adjacent pieces
//! into the CRC of both. `crc32c::crc32c_combine` costs about as much as checksumming the
//! second piece again (15–45 µs for 4 KiB–1 MiB here), which would undo the point of keeping
//! per-block checksums; this one multiplies by x^(8·len) modulo the polynomial (zlib's
//! method), well under a microsecond whatever the length; and a [`Shift`] for one fixed
//! length (a block) takes a few table lookups.

/// The CRC32C (Castagnoli) polynomial, bit-reflected.
const POLY: u32 = 0x82F6_3B78;

/// `a · b` modulo the polynomial, both reflected (bit 31 is x^0).
const fn multmodp(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0u32;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                break;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        if m == 0 {
            break;
        }
    }
    p
}

/// x^(2^k) modulo the polynomial, for k in 0..32 (enough for any length below 2^29 bytes;
/// `x2nmodp` wraps `k` past that as zlib does).
const X2N: [u32; 32] = {
    let mut t = [0u32; 32];
    let mut p = 1u32 << 30; // x^1
    let mut k = 0;
    while k < 32 {
        t[k] = p;
        p = multmodp(p, p);
        k += 1;
    }
    t
};

/// x^(n · 2^k) modulo the polynomial.
const fn x2nmodp(mut n: u64, mut k: usize) -> u32 {
    let mut p = 1u32 << 31; // x^0
    while n != 0 {
        if n & 1 != 0 {
            p = multmodp(X2N[k & 31], p);
        }
        n >>= 1;
        k += 1;
    }
    p
}

/// The CRC32C of `a ++ b` from `crc_a`, `crc_b` and the length of `b`.
pub fn combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    if crc_a == 0 {
        // The shifted part is zero: the common case of a first piece costs nothing.
        return crc_b;
    }
    multmodp(x2nmodp(len_b as u64, 3), crc_a) ^ crc_b
}

/// [`combine`] for a second piece of one fixed length, as tables: the shift of the first
/// CRC is linear in its bits, so it is the XOR of one table entry per byte.
#[derive(Debug)]
pub struct Shift {
    tables: [[u32; 256]; 4],
}

impl Shift {
    /// The shift past `len` bytes (computed at compile time for a constant).
    pub const fn new(len: usize) -> Shift {
        let x = x2nmodp(len as u64, 3);
        let mut tables = [[0u32; 256]; 4];
        let mut i = 0;
        while i < 4 {
            let mut v = 0;
            while v < 256 {
                tables[i][v] = multmodp(x, (v as u32) << (8 * i));
                v += 1;
            }
            i += 1;
        }
        Shift { tables }
    }

    /// The CRC32C of `a ++ b` when `b` is this shift's length long.
    pub fn combine(&self, crc_a: u32, crc_b: u32) -> u32 {
        let [t0, t1, t2, t3] = &self.tables;
        let [b0, b1, b2, b3] = crc_a.to_le_bytes();
        t0[b0 as usize] ^ t1[b1 as usize] ^ t2[b2 as usize] ^ t3[b3 as usize] ^ crc_b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_matches_checksumming_the_concatenation() {
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for (split, end) in [
            (0, 0),
            (0, 1),
            (1, 1),
            (3, 4),
            (100, 4196),
            (4096, 65536 + 4096),
            (1, 200_000),
            (199_999, 200_000),
        ] {
            let (a, b) = bytes[..end].split_at(split);
            let whole = crc32c::crc32c(&bytes[..end]);
            let ours = combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len());
            assert_eq!(ours, whole, "split {split} of {end}");
            assert_eq!(
                ours,
                crc32c::crc32c_combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len())
            );
        }
    }

    #[test]
    fn a_fixed_shift_matches_the_general_combine() {
        const SHIFT: Shift = Shift::new(4096);
        let bytes: Vec<u8> = (0..3 * 4096u32).map(|i| (i * 13 + i / 97) as u8).collect();
        for split in [0, 1, 5000, 8192] {
            let (a, b) = bytes[..split + 4096].split_at(split);
            let whole = crc32c::crc32c(&bytes[..split + 4096]);
            assert_eq!(
                SHIFT.combine(crc32c::crc32c(a), crc32c::crc32c(b)),
                whole,
                "{split}"
            );
        }
    }
}

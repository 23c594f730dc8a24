//! The sk_lookup program, written as eBPF instructions (no compiler needed at build or run
//! time). In C it would read:
//!
//! ```c
//! if (ctx->family != AF_INET || ctx->protocol != IPPROTO_TCP
//!     || ctx->local_ip4 != PUBLIC_IP || ctx->local_port != PUBLIC_PORT)
//!         return SK_PASS;
//! sk = bpf_map_lookup_elem(&sockets, &zero);
//! if (!sk)
//!         return SK_PASS;                       /* asleep or waking: the gate's listener */
//! if (bpf_sk_assign(ctx, sk, 0) == 0)
//!         __sync_fetch_and_add(bpf_map_lookup_elem(&counters, &zero), 1);
//! bpf_sk_release(sk);
//! return SK_PASS;
//! ```
//!
//! Every path passes: a connection the program does not take goes to whatever listens on the
//! address (the gate), exactly as without the program.

use std::net::SocketAddrV4;

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            regs: (src << 4) | (dst & 0x0f),
            off,
            imm,
        }
    }
}

// Opcodes (class | size/op | mode/source), from linux/bpf.h and bpf_common.h.
const MOV64_REG: u8 = 0x07 | 0xb0 | 0x08;
const MOV64_IMM: u8 = 0x07 | 0xb0;
const ADD64_IMM: u8 = 0x07;
const LDX_W: u8 = 0x01 | 0x60;
const ST_W: u8 = 0x02 | 0x60;
const LD_IMM64: u8 = 0x18;
const JNE32_IMM: u8 = 0x06 | 0x50;
const JEQ64_IMM: u8 = 0x05 | 0x10;
const JNE64_IMM: u8 = 0x05 | 0x50;
const ATOMIC_ADD_DW: u8 = 0x03 | 0x18 | 0xc0;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
/// `src_reg` of a 64-bit immediate load that names a map by file descriptor.
const PSEUDO_MAP_FD: u8 = 1;

const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_SK_RELEASE: i32 = 86;
const HELPER_SK_ASSIGN: i32 = 124;

// Offsets in `struct bpf_sk_lookup`.
const CTX_FAMILY: i16 = 8;
const CTX_PROTOCOL: i16 = 12;
const CTX_LOCAL_IP4: i16 = 40;
const CTX_LOCAL_PORT: i16 = 60;

const AF_INET: i32 = 2;
const IPPROTO_TCP: i32 = 6;
const SK_PASS: i32 = 1;

/// Relative jump offsets are counted from the next instruction; `PASS` is patched in after
/// assembly.
const PASS: i16 = i16::MIN;

/// The program that steers TCP connections for `public` to the socket in slot 0 of the
/// SOCKMAP `sockets`, counting each one in slot 0 of the u64 array `counters`.
pub fn sk_lookup(public: SocketAddrV4, sockets: i32, counters: i32) -> Vec<Insn> {
    let ip = i32::from_ne_bytes(public.ip().octets());
    let port = i32::from(public.port());
    let mut p = vec![
        Insn::new(MOV64_REG, 6, 1, 0, 0), // r6 = ctx
        Insn::new(LDX_W, 2, 6, CTX_FAMILY, 0),
        Insn::new(JNE32_IMM, 2, 0, PASS, AF_INET),
        Insn::new(LDX_W, 2, 6, CTX_PROTOCOL, 0),
        Insn::new(JNE32_IMM, 2, 0, PASS, IPPROTO_TCP),
        Insn::new(LDX_W, 2, 6, CTX_LOCAL_IP4, 0),
        Insn::new(JNE32_IMM, 2, 0, PASS, ip),
        Insn::new(LDX_W, 2, 6, CTX_LOCAL_PORT, 0),
        Insn::new(JNE32_IMM, 2, 0, PASS, port),
        // key 0 on the stack
        Insn::new(ST_W, 10, 0, -4, 0),
        Insn::new(LD_IMM64, 1, PSEUDO_MAP_FD, 0, sockets),
        Insn::new(0, 0, 0, 0, 0),
        Insn::new(MOV64_REG, 2, 10, 0, 0),
        Insn::new(ADD64_IMM, 2, 0, 0, -4),
        Insn::new(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
        Insn::new(JEQ64_IMM, 0, 0, PASS, 0),
        Insn::new(MOV64_REG, 7, 0, 0, 0), // r7 = sk
        Insn::new(MOV64_REG, 1, 6, 0, 0),
        Insn::new(MOV64_REG, 2, 7, 0, 0),
        Insn::new(MOV64_IMM, 3, 0, 0, 0),
        Insn::new(CALL, 0, 0, 0, HELPER_SK_ASSIGN),
        Insn::new(MOV64_REG, 8, 0, 0, 0), // r8 = assign's result
        Insn::new(MOV64_REG, 1, 7, 0, 0),
        Insn::new(CALL, 0, 0, 0, HELPER_SK_RELEASE),
        Insn::new(JNE64_IMM, 8, 0, PASS, 0),
        Insn::new(LD_IMM64, 1, PSEUDO_MAP_FD, 0, counters),
        Insn::new(0, 0, 0, 0, 0),
        Insn::new(MOV64_REG, 2, 10, 0, 0),
        Insn::new(ADD64_IMM, 2, 0, 0, -4),
        Insn::new(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
        Insn::new(JEQ64_IMM, 0, 0, PASS, 0),
        Insn::new(MOV64_IMM, 1, 0, 0, 1),
        Insn::new(ATOMIC_ADD_DW, 0, 1, 0, 0),
    ];
    let pass = p.len();
    p.push(Insn::new(MOV64_IMM, 0, 0, 0, SK_PASS));
    p.push(Insn::new(EXIT, 0, 0, 0, 0));
    for (i, insn) in p.iter_mut().enumerate() {
        if insn.off == PASS {
            insn.off = (pass - i - 1) as i16;
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_on_the_pass_exit() {
        let p = sk_lookup("127.0.0.1:8080".parse().unwrap(), 3, 4);
        let pass = p.len() - 2;
        let jumps: Vec<usize> = p
            .iter()
            .enumerate()
            .filter(|(_, i)| matches!(i.code, JNE32_IMM | JEQ64_IMM | JNE64_IMM))
            .map(|(n, i)| (n as i64 + 1 + i64::from(i.off)) as usize)
            .collect();
        assert_eq!(jumps.len(), 7);
        assert!(jumps.iter().all(|&t| t == pass));
        assert_eq!(p[pass], Insn::new(MOV64_IMM, 0, 0, 0, SK_PASS));
        assert_eq!(p[pass + 1].code, EXIT);
    }

    #[test]
    fn the_address_is_compared_as_the_kernel_stores_it() {
        let p = sk_lookup("10.1.2.3:443".parse().unwrap(), 3, 4);
        // local_ip4 in network byte order as read into a register, local_port in host order.
        assert_eq!(p[6].imm, i32::from_ne_bytes([10, 1, 2, 3]));
        assert_eq!(p[8].imm, 443);
        // The map loads name the maps' descriptors.
        assert_eq!((p[10].imm, p[10].regs >> 4), (3, PSEUDO_MAP_FD));
        assert_eq!(p[25].imm, 4);
    }
}

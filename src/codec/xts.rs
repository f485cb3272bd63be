//! AES-256-XTS over 4 KiB blocks, with the write's sequence in the tweak.
//!
//! XTS (IEEE 1619, NIST SP 800-38E) encrypts each 16-byte block `j` of a
//! data unit as `C = E_K1(P ⊕ T_j) ⊕ T_j`, where `T_0 = E_K2(tweak)` and
//! `T_{j+1} = T_j · α` in GF(2^128). Our data unit is a 4 KiB sector (256
//! blocks, so ciphertext stealing never happens) and the 128-bit tweak is
//!
//! ```text
//! bytes 0..8   unit number  (little-endian u64)
//! bytes 8..16  version      (little-endian u64)
//! ```
//!
//! The volume (`volume::v2`) gives a data block its address and the
//! sequence of the write that made it, and a segment's metadata block
//! `(1 << 63) | slot` and the segment id (docs/formats.md, "the XTS
//! tweak"). A sequence is never reused, so rewriting a block never reuses a
//! tweak: a peer that keeps an old segment cannot compare it with the new
//! one block by block. With version 0 this is exactly the standard tweak
//! (the data unit sequence number as a little-endian 128-bit integer),
//! which is what the IEEE 1619 known-answer tests below check.
//!
//! Speed: the `xts-mode` crate encrypts one 16-byte block per cipher call,
//! which keeps the AES unit idle between blocks (about 1 GiB/s here). This
//! module computes a whole sector's tweaks first, then hands all 256 blocks
//! to `aes`'s `encrypt_blocks`, which pipelines them through AES-NI (about
//! 5.8 GiB/s per core in a default release build, with run-time CPU feature
//! detection, no `target-cpu` flags). `xts-mode` stays as a test oracle.

use aes::Aes256;
use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

use super::key::VolumeKey;

/// The unit of encryption: one sector.
pub const SECTOR_SIZE: usize = 4096;

const BLOCK: usize = 16;
const SECTOR_BLOCKS: usize = SECTOR_SIZE / BLOCK;

/// How many sectors' initial tweaks are encrypted in one batch.
const TWEAK_BATCH: usize = 64;

/// How many sectors go through the block cipher in one call (16 KiB: the
/// cipher's per-call set-up is paid once, and the data stays in L1/L2).
const AES_GROUP: usize = 4;

/// The 128-bit XTS tweak of data unit `sector` at `generation` (the
/// volume passes a block address and a sequence, or a metadata slot and a
/// segment id).
pub fn tweak(sector: u64, generation: u64) -> u128 {
    u128::from(sector) | (u128::from(generation) << 64)
}

/// Multiplication by α (x) in GF(2^128) with XTS's little-endian
/// convention: a left shift of the 128-bit little-endian value, folding the
/// carry back in with x^7 + x^2 + x + 1 (0x87).
#[inline(always)]
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

#[derive(Clone, Copy)]
enum Direction {
    Encrypt,
    Decrypt,
}

/// Which tweak-and-XOR code runs, chosen once from the CPU's features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// Plain Rust; any CPU.
    Portable,
    /// Four tweaks per 512-bit register.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// Two tweaks per 256-bit register.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }
}

/// Encrypts and decrypts sectors with one volume key. Cheap to clone;
/// `Send + Sync`, so one instance can serve every thread.
#[derive(Clone)]
pub struct SectorCipher {
    data: Aes256,
    tweak: Aes256,
    kernel: Kernel,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SectorCipher(<key redacted>, {:?})", self.kernel)
    }
}

impl SectorCipher {
    pub fn new(key: &VolumeKey) -> Self {
        Self::from_halves(key.data_key(), key.tweak_key())
    }

    fn from_halves(data: &[u8; 32], tweak: &[u8; 32]) -> Self {
        Self {
            data: Aes256::new_from_slice(data).expect("AES-256 takes 32-byte keys"),
            tweak: Aes256::new_from_slice(tweak).expect("AES-256 takes 32-byte keys"),
            kernel: Kernel::detect(),
        }
    }

    /// Encrypts whole sectors from `plain` into `out`; the first sector is
    /// number `first_sector`, the next `first_sector + 1`, and so on.
    ///
    /// # Panics
    /// If the lengths differ or are not a multiple of [`SECTOR_SIZE`], or if
    /// the sector numbers would pass `u64::MAX` (callers check the range:
    /// a volume's blocks are numbered far below it).
    pub fn encrypt(&self, first_sector: u64, generation: u64, plain: &[u8], out: &mut [u8]) {
        self.sectors(Direction::Encrypt, first_sector, generation, Some(plain), out);
    }

    /// Decrypts whole sectors from `cipher` into `out`. See [`Self::encrypt`].
    pub fn decrypt(&self, first_sector: u64, generation: u64, cipher: &[u8], out: &mut [u8]) {
        self.sectors(Direction::Decrypt, first_sector, generation, Some(cipher), out);
    }

    /// Encrypts whole sectors in place.
    pub fn encrypt_in_place(&self, first_sector: u64, generation: u64, buf: &mut [u8]) {
        self.sectors(Direction::Encrypt, first_sector, generation, None, buf);
    }

    /// Decrypts whole sectors in place.
    pub fn decrypt_in_place(&self, first_sector: u64, generation: u64, buf: &mut [u8]) {
        self.sectors(Direction::Decrypt, first_sector, generation, None, buf);
    }

    fn sectors(&self, dir: Direction, first: u64, generation: u64, src: Option<&[u8]>, dst: &mut [u8]) {
        assert!(
            dst.len().is_multiple_of(SECTOR_SIZE),
            "{} bytes is not a whole number of sectors",
            dst.len()
        );
        if let Some(src) = src {
            assert_eq!(src.len(), dst.len(), "source and destination lengths differ");
        }
        let count = (dst.len() / SECTOR_SIZE) as u64;
        assert!(first.checked_add(count).is_some(), "sector numbers overflow");

        let mut t0 = [Array::<u8, _>::default(); TWEAK_BATCH];
        let mut tweaks = [const { Tweaks([0u128; SECTOR_BLOCKS]) }; AES_GROUP];
        for (batch, chunk) in dst.chunks_mut(TWEAK_BATCH * SECTOR_SIZE).enumerate() {
            let base = first + (batch * TWEAK_BATCH) as u64;
            let n = chunk.len() / SECTOR_SIZE;
            for (i, t) in t0[..n].iter_mut().enumerate() {
                *t = Array::from(tweak(base + i as u64, generation).to_le_bytes());
            }
            self.tweak.encrypt_blocks(&mut t0[..n]);
            for (g, group) in chunk.chunks_mut(AES_GROUP * SECTOR_SIZE).enumerate() {
                for (i, sector) in group.chunks_exact_mut(SECTOR_SIZE).enumerate() {
                    let index = g * AES_GROUP + i;
                    let t = u128::from_le_bytes(t0[index].into());
                    let offset = (batch * TWEAK_BATCH + index) * SECTOR_SIZE;
                    let src = src.map(|s| &s[offset..offset + SECTOR_SIZE]);
                    self.whiten_in(t, src, sector, &mut tweaks[i]);
                }
                let (blocks, rest) = Array::slice_as_chunks_mut(&mut *group);
                debug_assert!(rest.is_empty());
                match dir {
                    Direction::Encrypt => self.data.encrypt_blocks(blocks),
                    Direction::Decrypt => self.data.decrypt_blocks(blocks),
                }
                for (sector, tweaks) in group.chunks_exact_mut(SECTOR_SIZE).zip(&tweaks) {
                    self.whiten_out(sector, tweaks);
                }
            }
        }
    }

    /// Computes a sector's tweaks from its encrypted initial tweak `t` and
    /// XORs them into the sector (from `src` when given).
    #[inline]
    fn whiten_in(&self, t: u128, src: Option<&[u8]>, dst: &mut [u8], tweaks: &mut Tweaks) {
        debug_assert_eq!(dst.len(), SECTOR_SIZE);
        match self.kernel {
            Kernel::Portable => portable::whiten_in(t, src, dst, tweaks),
            // SAFETY: Kernel::Avx512 is chosen only when the CPU reports avx512f.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::whiten_in_avx512(t, src, dst, tweaks) },
            // SAFETY: Kernel::Avx2 is chosen only when the CPU reports avx2.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::whiten_in_avx2(t, src, dst, tweaks) },
        }
    }

    /// XORs a sector's tweaks into it again after the block cipher.
    #[inline]
    fn whiten_out(&self, dst: &mut [u8], tweaks: &Tweaks) {
        match self.kernel {
            Kernel::Portable => portable::whiten_out(dst, tweaks),
            // SAFETY: as in `whiten_in`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::whiten_out_avx512(dst, tweaks) },
            // SAFETY: as in `whiten_in`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::whiten_out_avx2(dst, tweaks) },
        }
    }

    /// Encrypts or decrypts one data unit of any whole number of blocks
    /// (at most 256) with a raw 128-bit tweak: the IEEE 1619 vectors use
    /// 512-byte units.
    #[cfg(test)]
    fn unit(&self, dir: Direction, raw_tweak: u128, buf: &mut [u8]) {
        let mut t = Array::from(raw_tweak.to_le_bytes());
        self.tweak.encrypt_block(&mut t);
        let mut t = u128::from_le_bytes(t.into());
        let mut tweaks = [0u128; SECTOR_BLOCKS];
        let tweaks = &mut tweaks[..buf.len() / BLOCK];
        for slot in tweaks.iter_mut() {
            *slot = t;
            t = mul_alpha(t);
        }
        for (b, t) in buf.chunks_exact_mut(BLOCK).zip(tweaks.iter()) {
            let v = u128::from_le_bytes((&*b).try_into().expect("16 bytes")) ^ t;
            b.copy_from_slice(&v.to_le_bytes());
        }
        let (blocks, _) = Array::slice_as_chunks_mut(&mut *buf);
        match dir {
            Direction::Encrypt => self.data.encrypt_blocks(blocks),
            Direction::Decrypt => self.data.decrypt_blocks(blocks),
        }
        for (b, t) in buf.chunks_exact_mut(BLOCK).zip(tweaks.iter()) {
            let v = u128::from_le_bytes((&*b).try_into().expect("16 bytes")) ^ t;
            b.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// A sector's 256 tweaks, kept between the two whitening passes.
#[repr(C, align(64))]
struct Tweaks([u128; SECTOR_BLOCKS]);

/// `t · α^64`: a 64-bit shift with the 64 overflowing bits folded back in
/// (their product with 0x87 has at most 71 bits, so one fold suffices).
#[inline(always)]
fn mul_alpha64(t: u128) -> u128 {
    let h = t >> 64;
    (t << 64) ^ h ^ (h << 1) ^ (h << 2) ^ (h << 7)
}

/// Computing 256 tweaks one α at a time is a chain of dependent steps
/// that leaves the CPU waiting; the sector's four quarters start from
/// `T_0`, `T_0·α^64`, `T_0·α^128` and `T_0·α^192` and run as four
/// independent chains instead.
mod portable {
    use super::{BLOCK, SECTOR_BLOCKS, Tweaks, mul_alpha, mul_alpha64};

    pub(super) fn whiten_in(t0: u128, src: Option<&[u8]>, dst: &mut [u8], tweaks: &mut Tweaks) {
        let q = SECTOR_BLOCKS / 4;
        let mut t = [t0, mul_alpha64(t0), 0, 0];
        t[2] = mul_alpha64(t[1]);
        t[3] = mul_alpha64(t[2]);
        for j in 0..q {
            for (c, tc) in t.iter_mut().enumerate() {
                tweaks.0[c * q + j] = *tc;
                *tc = mul_alpha(*tc);
            }
        }
        match src {
            Some(src) => {
                for ((d, s), t) in dst.chunks_exact_mut(BLOCK).zip(src.chunks_exact(BLOCK)).zip(&tweaks.0) {
                    let v = u128::from_le_bytes(s.try_into().expect("16 bytes")) ^ t;
                    d.copy_from_slice(&v.to_le_bytes());
                }
            }
            None => whiten_out(dst, tweaks),
        }
    }

    pub(super) fn whiten_out(dst: &mut [u8], tweaks: &Tweaks) {
        for (d, t) in dst.chunks_exact_mut(BLOCK).zip(&tweaks.0) {
            let v = u128::from_le_bytes((&*d).try_into().expect("16 bytes")) ^ t;
            d.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// The same work with several tweaks per vector register: lane `l` of a
/// register holds the tweak of block `i + l`, and one step multiplies every
/// lane by α^L (L = lanes): each 64-bit half shifts left by L, the low
/// half takes the fold of the high half's top L bits (`b ⊕ b≪1 ⊕ b≪2 ⊕
/// b≪7`, the product with 0x87), the high half takes the low half's top L
/// bits. Tweaks are little-endian 128-bit values, as in memory.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{SECTOR_SIZE, Tweaks, mul_alpha, mul_alpha64};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512F; `dst` (and `src`) must be one sector.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn whiten_in_avx512(t0: u128, src: Option<&[u8]>, dst: &mut [u8], tweaks: &mut Tweaks) {
        assert!(dst.len() == SECTOR_SIZE && src.is_none_or(|s| s.len() == SECTOR_SIZE));
        // Four chains, one per quarter of the sector, each four lanes wide.
        let mut lanes = [0u128; 16];
        let mut q = t0;
        for chain in lanes.chunks_exact_mut(4) {
            chain[0] = q;
            for l in 1..4 {
                chain[l] = mul_alpha(chain[l - 1]);
            }
            q = mul_alpha64(q);
        }
        const QUARTER: usize = SECTOR_SIZE / 64 / 4; // 512-bit vectors per quarter
        // SAFETY: every pointer below stays inside `lanes`, `tweaks.0`,
        // `src` or `dst`, each at least SECTOR_SIZE bytes (asserted; tweaks
        // are 64-byte aligned); data loads and stores are unaligned.
        unsafe {
            let lp = lanes.as_ptr().cast::<__m512i>();
            let mut t = [
                _mm512_loadu_si512(lp),
                _mm512_loadu_si512(lp.add(1)),
                _mm512_loadu_si512(lp.add(2)),
                _mm512_loadu_si512(lp.add(3)),
            ];
            let lo_half = _mm512_set_epi64(0, -1, 0, -1, 0, -1, 0, -1);
            let tp = tweaks.0.as_mut_ptr().cast::<__m512i>();
            let dp = dst.as_mut_ptr().cast::<__m512i>();
            let sp = src.map_or(dp.cast_const(), |s| s.as_ptr().cast::<__m512i>());
            for i in 0..QUARTER {
                for (c, tc) in t.iter_mut().enumerate() {
                    let at = c * QUARTER + i;
                    _mm512_store_si512(tp.add(at), *tc);
                    let top = _mm512_shuffle_epi32(_mm512_srli_epi64(*tc, 60), _MM_PERM_BADC);
                    let fold = _mm512_xor_si512(
                        _mm512_xor_si512(_mm512_slli_epi64(top, 1), _mm512_slli_epi64(top, 2)),
                        _mm512_slli_epi64(top, 7),
                    );
                    let carry = _mm512_xor_si512(top, _mm512_and_si512(fold, lo_half));
                    *tc = _mm512_xor_si512(_mm512_slli_epi64(*tc, 4), carry);
                }
            }
            // Then one sequential pass over the data.
            for at in 0..SECTOR_SIZE / 64 {
                _mm512_storeu_si512(
                    dp.add(at),
                    _mm512_xor_si512(_mm512_loadu_si512(sp.add(at)), _mm512_load_si512(tp.add(at))),
                );
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX-512F; `dst` must be one sector.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn whiten_out_avx512(dst: &mut [u8], tweaks: &Tweaks) {
        assert_eq!(dst.len(), SECTOR_SIZE);
        // SAFETY: inside `dst` and `tweaks.0` (SECTOR_SIZE bytes each,
        // tweaks 64-byte aligned).
        unsafe {
            let tp = tweaks.0.as_ptr().cast::<__m512i>();
            let dp = dst.as_mut_ptr().cast::<__m512i>();
            for i in 0..SECTOR_SIZE / 64 {
                _mm512_storeu_si512(
                    dp.add(i),
                    _mm512_xor_si512(_mm512_loadu_si512(dp.add(i)), _mm512_load_si512(tp.add(i))),
                );
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2; `dst` (and `src`) must be one sector.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn whiten_in_avx2(t0: u128, src: Option<&[u8]>, dst: &mut [u8], tweaks: &mut Tweaks) {
        assert!(dst.len() == SECTOR_SIZE && src.is_none_or(|s| s.len() == SECTOR_SIZE));
        // Four chains, one per quarter of the sector, each two lanes wide.
        let mut lanes = [0u128; 8];
        let mut q = t0;
        for chain in lanes.chunks_exact_mut(2) {
            chain[0] = q;
            chain[1] = mul_alpha(q);
            q = mul_alpha64(q);
        }
        const QUARTER: usize = SECTOR_SIZE / 32 / 4; // 256-bit vectors per quarter
        // SAFETY: as in `whiten_in_avx512`, with 32-byte vectors.
        unsafe {
            let lp = lanes.as_ptr().cast::<__m256i>();
            let mut t = [
                _mm256_loadu_si256(lp),
                _mm256_loadu_si256(lp.add(1)),
                _mm256_loadu_si256(lp.add(2)),
                _mm256_loadu_si256(lp.add(3)),
            ];
            let lo_half = _mm256_set_epi64x(0, -1, 0, -1);
            let tp = tweaks.0.as_mut_ptr().cast::<__m256i>();
            let dp = dst.as_mut_ptr().cast::<__m256i>();
            let sp = src.map_or(dp.cast_const(), |s| s.as_ptr().cast::<__m256i>());
            for i in 0..QUARTER {
                for (c, tc) in t.iter_mut().enumerate() {
                    let at = c * QUARTER + i;
                    _mm256_store_si256(tp.add(at), *tc);
                    _mm256_storeu_si256(dp.add(at), _mm256_xor_si256(_mm256_loadu_si256(sp.add(at)), *tc));
                    let top = _mm256_shuffle_epi32(_mm256_srli_epi64(*tc, 62), 0b01_00_11_10);
                    let fold = _mm256_xor_si256(
                        _mm256_xor_si256(_mm256_slli_epi64(top, 1), _mm256_slli_epi64(top, 2)),
                        _mm256_slli_epi64(top, 7),
                    );
                    let carry = _mm256_xor_si256(top, _mm256_and_si256(fold, lo_half));
                    *tc = _mm256_xor_si256(_mm256_slli_epi64(*tc, 2), carry);
                }
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2; `dst` must be one sector.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn whiten_out_avx2(dst: &mut [u8], tweaks: &Tweaks) {
        assert_eq!(dst.len(), SECTOR_SIZE);
        // SAFETY: inside `dst` and `tweaks.0`.
        unsafe {
            let tp = tweaks.0.as_ptr().cast::<__m256i>();
            let dp = dst.as_mut_ptr().cast::<__m256i>();
            for i in 0..SECTOR_SIZE / 32 {
                _mm256_storeu_si256(
                    dp.add(i),
                    _mm256_xor_si256(_mm256_loadu_si256(dp.add(i)), _mm256_load_si256(tp.add(i))),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s.split_whitespace().collect::<String>()).unwrap()
    }

    /// IEEE 1619-2007 annex B, vector 10: XTS-AES-256, data unit sequence
    /// number 0xff, 512-byte data unit of bytes 00..ff twice.
    const V10_KEY1: &str = "2718281828459045235360287471352662497757247093699959574966967627";
    const V10_KEY2: &str = "3141592653589793238462643383279502884197169399375105820974944592";
    const V10_CT: &str = "
        1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b
        5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd
        5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0
        c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca
        2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0
        b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f
        93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec
        583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a
        84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1
        505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae
        9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29
        a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac
        6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f
        645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385
        1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa
        773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151";

    fn v10_cipher() -> SectorCipher {
        SectorCipher::from_halves(
            hex(V10_KEY1).as_slice().try_into().unwrap(),
            hex(V10_KEY2).as_slice().try_into().unwrap(),
        )
    }

    #[test]
    fn ieee1619_vector_10_encrypts_and_decrypts() {
        let plain: Vec<u8> = (0..512).map(|i| i as u8).collect();
        let want = hex(V10_CT);
        assert_eq!(want.len(), 512);
        let c = v10_cipher();
        let mut buf = plain.clone();
        c.unit(Direction::Encrypt, 0xff, &mut buf);
        assert_eq!(buf, want);
        c.unit(Direction::Decrypt, 0xff, &mut buf);
        assert_eq!(buf, plain);
    }

    #[test]
    fn alpha_multiplication_walks_the_bit_out_and_folds_0x87_in() {
        // The GF(2^128) α chain on its own: α applied 127 times to 1 walks
        // the bit to the top, once more folds 0x87 back in.
        let mut t = 1u128;
        for _ in 0..127 {
            t = mul_alpha(t);
        }
        assert_eq!(t, 1u128 << 127);
        assert_eq!(mul_alpha(t), 0x87);
        assert_eq!(mul_alpha(u128::MAX), (u128::MAX << 1) ^ 0x87);
    }

    #[test]
    fn generation_zero_is_the_standard_sector_tweak() {
        assert_eq!(tweak(0xff, 0), 0xff);
        assert_eq!(tweak(1, 2).to_le_bytes()[..8], 1u64.to_le_bytes());
        assert_eq!(tweak(1, 2).to_le_bytes()[8..], 2u64.to_le_bytes());
    }

    fn test_key(seed: u8) -> VolumeKey {
        let bytes: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(31).wrapping_add(seed)).collect();
        VolumeKey::from_bytes(&bytes).unwrap()
    }

    /// The same 64-byte key through the `xts-mode` crate (one block per call).
    fn oracle(key: &VolumeKey) -> xts_mode::Xts128<Aes256> {
        xts_mode::Xts128::new(
            Aes256::new_from_slice(key.data_key()).unwrap(),
            Aes256::new_from_slice(key.tweak_key()).unwrap(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn matches_xts_mode_crate_for_every_sector_and_generation(
            seed in any::<u8>(),
            first in 0u64..(1 << 40),
            generation in any::<u64>(),
            sectors in 1usize..6,
            fill in any::<u64>(),
        ) {
            let key = test_key(seed);
            let ours = SectorCipher::new(&key);
            let plain: Vec<u8> = (0..sectors * SECTOR_SIZE)
                .map(|i| (fill.rotate_left(i as u32 % 64) as u8) ^ (i as u8)).collect();
            let mut out = vec![0u8; plain.len()];
            ours.encrypt(first, generation, &plain, &mut out);

            let mut want = plain.clone();
            oracle(&key).encrypt_area(&mut want, SECTOR_SIZE, u128::from(first), |n| {
                // xts-mode numbers units from `first`; fold in our generation.
                Array::from((n | (u128::from(generation) << 64)).to_le_bytes())
            });
            prop_assert_eq!(&out, &want);

            let mut back = vec![0u8; plain.len()];
            ours.decrypt(first, generation, &out, &mut back);
            prop_assert_eq!(&back, &plain);
            ours.decrypt_in_place(first, generation, &mut out);
            prop_assert_eq!(&out, &plain);
        }

        #[test]
        fn in_place_equals_out_of_place(seed in any::<u8>(), first in any::<u32>(), generation in any::<u64>()) {
            let c = SectorCipher::new(&test_key(seed));
            let plain: Vec<u8> = (0..3 * SECTOR_SIZE).map(|i| (i * 7) as u8).collect();
            let mut a = vec![0u8; plain.len()];
            c.encrypt(u64::from(first), generation, &plain, &mut a);
            let mut b = plain.clone();
            c.encrypt_in_place(u64::from(first), generation, &mut b);
            prop_assert_eq!(a, b);
        }

        #[test]
        fn sector_and_generation_both_change_every_block(
            seed in any::<u8>(), sector in 0u64..(1 << 50), generation in 0u64..u64::MAX,
        ) {
            // Same plaintext, neighbouring sector or next generation: no
            // 16-byte ciphertext block may repeat.
            let c = SectorCipher::new(&test_key(seed));
            let plain = vec![0x5au8; SECTOR_SIZE];
            let enc = |s, g| { let mut o = vec![0u8; SECTOR_SIZE]; c.encrypt(s, g, &plain, &mut o); o };
            let base = enc(sector, generation);
            for other in [enc(sector + 1, generation), enc(sector, generation + 1)] {
                for (a, b) in base.chunks(BLOCK).zip(other.chunks(BLOCK)) {
                    prop_assert_ne!(a, b);
                }
            }
        }

        #[test]
        fn tampering_changes_only_the_touched_block(
            seed in any::<u8>(), byte in 0usize..SECTOR_SIZE, bit in 0u8..8,
        ) {
            // XTS is not authenticated (blake3 shard hashes are): a flipped
            // ciphertext bit garbles exactly its own 16-byte block.
            let c = SectorCipher::new(&test_key(seed));
            let plain: Vec<u8> = (0..SECTOR_SIZE).map(|i| (i % 251) as u8).collect();
            let mut ct = vec![0u8; SECTOR_SIZE];
            c.encrypt(7, 3, &plain, &mut ct);
            ct[byte] ^= 1 << bit;
            c.decrypt_in_place(7, 3, &mut ct);
            let touched = byte / BLOCK;
            for (i, (a, b)) in ct.chunks(BLOCK).zip(plain.chunks(BLOCK)).enumerate() {
                if i == touched { prop_assert_ne!(a, b); } else { prop_assert_eq!(a, b); }
            }
        }
    }

    #[test]
    fn every_kernel_this_cpu_has_agrees_with_the_portable_one() {
        let base = SectorCipher::new(&test_key(9));
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(Kernel::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                kernels.push(Kernel::Avx2);
            }
        }
        let plain: Vec<u8> = (0..5 * SECTOR_SIZE).map(|i| (i * 131 / 7) as u8).collect();
        let portable = SectorCipher { kernel: Kernel::Portable, ..base.clone() };
        let mut want = vec![0u8; plain.len()];
        portable.encrypt(u64::MAX - 5, u64::MAX, &plain, &mut want);
        for kernel in kernels {
            let c = SectorCipher { kernel, ..base.clone() };
            let mut out = vec![0u8; plain.len()];
            c.encrypt(u64::MAX - 5, u64::MAX, &plain, &mut out);
            assert_eq!(out, want, "{kernel:?} encrypt");
            let mut inplace = plain.clone();
            c.encrypt_in_place(u64::MAX - 5, u64::MAX, &mut inplace);
            assert_eq!(inplace, want, "{kernel:?} encrypt in place");
            c.decrypt_in_place(u64::MAX - 5, u64::MAX, &mut inplace);
            assert_eq!(inplace, plain, "{kernel:?} decrypt in place");
            let mut back = vec![0u8; plain.len()];
            c.decrypt(u64::MAX - 5, u64::MAX, &want, &mut back);
            assert_eq!(back, plain, "{kernel:?} decrypt");
        }
    }

    #[test]
    fn wrong_key_or_wrong_generation_does_not_decrypt() {
        let plain = vec![1u8; SECTOR_SIZE];
        let mut ct = vec![0u8; SECTOR_SIZE];
        SectorCipher::new(&test_key(1)).encrypt(5, 9, &plain, &mut ct);
        let mut a = ct.clone();
        SectorCipher::new(&test_key(2)).decrypt_in_place(5, 9, &mut a);
        assert_ne!(a, plain);
        let mut b = ct.clone();
        SectorCipher::new(&test_key(1)).decrypt_in_place(5, 8, &mut b);
        assert_ne!(b, plain);
    }

    #[test]
    fn large_runs_cross_tweak_batches() {
        // More than TWEAK_BATCH sectors in one call: numbering must carry
        // across batches exactly as sector-by-sector calls do.
        let c = SectorCipher::new(&test_key(3));
        let n = TWEAK_BATCH * 2 + 5;
        let plain: Vec<u8> = (0..n * SECTOR_SIZE).map(|i| (i / 13) as u8).collect();
        let mut whole = vec![0u8; plain.len()];
        c.encrypt(1000, 4, &plain, &mut whole);
        for (i, chunk) in plain.chunks(SECTOR_SIZE).enumerate() {
            let mut one = vec![0u8; SECTOR_SIZE];
            c.encrypt(1000 + i as u64, 4, chunk, &mut one);
            assert_eq!(one, whole[i * SECTOR_SIZE..(i + 1) * SECTOR_SIZE]);
        }
    }

    #[test]
    #[should_panic(expected = "whole number of sectors")]
    fn partial_sectors_are_a_programming_error() {
        let c = SectorCipher::new(&test_key(4));
        c.encrypt_in_place(0, 0, &mut [0u8; 100]);
    }
}

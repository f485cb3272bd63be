//! A bounds-checked little-endian reader for the v2 metadata parsers (the
//! root record's in `codec::root`; the summaries', map pages' and
//! checkpoints' in `volume::v2`): every read returns `None` past the end
//! instead of panicking, so parsers stay strict and panic-free on any input.

/// Metadata blocks are written padded with zeroes to whole 4 KiB blocks.
pub const BLOCK: usize = 4096;

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let bytes = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    pub fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.array()?))
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos.min(self.buf.len())..]
    }
}

/// True if `rest`, the bytes after an encoding `used` bytes long, is either
/// nothing or the zero padding up to the next whole block (and no more).
pub fn is_block_padding(used: usize, rest: &[u8]) -> bool {
    rest.is_empty()
        || ((used + rest.len()).is_multiple_of(BLOCK) && rest.len() < BLOCK && rest.iter().all(|&b| b == 0))
}

//! Character classes for the hand-written pre-tokenizer, taken from the regex engine's own tables.
//!
//! The split patterns use `\p{L}` (letters), `\p{N}` (numbers) and `\s` (Unicode White_Space).
//! Rather than shipping our own Unicode tables (and drifting from the regex engine's Unicode
//! version), we ask `regex-syntax` (the parser under both `regex` and `fancy-regex`) for the ranges
//! of those classes once, and pack them into a two-level lookup table: the scanner and the regex it
//! replaces then agree on every code point by construction.

use regex_syntax::hir::{Class as HirClass, HirKind};
use std::sync::OnceLock;

/// The four classes the GPT-4-style patterns distinguish. Every char is in exactly one of them
/// (`\p{L}`, `\p{N}` and `\s` are disjoint).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CharClass {
    Letter = 0,
    Number = 1,
    Space = 2,
    Other = 3,
}

const BLOCK_BITS: u32 = 8;
const BLOCK: usize = 1 << BLOCK_BITS;
const N_BLOCKS: usize = (0x11_0000 >> BLOCK_BITS) as usize;

/// Two-level table: `blocks[cp >> 8]` picks a deduplicated 256-entry block in `data`.
pub struct ClassTable {
    ascii: [CharClass; 128],
    blocks: Vec<u16>,
    data: Vec<CharClass>,
}

impl ClassTable {
    fn build() -> ClassTable {
        let mut flat = vec![CharClass::Other; 0x11_0000];
        // Later classes overwrite earlier ones; they are disjoint, so the order does not matter.
        for (pattern, class) in [
            (r"\p{L}", CharClass::Letter),
            (r"\p{N}", CharClass::Number),
            (r"\s", CharClass::Space),
        ] {
            for (start, end) in unicode_class_ranges(pattern) {
                for cp in start..=end {
                    flat[cp as usize] = class;
                }
            }
        }
        let mut blocks = Vec::with_capacity(N_BLOCKS);
        let mut data: Vec<CharClass> = Vec::new();
        let mut seen: std::collections::HashMap<&[CharClass], u16> =
            std::collections::HashMap::new();
        for chunk in flat.chunks(BLOCK) {
            let next = seen.len() as u16;
            let id = *seen.entry(chunk).or_insert(next);
            if id == next {
                data.extend_from_slice(chunk);
            }
            blocks.push(id);
        }
        let mut ascii = [CharClass::Other; 128];
        ascii.copy_from_slice(&flat[..128]);
        ClassTable {
            ascii,
            blocks,
            data,
        }
    }

    #[inline(always)]
    pub fn ascii(&self, b: u8) -> CharClass {
        self.ascii[(b & 0x7f) as usize]
    }

    #[inline(always)]
    pub fn class(&self, cp: u32) -> CharClass {
        let block = self.blocks[(cp >> BLOCK_BITS) as usize] as usize;
        self.data[(block << BLOCK_BITS) | (cp as usize & (BLOCK - 1))]
    }
}

/// The inclusive code point ranges of a single-class regex such as `\p{L}` or `(?i:s)`.
pub fn unicode_class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::Parser::new()
        .parse(pattern)
        .expect("built-in class pattern parses");
    match hir.kind() {
        HirKind::Class(HirClass::Unicode(cls)) => cls
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        // A one-char class such as `(?i:d)` with no case variants beyond ASCII still parses to a
        // class; a plain literal would be a bug in the caller's pattern.
        HirKind::Literal(lit) => {
            let c = std::str::from_utf8(&lit.0)
                .expect("literal is UTF-8")
                .chars()
                .next()
                .expect("non-empty literal") as u32;
            vec![(c, c)]
        }
        other => panic!("{pattern} is not a single character class: {other:?}"),
    }
}

/// The process-wide table, built on first use (about 1 ms).
pub fn table() -> &'static ClassTable {
    static TABLE: OnceLock<ClassTable> = OnceLock::new();
    TABLE.get_or_init(ClassTable::build)
}

/// Decode the char starting at byte `i` of valid UTF-8. Returns (code point, byte length).
#[inline(always)]
pub fn decode(s: &[u8], i: usize) -> (u32, usize) {
    let b0 = s[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (s[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (
            ((b0 & 0x0F) << 12) | ((s[i + 1] as u32 & 0x3F) << 6) | (s[i + 2] as u32 & 0x3F),
            3,
        )
    } else {
        (
            ((b0 & 0x07) << 18)
                | ((s[i + 1] as u32 & 0x3F) << 12)
                | ((s[i + 2] as u32 & 0x3F) << 6)
                | (s[i + 3] as u32 & 0x3F),
            4,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_regex_on_every_code_point() {
        let t = table();
        let letter = regex::Regex::new(r"^\p{L}$").unwrap();
        let number = regex::Regex::new(r"^\p{N}$").unwrap();
        let space = regex::Regex::new(r"^\s$").unwrap();
        for cp in 0..0x11_0000u32 {
            let Some(c) = char::from_u32(cp) else {
                continue;
            };
            let mut buf = [0u8; 4];
            let s = c.encode_utf8(&mut buf);
            let expected = if letter.is_match(s) {
                CharClass::Letter
            } else if number.is_match(s) {
                CharClass::Number
            } else if space.is_match(s) {
                CharClass::Space
            } else {
                CharClass::Other
            };
            assert_eq!(t.class(cp), expected, "U+{cp:04X}");
            assert_eq!(decode(s.as_bytes(), 0), (cp, s.len()));
            if cp < 128 {
                assert_eq!(t.ascii(cp as u8), expected);
            }
        }
    }
}

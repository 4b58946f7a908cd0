//! Pre-tokenization: split text into the chunks that BPE merges never cross.
//!
//! Two implementations of the same contract, "the non-overlapping matches of the split pattern,
//! left to right" (what `regex.findall` / tiktoken do):
//! - [`FastScanner`], a hand-written scanner for the GPT-4 pattern and nanochat's variant (they
//!   differ only in the longest digit run: `\p{N}{1,3}` vs `\p{N}{1,2}`). It walks the bytes once
//!   with a class table and no backtracking; proven equal to the regex by the property tests in
//!   tests/scanner_vs_regex.rs.
//! - `fancy-regex` for any other pattern.
//!
//! Why a hand-written scanner: profiling the PyPI `rustbpe` trainer on our corpus puts about 40%
//! of its time in fancy-regex (its backtracking VM for the possessive quantifiers and the
//! lookahead, plus a regex-automata cache pool per call); the scanner runs at several hundred MB/s
//! per core.

use crate::unicode::{decode, table, unicode_class_ranges, CharClass, ClassTable};
use std::sync::OnceLock;

/// GPT-4's split pattern (tiktoken's cl100k_base).
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// nanochat's variant of the GPT-4 pattern: numbers split into runs of at most 2 digits.
pub const NANOCHAT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// A pattern the splitter cannot use.
#[derive(Debug)]
pub struct PatternError(pub String);

impl std::fmt::Display for PatternError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PatternError {}

/// Splits text into pre-tokenization chunks with the fast scanner or a regex.
#[derive(Clone)]
pub enum Splitter {
    Fast(FastScanner),
    Regex(Box<fancy_regex::Regex>),
}

impl Splitter {
    /// The splitter for `pattern`: the fast scanner for [`GPT4_PATTERN`] and [`NANOCHAT_PATTERN`],
    /// fancy-regex otherwise. Errors if the pattern does not compile.
    pub fn new(pattern: &str) -> Result<Splitter, PatternError> {
        if pattern == GPT4_PATTERN {
            Ok(Splitter::Fast(FastScanner::new(3)))
        } else if pattern == NANOCHAT_PATTERN {
            Ok(Splitter::Fast(FastScanner::new(2)))
        } else {
            Self::regex(pattern)
        }
    }

    /// Always the regex engine (for tests and benchmarks of the scanner against it).
    pub fn regex(pattern: &str) -> Result<Splitter, PatternError> {
        fancy_regex::Regex::new(pattern)
            .map(|r| Splitter::Regex(Box::new(r)))
            .map_err(|e| PatternError(format!("invalid split pattern {pattern:?}: {e}")))
    }

    /// Call `f(start, end)` with the byte range of every chunk of `text`, left to right.
    /// Errors only for the regex engine (its backtracking limit on pathological input).
    #[inline]
    pub fn for_each_range(
        &self,
        text: &str,
        mut f: impl FnMut(usize, usize),
    ) -> Result<(), PatternError> {
        match self {
            Splitter::Fast(scanner) => {
                let bytes = text.as_bytes();
                let mut i = 0;
                while i < bytes.len() {
                    let end = scanner.next_end(bytes, i);
                    f(i, end);
                    i = end;
                }
                Ok(())
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| PatternError(format!("split pattern failed: {e}")))?;
                    f(m.start(), m.end());
                }
                Ok(())
            }
        }
    }

    /// The chunks of `text` as string slices.
    pub fn split<'t>(&self, text: &'t str) -> Result<Vec<&'t str>, PatternError> {
        let mut out = Vec::new();
        self.for_each_range(text, |a, b| out.push(&text[a..b]))?;
        Ok(out)
    }
}

/// The chars that `(?i:...)` lets stand for each ASCII letter of the contractions (e.g. `s` also
/// matches `S` and U+017F LATIN SMALL LETTER LONG S), from the regex engine's case folding.
struct Folds {
    sdmt: Vec<u32>,
    l: Vec<u32>,
    v: Vec<u32>,
    r: Vec<u32>,
    e: Vec<u32>,
}

fn folds() -> &'static Folds {
    static FOLDS: OnceLock<Folds> = OnceLock::new();
    FOLDS.get_or_init(|| {
        let set = |pat: &str| -> Vec<u32> {
            unicode_class_ranges(pat)
                .into_iter()
                .flat_map(|(a, b)| a..=b)
                .collect()
        };
        Folds {
            sdmt: set("(?i:[sdmt])"),
            l: set("(?i:l)"),
            v: set("(?i:v)"),
            r: set("(?i:r)"),
            e: set("(?i:e)"),
        }
    })
}

/// The hand-written scanner for `'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,D}|
/// ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+` with D = `max_digits`.
///
/// Every char is a letter (L), number (N), whitespace (S) or other (O). At each position the
/// first alternative that matches wins; the scanner decides which by looking at most two chars
/// ahead, except in whitespace runs, which it scans to their end once:
/// - (1) `'` + contraction suffix;
/// - (2) an optional non-L/N char that is not CR/LF, then a run of L;
/// - (3) 1..=D N;
/// - (4) an optional space, a run of O, then any CR/LF run;
/// - (5-7) whitespace: up to and including the last CR/LF of the run; else the whole run at the
///   end of text; else the run minus its last char (which then prefixes the next chunk), if
///   that leaves anything; else the single char.
#[derive(Clone)]
pub struct FastScanner {
    max_digits: usize,
    table: &'static ClassTable,
}

impl FastScanner {
    pub fn new(max_digits: usize) -> FastScanner {
        assert!(max_digits >= 1);
        FastScanner {
            max_digits,
            table: table(),
        }
    }

    #[inline(always)]
    fn class_at(&self, s: &[u8], i: usize) -> (CharClass, usize) {
        let b = s[i];
        if b < 0x80 {
            (self.table.ascii(b), 1)
        } else {
            let (cp, len) = decode(s, i);
            (self.table.class(cp), len)
        }
    }

    /// End of the run of chars of class `class` starting at byte `i`.
    #[inline(always)]
    fn run_end(&self, s: &[u8], mut i: usize, class: CharClass) -> usize {
        while i < s.len() {
            let b = s[i];
            if b < 0x80 {
                if self.table.ascii(b) != class {
                    break;
                }
                i += 1;
            } else {
                let (cp, len) = decode(s, i);
                if self.table.class(cp) != class {
                    break;
                }
                i += len;
            }
        }
        i
    }

    #[inline(always)]
    fn newline_run_end(s: &[u8], mut i: usize) -> usize {
        while i < s.len() && (s[i] == b'\r' || s[i] == b'\n') {
            i += 1;
        }
        i
    }

    /// After an apostrophe at `i - 1`: the end of a contraction suffix starting at `i`, if any.
    #[cold]
    fn contraction_end(&self, s: &[u8], i: usize) -> Option<usize> {
        let f = folds();
        let (c1, l1) = decode(s, i);
        if f.sdmt.contains(&c1) {
            return Some(i + l1);
        }
        let second = if f.l.contains(&c1) {
            &f.l
        } else if f.v.contains(&c1) || f.r.contains(&c1) {
            &f.e
        } else {
            return None;
        };
        if i + l1 >= s.len() {
            return None;
        }
        let (c2, l2) = decode(s, i + l1);
        second.contains(&c2).then_some(i + l1 + l2)
    }

    /// The end (exclusive byte offset) of the chunk that starts at byte `i < s.len()`.
    #[inline]
    pub fn next_end(&self, s: &[u8], i: usize) -> usize {
        let n = s.len();
        let b0 = s[i];
        if b0 == b'\'' && i + 1 < n {
            if let Some(end) = self.contraction_end(s, i + 1) {
                return end;
            }
        }
        let (class, len) = self.class_at(s, i);
        let j = i + len;
        match class {
            CharClass::Letter => self.run_end(s, j, CharClass::Letter),
            CharClass::Number => {
                let mut end = j;
                for _ in 1..self.max_digits {
                    if end >= n {
                        break;
                    }
                    let (c, l) = self.class_at(s, end);
                    if c != CharClass::Number {
                        break;
                    }
                    end += l;
                }
                end
            }
            CharClass::Other => {
                if j < n {
                    let (next, next_len) = self.class_at(s, j);
                    if next == CharClass::Letter {
                        return self.run_end(s, j + next_len, CharClass::Letter);
                    }
                }
                Self::newline_run_end(s, self.run_end(s, j, CharClass::Other))
            }
            CharClass::Space => {
                if b0 != b'\r' && b0 != b'\n' && j < n {
                    let (next, next_len) = self.class_at(s, j);
                    if next == CharClass::Letter {
                        return self.run_end(s, j + next_len, CharClass::Letter);
                    }
                    if b0 == b' ' && next == CharClass::Other {
                        return Self::newline_run_end(
                            s,
                            self.run_end(s, j + next_len, CharClass::Other),
                        );
                    }
                }
                self.whitespace_end(s, i)
            }
        }
    }

    /// Alternatives 5-7 for a whitespace run starting at `i`.
    #[inline]
    fn whitespace_end(&self, s: &[u8], i: usize) -> usize {
        let mut j = i;
        let mut last_start = i;
        let mut newline_end = None;
        while j < s.len() {
            let b = s[j];
            let (class, len) = self.class_at(s, j);
            if class != CharClass::Space {
                break;
            }
            if b == b'\r' || b == b'\n' {
                newline_end = Some(j + 1);
            }
            last_start = j;
            j += len;
        }
        if let Some(end) = newline_end {
            end // \s*[\r\n]
        } else if j == s.len() {
            j // \s+(?!\S) at the end of text
        } else if last_start > i {
            last_start // \s+(?!\S): the run but its last char
        } else {
            j // \s+: a single whitespace char before non-whitespace
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(pattern: &str, text: &str) -> (Vec<String>, Vec<String>) {
        let fast = Splitter::new(pattern).unwrap();
        assert!(matches!(fast, Splitter::Fast(_)));
        let re = Splitter::regex(pattern).unwrap();
        let a = fast
            .split(text)
            .unwrap()
            .into_iter()
            .map(String::from)
            .collect();
        let b = re
            .split(text)
            .unwrap()
            .into_iter()
            .map(String::from)
            .collect();
        (a, b)
    }

    #[test]
    fn known_splits() {
        let (fast, _) = both(
            GPT4_PATTERN,
            "Hello world's 12345 don'T  (x)...\n\n  yes\t\tno 'sup ſ'ſ",
        );
        let expected = [
            "Hello", " world", "'s", " ", "123", "45", " don", "'T", " ", " (", "x", ")...\n\n",
            " ", " yes", "\t", "\tno", " '", "sup", " ſ", "'ſ",
        ];
        assert_eq!(fast, expected);
    }

    #[test]
    fn digit_runs_differ_between_patterns() {
        assert_eq!(both(GPT4_PATTERN, "1234567").0, ["123", "456", "7"]);
        assert_eq!(both(NANOCHAT_PATTERN, "1234567").0, ["12", "34", "56", "7"]);
    }

    #[test]
    fn fast_equals_regex_on_tricky_strings() {
        let cases = [
            "",
            " ",
            "  ",
            "a",
            "'",
            "''",
            "'s",
            "'S",
            "'LL",
            "'lL",
            "'ve",
            "'Re",
            "'x",
            "\r\n",
            " \r\n \n ",
            "x  \n\t y",
            "   ",
            "a   ",
            "   a",
            " ...",
            " ...\r\n\r\nz",
            "\u{a0}word",
            "\u{a0}\u{a0}word",
            "٣٤٥٦ ٧",
            "😀😀 😀a",
            "e\u{301}\u{301}x",
            "\u{2028}\u{2029}x",
            " \u{3000}\u{3000}漢字",
            "'\u{17f}",
            "'\u{212a}",
        ];
        for pattern in [GPT4_PATTERN, NANOCHAT_PATTERN] {
            for text in cases {
                let (a, b) = both(pattern, text);
                assert_eq!(a, b, "{text:?}");
            }
        }
    }

    #[test]
    fn other_patterns_use_the_regex() {
        let s = Splitter::new(r"\w+|\s+").unwrap();
        assert!(matches!(s, Splitter::Regex(_)));
        assert_eq!(s.split("ab  cd").unwrap(), ["ab", "  ", "cd"]);
        assert!(Splitter::new("(unclosed").is_err());
    }
}

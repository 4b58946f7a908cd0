//! Property tests: the hand-written scanner splits every text exactly as fancy-regex does with
//! the same pattern (GPT-4's and nanochat's), over random Unicode strings biased towards the
//! characters where the alternatives of the pattern compete.

use nanochat_bpe::{Splitter, GPT4_PATTERN, NANOCHAT_PATTERN};
use proptest::prelude::*;
use std::sync::OnceLock;

/// Characters chosen for their class or their role in the pattern.
#[rustfmt::skip]
const EDGE_CHARS: &[char] = &[
    // contractions: the apostrophe, the suffix letters in both cases, and chars that case-fold
    // to them (U+017F LONG S folds to s; U+212A KELVIN SIGN to k, which is no suffix)
    '\'', 's', 'S', 'd', 'D', 'm', 'M', 't', 'T', 'l', 'L', 'v', 'V', 'e', 'E', 'r', 'R', 'ſ',
    'K', 'x',
    // whitespace: ASCII, CR/LF, and the rest of Unicode White_Space
    ' ', ' ', ' ', '\t', '\n', '\r', '\u{0b}', '\u{0c}', '\u{85}', '\u{a0}', '\u{1680}',
    '\u{2000}', '\u{2028}', '\u{2029}', '\u{202f}', '\u{3000}',
    // "spacey" but not White_Space
    '\u{200b}', '\u{180e}', '\u{feff}',
    // numbers: ASCII, other scripts, No and Nl
    '0', '1', '9', '٣', '७', '²', '½', 'Ⅻ', '〇', '𝟙',
    // punctuation and symbols
    '.', ',', '!', '(', ')', '-', '_', '"', '#', '€', '→', '。', '「',
    // combining marks and a joiner (neither letters nor numbers)
    '\u{301}', '\u{308}', '\u{93f}', '\u{200d}',
    // letters beyond ASCII: Latin, Greek, Cyrillic, CJK, Lm, Arabic
    'é', 'ß', 'Ω', 'я', '漢', '字', 'ー', 'ʰ', 'ا',
    // emoji (4-byte UTF-8) and a regional-indicator flag pair
    '😀', '🙂', '🇫', '🇷',
];

fn text() -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        6 => prop::sample::select(EDGE_CHARS),
        2 => prop::char::range('a', 'z'),
        1 => any::<char>(),
    ];
    prop::collection::vec(ch, 0..48).prop_map(|v| v.into_iter().collect())
}

/// (fast, regex) splitters per pattern, compiled once: compiling the Unicode classes of the regex
/// takes milliseconds, far more than a check.
fn splitters(pattern: &str) -> &'static (Splitter, Splitter) {
    static CACHE: OnceLock<Vec<(&'static str, (Splitter, Splitter))>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| {
        [GPT4_PATTERN, NANOCHAT_PATTERN]
            .into_iter()
            .map(|p| {
                let pair = (Splitter::new(p).unwrap(), Splitter::regex(p).unwrap());
                assert!(matches!(pair.0, Splitter::Fast(_)));
                (p, pair)
            })
            .collect()
    });
    &cache.iter().find(|(p, _)| *p == pattern).unwrap().1
}

fn check(pattern: &str, text: &str) -> Result<(), TestCaseError> {
    let (fast, regex) = splitters(pattern);
    let a = fast.split(text).unwrap();
    let b = regex.split(text).unwrap();
    prop_assert_eq!(&a, &b, "text {:?}", text);
    // The pattern matches at every position, so the chunks tile the text.
    prop_assert_eq!(a.concat(), text);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn gpt4_scanner_equals_regex(s in text()) {
        check(GPT4_PATTERN, &s)?;
    }

    #[test]
    fn nanochat_scanner_equals_regex(s in text()) {
        check(NANOCHAT_PATTERN, &s)?;
    }
}

#[test]
fn long_runs_equal_regex() {
    // Long runs exercise the run loops and the whitespace backtracking beyond a few chars.
    let texts = [
        " ".repeat(1000) + "x",
        "\n".repeat(300) + &" ".repeat(300),
        "9".repeat(1001),
        "a".repeat(5000) + "'ll",
        ".".repeat(700) + "\r\n\r\n" + &"ß".repeat(400),
        "😀".repeat(300),
        " \t".repeat(200) + "\u{3000}",
    ];
    for pattern in [GPT4_PATTERN, NANOCHAT_PATTERN] {
        for t in &texts {
            check(pattern, t).unwrap();
        }
    }
}

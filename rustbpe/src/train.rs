//! The BPE merge loop over unique words with counts.
//!
//! Byte-level BPE (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
//! Units"; byte-level as in GPT-2): start from the 256 byte tokens, repeatedly merge the most
//! frequent adjacent pair of tokens into a new token. The pair count is the number of adjacent
//! positions (overlapping ones included) summed over all words, weighted by word count; a merge
//! replaces the pair's occurrences in each word left to right.
//!
//! Exactly this, fast:
//! - incremental pair counts: a merge in a word changes only the pairs next to each merged
//!   occurrence, so only those counts are updated (the neighbour rule of Hugging Face
//!   `tokenizers`' `Word::merge`);
//! - a pair -> words index, so a merge visits only the words that contain the pair (a superset:
//!   entries go stale when a neighbouring merge consumes the pair, and are skipped);
//! - a lazy max-heap keyed by (count, smaller pair first): counts only go down while a pair waits
//!   in the heap except for pairs with the newest token, which are pushed after each merge; a popped
//!   entry whose count is stale is pushed back with its current count.
//!
//! Ties are broken by the smaller pair (left id, then right id), so the merges depend only on the
//! word counts, not on the thread count or the order in which words were counted.
//!
//! A merge whose bytes already exist as a token (two different pairs can spell the same bytes)
//! does not create a new token: its occurrences become the existing token, and no rank is used.
//! This keeps every token's bytes unique, which tiktoken's bytes -> rank table requires.

use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One merge: the pair (left, right) became token `id` (a new one, or an existing one with the
/// same bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Merge {
    pub left: u32,
    pub right: u32,
    pub id: u32,
}

/// A trained vocabulary: token id (= tiktoken rank) -> bytes, and the merges in order.
#[derive(Clone, Debug, Default)]
pub struct Vocab {
    pub tokens: Vec<Vec<u8>>,
    pub merges: Vec<Merge>,
}

impl Vocab {
    /// The 256 byte tokens and no merges.
    pub fn bytes_only() -> Vocab {
        Vocab {
            tokens: (0..=255u8).map(|b| vec![b]).collect(),
            merges: Vec::new(),
        }
    }
}

#[inline(always)]
fn pair_key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

#[inline(always)]
fn unpack(key: u64) -> (u32, u32) {
    ((key >> 32) as u32, key as u32)
}

#[derive(PartialEq, Eq)]
struct HeapItem {
    count: u64,
    key: u64,
}

impl Ord for HeapItem {
    fn cmp(&self, other: &Self) -> Ordering {
        // Max-heap: higher count first, then the smaller pair.
        self.count
            .cmp(&other.count)
            .then_with(|| other.key.cmp(&self.key))
    }
}

impl PartialOrd for HeapItem {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

type FxMap<K, V> = hashbrown::HashMap<K, V, foldhash::fast::FixedState>;

/// A pair's count and the words that contain it (or once did: a superset, ascending word ids
/// except after a merge into an existing token, which can append out of order).
#[derive(Default)]
struct PairData {
    count: i64,
    words: Vec<u32>,
}

/// The unique words to train on, stored flat: word w is `syms[starts[w]..starts[w] + lens[w]]`.
#[derive(Default)]
pub struct Words {
    syms: Vec<u32>,
    starts: Vec<usize>,
    lens: Vec<u32>,
    counts: Vec<i64>,
}

impl Words {
    /// Add a unique word with its count. Words of one byte hold no pair and are skipped.
    pub fn push(&mut self, bytes: &[u8], count: u64) {
        if bytes.len() < 2 || count == 0 {
            return;
        }
        self.starts.push(self.syms.len());
        self.lens.push(bytes.len() as u32);
        self.counts
            .push(i64::try_from(count).expect("word count fits in i64"));
        self.syms.extend(bytes.iter().map(|&b| b as u32));
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    fn word(&self, wid: usize) -> &[u32] {
        &self.syms[self.starts[wid]..self.starts[wid] + self.lens[wid] as usize]
    }
}

/// Train byte-level BPE on unique words (bytes, count) up to `vocab_size` tokens (>= 256).
/// See [`train_words`].
pub fn train<'a>(words: impl IntoIterator<Item = (&'a [u8], u64)>, vocab_size: usize) -> Vocab {
    let mut w = Words::default();
    for (bytes, count) in words {
        w.push(bytes, count);
    }
    train_words(w, vocab_size)
}

/// A merge step touching at least this many words spreads them over the rayon pool. Below it the
/// fork/join overhead (~10 us) outweighs the work. Only the first few hundred merges are this
/// big, but they hold most of the work.
const PARALLEL_WORDS: usize = 2048;

/// Capacity (pairs) above which a step's delta table is dropped rather than reused.
const SMALL_DELTA: usize = 1024;

/// Train byte-level BPE up to `vocab_size` tokens (>= 256).
///
/// Stops early, with fewer tokens, when no pair is left to merge (every word is a single token).
///
/// Each merge step visits the words of the pair's index and collects the pair count changes in a
/// step-local table ([`StepDelta`]) that is applied to the global pair table once per distinct
/// pair: the per-occurrence updates then hit a small, cache-resident table instead of the global
/// one (profile: with direct global updates the loop was bound by cache misses, ~440 ns per word
/// visit on our corpus). Large steps split their words over threads, each with its own
/// StepDelta; the sum is the same whatever the split.
pub fn train_words(mut w: Words, vocab_size: usize) -> Vocab {
    assert!(vocab_size >= 256, "vocab_size must be at least 256");
    let mut vocab = Vocab::bytes_only();
    let mut token_ids: FxMap<Vec<u8>, u32> = FxMap::default();
    for (i, t) in vocab.tokens.iter().enumerate() {
        token_ids.insert(t.clone(), i as u32);
    }

    let mut pairs = initial_pairs(&w);
    let mut heap: BinaryHeap<HeapItem> = pairs
        .iter()
        .filter(|(_, p)| p.count > 0)
        .map(|(&key, p)| HeapItem {
            count: p.count as u64,
            key,
        })
        .collect();

    let mut deltas: Vec<StepDelta> = Vec::new();
    let mut grown: Vec<u64> = Vec::new();
    while vocab.tokens.len() < vocab_size {
        let Some(top) = heap.pop() else { break };
        let Some(entry) = pairs.get_mut(&top.key) else {
            continue;
        };
        if entry.count <= 0 {
            continue;
        }
        if entry.count as u64 != top.count {
            heap.push(HeapItem {
                count: entry.count as u64,
                key: top.key,
            });
            continue;
        }
        let mut word_ids = std::mem::take(&mut entry.words);
        pairs.remove(&top.key);

        let (a, b) = unpack(top.key);
        let mut bytes = vocab.tokens[a as usize].clone();
        bytes.extend_from_slice(&vocab.tokens[b as usize]);
        let z = match token_ids.get(&bytes) {
            Some(&existing) => existing,
            None => {
                let id = vocab.tokens.len() as u32;
                token_ids.insert(bytes.clone(), id);
                vocab.tokens.push(bytes);
                id
            }
        };
        vocab.merges.push(Merge {
            left: a,
            right: b,
            id: z,
        });

        // Each word once, ascending (the parallel split below relies on distinct words).
        if !word_ids.windows(2).all(|p| p[0] < p[1]) {
            word_ids.sort_unstable();
            word_ids.dedup();
        }
        merge_words(&mut w, &word_ids, a, b, z, &mut deltas);

        // Apply the step's changes, in order, once per distinct pair.
        for delta in deltas.iter_mut() {
            for (key, (d, list)) in delta.pairs.drain() {
                if key == top.key {
                    continue; // the merged pair: gone from every word
                }
                let p = pairs.entry(key).or_default();
                p.count += d;
                if !list.is_empty() {
                    if p.words.is_empty() {
                        p.words = list;
                    } else {
                        p.words.extend_from_slice(&list);
                    }
                }
                if p.count == 0 {
                    pairs.remove(&key); // in no word any more: free its index
                } else if d > 0 {
                    grown.push(key);
                }
            }
            // Draining visits every bucket, so a table grown by one of the few big steps would
            // tax every later small step (profile: ~40% of the loop): let it go.
            if delta.pairs.capacity() > SMALL_DELTA {
                delta.pairs = FxMap::default();
            }
        }
        for key in grown.drain(..) {
            let count = pairs.get(&key).map_or(0, |p| p.count);
            if count > 0 {
                heap.push(HeapItem {
                    count: count as u64,
                    key,
                });
            }
        }
    }
    vocab
}

/// Pair count changes and new index entries of one merge step (or of one thread's share).
#[derive(Default)]
struct StepDelta {
    /// pair -> (count change, words that gained the pair, ascending)
    pairs: FxMap<u64, (i64, Vec<u32>)>,
}

impl StepDelta {
    #[inline(always)]
    fn lose(&mut self, key: u64, wc: i64) {
        self.pairs.entry(key).or_default().0 -= wc;
    }

    #[inline(always)]
    fn gain(&mut self, key: u64, wc: i64, wid: u32) {
        let e = self.pairs.entry(key).or_default();
        e.0 += wc;
        if e.1.last() != Some(&wid) {
            e.1.push(wid);
        }
    }
}

/// A pointer to the words' storage that threads may share: each thread writes only the words of
/// its own share of a step's (distinct) word ids, so no two threads touch the same memory.
#[derive(Clone, Copy)]
struct SharedWords {
    syms: *mut u32,
    lens: *mut u32,
}

// SAFETY: see the type's doc: accesses through it are to disjoint words.
unsafe impl Send for SharedWords {}
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// The symbols and the length slot of word `wid`, which starts at `start`.
    ///
    /// # Safety
    /// No other live reference may point into this word (the caller gives each thread distinct
    /// words); `wid` and `start` must come from the same `Words`, which outlives the references.
    unsafe fn word_mut<'a>(self, start: usize, wid: usize) -> (&'a mut [u32], &'a mut u32) {
        let len_slot = &mut *self.lens.add(wid);
        let syms = std::slice::from_raw_parts_mut(self.syms.add(start), *len_slot as usize);
        (syms, len_slot)
    }
}

/// Merge (a, b) -> z in the given distinct words, leaving the changes in `deltas` (one per share,
/// in word order).
fn merge_words(
    w: &mut Words,
    word_ids: &[u32],
    a: u32,
    b: u32,
    z: u32,
    deltas: &mut Vec<StepDelta>,
) {
    let n_shares = if word_ids.len() >= PARALLEL_WORDS {
        rayon::current_num_threads().clamp(1, word_ids.len() / (PARALLEL_WORDS / 2))
    } else {
        1
    };
    deltas.resize_with(n_shares.max(deltas.len()), StepDelta::default);
    if n_shares == 1 {
        let delta = &mut deltas[0];
        for &wid in word_ids {
            let wid_u = wid as usize;
            let (start, len) = (w.starts[wid_u], w.lens[wid_u] as usize);
            let wc = w.counts[wid_u];
            let new_len = merge_word(&mut w.syms[start..start + len], a, b, z, wc, wid, delta);
            w.lens[wid_u] = new_len as u32;
        }
        return;
    }
    let shared = SharedWords {
        syms: w.syms.as_mut_ptr(),
        lens: w.lens.as_mut_ptr(),
    };
    let (starts, counts) = (&w.starts, &w.counts);
    let share = word_ids.len().div_ceil(n_shares);
    word_ids
        .par_chunks(share)
        .zip(deltas[..n_shares].par_iter_mut())
        .for_each(|(ids, delta)| {
            for &wid in ids {
                let wid_u = wid as usize;
                // SAFETY: word ids are distinct across all shares (sorted and deduplicated by the
                // caller), so no other thread touches this word.
                let (syms, len_slot) = unsafe { shared.word_mut(starts[wid_u], wid_u) };
                *len_slot = merge_word(syms, a, b, z, counts[wid_u], wid, delta) as u32;
            }
        });
}

/// Merge every (a, b) in the word `s` into z, left to right, recording the pair count changes
/// (times the word count `wc`) in `delta`. Returns the new length.
///
/// For an occurrence at i with left neighbour L (the already merged output) and right neighbour
/// R (the input after b): (L, a) and (b, R) lose one, (L, z) and (z, R) gain one. With
/// consecutive occurrences ("a b a b") this counts (b, a) -1, (z, a) +1 -1, (z, z) +1: exact.
#[inline]
fn merge_word(
    s: &mut [u32],
    a: u32,
    b: u32,
    z: u32,
    wc: i64,
    wid: u32,
    delta: &mut StepDelta,
) -> usize {
    let len = s.len();
    let (mut i, mut k) = (0, 0);
    while i < len {
        if i + 1 < len && s[i] == a && s[i + 1] == b {
            if k > 0 {
                let left = s[k - 1];
                delta.lose(pair_key(left, a), wc);
                delta.gain(pair_key(left, z), wc, wid);
            }
            if i + 2 < len {
                let right = s[i + 2];
                delta.lose(pair_key(b, right), wc);
                delta.gain(pair_key(z, right), wc, wid);
            }
            s[k] = z;
            i += 2;
        } else {
            s[k] = s[i];
            i += 1;
        }
        k += 1;
    }
    k
}

/// Count all adjacent pairs of all words and index which words hold each pair. All initial pairs
/// are byte pairs, so the counting uses a dense 256 x 256 table (no hashing).
fn initial_pairs(w: &Words) -> FxMap<u64, PairData> {
    let n_words = w.len();
    let chunk = n_words
        .div_ceil(rayon::current_num_threads().max(1) * 4)
        .max(1);
    let word_ids: Vec<usize> = (0..n_words).collect();
    let (counts, n_holders) = word_ids
        .par_chunks(chunk)
        .map(|ids| {
            let mut counts = vec![0i64; 1 << 16];
            let mut n_holders = vec![0u32; 1 << 16];
            for &wid in ids {
                let s = w.word(wid);
                let mut last = usize::MAX;
                for p in s.windows(2) {
                    let i = ((p[0] << 8) | p[1]) as usize;
                    counts[i] += w.counts[wid];
                    if last != i {
                        n_holders[i] += 1; // an upper bound on the index length
                    }
                    last = i;
                }
            }
            (counts, n_holders)
        })
        .reduce(
            || (vec![0i64; 1 << 16], vec![0u32; 1 << 16]),
            |(mut c1, mut h1), (c2, h2)| {
                c1.iter_mut().zip(&c2).for_each(|(x, y)| *x += y);
                h1.iter_mut().zip(&h2).for_each(|(x, y)| *x += y);
                (c1, h1)
            },
        );
    let mut lists: Vec<Vec<u32>> = n_holders
        .iter()
        .map(|&n| Vec::with_capacity(n as usize))
        .collect();
    for wid in 0..n_words {
        for p in w.word(wid).windows(2) {
            let list = &mut lists[((p[0] << 8) | p[1]) as usize];
            if list.last() != Some(&(wid as u32)) {
                list.push(wid as u32);
            }
        }
    }
    let mut pairs = FxMap::default();
    for (i, (count, words)) in counts.into_iter().zip(lists).enumerate() {
        if count > 0 {
            pairs.insert(
                pair_key((i >> 8) as u32, (i & 0xff) as u32),
                PairData { count, words },
            );
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train_texts(words: &[(&str, u64)], vocab_size: usize) -> Vocab {
        train(words.iter().map(|(w, c)| (w.as_bytes(), *c)), vocab_size)
    }

    #[test]
    fn merges_most_frequent_pair_first() {
        let v = train_texts(&[("aaab", 2), ("ab", 5)], 259);
        // pairs: aa: 2*2 = 4, ab: 2 + 5 = 7
        assert_eq!(
            v.merges[0],
            Merge {
                left: 97,
                right: 98,
                id: 256
            }
        );
        assert_eq!(v.tokens[256], b"ab");
        // then "aaab" = a a ab: aa: 2 (one position), a-ab: 2
        assert_eq!(v.merges[1].left, 97);
        assert_eq!(v.merges[1].right, 97);
        assert_eq!(v.tokens.len(), 259);
    }

    #[test]
    fn ties_break_to_the_smaller_pair() {
        let v = train_texts(&[("zy", 3), ("ba", 3)], 257);
        assert_eq!(v.tokens[256], b"ba");
    }

    #[test]
    fn overlapping_pairs_merge_left_to_right() {
        let v = train_texts(&[("aaaaa", 1)], 258);
        // aa x4 -> "aa aa a"; then (aa, aa) x1 vs (aa, a) x1: tie -> (aa, a)? keys: (256,256) vs
        // (256,97): the smaller key is (256, 97).
        assert_eq!(v.tokens[256], b"aa");
        assert_eq!(v.tokens[257], b"aaa");
    }

    #[test]
    fn parallel_steps_give_the_same_merges_as_one_thread() {
        // 20000 words over a few syllables: the first merges touch > PARALLEL_WORDS words, so
        // they run split over the pool; the result must not depend on the pool size.
        let syllables = ["ka", "to", "ri", "sen", "mo", "la", "que", "zu", " ", "é"];
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        let words: Vec<(Vec<u8>, u64)> = (0..20000)
            .map(|_| {
                let n = 1 + next() % 5;
                let w: String = (0..n)
                    .map(|_| syllables[next() % syllables.len()])
                    .collect();
                (w.into_bytes(), 1 + (next() % 50) as u64)
            })
            .collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| train(words.iter().map(|(w, c)| (w.as_slice(), *c)), 2000))
        };
        let one = run(1);
        assert_eq!(one.tokens.len(), 2000);
        for threads in [2, 4] {
            let many = run(threads);
            assert_eq!(many.merges, one.merges);
            assert_eq!(many.tokens, one.tokens);
        }
    }

    #[test]
    fn stops_when_no_pair_is_left() {
        let v = train_texts(&[("abc", 1)], 1000);
        assert_eq!(v.tokens.len(), 258);
        assert_eq!(v.tokens[257], b"abc");
    }
}

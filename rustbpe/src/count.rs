//! Counting unique pre-tokenization chunks ("words") over a stream of document batches.
//!
//! The corpus is never held in memory: each batch of documents is split and counted, then
//! dropped; only the unique chunks and their counts are kept. Per batch:
//! 1. the batch is cut into parts at document boundaries and the parts are counted in parallel
//!    (rayon `fold`), each worker into `N_SHARDS` small hash tables whose keys borrow the batch
//!    text (no allocation per chunk);
//! 2. the global table is sharded the same way (by the top bits of the chunk hash), so the
//!    per-worker tables are merged into it shard by shard, in parallel, without locks. Each global
//!    shard keeps its keys in one byte arena (no allocation per unique chunk).
//!
//! Counts are exact integer sums, so the result does not depend on the number of threads or the
//! batch boundaries.

use crate::pretokenize::{PatternError, Splitter};
use hashbrown::HashTable;
use rayon::prelude::*;
use std::hash::BuildHasher;

const SHARD_BITS: u32 = 4;
/// Shards of the global table: enough for every core to have work while merging, few enough that
/// a worker's per-shard tables stay warm in cache.
pub const N_SHARDS: usize = 1 << SHARD_BITS;

/// Target size of one part of a batch (bytes): small enough to balance 2..64 cores, large enough
/// that a part's local tables collapse the frequent chunks before the merge.
const PART_BYTES: usize = 1 << 20;

/// Keys up to this many bytes are stored inside the table entry (two u64 words, zero padded):
/// a lookup then compares two words instead of chasing a pointer into the text (profile: with
/// pointer keys, `memcmp` on keys scattered over the batch was ~12% of the trainer's time). About
/// 99% of chunks are this short.
const INLINE: usize = 16;

/// Hash of any byte string (long keys, and callers outside the tables).
#[inline(always)]
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    // A fixed seed: the same input gives the same table layout on every run.
    foldhash::fast::FixedState::with_seed(0x5eed_b9e0).hash_one(bytes)
}

/// Multiply-fold mixing (the core of foldhash / wyhash): a good 64-bit hash of two words.
#[inline(always)]
fn fold_mul(a: u64, b: u64) -> u64 {
    let full = (a as u128).wrapping_mul(b as u128);
    (full as u64) ^ ((full >> 64) as u64)
}

/// A chunk's key as stored in the tables: bytes inline when short, else (offset, hash).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    w0: u64,
    w1: u64,
    len: u32,
}

impl Key {
    #[inline(always)]
    fn is_inline(&self) -> bool {
        self.len as usize <= INLINE
    }

    /// The key of `text[start..start + len]`; `offset` is what a long key records as its place.
    #[inline(always)]
    fn new(text: &[u8], start: usize, len: usize, offset: u64) -> (Key, u64) {
        if len > INLINE {
            let hash = hash_bytes(&text[start..start + len]);
            let key = Key {
                w0: offset,
                w1: hash,
                len: len as u32,
            };
            return (key, hash);
        }
        let (w0, w1) = if start + 16 <= text.len() {
            let w0 = u64::from_le_bytes(text[start..start + 8].try_into().unwrap());
            let w1 = u64::from_le_bytes(text[start + 8..start + 16].try_into().unwrap());
            (
                w0 & low_bytes_mask(len),
                w1 & low_bytes_mask(len.saturating_sub(8)),
            )
        } else {
            let mut buf = [0u8; 16];
            buf[..len].copy_from_slice(&text[start..start + len]);
            (
                u64::from_le_bytes(buf[..8].try_into().unwrap()),
                u64::from_le_bytes(buf[8..].try_into().unwrap()),
            )
        };
        let key = Key {
            w0,
            w1,
            len: len as u32,
        };
        (key, key.inline_hash())
    }

    #[inline(always)]
    fn inline_hash(&self) -> u64 {
        fold_mul(
            self.w0 ^ 0x243f_6a88_85a3_08d3,
            self.w1 ^ 0x1319_8a2e_0370_7344 ^ ((self.len as u64) << 56),
        )
    }

    /// The hash this key was stored under.
    #[inline(always)]
    fn hash(&self) -> u64 {
        if self.is_inline() {
            self.inline_hash()
        } else {
            self.w1
        }
    }

    /// The bytes of an inline key.
    fn inline_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.w0.to_le_bytes());
        out[8..].copy_from_slice(&self.w1.to_le_bytes());
        out
    }
}

/// Mask keeping the low `n` bytes (n in 0..=8) of a little-endian word.
#[inline(always)]
fn low_bytes_mask(n: usize) -> u64 {
    if n >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * n)) - 1
    }
}

#[inline(always)]
fn shard_of(hash: u64) -> usize {
    (hash >> (64 - SHARD_BITS)) as usize
}

/// A batch of documents, concatenated, with the end offset of each document.
#[derive(Default)]
pub struct Batch {
    pub text: String,
    pub doc_ends: Vec<usize>,
}

impl Batch {
    pub fn push(&mut self, doc: &str) {
        self.text.push_str(doc);
        self.doc_ends.push(self.text.len());
    }

    pub fn len_docs(&self) -> usize {
        self.doc_ends.len()
    }

    pub fn clear(&mut self) {
        self.text.clear();
        self.doc_ends.clear();
    }
}

#[derive(Clone, Copy)]
struct LocalEntry {
    key: Key,
    count: u32,
}

/// One worker's counts for its parts of a batch; long keys point into the batch text.
struct LocalTables {
    shards: Vec<HashTable<LocalEntry>>,
}

impl LocalTables {
    fn new() -> LocalTables {
        LocalTables {
            shards: (0..N_SHARDS).map(|_| HashTable::new()).collect(),
        }
    }

    #[inline(always)]
    fn add(&mut self, text: &[u8], start: usize, end: usize) {
        let len = end - start;
        let (key, hash) = Key::new(text, start, len, start as u64);
        let table = &mut self.shards[shard_of(hash)];
        let found = if key.is_inline() {
            table.find_mut(hash, |e| e.key == key)
        } else {
            let bytes = &text[start..end];
            table.find_mut(hash, |e| {
                e.key.w1 == hash
                    && e.key.len == key.len
                    && &text[e.key.w0 as usize..e.key.w0 as usize + len] == bytes
            })
        };
        match found {
            Some(e) => e.count += 1,
            None => {
                table.insert_unique(hash, LocalEntry { key, count: 1 }, |e| e.key.hash());
            }
        }
    }
}

#[derive(Clone, Copy)]
struct GlobalEntry {
    key: Key,
    count: u64,
}

/// One shard of the global counts; long keys live in the shard's byte arena.
#[derive(Default)]
struct GlobalShard {
    arena: Vec<u8>,
    table: HashTable<GlobalEntry>,
}

impl GlobalShard {
    /// Add `count` to a key of a local table (`text`: the batch the local table refers to).
    fn add(&mut self, text: &[u8], key: Key, count: u64) {
        let hash = key.hash();
        if key.is_inline() {
            match self.table.find_mut(hash, |e| e.key == key) {
                Some(e) => e.count += count,
                None => {
                    self.table
                        .insert_unique(hash, GlobalEntry { key, count }, |e| e.key.hash());
                }
            }
            return;
        }
        let bytes = &text[key.w0 as usize..key.w0 as usize + key.len as usize];
        let arena = &self.arena;
        let found = self.table.find_mut(hash, |e| {
            e.key.w1 == hash
                && e.key.len == key.len
                && &arena[e.key.w0 as usize..e.key.w0 as usize + bytes.len()] == bytes
        });
        match found {
            Some(e) => e.count += count,
            None => {
                let offset = self.arena.len() as u64;
                self.arena.extend_from_slice(bytes);
                let key = Key { w0: offset, ..key };
                self.table
                    .insert_unique(hash, GlobalEntry { key, count }, |e| e.key.hash());
            }
        }
    }

    fn for_each(&self, f: &mut impl FnMut(&[u8], u64)) {
        for e in self.table.iter() {
            let len = e.key.len as usize;
            if e.key.is_inline() {
                f(&e.key.inline_bytes()[..len], e.count);
            } else {
                let start = e.key.w0 as usize;
                f(&self.arena[start..start + len], e.count);
            }
        }
    }
}

/// Unique chunks with their counts, accumulated over batches.
pub struct WordCounter {
    splitter: Splitter,
    shards: Vec<GlobalShard>,
    n_chunks: u64,
    n_bytes: u64,
}

impl WordCounter {
    pub fn new(splitter: Splitter) -> WordCounter {
        WordCounter {
            splitter,
            shards: (0..N_SHARDS).map(|_| GlobalShard::default()).collect(),
            n_chunks: 0,
            n_bytes: 0,
        }
    }

    /// Split and count the documents of a batch (in parallel on rayon's pool).
    pub fn add_batch(&mut self, batch: &Batch) -> Result<(), PatternError> {
        // Part boundaries at document ends, about PART_BYTES apart. A part is at most u32::MAX
        // bytes from its start (local entries store u32 offsets relative to the batch start, so
        // the batch itself is kept below 4 GiB by the caller).
        assert!(batch.text.len() < u32::MAX as usize, "batch too large");
        let mut parts = Vec::new();
        let mut part_start = 0;
        let mut doc_start = 0;
        let mut docs = Vec::new();
        for &end in &batch.doc_ends {
            docs.push((doc_start, end));
            doc_start = end;
            if end - part_start >= PART_BYTES {
                parts.push(std::mem::take(&mut docs));
                part_start = end;
            }
        }
        if !docs.is_empty() {
            parts.push(docs);
        }
        let text = batch.text.as_str();
        let splitter = &self.splitter;
        let locals: Vec<Result<(LocalTables, u64), PatternError>> = parts
            .par_iter()
            .fold(
                || Ok((LocalTables::new(), 0u64)),
                |acc: Result<(LocalTables, u64), PatternError>, docs| {
                    let (mut tables, mut n) = acc?;
                    let bytes = text.as_bytes();
                    for &(a, b) in docs {
                        splitter.for_each_range(&text[a..b], |s, e| {
                            tables.add(bytes, a + s, a + e);
                            n += 1;
                        })?;
                    }
                    Ok((tables, n))
                },
            )
            .collect();
        let mut tables = Vec::with_capacity(locals.len());
        for local in locals {
            let (t, n) = local?;
            self.n_chunks += n;
            tables.push(t);
        }
        self.n_bytes += text.len() as u64;
        let bytes = text.as_bytes();
        self.shards
            .par_iter_mut()
            .enumerate()
            .for_each(|(s, shard)| {
                for local in &tables {
                    for e in local.shards[s].iter() {
                        shard.add(bytes, e.key, e.count as u64);
                    }
                }
            });
        Ok(())
    }

    /// Number of unique chunks so far.
    pub fn n_unique(&self) -> usize {
        self.shards.iter().map(|s| s.table.len()).sum()
    }

    /// Number of chunks and bytes counted so far.
    pub fn totals(&self) -> (u64, u64) {
        (self.n_chunks, self.n_bytes)
    }

    /// Visit every unique chunk with its count (shard by shard; the order is unspecified).
    pub fn for_each(&self, mut f: impl FnMut(&[u8], u64)) {
        for shard in &self.shards {
            shard.for_each(&mut f);
        }
    }

    /// Hand every unique chunk with its count to `f`, freeing the table shard by shard (so the
    /// counts and the caller's copy of them are never both whole in memory).
    pub fn drain(mut self, mut f: impl FnMut(&[u8], u64)) {
        for shard in self.shards.drain(..) {
            shard.for_each(&mut f);
        }
    }

    /// Count a single text (a convenience for tests and small inputs).
    pub fn add_text(&mut self, text: &str) -> Result<(), PatternError> {
        let mut batch = Batch::default();
        batch.push(text);
        self.add_batch(&batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretokenize::GPT4_PATTERN;
    use std::collections::HashMap;

    fn counts(counter: &WordCounter) -> HashMap<Vec<u8>, u64> {
        let mut out = HashMap::new();
        counter.for_each(|k, c| {
            assert!(out.insert(k.to_vec(), c).is_none());
        });
        out
    }

    #[test]
    fn counts_match_a_plain_count_and_ignore_batching() {
        let splitter = Splitter::new(GPT4_PATTERN).unwrap();
        let docs: Vec<String> = (0..3000)
            .map(|i| format!("doc {i}: the cat's hat {} \n\n", "ab ".repeat(i % 7)))
            .collect();
        let mut expected: HashMap<Vec<u8>, u64> = HashMap::new();
        for d in &docs {
            for chunk in splitter.split(d).unwrap() {
                *expected.entry(chunk.as_bytes().to_vec()).or_default() += 1;
            }
        }
        for batch_docs in [1, 7, 3000] {
            let mut counter = WordCounter::new(splitter.clone());
            for group in docs.chunks(batch_docs) {
                let mut batch = Batch::default();
                for d in group {
                    batch.push(d);
                }
                counter.add_batch(&batch).unwrap();
            }
            assert_eq!(counts(&counter), expected);
            assert_eq!(counter.n_unique(), expected.len());
        }
    }

    #[test]
    fn chunks_do_not_cross_documents() {
        let mut counter = WordCounter::new(Splitter::new(GPT4_PATTERN).unwrap());
        let mut batch = Batch::default();
        batch.push("ab");
        batch.push("cd");
        counter.add_batch(&batch).unwrap();
        let c = counts(&counter);
        assert_eq!(c.len(), 2);
        assert_eq!(c[b"ab".as_slice()], 1);
    }
}

//! Encoding with a trained vocabulary, token for token what tiktoken does with the same ranks.
//!
//! tiktoken's rule (the one a `tiktoken.Encoding` built from our ranks applies): split the text
//! with the pattern; a chunk that is itself a token is that token; otherwise start from its bytes
//! and repeatedly merge the adjacent pair of parts whose concatenated bytes have the lowest rank
//! (leftmost on ties) until no adjacent concatenation is a token. Note that this looks up the
//! *bytes* of the concatenation, not the pair of ids that created the token in training, so a
//! token is reachable from any split of its bytes; our encoder does the same, so the ids always
//! agree with tiktoken.

use crate::pretokenize::{PatternError, Splitter};
use crate::train::Vocab;
use rayon::prelude::*;

type BytesMap = hashbrown::HashMap<Vec<u8>, u32, foldhash::fast::FixedState>;

/// A vocabulary ready to encode and decode.
#[derive(Clone)]
pub struct Encoder {
    splitter: Splitter,
    ranks: BytesMap,
    tokens: Vec<Vec<u8>>,
}

/// An id that is not in the vocabulary.
#[derive(Debug)]
pub struct UnknownToken(pub u32);

impl Encoder {
    pub fn new(vocab: &Vocab, splitter: Splitter) -> Encoder {
        let mut ranks = BytesMap::with_capacity_and_hasher(vocab.tokens.len(), Default::default());
        for (id, t) in vocab.tokens.iter().enumerate() {
            ranks.insert(t.clone(), id as u32);
        }
        Encoder {
            splitter,
            ranks,
            tokens: vocab.tokens.clone(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    #[inline]
    fn rank(&self, bytes: &[u8]) -> u32 {
        self.ranks.get(bytes).copied().unwrap_or(u32::MAX)
    }

    /// Append the tokens of one chunk to `out`.
    fn encode_chunk(&self, chunk: &[u8], out: &mut Vec<u32>) {
        if let Some(&id) = self.ranks.get(chunk) {
            out.push(id);
            return;
        }
        // bounds[i]..bounds[i + 1] is part i; pair_rank[i] is the rank of parts i and i + 1 joined.
        let n = chunk.len();
        let mut bounds: Vec<usize> = (0..=n).collect();
        let mut pair_rank: Vec<u32> = (0..n - 1).map(|i| self.rank(&chunk[i..i + 2])).collect();
        loop {
            let mut best = u32::MAX;
            let mut at = 0;
            for (i, &r) in pair_rank.iter().enumerate() {
                if r < best {
                    best = r;
                    at = i;
                }
            }
            if best == u32::MAX {
                break;
            }
            // Join parts `at` and `at + 1`: drop the boundary between them and re-rank the
            // neighbouring pairs.
            bounds.remove(at + 1);
            pair_rank.remove(at);
            if at + 2 < bounds.len() {
                pair_rank[at] = self.rank(&chunk[bounds[at]..bounds[at + 2]]);
            }
            if at > 0 {
                pair_rank[at - 1] = self.rank(&chunk[bounds[at - 1]..bounds[at + 1]]);
            }
        }
        out.extend(bounds.windows(2).map(|w| self.ranks[&chunk[w[0]..w[1]]]));
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, PatternError> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        let bytes = text.as_bytes();
        self.splitter
            .for_each_range(text, |a, b| self.encode_chunk(&bytes[a..b], &mut out))?;
        Ok(out)
    }

    /// Token ids of each text, in parallel on rayon's pool.
    pub fn encode_batch<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
    ) -> Result<Vec<Vec<u32>>, PatternError> {
        texts.par_iter().map(|t| self.encode(t.as_ref())).collect()
    }

    /// The bytes of a sequence of ids.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, UnknownToken> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let t = self.tokens.get(id as usize).ok_or(UnknownToken(id))?;
            out.extend_from_slice(t);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretokenize::GPT4_PATTERN;
    use crate::train::Merge;

    fn vocab_with(extra: &[&[u8]]) -> Vocab {
        let mut v = Vocab::bytes_only();
        for t in extra {
            v.tokens.push(t.to_vec());
            v.merges.push(Merge {
                left: 0,
                right: 0,
                id: v.tokens.len() as u32 - 1,
            });
        }
        v
    }

    #[test]
    fn lowest_rank_pair_merges_first_and_any_split_reaches_a_token() {
        // "bc" (257) outranks "ab" (258); "abc" (259) is then reached as a + bc.
        let v = vocab_with(&[b"xx", b"bc", b"ab", b"abc"]);
        let e = Encoder::new(&v, Splitter::new(GPT4_PATTERN).unwrap());
        assert_eq!(e.encode("abcd").unwrap(), vec![259, b'd' as u32]);
        assert_eq!(e.encode("abd").unwrap(), vec![258, b'd' as u32]);
        assert_eq!(e.encode("xbcab").unwrap(), vec![b'x' as u32, 257, 258]);
        let ids = e.encode("hello  world\n").unwrap();
        assert_eq!(e.decode_bytes(&ids).unwrap(), b"hello  world\n");
        assert!(e.decode_bytes(&[260]).is_err());
    }
}

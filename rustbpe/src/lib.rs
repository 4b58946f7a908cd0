//! nanochat's byte-level BPE trainer.
//!
//! Pipeline: documents -> [`pretokenize`] (split into chunks by the GPT-4-style pattern) ->
//! [`count`] (unique chunks with counts, streamed batch by batch, in parallel) -> [`train`] (the
//! merge loop) -> [`encode`] (tiktoken-compatible encoding of the trained vocabulary).
//!
//! The pure-Rust core below knows nothing about Python; the PyO3 module `nanochat_bpe` lives in
//! `python.rs` behind the `python` cargo feature, which maturin enables.

pub mod count;
pub mod encode;
pub mod pretokenize;
pub mod train;
pub mod unicode;

#[cfg(feature = "python")]
mod python;

pub use count::{Batch, WordCounter};
pub use encode::Encoder;
pub use pretokenize::{Splitter, GPT4_PATTERN, NANOCHAT_PATTERN};
pub use train::{train, train_words, Merge, Vocab, Words};

/// Smallest and largest vocabulary the trainer accepts: at least one merge, ids below 2^17.
pub const MIN_VOCAB_SIZE: usize = 257;
pub const MAX_VOCAB_SIZE: usize = 1 << 17;

/// Train on a slice of documents in one call (tests, small corpora, Rust callers).
pub fn train_on_texts<S: AsRef<str>>(
    texts: &[S],
    vocab_size: usize,
    pattern: &str,
) -> Result<(Vocab, Encoder), pretokenize::PatternError> {
    let splitter = Splitter::new(pattern)?;
    let mut counter = WordCounter::new(splitter.clone());
    let mut batch = Batch::default();
    for t in texts {
        batch.push(t.as_ref());
    }
    counter.add_batch(&batch)?;
    let mut words = Vec::with_capacity(counter.n_unique());
    counter.for_each(|k, c| words.push((k.to_vec(), c)));
    let vocab = train(words.iter().map(|(k, c)| (k.as_slice(), *c)), vocab_size);
    let encoder = Encoder::new(&vocab, splitter);
    Ok((vocab, encoder))
}

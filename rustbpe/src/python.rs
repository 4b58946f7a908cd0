//! The Python module `nanochat_bpe` (PyO3). Thin: argument checks, moving text out of Python
//! objects, and releasing the GIL around everything heavy; the work is in the pure-Rust core.

use crate::count::{Batch, WordCounter};
use crate::encode::Encoder;
use crate::pretokenize::{PatternError, Splitter, GPT4_PATTERN, NANOCHAT_PATTERN};
use crate::train::{train_words, Vocab, Words};
use crate::{MAX_VOCAB_SIZE, MIN_VOCAB_SIZE};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use std::borrow::Cow;
use std::sync::mpsc::sync_channel;

/// A batch is handed to the counting thread when it holds `buffer_size` documents or this many
/// bytes, whichever comes first: memory stays bounded (one batch filling, one queued, one being
/// counted) whatever the document sizes, and batches are large enough to keep every core busy.
const BATCH_BYTES: usize = 8 << 20;

fn value_error(e: PatternError) -> PyErr {
    PyValueError::new_err(e.0)
}

/// Largest document (UTF-8 bytes): batch offsets are u32 (see count.rs).
const MAX_DOC_BYTES: usize = 1 << 31;

/// Append a document to the batch; ValueError for one too large to count.
fn push_doc(batch: &mut Batch, doc: &str) -> PyResult<()> {
    if doc.len() > MAX_DOC_BYTES {
        return Err(PyValueError::new_err(format!(
            "train_from_iterator: a document of {} bytes is larger than the 2 GiB limit; split it",
            doc.len()
        )));
    }
    batch.push(doc);
    Ok(())
}

/// The UTF-8 text of a str. Lone surrogates (which UTF-8 cannot hold) become one U+FFFD each,
/// as tiktoken does (through UTF-16 with surrogatepass, decoded with errors="replace").
fn utf8<'a>(s: &'a Bound<'_, PyString>) -> PyResult<Cow<'a, str>> {
    match s.to_str() {
        Ok(t) => Ok(Cow::Borrowed(t)),
        Err(_) => {
            let fixed = s
                .call_method1("encode", ("utf-16", "surrogatepass"))?
                .call_method1("decode", ("utf-16", "replace"))?;
            Ok(Cow::Owned(fixed.cast::<PyString>()?.to_str()?.to_owned()))
        }
    }
}

/// Byte-level BPE tokenizer: train on an iterator of str, export tiktoken ranks, encode/decode.
///
/// A new Tokenizer has the 256 byte tokens, no merges and the GPT-4 split pattern.
#[pyclass(name = "Tokenizer", module = "nanochat_bpe")]
pub struct PyTokenizer {
    pattern: String,
    vocab: Vocab,
    encoder: Encoder,
}

#[pymethods]
impl PyTokenizer {
    #[new]
    fn new() -> Self {
        let vocab = Vocab::bytes_only();
        let encoder = Encoder::new(
            &vocab,
            Splitter::new(GPT4_PATTERN).expect("built-in pattern"),
        );
        PyTokenizer {
            pattern: GPT4_PATTERN.to_string(),
            vocab,
            encoder,
        }
    }

    /// Train byte-level BPE on the texts of `iterator` up to `vocab_size` tokens (256 byte tokens
    /// plus vocab_size - 256 merges; fewer if the corpus runs out of pairs to merge).
    ///
    /// iterator: an iterable of str (one document each) or of lists of str (batches of documents,
    ///     which saves Python overhead). Documents are pulled `buffer_size` at a time (or 8 MiB of
    ///     text, whichever is first) under the GIL and counted in a background thread with the
    ///     GIL released, so the iterator keeps running while earlier batches are counted; the
    ///     corpus is never held in memory, only its unique chunks with their counts.
    /// vocab_size: 257 ..= 131072.
    /// pattern: the split regex; None -> GPT-4's pattern (GPT4_PATTERN). GPT4_PATTERN and
    ///     NANOCHAT_PATTERN use a hand-written scanner, any other pattern fancy-regex.
    ///
    /// Raises ValueError for a vocab_size or buffer_size out of range or a pattern that does not
    /// compile, TypeError for an item that is not a str (or list of str); exceptions raised by
    /// the iterator propagate. Replaces any previous training.
    #[pyo3(signature = (iterator, vocab_size, buffer_size = 8192, pattern = None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if !(MIN_VOCAB_SIZE as i64..=MAX_VOCAB_SIZE as i64).contains(&vocab_size) {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be in {MIN_VOCAB_SIZE}..={MAX_VOCAB_SIZE} (256 byte tokens + at least one merge), got {vocab_size}"
            )));
        }
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!(
                "buffer_size must be >= 1, got {buffer_size}"
            )));
        }
        let vocab_size = vocab_size as usize;
        let buffer_size = buffer_size as usize;
        let pattern = pattern.unwrap_or_else(|| GPT4_PATTERN.to_string());
        let splitter = Splitter::new(&pattern).map_err(value_error)?;
        let iter = iterator.try_iter()?;

        let counter = WordCounter::new(splitter.clone());
        let counted: PyResult<WordCounter> = std::thread::scope(|scope| {
            // The counting thread owns the counter; full batches go to it over a channel of
            // depth 1, emptied batches come back for reuse (no reallocation per batch).
            let (full_tx, full_rx) = sync_channel::<Batch>(1);
            let (empty_tx, empty_rx) = sync_channel::<Batch>(2);
            let worker = scope.spawn(move || -> Result<WordCounter, PatternError> {
                let mut counter = counter;
                for mut batch in full_rx {
                    counter.add_batch(&batch)?;
                    batch.clear();
                    let _ = empty_tx.try_send(batch);
                }
                Ok(counter)
            });
            let mut batch = Batch::default();
            let send = |batch: &mut Batch| -> bool {
                let next = empty_rx.try_recv().unwrap_or_default();
                let full = std::mem::replace(batch, next);
                py.detach(|| full_tx.send(full)).is_ok()
            };
            let fed: PyResult<()> = (|| {
                for item in iter {
                    let item = item?;
                    if let Ok(s) = item.cast::<PyString>() {
                        push_doc(&mut batch, &utf8(s)?)?;
                    } else if let Ok(list) = item.cast::<PyList>() {
                        for doc in list.iter() {
                            let s = doc.cast::<PyString>().map_err(|_| {
                                PyTypeError::new_err(format!(
                                    "train_from_iterator: expected str items in a list, got {}",
                                    doc.get_type()
                                ))
                            })?;
                            push_doc(&mut batch, &utf8(s)?)?;
                        }
                    } else {
                        return Err(PyTypeError::new_err(format!(
                            "train_from_iterator: expected str or list of str items, got {}",
                            item.get_type()
                        )));
                    }
                    if (batch.len_docs() >= buffer_size || batch.text.len() >= BATCH_BYTES)
                        && !send(&mut batch)
                    {
                        break; // the counting thread stopped with an error, reported below
                    }
                }
                if batch.len_docs() > 0 {
                    send(&mut batch);
                }
                Ok(())
            })();
            drop(full_tx);
            let joined = py.detach(|| worker.join());
            let counter = match joined {
                Ok(result) => result.map_err(value_error),
                Err(panic) => std::panic::resume_unwind(panic),
            };
            fed?;
            counter
        });
        let counter = counted?;

        let vocab = py.detach(|| {
            let mut words = Words::default();
            counter.drain(|bytes, count| words.push(bytes, count));
            train_words(words, vocab_size)
        });
        self.encoder = Encoder::new(&vocab, splitter);
        self.vocab = vocab;
        self.pattern = pattern;
        Ok(())
    }

    /// A Tokenizer for encoding with given tiktoken-style ranks (no training; get_merges() is
    /// then empty).
    ///
    /// mergeable_ranks: list of (bytes, rank) or dict bytes -> rank, ranks 0..n-1, every token's
    ///     bytes distinct and every single byte a token.
    /// pattern: the split regex; None -> GPT4_PATTERN.
    /// Raises ValueError if the ranks are not as above or the pattern does not compile.
    #[staticmethod]
    #[pyo3(signature = (mergeable_ranks, pattern = None))]
    fn from_ranks(mergeable_ranks: &Bound<'_, PyAny>, pattern: Option<String>) -> PyResult<Self> {
        let items: Vec<(Vec<u8>, usize)> = match mergeable_ranks.cast::<pyo3::types::PyDict>() {
            Ok(d) => d.items().extract()?,
            Err(_) => mergeable_ranks.extract()?,
        };
        let n = items.len();
        let mut tokens: Vec<Option<Vec<u8>>> = vec![None; n];
        for (bytes, rank) in items {
            let slot = tokens.get_mut(rank).ok_or_else(|| {
                PyValueError::new_err(format!("from_ranks: rank {rank} out of range 0..{n}"))
            })?;
            if slot.replace(bytes).is_some() {
                return Err(PyValueError::new_err(format!(
                    "from_ranks: rank {rank} given twice"
                )));
            }
        }
        let tokens: Vec<Vec<u8>> = tokens
            .into_iter()
            .map(|t| t.expect("n distinct ranks in 0..n"))
            .collect();
        let distinct: std::collections::HashSet<&[u8]> =
            tokens.iter().map(|t| t.as_slice()).collect();
        if distinct.len() != n {
            return Err(PyValueError::new_err(
                "from_ranks: two ranks have the same bytes",
            ));
        }
        if let Some(b) = (0..=255u8).find(|b| !distinct.contains([*b].as_slice())) {
            return Err(PyValueError::new_err(format!(
                "from_ranks: the single byte {b} is not a token"
            )));
        }
        let pattern = pattern.unwrap_or_else(|| GPT4_PATTERN.to_string());
        let splitter = Splitter::new(&pattern).map_err(value_error)?;
        let vocab = Vocab {
            tokens,
            merges: Vec::new(),
        };
        Ok(PyTokenizer {
            encoder: Encoder::new(&vocab, splitter),
            vocab,
            pattern,
        })
    }

    /// The split pattern (str).
    fn get_pattern(&self) -> &str {
        &self.pattern
    }

    /// list[tuple[bytes, int]]: every token's bytes with its rank (= id), in rank order: the 256
    /// byte tokens (rank = byte value), then one per merge that made a new token. The format of
    /// tiktoken's mergeable_ranks.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items = self
            .vocab
            .tokens
            .iter()
            .enumerate()
            .map(|(rank, bytes)| {
                PyTuple::new(
                    py,
                    [
                        PyBytes::new(py, bytes).into_any(),
                        rank.into_pyobject(py)?.into_any(),
                    ],
                )
            })
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }

    /// list[tuple[int, int, int]]: the merges in training order as (left id, right id, result
    /// id). The result is a new token, or an existing one when the pair's bytes already were a
    /// token (then no rank is used).
    fn get_merges(&self) -> Vec<(u32, u32, u32)> {
        self.vocab
            .merges
            .iter()
            .map(|m| (m.left, m.right, m.id))
            .collect()
    }

    /// Number of tokens (int): 256 + the merges that made new tokens.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.vocab.tokens.len()
    }

    /// Token ids (list[int]) of a str, exactly as tiktoken with the same ranks and pattern.
    fn encode(&self, py: Python<'_>, text: &Bound<'_, PyString>) -> PyResult<Vec<u32>> {
        let text = utf8(text)?;
        let text: &str = &text;
        py.detach(|| self.encoder.encode(text)).map_err(value_error)
    }

    /// Token ids of each str of a list (list[list[int]]), encoded in parallel without the GIL.
    fn batch_encode(&self, py: Python<'_>, texts: &Bound<'_, PyList>) -> PyResult<Vec<Vec<u32>>> {
        let owned: Vec<String> = texts
            .iter()
            .map(|t| {
                let s = t.cast::<PyString>().map_err(|_| {
                    PyTypeError::new_err(format!(
                        "batch_encode: expected a list of str, got an item of {}",
                        t.get_type()
                    ))
                })?;
                Ok(utf8(s)?.into_owned())
            })
            .collect::<PyResult<_>>()?;
        py.detach(|| self.encoder.encode_batch(&owned))
            .map_err(value_error)
    }

    /// The str of a sequence of ids (invalid UTF-8 becomes U+FFFD, as in tiktoken's decode).
    /// Raises ValueError for an id outside the vocabulary.
    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        let bytes = self.encoder.decode_bytes(&ids).map_err(|e| {
            PyValueError::new_err(format!(
                "decode: token id {} is not in the vocabulary (size {})",
                e.0,
                self.encoder.vocab_size()
            ))
        })?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// nanochat's byte-level BPE trainer (Rust): see Tokenizer. Imported as `nanochat_bpe`.
#[pymodule]
#[pyo3(name = "_core")]
fn nanochat_bpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTokenizer>()?;
    m.add("GPT4_PATTERN", GPT4_PATTERN)?;
    m.add("NANOCHAT_PATTERN", NANOCHAT_PATTERN)?;
    m.add("MIN_VOCAB_SIZE", MIN_VOCAB_SIZE)?;
    m.add("MAX_VOCAB_SIZE", MAX_VOCAB_SIZE)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

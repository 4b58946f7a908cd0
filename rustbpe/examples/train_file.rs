//! Profile the trainer without Python: train on a file of NUL-separated UTF-8 documents and
//! print the time of each phase.
//!
//!     cargo run --release --example train_file -- corpus.bin 65536
//!     perf record -g target/release/examples/train_file corpus.bin 65536

use nanochat_bpe::{train_words, Batch, Splitter, WordCounter, Words, GPT4_PATTERN};
use std::time::Instant;

/// CPU seconds (user + system, all threads) of this process so far, from /proc (Linux): on a
/// shared machine a steadier measure of work than wall time.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|x| x.parse::<f64>().ok()).sum()
    });
    ticks / 100.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (path, vocab_size) = match args.as_slice() {
        [_, path, v] => (path.clone(), v.parse::<usize>().expect("vocab size")),
        _ => panic!("usage: train_file <nul-separated docs file> <vocab size>"),
    };
    let data = std::fs::read(&path).expect("readable file");
    let (t0, c0) = (Instant::now(), cpu_seconds());
    let mut counter = WordCounter::new(Splitter::new(GPT4_PATTERN).unwrap());
    let mut batch = Batch::default();
    for doc in data.split(|&b| b == 0) {
        batch.push(std::str::from_utf8(doc).expect("UTF-8"));
        if batch.text.len() >= 8 << 20 {
            counter.add_batch(&batch).unwrap();
            batch.clear();
        }
    }
    counter.add_batch(&batch).unwrap();
    let (n_chunks, n_bytes) = counter.totals();
    let (t1, c1) = (Instant::now(), cpu_seconds());
    eprintln!(
        "count: {:.3}s wall {:.2}s cpu  {n_bytes} bytes, {n_chunks} chunks, {} unique",
        (t1 - t0).as_secs_f64(),
        c1 - c0,
        counter.n_unique()
    );
    let mut words = Words::default();
    counter.drain(|k, c| words.push(k, c));
    let (t2, c2) = (Instant::now(), cpu_seconds());
    eprintln!(
        "words: {:.3}s  {} words",
        (t2 - t1).as_secs_f64(),
        words.len()
    );
    let vocab = train_words(words, vocab_size);
    let (t3, c3) = (Instant::now(), cpu_seconds());
    eprintln!(
        "merge: {:.3}s wall {:.2}s cpu  {} tokens, {} merges",
        (t3 - t2).as_secs_f64(),
        c3 - c2,
        vocab.tokens.len(),
        vocab.merges.len()
    );
    // A fingerprint of the merges, to compare implementations.
    let fingerprint = vocab.merges.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, m| {
        [m.left, m.right, m.id]
            .iter()
            .fold(h, |h, &x| (h ^ x as u64).wrapping_mul(0x100_0000_01b3))
    });
    eprintln!("merges fingerprint: {fingerprint:016x}");
}

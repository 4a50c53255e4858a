//! Byte-level BPE training over a multiset of words (distinct regex chunks with their counts).
//!
//! Algorithm: count every adjacent token pair once (in parallel), keep a max-heap of (count, pair)
//! with lazy invalidation, and after each merge update only the words that contain the merged pair,
//! found through a pair -> word-index occurrence map.
//!
//! Tie rule (part of the contract, mirrored by tests/bpe_reference.py): each step merges the pair
//! with the highest count, where a pair's count is the sum over words of word count times the number
//! of adjacent positions holding that pair (overlaps included: "aaa" holds (a, a) twice); among equal
//! counts, the smallest pair (left id, then right id) wins. Merging replaces occurrences left to
//! right without overlap, and the i-th merge creates token id 256 + i.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use rayon::prelude::*;

use crate::fxhash::{FxHashMap, FxHashSet};

pub type Pair = (u32, u32);

/// Human-readable statement of the tie rule, exported to Python as `rustbpe.TIE_BREAK`.
pub const TIE_BREAK: &str =
    "highest pair count first; equal counts: smallest (left id, right id) first";

/// Heap entry ordered by count, then by the reversed pair so that smaller pairs pop first.
#[derive(PartialEq, Eq)]
struct Candidate {
    count: i64,
    pair: Pair,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.count, Reverse(self.pair)).cmp(&(other.count, Reverse(other.pair)))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Mutable training state: the words, their pair statistics, and the candidate heap.
struct State {
    words: Vec<Vec<u32>>,
    counts: Vec<i64>,
    pair_counts: FxHashMap<Pair, i64>,
    /// Word indices that may contain a pair (a superset: stale entries are skipped when merging).
    occurs: FxHashMap<Pair, FxHashSet<u32>>,
    heap: BinaryHeap<Candidate>,
}

type PairStats = (FxHashMap<Pair, i64>, FxHashMap<Pair, Vec<u32>>);

fn add_word_stats(stats: &mut PairStats, index: usize, word: &[u32], count: i64) {
    for w in word.windows(2) {
        let pair = (w[0], w[1]);
        *stats.0.entry(pair).or_insert(0) += count;
        let at = stats.1.entry(pair).or_default();
        // Windows of one word come in order, so a repeat of this word index is always the last entry.
        if at.last() != Some(&(index as u32)) {
            at.push(index as u32);
        }
    }
}

fn merge_stats(mut a: PairStats, b: PairStats) -> PairStats {
    for (pair, n) in b.0 {
        *a.0.entry(pair).or_insert(0) += n;
    }
    for (pair, mut at) in b.1 {
        a.1.entry(pair).or_default().append(&mut at);
    }
    a
}

impl State {
    fn new(words: Vec<Vec<u32>>, counts: Vec<i64>) -> State {
        assert_eq!(words.len(), counts.len(), "one count per word");
        assert!(
            words.len() <= u32::MAX as usize,
            "word indices are stored as u32"
        );
        let (pair_counts, occurs_lists) = words
            .par_iter()
            .zip(counts.par_iter())
            .enumerate()
            .fold(PairStats::default, |mut stats, (i, (word, &count))| {
                add_word_stats(&mut stats, i, word, count);
                stats
            })
            .reduce(PairStats::default, merge_stats);
        let occurs = occurs_lists
            .into_iter()
            .map(|(pair, at)| (pair, at.into_iter().collect::<FxHashSet<u32>>()))
            .collect();
        let heap = pair_counts
            .iter()
            .map(|(&pair, &count)| Candidate { count, pair })
            .collect();
        State {
            words,
            counts,
            pair_counts,
            occurs,
            heap,
        }
    }

    /// Pop heap entries until one matches the pair's current count (older entries are stale).
    fn pop_best(&mut self) -> Option<Candidate> {
        while let Some(top) = self.heap.pop() {
            if self.pair_counts.get(&top.pair) == Some(&top.count) {
                return Some(top);
            }
        }
        None
    }

    /// Merge `pair` into `new_id` in every word containing it and update the statistics.
    ///
    /// `delta` collects (pair, count change) entries; a Vec that is sorted afterwards is cheaper than a
    /// hash map here, whose `clear()` would cost its whole (once large) capacity on every merge.
    fn apply_merge(
        &mut self,
        pair: Pair,
        new_id: u32,
        delta: &mut Vec<(Pair, i64)>,
        scratch: &mut Vec<u32>,
    ) {
        let merged_count = self
            .pair_counts
            .remove(&pair)
            .expect("merged pair has a count");
        let at = self.occurs.remove(&pair).unwrap_or_default();
        delta.clear();
        for index in at {
            let word = &mut self.words[index as usize];
            let count = self.counts[index as usize];
            if !merge_word(word, pair, new_id, count, scratch, delta) {
                continue;
            }
            // The new pairs are exactly those next to a new token (it did not exist before this merge).
            for w in scratch.windows(2) {
                if w[0] == new_id || w[1] == new_id {
                    delta.push(((w[0], w[1]), count));
                    self.occurs.entry((w[0], w[1])).or_default().insert(index);
                }
            }
            std::mem::swap(word, scratch);
        }
        delta.sort_unstable_by_key(|&(p, _)| p);
        let mut removed = 0;
        let mut i = 0;
        while i < delta.len() {
            let p = delta[i].0;
            let mut d = 0;
            while i < delta.len() && delta[i].0 == p {
                d += delta[i].1;
                i += 1;
            }
            if p == pair {
                removed += d;
            } else if d != 0 {
                self.change_count(p, d);
            }
        }
        assert_eq!(
            removed, -merged_count,
            "every occurrence of the merged pair is replaced"
        );
    }

    fn change_count(&mut self, pair: Pair, d: i64) {
        let count = self.pair_counts.entry(pair).or_insert(0);
        *count += d;
        let now = *count;
        assert!(now >= 0, "pair counts never go negative");
        if now == 0 {
            self.pair_counts.remove(&pair);
            self.occurs.remove(&pair);
        } else {
            self.heap.push(Candidate { count: now, pair });
        }
    }
}

/// Write `word` with every left-to-right, non-overlapping occurrence of `pair` replaced by `new_id`
/// into `out`, and record in `delta` the removal (weighted by `count`) of each old adjacent pair that
/// touches a replaced occurrence: the pair itself and its left and right neighbours, each once.
/// Returns whether anything was replaced.
fn merge_word(
    word: &[u32],
    pair: Pair,
    new_id: u32,
    count: i64,
    out: &mut Vec<u32>,
    delta: &mut Vec<(Pair, i64)>,
) -> bool {
    out.clear();
    let n = word.len();
    let mut i = 0;
    let mut changed = false;
    // Pairs are indexed by their left position; everything below `next_unremoved` is already recorded.
    let mut next_unremoved = 0;
    while i < n {
        if i + 1 < n && word[i] == pair.0 && word[i + 1] == pair.1 {
            let first = i.saturating_sub(1).max(next_unremoved);
            let last = (i + 1).min(n - 2);
            for j in first..=last {
                delta.push(((word[j], word[j + 1]), -count));
            }
            next_unremoved = last + 1;
            out.push(new_id);
            i += 2;
            changed = true;
        } else {
            out.push(word[i]);
            i += 1;
        }
    }
    changed
}

/// Learn up to `num_merges` merges; the i-th returned pair becomes token 256 + i. Stops early when no
/// adjacent pair is left.
pub fn learn_merges(words: Vec<Vec<u32>>, counts: Vec<i64>, num_merges: u32) -> Vec<Pair> {
    let mut state = State::new(words, counts);
    let mut merges = Vec::with_capacity(num_merges as usize);
    let mut delta = Vec::new();
    let mut scratch = Vec::new();
    for i in 0..num_merges {
        let best = match state.pop_best() {
            Some(best) => best,
            None => break,
        };
        state.apply_merge(best.pair, 256 + i, &mut delta, &mut scratch);
        merges.push(best.pair);
    }
    merges
}

/// Turn chunk counts into byte-id words, dropping single-byte chunks (they hold no pair).
pub fn words_from_chunks(chunks: FxHashMap<String, i64>) -> (Vec<Vec<u32>>, Vec<i64>) {
    let mut words = Vec::with_capacity(chunks.len());
    let mut counts = Vec::with_capacity(chunks.len());
    for (chunk, count) in chunks {
        if chunk.len() < 2 {
            continue;
        }
        words.push(chunk.bytes().map(u32::from).collect());
        counts.push(count);
    }
    (words, counts)
}

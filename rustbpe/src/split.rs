//! Pre-tokenization: split texts into regex chunks and count each distinct chunk, in parallel.
//!
//! BPE merges never cross chunk boundaries, so training only needs the multiset of chunks; counting
//! distinct chunks first shrinks the training problem from "all text" to "all distinct words".
//!
//! Any pattern runs on `fancy_regex` (backtracking, supports lookaround and possessive quantifiers).
//! The GPT-4 pattern family (see `gpt4_family`) is recognised and run on the much faster `regex`
//! crate instead, in a lowered form that gives identical chunks:
//! - the possessive quantifiers (`?+`, `++`) never change a result in this pattern: each guards a
//!   character class that is disjoint from what follows it, so giving characters back can never let
//!   the branch match, and plain greedy quantifiers are equivalent;
//! - `\s+(?!\S)` is the only lookaround. It only decides matches that are pure whitespace without a
//!   line break (those with one are taken earlier by `\s*[\r\n]`). Dropping that branch, the final
//!   `\s+` takes the whole whitespace run instead; the original keeps the run's last character for
//!   the next chunk when the run is followed by text and is longer than one character. `next_chunk`
//!   applies exactly that correction and resumes scanning at the kept character.

use fancy_regex::Regex as FancyRegex;
use rayon::prelude::*;
use regex::Regex;

use crate::fxhash::FxHashMap;

/// Pattern text of the GPT-4 (cl100k) split pattern with digit runs of up to `max_digits`:
/// contractions, letter runs with one optional leading non-letter, digit runs, punctuation runs,
/// line breaks, and whitespace that leaves the space before a word to that word.
pub fn gpt4_family(max_digits: u32) -> String {
    format!(
        r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{{L}}\p{{N}}]?+\p{{L}}+|\p{{N}}{{1,{}}}| ?[^\s\p{{L}}\p{{N}}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
        max_digits
    )
}

/// The lowered equivalent of `gpt4_family(max_digits)` (module docs), anchored at the search start.
fn gpt4_family_lowered(max_digits: u32) -> String {
    format!(
        r"^(?:'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{{1,{}}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]|\s+)",
        max_digits
    )
}

/// The default pattern: GPT-4's, with digit runs of up to three.
pub fn default_pattern() -> String {
    gpt4_family(3)
}

enum Engine {
    Lowered(Regex),
    Fancy(FancyRegex),
}

/// A compiled split pattern. Holds one engine per rayon worker (plus one for other threads) because
/// both regex crates share a scratch-space pool per compiled regex, which is lock-protected for all
/// but its first user; private copies keep the workers from contending on it.
pub struct Splitter {
    engines: Vec<Engine>,
}

fn is_gpt4_family(pattern: &str) -> Option<u32> {
    (1..=9).find(|&k| pattern == gpt4_family(k))
}

fn compile_engine(pattern: &str) -> Result<Engine, String> {
    match is_gpt4_family(pattern) {
        Some(k) => Regex::new(&gpt4_family_lowered(k))
            .map(Engine::Lowered)
            .map_err(|e| format!("internal error compiling the lowered GPT-4 pattern: {}", e)),
        None => FancyRegex::new(pattern)
            .map(Engine::Fancy)
            .map_err(|e| format!("Invalid regex pattern: {}", e)),
    }
}

/// Length of the chunk of `rest` under the lowered GPT-4 pattern, with the whitespace correction.
fn next_lowered_chunk(regex: &Regex, rest: &str) -> usize {
    let found = regex
        .find(rest)
        .expect("the lowered pattern matches at every character");
    let end = found.end();
    assert!(
        end > 0,
        "the lowered pattern never matches the empty string"
    );
    let piece = &rest[..end];
    if end < rest.len() && piece.chars().all(char::is_whitespace) && !piece.contains(['\r', '\n']) {
        let last = piece.chars().next_back().expect("non-empty").len_utf8();
        if end > last {
            return end - last;
        }
    }
    end
}

impl Splitter {
    /// Compile `pattern`; the error message is meant for the user.
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        let copies = rayon::current_num_threads() + 1;
        // Each compile takes milliseconds; on many-core machines do them in parallel.
        let engines = (0..copies)
            .into_par_iter()
            .map(|_| compile_engine(pattern))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Splitter { engines })
    }

    fn engine(&self) -> &Engine {
        let last = self.engines.len() - 1;
        let index = rayon::current_thread_index().map_or(last, |i| i.min(last));
        &self.engines[index]
    }

    /// Call `visit` with each chunk of `text`, in order.
    pub fn for_each_chunk<'t>(
        &self,
        text: &'t str,
        mut visit: impl FnMut(&'t str),
    ) -> Result<(), String> {
        match self.engine() {
            Engine::Lowered(regex) => {
                let mut pos = 0;
                while pos < text.len() {
                    let len = next_lowered_chunk(regex, &text[pos..]);
                    visit(&text[pos..pos + len]);
                    pos += len;
                }
            }
            Engine::Fancy(regex) => {
                for found in regex.find_iter(text) {
                    let found =
                        found.map_err(|e| format!("regex failed while splitting text: {}", e))?;
                    visit(found.as_str());
                }
            }
        }
        Ok(())
    }

    /// Split every text of `batch` (in parallel) and add its chunk counts to `totals`.
    ///
    /// Each rayon job counts into its own map of borrowed slices (no allocation per chunk); only the
    /// distinct chunks of each job are copied into the owned `totals` map afterwards.
    pub fn count_batch_into(
        &self,
        batch: &[String],
        totals: &mut FxHashMap<String, i64>,
    ) -> Result<(), String> {
        let partials: Vec<FxHashMap<&str, i64>> = batch
            .par_iter()
            .try_fold(FxHashMap::default, |mut counts, text| {
                self.for_each_chunk(text, |chunk| *counts.entry(chunk).or_insert(0) += 1)?;
                Ok::<_, String>(counts)
            })
            .collect::<Result<_, String>>()?;
        for partial in partials {
            for (chunk, n) in partial {
                match totals.get_mut(chunk) {
                    Some(total) => *total += n,
                    None => {
                        totals.insert(chunk.to_owned(), n);
                    }
                }
            }
        }
        Ok(())
    }
}

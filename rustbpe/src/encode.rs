//! Vocabulary built from learned merges, and tiktoken-compatible encoding/decoding.
//!
//! Encoding follows tiktoken's rule so that `Tokenizer.encode` and a `tiktoken.Encoding` built from
//! `get_mergeable_ranks()` give identical ids: within a chunk, repeatedly join the adjacent pair of
//! parts whose concatenated bytes have the lowest rank (leftmost on ties) until no join is a token.

use crate::fxhash::FxHashMap;
use crate::train::Pair;

/// Token bytes by id, and the reverse map (rank lookup by bytes, as tiktoken does).
#[derive(Default)]
pub struct Vocab {
    tokens: Vec<Vec<u8>>,
    ranks: FxHashMap<Vec<u8>, u32>,
}

impl Vocab {
    /// The 256 single bytes followed by one token per merge.
    pub fn from_merges(merges: &[Pair]) -> Vocab {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &(left, right) in merges {
            let mut joined = tokens[left as usize].clone();
            joined.extend_from_slice(&tokens[right as usize]);
            tokens.push(joined);
        }
        let ranks = tokens
            .iter()
            .enumerate()
            .map(|(id, bytes)| (bytes.clone(), id as u32))
            .collect();
        Vocab { tokens, ranks }
    }

    pub fn tokens(&self) -> &[Vec<u8>] {
        &self.tokens
    }

    fn rank(&self, bytes: &[u8]) -> Option<u32> {
        self.ranks.get(bytes).copied()
    }

    /// Append the ids of one chunk to `out`.
    pub fn encode_chunk(&self, chunk: &[u8], out: &mut Vec<u32>) {
        if let Some(id) = self.rank(chunk) {
            out.push(id);
            return;
        }
        // starts[k] is where part k begins; join_rank[k] is the rank of part k joined with part k + 1.
        let mut starts: Vec<usize> = (0..chunk.len()).collect();
        starts.push(chunk.len());
        let pair_rank = |starts: &[usize], k: usize| -> Option<u32> {
            if k + 2 < starts.len() {
                self.rank(&chunk[starts[k]..starts[k + 2]])
            } else {
                None
            }
        };
        let mut join_rank: Vec<Option<u32>> = (0..starts.len() - 1)
            .map(|k| pair_rank(&starts, k))
            .collect();
        loop {
            let mut best: Option<(u32, usize)> = None;
            for (k, rank) in join_rank.iter().enumerate() {
                if let Some(r) = *rank {
                    if best.map_or(true, |(b, _)| r < b) {
                        best = Some((r, k));
                    }
                }
            }
            let k = match best {
                Some((_, k)) => k,
                None => break,
            };
            starts.remove(k + 1);
            join_rank.remove(k + 1);
            join_rank[k] = pair_rank(&starts, k);
            if k > 0 {
                join_rank[k - 1] = pair_rank(&starts, k - 1);
            }
        }
        for w in starts.windows(2) {
            out.push(
                self.rank(&chunk[w[0]..w[1]])
                    .expect("every part is a token"),
            );
        }
    }

    /// Concatenate the bytes of `ids`; an unknown id is reported back as an error.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, u32> {
        let mut out = Vec::new();
        for &id in ids {
            match self.tokens.get(id as usize) {
                Some(bytes) => out.extend_from_slice(bytes),
                None => return Err(id),
            }
        }
        Ok(out)
    }
}

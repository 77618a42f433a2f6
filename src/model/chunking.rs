//! Packing cells into chunks: by length bucket, so padding stays small, and by a token
//! budget, so a batch of short cells holds more rows than a batch of long ones.

/// Sequence-length buckets: powers of two from 16 up to 256, then every [`STEP`] tokens,
/// up to `max_len`, and `max_len` itself. Past 256 tokens a power of two would pad a cell by
/// up to half its length, and every padded token costs its share of every matmul.
pub fn buckets(max_len: usize) -> Vec<usize> {
    let mut b: Vec<usize> = std::iter::successors(Some(16usize), |&s| {
        Some(if s < 256 { s * 2 } else { s + STEP })
    })
    .take_while(|&s| s < max_len)
    .collect();
    b.push(max_len);
    b
}

/// The spacing of the buckets past 256 tokens.
pub const STEP: usize = 128;

/// Cells that run together: `n` rows of length `s`, `n` being the bucket's row count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub s: usize,
    pub n: usize,
    /// Indices of the cells, in row order; rows past `cells.len()` are filler.
    pub cells: Vec<usize>,
}

/// Rows of a chunk of length `s`: as many as fit in `token_budget` tokens, at least one.
pub fn rows_for(s: usize, token_budget: usize) -> usize {
    (token_budget / s).max(1)
}

/// Groups cells (given their token counts) into chunks of at most `token_budget` tokens.
/// Every chunk of a bucket has the bucket's row count (the last one filled up with filler
/// rows), so that one concrete-shape plan per bucket serves every batch.
pub fn plan_chunks(lengths: &[usize], buckets: &[usize], token_budget: usize) -> Vec<Chunk> {
    let mut by_bucket: Vec<Vec<usize>> = vec![Vec::new(); buckets.len()];
    for (cell, &len) in lengths.iter().enumerate() {
        let b = buckets.partition_point(|&s| s < len).min(buckets.len() - 1);
        by_bucket[b].push(cell);
    }
    let mut chunks = Vec::new();
    for (b, cells) in by_bucket.into_iter().enumerate() {
        let s = buckets[b];
        let n = rows_for(s, token_budget);
        for group in cells.chunks(n) {
            chunks.push(Chunk {
                s,
                n,
                cells: group.to_vec(),
            });
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_end_at_max_len() {
        assert_eq!(buckets(256), vec![16, 32, 64, 128, 256]);
        assert_eq!(buckets(200), vec![16, 32, 64, 128, 200]);
        assert_eq!(buckets(16), vec![16]);
        assert_eq!(
            buckets(1200),
            vec![16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024, 1152, 1200]
        );
    }

    #[test]
    fn chunks_respect_bucket_and_budget() {
        let lengths = [3, 20, 17, 256, 100, 5, 5, 5];
        let chunks = plan_chunks(&lengths, &buckets(256), 64);
        // Every cell exactly once, in a bucket that holds it.
        let mut seen: Vec<usize> = chunks.iter().flat_map(|c| c.cells.clone()).collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for c in &chunks {
            assert!(c.cells.iter().all(|&i| lengths[i] <= c.s));
            assert!(c.n >= c.cells.len());
            assert_eq!(c.n, rows_for(c.s, 64));
        }
        let first = &chunks[0];
        assert_eq!(
            (first.s, first.cells.clone(), first.n),
            (16, vec![0, 5, 6, 7], 4)
        );
    }
}

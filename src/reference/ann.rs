//! Approximate search for large references: an HNSW graph (Malkov & Yashunin) over the
//! reference's own rows proposes candidates, and the exact scan's arithmetic ranks them.
//! Where the graph finds a cell's true nearest neighbours, the result is the exact scan's,
//! bit for bit (same distances, same order of ties); where it misses one, the next nearest it
//! found takes its place.
//!
//! The graph holds links only: distances are computed on the reference's rows where they
//! already lie (`embeddings.f32`, contiguous), so a graph adds its links to memory, not a
//! second copy of the rows. A cell's unvisited neighbours are prefetched, then scored four at
//! a time with the exact scan's own dot product ([`knn::dots4`]).
//!
//! **Build** (`cellstream reference`, all cores) inserts cells highest level first, then in
//! row order, [`BATCH`] at a time: each cell of a batch searches the graph as the batch found
//! it (in parallel), takes its batch-mates as candidates too (so a batch of one new cluster
//! links up with itself), and picks its links with the paper's heuristic; then every cell
//! that gained links is pruned back to its capacity (in parallel, per cell). Nothing depends
//! on the thread count or timing, so the same rows give the same graph on any machine with the
//! same vector tier.
//!
//! **Stored** as `index.hnsw`, little-endian: the magic `CSHNSW01`, then `u32` fields (cells,
//! width, `M`, `ef_construction`, `ef_search`, the entry cell, the top level, the CRC-32C of
//! the rows the graph was built on), one level byte per cell, then per cell and level from 0
//! up: a `u8` link count and the links as `u32`; last, the CRC-32C of everything before it.
//! Loading checks every field and link, so a damaged or crafted file is refused rather than
//! followed out of bounds.

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

use super::knn::{self, Neighbours};
use crate::simd::Simd;

/// `cellstream reference --index auto` builds a graph above this many cells: up to it the
/// batched exact scan still maps over a thousand cells a second on one core, and an exact
/// answer is worth that (BENCHMARKS "Reference mapping").
pub const AUTO_ABOVE: usize = 100_000;
/// Links per cell on the upper levels; level 0 keeps twice as many.
pub const M: usize = 32;
/// Candidates kept while building each cell's links.
pub const EF_CONSTRUCTION: usize = 100;
/// Candidates a query collects before the exact ranking picks its `k`.
pub const EF_SEARCH: usize = 100;
/// Candidates a query keeps on the upper levels. The paper's greedy walk (one) can settle
/// in another cluster than the query's, and the search below then never leaves it; a few
/// candidates avoid that at little cost (BENCHMARKS "Reference mapping").
const EF_UPPER: usize = 10;
/// Cells inserted together: each searches the graph as it stood before its batch.
const BATCH: usize = 256;
/// Cells a worker takes from a batch at a time.
const GRAIN: usize = 8;
/// Levels above this are not drawn (a cell reaches level 10 with probability `M^-10`).
const MAX_LEVEL: u8 = 15;
const MAGIC: &[u8; 8] = b"CSHNSW01";
/// Magic plus the eight `u32` header fields.
const HEADER: usize = 8 + 8 * 4;

/// A candidate: distance `1 − cos`, then cell, so that ties order by cell.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Near(f32, u32);

impl Eq for Near {}

impl PartialOrd for Near {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Near {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// The level a cell reaches: drawn from cell's index alone (splitmix64), geometric with ratio
/// `1 / M` as the paper's `mL = 1 / ln M` gives.
fn level_of(cell: usize) -> u8 {
    let mut z = (cell as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    // Uniform in (0, 1].
    let u = ((z >> 11) + 1) as f64 / (1u64 << 53) as f64;
    let level = (-u.ln() / (M as f64).ln()).floor();
    level.min(f64::from(MAX_LEVEL)) as u8
}

/// An HNSW graph over a reference's rows (which it does not hold).
pub struct Index {
    cells: usize,
    dim: usize,
    levels: Vec<u8>,
    entry: u32,
    top: u8,
    /// Level 0: per cell, a count then `2 M` slots.
    base: Vec<u32>,
    /// Levels 1 and up: where each cell's run of `M + 1`-slot lists starts (`u32::MAX`: none).
    upper_at: Vec<u32>,
    upper: Vec<u32>,
    /// CRC-32C of the rows' little-endian bytes: a graph is only used with its own rows.
    rows_crc: u32,
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Index")
            .field("cells", &self.cells)
            .field("top", &self.top)
            .finish()
    }
}

fn capacity(level: usize) -> usize {
    if level == 0 {
        2 * M
    } else {
        M
    }
}

/// CRC-32C of `rows` as `embeddings.f32` stores them.
fn rows_crc(rows: &[f32]) -> u32 {
    let mut crc = 0;
    let mut buf = Vec::with_capacity(4 * 4096);
    for chunk in rows.chunks(4096) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
        crc = crc32c::crc32c_append(crc, &buf);
    }
    crc
}

/// Per-thread search state: a visit mark per cell (the current pass's number marks it), and
/// the two heaps of the paper's search.
struct Searcher {
    marks: Vec<u32>,
    pass: u32,
    todo: BinaryHeap<Reverse<Near>>,
    found: BinaryHeap<Near>,
    fresh: Vec<u32>,
}

impl Searcher {
    fn new(cells: usize) -> Searcher {
        Searcher {
            marks: vec![0; cells],
            pass: 0,
            todo: BinaryHeap::new(),
            found: BinaryHeap::new(),
            fresh: Vec::with_capacity(2 * M),
        }
    }

    fn next_pass(&mut self) {
        if self.pass == u32::MAX {
            self.marks.iter_mut().for_each(|m| *m = 0);
            self.pass = 0;
        }
        self.pass += 1;
    }
}

/// The rows and the graph's links, read-only: what a search needs.
#[derive(Clone, Copy)]
struct View<'a> {
    rows: &'a [f32],
    dim: usize,
    /// The vector tier distances run on, detected once per search or build step.
    simd: Simd,
    base: &'a [u32],
    upper_at: &'a [u32],
    upper: &'a [u32],
}

impl View<'_> {
    fn of(&self, cell: u32, level: usize) -> &[u32] {
        let list = if level == 0 {
            let at = cell as usize * (2 * M + 1);
            &self.base[at..at + 2 * M + 1]
        } else {
            let at = self.upper_at[cell as usize] as usize + (level - 1) * (M + 1);
            &self.upper[at..at + M + 1]
        };
        &list[1..1 + list[0] as usize]
    }

    fn row(&self, cell: u32) -> &[f32] {
        let at = cell as usize * self.dim;
        &self.rows[at..at + self.dim]
    }

    /// Distance `1 − cos`, from the exact scan's dot product (so equal to its f32 value).
    fn to(&self, query: &[f32], cell: u32) -> f32 {
        1.0 - knn::dot1(self.simd, self.row(cell), query, self.dim)
    }

    /// [`View::to`] for four cells in one pass over the query.
    fn to4(&self, query: &[f32], cells: [u32; 4]) -> [f32; 4] {
        knn::dots4(self.simd, cells.map(|c| self.row(c)), query, self.dim).map(|d| 1.0 - d)
    }

    fn between(&self, a: u32, b: u32) -> f32 {
        self.to(self.row(a), b)
    }
}

/// The nearest cell to `query` at `level`, walking greedily from `from`.
fn greedy(g: View, query: &[f32], mut from: Near, level: usize) -> Near {
    loop {
        let mut moved = false;
        for &c in g.of(from.1, level) {
            let near = Near(g.to(query, c), c);
            if near < from {
                from = near;
                moved = true;
            }
        }
        if !moved {
            return from;
        }
    }
}

/// The `ef` nearest cells to `query` at `level` reachable from `entries` (the paper's
/// SEARCH-LAYER), nearest first, into `out`.
fn search_level(
    g: View,
    s: &mut Searcher,
    query: &[f32],
    entries: &[Near],
    ef: usize,
    level: usize,
    out: &mut Vec<Near>,
) {
    s.next_pass();
    s.todo.clear();
    s.found.clear();
    for &e in entries {
        s.marks[e.1 as usize] = s.pass;
        s.todo.push(Reverse(e));
        s.found.push(e);
    }
    while s.found.len() > ef {
        s.found.pop();
    }
    while let Some(Reverse(near)) = s.todo.pop() {
        if s.found.len() >= ef && s.found.peek().is_some_and(|w| near > *w) {
            break;
        }
        s.fresh.clear();
        for &c in g.of(near.1, level) {
            let mark = &mut s.marks[c as usize];
            if *mark != s.pass {
                *mark = s.pass;
                s.fresh.push(c);
                crate::simd::prefetch(g.row(c));
            }
        }
        let mut offer = |near: Near| {
            if s.found.len() < ef || s.found.peek().is_some_and(|w| near < *w) {
                s.todo.push(Reverse(near));
                s.found.push(near);
                if s.found.len() > ef {
                    s.found.pop();
                }
            }
        };
        let quads = s.fresh.chunks_exact(4);
        for &c in quads.remainder() {
            offer(Near(g.to(query, c), c));
        }
        for quad in quads {
            let cells = [quad[0], quad[1], quad[2], quad[3]];
            for (d, c) in g.to4(query, cells).into_iter().zip(cells) {
                offer(Near(d, c));
            }
        }
    }
    out.clear();
    out.extend(s.found.drain());
    out.sort_unstable();
}

/// The paper's neighbour heuristic: from `candidates` (nearest first), up to `keep` cells,
/// each nearer to the cell than to any already kept (so links spread over directions).
fn select(g: View, candidates: &[Near], keep: usize, out: &mut Vec<Near>) {
    out.clear();
    for &c in candidates {
        if out.len() == keep {
            break;
        }
        if out.iter().all(|k| g.between(k.1, c.1) > c.0) {
            out.push(c);
        }
    }
}

/// `work(state, i)` for each `i < items`, one thread per state (at most one per [`GRAIN`]
/// items), taking [`GRAIN`] items at a time; the results in the order of `i`, `None`s left out.
fn in_parallel<S: Send, T: Send>(
    states: &mut [S],
    items: usize,
    work: impl Fn(&mut S, usize) -> Option<T> + Sync,
) -> Vec<T> {
    let next = AtomicUsize::new(0);
    let workers = items.div_ceil(GRAIN).max(1);
    let mut done: Vec<(usize, T)> = std::thread::scope(|scope| {
        let handles: Vec<_> = states
            .iter_mut()
            .take(workers)
            .map(|state| {
                let (next, work) = (&next, &work);
                scope.spawn(move || {
                    let mut done = Vec::new();
                    loop {
                        let from = next.fetch_add(GRAIN, AtomicOrdering::Relaxed);
                        if from >= items {
                            return done;
                        }
                        for i in from..(from + GRAIN).min(items) {
                            done.extend(work(state, i).map(|t| (i, t)));
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("graph worker"))
            .collect()
    });
    done.sort_unstable_by_key(|d| d.0);
    done.into_iter().map(|d| d.1).collect()
}

/// Per-thread buffers for [`Index::nearest`].
#[derive(Default)]
struct Scratch {
    searcher: Option<Searcher>,
    entries: Vec<Near>,
    found: Vec<Near>,
    ids: Vec<u32>,
    gathered: Vec<f32>,
}

impl Index {
    /// The graph over `rows` (`dim` wide, normalised), on all cores.
    pub fn build(rows: &[f32], dim: usize) -> Index {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Index::build_with(rows, dim, threads)
    }

    fn build_with(rows: &[f32], dim: usize, threads: usize) -> Index {
        let cells = rows.len().checked_div(dim).unwrap_or(0);
        assert!(
            cells < u32::MAX as usize,
            "a graph of fewer than 2^32 cells"
        );
        let levels: Vec<u8> = (0..cells).map(level_of).collect();
        let mut index = Index::unlinked(dim, levels, rows_crc(rows)).expect("upper links fit u32");
        if cells == 0 {
            return index;
        }
        let threads = threads.clamp(1, BATCH / GRAIN);
        let mut searchers: Vec<Searcher> = (0..threads).map(|_| Searcher::new(cells)).collect();
        // Highest level first (then by row), as faiss inserts: the upper levels are whole
        // before the bulk arrives, and the first cell is the entry at the top.
        let mut order: Vec<u32> = (0..cells as u32).collect();
        order.sort_by_key(|&c| Reverse(index.levels[c as usize]));
        index.entry = order[0];
        index.top = index.levels[order[0] as usize];
        for batch in order[1..].chunks(BATCH) {
            index.insert(rows, batch, &mut searchers);
        }
        index
    }

    /// A graph of cells at `levels` with room for their links and none yet.
    fn unlinked(dim: usize, levels: Vec<u8>, rows_crc: u32) -> Result<Index, String> {
        let cells = levels.len();
        let mut upper_at = vec![u32::MAX; cells];
        let mut slots = 0usize;
        for (at, &l) in upper_at.iter_mut().zip(&levels) {
            if l > 0 {
                *at = u32::try_from(slots).map_err(|_| "too many upper-level links".to_string())?;
                slots += usize::from(l) * (M + 1);
            }
        }
        Ok(Index {
            cells,
            dim,
            levels,
            entry: 0,
            top: 0,
            base: vec![0; cells * (2 * M + 1)],
            upper_at,
            upper: vec![0; slots],
            rows_crc,
        })
    }

    fn view<'a>(&'a self, rows: &'a [f32]) -> View<'a> {
        View {
            rows,
            dim: self.dim,
            simd: Simd::detect(),
            base: &self.base,
            upper_at: &self.upper_at,
            upper: &self.upper,
        }
    }

    fn list_mut(&mut self, cell: u32, level: usize) -> &mut [u32] {
        if level == 0 {
            let at = cell as usize * (2 * M + 1);
            &mut self.base[at..at + 2 * M + 1]
        } else {
            let at = self.upper_at[cell as usize] as usize + (level - 1) * (M + 1);
            &mut self.upper[at..at + M + 1]
        }
    }

    fn set_links(&mut self, cell: u32, level: usize, links: &[u32]) {
        let list = self.list_mut(cell, level);
        list[0] = links.len() as u32;
        list[1..1 + links.len()].copy_from_slice(links);
    }

    /// Inserts the cells of `batch` (none in the graph yet; the graph holds every cell before).
    fn insert(&mut self, rows: &[f32], batch: &[u32], searchers: &mut [Searcher]) {
        // 1. Each cell's own links, per level, from the graph before the batch and its mates.
        let chosen = {
            let g = self.view(rows);
            in_parallel(searchers, batch.len(), |s, i| {
                Some(self.own_links(g, s, batch[i], batch))
            })
        };
        // 2. Write them; note each link's other end, which gains the reverse link.
        let mut reverse: Vec<(u8, u32, u32)> = Vec::new(); // (level, cell, new neighbour)
        let mut ids = Vec::with_capacity(2 * M);
        for (&c, per_level) in batch.iter().zip(&chosen) {
            for (level, links) in per_level.iter().enumerate() {
                ids.clear();
                ids.extend(links.iter().map(|n| n.1));
                self.set_links(c, level, &ids);
                reverse.extend(links.iter().map(|n| (level as u8, n.1, c)));
            }
        }
        reverse.sort_unstable();
        reverse.dedup();
        // 3. Each cell that gains links: appended while there is room, else pruned by the
        // heuristic over old and new (in parallel: each cell's new list reads only the graph).
        let groups: Vec<&[(u8, u32, u32)]> =
            reverse.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)).collect();
        let updates = {
            let g = self.view(rows);
            in_parallel(searchers, groups.len(), |_, i| {
                let (level, cell) = (usize::from(groups[i][0].0), groups[i][0].1);
                let old = g.of(cell, level);
                let mut links = old.to_vec();
                links.extend(groups[i].iter().map(|r| r.2).filter(|n| !old.contains(n)));
                if links.len() == old.len() {
                    return None;
                }
                if links.len() > capacity(level) {
                    let mut near: Vec<Near> =
                        links.iter().map(|&n| Near(g.between(cell, n), n)).collect();
                    near.sort_unstable();
                    let mut kept = Vec::with_capacity(capacity(level));
                    select(g, &near, capacity(level), &mut kept);
                    links = kept.iter().map(|n| n.1).collect();
                }
                Some((level, cell, links))
            })
        };
        for (level, cell, links) in updates {
            self.set_links(cell, level, &links);
        }
    }

    /// Cell `c`'s links at each of its levels: the heuristic's pick among the graph's
    /// `EF_CONSTRUCTION` nearest and its batch-mates at that level.
    fn own_links(&self, g: View, s: &mut Searcher, c: u32, batch: &[u32]) -> Vec<Vec<Near>> {
        let query = g.row(c);
        // Cells arrive highest level first: none is above the graph's top.
        let level = usize::from(self.levels[c as usize]);
        let mut entry = Near(g.to(query, self.entry), self.entry);
        for l in (level + 1..=usize::from(self.top)).rev() {
            entry = greedy(g, query, entry, l);
        }
        let mut entries = vec![entry];
        let mut candidates = Vec::new();
        let mut per_level = vec![Vec::new(); level + 1];
        for l in (0..=level).rev() {
            search_level(g, s, query, &entries, EF_CONSTRUCTION, l, &mut candidates);
            entries.clone_from(&candidates);
            candidates.extend(
                batch
                    .iter()
                    .filter(|&&m| m != c && usize::from(self.levels[m as usize]) >= l)
                    .map(|&m| Near(g.to(query, m), m)),
            );
            candidates.sort_unstable();
            candidates.truncate(EF_CONSTRUCTION);
            select(g, &candidates, capacity(l), &mut per_level[l]);
        }
        per_level
    }

    /// `index.hnsw`'s bytes, the CRC-32C trailer included.
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        let u32_of = |x: usize, what: &str| {
            u32::try_from(x).map_err(|_| format!("{what} {x} does not fit the format"))
        };
        let mut out = Vec::with_capacity(HEADER + self.cells * 2 * M * 4);
        out.extend_from_slice(MAGIC);
        for field in [
            u32_of(self.cells, "cells")?,
            u32_of(self.dim, "width")?,
            M as u32,
            EF_CONSTRUCTION as u32,
            EF_SEARCH as u32,
            self.entry,
            u32::from(self.top),
            self.rows_crc,
        ] {
            out.extend_from_slice(&field.to_le_bytes());
        }
        out.extend_from_slice(&self.levels);
        let g = self.view(&[]);
        for c in 0..self.cells as u32 {
            for l in 0..=usize::from(self.levels[c as usize]) {
                let list = g.of(c, l);
                out.push(list.len() as u8);
                out.extend(list.iter().flat_map(|x| x.to_le_bytes()));
            }
        }
        out.extend_from_slice(&crc32c::crc32c(&out).to_le_bytes());
        Ok(out)
    }

    /// The graph stored by [`Index::to_bytes`], its trailer checked, and checked against the
    /// reference's `rows`: built on them, every link in range and at a level its cell has.
    pub fn from_bytes(bytes: &[u8], rows: &[f32], dim: usize) -> Result<Index, String> {
        let Some(body_len) = bytes.len().checked_sub(4) else {
            return Err(format!("{} bytes, too short for an index", bytes.len()));
        };
        let (body, tail) = bytes.split_at(body_len);
        let stored = u32::from_le_bytes(tail.try_into().expect("4 bytes"));
        let crc = crc32c::crc32c(body);
        if crc != stored {
            return Err(format!(
                "CRC-32C {crc:08x}, the file's last 4 bytes say {stored:08x}: damaged (rebuild the reference)"
            ));
        }
        if body.len() < HEADER || &body[..8] != MAGIC {
            return Err(
                "no CSHNSW01 header: not a graph this version of cellstream writes (rebuild the reference)"
                    .into(),
            );
        }
        let field = |i: usize| {
            let at = 8 + 4 * i;
            u32::from_le_bytes(body[at..at + 4].try_into().expect("4 bytes")) as usize
        };
        let (cells, width, m, ef_c, ef_s, entry, top, crc) = (
            field(0),
            field(1),
            field(2),
            field(3),
            field(4),
            field(5),
            field(6),
            field(7) as u32,
        );
        let expected_cells = rows.len().checked_div(dim).unwrap_or(0);
        if cells != expected_cells || width != dim {
            return Err(format!(
                "a graph of {cells} cells × {width}, the reference has {expected_cells} × {dim}"
            ));
        }
        if (m, ef_c, ef_s) != (M, EF_CONSTRUCTION, EF_SEARCH) {
            return Err(format!(
                "M {m}, ef_construction {ef_c}, ef_search {ef_s}; this cellstream reads {M}, {EF_CONSTRUCTION}, {EF_SEARCH} (rebuild the reference)"
            ));
        }
        let own = rows_crc(rows);
        if crc != own {
            return Err(format!(
                "built on rows with CRC-32C {crc:08x}; that of embeddings.f32 is {own:08x}: the graph differs from embeddings.f32 (rebuild the reference)"
            ));
        }
        let mut at = HEADER;
        let levels = body
            .get(at..at + cells)
            .ok_or_else(|| format!("ends at byte {} inside the levels", body.len()))?
            .to_vec();
        at += cells;
        if let Some((c, &l)) = levels.iter().enumerate().find(|p| *p.1 > MAX_LEVEL) {
            return Err(format!("cell {c} at level {l}, above {MAX_LEVEL}"));
        }
        let highest = levels.iter().copied().max().unwrap_or(0);
        if cells > 0
            && (entry >= cells || usize::from(levels[entry]) != top || top != usize::from(highest))
        {
            return Err(format!(
                "entry cell {entry} at top level {top}: not a cell at the highest level ({highest})"
            ));
        }
        let mut index = Index::unlinked(dim, levels, crc)?;
        index.entry = entry as u32;
        index.top = top as u8;
        let mut ids = Vec::with_capacity(2 * M);
        for c in 0..cells {
            for l in 0..=usize::from(index.levels[c]) {
                let count = usize::from(
                    *body
                        .get(at)
                        .ok_or_else(|| format!("ends at byte {at} inside cell {c}'s links"))?,
                );
                if count > capacity(l) {
                    return Err(format!(
                        "cell {c} has {count} links at level {l}, at most {} allowed (byte {at})",
                        capacity(l)
                    ));
                }
                let list = body.get(at + 1..at + 1 + 4 * count).ok_or_else(|| {
                    format!("ends at byte {} inside cell {c}'s links", body.len())
                })?;
                ids.clear();
                for (i, b) in list.chunks_exact(4).enumerate() {
                    let n = u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize;
                    if n >= cells || n == c || usize::from(index.levels[n]) < l {
                        return Err(format!(
                            "cell {c} links to {n} at level {l} (byte {}): not another cell at that level",
                            at + 1 + 4 * i
                        ));
                    }
                    ids.push(n as u32);
                }
                index.set_links(c as u32, l, &ids);
                at += 1 + 4 * count;
            }
        }
        if at != body.len() {
            return Err(format!(
                "{} bytes after the last cell's links (byte {at})",
                body.len() - at
            ));
        }
        Ok(index)
    }

    /// The `k` nearest of the graph's candidates for `query` (normalised), `skip` excluded,
    /// ranked as [`knn::scan`] ranks them.
    pub fn nearest(
        &self,
        rows: &[f32],
        dim: usize,
        query: &[f32],
        skip: Option<usize>,
        out: &mut Neighbours,
    ) {
        assert_eq!(
            (rows.len(), dim),
            (self.cells * self.dim, self.dim),
            "the graph's own rows"
        );
        thread_local! {
            static SCRATCH: RefCell<Scratch> = RefCell::default();
        }
        SCRATCH.with_borrow_mut(|sc| {
            let Scratch {
                searcher,
                entries,
                found,
                ids,
                gathered,
            } = sc;
            ids.clear();
            if self.cells > 0 {
                if searcher
                    .as_ref()
                    .is_none_or(|s| s.marks.len() != self.cells)
                {
                    *searcher = Some(Searcher::new(self.cells));
                }
                let s = searcher.as_mut().expect("set above");
                let g = self.view(rows);
                entries.clear();
                entries.push(Near(g.to(query, self.entry), self.entry));
                for l in (1..=usize::from(self.top)).rev() {
                    search_level(g, s, query, entries, EF_UPPER, l, found);
                    std::mem::swap(entries, found);
                }
                search_level(g, s, query, entries, EF_SEARCH, 0, found);
                ids.extend(
                    found
                        .iter()
                        .map(|n| n.1)
                        .filter(|&c| Some(c as usize) != skip),
                );
            }
            // Row order, so that ties fall as they do in the full scan.
            ids.sort_unstable();
            gathered.clear();
            for &c in ids.iter() {
                let c = c as usize;
                gathered.extend_from_slice(&rows[c * dim..(c + 1) * dim]);
            }
            knn::scan(gathered, dim, query, None, out);
            out.renumber(ids);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cells in a few tight clusters on the unit sphere, the clusters in row order (as a
    /// reference sorted by label is).
    fn clustered(n: usize, dim: usize) -> Vec<f32> {
        let mut state = 7u64;
        let mut uniform = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let centres: Vec<Vec<f32>> = (0..6)
            .map(|_| (0..dim).map(|_| uniform()).collect())
            .collect();
        let mut rows = Vec::with_capacity(n * dim);
        for i in 0..n {
            let centre = &centres[i * centres.len() / n];
            let mut row: Vec<f32> = centre.iter().map(|c| c + 0.3 * uniform()).collect();
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
            rows.extend(row);
        }
        rows
    }

    #[test]
    fn the_graph_is_the_same_on_any_thread_count_and_finds_the_nearest() {
        let (n, dim) = (1500, 12);
        let rows = clustered(n, dim);
        let one = Index::build_with(&rows, dim, 1);
        let three = Index::build_with(&rows, dim, 3);
        assert_eq!(one.to_bytes().unwrap(), three.to_bytes().unwrap());
        assert!(one.top > 0, "a graph of {n} cells has upper levels");
        // Each cell finds itself, and its exact 10 nearest nearly always.
        let (mut got, mut want) = (Neighbours::new(10), Neighbours::new(10));
        let mut same = 0;
        for c in (0..n).step_by(7) {
            let q = &rows[c * dim..(c + 1) * dim];
            one.nearest(&rows, dim, q, None, &mut got);
            assert_eq!(got.sorted()[0].1 as usize, c);
            one.nearest(&rows, dim, q, Some(c), &mut got);
            knn::scan(&rows, dim, q, Some(c), &mut want);
            same += usize::from(got.sorted() == want.sorted());
        }
        assert!(
            same * 100 >= 98 * n.div_ceil(7),
            "{same} of {}",
            n.div_ceil(7)
        );
    }

    #[test]
    fn a_crafted_graph_is_refused_not_followed() {
        let (n, dim) = (400, 6);
        let rows = clustered(n, dim);
        let index = Index::build_with(&rows, dim, 2);
        let good = index.to_bytes().unwrap();
        assert!(Index::from_bytes(&good, &rows, dim).is_ok());
        let reseal = |mut body: Vec<u8>| {
            body.truncate(body.len() - 4);
            let crc = crc32c::crc32c(&body);
            body.extend_from_slice(&crc.to_le_bytes());
            body
        };
        let first_link = HEADER + n + 1;
        let mut bad = good.clone();
        bad[first_link..first_link + 4].copy_from_slice(&(n as u32).to_le_bytes());
        let err = Index::from_bytes(&reseal(bad), &rows, dim).unwrap_err();
        assert!(err.contains("links to 400 at level 0"), "{err}");
        let mut bad = good.clone();
        bad[HEADER + n] = 200;
        let err = Index::from_bytes(&reseal(bad), &rows, dim).unwrap_err();
        assert!(err.contains("200 links at level 0"), "{err}");
        let mut bad = good.clone();
        bad[8 + 4 * 5..8 + 4 * 6].copy_from_slice(&(n as u32 + 5).to_le_bytes());
        let err = Index::from_bytes(&reseal(bad), &rows, dim).unwrap_err();
        assert!(err.contains("entry cell"), "{err}");
        let mut bad = good.clone();
        bad.insert(bad.len() - 4, 0);
        let err = Index::from_bytes(&reseal(bad), &rows, dim).unwrap_err();
        assert!(err.contains("after the last cell's links"), "{err}");
        let err = Index::from_bytes(&good[..good.len() - 9], &rows, dim).unwrap_err();
        assert!(err.contains("CRC-32C"), "{err}");
        // Any byte changed past the magic, the CRC made to match: refused, or a graph that
        // answers queries (its links all checked) without panicking.
        let mut state = 11u64;
        let (mut refused, mut nb) = (0, Neighbours::new(10));
        for _ in 0..2000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = 8 + (state >> 33) as usize % (good.len() - 12);
            let mut bad = good.clone();
            bad[at] = (state >> 20) as u8;
            match Index::from_bytes(&reseal(bad), &rows, dim) {
                Err(_) => refused += 1,
                Ok(graph) => {
                    for c in [0, n / 2, n - 1] {
                        graph.nearest(&rows, dim, &rows[c * dim..(c + 1) * dim], None, &mut nb);
                        assert!(!nb.is_empty());
                    }
                }
            }
        }
        assert!(refused > 0);
    }
}

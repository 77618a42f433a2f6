//! Properties of the tokenizer that must hold for any cell, not only the fixture's.

use std::collections::HashMap;
use std::path::Path;

use cellstream::batch::{CountBatch, CsrArrays, Format};
use cellstream::tokenize::binning::Binner;
use cellstream::tokenize::{TieMode, TokenBatch, Tokenizer, TokenizerConfig, Vocab};
use proptest::prelude::*;

const N_GENES: usize = 3000;

fn vocab() -> Vocab {
    let ids: HashMap<String, u32> = (0..N_GENES).map(|g| (format!("G{g}"), g as u32)).collect();
    Vocab::from_map(Path::new("test"), ids).unwrap()
}

/// One cell whose gene `i` has `counts[i]` (zeros are left out of the CSR).
fn one_cell(counts: &[u32]) -> CountBatch {
    let mut csr = CsrArrays {
        indptr: vec![0],
        ..Default::default()
    };
    for (g, &c) in counts.iter().enumerate() {
        if c > 0 {
            csr.indices.push(g as u32);
            csr.data.push(c);
        }
    }
    csr.indptr.push(csr.indices.len() as u64);
    let genes = (0..counts.len().max(1)).map(|g| format!("G{g}")).collect();
    CountBatch::from_csr("p", Format::Mtx, genes, None, vec!["AAAC-1".into()], csr).unwrap()
}

fn tokenize(counts: &[u32], ties: TieMode, max_len: usize, seed: u64) -> TokenBatch {
    let v = vocab();
    let batch = one_cell(counts);
    let cfg = TokenizerConfig {
        ties,
        max_len,
        seed,
        ..TokenizerConfig::default()
    };
    Tokenizer::new(&v, cfg).tokenize(&batch, &v.map_genes(&batch.gene_names))
}

/// Counts as UMI data look: mostly 1–3, a tail, the odd very large value.
fn counts_strategy(max_genes: usize) -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(
        prop_oneof![
            4 => Just(0u32),
            6 => 1u32..4,
            3 => 4u32..200,
            1 => 200u32..6000,
            1 => 6000u32..2_000_000,
        ],
        1..max_genes,
    )
}

fn ties() -> impl Strategy<Value = TieMode> {
    prop_oneof![Just(TieMode::Seeded), Just(TieMode::Numpy)]
}

proptest! {
    // A fixed seed: CI runs the same 200 cases every time (no flaky runs); change it locally
    // (PROPTEST_RNG_SEED is ignored here) to explore further.
    #![proptest_config(ProptestConfig {
        cases: 200,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_ce11),
        ..ProptestConfig::default()
    })]

    /// The counting fast path equals a plain sort-based numpy transcription.
    #[test]
    fn counting_path_equals_sort_path(counts in counts_strategy(2500)) {
        let nz: Vec<u32> = counts.into_iter().filter(|&c| c > 0).collect();
        let mut b = Binner::new(51);
        let (mut l1, mut r1, mut l2, mut r2) = (vec![], vec![], vec![], vec![]);
        b.digitize(&nz, &mut l1, &mut r1);
        let e1 = b.edges().to_vec();
        let f: Vec<f32> = nz.iter().map(|&c| c as f32).collect();
        b.digitize_f32(&f, &mut l2, &mut r2);
        prop_assert_eq!(e1.iter().map(|e| e.to_bits()).collect::<Vec<_>>(), b.edges().iter().map(|e| e.to_bits()).collect::<Vec<_>>());
        prop_assert_eq!(l1, l2);
        prop_assert_eq!(r1, r2);
    }

    /// Bins depend only on ranks: scaling the counts (as normalisation does) or log1p leaves
    /// the digits, and so numpy-mode bins, unchanged — up to one thing numpy itself does: an
    /// interpolated edge that lies within float rounding of a data value (676.9999999999998 vs
    /// 677, found by this test) can land on either side after the transform. Any digit that
    /// changes must sit at such an edge.
    #[test]
    fn bins_are_rank_only(counts in prop::collection::vec(1u32..1000, 1..1500), scale in 1u32..1000) {
        let mut b = Binner::new(51);
        let (mut l0, mut r0, mut l, mut r) = (vec![], vec![], vec![], vec![]);
        b.digitize(&counts, &mut l0, &mut r0);
        let edges0 = b.edges().to_vec();
        let near_an_edge = |x: u32| edges0.iter().any(|&e| (e - x as f64).abs() <= 1e-9 * x as f64);

        let scaled: Vec<u32> = counts.iter().map(|&c| c * scale).collect();
        b.digitize(&scaled, &mut l, &mut r);
        let mut exact = true;
        for i in 0..counts.len() {
            if (l[i], r[i]) != (l0[i], r0[i]) {
                prop_assert!(near_an_edge(counts[i]), "scaled: digit of {} changed away from any edge", counts[i]);
                exact = false;
            }
        }
        let logged: Vec<f32> = counts.iter().map(|&c| (c as f32).ln_1p()).collect();
        b.digitize_f32(&logged, &mut l, &mut r);
        for i in 0..counts.len() {
            if (l[i], r[i]) != (l0[i], r0[i]) {
                prop_assert!(near_an_edge(counts[i]), "log1p: digit of {} changed away from any edge", counts[i]);
            }
        }
        // Through the whole tokenizer, numpy mode: identical values when the digits agree.
        if exact {
            let a = tokenize(&counts, TieMode::Numpy, 1 << 20, 5);
            let s = tokenize(&scaled, TieMode::Numpy, 1 << 20, 5);
            prop_assert_eq!(a.cell(0), s.cell(0));
        }
    }

    /// Every bin is in 1..=n_bins-1; `<cls>` leads with the pad value.
    #[test]
    fn bins_in_range(counts in counts_strategy(2000), ties in ties(), seed in 0u64..1000, n_bins in 3u16..120) {
        let v = vocab();
        let batch = one_cell(&counts);
        let cfg = TokenizerConfig { ties, seed, n_bins, max_len: 1 << 20, ..TokenizerConfig::default() };
        let t = Tokenizer::new(&v, cfg).tokenize(&batch, &v.map_genes(&batch.gene_names));
        let (ids, values) = t.cell(0);
        prop_assert_eq!(ids[0], v.cls_id);
        prop_assert_eq!(values[0], -2.0);
        prop_assert_eq!(ids.len(), counts.iter().filter(|&&c| c > 0).count() + 1);
        for &x in &values[1..] {
            prop_assert!(x >= 1.0 && x <= (n_bins - 1) as f32 && x.fract() == 0.0, "bin {}", x);
        }
    }

    /// Cells longer than max_len keep `<cls>` first and exactly max_len tokens: a subset of
    /// the cell's genes in input order, each with the bin it had before subsampling.
    #[test]
    fn long_cells_are_subsampled(counts in counts_strategy(2500), max_len in 2usize..600, seed in 0u64..100) {
        let full = tokenize(&counts, TieMode::Seeded, 1 << 20, seed);
        let cut = tokenize(&counts, TieMode::Seeded, max_len, seed);
        let (fid, fval) = full.cell(0);
        let (cid, cval) = cut.cell(0);
        prop_assert_eq!(cid.len(), fid.len().min(max_len));
        prop_assert_eq!(cid[0], fid[0]);
        let bin_of: HashMap<u32, f32> = fid.iter().copied().zip(fval.iter().copied()).collect();
        prop_assert!(cid[1..].windows(2).all(|w| w[0] < w[1]), "input order kept");
        for (id, v) in cid[1..].iter().zip(&cval[1..]) {
            prop_assert_eq!(bin_of[id], *v);
        }
    }
}

#[test]
fn cells_with_zero_or_one_gene() {
    for ties in [TieMode::Seeded, TieMode::Numpy] {
        let empty = tokenize(&[0, 0, 0], ties, 1200, 0);
        assert_eq!(empty.cell(0).0.len(), 1, "only <cls>");
        let one = tokenize(&[0, 17, 0], ties, 1200, 0);
        let (ids, values) = one.cell(0);
        assert_eq!(ids, &[3001, 1]); // <pad> = 3000, <cls> = 3001 are appended after the genes
        assert!((1.0..=50.0).contains(&values[1]));
    }
}

#[test]
fn subsample_is_uniform_over_genes() {
    // 100 equal genes, keep 10: each gene should be kept about 10% of the time over many seeds.
    let counts = vec![3u32; 100];
    let mut kept = vec![0u32; 100];
    for seed in 0..4000 {
        let t = tokenize(&counts, TieMode::Seeded, 11, seed);
        for &id in &t.cell(0).0[1..] {
            kept[id as usize] += 1;
        }
    }
    // Expected 400 per gene; chi-square with 99 dof, 99.99th percentile ≈ 160.
    let chi2: f64 = kept
        .iter()
        .map(|&k| (k as f64 - 400.0).powi(2) / 400.0)
        .sum();
    assert!(chi2 < 160.0, "chi2 {chi2}");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 200,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_e4c7),
        ..ProptestConfig::default()
    })]

    /// The `expected` mode: no seed changes a token; each value is the mean of scGPT's tie
    /// draw between the cell's `left` and `right` digits (what `numpy` mode draws from);
    /// a cell longer than max_len keeps its largest counts (ties: the lowest token id), in
    /// input order.
    #[test]
    fn expected_mode_is_the_draws_mean_and_keeps_the_largest_counts(
        counts in counts_strategy(1200), max_len in 2usize..400, seed in 0u64..100,
    ) {
        let t = tokenize(&counts, TieMode::Expected, max_len, seed);
        let other = tokenize(&counts, TieMode::Expected, max_len, seed + 1);
        prop_assert_eq!(&t.gene_ids, &other.gene_ids);
        prop_assert_eq!(&t.values, &other.values);
        let (ids, values) = t.cell(0);
        // Digits of every kept count, from the whole cell's edges.
        let nonzero: Vec<u32> = counts.iter().copied().filter(|&c| c > 0).collect();
        let mut binner = Binner::new(51);
        binner.prepare(&nonzero);
        for (&id, &v) in ids[1..].iter().zip(&values[1..]) {
            let (l, r) = binner.digits(counts[id as usize]);
            let want = if l == r { l as f32 } else { (l as f32 + r as f32 + 1.0) / 2.0 };
            prop_assert_eq!(v, want);
        }
        prop_assert!(ids[1..].windows(2).all(|w| w[0] < w[1]), "input order kept");
        let keep = max_len - 1;
        prop_assert_eq!(ids.len() - 1, nonzero.len().min(keep));
        if nonzero.len() > keep {
            // Every dropped gene ranks below every kept one: smaller count, or equal count and
            // a higher id.
            let kept: std::collections::HashSet<u32> = ids[1..].iter().copied().collect();
            let rank = |g: usize| (std::cmp::Reverse(counts[g]), g);
            let worst_kept = kept.iter().map(|&g| rank(g as usize)).max().unwrap();
            for g in (0..counts.len()).filter(|&g| counts[g] > 0 && !kept.contains(&(g as u32))) {
                prop_assert!(rank(g) > worst_kept, "gene {g} dropped before a smaller one");
            }
        }
    }
}

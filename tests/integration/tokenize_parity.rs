//! Tokenization agrees with scGPT's own code on real cells
//! (tests/fixtures/scgpt_tokens_pbmc3k_seed0.jsonl.gz; rules 1–3 of its README).

use crate::common;
use std::collections::HashMap;
use std::io::BufRead;

use cellstream::batch::{CountBatch, CsrArrays, Format};
use cellstream::simd::Simd;
use cellstream::tokenize::binning::Binner;
use cellstream::tokenize::vocab::NOT_IN_VOCAB;
use cellstream::tokenize::{TieMode, TokenBatch, Tokenizer, TokenizerConfig, Vocab};
use serde::Deserialize;

#[derive(Deserialize)]
struct RefCell {
    cell: String,
    index: usize,
    gene_ids: Vec<i64>,
    counts: Vec<f64>,
    edges: Vec<f64>,
    left: Vec<u16>,
    right: Vec<u16>,
    values: Vec<f32>,
}

fn reference() -> Vec<RefCell> {
    let file = std::fs::File::open(common::fixture("scgpt_tokens_pbmc3k_seed0.jsonl.gz")).unwrap();
    let lines = std::io::BufReader::new(flate2::read::GzDecoder::new(file)).lines();
    lines
        .skip(1) // header
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect()
}

struct Setup {
    batch: CountBatch,
    vocab: Vocab,
    refs: Vec<RefCell>,
}

fn setup() -> Setup {
    Setup {
        batch: common::read(&common::pbmc3k()),
        vocab: Vocab::from_json_file(&common::vocab_path()).unwrap(),
        refs: reference(),
    }
}

/// No truncation: the fixture bins every in-vocabulary gene of each cell.
fn tokenize(s: &Setup, ties: TieMode, seed: u64) -> TokenBatch {
    let cfg = TokenizerConfig {
        ties,
        seed,
        max_len: 1 << 20,
        ..TokenizerConfig::default()
    };
    let genes = s.vocab.map_genes(&s.batch.gene_names);
    Tokenizer::new(&s.vocab, cfg).tokenize(&s.batch, &genes)
}

#[test]
fn vocabulary_specials_match_the_fixture_header() {
    let v = Vocab::from_json_file(&common::vocab_path()).unwrap();
    assert_eq!((v.pad_id, v.cls_id, v.len()), (48292, 48293, 48295));
}

/// Rule 1: ids, float64 edges bit for bit, left and right digits.
#[test]
fn ids_edges_and_digits_equal_scgpt() {
    let s = setup();
    assert_eq!(s.refs.len(), 600);
    let genes = s.vocab.map_genes(&s.batch.gene_names);
    let mut binner = Binner::new(51);
    let (mut left, mut right) = (Vec::new(), Vec::new());
    for r in &s.refs {
        assert_eq!(s.batch.barcodes[r.index], r.cell);
        let cell = s.batch.cell(r.index);
        let mut ids = vec![s.vocab.cls_id as i64];
        let mut counts = Vec::new();
        for (&g, &c) in cell.genes.iter().zip(cell.counts) {
            let t = genes.token_of_gene[g as usize];
            if t != NOT_IN_VOCAB && c > 0 {
                ids.push(t as i64);
                counts.push(c);
            }
        }
        assert_eq!(ids, r.gene_ids, "ids of cell {}", r.cell);
        let ref_counts: Vec<u32> = r.counts.iter().map(|&c| c as u32).collect();
        assert_eq!(counts, ref_counts, "counts of cell {}", r.cell);
        binner.digitize(&counts, &mut left, &mut right);
        let bits = |v: &[f64]| v.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(binner.edges()),
            bits(&r.edges),
            "edges of cell {}",
            r.cell
        );
        assert_eq!(left, r.left, "left digits of cell {}", r.cell);
        assert_eq!(right, r.right, "right digits of cell {}", r.cell);
    }
}

/// Rule 3: numpy tie mode, seed 0, equal value for value in every cell.
#[test]
fn numpy_mode_equals_scgpt_value_for_value() {
    let s = setup();
    let tokens = tokenize(&s, TieMode::Numpy, 0);
    for r in &s.refs {
        let (ids, values) = tokens.cell(r.index);
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        assert_eq!(ids, r.gene_ids, "ids of cell {}", r.cell);
        assert_eq!(values, &r.values[..], "values of cell {}", r.cell);
    }
}

/// The per-entry loops' implementations (portable, and AVX2 where this CPU has it) give the
/// same tokens, values and coverage for every pbmc3k cell, in both tie modes; the rules
/// above then hold for each, since they are checked on the default (fastest) one.
#[test]
fn every_kernel_gives_the_same_tokens() {
    let s = setup();
    let genes = s.vocab.map_genes(&s.batch.gene_names);
    for ties in [TieMode::Seeded, TieMode::Numpy] {
        let cfg = TokenizerConfig {
            ties,
            seed: 5,
            ..TokenizerConfig::default()
        };
        let outputs: Vec<(Simd, TokenBatch)> = Simd::available()
            .into_iter()
            .map(|k| {
                let mut t = Tokenizer::with_kernels(&s.vocab, cfg.clone(), k);
                (k, t.tokenize(&s.batch, &genes))
            })
            .collect();
        let (_, first) = &outputs[0];
        assert_eq!(first.n_cells(), s.batch.n_cells());
        for (kernels, other) in &outputs[1..] {
            let name = kernels.name();
            assert_eq!(other.offsets, first.offsets, "{name} {ties:?}");
            assert_eq!(other.gene_ids, first.gene_ids, "{name} {ties:?}");
            assert_eq!(other.values, first.values, "{name} {ties:?}");
            assert_eq!(other.expressed, first.expressed, "{name} {ties:?}");
        }
    }
}

/// Rule 2: every seeded bin lies in scGPT's allowed set.
#[test]
fn seeded_bins_lie_in_scgpts_allowed_set() {
    let s = setup();
    for seed in [0, 1, 42] {
        let tokens = tokenize(&s, TieMode::Seeded, seed);
        for r in &s.refs {
            let (ids, values) = tokens.cell(r.index);
            assert!(ids.iter().map(|&i| i as i64).eq(r.gene_ids.iter().copied()));
            assert_eq!(values[0], -2.0);
            for (k, &v) in values[1..].iter().enumerate() {
                let (l, rt) = (r.left[k] as f32, r.right[k] as f32);
                let ok = if l == rt { v == l } else { v > rt && v <= l };
                assert!(
                    ok,
                    "cell {} gene {k}: bin {v} outside {{{rt}+1..={l}}}",
                    r.cell
                );
            }
        }
    }
}

/// Chi-square statistic of the tie draws: for each tie width d = left - right, the offset
/// `left - bin` should be uniform over 0..d. Returns (statistic, degrees of freedom).
fn tie_chi_square(refs: &[RefCell], tokens: &TokenBatch) -> (f64, f64) {
    let mut observed: HashMap<u16, Vec<u64>> = HashMap::new();
    for r in refs {
        let (_, values) = tokens.cell(r.index);
        for (k, &v) in values[1..].iter().enumerate() {
            let d = r.left[k] - r.right[k];
            if d >= 2 {
                let slot = (r.left[k] as f32 - v) as usize;
                observed.entry(d).or_insert_with(|| vec![0; d as usize])[slot] += 1;
            }
        }
    }
    let (mut chi2, mut dof) = (0.0, 0.0);
    for (d, counts) in observed {
        let n: u64 = counts.iter().sum();
        let expected = n as f64 / d as f64;
        if expected < 5.0 {
            continue;
        }
        chi2 += counts
            .iter()
            .map(|&o| (o as f64 - expected).powi(2) / expected)
            .sum::<f64>();
        dof += (d - 1) as f64;
    }
    (chi2, dof)
}

/// Rule 2, second half: over the fixture cells the seeded tie draws are uniform.
#[test]
fn seeded_tie_draws_are_uniform() {
    let s = setup();
    for seed in [0, 7] {
        let (chi2, dof) = tie_chi_square(&s.refs, &tokenize(&s, TieMode::Seeded, seed));
        assert!(dof > 100.0, "too few tie classes to test ({dof})");
        // Wilson–Hilferty: the 99.99th percentile of chi-square(dof) is about dof + 3.72·sqrt(2·dof).
        let limit = dof + 3.72 * (2.0 * dof).sqrt();
        assert!(
            chi2 < limit,
            "seed {seed}: chi2 {chi2:.1} over {dof} dof exceeds {limit:.1}"
        );
    }
    // The same test accepts scGPT's own draws (numpy mode) and rejects a biased rule.
    let (chi2, dof) = tie_chi_square(&s.refs, &tokenize(&s, TieMode::Numpy, 0));
    assert!(chi2 < dof + 3.72 * (2.0 * dof).sqrt());
    let mut biased = tokenize(&s, TieMode::Numpy, 0);
    for r in &s.refs {
        let range = biased.offsets[r.index] + 1..biased.offsets[r.index + 1];
        for (k, v) in biased.values[range].iter_mut().enumerate() {
            *v = r.left[k] as f32; // always the top of the tie
        }
    }
    let (chi2, dof) = tie_chi_square(&s.refs, &biased);
    assert!(
        chi2 > dof + 3.72 * (2.0 * dof).sqrt(),
        "the test has no power"
    );
}

/// A cell gets the same seeded tokens whatever batch it arrives in.
#[test]
fn seeded_tokens_do_not_depend_on_the_batch() {
    let s = setup();
    let full = tokenize(&s, TieMode::Seeded, 3);
    // A batch of every 7th cell, in reverse order.
    let picked: Vec<usize> = (0..s.batch.n_cells()).step_by(7).rev().collect();
    let mut csr = CsrArrays {
        indptr: vec![0],
        ..Default::default()
    };
    for &i in &picked {
        let c = s.batch.cell(i);
        csr.indices.extend_from_slice(c.genes);
        csr.data.extend_from_slice(c.counts);
        csr.indptr.push(csr.indices.len() as u64);
    }
    let barcodes = picked
        .iter()
        .map(|&i| s.batch.barcodes[i].clone())
        .collect();
    let sub = CountBatch::from_csr(
        "sub",
        Format::Mtx,
        s.batch.gene_names.clone(),
        None,
        barcodes,
        csr,
    )
    .unwrap();
    let sub_setup = Setup {
        batch: sub,
        vocab: s.vocab.clone(),
        refs: Vec::new(),
    };
    let part = tokenize(&sub_setup, TieMode::Seeded, 3);
    for (k, &i) in picked.iter().enumerate() {
        assert_eq!(part.cell(k), full.cell(i), "cell {i}");
    }
}

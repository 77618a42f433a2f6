//! Packages made by tools/export-scgpt from randomly initialised scGPT 0.2.4 models run in
//! cellstream and agree with torch and onnxruntime (each fixture's `reference.jsonl`, written
//! by the converter's self-test): the opset-18 torch form (`scgpt-random`, post-norm; and
//! `scgpt-h16-prenorm-torch`, head width 16, pre-norm), and the fast form at head widths 64
//! (post-norm, fine-tuned: logits and labels) and 128 (pre-norm), on sequences up to 1,200
//! tokens, padded rows included, for every kernel tier this CPU runs; every form fused.

use crate::common;
use cellstream::model::{ModelInput, ModelPackage, ModelRuntime, Options, Worker};
use cellstream::simd::Simd;
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    gene_ids: Vec<u32>,
    values: Vec<f32>,
    embedding_torch: Vec<f32>,
    embedding_ort: Vec<f32>,
    #[serde(default)]
    logits_torch: Option<Vec<f32>>,
    #[serde(default)]
    logits_ort: Option<Vec<f32>>,
}

fn references(dir: &std::path::Path) -> Vec<Reference> {
    let text = std::fs::read_to_string(dir.join("reference.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The largest difference between `got` (rows of `width`) and each reference row's field.
fn worst(got: &[f32], width: usize, refs: &[&[f32]]) -> f32 {
    refs.iter()
        .enumerate()
        .flat_map(|(row, want)| {
            assert_eq!(want.len(), width);
            got[row * width..(row + 1) * width]
                .iter()
                .zip(*want)
                .map(|(a, b)| (a - b).abs())
        })
        .fold(0f32, f32::max)
}

/// Every reference sequence padded together (as onnxruntime ran them), then each alone at
/// its own length (as torch ran it), on `options`; returns the largest difference.
fn check(dir: &std::path::Path, options: Options) -> f32 {
    let pkg = ModelPackage::load(dir).unwrap();
    let rt = ModelRuntime::with(&pkg, options).unwrap();
    let refs = references(dir);
    assert!(refs.len() >= 10);
    let name = format!(
        "{} on {}/{}",
        dir.display(),
        options.fusion.name(),
        options.simd.name()
    );
    let mut worker = Worker::new(rt.clone());
    let (d, k) = (rt.embedding_dim, rt.n_classes);
    let longest = refs.iter().map(|r| r.gene_ids.len()).max().unwrap();
    let mut batch = ModelInput::new(refs.len(), longest);
    for (row, r) in refs.iter().enumerate() {
        batch.set_row(row, &r.gene_ids, &r.values, rt.pad_id, rt.pad_value);
    }
    let out = worker.run(&batch).unwrap();
    let ort: Vec<&[f32]> = refs.iter().map(|r| &r.embedding_ort[..]).collect();
    let mut diff = worst(&out.embedding, d, &ort);
    if k > 0 {
        let ort: Vec<&[f32]> = refs
            .iter()
            .map(|r| &r.logits_ort.as_ref().unwrap()[..])
            .collect();
        diff = diff.max(worst(out.logits.as_ref().unwrap(), k, &ort));
    }
    for r in &refs {
        let mut one = ModelInput::new(1, r.gene_ids.len());
        one.set_row(0, &r.gene_ids, &r.values, rt.pad_id, rt.pad_value);
        let out = worker.run(&one).unwrap();
        diff = diff.max(worst(&out.embedding, d, &[&r.embedding_torch]));
        if let Some(torch) = &r.logits_torch {
            diff = diff.max(worst(out.logits.as_ref().unwrap(), k, &[torch]));
        }
    }
    eprintln!("{name}: max abs diff vs onnxruntime and torch {diff:e}");
    assert!(diff <= 1e-4, "{name}: max abs diff {diff} > 1e-4");
    diff
}

/// Each form this CPU runs: fused on every kernel tier, and tract's own ops.
fn forms() -> Vec<Options> {
    eprintln!("kernel tiers covered: {:?}", Simd::available());
    let mut forms: Vec<Options> = Simd::available().into_iter().map(Options::tier).collect();
    forms.push(Options::unfused(Simd::detect()));
    forms
}

/// The torch form (opset 18, `nn.TransformerEncoder` as torch.onnx writes it: sequence-first,
/// heads merged with rows, ONNX `LayerNormalization`) is fused too: both attention layers
/// (head-major), every LayerNorm (2 encoder norms + 2 per layer), and the gene encoder folded
/// into a token table.
#[test]
fn converted_scgpt_model_agrees_with_torch_and_onnxruntime() {
    let dir = common::fixture("scgpt-random");
    let pkg = ModelPackage::load(&dir).unwrap();
    assert!(pkg.labels.is_none(), "an embedding-only model");
    let f = ModelRuntime::with(&pkg, Options::best()).unwrap().fused;
    assert_eq!((f.attention_layers, f.layer_norms), (2, 6), "{f:?}");
    assert!(f.token_tables >= 1, "{f:?}");
    for options in forms() {
        check(&dir, options);
    }
}

/// A fixture of 2 layers: its `labels`, every attention layer and LayerNorm fused
/// (2 encoder norms + 2 per layer, and a classifier head's, `norms` in all), token tables
/// folded, and agreement on every form.
fn check_fused(name: &str, labels: Option<usize>, norms: usize) {
    let dir = common::fixture(name);
    let pkg = ModelPackage::load(&dir).unwrap();
    assert_eq!(pkg.labels.as_ref().map(Vec::len), labels);
    let rt = ModelRuntime::with(&pkg, Options::best()).unwrap();
    let f = rt.fused;
    assert_eq!((f.attention_layers, f.layer_norms), (2, norms), "{f:?}");
    assert!(f.token_tables >= 1, "{f:?}");
    for options in forms() {
        check(&dir, options);
    }
}

/// Head width 64, post-norm, a fine-tuned classifier head (scGPT's `ClsDecoder`: two
/// LayerNorms, ONNX `LayerNormalization` in the export): the logits agree too.
#[test]
fn head_width_64_fine_tuned_agrees_up_to_1200_tokens() {
    check_fused("scgpt-h64", Some(5), 8);
}

/// Head width 128, scGPT's pre-norm layers.
#[test]
fn head_width_128_pre_norm_agrees_up_to_1200_tokens() {
    check_fused("scgpt-h128-prenorm", None, 6);
}

/// Head width 16, scGPT's pre-norm layers in the torch form (`TorchFlashMHA` as torch.onnx
/// writes it: 5-axis q/k/v, the scale after the scores, padding keys filled by `Where`): both
/// attention layers and every LayerNorm fused, and agreement on every form.
#[test]
fn head_width_16_pre_norm_torch_form_agrees_up_to_1200_tokens() {
    check_fused("scgpt-h16-prenorm-torch", None, 6);
}

/// The opt-in int8 products (and integer attention weighted sums) on every converted fixture
/// (both export forms, head widths 16 to 128, pre- and post-norm), every kernel tier this CPU
/// runs: each reference sequence's
/// embedding within cosine 0.999 of onnxruntime's f32, padded together up to 1,200 tokens,
/// and the fine-tuned fixture's labels unchanged.
#[test]
fn int8_products_stay_within_cosine_0_999_on_every_converted_fixture() {
    let argmax = |v: &[f32]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap();
    for name in [
        "scgpt-random",
        "scgpt-h16-prenorm-torch",
        "scgpt-h64",
        "scgpt-h128-prenorm",
    ] {
        let dir = common::fixture(name);
        let pkg = ModelPackage::load(&dir).unwrap();
        let refs = references(&dir);
        for simd in Simd::available() {
            let rt = ModelRuntime::with(&pkg, common::int8_options(simd)).unwrap();
            assert!(rt.fused.int8_products > 0, "{name}: {:?}", rt.fused);
            assert!(rt.fused.int8_attention_layers > 0, "{name}: {:?}", rt.fused);
            let (d, k) = (rt.embedding_dim, rt.n_classes);
            let longest = refs.iter().map(|r| r.gene_ids.len()).max().unwrap();
            let mut batch = ModelInput::new(refs.len(), longest);
            for (row, r) in refs.iter().enumerate() {
                batch.set_row(row, &r.gene_ids, &r.values, rt.pad_id, rt.pad_value);
            }
            let out = Worker::new(rt.clone()).run(&batch).unwrap();
            let mut lowest = 1f64;
            for (row, r) in refs.iter().enumerate() {
                let e = &out.embedding[row * d..(row + 1) * d];
                lowest = lowest.min(common::cosine(e, &r.embedding_ort));
                if let Some(want) = &r.logits_ort {
                    let got = &out.logits.as_ref().unwrap()[row * k..(row + 1) * k];
                    assert_eq!(argmax(got), argmax(want), "{name}/{}: label", simd.name());
                }
            }
            eprintln!(
                "{name} int8/{}: {} products, lowest cosine {lowest:.6}",
                simd.name(),
                rt.fused.int8_products
            );
            assert!(lowest >= 0.999, "{name}/{}: cosine {lowest}", simd.name());
        }
    }
}

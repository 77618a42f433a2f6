//! `cellstream reference`: embeds labelled cells and writes a reference folder that `embed
//! --reference` and the daemon's `[model] reference` label cells against (kNN, calibrated
//! vote, novelty: `cellstream::reference`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cellstream::embed::{EmbedConfig, Embedder};
use cellstream::model::{default_model_dir, ModelPackage};
use cellstream::reference::expression::{Genes, Profile, Projection};
use cellstream::reference::{
    calibration_sample, ExpressionFit, Provenance, Reference, Search, Thinned, THINNED_DEPTHS,
};

use super::UsageError;

#[derive(clap::Args)]
pub struct Args {
    /// Batches holding the labelled cells (any readable format).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Tab-separated labels: a header row, the barcode in the first column.
    #[arg(long)]
    labels: PathBuf,
    /// The labels file's column holding each cell's label.
    #[arg(long, default_value = "cell_type")]
    column: String,
    /// Model package directory (default: the shipped models/pbmc-compact).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The reference folder to write.
    #[arg(long)]
    out: PathBuf,
    /// Inference threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Run seed (as `embed`'s; models trained with `ties = "expected"` ignore it).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    caps: super::InputCaps,
    /// The reference cells' 2-D map (e.g. a UMAP): tab-separated, a header row, the barcode
    /// then x and y. The daemon's page places query cells on it. Default: the embeddings'
    /// first two principal components.
    #[arg(long)]
    layout: Option<PathBuf>,
    /// How queries find their nearest reference cells.
    #[arg(long, value_enum, default_value = "auto")]
    index: Search,
    /// Also measure novelty in expression space (principal components of the reference's
    /// most variable genes): `assigned` then needs a cell near reference cells in both.
    #[arg(long)]
    expression_space: bool,
}

/// Coordinates for each of `barcodes` from a tab-separated file (header; barcode, x, y).
fn read_layout(path: &Path, barcodes: &[String]) -> anyhow::Result<Vec<[f32; 2]>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut by_barcode = HashMap::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let xy = (f.len() >= 3)
            .then(|| {
                Some([
                    f[1].trim().parse::<f32>().ok()?,
                    f[2].trim().parse::<f32>().ok()?,
                ])
            })
            .flatten()
            .ok_or_else(|| {
                UsageError(format!(
                    "{}: line {}: expected barcode<TAB>x<TAB>y with numbers",
                    path.display(),
                    n + 1
                ))
            })?;
        by_barcode.insert(f[0], xy);
    }
    barcodes
        .iter()
        .map(|b| {
            by_barcode.get(b.as_str()).copied().ok_or_else(|| {
                UsageError(format!("{}: no coordinates for cell {b}", path.display())).into()
            })
        })
        .collect()
}

/// Barcode → label from a tab-separated file with a header; empty labels are left out.
fn read_labels(path: &Path, column: &str) -> anyhow::Result<HashMap<String, String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split('\t').collect();
    let col = header.iter().position(|h| *h == column).ok_or_else(|| {
        UsageError(format!(
            "{}: no column {column:?} (the header has {header:?}); choose one with --column",
            path.display()
        ))
    })?;
    if col == 0 {
        return Err(UsageError(format!(
            "{}: --column {column:?} is the barcode column",
            path.display()
        ))
        .into());
    }
    let mut labels = HashMap::new();
    for (n, line) in lines.enumerate() {
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let (Some(barcode), Some(label)) = (fields.first(), fields.get(col)) else {
            return Err(UsageError(format!(
                "{}: line {}: {} field(s), the label is field {}",
                path.display(),
                n + 2,
                fields.len(),
                col + 1
            ))
            .into());
        };
        if !label.trim().is_empty() {
            labels.insert(barcode.to_string(), label.trim().to_string());
        }
    }
    Ok(labels)
}

/// Seed of the thinning draws (the first depth's; the next ones count up from it).
const THIN_SEED: u64 = 0x7468_696e;

pub fn run(args: Args) -> anyhow::Result<()> {
    let labels = read_labels(&args.labels, &args.column)?;
    let model_dir = args.model.clone().unwrap_or_else(default_model_dir);
    let package = ModelPackage::load(&model_dir)?;
    let model = package.model_id();
    let dim = package.manifest.embedding_dim;
    let cfg = EmbedConfig {
        threads: args.threads.max(1),
        seed: args.seed,
        ..EmbedConfig::default()
    };
    let mut embedder = Embedder::new(package, cfg)?;
    embedder.warm_up()?;
    let (mut cells, mut unlabelled, mut empty) = (Vec::new(), 0usize, 0usize);
    // Per reference cell its UMIs and where it came from (input, row).
    let (mut umis, mut origin) = (Vec::new(), Vec::new());
    let bar = super::progress::cells(0);
    for (k, input) in args.inputs.iter().enumerate() {
        bar.set_message(format!("reading {}", input.display()));
        let batch = args.caps.read(input)?;
        bar.inc_length(batch.n_cells() as u64);
        bar.set_message(format!(
            "{} ({}/{})",
            batch.batch_id(),
            k + 1,
            args.inputs.len()
        ));
        let results = embedder.embed_with_progress(&batch, &mut |n| bar.inc(n as u64))?;
        for (row, (barcode, r)) in batch.barcodes.iter().zip(results).enumerate() {
            match (labels.get(barcode), r.embedding) {
                (None, _) => unlabelled += 1,
                (Some(_), None) => empty += 1,
                (Some(label), Some(e)) => {
                    cells.push((barcode.clone(), label.clone(), e));
                    umis.push(r.qc.total_counts);
                    origin.push((k, row));
                }
            }
        }
    }
    // The cells the calibration reads, thinned to each depth and embedded again: a second
    // pass over the inputs, bounded by the sample's size whatever the reference's.
    let sample = calibration_sample(cells.len());
    let mut thinned: Vec<Thinned> = THINNED_DEPTHS
        .iter()
        .map(|&depth| Thinned {
            depth,
            cells: vec![None; sample.len()],
        })
        .collect();
    bar.inc_length((THINNED_DEPTHS.len() * sample.len()) as u64);
    // With an expression space: per depth (full first), per sampled cell, its profile.
    let mut genes = Genes::default();
    let mut profiles: Vec<Vec<Option<Profile>>> = if args.expression_space {
        vec![vec![None; sample.len()]; THINNED_DEPTHS.len() + 1]
    } else {
        Vec::new()
    };
    for (k, input) in args.inputs.iter().enumerate() {
        // (position in the sample, row in this input) of the sampled cells it holds.
        let (slots, rows): (Vec<usize>, Vec<usize>) = sample
            .iter()
            .enumerate()
            .filter(|&(_, &i)| origin[i].0 == k)
            .map(|(p, &i)| (p, origin[i].1))
            .unzip();
        if rows.is_empty() {
            continue;
        }
        bar.set_message(format!("{}: thinned copies", input.display()));
        let batch = args.caps.read(input)?.select_rows(&rows);
        let numbers = if args.expression_space {
            genes.numbers(&batch)
        } else {
            Vec::new()
        };
        if let Some(full) = profiles.first_mut() {
            for (r, &p) in slots.iter().enumerate() {
                full[p] = Genes::profile(&batch, &numbers, r);
            }
        }
        for (j, t) in thinned.iter_mut().enumerate() {
            let shallow = batch.thinned(t.depth, THIN_SEED + j as u64);
            if let Some(level) = profiles.get_mut(j + 1) {
                for (r, &p) in slots.iter().enumerate() {
                    level[p] = Genes::profile(&shallow, &numbers, r);
                }
            }
            let results = embedder.embed_with_progress(&shallow, &mut |n| bar.inc(n as u64))?;
            for (&p, r) in slots.iter().zip(results) {
                t.cells[p] = r.embedding.map(|e| (e, r.qc.total_counts));
            }
        }
    }
    bar.finish_and_clear();
    let n = cells.len();
    let built = Provenance {
        inputs: args
            .inputs
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        labels_file: args.labels.display().to_string(),
        column: args.column.clone(),
        cellstream: env!("CARGO_PKG_VERSION").into(),
        unlabelled_cells: unlabelled,
    };
    let mut reference =
        Reference::build(cells, dim, model, built, args.index).map_err(UsageError)?;
    let expression = if args.expression_space {
        let full: Vec<&Profile> = profiles[0].iter().flatten().collect();
        let projection = Projection::fit(&genes, &full).ok_or_else(|| {
            UsageError(format!(
                "expression space: {} cells with counts and no gene that varies among them",
                full.len()
            ))
        })?;
        let rows = projection.rows(&genes);
        let coords = profiles
            .iter()
            .map(|level| {
                level
                    .iter()
                    .map(|p| p.as_ref().map(|p| projection.project_profile(&rows, p)))
                    .collect()
            })
            .collect();
        Some(ExpressionFit { projection, coords })
    } else {
        None
    };
    reference
        .calibrate_depths(&umis, &thinned, expression)
        .map_err(UsageError)?;
    if let Some(path) = &args.layout {
        let coords = read_layout(path, reference.barcodes())?;
        reference
            .set_layout(coords)
            .map_err(|e| UsageError(format!("{}: {e}", path.display())))?;
    }
    reference
        .write(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let m = &reference.meta;
    if let Some(i) = &m.index {
        eprintln!(
            "search graph: {} ({} cells, ef_search {})",
            args.out.join(&i.file).display(),
            m.cells,
            i.ef_search
        );
    }
    eprintln!(
        "reference {}: {n} cells of {} labels ({unlabelled} unlabelled, {empty} with no gene in the vocabulary left out); leave-one-out accuracy {:.3}, {:.1}% assigned at confidence ≥ {:.2} (precision {:.3})",
        args.out.display(),
        m.labels.len(),
        m.leave_one_out.accuracy,
        100.0 * m.leave_one_out.assigned_fraction,
        m.confidence_threshold,
        m.leave_one_out.precision_of_assigned
    );
    Ok(())
}

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use cellstream::tokenize::{TieMode, TokenBatch, Tokenizer, TokenizerConfig, Vocab};

use super::UsageError;

#[derive(Clone, Copy, clap::ValueEnum)]
enum Ties {
    /// Per-cell generator from (seed, barcode): the same tokens in any batch.
    Seeded,
    /// numpy's MT19937 as `np.random.seed(S)`: bit-identical to scGPT.
    Numpy,
    /// No randomness: a tie's mean bin, and the largest counts where a cell is too long.
    Expected,
}

#[derive(clap::Args)]
pub struct Args {
    /// The batch to tokenize.
    input: PathBuf,
    /// The vocabulary (scGPT vocab.json; <pad>, <cls>, <eoc> are appended when missing).
    #[arg(long)]
    vocab: PathBuf,
    /// Number of bins, as scGPT's n_bins.
    #[arg(long, default_value_t = 51)]
    n_bins: u16,
    /// Longest sequence, <cls> included; longer cells keep a random subset of genes.
    #[arg(long, default_value_t = 1200)]
    max_len: usize,
    /// How ties between quantile edges are broken.
    #[arg(long, value_enum, default_value_t = Ties::Seeded)]
    ties: Ties,
    /// Run seed (numpy mode: below 2^32, as np.random.seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output .jsonl file ("-" for stdout).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    caps: super::InputCaps,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.n_bins < 3 {
        return Err(UsageError(format!(
            "--n-bins {} is too small (at least 3)",
            args.n_bins
        ))
        .into());
    }
    if args.max_len < 2 {
        return Err(UsageError(format!(
            "--max-len {} leaves no room for a gene after <cls>",
            args.max_len
        ))
        .into());
    }
    let ties = match args.ties {
        Ties::Seeded => TieMode::Seeded,
        Ties::Numpy if args.seed > u32::MAX as u64 => {
            return Err(UsageError(format!(
                "--seed {} is out of numpy's range (0..2^32)",
                args.seed
            ))
            .into())
        }
        Ties::Numpy => TieMode::Numpy,
        Ties::Expected => TieMode::Expected,
    };
    let vocab = Vocab::from_json_file(&args.vocab)?;
    let batch = args.caps.read(&args.input)?;
    let genes = vocab.map_genes(&batch.gene_names);
    let cfg = TokenizerConfig {
        n_bins: args.n_bins,
        max_len: args.max_len,
        ties,
        seed: args.seed,
        ..TokenizerConfig::default()
    };
    let tokens = Tokenizer::new(&vocab, cfg).tokenize(&batch, &genes);

    let mut w = super::open_output(&args.out)?;
    write_jsonl(&mut w, &batch.barcodes, &tokens)
        .and_then(|_| w.flush())
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "tokenized {} cells ({} of {} genes in the vocabulary)",
        tokens.n_cells(),
        genes.n_matched,
        batch.n_genes()
    );
    Ok(())
}

/// `{"cell": BARCODE, "gene_ids": [...], "values": [...]}` per cell, input order.
fn write_jsonl(
    w: &mut impl Write,
    barcodes: &[String],
    tokens: &TokenBatch,
) -> std::io::Result<()> {
    for (i, barcode) in barcodes.iter().enumerate() {
        let (ids, values) = tokens.cell(i);
        w.write_all(b"{\"cell\": ")?;
        serde_json::to_writer(&mut *w, barcode)?;
        w.write_all(b", \"gene_ids\": [")?;
        for (k, id) in ids.iter().enumerate() {
            if k > 0 {
                w.write_all(b", ")?;
            }
            write!(w, "{id}")?;
        }
        w.write_all(b"], \"values\": [")?;
        for (k, &v) in values.iter().enumerate() {
            if k > 0 {
                w.write_all(b", ")?;
            }
            // Bins are whole numbers; keep them JSON floats as scGPT's float32 values are.
            if v.fract() == 0.0 && v.abs() < 1e9 {
                write!(w, "{}.0", v as i64)?;
            } else {
                write!(w, "{v}")?;
            }
        }
        w.write_all(b"]}\n")?;
    }
    Ok(())
}

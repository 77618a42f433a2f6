use std::path::PathBuf;

use cellstream::batch::write_csb_file;

use super::UsageError;

#[derive(clap::Args)]
pub struct Args {
    /// Any readable batch: 10x MTX directory, .csb, .csb.zst, .h5/.h5ad (feature hdf5), dense text.
    input: PathBuf,
    /// Output file, ending in .csb or .csb.zst.
    out: PathBuf,
    #[command(flatten)]
    caps: super::InputCaps,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let name = args.out.to_string_lossy();
    if !(name.ends_with(".csb") || name.ends_with(".csb.zst")) {
        return Err(UsageError(format!(
            "{name}: the output name must end in .csb or .csb.zst"
        ))
        .into());
    }
    // The readers cannot count their progress: a spinner with the time spent per step.
    let step = super::progress::spinner(format!("reading {}", args.input.display()));
    let batch = args.caps.read(&args.input)?;
    step.set_message(format!(
        "writing {} ({} cells)",
        args.out.display(),
        batch.n_cells()
    ));
    write_csb_file(&batch, &args.out)?; // its error names the file
    step.finish_and_clear();
    eprintln!(
        "wrote {} ({} cells × {} genes, {} entries)",
        args.out.display(),
        batch.n_cells(),
        batch.n_genes(),
        batch.nnz()
    );
    Ok(())
}

//! The child side of `batch::isolated`: read one input, write it as `.csb`, then the report.
//! Hidden from `--help`; only the daemon runs it (on itself).

use std::io::Write;
use std::path::PathBuf;

use cellstream::batch::isolated::{read_contained_capped, report_path, ChildReport, Refusal};
use cellstream::batch::{write_csb, Caps, ReadOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Largest number of bytes a compressed input may expand to.
    #[arg(long)]
    max_decompressed: u64,
    /// The caps on the batch's shape (the defaults when absent).
    #[arg(long)]
    max_cells: Option<u64>,
    #[arg(long)]
    max_genes: Option<u64>,
    #[arg(long)]
    max_stored_counts: Option<u64>,
    input: PathBuf,
    /// The `.csb` to write; the report goes beside it.
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Should the service's memory run out while this child reads (a hostile HDF5 file), the
    // kernel's OOM killer takes the child, not the daemon: the file is then quarantined as
    // `reader_crashed`. Raising one's own score needs no privilege.
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    let opts = ReadOptions {
        max_decompressed: args.max_decompressed,
        memory_map: false,
    };
    let d = Caps::default();
    let caps = Caps {
        max_cells: args.max_cells.unwrap_or(d.max_cells),
        max_genes: args.max_genes.unwrap_or(d.max_genes),
        max_stored_counts: args.max_stored_counts.unwrap_or(d.max_stored_counts),
    };
    let report = match read_contained_capped(&args.input, &opts, &caps) {
        Ok(batch) => match write_scratch(&batch, &args.out) {
            Ok(()) => ChildReport::Read,
            Err(e) => ChildReport::Refused(Refusal {
                kind: "internal".into(),
                error: format!(
                    "{}: cannot write the read batch to {}: {e}",
                    args.input.display(),
                    args.out.display()
                ),
            }),
        },
        Err(refusal) => ChildReport::Refused(refusal),
    };
    // Written last and in one piece: its presence means the `.csb` is complete.
    std::fs::write(report_path(&args.out), serde_json::to_vec(&report)?)?;
    Ok(())
}

/// A scratch file the parent maps and deletes at once: no fsync, no rename.
fn write_scratch(
    batch: &cellstream::batch::CountBatch,
    out: &std::path::Path,
) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(out)?);
    write_csb(batch, &mut w)?;
    w.flush()
}

//! The child side of `batch::isolated`: read one input, write it as `.csb`, then the report.
//! Hidden from `--help`; only the daemon runs it (on itself).

use std::io::Write;
use std::path::PathBuf;

use cellstream::batch::isolated::{read_contained, report_path, ChildReport, Refusal};
use cellstream::batch::{write_csb, ReadOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Largest number of bytes a compressed input may expand to.
    #[arg(long)]
    max_decompressed: u64,
    input: PathBuf,
    /// The `.csb` to write; the report goes beside it.
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = ReadOptions {
        max_decompressed: args.max_decompressed,
        memory_map: false,
    };
    let report = match read_contained(&args.input, &opts) {
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

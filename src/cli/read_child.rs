//! The child side of `batch::isolated`: read one input, write it as `.csb`, then the report.
//! Hidden from `--help`; only the daemon runs it (on itself).

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use cellstream::batch::isolated::{report_path, ChildReport};
use cellstream::batch::{read_batch, write_csb, ReadOptions};
use cellstream::pipeline::pool::panic_message;

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
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let batch = read_batch(&args.input, &opts).map_err(|e| ChildReport::Refused {
            kind: e.kind.name().into(),
            error: e.to_string(),
        })?;
        write_scratch(&batch, &args.out).map_err(|e| ChildReport::Refused {
            kind: "internal".into(),
            error: format!(
                "{}: cannot write the read batch to {}: {e}",
                args.input.display(),
                args.out.display()
            ),
        })
    }));
    let report = match outcome {
        Ok(Ok(())) => ChildReport::Read,
        Ok(Err(refused)) => refused,
        Err(panic) => ChildReport::Refused {
            kind: "internal".into(),
            error: format!(
                "{}: internal error (panic) while reading: {}",
                args.input.display(),
                panic_message(&panic)
            ),
        },
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

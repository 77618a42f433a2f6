use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The daemon's TOML configuration (every key: systemd/cellstream.toml).
    #[arg(long)]
    config: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    cellstream::daemon::serve(&args.config)
}

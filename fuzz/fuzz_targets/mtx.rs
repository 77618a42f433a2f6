//! 10x Matrix Market directories: the input is split at the first two `\0\0` markers into
//! matrix.mtx, features.tsv and barcodes.tsv (each member gzipped when it starts with the
//! gzip magic, as the reader detects), written to a scratch folder and read back.
#![no_main]

use std::sync::OnceLock;

use cellstream::batch::{read_batch, ReadOptions};
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0).collect::<Vec<_>>();
    parts.resize(3, b"");
    let dir = scratch().path().join("mtx");
    let _ = std::fs::create_dir(&dir);
    for (name, bytes) in ["matrix.mtx", "features.tsv", "barcodes.tsv"]
        .iter()
        .zip(parts)
    {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let opts = ReadOptions {
        max_decompressed: 16 << 20,
        ..ReadOptions::default()
    };
    if let Ok(b) = read_batch(&dir, &opts) {
        assert_eq!(b.barcodes.len(), b.n_cells());
        assert_eq!(b.gene_names.len(), b.n_genes());
    }
});

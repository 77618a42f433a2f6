//! Shared by the targets that hand one file to `read_batch`: the bytes are written to a
//! scratch folder (kept for the whole run) under the given name, then read with a 16 MiB
//! decompression cap and no memory map, as the daemon reads.

use std::sync::OnceLock;

use cellstream::batch::{read_batch, ReadOptions};

fn scratch() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
}

pub fn read_as(name: &str, data: &[u8]) {
    let path = scratch().path().join(name);
    std::fs::write(&path, data).unwrap();
    let opts = ReadOptions {
        max_decompressed: 16 << 20,
        memory_map: false,
    };
    let _ = read_batch(&path, &opts);
}

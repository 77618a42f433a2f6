//! `.csb.zst`: zstd framing and the decompressed-size cap, then the `.csb` parser.
#![no_main]

use std::path::Path;

use cellstream::batch::ReadOptions;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opts = ReadOptions {
        max_decompressed: 16 << 20,
        ..ReadOptions::default()
    };
    let _ = cellstream::batch::csb_from_zst_reader(Path::new("fuzz.csb.zst"), data, &opts);
});

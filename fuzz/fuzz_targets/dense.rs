//! Any single file through format detection: dense text, gzip, zstd, csb, unknown content.
#![no_main]

mod read_file;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| read_file::read_as("batch", data));

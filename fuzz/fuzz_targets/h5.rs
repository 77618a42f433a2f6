//! 10x `.h5` and AnnData `.h5ad` through the HDF5 reader (feature `hdf5`): libhdf5 opens the
//! mutated file, the reader walks its groups and datasets and validates what it gets.
//! libhdf5 itself (C) is not instrumented, so coverage guides only the Rust side; what this
//! target looks for is a file that makes either side crash, hang or exhaust memory.
#![no_main]

mod read_file;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| read_file::read_as("batch.h5", data));

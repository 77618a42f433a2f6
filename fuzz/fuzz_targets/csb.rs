//! `.csb` header, section table and sections: any bytes give a batch or an error, never a
//! panic; a batch that parses is internally consistent.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = cellstream::batch::csb_from_bytes(Path::new("fuzz.csb"), data) {
        assert_eq!(b.indptr().len(), b.n_cells() + 1);
        assert_eq!(b.indices().len(), b.data().len());
        for i in 0..b.n_cells() {
            let cell = b.cell(i);
            assert!(cell.genes.iter().all(|&g| (g as usize) < b.n_genes()));
        }
    }
});

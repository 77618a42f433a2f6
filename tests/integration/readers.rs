//! Every reader yields the same matrix for the same data, and `convert` round-trips.

use crate::common;
use std::path::PathBuf;

use crate::common::{assert_same_matrix, fixture, read};
use cellstream::batch::{read_batch, write_csb_file, Format, ReadOptions};

fn formats(rel: &str) -> PathBuf {
    fixture(&format!("formats/{rel}"))
}

/// Every sample we ship, with the format it must be detected as.
fn samples() -> Vec<(PathBuf, Format)> {
    let mut v = vec![
        (common::pbmc3k(), Format::Mtx),
        (
            formats("scanpy_10x_v3/filtered_feature_bc_matrix"),
            Format::Mtx,
        ),
        (
            formats("scanpy_10x_v2/filtered_gene_bc_matrices/hg19_chr21"),
            Format::Mtx,
        ),
        (formats("seurat_testdata"), Format::Mtx),
        (formats("seurat_testdata/cr3.0"), Format::Mtx),
        (formats("seurat_testdata/pbmc_raw.txt"), Format::DenseText),
        (
            common::repo().join("bench-data/pbmc68k_reduced"),
            Format::Mtx,
        ),
    ];
    if cfg!(feature = "hdf5") {
        for h5 in [
            "scanpy_10x_v3/filtered_feature_bc_matrix.h5",
            "scanpy_10x_v2/filtered_gene_bc_matrices_h5.h5",
            "scanpy_10x_v2/multiple_genomes.h5",
            "seurat_testdata/visium/filtered_feature_bc_matrix.h5",
            "seurat_testdata/visium/filtered_feature_bc_matrix.h5.gz",
        ] {
            v.push((formats(h5), Format::Hdf5));
        }
        v.push((fixture("pbmc3k_labeled_counts.h5ad"), Format::Hdf5));
    }
    v
}

#[test]
fn every_sample_reads_with_its_format() {
    let _turn = common::hdf5_or_spawn();
    for (path, format) in samples() {
        let b = read(&path);
        assert_eq!(b.format, format, "{}", path.display());
        assert!(
            b.n_cells() > 0 && b.n_genes() > 0 && b.nnz() > 0,
            "{}",
            path.display()
        );
    }
}

#[test]
fn known_shapes() {
    let b = read(&common::pbmc3k());
    assert_eq!(
        (b.n_cells(), b.n_genes(), b.nnz()),
        (2638, 32738, 2_242_529)
    );
    assert_eq!(b.barcodes[0], "AAACATACAACCAC-1");
    let v3 = read(&formats("scanpy_10x_v3/filtered_feature_bc_matrix"));
    assert_eq!((v3.n_cells(), v3.n_genes(), v3.nnz()), (1107, 507, 23866));
    assert_eq!(v3.gene_ids.as_ref().unwrap()[0], "ENSG00000279493");
    assert_eq!(v3.gene_names[0], "CH507-9B2.2");
    let v2 = read(&formats(
        "scanpy_10x_v2/filtered_gene_bc_matrices/hg19_chr21",
    ));
    assert_eq!((v2.n_cells(), v2.n_genes(), v2.nnz()), (12, 343, 12));
    // cr3.0 holds antibody-capture features too; they are kept as columns.
    let cr3 = read(&formats("seurat_testdata/cr3.0"));
    assert_eq!(
        cr3.gene_names,
        ["RP11-34P13.3", "FAM138A", "FAM231B", "CD3", "CD19"]
    );
    assert_eq!(cr3.cell(3).counts, &[4000, 5]);
}

/// Seurat's dense pbmc_raw.txt and its Matrix Market twin hold the same cells: on the genes
/// both list, the counts agree (barcodes differ only by the `-1` suffix).
#[test]
fn dense_text_agrees_with_its_mtx_twin() {
    let dense = read(&formats("seurat_testdata/pbmc_raw.txt"));
    let mtx = read(&formats("seurat_testdata"));
    assert_eq!(dense.n_cells(), mtx.n_cells());
    for (a, b) in dense.barcodes.iter().zip(&mtx.barcodes) {
        assert_eq!(format!("{a}-1"), *b);
    }
    let col_in_mtx: std::collections::HashMap<&str, u32> = mtx
        .gene_names
        .iter()
        .enumerate()
        .map(|(i, g)| (g.as_str(), i as u32))
        .collect();
    let mut compared = 0;
    for cell in 0..dense.n_cells() {
        let d = dense.cell(cell);
        let m = mtx.cell(cell);
        for (&g, &c) in d.genes.iter().zip(d.counts) {
            let Some(&col) = col_in_mtx.get(dense.gene_names[g as usize].as_str()) else {
                continue;
            };
            let k = m
                .genes
                .iter()
                .position(|&x| x == col)
                .expect("gene present in the MTX cell");
            assert_eq!(m.counts[k], c);
            compared += 1;
        }
    }
    assert!(compared > 4000, "only {compared} entries compared");
}

#[cfg(feature = "hdf5")]
#[test]
fn hdf5_files_equal_their_mtx_twins() {
    let _turn = common::hdf5_or_spawn();
    let pairs = [
        (
            formats("scanpy_10x_v3/filtered_feature_bc_matrix.h5"),
            formats("scanpy_10x_v3/filtered_feature_bc_matrix"),
        ),
        (
            formats("scanpy_10x_v2/filtered_gene_bc_matrices_h5.h5"),
            formats("scanpy_10x_v2/filtered_gene_bc_matrices/hg19_chr21"),
        ),
        (fixture("pbmc3k_labeled_counts.h5ad"), common::pbmc3k()),
        (
            formats("seurat_testdata/visium/filtered_feature_bc_matrix.h5.gz"),
            formats("seurat_testdata/visium/filtered_feature_bc_matrix.h5"),
        ),
    ];
    for (h5, twin) in pairs {
        assert_same_matrix(&read(&h5), &read(&twin));
    }
    let v3 = read(&formats("scanpy_10x_v3/filtered_feature_bc_matrix.h5"));
    assert_eq!(
        v3.gene_ids,
        read(&formats("scanpy_10x_v3/filtered_feature_bc_matrix")).gene_ids
    );
    // Two genomes: genes concatenated, barcodes shared.
    let multi = read(&formats("scanpy_10x_v2/multiple_genomes.h5"));
    let one = read(&formats("scanpy_10x_v2/filtered_gene_bc_matrices_h5.h5"));
    assert_eq!(multi.n_genes(), 2 * one.n_genes());
    assert_eq!(multi.barcodes, one.barcodes);
}

/// Fuzzing (h5 target): a 10x `.h5` whose `matrix/features/name` dataspace claims 1.7 × 10^11
/// fixed-length strings made the reader allocate 44 TB and abort. Every dataset is now sized
/// against the decompression cap before it is read.
#[cfg(feature = "hdf5")]
#[test]
fn fuzz_crash_h5_dataspace_claiming_terabytes_is_refused_before_allocating() {
    let _turn = common::hdf5_or_spawn();
    let path = fixture("fuzz/h5-huge-dataspace.h5");
    let opts = ReadOptions {
        max_decompressed: 1 << 30,
        memory_map: false,
    };
    let err = read_batch(&path, &opts).unwrap_err().to_string();
    assert!(
        err.contains("h5-huge-dataspace.h5")
            && err.contains("matrix/features/name")
            && err.contains(" cap"),
        "{err}"
    );
}

/// `convert` to .csb and .csb.zst and back gives the same batch, for every sample.
#[test]
fn convert_round_trips_every_sample() {
    let _turn = common::hdf5_or_spawn();
    let dir = tempfile::tempdir().unwrap();
    for (i, (path, _)) in samples().into_iter().enumerate() {
        let original = read(&path);
        for (ext, format) in [("csb", Format::Csb), ("csb.zst", Format::CsbZst)] {
            let out = dir.path().join(format!("b{i}.{ext}"));
            write_csb_file(&original, &out).unwrap();
            let back = read(&out);
            assert_eq!(back.format, format);
            assert_same_matrix(&original, &back);
            assert_eq!(original.gene_ids, back.gene_ids, "{}", path.display());
        }
    }
}

#[test]
fn convert_command_writes_a_readable_file() {
    let _turn = common::hdf5_or_spawn();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run42-000017.csb.zst");
    let src = formats("scanpy_10x_v3/filtered_feature_bc_matrix");
    let res = common::cellstream(&["convert", src.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(res.status.success(), "{}", common::stderr(&res));
    let back = read(&out);
    assert_eq!(back.batch_id(), "run42-000017");
    assert_same_matrix(&read(&src), &back);
    // No temporary file is left beside the output.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn csb_is_read_in_place_from_the_map() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b.csb");
    write_csb_file(&read(&common::pbmc3k()), &out).unwrap();
    let b = read_batch(&out, &ReadOptions::default()).unwrap();
    // The arrays point into the mapping, 64-byte aligned as FORMAT.md promises.
    assert_eq!(b.indptr().as_ptr() as usize % 64, 0);
    assert_eq!(b.indices().as_ptr() as usize % 64, 0);
    assert_eq!(b.data().as_ptr() as usize % 64, 0);
}

#[test]
fn csb_copied_instead_of_mapped_is_the_same_batch() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b.csb");
    write_csb_file(&read(&common::pbmc3k()), &out).unwrap();
    let copied = read_batch(
        &out,
        &ReadOptions {
            memory_map: false,
            ..ReadOptions::default()
        },
    )
    .unwrap();
    let total: u64 = copied.data().iter().map(|&c| c as u64).sum();
    common::assert_same_matrix(&read_batch(&out, &ReadOptions::default()).unwrap(), &copied);
    // Truncating the file afterwards (a producer breaking the spool protocol) cannot touch
    // a copy, where a mapping would fault.
    std::fs::File::options()
        .write(true)
        .open(&out)
        .unwrap()
        .set_len(10)
        .unwrap();
    assert_eq!(copied.data().iter().map(|&c| c as u64).sum::<u64>(), total);
}

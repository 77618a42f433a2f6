//! HDF5 inputs (feature `hdf5`): 10x `.h5` (v3 `matrix/`, v2 one group per genome) and AnnData
//! `.h5ad` (raw counts from `layers/counts`, `raw/X` or `X`; CSR, CSC or dense).

use std::path::Path;

use hdf5::types::{FixedAscii, FixedUnicode, TypeDescriptor, VarLenAscii, VarLenUnicode};
use hdf5::{Container, Dataset, File, Group, H5Type};

use super::bytes::{gunzip_to, GZIP_MAGIC};
use super::{BatchError, CountBatch, CsrArrays, Format, Limits};

/// Why the HDF5 reader gave no batch: the file breaks the format's rules, or it claims more
/// than a cap allows (refused before anything is read).
enum H5Fail {
    Invalid(String),
    TooLarge(String),
}

impl From<String> for H5Fail {
    fn from(what: String) -> H5Fail {
        H5Fail::Invalid(what)
    }
}

type H5Result<T> = Result<T, H5Fail>;

pub fn read(path: &Path, opts: &Limits) -> Result<CountBatch, BatchError> {
    let gzipped = super::bytes::read_head(path, 2)? == GZIP_MAGIC;
    let parts = if gzipped {
        read_gzipped(path, opts)?
    } else {
        read_parts(path, opts)
    };
    let parts = parts.map_err(|fail| match fail {
        H5Fail::Invalid(what) => BatchError::invalid(path, what),
        H5Fail::TooLarge(what) => super::too_large(path, what),
    })?;
    CountBatch::from_csr(
        path,
        Format::Hdf5,
        parts.gene_names,
        parts.gene_ids,
        parts.barcodes,
        parts.csr,
    )
}

/// `.h5.gz`: HDF5 needs a seekable file, so the content is streamed (capped) into a private
/// temporary file first, never held in memory.
fn read_gzipped(path: &Path, opts: &Limits) -> Result<H5Result<Parts>, BatchError> {
    let tmp = std::env::temp_dir().join(format!(
        "cellstream-{}-{:?}.h5",
        std::process::id(),
        std::thread::current().id()
    ));
    let written = std::fs::File::create(&tmp)
        .map_err(|e| BatchError::io(&tmp, e))
        .and_then(|file| {
            let mut w = std::io::BufWriter::new(file);
            gunzip_to(path, opts.max_decompressed, &mut w)?;
            std::io::Write::flush(&mut w).map_err(|e| BatchError::io(&tmp, e))
        });
    let parts = written.map(|()| read_parts(&tmp, opts));
    let _ = std::fs::remove_file(&tmp);
    parts
}

struct Parts {
    gene_names: Vec<String>,
    gene_ids: Option<Vec<String>>,
    barcodes: Vec<String>,
    csr: CsrArrays,
}

/// Every dataset is sized against the caps of `o` before it is read: no more bytes than
/// `max_decompressed`, no more names or entries than the batch's caps allow.
fn read_parts(path: &Path, o: &Limits) -> H5Result<Parts> {
    // HDF5 prints its own error stack to stderr unless told not to; our errors say it better.
    hdf5::silence_errors(true);
    let file = File::open(path).map_err(|e| format!("cannot open as HDF5: {e}"))?;
    if file.link_exists("X") || file.link_exists("obs") {
        return read_anndata(&file, o);
    }
    if file.link_exists("matrix") {
        let m = file.group("matrix").map_err(h5err("matrix"))?;
        let f = m.group("features").map_err(h5err("matrix/features"))?;
        return read_10x_group(
            &m,
            "matrix",
            strings(&f, "matrix/features/name", o, Most::genes(o))?,
            Some(strings(&f, "matrix/features/id", o, Most::genes(o))?),
            o,
        );
    }
    read_10x_v2(&file, o)
}

fn h5err(what: &str) -> impl Fn(hdf5::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Cell Ranger 2: one group per genome (`genes`, `gene_names`, `barcodes`, CSC data). Several
/// genomes (barnyard runs) share the barcodes; their genes are concatenated in group order.
fn read_10x_v2(file: &File, o: &Limits) -> H5Result<Parts> {
    let genomes = file
        .member_names()
        .map_err(|e| format!("listing groups: {e}"))?;
    let mut merged: Option<Parts> = None;
    for genome in genomes.iter().filter(|g| file.group(g).is_ok()) {
        let g = file.group(genome).map_err(h5err(genome))?;
        if !g.link_exists("indptr") {
            continue;
        }
        let names = strings(&g, &format!("{genome}/gene_names"), o, Most::genes(o))?;
        let ids = strings(&g, &format!("{genome}/genes"), o, Most::genes(o))?;
        let part = read_10x_group(&g, genome, names, Some(ids), o)?;
        merged = Some(match merged {
            None => part,
            Some(prev) => concat_genes(prev, part, genome)?,
        });
    }
    Ok(merged.ok_or_else(|| {
        "no 10x matrix found: expected matrix/ (Cell Ranger 3+), genome groups with indptr (Cell Ranger 2), or AnnData X/obs/var".to_string()
    })?)
}

/// A 10x group: `shape` = [genes, cells], CSC over cells (so CSR for cells × genes).
fn read_10x_group(
    g: &Group,
    at: &str,
    gene_names: Vec<String>,
    gene_ids: Option<Vec<String>>,
    o: &Limits,
) -> H5Result<Parts> {
    let barcodes = strings(g, &format!("{at}/barcodes"), o, Most::cells(o))?;
    let shape = numbers::<i64>(g, &format!("{at}/shape"), o, Most::ANY)?;
    if shape.len() != 2
        || shape[0] as usize != gene_names.len()
        || shape[1] as usize != barcodes.len()
    {
        return Err(format!(
            "{at}/shape is {shape:?}, but there are {} features and {} barcodes",
            gene_names.len(),
            barcodes.len()
        )
        .into());
    }
    let csr = sparse(g, at, o)?;
    Ok(Parts {
        gene_names,
        gene_ids,
        barcodes,
        csr,
    })
}

fn concat_genes(a: Parts, b: Parts, genome: &str) -> H5Result<Parts> {
    if a.barcodes != b.barcodes {
        return Err(format!("genome {genome} lists other barcodes than the first genome").into());
    }
    let offset = a.gene_names.len() as u32;
    let mut csr = CsrArrays {
        indptr: vec![0],
        ..Default::default()
    };
    for cell in 0..a.barcodes.len() {
        for (m, shift) in [(&a.csr, 0), (&b.csr, offset)] {
            let r = m.indptr[cell] as usize..m.indptr[cell + 1] as usize;
            csr.indices
                .extend(m.indices[r.clone()].iter().map(|&i| i + shift));
            csr.data.extend_from_slice(&m.data[r]);
        }
        csr.indptr.push(csr.indices.len() as u64);
    }
    let gene_ids = match (a.gene_ids, b.gene_ids) {
        (Some(mut x), Some(y)) => {
            x.extend(y);
            Some(x)
        }
        _ => None,
    };
    let mut gene_names = a.gene_names;
    gene_names.extend(b.gene_names);
    Ok(Parts {
        gene_names,
        gene_ids,
        barcodes: a.barcodes,
        csr,
    })
}

/// AnnData: counts from `layers/counts`, else `raw/X` (with `raw/var`), else `X`.
fn read_anndata(file: &File, o: &Limits) -> H5Result<Parts> {
    let (x_path, var_path) = if file.link_exists("layers/counts") {
        ("layers/counts", "var")
    } else if file.link_exists("raw/X") {
        ("raw/X", "raw/var")
    } else {
        ("X", "var")
    };
    let var = file.group(var_path).map_err(h5err(var_path))?;
    let obs = file.group("obs").map_err(h5err("obs"))?;
    let gene_names = dataframe_index(&var, var_path, o, Most::genes(o))?;
    let gene_ids = ["gene_ids", "gene_id", "feature_id"]
        .iter()
        .find(|c| var.link_exists(c))
        .map(|c| strings(&var, &format!("{var_path}/{c}"), o, Most::genes(o)))
        .transpose()?;
    let barcodes = dataframe_index(&obs, "obs", o, Most::cells(o))?;
    let (n_cells, n_genes) = (barcodes.len(), gene_names.len());
    let csr = if let Ok(ds) = file.dataset(x_path) {
        dense(&ds, x_path, n_cells, n_genes, o)?
    } else {
        let g = file.group(x_path).map_err(h5err(x_path))?;
        let encoding = string_attr(&g, "encoding-type").unwrap_or_default();
        let shape = g
            .attr("shape")
            .map_err(|e| H5Fail::from(h5err("shape attribute")(e)))
            .and_then(|a| {
                read_all::<i64>(&a, &format!("{x_path} shape attribute"), o, Most::ANY)
            })?;
        if shape != [n_cells as i64, n_genes as i64] {
            return Err(format!(
                "{x_path} has shape {shape:?}, but obs has {n_cells} cells and {var_path} {n_genes} genes"
            ).into());
        }
        match encoding.as_str() {
            "csr_matrix" => sparse(&g, x_path, o)?,
            "csc_matrix" => transpose(sparse(&g, x_path, o)?, n_cells)
                .map_err(|what| format!("{x_path}: {what}"))?,
            other => return Err(format!("{x_path}: unsupported encoding-type {other:?}").into()),
        }
    };
    Ok(Parts {
        gene_names,
        gene_ids,
        barcodes,
        csr,
    })
}

/// The index column of an AnnData dataframe (its `_index` attribute names it).
fn dataframe_index(g: &Group, at: &str, o: &Limits, most: Most) -> H5Result<Vec<String>> {
    let column = string_attr(g, "_index").unwrap_or_else(|| "_index".to_string());
    strings(g, &format!("{at}/{column}"), o, most)
}

fn string_attr(g: &Group, name: &str) -> Option<String> {
    let a = g.attr(name).ok()?;
    a.read_scalar::<VarLenUnicode>()
        .map(|s| s.as_str().to_owned())
        .or_else(|_| {
            a.read_scalar::<VarLenAscii>()
                .map(|s| s.as_str().to_owned())
        })
        .or_else(|_| {
            a.read_scalar::<FixedAscii<256>>()
                .map(|s| s.as_str().to_owned())
        })
        .ok()
}

/// A 1-D string dataset in any of HDF5's string encodings; `path` is relative to the file.
fn strings(g: &Group, path: &str, o: &Limits, most: Most) -> H5Result<Vec<String>> {
    let name = path.rsplit('/').next().unwrap_or(path);
    let ds = g.dataset(name).map_err(h5err(path))?;
    let desc = ds
        .dtype()
        .and_then(|t| t.to_descriptor())
        .map_err(h5err(path))?;
    match desc {
        TypeDescriptor::VarLenUnicode => read_strings::<VarLenUnicode>(&ds, path, o, most),
        TypeDescriptor::VarLenAscii => read_strings::<VarLenAscii>(&ds, path, o, most),
        TypeDescriptor::FixedAscii(n) if n <= 256 => {
            read_strings::<FixedAscii<256>>(&ds, path, o, most)
        }
        TypeDescriptor::FixedUnicode(n) if n <= 256 => {
            read_strings::<FixedUnicode<256>>(&ds, path, o, most)
        }
        other => {
            Err(format!("{path}: expected strings of at most 256 bytes, found {other:?}").into())
        }
    }
}

/// One of HDF5's string types, read whole and copied out.
fn read_strings<T: H5Type + std::ops::Deref<Target = str>>(
    ds: &Dataset,
    path: &str,
    o: &Limits,
    most: Most,
) -> H5Result<Vec<String>> {
    Ok(read_all::<T>(ds, path, o, most)?
        .iter()
        .map(|s| s.to_string())
        .collect())
}

/// A numeric dataset of `g`, converted to `T` by HDF5; `path` is relative to the file.
fn numbers<T: H5Type>(g: &Group, path: &str, o: &Limits, most: Most) -> H5Result<Vec<T>> {
    let name = path.rsplit('/').next().unwrap_or(path);
    let ds = g.dataset(name).map_err(h5err(path))?;
    read_all::<T>(&ds, path, o, most)
}

/// The most elements a dataset may hold, and the cap that says so.
#[derive(Debug, Clone, Copy)]
struct Most {
    n: u64,
    unit: &'static str,
    key: &'static str,
}

impl Most {
    /// No cap on the count (the byte cap still holds).
    const ANY: Most = Most {
        n: u64::MAX,
        unit: "elements",
        key: "",
    };

    fn cells(o: &Limits) -> Most {
        Most {
            n: o.max_cells,
            unit: "cells",
            key: "max_cells",
        }
    }

    fn genes(o: &Limits) -> Most {
        Most {
            n: o.max_genes,
            unit: "genes",
            key: "max_genes",
        }
    }

    fn stored(o: &Limits) -> Most {
        Most {
            n: o.max_stored_counts,
            unit: "stored counts",
            key: "max_stored_counts",
        }
    }

    /// An index pointer: one per cell or gene, and one.
    fn pointers(o: &Limits) -> Most {
        Most {
            n: o.max_cells.max(o.max_genes).saturating_add(1),
            unit: "index pointers",
            key: "max_cells and max_genes",
        }
    }
}

/// Reads a whole dataset or attribute, if it fits in the decompression cap's bytes and its
/// elements are within `most`: a corrupted dataspace can claim 10^12 elements, and
/// allocating for them would abort the process (found by fuzzing: `fuzz/fuzz_targets/h5.rs`,
/// docs/robustness.md).
fn read_all<T: H5Type>(c: &Container, path: &str, o: &Limits, most: Most) -> H5Result<Vec<T>> {
    let n = c.size() as u64;
    if n > most.n {
        return Err(H5Fail::TooLarge(format!(
            "{path} holds {n} {}, over the {} cap of {}",
            most.unit, most.key, most.n
        )));
    }
    let cap = o.max_decompressed;
    let bytes = n.saturating_mul(std::mem::size_of::<T>() as u64);
    if bytes > cap {
        return Err(H5Fail::TooLarge(format!(
            "{path}: {n} elements would take {bytes} bytes in memory, over the cap of {cap}"
        )));
    }
    Ok(c.read_raw::<T>().map_err(h5err(path))?)
}

/// `data`/`indices`/`indptr` of a compressed sparse group, checked and narrowed.
fn sparse(g: &Group, at: &str, o: &Limits) -> H5Result<CsrArrays> {
    let indptr = numbers::<i64>(g, &format!("{at}/indptr"), o, Most::pointers(o))?;
    let indices = numbers::<i64>(g, &format!("{at}/indices"), o, Most::stored(o))?;
    let data = numbers::<f64>(g, &format!("{at}/data"), o, Most::stored(o))?;
    let indptr = indptr
        .iter()
        .enumerate()
        .map(|(i, &p)| u64::try_from(p).map_err(|_| format!("{at}/indptr[{i}] is negative ({p})")))
        .collect::<Result<Vec<u64>, String>>()?;
    let indices = indices
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            u32::try_from(p)
                .map_err(|_| format!("{at}/indices[{i}] = {p} is not a valid gene index"))
        })
        .collect::<Result<Vec<u32>, String>>()?;
    let data = data
        .iter()
        .enumerate()
        .map(|(i, &v)| count(v).map_err(|what| format!("{at}/data[{i}]: {what}")))
        .collect::<Result<Vec<u32>, String>>()?;
    let mut csr = CsrArrays {
        indptr,
        indices,
        data,
    };
    csr.sort_rows().map_err(|what| format!("{at}: {what}"))?;
    Ok(csr)
}

fn count(v: f64) -> Result<u32, String> {
    if !v.is_finite() {
        return Err(format!("count {v} is not finite"));
    }
    if v < 0.0 {
        return Err(format!("count {v} is negative"));
    }
    if v.fract() != 0.0 {
        return Err(format!("count {v} is not an integer (raw UMI counts expected; is this X normalised? try layers/counts or raw/X)"));
    }
    if v > u32::MAX as f64 {
        return Err(format!("count {v} exceeds the u32 range"));
    }
    Ok(v as u32)
}

fn dense(
    ds: &Dataset,
    at: &str,
    n_cells: usize,
    n_genes: usize,
    o: &Limits,
) -> H5Result<CsrArrays> {
    if ds.shape() != [n_cells, n_genes] {
        return Err(format!(
            "{at} has shape {:?}, expected [{n_cells}, {n_genes}]",
            ds.shape()
        )
        .into());
    }
    let values = read_all::<f64>(ds, at, o, Most::ANY)?;
    let mut csr = CsrArrays {
        indptr: vec![0],
        ..Default::default()
    };
    for (cell, row) in values.chunks(n_genes.max(1)).enumerate() {
        for (gene, &v) in row.iter().enumerate() {
            let c = count(v).map_err(|what| format!("{at}[{cell}, {gene}]: {what}"))?;
            if c > 0 {
                csr.indices.push(gene as u32);
                csr.data.push(c);
            }
        }
        csr.indptr.push(csr.indices.len() as u64);
    }
    Ok(csr)
}

/// CSC (genes as the compressed axis, `sparse` checked its indptr) → CSR over `n_cells`.
fn transpose(csc: CsrArrays, n_cells: usize) -> Result<CsrArrays, String> {
    let mut indptr = vec![0u64; n_cells + 1];
    for (k, &c) in csc.indices.iter().enumerate() {
        if c as usize >= n_cells {
            return Err(format!(
                "cell index {c} at entry {k} out of range ({n_cells} cells)"
            ));
        }
        indptr[c as usize + 1] += 1;
    }
    for i in 0..n_cells {
        indptr[i + 1] += indptr[i];
    }
    let mut next = indptr[..n_cells].to_vec();
    let mut indices = vec![0u32; indptr[n_cells] as usize];
    let mut data = vec![0u32; indices.len()];
    for gene in 0..csc.indptr.len().saturating_sub(1) {
        for k in csc.indptr[gene] as usize..csc.indptr[gene + 1] as usize {
            let c = csc.indices[k] as usize;
            let at = next[c] as usize;
            indices[at] = gene as u32;
            data[at] = csc.data[k];
            next[c] += 1;
        }
    }
    Ok(CsrArrays {
        indptr,
        indices,
        data,
    })
}

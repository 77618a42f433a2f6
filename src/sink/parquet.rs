//! The per-cell records as a Parquet table (DESIGN.md §5): one row per cell, the record's
//! fields as columns, the QC figures flattened and the embedding a fixed-size list of
//! float32, so that `pandas.read_parquet` and `polars.read_parquet` load it in one line.
//! `embed --out FILE.parquet` writes one row group per input batch; the daemon with
//! `[output] format = "parquet"` one file per batch.

use std::io::Write;
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, FixedSizeListBuilder, Float32Builder, StringBuilder, UInt32Builder,
    UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::embed::CellResult;

/// The columns, in order: what a reader of the files may rely on.
pub const COLUMNS: [&str; 12] = [
    "batch",
    "cell",
    "index",
    "label",
    "confidence",
    "assigned",
    "novelty",
    "total_counts",
    "n_genes",
    "pct_mito",
    "vocab_matched",
    "embedding",
];

/// The table's schema for embeddings `dim` wide. `novelty` is null without a reference,
/// `embedding` null for a cell with no gene in the vocabulary (as `"embedding": null`).
pub fn schema(dim: usize) -> SchemaRef {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    Arc::new(Schema::new(vec![
        Field::new("batch", DataType::Utf8, false),
        Field::new("cell", DataType::Utf8, false),
        Field::new("index", DataType::UInt32, false),
        Field::new("label", DataType::Utf8, false),
        Field::new("confidence", DataType::Float32, false),
        Field::new("assigned", DataType::Boolean, false),
        Field::new("novelty", DataType::Float32, true),
        Field::new("total_counts", DataType::UInt64, false),
        Field::new("n_genes", DataType::UInt32, false),
        Field::new("pct_mito", DataType::Float32, false),
        Field::new("vocab_matched", DataType::Float32, false),
        Field::new("embedding", DataType::FixedSizeList(item, dim as i32), true),
    ]))
}

/// Writes batches of records as row groups of one Parquet file.
pub struct ParquetWriter<W: Write + Send> {
    writer: ArrowWriter<W>,
    schema: SchemaRef,
    dim: usize,
}

fn io_error(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::other(e)
}

impl<W: Write + Send> ParquetWriter<W> {
    /// A file on `w` for embeddings `dim` wide (the model's `embedding_dim`).
    pub fn new(w: W, dim: usize) -> std::io::Result<ParquetWriter<W>> {
        let schema = schema(dim);
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by(format!("cellstream {}", env!("CARGO_PKG_VERSION")))
            .build();
        let writer = ArrowWriter::try_new(w, schema.clone(), Some(props)).map_err(io_error)?;
        Ok(ParquetWriter {
            writer,
            schema,
            dim,
        })
    }

    /// One batch's records (cells in input order) as a row group.
    pub fn write_batch(
        &mut self,
        batch_id: &str,
        barcodes: &[String],
        results: &[CellResult],
    ) -> std::io::Result<()> {
        let n = results.len().min(barcodes.len());
        let dim = self.dim;
        let mut batch = StringBuilder::with_capacity(n, n * batch_id.len());
        let mut cell = StringBuilder::with_capacity(n, n * 20);
        let mut index = UInt32Builder::with_capacity(n);
        let mut label = StringBuilder::with_capacity(n, n * 12);
        let mut confidence = Float32Builder::with_capacity(n);
        let mut assigned = BooleanBuilder::with_capacity(n);
        let mut novelty = Float32Builder::with_capacity(n);
        let mut total_counts = UInt64Builder::with_capacity(n);
        let mut n_genes = UInt32Builder::with_capacity(n);
        let mut pct_mito = Float32Builder::with_capacity(n);
        let mut vocab_matched = Float32Builder::with_capacity(n);
        let mut embedding = FixedSizeListBuilder::with_capacity(
            Float32Builder::with_capacity(n * dim),
            dim as i32,
            n,
        )
        .with_field(Arc::new(Field::new("item", DataType::Float32, false)));
        for (i, (barcode, r)) in barcodes.iter().zip(results).enumerate() {
            batch.append_value(batch_id);
            cell.append_value(barcode);
            index.append_value(i as u32);
            label.append_value(&r.label);
            confidence.append_value(r.confidence);
            assigned.append_value(r.assigned);
            novelty.append_option(r.novelty);
            total_counts.append_value(r.qc.total_counts);
            n_genes.append_value(r.qc.n_genes);
            pct_mito.append_value(r.qc.pct_mito);
            vocab_matched.append_value(r.qc.vocab_matched);
            match &r.embedding {
                Some(e) if e.len() == dim => {
                    embedding.values().append_slice(e);
                    embedding.append(true);
                }
                Some(e) => {
                    return Err(std::io::Error::other(format!(
                        "{batch_id}: cell {barcode}: embedding of {} values, the table's is {dim}",
                        e.len()
                    )))
                }
                None => {
                    // A null list still holds `dim` slots.
                    embedding.values().append_slice(&vec![0.0; dim]);
                    embedding.append(false);
                }
            }
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(batch.finish()),
            Arc::new(cell.finish()),
            Arc::new(index.finish()),
            Arc::new(label.finish()),
            Arc::new(confidence.finish()),
            Arc::new(assigned.finish()),
            Arc::new(novelty.finish()),
            Arc::new(total_counts.finish()),
            Arc::new(n_genes.finish()),
            Arc::new(pct_mito.finish()),
            Arc::new(vocab_matched.finish()),
            Arc::new(embedding.finish()),
        ];
        let record_batch = RecordBatch::try_new(self.schema.clone(), columns).map_err(io_error)?;
        self.writer.write(&record_batch).map_err(io_error)?;
        // One row group per batch.
        self.writer.flush().map_err(io_error)
    }

    /// Writes the footer and hands back the underlying writer.
    pub fn finish(self) -> std::io::Result<W> {
        self.writer.into_inner().map_err(io_error)
    }
}

/// One batch's records as the bytes of a complete Parquet file.
pub fn batch_file(
    batch_id: &str,
    barcodes: &[String],
    results: &[CellResult],
    dim: usize,
) -> std::io::Result<Vec<u8>> {
    let mut w = ParquetWriter::new(Vec::with_capacity(results.len() * (dim * 4 + 64)), dim)?;
    w.write_batch(batch_id, barcodes, results)?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qc::CellQc;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, UInt32Type};
    use arrow_array::Array;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn cell(label: &str, embedding: Option<Vec<f32>>, novelty: Option<f32>) -> CellResult {
        CellResult {
            label: label.into(),
            confidence: 0.75,
            assigned: label != "unassigned",
            embedding,
            qc: CellQc {
                total_counts: 1234,
                n_genes: 456,
                pct_mito: 2.5,
                vocab_matched: 0.9,
            },
            n_tokens: 10,
            novelty,
        }
    }

    #[test]
    fn a_batch_reads_back_column_for_column() {
        let results = [
            cell("B", Some(vec![0.6, -0.8, 0.0]), Some(0.5)),
            cell("unassigned", None, None),
        ];
        let bytes = batch_file("run1", &["AAA-1".into(), "CCC-1".into()], &results, 3).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        let names: Vec<&str> = b
            .schema_ref()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(names, COLUMNS);
        assert_eq!(b.num_rows(), 2);
        let col = |name: &str| b.column_by_name(name).unwrap();
        assert_eq!(col("cell").as_string::<i32>().value(1), "CCC-1");
        assert_eq!(col("index").as_primitive::<UInt32Type>().value(1), 1);
        assert_eq!(col("label").as_string::<i32>().value(0), "B");
        let novelty = col("novelty").as_primitive::<Float32Type>();
        assert_eq!(novelty.value(0), 0.5);
        assert!(novelty.is_null(1));
        let emb = col("embedding").as_fixed_size_list();
        assert_eq!(emb.value_length(), 3);
        assert!(emb.is_valid(0) && emb.is_null(1));
        let first = emb.value(0);
        assert_eq!(
            first.as_primitive::<Float32Type>().values(),
            &[0.6, -0.8, 0.0]
        );
    }
}

//! The output record (DESIGN.md §5): one JSON object per cell, one per line, input order.

use std::io::Write;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Serialize;

use crate::config::EmbeddingEncoding;
use crate::embed::CellResult;
use crate::qc::CellQc;

#[derive(Serialize)]
struct Record<'a> {
    batch: &'a str,
    cell: &'a str,
    index: usize,
    label: &'a str,
    confidence: f32,
    assigned: bool,
    /// Only with a reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    novelty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    embedding: Option<Option<&'a [f32]>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    embedding_b64: Option<&'a str>,
    qc: &'a CellQc,
}

/// Writes one line per cell of a batch, the embedding encoded as `encoding` says.
pub fn write_batch(
    w: &mut impl Write,
    batch_id: &str,
    barcodes: &[String],
    results: &[CellResult],
    encoding: EmbeddingEncoding,
) -> std::io::Result<()> {
    // Reused across cells: one allocation per batch, not per record.
    let (mut bytes, mut b64) = (Vec::new(), String::new());
    for (index, (cell, r)) in barcodes.iter().zip(results).enumerate() {
        let embedding = r.embedding.as_deref();
        let (embedding, embedding_b64) = match (encoding, embedding) {
            (EmbeddingEncoding::Base64, Some(values)) => {
                base64_f32_le(values, &mut bytes, &mut b64);
                (None, Some(b64.as_str()))
            }
            // A cell without an embedding (no gene in the vocabulary) is `"embedding": null`
            // in either encoding.
            _ => (Some(embedding), None),
        };
        let record = Record {
            batch: batch_id,
            cell,
            index,
            label: &r.label,
            confidence: r.confidence,
            assigned: r.assigned,
            novelty: r.novelty,
            embedding,
            embedding_b64,
            qc: &r.qc,
        };
        serde_json::to_writer(&mut *w, &record)?;
        w.write_all(b"\n")?;
    }
    Ok(())
}

/// Sets `out` to the values' little-endian bytes as standard base64 (RFC 4648 §4, with
/// padding), what Python's `base64.b64decode` and numpy's `frombuffer(…, "<f4")` read back.
/// `bytes` is scratch space.
fn base64_f32_le(values: &[f32], bytes: &mut Vec<u8>, out: &mut String) {
    bytes.clear();
    bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    out.clear();
    STANDARD.encode_string(bytes, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(bytes: &[u8]) -> String {
        let mut s = String::new();
        STANDARD.encode_string(bytes, &mut s);
        s
    }

    #[test]
    fn base64_matches_the_rfc_4648_test_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(encode(plain.as_bytes()), coded, "{plain:?}");
        }
        // Every sextet value, both ends of the alphabet included.
        assert_eq!(encode(&[0x00, 0x10, 0x83, 0xff, 0xef, 0xbf]), "ABCD/++/");
    }

    fn cell(embedding: Option<Vec<f32>>) -> CellResult {
        CellResult {
            label: "B".into(),
            confidence: 0.5,
            assigned: true,
            embedding,
            qc: CellQc {
                total_counts: 10,
                n_genes: 3,
                pct_mito: 0.0,
                vocab_matched: 1.0,
            },
            n_tokens: 4,
            novelty: None,
        }
    }

    fn lines(encoding: EmbeddingEncoding) -> Vec<serde_json::Value> {
        let cells = [cell(Some(vec![0.6, -0.8])), cell(None)];
        let mut out = Vec::new();
        write_batch(&mut out, "b", &["x".into(), "y".into()], &cells, encoding).unwrap();
        let text = String::from_utf8(out).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn each_encoding_writes_one_embedding_field() {
        let array = lines(EmbeddingEncoding::Array);
        assert_eq!(array[0]["embedding"], serde_json::json!([0.6, -0.8]));
        assert!(array[0].get("embedding_b64").is_none());
        let b64 = lines(EmbeddingEncoding::Base64);
        let mut expected = String::new();
        base64_f32_le(&[0.6, -0.8], &mut Vec::new(), &mut expected);
        assert_eq!(b64[0]["embedding_b64"], expected.as_str());
        assert!(b64[0].get("embedding").is_none());
        for l in [&array[1], &b64[1]] {
            assert!(l["embedding"].is_null() && l.get("embedding_b64").is_none());
        }
        // Nothing else differs.
        for (a, b) in array.iter().zip(&b64) {
            let strip = |v: &serde_json::Value| {
                let mut v = v.clone();
                let o = v.as_object_mut().unwrap();
                o.remove("embedding");
                o.remove("embedding_b64");
                v
            };
            assert_eq!(strip(a), strip(b));
        }
    }

    #[test]
    fn floats_are_written_little_endian() {
        // 1.0f32 = 0x3f800000 → bytes 00 00 80 3f; -2.0 = 0xc0000000 → 00 00 00 c0.
        let mut s = String::new();
        base64_f32_le(&[1.0, -2.0], &mut Vec::new(), &mut s);
        assert_eq!(s, encode(&[0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0]));
        assert_eq!(s, "AACAPwAAAMA=");
    }
}

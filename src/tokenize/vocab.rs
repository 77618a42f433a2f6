//! The model vocabulary: gene symbol → token id, with scGPT's special tokens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const PAD: &str = "<pad>";
pub const CLS: &str = "<cls>";
pub const EOC: &str = "<eoc>";

/// Token id meaning "this gene is not in the vocabulary".
pub const NOT_IN_VOCAB: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum VocabError {
    #[error("{}: cannot read vocabulary: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: not a vocabulary (expected a JSON object of token → integer id): {err}", path.display())]
    Json {
        path: PathBuf,
        err: serde_json::Error,
    },
    #[error("{}: token {token:?} has id {id}, which is already taken by {other:?}", path.display())]
    DuplicateId {
        path: PathBuf,
        token: String,
        id: u32,
        other: String,
    },
}

/// Gene symbol → token id, plus the ids of `<pad>` and `<cls>`.
#[derive(Debug, Clone)]
pub struct Vocab {
    ids: HashMap<String, u32>,
    pub pad_id: u32,
    pub cls_id: u32,
}

impl Vocab {
    /// Reads scGPT's `vocab.json` and appends the missing specials `<pad>`, `<cls>`, `<eoc>`
    /// in that order, each with the next id (`len(vocab)`), as `embed_data` does.
    pub fn from_json_file(path: &Path) -> Result<Vocab, VocabError> {
        let text = std::fs::read(path).map_err(|err| VocabError::Io {
            path: path.to_path_buf(),
            err,
        })?;
        let ids: HashMap<String, u32> =
            serde_json::from_slice(&text).map_err(|err| VocabError::Json {
                path: path.to_path_buf(),
                err,
            })?;
        Vocab::from_map(path, ids)
    }

    pub fn from_map(path: &Path, mut ids: HashMap<String, u32>) -> Result<Vocab, VocabError> {
        let mut by_id: HashMap<u32, String> = HashMap::with_capacity(ids.len());
        for (token, &id) in &ids {
            if let Some(other) = by_id.insert(id, token.clone()) {
                return Err(VocabError::DuplicateId {
                    path: path.to_path_buf(),
                    token: token.clone(),
                    id,
                    other,
                });
            }
        }
        for special in [PAD, CLS, EOC] {
            if !ids.contains_key(special) {
                let id = ids.len() as u32;
                if let Some(other) = by_id.get(&id) {
                    return Err(VocabError::DuplicateId {
                        path: path.to_path_buf(),
                        token: special.to_string(),
                        id,
                        other: other.clone(),
                    });
                }
                by_id.insert(id, special.to_string());
                ids.insert(special.to_string(), id);
            }
        }
        Ok(Vocab {
            pad_id: ids[PAD],
            cls_id: ids[CLS],
            ids,
        })
    }

    /// Number of tokens, specials included.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn get(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// Maps a batch's gene symbols to token ids once per batch.
    pub fn map_genes(&self, gene_names: &[String]) -> GeneMap {
        let token_of_gene: Vec<u32> = gene_names
            .iter()
            .map(|g| self.get(g).unwrap_or(NOT_IN_VOCAB))
            .collect();
        let n_matched = token_of_gene.iter().filter(|&&t| t != NOT_IN_VOCAB).count();
        GeneMap {
            token_of_gene,
            n_matched,
        }
    }
}

/// Column → token id for one batch's genes ([`NOT_IN_VOCAB`] for genes the model does not know).
#[derive(Debug, Clone)]
pub struct GeneMap {
    pub token_of_gene: Vec<u32>,
    /// How many of the batch's genes are in the vocabulary.
    pub n_matched: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specials_are_appended_in_embed_data_order() {
        let ids = HashMap::from([("A".to_string(), 0), ("B".to_string(), 1)]);
        let v = Vocab::from_map(Path::new("v"), ids).unwrap();
        assert_eq!((v.pad_id, v.cls_id, v.get(EOC)), (2, 3, Some(4)));
        let m = v.map_genes(&["B".into(), "Z".into()]);
        assert_eq!(m.token_of_gene, vec![1, NOT_IN_VOCAB]);
        assert_eq!(m.n_matched, 1);
    }

    #[test]
    fn present_specials_are_kept() {
        let ids = HashMap::from([("<cls>".to_string(), 0), ("<pad>".to_string(), 1)]);
        let v = Vocab::from_map(Path::new("v"), ids).unwrap();
        assert_eq!((v.pad_id, v.cls_id, v.get(EOC)), (1, 0, Some(2)));
    }

    #[test]
    fn duplicate_ids_are_rejected() {
        let ids = HashMap::from([("A".to_string(), 0), ("B".to_string(), 0)]);
        assert!(Vocab::from_map(Path::new("v"), ids).is_err());
    }
}

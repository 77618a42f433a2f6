//! The model package (DESIGN.md §4): `model.onnx`, `vocab.json`, `manifest.toml`, `labels.txt`,
//! validated before anything runs.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::fuse::Precision;
use crate::tokenize::{TieMode, Vocab, VocabError};

/// What the runtime needs to know about a model, as `manifest.toml` states it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    /// Only "scgpt" is understood.
    pub architecture: String,
    #[serde(default)]
    pub version: Option<String>,
    pub embedding_dim: usize,
    pub n_bins: u16,
    /// Longest token sequence the model takes, `<cls>` included.
    pub max_len: usize,
    pub pad_token: String,
    pub cls_token: String,
    pub pad_value: f32,
    /// L2-normalise the `<cls>` embedding, as scGPT's `embed_data` does.
    pub normalize_embedding: bool,
    /// Softmax confidence under which a cell is reported `assigned: false`.
    #[serde(default)]
    pub confidence_threshold: Option<f32>,
    /// The logits are divided by this before the softmax (a temperature fitted on validation
    /// cells, so that `confidence` is the probability that the label is right). Default 1.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// How the model's training tokenized ties (`seeded`, scGPT's random draw, the default;
    /// `expected`, the draw's mean and the largest counts: no randomness). See
    /// [`crate::tokenize::TieMode`].
    #[serde(default)]
    pub ties: Option<String>,
    /// The arithmetic of the products by constant weights: `f32` (the default) or `int8`
    /// (opt-in: faster on AVX2, within the agreement BENCHMARKS.md reports; `fuse/linear.rs`).
    #[serde(default)]
    pub precision: Option<String>,
    pub onnx_sha256: String,
    pub inputs: InputNames,
    pub outputs: OutputNames,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputNames {
    /// i64 [N, S]
    pub gene_ids: String,
    /// f32 [N, S]
    pub values: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputNames {
    /// f32 [N, D]
    pub embedding: String,
    /// f32 [N, C], when the model has a classifier head.
    #[serde(default)]
    pub logits: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: cannot read: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: invalid manifest: {what}", path.display())]
    Manifest { path: PathBuf, what: String },
    #[error(transparent)]
    Vocab(#[from] VocabError),
    #[error("{}: sha256 is {actual}, the manifest's onnx_sha256 says {expected} (a wrong or damaged model file)", path.display())]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{}: {what}", path.display())]
    Graph { path: PathBuf, what: String },
}

/// A validated model package.
pub struct ModelPackage {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub vocab: Vocab,
    /// Class names in logits order (`labels.txt`), when the model classifies.
    pub labels: Option<Vec<String>>,
    pub onnx: OnnxFile,
}

/// `model.onnx`, open: the file whose sha256 was checked, not a copy of its bytes. The
/// runtime parses this same file (not whatever the path names by then), and holding no copy
/// keeps a large model's load to two copies of its weights at once (the parser's protobuf and
/// the graph's tensors) instead of three (BENCHMARKS.md, "The load peak").
pub struct OnnxFile {
    pub path: PathBuf,
    pub file: std::fs::File,
    pub len: usize,
}

impl OnnxFile {
    /// Opens `path` and checks its sha256 against `expected`, streaming it through the hash.
    fn open(path: PathBuf, expected: &str) -> Result<OnnxFile, ModelError> {
        let io = |err| ModelError::Io {
            path: path.clone(),
            err,
        };
        let mut file = std::fs::File::open(&path).map_err(io)?;
        let mut hash = Sha256::new();
        let len = std::io::copy(&mut file, &mut hash).map_err(io)? as usize;
        let actual = hex(&hash.finalize());
        if !actual.eq_ignore_ascii_case(expected.trim()) {
            return Err(ModelError::Checksum {
                path,
                expected: expected.to_owned(),
                actual,
            });
        }
        Ok(OnnxFile { path, file, len })
    }

    /// The file mapped into memory (its pages are the page cache's; they leave this
    /// process's resident set when the map is dropped).
    pub fn map(&self) -> std::io::Result<memmap2::Mmap> {
        // SAFETY: the package's files are not written while it is loaded (a new model is
        // deployed by renaming a new file in, which leaves this one as it was).
        unsafe { memmap2::Mmap::map(&self.file) }
    }

    /// A path that names this open file itself on Linux (`/proc/self/fd/N`), so that a model
    /// renamed in since it was checked is not what gets parsed; elsewhere its path.
    pub fn parse_path(&self) -> PathBuf {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let own = PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()));
            if own.exists() {
                return own;
            }
        }
        self.path.clone()
    }
}

impl ModelPackage {
    /// Reads and checks every file of the package in `dir`.
    pub fn load(dir: &Path) -> Result<ModelPackage, ModelError> {
        let manifest_path = dir.join("manifest.toml");
        let text = read_to_string(&manifest_path)?;
        let manifest: Manifest = toml::from_str(&text).map_err(|e| ModelError::Manifest {
            path: manifest_path.clone(),
            what: e.to_string(),
        })?;
        let bad = |what: String| ModelError::Manifest {
            path: manifest_path.clone(),
            what,
        };
        if manifest.architecture != "scgpt" {
            return Err(bad(format!(
                "architecture {:?} is not supported (expected \"scgpt\")",
                manifest.architecture
            )));
        }
        if let Some(t) = manifest
            .ties
            .as_deref()
            .filter(|t| TieMode::from_name(t).is_none())
        {
            return Err(bad(format!(
                "ties {t:?} is not a tie mode (seeded, numpy, expected)"
            )));
        }
        if let Some(p) = manifest
            .precision
            .as_deref()
            .filter(|p| Precision::parse(p).is_none())
        {
            return Err(bad(format!(
                "precision {p:?} is not one of \"f32\", \"int8\""
            )));
        }
        if manifest
            .temperature
            .is_some_and(|t| !(t.is_finite() && t > 0.0))
        {
            return Err(bad(format!(
                "temperature {} must be a positive number",
                manifest.temperature.unwrap_or_default()
            )));
        }
        if manifest.max_len < 2 || manifest.n_bins < 3 || manifest.embedding_dim == 0 {
            return Err(bad(format!(
                "max_len {} (≥ 2), n_bins {} (≥ 3), embedding_dim {} (≥ 1) out of range",
                manifest.max_len, manifest.n_bins, manifest.embedding_dim
            )));
        }

        let vocab_path = dir.join("vocab.json");
        let vocab = Vocab::from_json_file(&vocab_path)?;
        for (what, token, id) in [
            ("pad_token", &manifest.pad_token, vocab.pad_id),
            ("cls_token", &manifest.cls_token, vocab.cls_id),
        ] {
            if vocab.get(token) != Some(id) {
                return Err(bad(format!(
                    "{what} {token:?} is not the vocabulary's {} token",
                    if what == "pad_token" {
                        "<pad>"
                    } else {
                        "<cls>"
                    }
                )));
            }
        }

        let onnx = OnnxFile::open(dir.join("model.onnx"), &manifest.onnx_sha256)?;

        let labels = match &manifest.outputs.logits {
            None => None,
            Some(_) => {
                let path = dir.join("labels.txt");
                let labels: Vec<String> = read_to_string(&path)?
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect();
                if labels.is_empty() {
                    return Err(ModelError::Manifest {
                        path,
                        what: "labels.txt lists no class".into(),
                    });
                }
                Some(labels)
            }
        };
        Ok(ModelPackage {
            dir: dir.to_path_buf(),
            manifest,
            vocab,
            labels,
            onnx,
        })
    }

    /// Confidence threshold: the manifest's, else 0.
    pub fn confidence_threshold(&self) -> f32 {
        self.manifest.confidence_threshold.unwrap_or(0.0)
    }

    /// Which model this is, as a reference records it.
    pub fn model_id(&self) -> crate::reference::ModelId {
        crate::reference::ModelId {
            name: self.manifest.name.clone(),
            onnx_sha256: self.manifest.onnx_sha256.clone(),
        }
    }

    /// The logits' temperature: the manifest's, else 1.
    pub fn temperature(&self) -> f32 {
        self.manifest.temperature.unwrap_or(1.0)
    }

    /// The products' arithmetic the manifest asks for (validated when the package loads).
    pub fn precision(&self) -> Precision {
        self.manifest
            .precision
            .as_deref()
            .and_then(Precision::parse)
            .unwrap_or(Precision::F32)
    }

    /// The tie mode the model was trained with, if the manifest names one (validated when the
    /// package loads).
    pub fn ties(&self) -> Option<TieMode> {
        self.manifest.ties.as_deref().and_then(TieMode::from_name)
    }
}

/// The shipped package: `models/pbmc-compact` under the working directory, else beside the
/// sources this binary was built from.
pub fn default_model_dir() -> PathBuf {
    let local = PathBuf::from("models/pbmc-compact");
    if local.is_dir() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/pbmc-compact")
}

fn read_to_string(path: &Path) -> Result<String, ModelError> {
    std::fs::read_to_string(path).map_err(|err| ModelError::Io {
        path: path.to_path_buf(),
        err,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

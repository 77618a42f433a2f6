//! The daemon's configuration (`cellstream serve --config FILE`): TOML, unknown keys
//! rejected, every key documented in `systemd/cellstream.toml`.
//!
//! `[spool] dir`, `[output] dir` and `[http] listen` are used by checks outside the repo:
//! keep their spelling, and that of the `[nats]` keys. With a `[nats]` section, `[spool]` and
//! `[output] dir` become optional (an empty `dir` is no spool folder, or no output files).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub output: OutputConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// NATS JetStream: batches from a work queue shared by daemons, results on a stream.
    #[serde(default)]
    pub nats: Option<NatsConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// `incoming/ processing/ done/ failed/` are made under it. Required unless `[nats]` is
    /// set; empty: no spool folder (and no HTTP uploads).
    #[serde(default)]
    pub dir: PathBuf,
    /// Seconds between full rescans of `incoming/` (inotify wakes the daemon sooner).
    #[serde(default = "default_rescan_seconds")]
    pub rescan_seconds: f64,
    /// What happens to an input once its output is committed.
    #[serde(default)]
    pub on_done: OnDone,
    /// Entries waiting in `incoming/` beyond which uploads are refused with 429.
    #[serde(default = "default_max_queued")]
    pub max_queued: usize,
    /// Largest size a compressed input (gzip, zstd) may expand to, in bytes (all the members
    /// of a batch together; text members count as read).
    #[serde(default = "default_max_decompressed")]
    pub max_decompressed_bytes: u64,
    /// Most cells a batch may hold; a batch claiming more is quarantined as `too_large`.
    #[serde(default = "default_max_cells")]
    pub max_cells: u64,
    /// Most genes (features) a batch may hold.
    #[serde(default = "default_max_genes")]
    pub max_genes: u64,
    /// Most stored counts (non-zero entries) a batch may hold.
    #[serde(default = "default_max_stored_counts")]
    pub max_stored_counts: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDone {
    /// Move the input to `done/`.
    #[default]
    Keep,
    /// Delete the input.
    Delete,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// One `<batch-id>.ndjson` (and `<batch-id>.summary.json`) per batch. Required unless
    /// `[nats]` is set; empty: no output files.
    #[serde(default)]
    pub dir: PathBuf,
    /// How a record carries its cell embedding.
    #[serde(default)]
    pub embedding: EmbeddingEncoding,
    /// The per-batch file's format: `<batch-id>.ndjson` or `<batch-id>.parquet`.
    #[serde(default)]
    pub format: OutputFormat,
}

/// What the daemon writes per batch (DESIGN.md §5); the summary and the stream are JSON
/// either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// `<batch-id>.ndjson`: one JSON record per cell.
    #[default]
    Ndjson,
    /// `<batch-id>.parquet`: one row per cell, the embedding a fixed-size list of float32.
    Parquet,
}

impl OutputFormat {
    /// The output file's extension.
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Ndjson => "ndjson",
            OutputFormat::Parquet => "parquet",
        }
    }
}

/// How a cell record carries its embedding (DESIGN.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingEncoding {
    /// `"embedding": [0.012, -0.104, …]`, each value the shortest decimal that reads back as
    /// the same f32.
    #[default]
    Array,
    /// `"embedding_b64": "…"`: the f32 values' little-endian bytes in standard base64 with
    /// padding; about a third of the array's size, and no decimal formatting.
    Base64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Largest accepted `POST /v1/batches` body, in bytes (413 beyond).
    #[serde(default = "default_max_upload")]
    pub max_upload_bytes: u64,
    /// Uploads written at the same time; more are refused with 429.
    #[serde(default = "default_max_uploads")]
    pub max_concurrent_uploads: usize,
    /// Batches a slow `/v1/stream` client may fall behind before it is told it missed some.
    #[serde(default = "default_stream_buffer")]
    pub stream_buffer_batches: usize,
    /// A file holding a bearer token: when set, every endpoint but `/healthz` requires
    /// `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The token read from `token_file` (by [`Config::load`], again on each reload).
    #[serde(skip)]
    pub(crate) token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model package directory; the shipped `models/pbmc-compact` when absent.
    pub dir: Option<PathBuf>,
    /// A reference folder (`cellstream reference`) to label cells by kNN over, instead of
    /// the model's classifier head.
    pub reference: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Inference worker threads (tokenizing and writing share one more).
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Run seed: tie draws and subsampling are keyed by it and the barcode.
    #[serde(default)]
    pub seed: u64,
    /// Tokens per chunk (rows × padded length).
    #[serde(default = "default_token_budget")]
    pub token_budget: usize,
    /// On SIGTERM, how long in-flight batches may take to finish before the daemon exits
    /// anyway (their inputs stay in `processing/` and are redone at the next start).
    #[serde(default = "default_drain_seconds")]
    pub drain_seconds: f64,
    /// Bytes of memory the daemon may use: a batch is admitted only when what its headers
    /// claim fits beside what the daemon holds; one that cannot fit is quarantined as
    /// `too_large`. Absent: 90% of the cgroup's `memory.max` (systemd's `MemoryMax=`), else
    /// of the machine's memory.
    #[serde(default)]
    pub memory_budget: Option<u64>,
}

/// `[nats]`: the daemon also takes batches from a JetStream work queue (one durable pull
/// consumer shared by every daemon with the same settings) and publishes every batch's
/// records on `cellstream.results.<batch>` (DESIGN.md §6, "NATS JetStream").
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL, or several separated by commas (`nats://host:4222`, `tls://host:4222`).
    pub url: String,
    /// The work stream (subjects `cellstream.batches.>`); the results stream is
    /// `<stream>_RESULTS` and the payload bucket `<stream>_PAYLOADS`.
    #[serde(default = "default_nats_stream")]
    pub stream: String,
    /// The durable pull consumer every daemon of a deployment shares.
    #[serde(default = "default_nats_consumer")]
    pub consumer: String,
    /// A NATS credentials file (`.creds`: user JWT and nkey seed).
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// PEM CA certificates that verify the server (TLS is then required).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for servers that verify clients.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// Seconds a claimed batch may go without an acknowledgement (in-progress acks are sent
    /// every third of it) before the server hands it to another daemon.
    #[serde(default = "default_ack_wait")]
    pub ack_wait_seconds: f64,
    /// Deliveries of one batch before it is quarantined: a batch whose daemon died or could
    /// not commit its results this many times is set aside with the reason.
    #[serde(default = "default_max_deliver")]
    pub max_deliver: u32,
}

fn default_nats_stream() -> String {
    "CELLSTREAM".into()
}
fn default_nats_consumer() -> String {
    "cellstream".into()
}
fn default_ack_wait() -> f64 {
    30.0
}
fn default_max_deliver() -> u32 {
    5
}

fn default_rescan_seconds() -> f64 {
    2.0
}
fn default_max_queued() -> usize {
    256
}
fn default_max_decompressed() -> u64 {
    crate::batch::DEFAULT_MAX_DECOMPRESSED
}
fn default_max_cells() -> u64 {
    crate::batch::DEFAULT_MAX_CELLS
}
fn default_max_genes() -> u64 {
    crate::batch::DEFAULT_MAX_GENES
}
fn default_max_stored_counts() -> u64 {
    crate::batch::DEFAULT_MAX_STORED_COUNTS
}
fn default_listen() -> SocketAddr {
    "127.0.0.1:9464".parse().expect("valid address")
}
fn default_max_upload() -> u64 {
    1 << 30
}
fn default_max_uploads() -> usize {
    4
}
fn default_stream_buffer() -> usize {
    16
}
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
fn default_token_budget() -> usize {
    DEFAULT_TOKEN_BUDGET
}

/// Tokens per chunk by default (`[pipeline] token_budget`, and `embed`). Small batches
/// are fastest on a CPU: a batch's attention scores stay in cache (BENCHMARKS.md, model
/// forward; `CELLSTREAM_TOKEN_BUDGET=T cargo bench --bench model` measures another budget).
pub const DEFAULT_TOKEN_BUDGET: usize = 256;
fn default_drain_seconds() -> f64 {
    60.0
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: PathBuf::new(),
            rescan_seconds: default_rescan_seconds(),
            on_done: OnDone::default(),
            max_queued: default_max_queued(),
            max_decompressed_bytes: default_max_decompressed(),
            max_cells: default_max_cells(),
            max_genes: default_max_genes(),
            max_stored_counts: default_max_stored_counts(),
        }
    }
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            dir: PathBuf::new(),
            embedding: EmbeddingEncoding::default(),
            format: OutputFormat::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
            max_upload_bytes: default_max_upload(),
            max_concurrent_uploads: default_max_uploads(),
            stream_buffer_batches: default_stream_buffer(),
            token_file: None,
            token: None,
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            threads: default_threads(),
            seed: 0,
            token_budget: default_token_budget(),
            drain_seconds: default_drain_seconds(),
            memory_budget: None,
        }
    }
}

/// The smallest `[pipeline] memory_budget` accepted.
const MIN_MEMORY_BUDGET: u64 = 64 << 20;

/// A config file that cannot be used, with the file and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{}: {what}", path.display())]
pub struct ConfigError {
    pub path: PathBuf,
    pub what: String,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let err = |what: String| ConfigError {
            path: path.to_path_buf(),
            what,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let mut cfg = Config::parse(&text).map_err(err)?;
        if let Some(file) = &cfg.http.token_file {
            let token = std::fs::read_to_string(file)
                .map_err(|e| err(format!("http.token_file {}: {e}", file.display())))?;
            let token = token.trim();
            if token.len() < 16 || token.chars().any(|c| !c.is_ascii_graphic()) {
                return Err(err(format!(
                    "http.token_file {}: a token is at least 16 printable ASCII characters, without spaces",
                    file.display()
                )));
            }
            cfg.http.token = Some(token.to_string());
        }
        Ok(cfg)
    }

    /// The bearer token every endpoint but `/healthz` requires, when one is configured.
    pub fn token(&self) -> Option<&str> {
        self.http.token.as_deref()
    }

    /// Parses and checks a config's text.
    pub fn parse(text: &str) -> Result<Config, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        let positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "{key} must be a positive number of seconds, not {v}"
                ))
            }
        };
        positive("spool.rescan_seconds", self.spool.rescan_seconds)?;
        positive("pipeline.drain_seconds", self.pipeline.drain_seconds)?;
        let at_least_one = |key: &str, v: usize| {
            if v >= 1 {
                Ok(())
            } else {
                Err(format!("{key} must be at least 1"))
            }
        };
        at_least_one("pipeline.threads", self.pipeline.threads)?;
        at_least_one("pipeline.token_budget", self.pipeline.token_budget)?;
        at_least_one("spool.max_queued", self.spool.max_queued)?;
        at_least_one(
            "http.max_concurrent_uploads",
            self.http.max_concurrent_uploads,
        )?;
        at_least_one(
            "http.stream_buffer_batches",
            self.http.stream_buffer_batches,
        )?;
        for (key, v) in [
            ("spool.max_cells", self.spool.max_cells),
            ("spool.max_genes", self.spool.max_genes),
            ("spool.max_stored_counts", self.spool.max_stored_counts),
            (
                "spool.max_decompressed_bytes",
                self.spool.max_decompressed_bytes,
            ),
        ] {
            if v == 0 {
                return Err(format!("{key} must be at least 1"));
            }
        }
        if self.spool.max_stored_counts > u32::MAX as u64 {
            return Err(format!(
                "spool.max_stored_counts must be at most {} (a batch's entries are counted in 32 bits)",
                u32::MAX
            ));
        }
        if let Some(b) = self.pipeline.memory_budget {
            if b < MIN_MEMORY_BUDGET {
                return Err(format!(
                    "pipeline.memory_budget is {b} bytes; the model alone needs more: at least {MIN_MEMORY_BUDGET} (64 MiB)"
                ));
            }
        }
        if let Some(nats) = &self.nats {
            nats.check()?;
        }
        let without_nats = |key: &str| {
            format!("{key} is required (it may be left out only when a [nats] section is set)")
        };
        if self.nats.is_none() && !self.has_spool() {
            return Err(without_nats("spool.dir"));
        }
        if self.nats.is_none() && !self.has_output_dir() {
            return Err(without_nats("output.dir"));
        }
        if self.has_spool() && self.spool.dir == self.output.dir {
            return Err("spool.dir and output.dir must differ".into());
        }
        Ok(())
    }

    /// The caps on what a batch may hold (`[spool] max_*`).
    pub fn read_caps(&self) -> (crate::batch::ReadOptions, crate::batch::Caps) {
        (
            crate::batch::ReadOptions {
                max_decompressed: self.spool.max_decompressed_bytes,
                // A producer that breaks the protocol could still truncate the file: copy,
                // never map.
                memory_map: false,
            },
            crate::batch::Caps {
                max_cells: self.spool.max_cells,
                max_genes: self.spool.max_genes,
                max_stored_counts: self.spool.max_stored_counts,
            },
        )
    }

    /// Whether batches come from a spool folder (`[spool] dir` set).
    pub fn has_spool(&self) -> bool {
        !self.spool.dir.as_os_str().is_empty()
    }

    /// Whether results are written as files (`[output] dir` set).
    pub fn has_output_dir(&self) -> bool {
        !self.output.dir.as_os_str().is_empty()
    }

    pub fn rescan_interval(&self) -> Duration {
        Duration::from_secs_f64(self.spool.rescan_seconds)
    }

    pub fn drain_limit(&self) -> Duration {
        Duration::from_secs_f64(self.pipeline.drain_seconds)
    }

    /// The config a SIGHUP installs: `new`, except for the keys that shape threads, sockets
    /// and folders already in use, which keep their running values and are named (as in
    /// the file) in the returned list when `new` changed them.
    pub fn reload(&self, mut new: Config) -> (Config, Vec<&'static str>) {
        let mut kept = Vec::new();
        macro_rules! keep {
            ($name:literal, $($field:ident).+) => {
                if new.$($field).+ != self.$($field).+ {
                    new.$($field).+ = self.$($field).+.clone();
                    kept.push($name);
                }
            };
        }
        keep!("spool.dir", spool.dir);
        keep!("output.dir", output.dir);
        keep!("http.listen", http.listen);
        keep!("http.max_concurrent_uploads", http.max_concurrent_uploads);
        keep!("http.stream_buffer_batches", http.stream_buffer_batches);
        keep!("model.dir", model.dir);
        keep!("model.reference", model.reference);
        keep!("pipeline.threads", pipeline.threads);
        keep!("pipeline.seed", pipeline.seed);
        keep!("pipeline.token_budget", pipeline.token_budget);
        keep!("nats", nats);
        (new, kept)
    }
}

impl NatsConfig {
    /// The config `cellstream submit --nats URL` connects with (default names, no files).
    pub fn with_url(url: &str) -> NatsConfig {
        NatsConfig {
            url: url.to_string(),
            stream: default_nats_stream(),
            consumer: default_nats_consumer(),
            credentials_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            ack_wait_seconds: default_ack_wait(),
            max_deliver: default_max_deliver(),
        }
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs_f64(self.ack_wait_seconds)
    }

    fn check(&self) -> Result<(), String> {
        if self.url.trim().is_empty() {
            return Err("nats.url must name a server (nats://host:4222)".into());
        }
        for (key, name) in [
            ("nats.stream", &self.stream),
            ("nats.consumer", &self.consumer),
        ] {
            let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
            if name.is_empty() || name.len() > 32 || !name.chars().all(ok) {
                return Err(format!(
                    "{key} must be 1 to 32 letters, digits, '_' or '-', not {name:?}"
                ));
            }
        }
        if !(self.ack_wait_seconds.is_finite() && self.ack_wait_seconds >= 1.0) {
            return Err(format!(
                "nats.ack_wait_seconds must be at least 1, not {}",
                self.ack_wait_seconds
            ));
        }
        if self.max_deliver < 1 {
            return Err("nats.max_deliver must be at least 1".into());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err("nats.tls_cert_file and nats.tls_key_file go together".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_contract_keys_are_enough() {
        let cfg = Config::parse(
            "[spool]\ndir = \"/s\"\n[output]\ndir = \"/o\"\n[http]\nlisten = \"127.0.0.1:9464\"\n",
        )
        .unwrap();
        assert_eq!(cfg.spool.dir, PathBuf::from("/s"));
        assert_eq!(cfg.output.dir, PathBuf::from("/o"));
        assert_eq!(cfg.http.listen.port(), 9464);
        assert_eq!(cfg.spool.on_done, OnDone::Keep);
        assert!(cfg.pipeline.threads >= 1);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let base = "[spool]\ndir = \"/s\"\n[output]\ndir = \"/o\"\n";
        let e = Config::parse(&format!("{base}[http]\nlisen = \"127.0.0.1:1\"\n")).unwrap_err();
        assert!(e.contains("lisen"), "{e}");
        let e = Config::parse(&format!("{base}[pipeline]\nthreads = 0\n")).unwrap_err();
        assert!(e.contains("pipeline.threads"), "{e}");
        let e = Config::parse(&format!("{base}[spool]\n")).unwrap_err();
        assert!(e.contains("spool"), "{e}");
        let e = Config::parse("[spool]\ndir = \"/s\"\n[output]\ndir = \"/s\"\n").unwrap_err();
        assert!(e.contains("differ"), "{e}");
    }

    #[test]
    fn reload_keeps_restart_only_keys() {
        let a = Config::parse("[spool]\ndir = \"/s\"\n[output]\ndir = \"/o\"\n").unwrap();
        let mut b = a.clone();
        b.spool.rescan_seconds = 5.0;
        let (merged, kept) = a.reload(b.clone());
        assert!(kept.is_empty());
        assert_eq!(merged.spool.rescan_seconds, 5.0);
        b.pipeline.threads += 1;
        b.output.dir = "/p".into();
        let (merged, kept) = a.reload(b);
        assert_eq!(kept, vec!["output.dir", "pipeline.threads"]);
        assert_eq!(merged.output.dir, a.output.dir);
        assert_eq!(merged.pipeline.threads, a.pipeline.threads);
        assert_eq!(merged.spool.rescan_seconds, 5.0);
    }

    #[test]
    fn the_embedding_encoding_is_array_unless_asked_and_reloads_at_once() {
        let base = "[spool]\ndir = \"/s\"\n[output]\ndir = \"/o\"\n";
        let a = Config::parse(base).unwrap();
        assert_eq!(a.output.embedding, EmbeddingEncoding::Array);
        let b = Config::parse(&format!("{base}embedding = \"base64\"\n")).unwrap();
        assert_eq!(b.output.embedding, EmbeddingEncoding::Base64);
        let (merged, kept) = a.reload(b);
        assert!(kept.is_empty());
        assert_eq!(merged.output.embedding, EmbeddingEncoding::Base64);
        let e = Config::parse(&format!("{base}embedding = \"hex\"\n")).unwrap_err();
        assert!(e.contains("array") && e.contains("base64"), "{e}");
    }

    #[test]
    fn caps_and_the_memory_budget_have_defaults_and_are_checked() {
        let base = "[spool]\ndir = \"/s\"\n[output]\ndir = \"/o\"\n";
        let a = Config::parse(base).unwrap();
        let (opts, caps) = a.read_caps();
        assert_eq!(caps, crate::batch::Caps::default());
        assert_eq!(opts.max_decompressed, 4 << 30);
        assert!(!opts.memory_map);
        assert_eq!(a.pipeline.memory_budget, None);
        let b = Config::parse(&format!("{base}[pipeline]\nmemory_budget = 1073741824\n")).unwrap();
        assert_eq!(b.pipeline.memory_budget, Some(1 << 30));
        let e = Config::parse(&format!("{base}[pipeline]\nmemory_budget = 1000\n")).unwrap_err();
        assert!(e.contains("pipeline.memory_budget"), "{e}");
        let e = Config::parse(&base.replace("[output]", "max_cells = 0\n[output]")).unwrap_err();
        assert!(e.contains("spool.max_cells"), "{e}");
        let e =
            Config::parse(&base.replace("[output]", "max_stored_counts = 5000000000\n[output]"))
                .unwrap_err();
        assert!(e.contains("spool.max_stored_counts"), "{e}");
        // Caps and the budget take effect on SIGHUP.
        let c = Config::parse(&base.replace("[output]", "max_cells = 10\n[output]")).unwrap();
        let (merged, kept) = a.reload(c);
        assert!(kept.is_empty());
        assert_eq!(merged.spool.max_cells, 10);
    }

    #[test]
    fn the_output_format_is_ndjson_unless_asked_and_reloads_at_once() {
        let base = "[spool]\ndir = \"/s\"\n[output]\ndir = \"/o\"\n";
        let a = Config::parse(base).unwrap();
        assert_eq!(a.output.format, OutputFormat::Ndjson);
        let b = Config::parse(&format!("{base}format = \"parquet\"\n")).unwrap();
        assert_eq!(b.output.format, OutputFormat::Parquet);
        assert_eq!(b.output.format.extension(), "parquet");
        let (merged, kept) = a.reload(b);
        assert!(kept.is_empty());
        assert_eq!(merged.output.format, OutputFormat::Parquet);
        let e = Config::parse(&format!("{base}format = \"csv\"\n")).unwrap_err();
        assert!(e.contains("ndjson") && e.contains("parquet"), "{e}");
    }

    #[test]
    fn with_nats_the_spool_and_the_output_folder_are_optional() {
        let cfg = Config::parse("[nats]\nurl = \"nats://127.0.0.1:4222\"\n").unwrap();
        assert!(!cfg.has_spool() && !cfg.has_output_dir());
        let nats = cfg.nats.as_ref().unwrap();
        assert_eq!(nats.stream, "CELLSTREAM");
        assert_eq!(nats.consumer, "cellstream");
        assert_eq!(nats.ack_wait(), Duration::from_secs(30));
        assert_eq!(nats.max_deliver, 5);
        let both = Config::parse(
            "[spool]\ndir = \"/s\"\n[output]\ndir = \"/o\"\n[nats]\nurl = \"nats://h:4222\"\nstream = \"RUNS\"\nack_wait_seconds = 5\nmax_deliver = 2\n",
        )
        .unwrap();
        assert!(both.has_spool() && both.has_output_dir());
        // Without [nats], both stay required.
        let e = Config::parse("[output]\ndir = \"/o\"\n").unwrap_err();
        assert!(e.contains("spool.dir is required"), "{e}");
        let e = Config::parse("[spool]\ndir = \"/s\"\n").unwrap_err();
        assert!(e.contains("output.dir is required"), "{e}");
        for (bad, says) in [
            ("url = \"\"", "nats.url"),
            ("url = \"nats://h\"\nstream = \"a.b\"", "nats.stream"),
            ("url = \"nats://h\"\nconsumer = \"\"", "nats.consumer"),
            (
                "url = \"nats://h\"\nack_wait_seconds = 0.5",
                "nats.ack_wait_seconds",
            ),
            ("url = \"nats://h\"\nmax_deliver = 0", "nats.max_deliver"),
            ("url = \"nats://h\"\ntls_cert_file = \"/c\"", "tls_key_file"),
            ("url = \"nats://h\"\nsubject = \"x\"", "subject"),
        ] {
            let e = Config::parse(&format!("[nats]\n{bad}\n")).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        // The section is restart-only.
        let mut other = both.clone();
        other.nats.as_mut().unwrap().url = "nats://elsewhere:4222".into();
        let (merged, kept) = both.reload(other);
        assert_eq!(kept, vec!["nats"]);
        assert_eq!(merged.nats, both.nats);
    }

    #[test]
    fn the_example_config_documents_every_key() {
        let example = include_str!("../systemd/cellstream.toml");
        let cfg = Config::parse(example).expect("systemd/cellstream.toml parses");
        assert_eq!(cfg.spool.dir, PathBuf::from("/var/lib/cellstream/spool"));
        let source = include_str!("config.rs");
        let structs = &source[..source.find("pub struct ConfigError").unwrap()];
        for line in structs.lines() {
            let Some(field) = line
                .strip_prefix("    pub ")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let key = field.0;
            assert!(
                example.contains(&format!("\n{key} = "))
                    || example.contains(&format!("\n# {key} = "))
                    || example.contains(&format!("\n[{key}]\n"))
                    // An optional section, documented commented out ([nats]).
                    || example.contains(&format!("\n# [{key}]\n")),
                "systemd/cellstream.toml does not document `{key}`"
            );
        }
    }
}

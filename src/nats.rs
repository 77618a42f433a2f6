//! The NATS JetStream link shared by the NATS source (`source::nats`), the NATS sink
//! (`sink::nats`) and `cellstream submit`: the connection (credentials, TLS, reconnects, and
//! its health for `/readyz`), the subjects, the streams and the work messages' headers
//! (DESIGN.md §6, "NATS JetStream").
//!
//! tokio runs the network only, on one runtime thread of its own (`nats`); the pipeline's
//! threads wait on it with [`Link::block_on`], so CPU work stays where it was.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, object_store, stream};

use crate::config::NatsConfig;

/// Every work message's subject: `cellstream.batches.<name>`.
pub const WORK_PREFIX: &str = "cellstream.batches.";
/// Every cell record and summary: `cellstream.results.<batch>`.
pub const RESULTS_PREFIX: &str = "cellstream.results.";
/// Error reports of quarantined batches: `cellstream.failed.<batch>`.
pub const FAILED_PREFIX: &str = "cellstream.failed.";

/// The headers of a work message (`cellstream submit` sets them; a producer publishing by
/// other means may leave out all but `Cellstream-Object`, needed for a payload in the bucket).
pub mod header {
    /// The batch id (records' `batch`, the results subject). Default: the file name without
    /// its format extensions.
    pub const BATCH: &str = "Cellstream-Batch";
    /// The input's file (or directory) name. Default: the subject's last part.
    pub const FILE: &str = "Cellstream-File";
    /// `file` (default): the payload is the file's bytes as-is; `tar`: a directory (a 10x
    /// MTX folder) as a tar stream of its regular files, no subfolders.
    pub const PACKING: &str = "Cellstream-Packing";
    /// The payload is not in the message but in the payload bucket under this object name
    /// (a batch larger than the server's message limit).
    pub const OBJECT: &str = "Cellstream-Object";
}

/// Names derived from `[nats] stream`.
#[derive(Debug, Clone)]
pub struct Names {
    /// The work queue: subjects `cellstream.batches.>`, work-queue retention.
    pub work: String,
    /// The results: `cellstream.results.>` and `cellstream.failed.>`, limits retention.
    pub results: String,
    /// The object store bucket for payloads over the message limit and quarantined inputs.
    pub bucket: String,
}

impl Names {
    pub fn of(stream: &str) -> Names {
        Names {
            work: stream.to_string(),
            results: format!("{stream}_RESULTS"),
            bucket: format!("{stream}_PAYLOADS"),
        }
    }
}

/// `batch` as subject tokens: a batch id is a file name, whose dots split it into tokens;
/// characters a subject cannot hold (whitespace, `*`, `>`, anything outside printable ASCII)
/// become `_`, and an empty token becomes `_`. Ids made of letters, digits, `.`, `_` and `-`
/// that neither start nor end with a dot nor hold two in a row are kept as they are.
pub fn subject_token(batch: &str) -> String {
    let clean: String = batch
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '*' && c != '>' {
                c
            } else {
                '_'
            }
        })
        .collect();
    clean
        .split('.')
        .map(|t| if t.is_empty() { "_" } else { t })
        .collect::<Vec<_>>()
        .join(".")
}

/// `cellstream.results.<batch>`.
pub fn results_subject(batch: &str) -> String {
    format!("{RESULTS_PREFIX}{}", subject_token(batch))
}

/// The results stream's duplicate window: how long the server remembers a `Nats-Msg-Id`.
///
/// Two attempts at one batch publish the same ids: a daemon cut off from the server (its
/// claim lapsed after `ack_wait`) that reconnects and publishes, and the daemon that got the
/// batch next. The second starts at most `ack_wait` after the first's last in-progress ack,
/// and at most `max_deliver` attempts are made, so `ack_wait × (max_deliver + 1)` (two
/// minutes at least, the server's default) covers attempts that overlap. A redo that starts
/// later than that does not rely on the window: before publishing, the sink reads what the
/// stream already holds for the batch and publishes only the rest (`sink::nats`), which holds
/// for a batch of any length.
pub fn duplicate_window(cfg: &NatsConfig) -> Duration {
    (cfg.ack_wait() * (cfg.max_deliver + 1)).max(Duration::from_secs(120))
}

/// Whether the link is usable, for `/readyz`.
#[derive(Default)]
pub struct Health {
    connected: AtomicBool,
    /// Connected, but JetStream is not set up yet (or refused): why.
    problem: Mutex<Option<String>>,
}

impl Health {
    /// Why the daemon cannot take batches from NATS now; `None` when it can.
    pub fn problem(&self) -> Option<String> {
        if !self.connected.load(Ordering::SeqCst) {
            return Some("the NATS server is unreachable (reconnecting)".into());
        }
        self.problem.lock().unwrap().clone()
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Waits up to `limit` for the connection, looking often: a daemon's first claim comes
    /// moments before its first connection, and should not wait out a whole `limit`.
    pub fn wait_connected(&self, limit: Duration) -> bool {
        let until = std::time::Instant::now() + limit;
        while !self.is_connected() {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    pub fn set_problem(&self, problem: Option<String>) {
        *self.problem.lock().unwrap() = problem;
    }
}

/// A connection and its runtime.
pub struct Link {
    runtime: Option<tokio::runtime::Runtime>,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub names: Names,
    pub config: NatsConfig,
    pub health: Arc<Health>,
}

/// What the daemon is told of the connection's life.
pub struct Events {
    /// Counted at each reconnection (`cellstream_nats_reconnects_total`).
    pub reconnects: prometheus::IntCounter,
    /// Where to say so.
    pub log: fn(&str),
    pub warn: fn(&str),
}

/// The most publishes whose acknowledgement is awaited at once.
pub const PUBLISH_WINDOW: usize = 256;

impl Link {
    /// Connects to `cfg.url`. With `events` (the daemon) an unreachable server is not an
    /// error: the client keeps trying in the background and [`Health`] says so. Without
    /// (`cellstream submit`) the server must answer now.
    pub fn connect(cfg: &NatsConfig, events: Option<Events>) -> anyhow::Result<Link> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nats")
            .enable_all()
            .build()
            .context("starting the NATS runtime")?;
        let health = Arc::new(Health::default());
        let daemon = events.is_some();
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("cellstream-{}", std::process::id()))
            // A silent peer (a cut cable) is noticed within two pings.
            .ping_interval(Duration::from_secs(10))
            .connection_timeout(Duration::from_secs(5));
        if let Some(ca) = &cfg.tls_ca_file {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        if let Some(events) = events {
            let health = health.clone();
            let connected_once = Arc::new(AtomicBool::new(false));
            opts = opts
                .retry_on_initial_connect()
                .event_callback(move |event| {
                    let health = health.clone();
                    let connected_once = connected_once.clone();
                    let reconnects = events.reconnects.clone();
                    let (log, warn) = (events.log, events.warn);
                    async move {
                        match event {
                            async_nats::Event::Connected => {
                                health.connected.store(true, Ordering::SeqCst);
                                if connected_once.swap(true, Ordering::SeqCst) {
                                    reconnects.inc();
                                    log("NATS: reconnected");
                                } else {
                                    log("NATS: connected");
                                }
                            }
                            async_nats::Event::Disconnected => {
                                health.connected.store(false, Ordering::SeqCst);
                                warn("NATS: disconnected from the server; reconnecting");
                            }
                            async_nats::Event::Closed => {
                                health.connected.store(false, Ordering::SeqCst);
                            }
                            other => warn(&format!("NATS: {other}")),
                        }
                    }
                });
        }
        let url = cfg.url.clone();
        let creds = cfg.credentials_file.clone();
        let client = runtime.block_on(async move {
            let opts = match creds {
                Some(path) => opts
                    .credentials_file(&path)
                    .await
                    .with_context(|| format!("nats.credentials_file {}", path.display()))?,
                None => opts,
            };
            opts.connect(url.as_str())
                .await
                .with_context(|| format!("connecting to the NATS server at {url}"))
        })?;
        if !daemon {
            health.connected.store(true, Ordering::SeqCst);
        }
        // Publishing waits for a free acknowledgement slot rather than failing. (The context
        // spawns its acknowledgement task: inside the runtime.)
        let js = {
            let _inside = runtime.enter();
            jetstream::ContextBuilder::new()
                .backpressure_on_inflight(true)
                .build(client.clone())
        };
        Ok(Link {
            runtime: Some(runtime),
            client,
            js,
            names: Names::of(&cfg.stream),
            config: cfg.clone(),
            health,
        })
    }

    /// Runs `fut` on the link's runtime from a thread outside it, and waits for it.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the link")
            .block_on(fut)
    }

    /// Runs `fut` in the background on the link's runtime.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the link")
            .spawn(fut)
    }

    /// The work stream, created when missing (work-queue retention: a batch is removed
    /// once acknowledged).
    pub async fn work_stream(&self) -> anyhow::Result<stream::Stream> {
        self.stream_or_create(stream::Config {
            name: self.names.work.clone(),
            description: Some("cellstream: batches waiting for a daemon".into()),
            subjects: vec![format!("{WORK_PREFIX}>")],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
    }

    /// The results stream, created when missing (limits retention, no limits: give it a
    /// `max_age` or `max_bytes` of your own with `nats stream edit`). An existing stream
    /// whose duplicate window is shorter than [`duplicate_window`] is used, with a warning.
    pub async fn results_stream(&self) -> anyhow::Result<(stream::Stream, Option<String>)> {
        let window = duplicate_window(&self.config);
        let mut stream = self
            .stream_or_create(stream::Config {
                name: self.names.results.clone(),
                description: Some(
                    "cellstream: cell records, batch summaries, error reports".into(),
                ),
                subjects: vec![format!("{RESULTS_PREFIX}>"), format!("{FAILED_PREFIX}>")],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                duplicate_window: window,
                ..Default::default()
            })
            .await?;
        let have = stream.info().await?.config.duplicate_window;
        let warning = (have < window).then(|| {
            format!(
                "NATS: stream {} remembers message ids for {have:?}, less than the {window:?} that ack_wait x (max_deliver + 1) needs; a batch redone by an overlapping attempt could be published twice",
                self.names.results
            )
        });
        Ok((stream, warning))
    }

    /// The payload bucket, created when missing.
    pub async fn payloads(&self) -> anyhow::Result<object_store::ObjectStore> {
        match self.js.get_object_store(&self.names.bucket).await {
            Ok(store) => Ok(store),
            Err(_) => self
                .js
                .create_object_store(object_store::Config {
                    bucket: self.names.bucket.clone(),
                    description: Some(
                        "cellstream: payloads over the message limit, quarantined inputs".into(),
                    ),
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("creating the object store {}", self.names.bucket)),
        }
    }

    async fn stream_or_create(&self, config: stream::Config) -> anyhow::Result<stream::Stream> {
        let name = config.name.clone();
        match self.js.get_stream(&name).await {
            Ok(stream) => Ok(stream),
            Err(get) => match self.js.create_stream(config).await {
                Ok(stream) => Ok(stream),
                // Another daemon created it in between.
                Err(create) => self.js.get_stream(&name).await.map_err(|_| {
                    anyhow::anyhow!("stream {name}: cannot get it ({get}) nor create it ({create})")
                }),
            },
        }
    }

    /// The largest message the server takes, in bytes (headers included).
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Works from any thread, async or not; nothing left on it needs waiting for.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_ids_become_subject_tokens() {
        assert_eq!(
            results_subject("run42-000017"),
            "cellstream.results.run42-000017"
        );
        assert_eq!(
            results_subject("run1.part2"),
            "cellstream.results.run1.part2"
        );
        assert_eq!(subject_token("a b*>c"), "a_b__c");
        assert_eq!(subject_token(".x..y."), "_.x._.y._");
        assert_eq!(subject_token("é"), "_");
    }

    #[test]
    fn the_duplicate_window_covers_every_attempt() {
        let mut cfg = NatsConfig::with_url("nats://127.0.0.1:4222");
        assert_eq!(duplicate_window(&cfg), Duration::from_secs(180));
        cfg.ack_wait_seconds = 2.0;
        assert_eq!(duplicate_window(&cfg), Duration::from_secs(120));
    }

    #[test]
    fn a_claim_waits_for_the_connection_no_longer_than_it_takes() {
        let health = Arc::new(Health::default());
        let t0 = std::time::Instant::now();
        assert!(!health.wait_connected(Duration::from_millis(50)));
        assert!(t0.elapsed() >= Duration::from_millis(50));
        // Connected a little after the wait began: the wait ends then, not at its limit.
        let later = health.clone();
        let connects = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            later.connected.store(true, Ordering::SeqCst);
        });
        let t0 = std::time::Instant::now();
        assert!(health.wait_connected(Duration::from_secs(60)));
        assert!(t0.elapsed() < Duration::from_secs(30));
        connects.join().unwrap();
    }
}

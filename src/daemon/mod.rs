//! `cellstream serve`: the long-running service beside the sequencer (DESIGN.md §6).
//!
//! tokio serves HTTP, signals and the systemd watchdog; the CPU work runs on the dedicated
//! threads of [`pipeline`]. Start-up: config → spool folders → model package → HTTP
//! listening (`/healthz` answers, `/readyz` says 503) → the NATS link (`[nats]`; it
//! connects in the background) → model compiled and warmed on the batch thread → ready
//! (READY=1). SIGTERM: stop claiming, finish the batch in flight within
//! `pipeline.drain_seconds`, exit 0. SIGHUP: reload the config.

pub mod http;
pub mod live;
pub mod log;
pub mod memory;
pub mod pipeline;
pub mod spool_source;
pub mod systemd;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use crossbeam_channel::{bounded, Receiver, Sender};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::{default_model_dir, ModelPackage};
use crate::nats::{Health, Link};
use crate::sink::files::FileSink;
use crate::sink::nats::NatsSink;
use crate::sink::stream::StreamHub;
use crate::sink::ResultSink;
use crate::source::nats::NatsSource;
use crate::source::spool::Spool;
use crate::source::BatchSource;
use pipeline::Pipeline;
use spool_source::SpoolSource;
use systemd::{Heartbeat, Notifier};

/// What the HTTP handlers and the pipeline threads share.
pub struct Shared {
    config_path: PathBuf,
    config: RwLock<Arc<Config>>,
    /// The spool folder, when `[spool] dir` is set (uploads land in it).
    pub spool: Option<Spool>,
    pub metrics: Metrics,
    /// The NATS link's health, when `[nats]` is set: `/readyz` says 503 while it is down.
    pub nats: Option<Arc<Health>>,
    pub stream: StreamHub,
    /// What the live page shows (`GET /`): recent batches, a sample of cells, alerts.
    pub watch: live::Watch,
    /// The model served, for the page.
    pub model: ModelInfo,
    pub heartbeat: Heartbeat,
    pub notifier: Notifier,
    ready: AtomicBool,
    draining: AtomicBool,
    /// Why the pipeline cannot run (the model failed to load), for the exit message.
    fatal: Mutex<Option<anyhow::Error>>,
    /// Wakes the claimer: inotify events, uploads, shutdown. Bounded to one pending wake.
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
}

impl Shared {
    /// The current configuration (replaced as a whole on SIGHUP).
    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap().clone()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Why a source the daemon needs is unusable now (the NATS server unreachable), if it is.
    pub fn upstream_problem(&self) -> Option<String> {
        self.nats.as_ref().and_then(|h| h.problem())
    }

    /// Wakes the claimer to look at `incoming/` now.
    pub fn wake(&self) {
        let _ = self.wake_tx.try_send(());
    }

    fn set_ready(&self) {
        if self.is_draining() {
            return; // stopped while the model loaded: never announce readiness
        }
        self.ready.store(true, Ordering::SeqCst);
        self.metrics.ready.set(1);
        self.watch.set_ready();
        self.notifier.notify("READY=1\nSTATUS=serving");
        log::info("ready");
    }

    fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.metrics.ready.set(0);
        self.notifier
            .notify("STOPPING=1\nSTATUS=draining: finishing the batch in flight");
        self.wake();
    }

    fn set_fatal(&self, err: anyhow::Error) {
        *self.fatal.lock().unwrap() = Some(err);
    }
}

/// The model package and reference being served, as the page names them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub dir: String,
    pub reference: Option<String>,
}

/// Runs the daemon until SIGTERM or SIGINT (Ok: drained) or a fatal error.
pub fn serve(config_path: &Path) -> anyhow::Result<()> {
    // A write past a file-size limit (RLIMIT_FSIZE) must fail with EFBIG, like a full
    // disk, and be retried; by default SIGXFSZ would kill the daemon instead.
    // SAFETY: setting a signal's disposition to SIG_IGN, before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cfg = Config::load(config_path)?;
    let spool = if cfg.has_spool() {
        let spool = Spool::open(&cfg.spool.dir)
            .with_context(|| format!("preparing the spool {}", cfg.spool.dir.display()))?;
        remove_stale_temporaries(&spool.incoming, &|n| n.starts_with(http::UPLOAD_PREFIX));
        Some(spool)
    } else {
        None
    };
    if cfg.has_output_dir() {
        std::fs::create_dir_all(&cfg.output.dir)
            .with_context(|| format!("creating the output folder {}", cfg.output.dir.display()))?;
        remove_stale_temporaries(&cfg.output.dir, &crate::fsutil::is_atomic_temporary);
    }
    let model_dir = cfg.model.dir.clone().unwrap_or_else(default_model_dir);
    let package = ModelPackage::load(&model_dir)?;
    let m = &package.manifest;
    let metrics = Metrics::new(&m.name, m.version.as_deref().unwrap_or(""));
    let model_info = ModelInfo {
        name: m.name.clone(),
        version: m.version.clone().unwrap_or_default(),
        dir: model_dir.display().to_string(),
        reference: cfg
            .model
            .reference
            .as_ref()
            .map(|r| r.display().to_string()),
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Handlers first: a SIGTERM that arrives while the model loads must drain, not kill.
    let signals = runtime
        .block_on(async { Signals::install() })
        .context("installing signal handlers")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(cfg.http.listen))
        .with_context(|| format!("listening on {}", cfg.http.listen))?;
    let addr = listener.local_addr()?;
    let or_none = |set: bool, dir: &Path| {
        if set {
            dir.display().to_string()
        } else {
            "none".into()
        }
    };
    log::info(&format!(
        "listening on http://{addr}; spool {}, output {}{}",
        or_none(cfg.has_spool(), &cfg.spool.dir),
        or_none(cfg.has_output_dir(), &cfg.output.dir),
        cfg.nats
            .as_ref()
            .map_or(String::new(), |n| format!(", NATS {}", n.url))
    ));
    let nats = match &cfg.nats {
        Some(n) => Some(Arc::new(
            Link::connect(
                n,
                Some(crate::nats::Events {
                    reconnects: metrics.nats_reconnects.clone(),
                    log: log::info,
                    warn: log::warn,
                }),
            )
            .context("[nats]")?,
        )),
        None => None,
    };

    let (wake_tx, wake_rx) = bounded(1);
    let mut sinks: Vec<Box<dyn ResultSink>> = Vec::new();
    if cfg.has_output_dir() {
        sinks.push(Box::new(FileSink::new(cfg.output.dir.clone())));
    }
    if let Some(link) = &nats {
        sinks.push(Box::new(NatsSink::new(link.clone(), log::warn)));
    }
    let stream = StreamHub::new(cfg.http.stream_buffer_batches);
    sinks.push(Box::new(stream.clone()));
    let shared = Arc::new(Shared {
        config_path: config_path.to_path_buf(),
        stream,
        config: RwLock::new(Arc::new(cfg)),
        spool: spool.clone(),
        nats: nats.as_ref().map(|l| l.health.clone()),
        metrics,
        watch: live::Watch::new(),
        model: model_info,
        heartbeat: Heartbeat::default(),
        notifier: Notifier::from_env(),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        fatal: Mutex::new(None),
        wake_tx,
        wake_rx,
    });
    let mut sources: Vec<Arc<dyn BatchSource>> = Vec::new();
    if let Some(spool) = spool {
        sources.push(Arc::new(SpoolSource::new(shared.clone(), spool)));
    }
    if let Some(link) = nats {
        let counters = crate::source::nats::Counters {
            redeliveries: shared.metrics.nats_redeliveries.clone(),
            failed: shared.metrics.batches.with_label_values(&["failed"]),
        };
        sources.push(Arc::new(
            NatsSource::new(link, counters).context("preparing the NATS source")?,
        ));
    }
    let (ended_tx, ended_rx) = mpsc::unbounded_channel();
    let pipeline = Pipeline::start(shared.clone(), package, sources, sinks, ended_tx)
        .context("starting the pipeline threads")?;
    let result = runtime.block_on(run(shared, listener, signals, ended_rx, pipeline));
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// SIGTERM, SIGINT and SIGHUP, caught from the start.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

async fn run(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    signals: Signals,
    mut ended: mpsc::UnboundedReceiver<&'static str>,
    pipeline: Pipeline,
) -> anyhow::Result<()> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let app = http::router(shared.clone(), shutdown_rx.clone());
    let mut server_shutdown = shutdown_rx.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = server_shutdown.wait_for(|&stop| stop).await;
            })
            .await
    });
    if let Some(period) = systemd::watchdog_period() {
        tokio::spawn(feed_watchdog(shared.clone(), period));
    }
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    let stopped_by = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                let shared = shared.clone();
                // Reading the file is blocking I/O: not on the runtime's thread.
                let _ = tokio::task::spawn_blocking(move || reload(&shared)).await;
            }
            Some(thread) = ended.recv() => {
                let fatal = shared.fatal.lock().unwrap().take();
                let _ = shutdown_tx.send(true);
                return Err(fatal.unwrap_or_else(|| {
                    anyhow::anyhow!("the pipeline's {thread} thread stopped unexpectedly")
                }));
            }
        }
    };
    let limit = shared.config().drain_limit();
    log::info(&format!(
        "{stopped_by}: draining (no new claims; up to {limit:?} for the batch in flight)"
    ));
    shared.begin_drain();
    let joined = tokio::time::timeout(limit, tokio::task::spawn_blocking(move || pipeline.join()));
    match joined.await {
        Ok(_) => log::info("drained; exiting"),
        Err(_) => log::warn(&format!(
            "drain limit {limit:?} reached; batches still in processing/ are redone at the next start"
        )),
    }
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    Ok(())
}

/// Feeds the systemd watchdog every half period while the pipeline makes progress (or
/// waits for work), and stops feeding it when a stage is stuck.
async fn feed_watchdog(shared: Arc<Shared>, period: Duration) {
    let mut tick = tokio::time::interval(period / 2);
    let mut reported = false;
    loop {
        tick.tick().await;
        // systemd watches from READY=1; loading the model is bounded by TimeoutStartSec.
        if !shared.is_ready() {
            continue;
        }
        match shared.heartbeat.stuck(period) {
            None => {
                shared.notifier.notify("WATCHDOG=1");
                reported = false;
            }
            Some(stage) if !reported => {
                log::error(&format!(
                    "the {stage:?} stage made no progress for {period:?}; no longer feeding the watchdog"
                ));
                reported = true;
            }
            Some(_) => {}
        }
    }
}

/// SIGHUP: reads the config again. Keys that shape running threads and sockets keep their
/// running values (and say so); an unreadable file changes nothing.
fn reload(shared: &Shared) {
    let new = match Config::load(&shared.config_path) {
        Ok(c) => c,
        Err(e) => {
            log::error(&format!(
                "SIGHUP: config not reloaded, keeping the running one: {e}"
            ));
            return;
        }
    };
    let (merged, kept) = shared.config().reload(new);
    if !kept.is_empty() {
        log::warn(&format!(
            "SIGHUP: {} changed but take effect only at a restart; keeping the running values",
            kept.join(", ")
        ));
    }
    *shared.config.write().unwrap() = Arc::new(merged);
    log::info(&format!(
        "SIGHUP: reloaded {}",
        shared.config_path.display()
    ));
    shared.wake();
}

/// Temporary files a crash left behind in `dir`: partial outputs (never committed, so never
/// seen by a reader) and partial uploads (never acknowledged to their client).
fn remove_stale_temporaries(dir: &Path, pick: &dyn Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if pick(&name.to_string_lossy()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

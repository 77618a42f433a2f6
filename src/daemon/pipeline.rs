//! The daemon's CPU side: three dedicated threads joined by bounded crossbeam channels.
//!
//! ```text
//!  spool ─┐
//!  nats  ─┴(claimed, rendezvous)──▶ batch ──(finished, 1)──▶ emit
//!  one thread per source:           read, tokenize,          the sinks commit (files:
//!  claim by rename, or pull         infer (the inference     write + fsync + rename; nats:
//!  from JetStream (blocks while     pool's own threads)      publish, acks awaited), the
//!  the batch thread is busy:                                 source is acked (the input
//!  backpressure)                                             archived), metrics, stream
//! ```
//!
//! A full channel blocks the stage before it, so the sources simply wait: nothing is
//! claimed that cannot be worked on, and nothing is dropped. Where batches come from and
//! where results go are the [`BatchSource`]s and [`ResultSink`]s given to
//! [`Pipeline::start`].

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use tokio::sync::mpsc::UnboundedSender;

use super::live::Problem;
use super::log;
use super::memory::{self, Budget, ModelShape};
use super::systemd::Stage;
use super::Shared;
use crate::batch::isolated::{panic_message, read_contained_capped, ChildReadError, ChildReader};
use crate::batch::{claims, detect_format, Caps, CountBatch, Format, ReadOptions};
use crate::embed::{CellResult, EmbedConfig, EmbedTimings, Embedder, NoGeneInVocab};
use crate::model::runner::release_free_memory;
use crate::model::ModelPackage;
use crate::reference::Reference;
use crate::sink::ndjson;
use crate::sink::summary::{BatchSummary, StageTimings};
use crate::sink::{Outgoing, Phase, ResultSink};
use crate::source::spool::{clip, Claimed, ErrorReport};
use crate::source::{unix_seconds, BatchSource};

/// A claimed batch and the source that settles it.
#[derive(Clone)]
pub struct Claim {
    pub batch: Claimed,
    pub source: Arc<dyn BatchSource>,
}

/// A batch that went through the model, on its way to the output: what the records and the
/// summary need of the input, not its counts (a batch in the queue would hold them twice).
struct Finished {
    claimed: Claimed,
    source: Arc<dyn BatchSource>,
    barcodes: Vec<String>,
    format: Format,
    n_genes: usize,
    results: Vec<CellResult>,
    read: Duration,
    timings: EmbedTimings,
    /// The reference the cells were mapped on, if any (for the summary's run-level QC).
    reference: Option<Arc<Reference>>,
    /// What its records were estimated to take, counted in [`Emitting`] until written.
    reserved: u64,
    /// The model's embedding width (a Parquet output's list size).
    embedding_dim: usize,
}

/// Bytes the batches handed to the emit stage will still take (their records), by estimate:
/// the batch stage admits the next batch beside them.
type Emitting = Arc<AtomicU64>;

/// Why a claimed batch cannot be processed; it goes to `failed/`.
struct Failure {
    stage: &'static str,
    kind: String,
    error: String,
}

/// The running pipeline threads.
pub struct Pipeline {
    handles: Vec<JoinHandle<()>>,
}

impl Pipeline {
    /// Starts the threads: one claiming from each of `sources`, the batch thread, and the
    /// emit thread that hands results to `sinks`. Each one sends its name on `ended` when
    /// it stops, normally or not, so that the daemon notices a pipeline that died.
    pub fn start(
        shared: Arc<Shared>,
        package: ModelPackage,
        sources: Vec<Arc<dyn BatchSource>>,
        sinks: Vec<Box<dyn ResultSink>>,
        ended: UnboundedSender<&'static str>,
    ) -> std::io::Result<Pipeline> {
        let (claimed_tx, claimed_rx) = bounded::<Claim>(0);
        let (finished_tx, finished_rx) = bounded::<Finished>(1);
        let emitting = Emitting::default();
        let spawn = |name: &'static str, body: Box<dyn FnOnce() + Send>| {
            let ended = ended.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let _report = EndReport { name, ended };
                    body()
                })
        };
        let mut handles = Vec::new();
        for source in sources {
            let (shared, claimed_tx) = (shared.clone(), claimed_tx.clone());
            handles.push(spawn(
                source.name(),
                Box::new(move || claim_loop(&shared, source, claimed_tx)),
            )?);
        }
        drop(claimed_tx);
        handles.push(spawn("batch", {
            let shared = shared.clone();
            let emitting = emitting.clone();
            Box::new(move || batch_loop(&shared, package, claimed_rx, finished_tx, &emitting))
        })?);
        handles.push(spawn(
            "emit",
            Box::new(move || emit_loop(&shared, sinks, finished_rx, &emitting)),
        )?);
        Ok(Pipeline { handles })
    }

    /// Waits for every thread (they stop once draining has begun and work is done).
    pub fn join(self) {
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// Sends a thread's name when it ends, panics included.
struct EndReport {
    name: &'static str,
    ended: UnboundedSender<&'static str>,
}

impl Drop for EndReport {
    fn drop(&mut self) {
        let _ = self.ended.send(self.name);
    }
}

/// Claims batches from `source` until draining, handing each to the batch thread (which
/// blocks while it is busy).
fn claim_loop(shared: &Shared, source: Arc<dyn BatchSource>, claimed: Sender<Claim>) {
    // Every source's claim thread shares this gauge: each adds its own waiting batch.
    let claimed_depth = shared.metrics.queue_depth.with_label_values(&["claimed"]);
    while !shared.is_draining() {
        let batch = match source.claim() {
            Ok(Some(batch)) => batch,
            Ok(None) => continue,
            Err(e) => {
                log::warn(&format!("{}: cannot claim: {e}", source.name()));
                std::thread::sleep(shared.config().rescan_interval());
                continue;
            }
        };
        claimed_depth.inc();
        let sent = claimed.send(Claim {
            batch,
            source: source.clone(),
        });
        claimed_depth.dec();
        if let Err(unsent) = sent {
            // The batch thread has stopped (draining): not worked on.
            source.release(&unsent.0.batch);
            return;
        }
    }
}

/// Loads and warms the model, reports ready, then reads, tokenizes and embeds each claimed
/// batch.
fn batch_loop(
    shared: &Shared,
    package: ModelPackage,
    claimed: Receiver<Claim>,
    finished: Sender<Finished>,
    emitting: &Emitting,
) {
    let cfg = shared.config();
    let embed_cfg = EmbedConfig {
        threads: cfg.pipeline.threads,
        token_budget: cfg.pipeline.token_budget,
        seed: cfg.pipeline.seed,
    };
    let loaded = Instant::now();
    let reference_dir = cfg.model.reference.clone();
    let (mut embedder, packed) = match Embedder::new(package, embed_cfg).and_then(|mut e| {
        if let Some(dir) = &reference_dir {
            let reference = e.load_reference(dir)?;
            e.set_reference(Arc::new(reference));
        }
        let packed = e.warm_up()?;
        Ok((e, packed))
    }) {
        Ok(loaded) => loaded,
        Err(e) => {
            shared.set_fatal(e.context("loading the model"));
            return;
        }
    };
    let mib = |bytes: usize| bytes as f64 / (1 << 20) as f64;
    log::info(&format!(
        "model {} loaded and warmed in {:.2} s; {} inference thread(s); packed weights {:.1} MiB ({:.1} MiB of the plans' {:.1} MiB shared)",
        embedder.package.dir.display(),
        loaded.elapsed().as_secs_f64(),
        cfg.pipeline.threads,
        mib(packed.bytes - packed.shared),
        mib(packed.shared),
        mib(packed.bytes),
    ));
    // The batches' buffers go back to the system before the daemon's size is taken.
    embedder.release_buffers();
    release_free_memory();
    let budget = Budget::of(&cfg);
    log::info(&format!(
        "memory budget {} ({}); {} resident once warmed",
        memory::mib(budget.bytes),
        budget.source,
        memory::mib(memory::resident_bytes().unwrap_or(0)),
    ));
    if let Some(reference) = embedder.reference() {
        shared.watch.set_reference(reference.clone());
    }
    shared.set_ready();
    for c in claimed {
        if shared.is_draining() {
            // The spool leaves it in processing/ (redone first at the next start).
            c.source.release(&c.batch);
            break;
        }
        shared.heartbeat.beat(Stage::Batch);
        let processed = process(shared, &mut embedder, &c, emitting);
        // What the batch needed goes back (the token buffers of a large batch would stay).
        embedder.release_buffers();
        match processed {
            Ok(job) => {
                shared.heartbeat.idle(Stage::Batch);
                emitting.fetch_add(job.reserved, Ordering::SeqCst);
                let reserved = job.reserved;
                if finished.send(job).is_err() {
                    emitting.fetch_sub(reserved, Ordering::SeqCst);
                    break;
                }
                set_emit_depth(shared, finished.len());
            }
            Err(failure) => {
                quarantine(shared, &c, failure);
                release_free_memory();
                shared.heartbeat.idle(Stage::Batch);
            }
        }
    }
}

/// Admits a claimed batch against the memory budget by what its headers claim (formats
/// without claims the parent can read, HDF5, are read by a child under the caps): it goes
/// ahead when it fits beside what the daemon holds and what the batches being written will
/// take; it waits while only those stand in the way; it is refused (quarantined as
/// `too_large`, the budget named) when it cannot fit even then. Returns its records' estimate.
fn admit(
    shared: &Shared,
    embedder: &Embedder,
    c: &Claimed,
    emitting: &Emitting,
) -> Result<u64, Failure> {
    let Some(claims) = claims(&c.path) else {
        return Ok(0);
    };
    let cfg = shared.config();
    let m = &embedder.package.manifest;
    let shape = ModelShape {
        embedding_dim: m.embedding_dim as u64,
        n_classes: embedder
            .package
            .labels
            .as_ref()
            .map_or(0, |l| l.len() as u64),
        max_len: m.max_len as u64,
    };
    let need = memory::estimate(&claims, &shape, cfg.output.embedding);
    let budget = Budget::of(&cfg);
    loop {
        let resident = memory::resident_bytes().unwrap_or(0);
        let pending = emitting.load(Ordering::SeqCst);
        let held = resident.saturating_add(pending);
        if held.saturating_add(need.total()) <= budget.bytes {
            return Ok(need.records);
        }
        if pending == 0 {
            return Err(Failure {
                stage: "read",
                kind: "too_large".into(),
                error: format!(
                    "{}: needs about {} by what it claims ({} cells, {} genes, {} stored counts, {}), but the memory budget of {} ({}) leaves {} beside the {} the daemon holds",
                    c.path.display(),
                    memory::mib(need.total()),
                    claims.cells,
                    claims.genes,
                    claims.stored,
                    claims.format.name(),
                    memory::mib(budget.bytes),
                    budget.source,
                    memory::mib(budget.bytes.saturating_sub(held)),
                    memory::mib(held),
                ),
            });
        }
        // Batches being written stand in the way: wait for them.
        shared.heartbeat.beat(Stage::Batch);
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn process(
    shared: &Shared,
    embedder: &mut Embedder,
    claim: &Claim,
    emitting: &Emitting,
) -> Result<Finished, Failure> {
    let c = &claim.batch;
    check_entry(&c.path)?;
    // A producer that breaks the protocol could still truncate the file: copy, never map.
    let (opts, caps) = shared.config().read_caps();
    let start = Instant::now();
    let reserved = admit(shared, embedder, c, emitting)?;
    let batch = read(shared, c, &opts, &caps)?;
    let read = start.elapsed();
    let beat = &mut |_cells: usize| shared.heartbeat.beat(Stage::Batch);
    // A panic in the model runtime on one strange batch fails that batch, not the daemon.
    let embedded = catch_unwind(AssertUnwindSafe(|| embedder.embed_timed(&batch, beat)))
        .unwrap_or_else(|panic| {
            Err(anyhow::anyhow!(
                "internal error (panic): {}",
                panic_message(&panic)
            ))
        });
    match embedded {
        Ok((results, timings)) => Ok(Finished {
            claimed: c.clone(),
            source: claim.source.clone(),
            format: batch.format,
            n_genes: batch.n_genes(),
            barcodes: batch.barcodes,
            results,
            read,
            timings,
            reference: embedder.reference().cloned(),
            reserved,
            embedding_dim: embedder.package.manifest.embedding_dim,
        }),
        Err(e) => Err(match e.downcast_ref::<NoGeneInVocab>() {
            Some(_) => Failure {
                stage: "tokenize",
                kind: "no_gene_in_vocab".into(),
                error: e.to_string(),
            },
            None => Failure {
                stage: "infer",
                kind: "model".into(),
                error: format!("{}: {e:#}", c.path.display()),
            },
        }),
    }
}

/// Reads a claimed batch: HDF5, read by C code that can crash the process, in a child process
/// (`batch::isolated`), every other format here with a reader's panic contained.
fn read(
    shared: &Shared,
    c: &Claimed,
    opts: &ReadOptions,
    caps: &Caps,
) -> Result<CountBatch, Failure> {
    if cfg!(feature = "hdf5") && matches!(detect_format(&c.path), Ok(Format::Hdf5)) {
        return read_in_child(shared, c, opts, caps);
    }
    read_contained_capped(&c.path, opts, caps).map_err(|r| Failure {
        stage: "read",
        kind: r.kind,
        error: r.error,
    })
}

/// A read still running after this long is taken for a hang and killed.
const CHILD_READ_TIMEOUT: Duration = Duration::from_secs(300);

fn read_in_child(
    shared: &Shared,
    c: &Claimed,
    opts: &ReadOptions,
    caps: &Caps,
) -> Result<CountBatch, Failure> {
    let reader = ChildReader::this_binary(CHILD_READ_TIMEOUT);
    let beat = &mut || shared.heartbeat.beat(Stage::Batch);
    reader.read_capped(&c.path, opts, caps, beat).map_err(|e| {
        let (kind, error) = match e {
            ChildReadError::Refused(r) => (r.kind, r.error),
            ChildReadError::Crashed(why) => (
                "reader_crashed".to_string(),
                format!(
                    "{}: the HDF5 reader crashed on this file: {why}. libhdf5 does not survive every damaged file; only this file is affected",
                    c.path.display()
                ),
            ),
            e @ ChildReadError::TimedOut(_) => {
                ("reader_timeout".to_string(), format!("{}: {e}", c.path.display()))
            }
            ChildReadError::Internal(why) => {
                ("internal".to_string(), format!("{}: {why}", c.path.display()))
            }
        };
        Failure { stage: "read", kind, error }
    })
}

/// Only regular files and real directories are batches. A symlink could point anywhere
/// (outside the spool); a FIFO or device would block the reader.
fn check_entry(path: &Path) -> Result<(), Failure> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Failure {
            stage: "claim",
            kind: "vanished".into(),
            error: format!(
                "{}: vanished after it was claimed (removed from processing/ by another program); nothing to process",
                path.display()
            ),
        },
        _ => Failure {
            stage: "claim",
            kind: "io".into(),
            error: format!("{}: {e}", path.display()),
        },
    })?;
    let t = meta.file_type();
    if t.is_file() || t.is_dir() {
        return Ok(());
    }
    let what = if t.is_symlink() {
        "a symbolic link"
    } else {
        "a special file (FIFO, socket or device)"
    };
    Err(Failure {
        stage: "claim",
        kind: "not_a_batch".into(),
        error: format!(
            "{}: is {what}; the spool accepts only regular files and 10x MTX directories renamed into incoming/",
            path.display()
        ),
    })
}

fn quarantine(shared: &Shared, claim: &Claim, failure: Failure) {
    let c = &claim.batch;
    // Whatever the input held, the log line and the report stay small.
    let error = clip(&failure.error).into_owned();
    log::warn(&format!(
        "{}: quarantined ({} failed, {}): {error}",
        c.name.to_string_lossy(),
        failure.stage,
        failure.kind,
    ));
    let report = ErrorReport {
        batch: c.batch_id.clone(),
        file: c.name.to_string_lossy().into_owned(),
        stage: failure.stage,
        kind: failure.kind,
        error,
        failed_at: unix_seconds(),
    };
    match claim.source.quarantine(c, &report) {
        Ok(()) => {
            shared.metrics.batches.with_label_values(&["failed"]).inc();
            shared.watch.batch_failed(
                "failed",
                &report.batch,
                &report.file,
                Problem {
                    stage: report.stage.into(),
                    kind: report.kind.clone(),
                    error: report.error.clone(),
                },
            );
        }
        Err(e) => log::error(&format!(
            "cannot quarantine {} ({e}); it stays with its source ({}) to be tried again",
            c.path.display(),
            claim.source.name()
        )),
    }
}

/// Writes and commits each finished batch, then archives its input and tells the world.
fn emit_loop(
    shared: &Shared,
    mut sinks: Vec<Box<dyn ResultSink>>,
    finished: Receiver<Finished>,
    emitting: &Emitting,
) {
    for job in &finished {
        set_emit_depth(shared, finished.len());
        shared.heartbeat.beat(Stage::Emit);
        let name = job.claimed.name.clone();
        let reserved = job.reserved;
        let batch_id = job.claimed.batch_id.clone();
        let source = job.source.name();
        if let Err(e) = emit(shared, &mut sinks, job) {
            log::error(&format!(
                "{}: output not written ({e}); it goes back to its source ({source}) to be retried",
                name.to_string_lossy()
            ));
            shared.metrics.batches.with_label_values(&["retried"]).inc();
            shared.watch.batch_failed(
                "retried",
                &batch_id,
                &name.to_string_lossy(),
                Problem {
                    stage: "emit".into(),
                    kind: "io".into(),
                    error: e.to_string(),
                },
            );
            // A full or read-only disk will not heal in a millisecond: pace the retries.
            shared.heartbeat.idle(Stage::Emit);
            std::thread::sleep(shared.config().rescan_interval());
        }
        // The batch's buffers are freed; hand their pages back before the next one.
        release_free_memory();
        emitting.fetch_sub(reserved, Ordering::SeqCst);
        shared.heartbeat.idle(Stage::Emit);
    }
}

fn set_emit_depth(shared: &Shared, n: usize) {
    shared
        .metrics
        .queue_depth
        .with_label_values(&["emit"])
        .set(n as i64);
}

/// Hands a finished batch to the sinks: the records to every `Commit` sink, the summary
/// (timed up to the records' commit) to them too, then the source is acknowledged, then the
/// `Notify` sinks hear of it. A `Commit` sink that fails sends the batch back to its source.
fn emit(shared: &Shared, sinks: &mut [Box<dyn ResultSink>], job: Finished) -> std::io::Result<()> {
    let Finished {
        claimed,
        source,
        barcodes,
        format,
        n_genes,
        results,
        read,
        timings,
        reference,
        reserved: _,
        embedding_dim,
    } = job;
    let start = Instant::now();
    let mut records = Vec::with_capacity(results.len() * 2048);
    let output = shared.config().output.clone();
    // Every sink but a Parquet file takes the NDJSON records.
    ndjson::write_batch(
        &mut records,
        &claimed.batch_id,
        &barcodes,
        &results,
        output.embedding,
    )?;
    let out = Outgoing {
        batch_id: &claimed.batch_id,
        barcodes: &barcodes,
        results: &results,
        records: &records,
        file_format: output.format,
        embedding_dim,
    };
    let requeue = |e: std::io::Error, sink: &dyn ResultSink| {
        if let Err(e2) = source.requeue(&claimed) {
            log::error(&format!(
                "cannot give {} back to its source ({}): {e2}; it is redone at the next start or delivery",
                claimed.path.display(),
                source.name()
            ));
        }
        std::io::Error::new(e.kind(), format!("{}: {e}", sink.name()))
    };
    let committing = |s: &&mut Box<dyn ResultSink>| s.phase() == Phase::Commit;
    for sink in sinks.iter_mut().filter(committing) {
        if let Err(e) = sink.records(&out) {
            return Err(requeue(e, sink.as_ref()));
        }
    }
    let emit_time = start.elapsed();
    let latency = claimed.claimed_at.elapsed();

    let mut summary = BatchSummary::of(&results, reference.as_deref());
    summary.batch = claimed.batch_id.clone();
    summary.file = claimed.name.to_string_lossy().into_owned();
    summary.format = format.name();
    summary.genes = n_genes;
    summary.timings = StageTimings {
        read: read.as_secs_f64(),
        tokenize: timings.tokenize.as_secs_f64(),
        infer: timings.infer.as_secs_f64(),
        emit: emit_time.as_secs_f64(),
        latency: latency.as_secs_f64(),
    };
    let summary_json = serde_json::to_vec(&summary).map_err(std::io::Error::other)?;
    for sink in sinks.iter_mut().filter(committing) {
        match sink.summary(&out, &summary, &summary_json) {
            Ok(()) => {}
            Err(e) if sink.summary_required() => return Err(requeue(e, sink.as_ref())),
            Err(e) => log::warn(&format!(
                "{}: summary not written ({}): {e}",
                claimed.batch_id,
                sink.name()
            )),
        }
    }
    if let Err(e) = source.finish(&claimed) {
        // The output is committed; the input is redone (its output replaced by the same
        // records, or found complete) at the next start or delivery.
        log::warn(&format!(
            "{}: output committed but the input could not be archived or acknowledged: {e}",
            claimed.path.display()
        ));
    }
    record_metrics(
        shared, &summary, &results, read, timings, emit_time, latency,
    );
    for sink in sinks.iter_mut().filter(|s| s.phase() == Phase::Notify) {
        let told = sink
            .records(&out)
            .and_then(|()| sink.summary(&out, &summary, &summary_json));
        if let Err(e) = told {
            log::warn(&format!("{}: {}: {e}", claimed.batch_id, sink.name()));
        }
    }
    // Last: without a reference map the page's PCA is refitted here (power iterations over
    // at most live::SAMPLE cells), after the stream has the batch.
    shared.watch.batch_ok(&summary, &results);
    log::info(&format!(
        "{}: {} cells ({} assigned) committed {:.3} s after the claim",
        claimed.batch_id,
        summary.cells,
        summary.assigned,
        latency.as_secs_f64()
    ));
    Ok(())
}

fn record_metrics(
    shared: &Shared,
    summary: &BatchSummary,
    results: &[CellResult],
    read: Duration,
    timings: EmbedTimings,
    emit: Duration,
    latency: Duration,
) {
    let m = &shared.metrics;
    m.batches.with_label_values(&["ok"]).inc();
    m.cells.inc_by(results.len() as u64);
    for (label, n) in &summary.labels {
        m.cells_labelled
            .with_label_values(&[label.as_str()])
            .inc_by(*n as u64);
    }
    for (stage, d) in [
        ("read", read),
        ("tokenize", timings.tokenize),
        ("infer", timings.infer),
        ("emit", emit),
    ] {
        m.stage_seconds
            .with_label_values(&[stage])
            .observe(d.as_secs_f64());
    }
    m.batch_latency.observe(latency.as_secs_f64());
    for r in results {
        m.tokens_per_cell.observe(r.n_tokens as f64);
        m.vocab_matched.observe(r.qc.vocab_matched as f64);
    }
    m.last_batch_median_genes.set(summary.median.n_genes);
    m.last_batch_median_pct_mito.set(summary.median.pct_mito);
    m.last_batch_unassigned_fraction
        .set(summary.unassigned_fraction);
    // The labels of this batch alone: an earlier batch's label does not keep its share.
    m.last_batch_label_fraction.reset();
    for (label, n) in &summary.labels {
        m.last_batch_label_fraction
            .with_label_values(&[label.as_str()])
            .set(*n as f64 / summary.cells.max(1) as f64);
    }
    let (novelty, drift) = summary
        .reference
        .as_ref()
        .map_or((0.0, 0.0), |r| (r.median_novelty, r.composition_drift));
    m.last_batch_median_novelty.set(novelty);
    m.last_batch_composition_drift.set(drift);
}

//! Batches from a NATS JetStream work queue (DESIGN.md §6, "NATS JetStream").
//!
//! Every daemon with the same `[nats]` settings pulls from one durable consumer of the work
//! stream (subjects `cellstream.batches.>`, work-queue retention), one batch at a time, with
//! explicit acks:
//! - a claimed batch is written to a scratch folder (a file as-is, a tar-packed directory
//!   unpacked, a payload in the object store downloaded), so the readers see what the spool
//!   gives them;
//! - while it is held, an in-progress ack goes out every third of `ack_wait`, so a long batch
//!   is not handed to another daemon; a daemon that dies stops sending them, and after
//!   `ack_wait` the server delivers the batch again, to whichever daemon asks;
//! - it is acked once its results are committed ([`BatchSource::finish`]); a batch whose
//!   results could not be committed is handed back with a delay (`requeue`); one that cannot
//!   be read is quarantined: its input kept in the payload bucket, an error report published
//!   on `cellstream.failed.<batch>`, then acked;
//! - a batch delivered more than `max_deliver` times (its daemons died, or could not commit)
//!   is quarantined on its next delivery without being worked on (the consumer allows one
//!   delivery more than `max_deliver` for this).

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::io::AsyncReadExt;

use super::spool::{check_name, Claimed, ErrorReport};
use super::{unix_seconds, BatchSource};
use crate::daemon::log;
use crate::nats::{header, subject_token, Link, FAILED_PREFIX, WORK_PREFIX};

/// How long one pull request waits for a batch.
const CLAIM_WAIT: Duration = Duration::from_secs(1);
/// How long an acknowledgement (or a report's publication) may take.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// A delivery this daemon holds.
struct Held {
    /// The message (its payload taken out): acks go through it.
    msg: jetstream::Message,
    /// Its scratch folder.
    dir: PathBuf,
    /// The payload's object in the bucket, when it came that way.
    object: Option<String>,
    /// The payload as it came in the message, kept in case it is quarantined.
    inline: Option<Bytes>,
    packing: Option<String>,
    seq: u64,
    delivered: i64,
}

/// Counters the source updates.
pub struct Counters {
    /// `cellstream_nats_redeliveries_total`.
    pub redeliveries: prometheus::IntCounter,
    /// `cellstream_batches_total{outcome="failed"}`, for batches quarantined at the claim.
    pub failed: prometheus::IntCounter,
}

pub struct NatsSource {
    link: Arc<Link>,
    scratch: PathBuf,
    consumer: Mutex<Option<PullConsumer>>,
    held: Arc<Mutex<HashMap<PathBuf, Held>>>,
    counters: Counters,
    ticker: tokio::task::JoinHandle<()>,
}

/// Why a delivery cannot be materialised.
enum Unusable {
    /// The payload is bad: quarantine it (kind, message).
    Quarantine(&'static str, String),
    /// The server or the disk failed: hand it back and try again later.
    Retry(String),
}

impl NatsSource {
    /// A source on `link`; claimed payloads go under `$TMPDIR/cellstream-nats-<pid>/`
    /// (private under systemd's `PrivateTmp=`), removed when the source is dropped.
    pub fn new(link: Arc<Link>, counters: Counters) -> io::Result<NatsSource> {
        let scratch = std::env::temp_dir().join(format!("cellstream-nats-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", scratch.display())))?;
        let held: Arc<Mutex<HashMap<PathBuf, Held>>> = Arc::default();
        let period = (link.config.ack_wait() / 3).max(Duration::from_millis(300));
        let ticker = link.spawn({
            let held = held.clone();
            async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let msgs: Vec<jetstream::Message> = held
                        .lock()
                        .unwrap()
                        .values()
                        .map(|h| h.msg.clone())
                        .collect();
                    for m in msgs {
                        // Lost when disconnected: the batch may then be redelivered, and the
                        // results check in sink::nats keeps its records once each.
                        let _ = m.ack_with(AckKind::Progress).await;
                    }
                }
            }
        });
        Ok(NatsSource {
            link,
            scratch,
            consumer: Mutex::new(None),
            held,
            counters,
            ticker,
        })
    }

    /// The consumer, set up on first use (the streams and the durable consumer created when
    /// missing); `None` while that fails, with [`crate::nats::Health`] saying why.
    fn consumer(&self) -> Option<PullConsumer> {
        let mut slot = self.consumer.lock().unwrap();
        if let Some(c) = &*slot {
            return Some(c.clone());
        }
        match self.link.block_on(self.set_up()) {
            Ok(c) => {
                self.link.health.set_problem(None);
                log::info(&format!(
                    "NATS: taking batches from stream {} (consumer {}, ack_wait {:?}, max_deliver {})",
                    self.link.names.work,
                    self.link.config.consumer,
                    self.link.config.ack_wait(),
                    self.link.config.max_deliver
                ));
                *slot = Some(c.clone());
                Some(c)
            }
            Err(e) => {
                let problem = format!("setting up JetStream: {e:#}");
                if self.link.health.problem().as_deref() != Some(problem.as_str()) {
                    log::error(&format!("NATS: {problem}; retrying"));
                }
                self.link.health.set_problem(Some(problem));
                None
            }
        }
    }

    async fn set_up(&self) -> anyhow::Result<PullConsumer> {
        let cfg = &self.link.config;
        let stream = self.link.work_stream().await?;
        let (_, warning) = self.link.results_stream().await?;
        if let Some(w) = warning {
            log::warn(&w);
        }
        let want = pull::Config {
            durable_name: Some(cfg.consumer.clone()),
            description: Some("cellstream daemons".into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: cfg.ack_wait(),
            // One more than allowed: the delivery that quarantines.
            max_deliver: i64::from(cfg.max_deliver) + 1,
            filter_subject: format!("{WORK_PREFIX}>"),
            ..Default::default()
        };
        match stream.create_consumer(want.clone()).await {
            Ok(c) => Ok(c),
            Err(create) => {
                let mut existing: PullConsumer = stream
                    .get_consumer(&cfg.consumer)
                    .await
                    .map_err(|_| anyhow::anyhow!("creating consumer {}: {create}", cfg.consumer))?;
                let have = existing.info().await?.config.clone();
                if have.ack_wait == want.ack_wait
                    && have.max_deliver == want.max_deliver
                    && have.filter_subject == want.filter_subject
                {
                    Ok(existing)
                } else {
                    anyhow::bail!(
                        "consumer {} of stream {} exists with ack_wait {:?}, max_deliver {} and filter {:?}, and this daemon's [nats] asks for {:?}, {} and {:?}: daemons sharing a consumer need the same settings (or give these another consumer name)",
                        cfg.consumer,
                        self.link.names.work,
                        have.ack_wait,
                        have.max_deliver - 1,
                        have.filter_subject,
                        want.ack_wait,
                        cfg.max_deliver,
                        want.filter_subject
                    )
                }
            }
        }
    }

    /// Takes a delivered message: registers it (in-progress acks start), writes its payload
    /// to scratch, and returns the claim; `None` when it was quarantined or handed back.
    fn take(&self, mut msg: jetstream::Message) -> io::Result<Option<Claimed>> {
        let info = msg.info().map_err(io::Error::other)?;
        let (seq, delivered) = (info.stream_sequence, info.delivered);
        let payload = std::mem::take(&mut msg.message.payload);
        let headers = msg.message.headers.clone().unwrap_or_default();
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
        let from_subject = msg.message.subject.as_str().strip_prefix(WORK_PREFIX);
        let name = get(header::FILE)
            .filter(|n| check_name(n).is_ok())
            .or_else(|| {
                from_subject
                    .filter(|n| check_name(n).is_ok())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| format!("batch-{seq}"));
        let batch_id = get(header::BATCH)
            .filter(|n| check_name(n).is_ok())
            .unwrap_or_else(|| crate::batch::batch_id_of(Path::new(&name)));
        if delivered > 1 {
            self.counters.redeliveries.inc();
        }
        let dir = self.scratch.join(format!("{seq}-{delivered}"));
        let object = get(header::OBJECT);
        let claimed = Claimed {
            path: dir.join(&name),
            name: OsString::from(&name),
            batch_id,
            claimed_at: Instant::now(),
        };
        let held = Held {
            msg,
            dir,
            inline: object.is_none().then_some(payload),
            object,
            packing: get(header::PACKING),
            seq,
            delivered,
        };
        let max_deliver = i64::from(self.link.config.max_deliver);
        log::info(&format!(
            "{name}: claimed from NATS (stream sequence {seq}, delivery {delivered} of at most {max_deliver})"
        ));
        let materialise = (delivered <= max_deliver).then(|| self.materialise(&claimed, &held));
        self.held.lock().unwrap().insert(claimed.path.clone(), held);
        let (stage, kind, error) = match materialise {
            Some(Ok(())) => return Ok(Some(claimed)),
            Some(Err(Unusable::Retry(why))) => {
                log::warn(&format!("{name}: cannot fetch its payload now ({why}); handing it back"));
                self.settle(&claimed, Settle::Nak(self.retry_delay(delivered)));
                return Ok(None);
            }
            Some(Err(Unusable::Quarantine(kind, error))) => ("claim", kind, error),
            None => (
                "claim",
                "max_deliver",
                format!(
                    "{name}: delivered {delivered} times without its results being committed (nats.max_deliver = {max_deliver}): each daemon that took it stopped, lost the server, or could not commit its results within ack_wait ({:?}); set aside so that it stops no more daemons",
                    self.link.config.ack_wait()
                ),
            ),
        };
        log::warn(&format!("{name}: quarantined ({stage} failed): {error}"));
        let report = ErrorReport {
            batch: claimed.batch_id.clone(),
            file: name.clone(),
            stage,
            kind: kind.to_string(),
            error,
            failed_at: unix_seconds(),
        };
        match self.quarantine(&claimed, &report) {
            Ok(()) => self.counters.failed.inc(),
            Err(e) => log::error(&format!("{name}: cannot quarantine it ({e}); handed back")),
        }
        Ok(None)
    }

    /// Writes the payload where `claimed.path` says: a file as-is, a tar stream unpacked
    /// into a directory, from the message or from the bucket.
    fn materialise(&self, claimed: &Claimed, held: &Held) -> Result<(), Unusable> {
        let io_err = |e: io::Error| Unusable::Retry(format!("scratch folder: {e}"));
        let name = claimed.name.to_string_lossy();
        let tar = match held.packing.as_deref() {
            None | Some("file") => false,
            Some("tar") => true,
            Some(other) => {
                return Err(Unusable::Quarantine(
                    "unknown_packing",
                    format!(
                        "{name}: {} {other:?} is neither \"file\" nor \"tar\"",
                        header::PACKING
                    ),
                ))
            }
        };
        std::fs::create_dir_all(&held.dir).map_err(io_err)?;
        let bytes_at = held.dir.join(".payload");
        let source: Either = match (&held.inline, &held.object) {
            (Some(bytes), _) => Either::Bytes(bytes.clone()),
            (None, Some(object)) => {
                self.download(object, &bytes_at)?;
                Either::File(bytes_at.clone())
            }
            (None, None) => unreachable!("a delivery has a payload or an object"),
        };
        let result = if tar {
            let target = &claimed.path;
            std::fs::create_dir_all(target).map_err(io_err)?;
            let unpacked = match &source {
                Either::Bytes(b) => unpack_flat(&b[..], target),
                Either::File(p) => std::fs::File::open(p).and_then(|f| unpack_flat(f, target)),
            };
            unpacked.map_err(|e| {
                Unusable::Quarantine(
                    "corrupt",
                    format!("{name}: not a tar stream of a flat folder ({e})"),
                )
            })
        } else {
            match &source {
                Either::Bytes(b) => std::fs::write(&claimed.path, b).map_err(io_err),
                Either::File(p) => std::fs::rename(p, &claimed.path).map_err(io_err),
            }
        };
        let _ = std::fs::remove_file(&bytes_at);
        result
    }

    /// Streams `object` from the bucket into `to`.
    fn download(&self, object: &str, to: &Path) -> Result<(), Unusable> {
        let bucket = &self.link.names.bucket;
        self.link.block_on(async {
            let store = self
                .link
                .payloads()
                .await
                .map_err(|e| Unusable::Retry(format!("{e:#}")))?;
            let mut obj = match store.get(object).await {
                Ok(o) => o,
                Err(e)
                    if e.kind() == async_nats::jetstream::object_store::GetErrorKind::NotFound =>
                {
                    return Err(Unusable::Quarantine(
                        "payload_missing",
                        format!(
                            "object {object:?} is not in bucket {bucket} (deleted, or expired)"
                        ),
                    ))
                }
                Err(e) => return Err(Unusable::Retry(format!("getting object {object:?}: {e}"))),
            };
            let mut file = std::fs::File::create(to)
                .map_err(|e| Unusable::Retry(format!("{}: {e}", to.display())))?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = obj
                    .read(&mut buf)
                    .await
                    .map_err(|e| Unusable::Retry(format!("reading object {object:?}: {e}")))?;
                if n == 0 {
                    break;
                }
                file.write_all(&buf[..n])
                    .map_err(|e| Unusable::Retry(format!("{}: {e}", to.display())))?;
            }
            Ok(())
        })
    }

    fn retry_delay(&self, delivered: i64) -> Duration {
        Duration::from_secs(1 << delivered.clamp(0, 6)).min(self.link.config.ack_wait())
    }

    /// Forgets a delivery, acking or handing it back as `how` says; removes its scratch.
    fn settle(&self, claimed: &Claimed, how: Settle) -> Option<io::Result<()>> {
        let held = self.held.lock().unwrap().remove(&claimed.path)?;
        let _ = std::fs::remove_dir_all(&held.dir);
        let msg = held.msg;
        let result = self.link.block_on(async move {
            let sent = match how {
                Settle::Ack => tokio::time::timeout(ACK_TIMEOUT, msg.double_ack()).await,
                Settle::Nak(delay) => {
                    tokio::time::timeout(ACK_TIMEOUT, msg.ack_with(AckKind::Nak(Some(delay)))).await
                }
            };
            match sent {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(io::Error::other(format!("acknowledging it to NATS: {e}"))),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "acknowledging it to NATS: no answer",
                )),
            }
        });
        Some(result)
    }

    fn not_held(claimed: &Claimed) -> io::Error {
        io::Error::other(format!(
            "{}: not a batch this daemon holds from NATS",
            claimed.name.to_string_lossy()
        ))
    }
}

enum Either {
    Bytes(Bytes),
    File(PathBuf),
}

enum Settle {
    Ack,
    Nak(Duration),
}

/// The error report published on `cellstream.failed.<batch>`: the spool's
/// `failed/<name>.error.json` fields, and where the input is kept.
#[derive(Serialize)]
struct PublishedReport<'a> {
    #[serde(flatten)]
    report: &'a ErrorReport,
    /// The work stream's sequence number of the batch.
    stream_sequence: u64,
    /// Times it was delivered, this one included.
    deliveries: i64,
    /// `<bucket>/<object>` holding the input as it was sent.
    input: Option<String>,
}

impl BatchSource for NatsSource {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn claim(&self) -> io::Result<Option<Claimed>> {
        if !self.link.health.wait_connected(Duration::from_millis(500)) {
            return Ok(None);
        }
        let Some(consumer) = self.consumer() else {
            std::thread::sleep(Duration::from_secs(2));
            return Ok(None);
        };
        let next = self.link.block_on(async {
            let mut batch = consumer
                .batch()
                .max_messages(1)
                .expires(CLAIM_WAIT)
                .messages()
                .await
                .map_err(|e| e.to_string())?;
            match tokio::time::timeout(CLAIM_WAIT + Duration::from_secs(5), batch.next()).await {
                Ok(Some(Ok(msg))) => Ok(Some(msg)),
                Ok(Some(Err(e))) => Err(e.to_string()),
                Ok(None) | Err(_) => Ok(None),
            }
        });
        match next {
            Ok(Some(msg)) => self.take(msg),
            Ok(None) => Ok(None),
            Err(e) => {
                if self.link.health.is_connected() {
                    log::warn(&format!("NATS: pulling a batch: {e}"));
                    // The stream or consumer may have gone (a server without its store):
                    // set them up again.
                    *self.consumer.lock().unwrap() = None;
                }
                std::thread::sleep(Duration::from_secs(1));
                Ok(None)
            }
        }
    }

    fn finish(&self, batch: &Claimed) -> io::Result<()> {
        let object = {
            let held = self.held.lock().unwrap();
            held.get(&batch.path).and_then(|h| h.object.clone())
        };
        self.settle(batch, Settle::Ack)
            .unwrap_or_else(|| Err(Self::not_held(batch)))?;
        if let Some(object) = object {
            // Acked: the payload is no longer needed. A crash here leaves it in the bucket.
            let deleted = self.link.block_on(async {
                let store = self.link.payloads().await?;
                store.delete(&object).await?;
                anyhow::Ok(())
            });
            if let Err(e) = deleted {
                log::warn(&format!(
                    "{}: acknowledged, but its payload object {object:?} could not be deleted: {e:#}",
                    batch.batch_id
                ));
            }
        }
        Ok(())
    }

    fn requeue(&self, batch: &Claimed) -> io::Result<()> {
        let delivered = {
            let held = self.held.lock().unwrap();
            held.get(&batch.path).map_or(1, |h| h.delivered)
        };
        self.settle(batch, Settle::Nak(self.retry_delay(delivered)))
            .unwrap_or_else(|| Err(Self::not_held(batch)))
    }

    fn quarantine(&self, batch: &Claimed, report: &ErrorReport) -> io::Result<()> {
        let (seq, delivered, inline, object) = {
            let held = self.held.lock().unwrap();
            let h = held.get(&batch.path).ok_or_else(|| Self::not_held(batch))?;
            (h.seq, h.delivered, h.inline.clone(), h.object.clone())
        };
        let bucket = self.link.names.bucket.clone();
        let kept = self.link.block_on(async {
            // Keep the input first, then say so, then ack: a crash in between leaves the
            // batch to be delivered (and reported) again.
            let object = match (object, inline) {
                (Some(object), _) => object,
                (None, Some(bytes)) => {
                    let name = format!("failed/{}/{seq}", subject_token(&batch.batch_id));
                    let store = self.link.payloads().await?;
                    let mut meta =
                        async_nats::jetstream::object_store::ObjectMetadata::from(name.as_str());
                    meta.chunk_size = Some(chunk_size(self.link.max_payload()));
                    store.put(meta, &mut &bytes[..]).await?;
                    name
                }
                (None, None) => unreachable!("a delivery has a payload or an object"),
            };
            let json = serde_json::to_vec(&PublishedReport {
                report,
                stream_sequence: seq,
                deliveries: delivered,
                input: Some(format!("{bucket}/{object}")),
            })?;
            let subject = format!("{FAILED_PREFIX}{}", subject_token(&batch.batch_id));
            let publish = jetstream::message::PublishMessage::build()
                .payload(json.into())
                .message_id(format!("{}/error/{seq}", subject_token(&batch.batch_id)));
            let ack = self.link.js.send_publish(subject, publish).await?;
            tokio::time::timeout(ACK_TIMEOUT, ack).await??;
            anyhow::Ok(())
        });
        match kept {
            Ok(()) => self
                .settle(batch, Settle::Ack)
                .unwrap_or_else(|| Err(Self::not_held(batch))),
            Err(e) => {
                self.settle(batch, Settle::Nak(self.retry_delay(delivered)));
                Err(io::Error::other(format!(
                    "publishing its error report or keeping its input: {e:#}"
                )))
            }
        }
    }

    fn release(&self, batch: &Claimed) {
        self.settle(batch, Settle::Nak(Duration::ZERO));
    }
}

impl Drop for NatsSource {
    fn drop(&mut self) {
        self.ticker.abort();
        // Hand back what was claimed and never worked on: another daemon takes it at once.
        let held: Vec<Held> = self.held.lock().unwrap().drain().map(|(_, h)| h).collect();
        if !held.is_empty() {
            self.link.block_on(async {
                for h in held {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        h.msg.ack_with(AckKind::Nak(None)),
                    )
                    .await;
                }
            });
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// Object store chunks that fit under the server's message limit (headers need a little).
pub fn chunk_size(max_payload: usize) -> usize {
    (128 << 10)
        .min(max_payload.saturating_sub(4 << 10))
        .max(1 << 10)
}

/// Unpacks a tar stream of regular files with plain names (a 10x MTX folder packed by
/// `cellstream submit`, or `tar -C DIR -cf - .`) into `dir`. Anything else — a subfolder, a
/// link, a device, a name that is not a plain file name — is refused.
pub fn unpack_flat(reader: impl io::Read, dir: &Path) -> io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    let mut files = 0usize;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let mut parts = path
            .components()
            .filter(|c| *c != std::path::Component::CurDir);
        let kind = entry.header().entry_type();
        let Some(first) = parts.next() else {
            if kind.is_dir() {
                continue; // "./"
            }
            return Err(io::Error::other("an entry without a name"));
        };
        let name = first.as_os_str().to_string_lossy().into_owned();
        if parts.next().is_some() || check_name(&name).is_err() {
            return Err(io::Error::other(format!(
                "{}: only plain file names, no subfolders",
                path.display()
            )));
        }
        if !kind.is_file() {
            return Err(io::Error::other(format!(
                "{name}: only regular files (this entry is {kind:?})"
            )));
        }
        let mut out = std::fs::File::create(dir.join(&name))?;
        io::copy(&mut entry, &mut out)?;
        files += 1;
    }
    if files == 0 {
        return Err(io::Error::other("no files"));
    }
    Ok(())
}

/// Packs the regular files of `dir` (no subfolders) as a tar stream: what
/// [`unpack_flat`] reads back.
pub fn pack_flat(dir: &Path, out: impl Write) -> io::Result<()> {
    let mut builder = tar::Builder::new(out);
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let meta = std::fs::metadata(entry.path())?;
        if !meta.is_file() {
            return Err(io::Error::other(format!(
                "{}: a folder sent as a batch holds only regular files",
                entry.path().display()
            )));
        }
        builder.append_path_with_name(entry.path(), &name)?;
    }
    builder.into_inner()?.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_packs_and_unpacks_flat() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("matrix.mtx"), b"m").unwrap();
        std::fs::write(src.join("barcodes.tsv"), b"b").unwrap();
        let mut tar = Vec::new();
        pack_flat(&src, &mut tar).unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        unpack_flat(&tar[..], &out).unwrap();
        assert_eq!(std::fs::read(out.join("matrix.mtx")).unwrap(), b"m");
        assert_eq!(std::fs::read(out.join("barcodes.tsv")).unwrap(), b"b");

        std::fs::create_dir(src.join("sub")).unwrap();
        assert!(pack_flat(&src, &mut Vec::new()).is_err());
    }

    #[test]
    fn a_tar_stream_with_paths_or_links_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let evil = |name: &str, kind: tar::EntryType| {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(if kind.is_file() { 1 } else { 0 });
            h.set_mode(0o644);
            b.append_data(
                &mut h,
                name,
                if kind.is_file() { &b"x"[..] } else { &b""[..] },
            )
            .unwrap();
            b.into_inner().unwrap()
        };
        for (name, kind) in [
            ("sub/matrix.mtx", tar::EntryType::Regular),
            ("link", tar::EntryType::Symlink),
            ("fifo", tar::EntryType::Fifo),
        ] {
            let out = tmp.path().join(name.replace('/', "_"));
            std::fs::create_dir(&out).unwrap();
            assert!(unpack_flat(&evil(name, kind)[..], &out).is_err(), "{name}");
        }
        assert!(unpack_flat(&b"not a tar"[..], tmp.path()).is_err());
    }

    #[test]
    fn chunks_fit_the_message_limit() {
        assert_eq!(chunk_size(1 << 20), 128 << 10);
        assert_eq!(chunk_size(64 << 10), 60 << 10);
    }
}

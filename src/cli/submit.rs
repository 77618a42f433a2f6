//! `cellstream submit --nats URL [--name NAME] INPUT...`: sends each input, as it is, as one
//! batch to the daemons' JetStream work stream, and waits for the server's acknowledgement.
//!
//! A file goes as its bytes (any format cellstream reads; the daemon detects it from the
//! content); a directory (a 10x MTX folder) goes as a tar stream of its regular files
//! (`Cellstream-Packing: tar`; what `tar -C DIR -cf - .` writes). A payload larger than the
//! server's message limit goes to the payload bucket (JetStream's object store) and the
//! message names it (`Cellstream-Object`). The message's `Nats-Msg-Id` is the batch name, so
//! a submission repeated within the stream's duplicate window is dropped by the server.
//! One JSON line per input on stdout; an input that could not be sent is named on stderr,
//! and the exit code is then non-zero (2: an unusable input or name, found before anything
//! is sent; 1: the server refused or did not answer).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::object_store::ObjectMetadata;
use async_nats::HeaderMap;
use bytes::Bytes;
use cellstream::config::NatsConfig;
use cellstream::nats::{header, subject_token, Link, WORK_PREFIX};
use cellstream::source::nats::{chunk_size, pack_flat};
use cellstream::source::spool::check_name;

use super::UsageError;

#[derive(clap::Args)]
pub struct Args {
    /// Batches to send, one batch each: a file in any readable format, or a folder (a 10x
    /// MTX directory, sent as a tar stream of its files).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// The NATS server: nats://host:4222 (tls://… for TLS; several separated by commas).
    #[arg(long, value_name = "URL")]
    nats: String,
    /// The batch's name, its id in every record (one INPUT only). Default: the input's batch
    /// id, its file name without format extensions.
    #[arg(long)]
    name: Option<String>,
    /// The daemons' work stream (`[nats] stream`).
    #[arg(long, default_value = "CELLSTREAM")]
    stream: String,
    /// A NATS credentials file (`[nats] credentials_file`).
    #[arg(long, value_name = "FILE")]
    credentials_file: Option<PathBuf>,
    /// PEM CA certificates that verify a TLS server (`[nats] tls_ca_file`).
    #[arg(long, value_name = "FILE")]
    tls_ca_file: Option<PathBuf>,
}

/// One input, checked: what is sent, and under which names.
struct Batch {
    input: PathBuf,
    /// The batch id (`Cellstream-Batch`, the subject's last part, the message id).
    id: String,
    /// The input's own name (`Cellstream-File`).
    file: String,
    folder: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.name.is_some() && args.inputs.len() > 1 {
        return Err(UsageError(format!(
            "--name names one batch; {} inputs were given",
            args.inputs.len()
        ))
        .into());
    }
    let batches = args
        .inputs
        .iter()
        .map(|input| check_input(input, args.name.as_deref()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ids = BTreeSet::new();
    for b in &batches {
        if !ids.insert(&b.id) {
            return Err(UsageError(format!(
                "{}: batch id {:?} is given twice; every batch needs its own (--name)",
                b.input.display(),
                b.id
            ))
            .into());
        }
    }

    let mut cfg = NatsConfig::with_url(&args.nats);
    cfg.stream = args.stream.clone();
    cfg.credentials_file = args.credentials_file.clone();
    cfg.tls_ca_file = args.tls_ca_file.clone();
    let all = || {
        batches
            .iter()
            .map(|b| b.input.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let link = Link::connect(&cfg, None).with_context(|| format!("not submitted: {}", all()))?;
    link.block_on(link.work_stream())
        .with_context(|| format!("the work stream {}", link.names.work))
        .with_context(|| format!("not submitted: {}", all()))?;

    let mut failed = Vec::new();
    let mut stdout = std::io::stdout().lock();
    for b in &batches {
        match link.block_on(send(&link, b)) {
            Ok(line) => {
                writeln!(stdout, "{line}")?;
                stdout.flush()?;
            }
            Err(e) => {
                eprintln!(
                    "cellstream: error: {}: not submitted: {e:#}",
                    b.input.display()
                );
                failed.push(b.input.display().to_string());
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "{} of {} input(s) not submitted: {}",
            failed.len(),
            batches.len(),
            failed.join(", ")
        )
    }
}

fn check_input(input: &Path, name: Option<&str>) -> Result<Batch, UsageError> {
    let bad = |why: String| UsageError(format!("{}: {why}", input.display()));
    let meta = std::fs::metadata(input).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() && !meta.is_dir() {
        return Err(bad("neither a file nor a folder".into()));
    }
    let file = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id = match name {
        Some(n) => n.to_string(),
        None => cellstream::batch::batch_id_of(input),
    };
    check_name(&id).map_err(|e| bad(format!("batch name {id:?}: {e} (--name)")))?;
    if subject_token(&id) != id {
        return Err(bad(format!(
            "batch name {id:?}: a NATS subject cannot hold it (a leading or trailing '.', or two in a row) (--name)"
        )));
    }
    let file = if check_name(&file).is_ok() {
        file
    } else {
        id.clone()
    };
    Ok(Batch {
        input: input.to_path_buf(),
        id,
        file,
        folder: meta.is_dir(),
    })
}

/// Sends one batch and waits for the server's acknowledgement; the JSON line to print.
async fn send(link: &Link, b: &Batch) -> anyhow::Result<String> {
    // A folder is packed into a temporary file first: its size decides the route.
    let packed = b.folder.then(|| {
        std::env::temp_dir().join(format!(
            ".cellstream-submit-{}-{}.tar",
            std::process::id(),
            b.id
        ))
    });
    let result = async {
        let path = match &packed {
            Some(tar) => {
                let out = std::fs::File::create(tar)
                    .with_context(|| format!("creating {}", tar.display()))?;
                pack_flat(&b.input, std::io::BufWriter::new(out))
                    .with_context(|| format!("packing the folder as {}", tar.display()))?;
                tar.clone()
            }
            None => b.input.clone(),
        };
        send_file(link, b, &path).await
    }
    .await;
    if let Some(tar) = packed {
        let _ = std::fs::remove_file(tar);
    }
    result
}

async fn send_file(link: &Link, b: &Batch, path: &Path) -> anyhow::Result<String> {
    let size = std::fs::metadata(path)?.len();
    let mut headers = HeaderMap::new();
    headers.insert(header::BATCH, b.id.as_str());
    headers.insert(header::FILE, b.file.as_str());
    headers.insert(header::PACKING, if b.folder { "tar" } else { "file" });
    // Headers and framing take a little of the message limit.
    let limit = link.max_payload().saturating_sub(4 << 10) as u64;
    let mut object = None;
    let payload = if size <= limit {
        Bytes::from(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
    } else {
        let name = format!(
            "{}/{}-{}",
            b.id,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            std::process::id()
        );
        let store = link.payloads().await?;
        let mut meta = ObjectMetadata::from(name.as_str());
        meta.chunk_size = Some(chunk_size(link.max_payload()));
        let mut file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        store
            .put(meta, &mut file)
            .await
            .with_context(|| format!("storing the payload in bucket {}", link.names.bucket))?;
        headers.insert(header::OBJECT, name.as_str());
        object = Some((store, name));
        Bytes::new()
    };
    let publish = Publish::build()
        .headers(headers)
        .payload(payload)
        .message_id(&b.id);
    let sent = async {
        let ack = link
            .js
            .send_publish(format!("{WORK_PREFIX}{}", b.id), publish)
            .await?;
        let ack = tokio::time::timeout(Duration::from_secs(30), ack)
            .await
            .map_err(|_| anyhow::anyhow!("no acknowledgement from JetStream in 30 s"))??;
        anyhow::Ok(ack)
    }
    .await;
    let ack = match sent {
        Ok(ack) => ack,
        Err(e) => {
            if let Some((store, name)) = &object {
                let _ = store.delete(name).await;
            }
            return Err(e.context(format!("publishing to {}", link.names.work)));
        }
    };
    if ack.duplicate {
        // Sent before within the duplicate window: that earlier message stands.
        if let Some((store, name)) = &object {
            let _ = store.delete(name).await;
        }
    }
    Ok(serde_json::json!({
        "batch": b.id,
        "input": b.input.display().to_string(),
        "bytes": size,
        "via": if object.is_some() { "object_store" } else { "message" },
        "stream": ack.stream,
        "sequence": ack.sequence,
        "duplicate": ack.duplicate,
    })
    .to_string())
}

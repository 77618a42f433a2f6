//! Results on NATS JetStream (DESIGN.md §6, "NATS JetStream"): every cell record (the §5
//! NDJSON record, one per message, without its newline) on `cellstream.results.<batch>`, in
//! input order, then the batch's summary record last on the same subject, each with a
//! `Nats-Msg-Id` of `<batch>/<index>` or `<batch>/summary`, in the results stream.
//!
//! Exactly once as consumers see it, however often a batch is done:
//! - before publishing, the sink reads the last message the stream holds on the batch's
//!   subject. Its summary: the batch was published whole by an earlier attempt, nothing is
//!   published again. A cell record `<batch>/<k>`, with `k + 1` messages on the subject: an
//!   earlier attempt stopped after record `k` (records are published in order, each awaited
//!   before the summary), and only the rest is published;
//! - attempts that overlap in time (a daemon cut off from the server while another redoes
//!   its batch) publish the same message ids, which the server drops as duplicates within the
//!   stream's duplicate window (`nats::duplicate_window`).

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use bytes::Bytes;
use futures_util::TryStreamExt;

use super::summary::BatchSummary;
use super::{Outgoing, ResultSink};
use crate::nats::{results_subject, subject_token, Link, PUBLISH_WINDOW};

pub struct NatsSink {
    link: Arc<Link>,
    stream: Option<Stream>,
    /// The current batch's results were already complete on the stream.
    complete: bool,
    warn: fn(&str),
}

/// Where an attempt starts, given what the stream holds for the batch.
#[derive(Debug, PartialEq, Eq)]
enum Resume {
    /// Publish records from this index on, then the summary.
    From(usize),
    /// The summary is there: nothing to publish.
    Complete,
}

impl NatsSink {
    /// A sink on `link`; `warn` logs what an operator should hear of.
    pub fn new(link: Arc<Link>, warn: fn(&str)) -> NatsSink {
        NatsSink {
            link,
            stream: None,
            complete: false,
            warn,
        }
    }

    async fn stream(&mut self) -> anyhow::Result<Stream> {
        if let Some(s) = &self.stream {
            return Ok(s.clone());
        }
        let (stream, warning) = self.link.results_stream().await?;
        if let Some(w) = warning {
            (self.warn)(&w);
        }
        self.stream = Some(stream.clone());
        Ok(stream)
    }

    async fn publish_records(&mut self, batch: &Outgoing<'_>) -> anyhow::Result<()> {
        let stream = self.stream().await?;
        let subject = results_subject(batch.batch_id);
        let token = subject_token(batch.batch_id);
        let from = match resume_point(&stream, &subject, &token).await {
            Ok(Resume::Complete) => {
                self.complete = true;
                return Ok(());
            }
            Ok(Resume::From(k)) => k,
            Err(e) => {
                self.stream = None; // looked up again next time (the stream may be new)
                return Err(e);
            }
        };
        if from > 0 {
            (self.warn)(&format!(
                "{}: an earlier attempt published records 0..{from} on {subject}; publishing the rest",
                batch.batch_id
            ));
        }
        let subject = async_nats::Subject::from(subject);
        let mut pending = VecDeque::with_capacity(PUBLISH_WINDOW);
        let lines = batch
            .records
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty());
        for (index, line) in lines.enumerate().skip(from) {
            let publish = Publish::build()
                .payload(Bytes::copy_from_slice(line))
                .message_id(format!("{token}/{index}"));
            pending.push_back(self.link.js.send_publish(subject.clone(), publish).await?);
            if pending.len() >= PUBLISH_WINDOW {
                pending.pop_front().expect("not empty").await?;
            }
        }
        for ack in pending {
            ack.await?;
        }
        Ok(())
    }
}

/// Reads what the stream holds on `subject` for the batch whose id is `token`.
async fn resume_point(stream: &Stream, subject: &str, token: &str) -> anyhow::Result<Resume> {
    let last = match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => m,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
            return Ok(Resume::From(0))
        }
        Err(e) => return Err(e.into()),
    };
    let id = last
        .headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    let Some(rest) = id.strip_prefix(token).and_then(|r| r.strip_prefix('/')) else {
        return Ok(Resume::From(0));
    };
    if rest == "summary" {
        return Ok(Resume::Complete);
    }
    let Ok(last_index) = rest.parse::<usize>() else {
        return Ok(Resume::From(0));
    };
    let mut info = stream.info_with_subjects(subject).await?;
    let mut count = 0;
    while let Some((s, n)) = info.try_next().await? {
        if s == subject {
            count = n;
        }
    }
    // A gap (a record lost while later ones were stored) would break the prefix: publish
    // everything again and let the duplicate window drop what is there.
    Ok(Resume::From(if count == last_index + 1 {
        last_index + 1
    } else {
        0
    }))
}

fn io_error(what: &str, e: anyhow::Error) -> io::Error {
    io::Error::other(format!("{what} on NATS: {e:#}"))
}

impl ResultSink for NatsSink {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn records(&mut self, batch: &Outgoing) -> io::Result<()> {
        self.complete = false;
        let link = self.link.clone();
        link.block_on(self.publish_records(batch))
            .map_err(|e| io_error("publishing the records", e))
    }

    fn summary(&mut self, batch: &Outgoing, _: &BatchSummary, json: &[u8]) -> io::Result<()> {
        if self.complete {
            return Ok(());
        }
        let token = subject_token(batch.batch_id);
        let publish = Publish::build()
            .payload(Bytes::copy_from_slice(json))
            .message_id(format!("{token}/summary"));
        let subject = results_subject(batch.batch_id);
        self.link
            .block_on(async {
                self.link.js.send_publish(subject, publish).await?.await?;
                anyhow::Ok(())
            })
            .map_err(|e| io_error("publishing the summary", e))
    }
}

//! The live stream behind `GET /v1/stream`: each committed batch's records, fanned out to
//! every connected client. A client that falls more than the buffer behind is told how many
//! batches it missed instead of holding the daemon's memory.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::broadcast;

use super::summary::BatchSummary;
use super::{Outgoing, Phase, ResultSink};

/// One committed batch as the stream carries it: its NDJSON cell records, then its summary
/// line.
#[derive(Debug)]
pub struct StreamBatch {
    pub ndjson: Bytes,
}

/// Fan-out of committed batches; cheap to clone.
#[derive(Clone)]
pub struct StreamHub {
    tx: broadcast::Sender<Arc<StreamBatch>>,
}

impl StreamHub {
    /// A hub that buffers up to `batches` batches for a slow client.
    pub fn new(batches: usize) -> StreamHub {
        StreamHub {
            tx: broadcast::channel(batches.max(1)).0,
        }
    }

    /// Sends a batch to every client connected now (none is fine).
    pub fn publish(&self, batch: StreamBatch) {
        let _ = self.tx.send(Arc::new(batch));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StreamBatch>> {
        self.tx.subscribe()
    }
}

/// The live stream is told of a batch once its source is acknowledged, best effort: its cell
/// records, then its summary line, as one message.
impl ResultSink for StreamHub {
    fn name(&self) -> &'static str {
        "stream"
    }

    fn phase(&self) -> Phase {
        Phase::Notify
    }

    fn records(&mut self, _: &Outgoing) -> std::io::Result<()> {
        Ok(())
    }

    fn summary(&mut self, batch: &Outgoing, _: &BatchSummary, json: &[u8]) -> std::io::Result<()> {
        let mut ndjson = Vec::with_capacity(batch.records.len() + json.len() + 1);
        ndjson.extend_from_slice(batch.records);
        ndjson.extend_from_slice(json);
        ndjson.push(b'\n');
        self.publish(StreamBatch {
            ndjson: ndjson.into(),
        });
        Ok(())
    }
}

/// The record a client gets in place of batches it was too slow to receive.
pub fn lagged_record(missed_batches: u64) -> Vec<u8> {
    format!("{{\"type\":\"lagged\",\"missed_batches\":{missed_batches}}}\n").into_bytes()
}

/// NDJSON lines as Server-Sent Events: `event: cell|batch|lagged`, `data: <line>`.
/// Framed here rather than by axum's `Sse`: a committed batch goes out as one buffer of all
/// its records (no line of ours holds a newline), not as one `Event` per cell.
pub fn to_sse(ndjson: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ndjson.len() + ndjson.len() / 8);
    for line in ndjson.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let event: &[u8] = if line.starts_with(b"{\"type\":\"batch\"") {
            b"batch"
        } else if line.starts_with(b"{\"type\":\"lagged\"") {
            b"lagged"
        } else {
            b"cell"
        };
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(event);
        out.extend_from_slice(b"\ndata: ");
        out.extend_from_slice(line);
        out.extend_from_slice(b"\n\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_by_record_type() {
        let sse = to_sse(b"{\"batch\":\"b\",\"cell\":\"c\"}\n{\"type\":\"batch\",\"cells\":1}\n");
        assert_eq!(
            String::from_utf8(sse).unwrap(),
            "event: cell\ndata: {\"batch\":\"b\",\"cell\":\"c\"}\n\n\
             event: batch\ndata: {\"type\":\"batch\",\"cells\":1}\n\n"
        );
    }

    #[test]
    fn a_slow_client_learns_what_it_missed() {
        let hub = StreamHub::new(2);
        let mut rx = hub.subscribe();
        for i in 0..5u8 {
            hub.publish(StreamBatch {
                ndjson: Bytes::from(vec![i]),
            });
        }
        match rx.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(n)) => assert_eq!(n, 3),
            other => panic!("expected a lag, got {other:?}"),
        }
        assert_eq!(rx.try_recv().unwrap().ndjson, Bytes::from(vec![3]));
    }
}

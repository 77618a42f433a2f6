//! Where batches come from: the spool folder (`spool`) that producers and uploads fill, and
//! (feature `runtime`) a NATS JetStream work queue shared by daemons (`nats`). The daemon's
//! pipeline sees each through [`BatchSource`].

#[cfg(feature = "runtime")]
pub mod nats;
pub mod spool;

use std::io;

pub use spool::{Claimed, ErrorReport};

/// Seconds since the Unix epoch (0 before it), as error reports and the live page give times.
pub fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A place batches come from, as the daemon's pipeline uses it. A claimed batch belongs to
/// this daemon until one of [`finish`](BatchSource::finish),
/// [`requeue`](BatchSource::requeue), [`quarantine`](BatchSource::quarantine) or
/// [`release`](BatchSource::release) settles it; a daemon that dies first leaves it to be
/// claimed again (the spool: from `processing/` at the next start; NATS: by any daemon once
/// `ack_wait` has passed).
///
/// Whatever the source, a claimed batch is a local file or directory (`Claimed::path`) that
/// the readers open as they open a spool entry.
pub trait BatchSource: Send + Sync {
    /// Its name in logs, and the name of the thread that claims from it (`spool`, `nats`).
    fn name(&self) -> &'static str;

    /// Waits a short while (a few seconds at most; less when there is work or the daemon is
    /// woken) and claims the next batch. `Ok(None)`: nothing to claim now; the caller checks
    /// whether to stop and asks again.
    fn claim(&self) -> io::Result<Option<Claimed>>;

    /// Every sink that commits has committed the batch's results: archive or acknowledge it.
    /// Never called before that, so that a crash can only cause a redo, never a loss.
    fn finish(&self, batch: &Claimed) -> io::Result<()>;

    /// Its results could not be committed (a full disk, an unreachable server): give it back
    /// to be tried again.
    fn requeue(&self, batch: &Claimed) -> io::Result<()>;

    /// It can never be processed: keep it beside `report`, and never hand it out again.
    fn quarantine(&self, batch: &Claimed, report: &ErrorReport) -> io::Result<()>;

    /// The daemon stops before working on it. The spool leaves it in `processing/` (redone
    /// first at the next start); NATS hands it back at once.
    fn release(&self, _batch: &Claimed) {}
}

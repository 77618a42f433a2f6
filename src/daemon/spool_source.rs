//! The spool folder (and the HTTP uploads that land in it) as a [`BatchSource`]: the claim
//! protocol of `source::spool`, woken by inotify, uploads and the rescan timer.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::sync::{Arc, Mutex};

use super::{log, Shared};
use crate::source::spool::{Claimed, ErrorReport, Spool};
use crate::source::BatchSource;

pub struct SpoolSource {
    shared: Arc<Shared>,
    spool: Spool,
    state: Mutex<State>,
    _watcher: Option<notify::RecommendedWatcher>,
}

struct State {
    /// What `processing/` held at start: interrupted, redone before anything else.
    interrupted: Option<VecDeque<Claimed>>,
    /// Names listed in `incoming/`, oldest first, not yet claimed.
    listed: VecDeque<OsString>,
    /// Whether to list `incoming/` again (after a wait, or at the start).
    relist: bool,
}

impl SpoolSource {
    pub fn new(shared: Arc<Shared>, spool: Spool) -> SpoolSource {
        let watcher = watch_incoming(&shared, &spool);
        SpoolSource {
            shared,
            spool,
            state: Mutex::new(State {
                interrupted: None,
                listed: VecDeque::new(),
                relist: true,
            }),
            _watcher: watcher,
        }
    }

    fn depth(&self, stage: &str, n: usize) {
        self.shared
            .metrics
            .queue_depth
            .with_label_values(&[stage])
            .set(n as i64)
    }
}

impl BatchSource for SpoolSource {
    fn name(&self) -> &'static str {
        "spool"
    }

    /// First what an earlier run left in `processing/`, then `incoming/` oldest first; when
    /// a listing is used up, waits for a wake (inotify, an upload) or `rescan_seconds`.
    fn claim(&self) -> io::Result<Option<Claimed>> {
        let mut st = self.state.lock().unwrap();
        let interrupted = st.interrupted.get_or_insert_with(|| {
            self.spool.interrupted().map_or_else(
                |e| {
                    log::error(&format!("cannot list processing/: {e}"));
                    VecDeque::new()
                },
                VecDeque::from,
            )
        });
        if let Some(c) = interrupted.pop_front() {
            log::info(&format!(
                "{}: interrupted by a stop, redoing it",
                c.path.display()
            ));
            return Ok(Some(c));
        }
        loop {
            while let Some(name) = st.listed.pop_front() {
                self.depth("incoming", st.listed.len());
                match self.spool.claim(&name) {
                    Ok(Some(c)) => return Ok(Some(c)),
                    Ok(None) => {}
                    Err(e) => log::warn(&format!("cannot claim {name:?}: {e}")),
                }
            }
            if !st.relist {
                break;
            }
            st.relist = false;
            match self.spool.waiting() {
                Ok(names) => {
                    self.depth("incoming", names.len());
                    st.listed = names.into();
                }
                Err(e) => log::error(&format!("cannot list incoming/: {e}")),
            }
        }
        st.relist = true;
        drop(st);
        let _ = self
            .shared
            .wake_rx
            .recv_timeout(self.shared.config().rescan_interval());
        Ok(None)
    }

    fn finish(&self, batch: &Claimed) -> io::Result<()> {
        self.spool.finish(batch, self.shared.config().spool.on_done)
    }

    fn requeue(&self, batch: &Claimed) -> io::Result<()> {
        self.spool.requeue(batch)
    }

    fn quarantine(&self, batch: &Claimed, report: &ErrorReport) -> io::Result<()> {
        self.spool.quarantine(batch, report)
    }
}

/// Wakes the claimer when something lands in `incoming/`; `None` (rescans only) when
/// inotify is unavailable.
fn watch_incoming(shared: &Shared, spool: &Spool) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let wake = shared.wake_tx.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        use notify::event::{EventKind, ModifyKind};
        // Only arrivals. Our own scans open the folder, and waking on that would make the
        // claimer rescan forever.
        let arrival = event.map_or(true, |e| {
            matches!(
                e.kind,
                EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(_))
            )
        });
        if arrival {
            let _ = wake.try_send(());
        }
    })
    .and_then(|mut w| {
        w.watch(&spool.incoming, notify::RecursiveMode::NonRecursive)?;
        Ok(w)
    });
    match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn(&format!(
                "cannot watch {} ({e}); relying on rescans every {:?}",
                spool.incoming.display(),
                shared.config().rescan_interval()
            ));
            None
        }
    }
}

//! systemd integration without libsystemd: `sd_notify` datagrams to `$NOTIFY_SOCKET`
//! (READY=1, WATCHDOG=1, STOPPING=1, STATUS=…), and the pipeline heartbeat that decides
//! whether the watchdog may be fed.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where notifications go; a no-op when not started by systemd.
pub struct Notifier {
    target: Option<Target>,
}

enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|s| {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(s.as_os_str()).to_vec();
            match bytes.first() {
                None => None,
                Some(b'@') => Some(Target::Abstract(bytes[1..].to_vec())),
                Some(_) => Some(Target::Path(PathBuf::from(s))),
            }
        });
        Notifier { target }
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification (`KEY=value` lines). Failures are reported, never fatal.
    pub fn notify(&self, state: &str) {
        let Some(target) = &self.target else {
            return;
        };
        let sent = UnixDatagram::unbound().and_then(|sock| match target {
            Target::Path(p) => sock.send_to(state.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)
            }
        });
        if let Err(e) = sent {
            super::log::warn(&format!("cannot notify systemd ({state:?}): {e}"));
        }
    }
}

/// The watchdog period systemd asks for (`$WATCHDOG_USEC`, for this process when
/// `$WATCHDOG_PID` is set).
pub fn watchdog_period() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_string_lossy() != std::process::id().to_string() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The pipeline stages whose progress the watchdog follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Reading, tokenizing and inference of one batch.
    Batch,
    /// Writing and committing its output.
    Emit,
}

/// Per stage: idle, or busy with the time of its last sign of progress. A stage that is busy
/// without progress for longer than the watchdog period is stuck, and then the watchdog
/// is no longer fed, so that systemd restarts the daemon (the batch is redone from
/// `processing/`).
pub struct Heartbeat {
    start: Instant,
    /// 0 = idle; otherwise milliseconds since `start` of the last progress, plus one.
    stages: [AtomicU64; 2],
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            start: Instant::now(),
            stages: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }
}

impl Heartbeat {
    /// The stage started work or made progress.
    pub fn beat(&self, stage: Stage) {
        let now = self.start.elapsed().as_millis() as u64 + 1;
        self.stages[stage as usize].store(now, Ordering::Relaxed);
    }

    /// The stage waits for work (not stuck, whatever the time).
    pub fn idle(&self, stage: Stage) {
        self.stages[stage as usize].store(0, Ordering::Relaxed);
    }

    /// The first stage busy without progress for more than `limit`.
    pub fn stuck(&self, limit: Duration) -> Option<Stage> {
        let now = self.start.elapsed().as_millis() as u64 + 1;
        [Stage::Batch, Stage::Emit].into_iter().find(|&s| {
            let last = self.stages[s as usize].load(Ordering::Relaxed);
            last != 0 && now.saturating_sub(last) > limit.as_millis() as u64
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_stage_without_progress_is_stuck() {
        let hb = Heartbeat::default();
        assert_eq!(hb.stuck(Duration::ZERO), None, "idle is never stuck");
        hb.beat(Stage::Emit);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(hb.stuck(Duration::from_millis(5)), Some(Stage::Emit));
        assert_eq!(hb.stuck(Duration::from_secs(5)), None);
        hb.idle(Stage::Emit);
        assert_eq!(hb.stuck(Duration::from_millis(5)), None);
    }

    #[test]
    fn notifications_reach_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(Target::Path(path)),
        };
        n.notify("READY=1");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
    }
}

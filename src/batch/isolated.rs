//! Reading a batch in a child process.
//!
//! libhdf5 is C. A hostile `.h5` can make it write out of bounds or segfault (fuzzing found
//! one within 53 executions: `tests/fixtures/fuzz/h5-libhdf5-global-heap-crash.h5`), and no
//! `catch_unwind` stops that. So the daemon reads HDF5 in a short-lived child: the same
//! binary, re-executed with the hidden [`CHILD_SUBCOMMAND`], reads the input and writes it
//! as a `.csb` to a scratch file, which the parent then maps. A crash, a hang or a runaway
//! allocation costs the child and that one file; the daemon quarantines it and goes on.
//!
//! The protocol, both sides of which live here: `EXE __read-child --max-decompressed N
//! [--max-cells N --max-genes N --max-stored-counts N] INPUT OUT.csb` writes `OUT.csb` and
//! then `OUT.csb.report.json` ([`ChildReport`]) and exits 0,
//! whether the input was read or refused. Anything else (a signal, another exit status, no
//! report) means the reader crashed.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{csb, read_batch_capped, Caps, CountBatch, Format, Limits, ReadOptions};

/// The hidden subcommand the child runs.
pub const CHILD_SUBCOMMAND: &str = "__read-child";

/// Why a reader gave no batch: the kind an error report names ([`super::BatchErrorKind::name`],
/// or `internal` for a panic) and the message.
#[derive(Debug, Serialize, Deserialize)]
pub struct Refusal {
    pub kind: String,
    pub error: String,
}

/// Reads `path` in this process, a panic in a reader included: the readers are fuzzed, but a
/// parser bug on one hostile file must still cost only that file. The daemon reads every
/// format but HDF5 this way, and the child reads HDF5 this way.
pub fn read_contained(path: &Path, opts: &ReadOptions) -> Result<CountBatch, Refusal> {
    read_contained_capped(path, opts, &Caps::default())
}

/// [`read_contained`] under the given caps.
pub fn read_contained_capped(
    path: &Path,
    opts: &ReadOptions,
    caps: &Caps,
) -> Result<CountBatch, Refusal> {
    match catch_unwind(AssertUnwindSafe(|| read_batch_capped(path, opts, caps))) {
        Ok(read) => read.map_err(|e| Refusal {
            kind: e.kind.name().into(),
            error: e.to_string(),
        }),
        Err(panic) => Err(Refusal {
            kind: "internal".into(),
            error: format!(
                "{}: internal error (panic) while reading: {}",
                path.display(),
                panic_message(&panic)
            ),
        }),
    }
}

/// The text of a caught panic, when it carried one.
pub fn panic_message(panic: &Box<dyn Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// What the child says about the input, written after the `.csb` (so a report saying `read`
/// means the `.csb` is complete).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ChildReport {
    Read,
    /// The reader refused the input: the same kind and message as reading it in process.
    Refused(Refusal),
}

/// Why a child read gave no batch.
#[derive(Debug, thiserror::Error)]
pub enum ChildReadError {
    /// The reader refused the input.
    #[error("{}", .0.error)]
    Refused(Refusal),
    /// The reader died (a signal, an unexpected exit status) before it reported.
    #[error("the reader process crashed: {0}")]
    Crashed(String),
    #[error("the reader process was still running after {} s and was killed", .0.as_secs())]
    TimedOut(Duration),
    /// The child could not be started or its output not read: not the input's fault.
    #[error("{0}")]
    Internal(String),
}

/// Runs reads in child processes of `exe`, with scratch files in `scratch`.
#[derive(Debug, Clone)]
pub struct ChildReader {
    pub exe: PathBuf,
    pub scratch: PathBuf,
    /// A read still running after this is killed (a hang in libhdf5 costs one file).
    pub timeout: Duration,
}

impl ChildReader {
    /// This very binary (`/proc/self/exe` survives the file being replaced by an upgrade),
    /// scratch files in the temporary directory (private under systemd's `PrivateTmp=`).
    pub fn this_binary(timeout: Duration) -> ChildReader {
        let proc_exe = PathBuf::from("/proc/self/exe");
        let exe = if proc_exe.exists() {
            proc_exe
        } else {
            std::env::current_exe().unwrap_or(proc_exe)
        };
        ChildReader {
            exe,
            scratch: std::env::temp_dir(),
            timeout,
        }
    }

    /// Reads `path` in a child. `progress` is called every few milliseconds while waiting
    /// (the daemon feeds its watchdog with it).
    pub fn read(
        &self,
        path: &Path,
        opts: &ReadOptions,
        progress: &mut dyn FnMut(),
    ) -> Result<CountBatch, ChildReadError> {
        self.read_capped(path, opts, &Caps::default(), progress)
    }

    /// [`ChildReader::read`] under the given caps (the child checks them).
    pub fn read_capped(
        &self,
        path: &Path,
        opts: &ReadOptions,
        caps: &Caps,
        progress: &mut dyn FnMut(),
    ) -> Result<CountBatch, ChildReadError> {
        let out = self.scratch_file();
        let report = report_path(&out);
        let result = self.run_child(path, opts, caps, &out, &report, progress);
        let _ = std::fs::remove_file(&report);
        let batch = result.and_then(|()| {
            let mut batch = csb::read_mapped(&out, &Limits::new(opts, caps)).map_err(|e| {
                ChildReadError::Internal(format!("reading the child's output: {e}"))
            })?;
            batch.source = path.to_path_buf();
            batch.format = Format::Hdf5;
            Ok(batch)
        });
        // Unlinking a mapped file keeps the mapping: the scratch file is gone either way.
        let _ = std::fs::remove_file(&out);
        batch
    }

    fn scratch_file(&self) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.scratch
            .join(format!("cellstream-read-{}-{n}.csb", std::process::id()))
    }

    fn run_child(
        &self,
        path: &Path,
        opts: &ReadOptions,
        caps: &Caps,
        out: &Path,
        report: &Path,
        progress: &mut dyn FnMut(),
    ) -> Result<(), ChildReadError> {
        let mut command = Command::new(&self.exe);
        command
            .arg(CHILD_SUBCOMMAND)
            .arg("--max-decompressed")
            .arg(opts.max_decompressed.to_string())
            .arg("--max-cells")
            .arg(caps.max_cells.to_string())
            .arg("--max-genes")
            .arg(caps.max_genes.to_string())
            .arg("--max-stored-counts")
            .arg(caps.max_stored_counts.to_string())
            .arg(path)
            .arg(out)
            // The child is not the service: it must not talk to systemd.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        die_with_parent(&mut command);
        let mut child = command.spawn().map_err(|e| {
            ChildReadError::Internal(format!(
                "cannot start the reader process {}: {e}",
                self.exe.display()
            ))
        })?;
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => {
                    return Err(ChildReadError::Internal(format!(
                        "waiting for the reader process: {e}"
                    )))
                }
            }
            if start.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ChildReadError::TimedOut(self.timeout));
            }
            progress();
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        };
        if !status.success() {
            return Err(ChildReadError::Crashed(describe(status)));
        }
        let text = std::fs::read(report).map_err(|e| {
            ChildReadError::Crashed(format!(
                "it exited without a report ({}: {e})",
                report.display()
            ))
        })?;
        match serde_json::from_slice::<ChildReport>(&text) {
            Ok(ChildReport::Read) => Ok(()),
            Ok(ChildReport::Refused(refusal)) => Err(ChildReadError::Refused(refusal)),
            Err(e) => Err(ChildReadError::Internal(format!(
                "the reader process wrote an unreadable report {}: {e}",
                report.display()
            ))),
        }
    }
}

/// Where the child writes its report for the `.csb` at `out`.
pub fn report_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".report.json");
    PathBuf::from(name)
}

/// A child left behind by a daemon killed with SIGKILL would read on for nobody.
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's memory.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

/// "it was killed by signal 11 (SIGSEGV, …)" / "it exited with status 3 …".
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("it exited with status {code} before it reported"),
        (None, Some(sig)) => {
            let name = match sig {
                libc::SIGSEGV => " (SIGSEGV, a memory fault)",
                libc::SIGBUS => " (SIGBUS)",
                libc::SIGABRT => " (SIGABRT, an abort)",
                libc::SIGKILL => " (SIGKILL: out of memory? the child is the first the kernel's OOM killer picks)",
                libc::SIGFPE => " (SIGFPE)",
                libc::SIGILL => " (SIGILL)",
                _ => "",
            };
            format!("it was killed by signal {sig}{name}")
        }
        (None, None) => format!("it ended with {status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(exe: &str) -> ChildReader {
        ChildReader {
            exe: exe.into(),
            scratch: std::env::temp_dir(),
            timeout: Duration::from_secs(5),
        }
    }

    fn read(r: &ChildReader) -> Result<CountBatch, ChildReadError> {
        read_with(r, &mut || {})
    }

    /// A script just written can be "busy" for a moment: another test thread's fork holds
    /// its write descriptor until that child execs.
    fn read_with(
        r: &ChildReader,
        progress: &mut dyn FnMut(),
    ) -> Result<CountBatch, ChildReadError> {
        for _ in 0..20 {
            match r.read(Path::new("in.h5"), &ReadOptions::default(), progress) {
                Err(ChildReadError::Internal(why)) if why.contains("busy") => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                other => return other,
            }
        }
        panic!("{} stayed busy", r.exe.display())
    }

    // The full protocol runs through the real binary in tests/integration/serve_corpus.rs; here, how the
    // parent reads a child that does not follow it.
    #[test]
    fn a_child_killed_by_a_signal_is_a_crash_naming_the_signal() {
        let dir = tempfile::tempdir().unwrap();
        match read(&reader(&script(&dir, "kill -SEGV $$"))) {
            Err(ChildReadError::Crashed(why)) => assert!(why.contains("SIGSEGV"), "{why}"),
            other => panic!("expected a crash, got {other:?}"),
        }
    }

    #[test]
    fn a_child_that_exits_without_a_report_is_a_crash() {
        match read(&reader("/bin/true")) {
            Err(ChildReadError::Crashed(why)) => assert!(why.contains("without a report"), "{why}"),
            other => panic!("expected a crash, got {other:?}"),
        }
    }

    #[test]
    fn a_child_that_hangs_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = reader(&script(&dir, "exec sleep 30"));
        r.timeout = Duration::from_millis(200);
        let start = Instant::now();
        let mut beats = 0;
        let got = read_with(&r, &mut || beats += 1);
        assert!(matches!(got, Err(ChildReadError::TimedOut(_))), "{got:?}");
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(beats > 3, "progress is reported while waiting ({beats})");
    }

    #[test]
    fn a_missing_binary_is_an_internal_error_not_the_inputs_fault() {
        let got = read(&reader("/nonexistent/cellstream"));
        assert!(matches!(got, Err(ChildReadError::Internal(_))), "{got:?}");
    }

    #[test]
    fn the_report_round_trips() {
        let refused = ChildReport::Refused(Refusal {
            kind: "invalid".into(),
            error: "x.h5: invalid: matrix/data: missing".into(),
        });
        let text = serde_json::to_string(&refused).unwrap();
        assert!(text.contains(r#""outcome":"refused""#), "{text}");
        match serde_json::from_str::<ChildReport>(&text).unwrap() {
            ChildReport::Refused(refusal) => assert_eq!(refusal.kind, "invalid"),
            other => panic!("{other:?}"),
        }
    }

    /// An executable shell script running `body`, standing in for the reader binary.
    fn script(dir: &tempfile::TempDir, body: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join("child.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.to_str().unwrap().to_owned()
    }
}

//! Running the real `cellstream serve` in a test: a temporary spool and output folder, the
//! daemon's log, a small HTTP/1.1 client (no client crate needed), and batch builders.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use cellstream::batch::{write_csb_file, CountBatch};

/// A daemon started on `root/{spool,out}` with `127.0.0.1:0`.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    pub root: PathBuf,
    pub log: Arc<Mutex<Vec<String>>>,
}

pub struct Spooled {
    pub incoming: PathBuf,
    pub processing: PathBuf,
    pub done: PathBuf,
    pub failed: PathBuf,
    pub out: PathBuf,
}

/// The folders of a daemon rooted at `root`.
pub fn dirs(root: &Path) -> Spooled {
    let spool = root.join("spool");
    Spooled {
        incoming: spool.join("incoming"),
        processing: spool.join("processing"),
        done: spool.join("done"),
        failed: spool.join("failed"),
        out: root.join("out"),
    }
}

/// The config the tests start from: `spool` adds keys to `[spool]`, `http` to `[http]`,
/// `extra` whole sections.
pub fn write_config(root: &Path, spool: &str, http: &str, extra: &str) -> PathBuf {
    let path = root.join("cellstream.toml");
    let text = format!(
        "[spool]\ndir = {:?}\nrescan_seconds = 0.5\n{spool}\n[output]\ndir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n{http}\n{extra}",
        root.join("spool"),
        root.join("out"),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// What the daemon's process may not do, set between fork and exec.
#[derive(Clone, Copy)]
pub enum Confinement {
    None,
    /// The largest file it may write (RLIMIT_FSIZE, soft limit): a full disk, as far as
    /// its writes can tell.
    MaxFileBytes(u64),
    /// File permissions apply to it even when the tests run as root: the capabilities that
    /// override them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER) are dropped from
    /// its bounding, inheritable, permitted and effective sets, so a folder of mode 0555 is
    /// read-only to it as it is to the unprivileged user a deployment runs it as.
    PermissionsApply,
}

impl Confinement {
    fn apply(self) -> std::io::Result<()> {
        let check = |rc: libc::c_long| {
            if rc < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        match self {
            Confinement::None => Ok(()),
            Confinement::MaxFileBytes(limit) => {
                let rl = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: libc::RLIM_INFINITY,
                };
                // SAFETY: a valid rlimit for our own process.
                check(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &rl) }.into())
            }
            // SAFETY (below): prctl and capget/capset on our own process, with a header and
            // two data words laid out as linux/capability.h (version 3) says.
            Confinement::PermissionsApply if unsafe { libc::geteuid() } != 0 => Ok(()),
            Confinement::PermissionsApply => {
                const OVERRIDES: [u32; 3] = [1, 2, 3]; // DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER
                for cap in OVERRIDES {
                    check(
                        // SAFETY: see above.
                        unsafe {
                            libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0)
                        }
                        .into(),
                    )?;
                }
                #[repr(C)]
                struct Header {
                    version: u32,
                    pid: i32,
                }
                #[repr(C)]
                #[derive(Clone, Copy)]
                struct Data {
                    effective: u32,
                    permitted: u32,
                    inheritable: u32,
                }
                let mut header = Header {
                    version: 0x2008_0522,
                    pid: 0,
                };
                let mut data = [Data {
                    effective: 0,
                    permitted: 0,
                    inheritable: 0,
                }; 2];
                // SAFETY: see above.
                check(unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) })?;
                let keep = !OVERRIDES.iter().fold(0, |m, c| m | 1u32 << c);
                data[0].effective &= keep;
                data[0].permitted &= keep;
                data[0].inheritable &= keep;
                // SAFETY: see above.
                check(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) })
            }
        }
    }
}

impl Daemon {
    /// Starts the daemon with the config at `root/cellstream.toml` and waits until it listens.
    pub fn start(root: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with(root, env, Confinement::None)
    }

    /// [`Daemon::start`] under a [`Confinement`].
    pub fn start_with(root: &Path, env: &[(&str, &str)], confine: Confinement) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cellstream"));
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe system calls between fork and exec.
            unsafe { cmd.pre_exec(move || confine.apply()) };
        }
        cmd.arg("serve")
            .arg("--config")
            .arg(root.join("cellstream.toml"))
            .current_dir(super::repo())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = {
            let _turn = super::hdf5_or_spawn();
            cmd.spawn().expect("starting cellstream serve")
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("  daemon| {line}");
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let addr = rest.split(';').next().unwrap_or("").trim().to_string();
                        let _ = tx.send(addr);
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the daemon did not start listening; its log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Daemon {
            child,
            addr,
            root: root.to_path_buf(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for `/readyz` to answer 200.
    pub fn wait_ready(&self) {
        wait_for(Duration::from_secs(120), "the daemon to be ready", || {
            get(&self.addr, "/readyz").is_ok_and(|(s, _)| s == 200)
        });
        // The daemon logs "ready" as it turns ready; wait until that line (so every start-up
        // line before it) has been read from its stderr, for tests that check the log.
        wait_for(
            Duration::from_secs(10),
            "the daemon's \"ready\" log line",
            || {
                self.log
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|l| l.ends_with(": ready"))
            },
        );
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("running kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// SIGKILL, then reaps the process.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The value of a metric line (`name{labels}` exactly as exposed), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, text) = get(&self.addr, "/metrics").expect("GET /metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Lifts the file-size limit of [`Confinement::MaxFileBytes`]: the disk has room again.
    pub fn lift_file_size_limit(&self) {
        let rl = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: prlimit on our own child, with a valid rlimit and no old-value pointer.
        let rc = unsafe {
            libc::prlimit(
                self.pid() as libc::pid_t,
                libc::RLIMIT_FSIZE,
                &rl,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    }

    /// CPU time used so far (user + system), in seconds (clock ticks of 1/100 s).
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / 100.0
    }

    /// Peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status");
        kb * 1024
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `done` every 20 ms until it holds, panicking after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Puts a batch into `incoming/` as a producer must: copy under a temporary name, rename.
pub fn drop_batch(incoming: &Path, src: &Path, name: &str) {
    let tmp = incoming.join(format!(".{name}.tmp"));
    copy_entry(src, &tmp);
    std::fs::rename(&tmp, incoming.join(name)).unwrap();
}

fn copy_entry(src: &Path, to: &Path) {
    if src.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            copy_entry(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::copy(src, to).unwrap();
    }
}

/// Writes `batch` as a 10x v3 MTX directory (plain text members).
pub fn write_mtx_dir(batch: &CountBatch, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut m = format!(
        "%%MatrixMarket matrix coordinate integer general\n{} {} {}\n",
        batch.n_genes(),
        batch.n_cells(),
        batch.nnz()
    );
    for i in 0..batch.n_cells() {
        let cell = batch.cell(i);
        for (&g, &c) in cell.genes.iter().zip(cell.counts) {
            m.push_str(&format!("{} {} {c}\n", g + 1, i + 1));
        }
    }
    std::fs::write(dir.join("matrix.mtx"), m).unwrap();
    let ids = batch
        .gene_ids
        .clone()
        .unwrap_or_else(|| batch.gene_names.clone());
    let features: String = ids
        .iter()
        .zip(&batch.gene_names)
        .map(|(id, name)| format!("{id}\t{name}\tGene Expression\n"))
        .collect();
    std::fs::write(dir.join("features.tsv"), features).unwrap();
    std::fs::write(dir.join("barcodes.tsv"), batch.barcodes.join("\n") + "\n").unwrap();
}

// ---- a minimal HTTP/1.1 client -------------------------------------------------------

/// `GET path` → (status, body).
pub fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    request(addr, "GET", path, &[], None)
}

/// One request with `Connection: close`; `body` is sent with its Content-Length.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        {
            head.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    if let Some(b) = body {
        // The server may answer (413) and close before reading it all.
        let _ = s.write_all(b);
    }
    let mut r = BufReader::new(s);
    let (status, chunked) = read_head(&mut r)?;
    let mut body = Vec::new();
    if chunked {
        while let Some(chunk) = read_chunk(&mut r)? {
            body.extend(chunk);
        }
    } else {
        let _ = r.read_to_end(&mut body);
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// (status, whether the body is chunked).
fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, bool)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    Ok((status, chunked))
}

/// One chunk of a chunked body; `None` at its end.
fn read_chunk(r: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let size = usize::from_str_radix(line.trim(), 16)
        .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
    let mut chunk = vec![0; size + 2];
    r.read_exact(&mut chunk)?;
    chunk.truncate(size);
    Ok((size > 0).then_some(chunk))
}

/// An open `GET /v1/stream`, read line by line.
pub struct StreamClient {
    reader: BufReader<TcpStream>,
    pending: Vec<u8>,
}

impl StreamClient {
    pub fn open(addr: &str, accept: &str) -> StreamClient {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(
            s,
            "GET /v1/stream HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(s);
        let (status, chunked) = read_head(&mut reader).unwrap();
        assert_eq!(status, 200);
        assert!(chunked, "a streamed body is chunked");
        StreamClient {
            reader,
            pending: Vec::new(),
        }
    }

    /// The next complete line (without its newline); `None` when the stream ended.
    pub fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                return Some(String::from_utf8_lossy(&line[..pos]).into_owned());
            }
            match read_chunk(&mut self.reader) {
                Ok(Some(chunk)) => self.pending.extend(chunk),
                _ => return None,
            }
        }
    }
}

// ---- Source batches and their reference output ----

pub fn pbmc68k() -> CountBatch {
    super::read(&super::repo().join("bench-data/pbmc68k_reduced"))
}

/// Writes `batch` at `path` in the format its name says (an MTX directory when it has no
/// extension).
pub fn write_batch(batch: &CountBatch, path: &Path) {
    if path.extension().is_none() {
        write_mtx_dir(batch, path);
    } else {
        write_csb_file(batch, path).unwrap();
    }
}

/// `cellstream embed` on `inputs` in one run, split by batch id: id → its NDJSON lines.
pub fn embed_reference(inputs: &[PathBuf], dir: &Path) -> BTreeMap<String, String> {
    let out = dir.join("reference.ndjson");
    let mut args = vec!["embed".to_string(), "--threads".into(), "2".into()];
    args.extend(inputs.iter().map(|p| p.display().to_string()));
    args.extend(["--out".into(), out.display().to_string()]);
    let run = {
        let _turn = super::hdf5_or_spawn();
        super::cellstream(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    assert!(run.status.success(), "{}", super::stderr(&run));
    let mut by_batch = BTreeMap::<String, String>::new();
    for line in std::fs::read_to_string(out).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let text = by_batch
            .entry(v["batch"].as_str().unwrap().into())
            .or_default();
        text.push_str(line);
        text.push('\n');
    }
    by_batch
}

/// A temporary daemon root, source batches cut from pbmc68k (name → cells), and what
/// `cellstream embed` writes for them.
pub struct Setup {
    pub tmp: tempfile::TempDir,
    pub d: Spooled,
    pub src: PathBuf,
    pub expected: BTreeMap<String, String>,
}

pub fn setup(batches: &[(&str, std::ops::Range<usize>)]) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let d = dirs(tmp.path());
    let base = pbmc68k();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for (name, cells) in batches {
        write_batch(&base.select(cells.clone()), &src.join(name));
    }
    let inputs: Vec<PathBuf> = batches.iter().map(|(n, _)| src.join(n)).collect();
    let expected = embed_reference(&inputs, tmp.path());
    Setup {
        tmp,
        d,
        src,
        expected,
    }
}

pub fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

pub fn output(d: &Spooled, id: &str) -> Option<String> {
    std::fs::read_to_string(d.out.join(format!("{id}.ndjson"))).ok()
}

/// The number in environment variable `name`, or `default` when it is unset or not a number.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

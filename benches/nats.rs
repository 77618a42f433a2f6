//! `cellstream serve` on NATS JetStream against the same daemon on its spool, same batches.
//!
//! `cargo bench --bench nats` (needs `nats-server`; Debian's 2.9) splits pbmc3k (2,638 real
//! cells) into 500-cell `.csb` batches, `BENCH_COPIES` times (default 3, each copy under
//! other batch names: 7,914 cells, so that the first batch's transfer and the last one's
//! results weigh little), and, `BENCH_REPEAT` times (default 3), in turn:
//! 1. `spool`: one daemon (`[pipeline] threads = BENCH_THREADS`, default 2) with a spool and
//!    an output folder; every batch renamed into `incoming/` at once; cells/s from the drop
//!    to the last summary file;
//! 2. `nats`: one daemon with `[nats]` alone (results on JetStream, no files); every batch
//!    sent at once by one `cellstream submit` (a 500-cell batch is 4 MB, over the server's
//!    default 1 MiB message limit, so it goes through the object store as a user's would;
//!    `BENCH_MAX_PAYLOAD=BYTES` raises the server's limit to send them as messages);
//!    cells/s from the start of `submit` to the last summary on the results stream;
//! 3. `nats_files`: the same with `[output] dir` too (files and JetStream);
//! 4. `nats_two`: two daemons sharing the stream, each with `BENCH_THREADS / 2` threads (at
//!    least 1), then each with `BENCH_THREADS`: the total cells/s;
//! 5. `spool_queued` and `nats_queued`: every batch already waiting (in `incoming/`, on the
//!    work stream) when one daemon starts; cells/s from its start to the last summary. This
//!    leaves the producer (copying, `submit`) out of both, as on a machine of its own.
//!
//! `BENCH_MODES=spool,nats,...` runs only those. Each round starts one mode further on.
//!
//! Each daemon starts on a fresh server and store. Every run also reports the NATS server's
//! CPU seconds per 1,000 cells (what bounds how many daemons one server feeds) and the load
//! average when it started (the machine is shared). Prints `RESULT …` lines.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cellstream::batch::{read_batch, write_csb_file, ReadOptions};
use cellstream::config::NatsConfig;
use cellstream::nats::Link;

const CELLS_PER_BATCH: usize = 500;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cellstream")
}

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(root: &Path, max_payload: Option<usize>) -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = root.join("nats-store");
        std::fs::create_dir_all(&store).unwrap();
        let conf = root.join("nats.conf");
        let mut text =
            format!("listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: {store:?}\n}}\n");
        if let Some(max) = max_payload {
            text.push_str(&format!("max_payload: {max}\n"));
        }
        std::fs::write(&conf, text).unwrap();
        let bin = ["nats-server", "/usr/sbin/nats-server"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .expect("nats-server (Debian: apt-get install nats-server)");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, port }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Daemon {
    child: Child,
    out: PathBuf,
    incoming: PathBuf,
    /// When the process was started: the `*_queued` modes time from here.
    spawned: Instant,
}

impl Daemon {
    /// A daemon under `root` with the given config sections, ready.
    fn start(root: &Path, sections: &str) -> Daemon {
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        let config = root.join("cellstream.toml");
        std::fs::write(
            &config,
            format!("[http]\nlisten = \"127.0.0.1:0\"\n{sections}"),
        )
        .unwrap();
        let spawned = Instant::now();
        let mut child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env("TMPDIR", root.join("tmp"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.ends_with("ready") || line.contains("NATS: taking batches") {
                    let _ = tx.send(());
                }
            }
        });
        let wants = if sections.contains("[nats]") { 2 } else { 1 };
        for _ in 0..wants {
            rx.recv_timeout(Duration::from_secs(300))
                .expect("the daemon gets ready");
        }
        Daemon {
            child,
            out: root.join("out"),
            incoming: root.join("spool/incoming"),
            spawned,
        }
    }

    fn cpu_seconds(pid: u32) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join("/")
}

/// Sends every batch with one `cellstream submit`.
fn submit(url: &str, batches: &[PathBuf]) {
    let out = Command::new(bin())
        .args(["submit", "--nats", url])
        .args(batches)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "submit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits for every batch's summary, the last message on its results subject.
fn wait_results(link: &Link, batches: &[PathBuf]) {
    link.block_on(async {
        let stream = loop {
            if let Ok((s, _)) = link.results_stream().await {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        for p in batches {
            let id = p.file_stem().unwrap().to_str().unwrap();
            let subject = format!("cellstream.results.{id}");
            loop {
                if let Ok(m) = stream.get_last_raw_message_by_subject(&subject).await {
                    if m.payload.starts_with(b"{\"type\":\"batch\"") {
                        break;
                    }
                }
                tokio::time::sleep(poll_interval()).await;
            }
        }
    })
}

/// Copies every batch into `incoming` under a dot name, then renames it in, as a producer
/// on the same machine would.
fn drop_into(incoming: &Path, batches: &[PathBuf]) {
    std::fs::create_dir_all(incoming).unwrap();
    for p in batches {
        let name = p.file_name().unwrap().to_str().unwrap();
        let tmp = incoming.join(format!(".{name}.tmp"));
        std::fs::copy(p, &tmp).unwrap();
        std::fs::rename(&tmp, incoming.join(name)).unwrap();
    }
}

/// Waits for every batch's summary file in `out`.
fn wait_files(out: &Path, batches: &[PathBuf]) {
    for p in batches {
        let id = p.file_stem().unwrap().to_str().unwrap();
        while !out.join(format!("{id}.summary.json")).exists() {
            std::thread::sleep(poll_interval());
        }
    }
}

fn spool_sections(root: &Path, threads: usize) -> String {
    format!(
        "[spool]\ndir = {:?}\nrescan_seconds = 1\n[output]\ndir = {:?}\n[pipeline]\nthreads = {threads}\n",
        root.join("spool"),
        root.join("out")
    )
}

fn nats_sections(url: &str, threads: usize, out: Option<&Path>) -> String {
    let out = out.map_or(String::new(), |o| format!("[output]\ndir = {o:?}\n"));
    format!("{out}[pipeline]\nthreads = {threads}\n[nats]\nurl = {url:?}\n")
}

fn main() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let threads: usize = env_or("BENCH_THREADS", 2);
    let repeat: usize = env_or("BENCH_REPEAT", 3);
    let copies: usize = env_or("BENCH_COPIES", 3);
    let max_payload: Option<usize> = std::env::var("BENCH_MAX_PAYLOAD")
        .ok()
        .and_then(|v| v.parse().ok());
    let work = repo.join("target/nats-bench");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let pbmc3k = read_batch(&repo.join("bench-data/pbmc3k"), &ReadOptions::default()).unwrap();
    let cells = pbmc3k.n_cells();
    let mut batches = Vec::new();
    for copy in 0..copies {
        for (k, start) in (0..cells).step_by(CELLS_PER_BATCH).enumerate() {
            let path = work.join(format!("pbmc3k-{copy}-{k:02}.csb"));
            write_csb_file(
                &pbmc3k.select(start..(start + CELLS_PER_BATCH).min(cells)),
                &path,
            )
            .unwrap();
            batches.push(path);
        }
    }
    let n = cells * copies;

    let ctx = Ctx {
        work,
        batches,
        threads,
        max_payload,
        n,
    };
    let all = [
        "spool",
        "spool_queued",
        "nats",
        "nats_queued",
        "nats_files",
        "nats_two",
        "nats_two_full",
    ];
    let wanted: Vec<&str> = match std::env::var("BENCH_MODES") {
        Ok(list) => all
            .into_iter()
            .filter(|m| list.split(',').any(|w| w.trim() == *m))
            .collect(),
        Err(_) => all.to_vec(),
    };
    for round in 0..repeat {
        // Each round starts one mode further on, so that a machine that slows down or
        // speeds up during the run does not always favour the same mode.
        for k in 0..wanted.len() {
            ctx.run(wanted[(round + k) % wanted.len()], round);
        }
    }
}

struct Ctx {
    work: PathBuf,
    batches: Vec<PathBuf>,
    threads: usize,
    max_payload: Option<usize>,
    n: usize,
}

impl Ctx {
    fn report(
        &self,
        mode: &str,
        round: usize,
        (daemons, t): (usize, usize),
        secs: f64,
        cpu: f64,
        server_cpu: Option<f64>,
    ) {
        let n = self.n as f64;
        let server = server_cpu.map_or(String::new(), |c| {
            format!(
                " max_payload={} server_cpu_s_per_1000_cells={:.3}",
                self.max_payload
                    .map_or("default".to_string(), |m| m.to_string()),
                c * 1000.0 / n
            )
        });
        println!(
            "RESULT nats_bench mode={mode} round={round} daemons={daemons} threads={t} cells={} seconds={secs:.3} cells_per_s={:.1} daemon_cpu_s_per_1000_cells={:.3}{server} load_before={}",
            self.n,
            n / secs,
            cpu * 1000.0 / n,
            load_average()
        );
    }

    fn run(&self, mode: &str, round: usize) {
        let (threads, batches) = (self.threads, &self.batches);
        let root = self.work.join(format!("{mode}-{round}"));
        match mode {
            // Batches dropped into a running daemon's spool.
            "spool" => {
                let d = Daemon::start(&root, &spool_sections(&root, threads));
                let cpu0 = Daemon::cpu_seconds(d.child.id());
                let t0 = Instant::now();
                drop_into(&d.incoming, batches);
                wait_files(&d.out, batches);
                let secs = t0.elapsed().as_secs_f64();
                let cpu = Daemon::cpu_seconds(d.child.id()) - cpu0;
                self.report(mode, round, (1, threads), secs, cpu, None);
            }
            // Batches waiting before the daemon starts: timed from its start.
            "spool_queued" => {
                drop_into(&root.join("spool/incoming"), batches);
                let d = Daemon::start(&root, &spool_sections(&root, threads));
                wait_files(&d.out, batches);
                let secs = d.spawned.elapsed().as_secs_f64();
                let cpu = Daemon::cpu_seconds(d.child.id());
                self.report(mode, round, (1, threads), secs, cpu, None);
            }
            // Batches on the work stream before the daemon starts: timed from its start.
            "nats_queued" => {
                std::fs::create_dir_all(&root).unwrap();
                let server = Server::start(&root, self.max_payload);
                let url = server.url();
                let link = Link::connect(&NatsConfig::with_url(&url), None).unwrap();
                submit(&url, batches);
                let server_cpu0 = Daemon::cpu_seconds(server.child.id());
                let d = Daemon::start(&root.join("d0"), &nats_sections(&url, threads, None));
                wait_results(&link, batches);
                let secs = d.spawned.elapsed().as_secs_f64();
                let cpu = Daemon::cpu_seconds(d.child.id());
                let server_cpu = Daemon::cpu_seconds(server.child.id()) - server_cpu0;
                self.report(mode, round, (1, threads), secs, cpu, Some(server_cpu));
            }
            // Batches sent by `submit` to running daemons.
            _ => {
                let (daemons, t, files) = match mode {
                    "nats" => (1, threads, false),
                    "nats_files" => (1, threads, true),
                    "nats_two" => (2, (threads / 2).max(1), false),
                    "nats_two_full" => (2, threads, false),
                    _ => unreachable!("{mode}"),
                };
                std::fs::create_dir_all(&root).unwrap();
                let server = Server::start(&root, self.max_payload);
                let url = server.url();
                let ds: Vec<Daemon> = (0..daemons)
                    .map(|k| {
                        let droot = root.join(format!("d{k}"));
                        let out = files.then(|| droot.join("out"));
                        Daemon::start(&droot, &nats_sections(&url, t, out.as_deref()))
                    })
                    .collect();
                let link = Link::connect(&NatsConfig::with_url(&url), None).unwrap();
                let daemons_cpu =
                    || -> f64 { ds.iter().map(|d| Daemon::cpu_seconds(d.child.id())).sum() };
                let server_cpu0 = Daemon::cpu_seconds(server.child.id());
                let cpu0 = daemons_cpu();
                let t0 = Instant::now();
                submit(&url, batches);
                wait_results(&link, batches);
                let secs = t0.elapsed().as_secs_f64();
                let cpu = daemons_cpu() - cpu0;
                let server_cpu = Daemon::cpu_seconds(server.child.id()) - server_cpu0;
                self.report(mode, round, (daemons, t), secs, cpu, Some(server_cpu));
            }
        }
    }
}

/// How often both sides look for the last summary (`BENCH_POLL_MS`, default 20 ms): the
/// same for files and JetStream, and rare enough that looking costs the server little.
fn poll_interval() -> Duration {
    Duration::from_millis(env_or("BENCH_POLL_MS", 20))
}

/// The number in environment variable `name`, or `default` when it is unset or not a number.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

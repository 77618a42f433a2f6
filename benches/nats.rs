//! `cellstream serve` on NATS JetStream against the same daemon on its spool, same batches.
//!
//! `cargo bench --bench nats` (needs `nats-server`; Debian's 2.9) splits pbmc3k (2,700 real
//! cells) into 500-cell `.csb` batches and, `BENCH_REPEAT` times (default 3), in turn:
//! 1. `spool`: one daemon (`[pipeline] threads = BENCH_THREADS`, default 2) with a spool and
//!    an output folder; every batch renamed into `incoming/` at once; cells/s from the drop
//!    to the last summary file;
//! 2. `nats`: one daemon with `[nats]` alone (results on JetStream, no files); every batch
//!    published to the work stream at once (as `cellstream submit` does, from this process);
//!    cells/s from the first publish to the last summary on the results stream;
//! 3. `nats_files`: the same with `[output] dir` too (files and JetStream);
//! 4. `nats_two`: two daemons sharing the stream, each with `BENCH_THREADS / 2` threads (at
//!    least 1), then each with `BENCH_THREADS`: the total cells/s.
//!
//! Each daemon starts on a fresh server and store. Every run also reports the NATS server's
//! CPU seconds per 1,000 cells (what bounds how many daemons one server feeds) and the load
//! average when it started (the machine is shared). Prints `RESULT …` lines.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::HeaderMap;
use cellstream::batch::{read_batch, write_csb_file, ReadOptions};
use cellstream::config::NatsConfig;
use cellstream::nats::{header, Link, WORK_PREFIX};

const CELLS_PER_BATCH: usize = 500;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cellstream")
}

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(root: &Path) -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = root.join("nats-store");
        std::fs::create_dir_all(&store).unwrap();
        let conf = root.join("nats.conf");
        std::fs::write(
            &conf,
            format!("listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: {store:?}\n}}\n"),
        )
        .unwrap();
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

/// Publishes every batch, then waits for every summary on the results stream.
fn run_nats(link: &Link, batches: &[PathBuf]) -> f64 {
    let payloads: Vec<(String, bytes::Bytes)> = batches
        .iter()
        .map(|p| {
            (
                p.file_stem().unwrap().to_str().unwrap().to_string(),
                std::fs::read(p).unwrap().into(),
            )
        })
        .collect();
    link.block_on(async {
        link.work_stream().await.unwrap();
        let t0 = Instant::now();
        for (id, bytes) in &payloads {
            let mut h = HeaderMap::new();
            h.insert(header::BATCH, id.as_str());
            h.insert(header::FILE, format!("{id}.csb").as_str());
            let p = Publish::build().headers(h).payload(bytes.clone());
            link.js
                .send_publish(format!("{WORK_PREFIX}{id}"), p)
                .await
                .unwrap()
                .await
                .unwrap();
        }
        // Every summary: the last message on each batch's subject.
        let stream = loop {
            if let Ok((s, _)) = link.results_stream().await {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        for (id, _) in &payloads {
            let subject = format!("cellstream.results.{id}");
            loop {
                if let Ok(m) = stream.get_last_raw_message_by_subject(&subject).await {
                    if m.payload.starts_with(b"{\"type\":\"batch\"") {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        t0.elapsed().as_secs_f64()
    })
}

fn main() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let threads: usize = env_or("BENCH_THREADS", 2);
    let repeat: usize = env_or("BENCH_REPEAT", 3);
    let work = repo.join("target/nats-bench");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let pbmc3k = read_batch(&repo.join("bench-data/pbmc3k"), &ReadOptions::default()).unwrap();
    let n = pbmc3k.n_cells();
    let mut batches = Vec::new();
    for (k, start) in (0..n).step_by(CELLS_PER_BATCH).enumerate() {
        let path = work.join(format!("pbmc3k-{k:02}.csb"));
        write_csb_file(
            &pbmc3k.select(start..(start + CELLS_PER_BATCH).min(n)),
            &path,
        )
        .unwrap();
        batches.push(path);
    }

    for round in 0..repeat {
        // 1. The spool.
        let root = work.join(format!("spool-{round}"));
        let load = load_average();
        let d = Daemon::start(
            &root,
            &format!(
                "[spool]\ndir = {:?}\nrescan_seconds = 1\n[output]\ndir = {:?}\n[pipeline]\nthreads = {threads}\n",
                root.join("spool"),
                root.join("out")
            ),
        );
        let t0 = Instant::now();
        for p in &batches {
            let name = p.file_name().unwrap().to_str().unwrap();
            let tmp = d.incoming.join(format!(".{name}.tmp"));
            std::fs::copy(p, &tmp).unwrap();
            std::fs::rename(&tmp, d.incoming.join(name)).unwrap();
        }
        for p in &batches {
            let id = p.file_stem().unwrap().to_str().unwrap();
            while !d.out.join(format!("{id}.summary.json")).exists() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "RESULT nats_bench mode=spool round={round} daemons=1 threads={threads} cells={n} seconds={secs:.3} cells_per_s={:.1} load_before={load}",
            n as f64 / secs
        );
        drop(d);

        // 2.–4. JetStream.
        let two = (threads / 2).max(1);
        let runs: [(&str, usize, usize, bool); 4] = [
            ("nats", 1, threads, false),
            ("nats_files", 1, threads, true),
            ("nats_two", 2, two, false),
            ("nats_two_full", 2, threads, false),
        ];
        for (mode, daemons, t, files) in runs {
            let root = work.join(format!("{mode}-{round}"));
            std::fs::create_dir_all(&root).unwrap();
            let server = Server::start(&root);
            let load = load_average();
            let mut ds = Vec::new();
            for k in 0..daemons {
                let droot = root.join(format!("d{k}"));
                let out = if files {
                    format!("[output]\ndir = {:?}\n", droot.join("out"))
                } else {
                    String::new()
                };
                ds.push(Daemon::start(
                    &droot,
                    &format!(
                        "{out}[pipeline]\nthreads = {t}\n[nats]\nurl = {:?}\n",
                        server.url()
                    ),
                ));
            }
            let link = Link::connect(&NatsConfig::with_url(&server.url()), None).unwrap();
            let server_cpu0 = Daemon::cpu_seconds(server.child.id());
            let secs = run_nats(&link, &batches);
            let server_cpu = Daemon::cpu_seconds(server.child.id()) - server_cpu0;
            println!(
                "RESULT nats_bench mode={mode} round={round} daemons={daemons} threads={t} cells={n} seconds={secs:.3} cells_per_s={:.1} server_cpu_s_per_1000_cells={:.3} load_before={load}",
                n as f64 / secs,
                server_cpu * 1000.0 / n as f64
            );
            drop(ds);
        }
    }
}

/// The number in environment variable `name`, or `default` when it is unset or not a number.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

//! `cellstream serve` against `cellstream embed` on the same cells, and the daemon's latency
//! at a steady arrival rate.
//!
//! `cargo bench --bench serve` splits pbmc3k (2,700 real cells) into 500-cell `.csb` batches,
//! then, in one run:
//! 1. `embed` on all of them (its own cells/s figure, model loading excluded);
//! 2. `serve`: all batches renamed into `incoming/` at once; cells/s from the drop to the
//!    last committed output (sustained throughput), as a ratio to 1;
//! 3. `serve` at 50% and 90% of the capacity measured in 2: one 500-cell batch every
//!    `500 / (load × capacity)` seconds; claim → committed-output latency (the summary's
//!    `timings.latency`) p50/p99/max over `BENCH_LATENCY_BATCHES` batches (default 20), and
//!    the daemon's peak RSS.
//!
//! Prints `RESULT …` lines. `BENCH_THREADS` (default 2) is the thread budget of both.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cellstream::batch::{read_batch, write_csb_file, ReadOptions};

const CELLS_PER_BATCH: usize = 500;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cellstream")
}

struct Daemon {
    child: Child,
    out: PathBuf,
    incoming: PathBuf,
}

impl Daemon {
    fn start(root: &Path, threads: usize) -> Daemon {
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root).unwrap();
        let config = root.join("cellstream.toml");
        std::fs::write(
            &config,
            format!(
                "[spool]\ndir = {:?}\nrescan_seconds = 1\n[output]\ndir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[pipeline]\nthreads = {threads}\n",
                root.join("spool"),
                root.join("out")
            ),
        )
        .unwrap();
        let mut child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&config)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for "ready" in the log, then keep draining the pipe.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.ends_with("ready") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(120))
            .expect("the daemon gets ready");
        Daemon {
            child,
            out: root.join("out"),
            incoming: root.join("spool/incoming"),
        }
    }

    fn drop_batch(&self, src: &Path, name: &str) {
        let tmp = self.incoming.join(format!(".{name}.tmp"));
        std::fs::copy(src, &tmp).unwrap();
        std::fs::rename(&tmp, self.incoming.join(name)).unwrap();
    }

    fn summary(&self, id: &str) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.out.join(format!("{id}.summary.json"))).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn wait_summary(&self, id: &str) -> serde_json::Value {
        loop {
            if let Some(s) = self.summary(id) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb / 1024.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let threads: usize = env_or("BENCH_THREADS", 2);
    let n_latency: usize = env_or("BENCH_LATENCY_BATCHES", 20);
    let work = repo.join("target/serve-bench");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let pbmc3k = read_batch(&repo.join("bench-data/pbmc3k"), &ReadOptions::default()).unwrap();
    let n = pbmc3k.n_cells();

    // The same cells for embed and the sustained serve run: pbmc3k in 500-cell batches.
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

    // 1. embed.
    let out = Command::new(bin())
        .arg("embed")
        .args(&batches)
        .args(["--threads", &threads.to_string(), "--out"])
        .arg(work.join("embed.ndjson"))
        .current_dir(repo)
        .output()
        .unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    // The closing line ("embedded N cells … in S s"), not the model's "loaded and warmed in".
    let secs: f64 = log
        .lines()
        .rev()
        .find(|l| l.contains("embedded "))
        .and_then(|l| l.split(" in ").nth(1))
        .and_then(|s| s.split(" s").next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("embed's summary line: {log}"));
    let embed_rate = n as f64 / secs;
    println!(
        "RESULT embed threads={threads} cells={n} seconds={secs:.3} cells_per_s={embed_rate:.1}"
    );

    // 2. serve, sustained: every batch at once.
    let daemon = Daemon::start(&work.join("sustained"), threads);
    let t0 = Instant::now();
    for path in &batches {
        let name = path.file_name().unwrap().to_str().unwrap();
        daemon.drop_batch(path, name);
    }
    for path in &batches {
        let id = path.file_stem().unwrap().to_str().unwrap();
        daemon.wait_summary(id);
    }
    let serve_secs = t0.elapsed().as_secs_f64();
    let serve_rate = n as f64 / serve_secs;
    // Same work, same records: the daemon's outputs, in batch order, are embed's output.
    let served: Vec<u8> = batches
        .iter()
        .flat_map(|p| {
            let id = p.file_stem().unwrap().to_str().unwrap();
            std::fs::read(daemon.out.join(format!("{id}.ndjson"))).unwrap()
        })
        .collect();
    assert!(served == std::fs::read(work.join("embed.ndjson")).unwrap());
    println!(
        "RESULT serve_sustained threads={threads} cells={n} seconds={serve_secs:.3} cells_per_s={serve_rate:.1} ratio_to_embed={:.3} peak_rss_mib={:.1}",
        serve_rate / embed_rate,
        daemon.peak_rss_mib()
    );
    drop(daemon);

    // 3. serve at a steady arrival rate, at 50% and 90% of the sustained capacity.
    for load in [0.5, 0.9] {
        let daemon = Daemon::start(&work.join(format!("steady-{load}")), threads);
        let period = Duration::from_secs_f64(CELLS_PER_BATCH as f64 / (load * serve_rate));
        let t0 = Instant::now();
        let mut ids = Vec::new();
        for k in 0..n_latency {
            let due = t0 + period * k as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            // Full 500-cell batches, cycling through pbmc3k.
            let src = &batches[k % (n / CELLS_PER_BATCH)];
            let id = format!("steady-{k:03}");
            daemon.drop_batch(src, &format!("{id}.csb"));
            ids.push(id);
        }
        let mut latency: Vec<f64> = ids
            .iter()
            .map(|id| {
                daemon.wait_summary(id)["timings"]["latency"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        latency.sort_by(f64::total_cmp);
        println!(
            "RESULT serve_latency load={load} threads={threads} batches={n_latency} cells_per_batch={CELLS_PER_BATCH} period_s={:.3} p50_s={:.3} p99_s={:.3} max_s={:.3} peak_rss_mib={:.1}",
            period.as_secs_f64(),
            percentile(&latency, 50.0),
            percentile(&latency, 99.0),
            latency[latency.len() - 1],
            daemon.peak_rss_mib()
        );
    }
}

/// The number in environment variable `name`, or `default` when it is unset or not a number.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

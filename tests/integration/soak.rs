//! A soak (docs/robustness.md, "Bounded memory"): the daemon under about 90% of the load it
//! can carry, fed good batches in every format, the malformed corpus of `serve_corpus`,
//! uploads (some cut off mid-body), stream clients that connect and drop (one of them too
//! slow to keep up) and SIGHUP reloads, while its resident memory, open file descriptors
//! and threads are sampled. At the end: nothing lost (every good batch's output equals
//! `cellstream embed`'s), nothing left behind, and no drift: resident memory grows by at most
//! 5% (or 2 MiB, the noise of which batches are in flight) after the first sixth of the run
//! (ten minutes of an hour), and the descriptors and threads left once the daemon has been
//! quiet for longer than tokio keeps an idle blocking thread stay within what was usual
//! (the median) under load after the first sixth.
//!
//! CI runs it for a minute. `bench-data/soak.sh [SECONDS]` runs it for longer
//! (`CELLSTREAM_SOAK_SECONDS`, default 60) and keeps the samples
//! (`CELLSTREAM_SOAK_REPORT=DIR`: `samples.csv`, `summary.txt`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::daemon::*;
use crate::serve_corpus::{corpus, materialise};

/// One reading of the daemon's /proc files.
#[derive(Debug, Clone, Copy)]
struct Sample {
    secs: f64,
    rss: u64,
    hwm: u64,
    threads: u64,
    fds: u64,
}

fn sample(pid: u32, start: Instant) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| -> Option<u64> {
        let v = status.lines().find_map(|l| l.strip_prefix(key))?;
        v.split_whitespace().next()?.parse().ok()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Sample {
        secs: start.elapsed().as_secs_f64(),
        rss: field("VmRSS:")? * 1024,
        hwm: field("VmHWM:")? * 1024,
        threads: field("Threads:")?,
        fds,
    })
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// What was sent, by kind, and what each good batch must come out as.
#[derive(Default)]
struct Sent {
    /// Batch id → the source it is a copy of.
    good: BTreeMap<String, String>,
    bad: Vec<String>,
    uploads_cut: usize,
    uploads_refused: usize,
    stream_clients: usize,
    reloads: usize,
}

/// Sends half of a body announced whole, then hangs up: a client that died mid-upload.
fn cut_upload(addr: &str, name: &str, body: &[u8]) {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return;
    };
    let _ = write!(
        s,
        "POST /v1/batches?name={name} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(&body[..body.len() / 2]);
    let _ = s.flush();
    std::thread::sleep(Duration::from_millis(50));
}

/// A stream client that reads `lines` lines (or waits `linger` without reading) and drops.
fn stream_visit(addr: &str, sse: bool, lines: usize, linger: Duration) {
    use std::io::{BufRead, BufReader};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return;
    };
    let accept = if sse {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    let _ = write!(
        s,
        "GET /v1/stream HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"
    );
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if lines == 0 {
        std::thread::sleep(linger);
        return;
    }
    let mut r = BufReader::new(s);
    let mut line = String::new();
    for _ in 0..lines {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
    }
}

#[test]
fn a_soak_at_90_percent_load_loses_nothing_and_does_not_drift() {
    let seconds: f64 = env_or("CELLSTREAM_SOAK_SECONDS", 60.0);
    let report_dir = std::env::var_os("CELLSTREAM_SOAK_REPORT").map(PathBuf::from);
    // Good batches in every format the spool takes (an MTX directory, .csb, .csb.zst).
    let sources = [
        ("a.csb", 0..60),
        ("b.csb.zst", 60..140),
        ("c", 140..200),
        ("d.csb", 200..320),
    ];
    let Setup {
        tmp,
        d,
        src,
        expected,
    } = setup(&sources);
    let root = tmp.path();
    let bad = corpus();
    let staging = root.join("staging");
    std::fs::create_dir(&staging).unwrap();
    // Reloaded every few seconds with another rescan interval (a key that applies at once).
    let config = |rescan: f64| {
        let path = write_config(
            root,
            "max_decompressed_bytes = 16777216",
            "stream_buffer_batches = 4",
            "[pipeline]\nthreads = 2\n",
        );
        let text = std::fs::read_to_string(&path).unwrap().replacen(
            "rescan_seconds = 0.5",
            &format!("rescan_seconds = {rescan}"),
            1,
        );
        std::fs::write(&path, text).unwrap();
    };
    config(0.5);
    let daemon = Daemon::start(root, &[]);
    daemon.wait_ready();
    let addr = daemon.addr.clone();
    let pid = daemon.pid();

    // Capacity: the four sources back to back.
    let cells: BTreeMap<String, usize> = sources
        .iter()
        .map(|(n, r)| (cellstream::batch::batch_id_of(Path::new(n)), r.len()))
        .collect();
    let t0 = Instant::now();
    for round in 0..2 {
        for (name, _) in &sources {
            drop_batch(&d.incoming, &src.join(name), &format!("cal{round}-{name}"));
        }
    }
    wait_for(Duration::from_secs(300), "the calibration batches", || {
        cells
            .keys()
            .all(|id| d.out.join(format!("cal1-{id}.summary.json")).exists())
    });
    let capacity = 2.0 * cells.values().sum::<usize>() as f64 / t0.elapsed().as_secs_f64();
    let rate = 0.9 * capacity;
    eprintln!("soak: capacity {capacity:.0} cells/s; offering {rate:.0} cells/s for {seconds} s");

    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let running = AtomicBool::new(true);
    let samples = Mutex::new(Vec::<Sample>::new());
    let sent = Mutex::new(Sent::default());
    let uploads_ok = AtomicUsize::new(0);
    // (end of the load and its backlog, start of the quiet spell), in seconds from `start`.
    let marks = Mutex::new((0.0f64, 0.0f64));
    let every = Duration::from_secs_f64((seconds / 60.0).clamp(1.0, 5.0));
    let bodies: BTreeMap<String, Arc<Vec<u8>>> = ["a.csb", "d.csb"]
        .iter()
        .map(|n| (n.to_string(), Arc::new(std::fs::read(src.join(n)).unwrap())))
        .collect();
    std::thread::scope(|s| {
        // Sampler.
        s.spawn(|| {
            while running.load(Ordering::SeqCst) {
                if let Some(x) = sample(pid, start) {
                    samples.lock().unwrap().push(x);
                }
                std::thread::sleep(every);
            }
        });
        // Good batches at 90% of capacity, one in four as an upload; a cut-off upload
        // every fifth arrival.
        s.spawn(|| {
            let mut k = 0usize;
            // Arrivals on a schedule (cells offered so far / rate), whatever each send took.
            let mut offered = 0.0;
            while Instant::now() < deadline {
                let (name, range) = &sources[k % sources.len()];
                let id = cellstream::batch::batch_id_of(Path::new(name));
                let ext = name.strip_prefix(id.as_str()).unwrap_or("");
                let copy = format!("g{k:06}-{id}");
                if k % 4 == 3 && bodies.contains_key(*name) {
                    let path = format!("/v1/batches?name={copy}{ext}");
                    let body = &bodies[*name];
                    match request(&addr, "POST", &path, &[], Some(body)) {
                        Ok((202, _)) => {
                            uploads_ok.fetch_add(1, Ordering::SeqCst);
                            sent.lock().unwrap().good.insert(copy.clone(), id.clone());
                        }
                        _ => sent.lock().unwrap().uploads_refused += 1,
                    }
                } else {
                    drop_batch(&d.incoming, &src.join(name), &format!("{copy}{ext}"));
                    sent.lock().unwrap().good.insert(copy, id);
                }
                if k % 5 == 4 {
                    cut_upload(&addr, &format!("cut{k:06}.csb"), &bodies["d.csb"]);
                    sent.lock().unwrap().uploads_cut += 1;
                }
                k += 1;
                offered += range.len() as f64;
                let next = start + Duration::from_secs_f64(offered / rate);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        // The malformed corpus, cycled, four entries a second.
        s.spawn(|| {
            let mut k = 0usize;
            while Instant::now() < deadline {
                let (name, entry) = &bad[k % bad.len()];
                let unique = format!("bad{k:06}-{name}");
                materialise(&unique, entry, &staging);
                std::fs::rename(staging.join(&unique), d.incoming.join(&unique)).unwrap();
                sent.lock().unwrap().bad.push(unique);
                k += 1;
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        // Stream clients: one reads a few records, one sits without reading (it falls
        // behind and is told so), each drops.
        s.spawn(|| {
            let mut k = 0usize;
            while Instant::now() < deadline {
                match k % 3 {
                    0 => stream_visit(&addr, false, 50, Duration::ZERO),
                    1 => stream_visit(&addr, true, 20, Duration::ZERO),
                    _ => stream_visit(&addr, false, 0, Duration::from_secs(3)),
                }
                sent.lock().unwrap().stream_clients += 1;
                k += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        // SIGHUP reloads every few seconds, each changing a key.
        s.spawn(|| {
            let mut k = 0usize;
            while Instant::now() + Duration::from_secs(4) < deadline {
                std::thread::sleep(Duration::from_secs(4));
                config(if k.is_multiple_of(2) { 0.6 } else { 0.5 });
                daemon.signal("HUP");
                sent.lock().unwrap().reloads += 1;
                k += 1;
            }
        });
        // The load stops at the deadline; then the backlog is worked off and sampled.
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        wait_for(Duration::from_secs(600), "the backlog", || {
            names_in(&d.incoming).is_empty() && names_in(&d.processing).is_empty()
        });
        std::thread::sleep(every * 2);
        let load_end = start.elapsed().as_secs_f64();
        // tokio's blocking pool keeps a thread 10 s past its last task: after a quiet spell
        // longer than that, the descriptors and threads that remain are what a leak raises.
        std::thread::sleep(Duration::from_secs(11));
        *marks.lock().unwrap() = (load_end, start.elapsed().as_secs_f64());
        std::thread::sleep(every * 4);
        running.store(false, Ordering::SeqCst);
    });
    let (load_end, quiet_from) = marks.into_inner().unwrap();
    let sent = sent.into_inner().unwrap();
    let samples = samples.into_inner().unwrap();

    // Nothing lost: every good batch's output is `embed`'s (its batch id aside).
    let mut cells_out = 0;
    for (copy, id) in &sent.good {
        let got = output(&d, copy).unwrap_or_else(|| panic!("{copy}: no output"));
        let renamed = got.replace(
            &format!("{{\"batch\":\"{copy}\","),
            &format!("{{\"batch\":\"{id}\","),
        );
        assert_eq!(
            renamed, expected[id],
            "{copy}: differs from `embed` on {id}"
        );
        cells_out += cells[id];
    }
    for name in &sent.bad {
        assert!(
            d.failed.join(format!("{name}.error.json")).exists(),
            "{name}: no error report"
        );
    }
    // Nothing left behind: no partial upload, no temporary output.
    let leftovers: Vec<String> = names_in(&d.incoming)
        .into_iter()
        .chain(names_in(&d.out).into_iter().filter(|n| n.starts_with('.')))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    let cut: Vec<String> = names_in(&d.out)
        .into_iter()
        .chain(names_in(&d.failed))
        .filter(|n| n.starts_with("cut"))
        .collect();
    assert!(
        cut.is_empty(),
        "an upload cut off mid-body became a batch: {cut:?}"
    );
    assert!(daemon.log_text().contains("SIGHUP: reloaded"));

    // Drift: the first sixth of the load warms up, the next sixth is the baseline, the last
    // sixth (with the backlog) the end for memory; descriptors and threads are compared after
    // the quiet spell.
    let elapsed = load_end;
    let warm = (elapsed / 6.0).max(every.as_secs_f64() * 3.0);
    let window = |from: f64, to: f64| -> Vec<Sample> {
        samples
            .iter()
            .filter(|x| x.secs >= from && x.secs < to)
            .copied()
            .collect()
    };
    let base = window(warm, 2.0 * warm);
    let last = window(elapsed - warm, elapsed + 0.5);
    let quiet = window(quiet_from, f64::INFINITY);
    assert!(
        base.len() >= 3 && last.len() >= 3 && quiet.len() >= 3,
        "too few samples: {}, {} and {}",
        base.len(),
        last.len(),
        quiet.len()
    );
    let stat = |w: &[Sample], f: fn(&Sample) -> u64| median(w.iter().map(f).collect());
    let max = |w: &[Sample], f: fn(&Sample) -> u64| w.iter().map(f).max().unwrap_or(0);
    let (rss0, rss1) = (stat(&base, |x| x.rss), stat(&last, |x| x.rss));
    let (max0, max1) = (max(&base, |x| x.rss), max(&last, |x| x.rss));
    let (hwm0, hwm1) = (base[0].hwm, last[last.len() - 1].hwm);
    // Descriptors and threads come and go with clients, uploads and reloads: their floor in
    // a window is what stays, and a leak would raise it.
    let floor = |w: &[Sample], f: fn(&Sample) -> u64| w.iter().map(f).min().unwrap_or(0);
    let (fd0, fd1) = (floor(&base, |x| x.fds), floor(&quiet, |x| x.fds));
    let (th0, th1) = (floor(&base, |x| x.threads), floor(&quiet, |x| x.threads));
    let (fdm0, fdm1) = (stat(&base, |x| x.fds), stat(&quiet, |x| x.fds));
    let (thm0, thm1) = (stat(&base, |x| x.threads), stat(&quiet, |x| x.threads));
    let growth = |a: u64, b: u64| 100.0 * (b as f64 / a.max(1) as f64 - 1.0);
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let summary = format!(
        "soak: {elapsed:.0} s at {:.0}% of {capacity:.0} cells/s: {} good batches ({cells_out} cells, {} uploaded), {} malformed, {} uploads cut off, {} refused, {} stream clients, {} reloads\n\
         soak: resident median {:.1} → {:.1} MiB ({:+.1}%), max {:.1} → {:.1} MiB ({:+.1}%), peak (VmHWM) {:.1} → {:.1} MiB ({:+.1}%) after the first {warm:.0} s\n\
         soak: open fds floor {fd0} → {fd1} (median {fdm0} → {fdm1}), threads floor {th0} → {th1} (median {thm0} → {thm1}) after {:.0} s quiet; {} samples every {:.0} s\n",
        100.0 * rate / capacity,
        sent.good.len(),
        uploads_ok.load(Ordering::SeqCst),
        sent.bad.len(),
        sent.uploads_cut,
        sent.uploads_refused,
        sent.stream_clients,
        sent.reloads,
        mib(rss0),
        mib(rss1),
        growth(rss0, rss1),
        mib(max0),
        mib(max1),
        growth(max0, max1),
        mib(hwm0),
        mib(hwm1),
        growth(hwm0, hwm1),
        quiet_from - load_end,
        samples.len(),
        every.as_secs_f64(),
    );
    eprint!("{summary}");
    if let Some(dir) = report_dir {
        std::fs::create_dir_all(&dir).unwrap();
        let mut csv = String::from("seconds,rss_bytes,hwm_bytes,threads,fds\n");
        for x in &samples {
            csv.push_str(&format!(
                "{:.1},{},{},{},{}\n",
                x.secs, x.rss, x.hwm, x.threads, x.fds
            ));
        }
        std::fs::write(dir.join("samples.csv"), csv).unwrap();
        std::fs::write(dir.join("summary.txt"), &summary).unwrap();
    }
    // 5%, or 2 MiB: which batches happen to be in flight at the samples moves the median of
    // a one-minute window by about that much in a daemon of 40 MiB.
    assert!(
        growth(rss0, rss1) <= 5.0 || rss1 <= rss0 + (2 << 20),
        "resident memory grew {:.1}% ({:.1} → {:.1} MiB)",
        growth(rss0, rss1),
        mib(rss0),
        mib(rss1)
    );
    // What stays once the daemon is quiet against what was usual under load at the start:
    // a leak raises the quiet floor above the baseline, load alone does not.
    assert!(
        fd1 <= fd0.max(fdm0) + 2,
        "open fds went from {fd0} (median {fdm0}) to {fd1}"
    );
    assert!(
        th1 <= th0.max(thm0) + 2,
        "threads went from {th0} (median {thm0}) to {th1}"
    );
}

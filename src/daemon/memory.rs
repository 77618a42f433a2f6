//! The daemon's memory budget: how many bytes it may hold, what it holds now, and what a
//! batch will cost by its headers' claims, so that a batch that cannot fit is quarantined
//! (`too_large`, the budget named) instead of getting the daemon killed by the kernel.
//!
//! The budget is `[pipeline] memory_budget` when set, else 90% of the cgroup's `memory.max`
//! (systemd's `MemoryMax=`; the rest is left to the page cache of the files the daemon
//! writes and to the HDF5 child), else 90% of the machine's memory. A batch is admitted when
//! the daemon's resident memory, plus what the batches still being written will take, plus
//! the batch's own estimate fit in it; when only the batches being written stand in the way,
//! the batch waits for them.

use std::path::{Path, PathBuf};

use crate::batch::Claims;
use crate::config::{Config, EmbeddingEncoding};

/// How many bytes the daemon may use, and where that figure comes from (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub bytes: u64,
    pub source: String,
}

/// The share of a cgroup limit (or of the machine's memory) the daemon itself budgets for.
const SHARE: f64 = 0.9;

impl Budget {
    /// The budget the config sets, or the one derived from the cgroup or the machine.
    pub fn of(cfg: &Config) -> Budget {
        if let Some(bytes) = cfg.pipeline.memory_budget {
            return Budget {
                bytes,
                source: "pipeline.memory_budget".into(),
            };
        }
        if let Some((limit, file)) =
            cgroup_limit(Path::new("/proc/self/cgroup"), Path::new(CGROUP_ROOT))
        {
            return Budget {
                bytes: (limit as f64 * SHARE) as u64,
                source: format!(
                    "90% of the cgroup's limit {} ({})",
                    mib(limit),
                    file.display()
                ),
            };
        }
        match physical_memory() {
            Some(total) => Budget {
                bytes: (total as f64 * SHARE) as u64,
                source: format!("90% of the machine's {}", mib(total)),
            },
            None => Budget {
                bytes: u64::MAX,
                source: "no limit found".into(),
            },
        }
    }
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The tightest `memory.max` on the way from this process's cgroup (v2, as `/proc/self/cgroup`
/// names it) up to the root, and the file that sets it; `None` when no level sets one.
pub fn cgroup_limit(proc_cgroup: &Path, root: &Path) -> Option<(u64, PathBuf)> {
    let text = std::fs::read_to_string(proc_cgroup).ok()?;
    // cgroup v2: the one line "0::/system.slice/cellstream.service".
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let mut dir = root.join(rel.trim_start_matches('/'));
    let mut best: Option<(u64, PathBuf)> = None;
    loop {
        let file = dir.join("memory.max");
        if let Some(limit) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
        {
            if best.as_ref().is_none_or(|(b, _)| limit < *b) {
                best = Some((limit, file));
            }
        }
        if dir == root || !dir.pop() || !dir.starts_with(root) {
            return best;
        }
    }
}

/// The machine's memory (sysinfo(2): works where `/proc/meminfo` is hidden by
/// `ProcSubset=pid`).
fn physical_memory() -> Option<u64> {
    // SAFETY: sysinfo fills the struct it is given; zeroed is a valid value of it.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    Some(info.totalram as u64 * info.mem_unit as u64)
}

/// This process's resident memory now (`/proc/self/statm`).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}

/// What the model makes of each cell, for the estimate.
#[derive(Debug, Clone, Copy)]
pub struct ModelShape {
    pub embedding_dim: u64,
    pub n_classes: u64,
    pub max_len: u64,
}

/// What a batch will take, by its claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// At the batch stage's peak: reading, or the batch with its tokens and results.
    pub process: u64,
    /// The records the emit stage writes (held until they are committed and streamed).
    pub records: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.process.saturating_add(self.records)
    }
}

/// The estimate for a batch of these claims through this model.
pub fn estimate(c: &Claims, m: &ModelShape, encoding: EmbeddingEncoding) -> Estimate {
    let cells = c.cells;
    // Tokens: an id (u32) and a value (f32) per kept gene and <cls>; per cell an offset and
    // its coverage figures.
    let kept = c
        .stored
        .saturating_add(cells)
        .min(cells.saturating_mul(m.max_len + 1));
    let tokens = kept
        .saturating_mul(8)
        .saturating_add(cells.saturating_mul(40));
    // The model's outputs per cell (embedding and logits), then the result each becomes (its
    // embedding moved over, a label, QC).
    let outputs = cells.saturating_mul(4 * (m.embedding_dim + m.n_classes) + 64);
    let results = cells.saturating_mul(160);
    let process = c.read_bytes.max(
        c.batch_bytes
            .saturating_add(tokens)
            .saturating_add(outputs)
            .saturating_add(results),
    );
    // A record: the embedding as text (about 12 characters a value as an array, 16/3 bytes
    // per value in base64), barcode, label and QC.
    let per_record = match encoding {
        EmbeddingEncoding::Array => 13 * m.embedding_dim + 512,
        EmbeddingEncoding::Base64 => 6 * m.embedding_dim + 512,
    };
    Estimate {
        process,
        records: cells.saturating_mul(per_record),
    }
}

/// Bytes as "123.4 MiB".
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Format;

    #[test]
    fn the_tightest_cgroup_limit_on_the_way_up_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cg");
        let unit = root.join("system.slice/cellstream.service");
        std::fs::create_dir_all(&unit).unwrap();
        let proc = dir.path().join("cgroup");
        std::fs::write(&proc, "0::/system.slice/cellstream.service\n").unwrap();
        assert_eq!(cgroup_limit(&proc, &root), None);
        std::fs::write(unit.join("memory.max"), "max\n").unwrap();
        std::fs::write(root.join("system.slice/memory.max"), "8589934592\n").unwrap();
        assert_eq!(
            cgroup_limit(&proc, &root),
            Some((8 << 30, root.join("system.slice/memory.max")))
        );
        std::fs::write(unit.join("memory.max"), "2147483648\n").unwrap();
        assert_eq!(
            cgroup_limit(&proc, &root),
            Some((2 << 30, unit.join("memory.max")))
        );
        // cgroup v1 (no "0::" line): no limit read.
        std::fs::write(&proc, "4:memory:/x\n").unwrap();
        assert_eq!(cgroup_limit(&proc, &root), None);
    }

    #[test]
    fn the_budget_is_the_config_s_else_derived() {
        let base = "[spool]\ndir = \"/s\"\n[output]\ndir = \"/o\"\n";
        let cfg = Config::parse(&format!("{base}[pipeline]\nmemory_budget = 536870912\n")).unwrap();
        assert_eq!(
            Budget::of(&cfg),
            Budget {
                bytes: 512 << 20,
                source: "pipeline.memory_budget".into()
            }
        );
        let derived = Budget::of(&Config::parse(base).unwrap());
        assert!(derived.bytes > 64 << 20, "{derived:?}");
        assert!(resident_bytes().unwrap() > 1 << 20);
    }

    /// A 21,000-cell MTX of 17.9 M counts (the issue's): about what was measured.
    #[test]
    fn the_estimate_of_a_large_mtx_is_of_the_measured_order() {
        let (cells, genes, stored) = (21_000u64, 32_738u64, 17_908_199u64);
        let batch_bytes = 8 * stored + 8 * (cells + 1) + 64 * (cells + 2 * genes);
        let claims = Claims {
            format: Format::Mtx,
            cells,
            genes,
            stored,
            batch_bytes,
            read_bytes: batch_bytes + 4 * stored + (4 << 20) + 48 * cells,
        };
        let m = ModelShape {
            embedding_dim: 128,
            n_classes: 9,
            max_len: 256,
        };
        let e = estimate(&claims, &m, EmbeddingEncoding::Array);
        assert!(
            (150 << 20..400 << 20).contains(&e.total()),
            "{}",
            mib(e.total())
        );
    }
}

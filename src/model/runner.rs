//! Running the model through tract: one optimized plan per batch shape (rows × length), shared
//! by every worker; one tract `State` per plan per worker thread. The pipeline uses one shape
//! per length bucket (its rows fixed by the token budget), so a handful of plans serve it.
//!
//! Shapes are concrete, not symbolic in the row count: tract picks its vectorised kernels for
//! a broadcast (the attention's key-padding mask) only when it can prove the sizes, and with
//! a symbolic row count the mask add fell back to a scalar loop that took a quarter of the
//! forward pass (BENCHMARKS.md).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context};
use tract::prelude::*;

use super::fuse::{
    Fusion, Precision, TokenTables, F32_PRODUCTS_PROPERTY, FUSED_ATTENTION_PROPERTY,
    FUSED_LAYER_NORM_PROPERTY, INT8_ATTENTION_PROPERTY, INT8_BYTES_PROPERTY,
    INT8_PRODUCTS_PROPERTY, OWN_F32_PRODUCTS, ROWS_AS_SLICES, TOKEN_TABLES_PROPERTY,
    TOKEN_TABLE_BYTES_PROPERTY, TOKEN_TABLE_REPLACED_PROPERTY,
};
use super::kernel_choice::KernelChoice;
use super::package::{ModelError, ModelPackage};
use super::shared_weights::{self, PackedUsage, PACKED_BYTES_PROPERTY, SHARED_BYTES_PROPERTY};
use crate::simd::Simd;

/// Padded model input for `n` rows of length `s`, and the outputs that came back.
pub struct ModelInput {
    pub n: usize,
    pub s: usize,
    pub gene_ids: Vec<i64>,
    pub values: Vec<f32>,
}

/// Outputs of one batch, row-major.
pub struct Outputs {
    /// [n, embedding_dim], as the model returns it (not normalised).
    pub embedding: Vec<f32>,
    /// [n, n_classes] when the model classifies.
    pub logits: Option<Vec<f32>>,
}

/// How a runtime runs its graph: rewritten or not, on which kernels. The fastest on this CPU
/// by default; the environment's knobs (`CELLSTREAM_FUSION`, `CELLSTREAM_TOKEN_TABLES`,
/// `CELLSTREAM_SIMD`, `CELLSTREAM_KERNELS`) pick others for comparisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub fusion: Fusion,
    /// Token tables are folded only into a fused graph (they look for the fused LayerNorm).
    pub tables: TokenTables,
    /// The tier of our ops' kernels, and the cap on tract's matmul kernels.
    pub simd: Simd,
    /// How tract's matmul kernels are chosen within that tier.
    pub kernels: KernelChoice,
    /// The products' arithmetic; `None`: as the package's manifest says (f32 by default).
    pub precision: Option<Precision>,
}

impl Options {
    /// The fastest on this CPU.
    pub fn best() -> Options {
        Options::tier(Simd::detect())
    }

    /// The fastest at tier `simd` (which this CPU must run): what a CPU of that tier runs.
    pub fn tier(simd: Simd) -> Options {
        Options {
            fusion: Fusion::best(),
            tables: TokenTables::Folded,
            simd,
            kernels: KernelChoice::best(simd),
            precision: None,
        }
    }

    /// The graph as exported, on tract's own ops and kernel choice, at tier `simd`: the
    /// benchmarks' "unfused" rows.
    pub fn unfused(simd: Simd) -> Options {
        Options {
            fusion: Fusion::Tract,
            tables: TokenTables::Computed,
            simd,
            kernels: KernelChoice::Tract,
            precision: Some(Precision::F32),
        }
    }

    /// [`Options::best`], except what the environment's knobs name.
    pub fn from_env() -> Result<Options, String> {
        let simd = Simd::from_env()?;
        Ok(Options {
            fusion: Fusion::from_env()?,
            tables: TokenTables::from_env()?,
            simd,
            kernels: KernelChoice::from_env(simd)?,
            precision: Precision::from_env()?,
        })
    }
}

/// The loaded model: its parsed graph, where its inputs and outputs are, and the plan cache.
pub struct ModelRuntime {
    /// Parsed and decluttered once with symbolic rows `N` and length `S`; each plan starts
    /// from a clone, which shares the weight tensors (`Arc`) instead of parsing its own copy.
    /// `None` once released (`release_graph`): the plans then hold all that they run.
    model: Mutex<Option<Model>>,
    path: std::path::PathBuf,
    /// Position of `gene_ids` and `values` among the graph's inputs.
    input_pos: [usize; 2],
    embedding_pos: usize,
    logits_pos: Option<usize>,
    pub pad_id: i64,
    pub cls_id: i64,
    pub pad_value: f32,
    pub max_len: usize,
    pub embedding_dim: usize,
    pub n_classes: usize,
    /// How the graph runs, and how many fused ops of each kind it holds.
    pub options: Options,
    /// The products' arithmetic, as the package or the knob chose it.
    pub precision: Precision,
    pub fused: Fused,
    /// Optimized plans by (rows, length).
    plans: Mutex<HashMap<(usize, usize), Runnable>>,
}

impl ModelRuntime {
    /// [`ModelRuntime::with`] the fastest form and kernels on this CPU (or the ones the
    /// environment's knobs name, [`Options::from_env`]).
    pub fn new(pkg: &ModelPackage) -> Result<Arc<ModelRuntime>, ModelError> {
        let options = Options::from_env().map_err(|what| ModelError::Graph {
            path: pkg.dir.join("model.onnx"),
            what,
        })?;
        ModelRuntime::with(pkg, options)
    }

    /// Maps the manifest's input and output names onto the graph's positions, then runs a
    /// probe inference (one `<cls>`-only row) that compiles the first plan and checks the
    /// output shapes.
    pub fn with(pkg: &ModelPackage, options: Options) -> Result<Arc<ModelRuntime>, ModelError> {
        let path = pkg.dir.join("model.onnx");
        let graph_err = |what: String| ModelError::Graph {
            path: path.clone(),
            what,
        };
        let (inputs, outputs) = pkg
            .onnx
            .map()
            .map_err(|e| e.to_string())
            .and_then(|map| super::onnx_names::io_names(&map))
            .map_err(|e| graph_err(format!("cannot read the graph's inputs and outputs: {e}")))?;
        let find = |list: &[String], want: &str, what: &str| {
            list.iter().position(|n| n == want).ok_or_else(|| {
                graph_err(format!(
                    "the manifest's {what} {want:?} is not in the graph (it has {list:?})"
                ))
            })
        };
        let m = &pkg.manifest;
        let input_pos = [
            find(&inputs, &m.inputs.gene_ids, "input")?,
            find(&inputs, &m.inputs.values, "input")?,
        ];
        let embedding_pos = find(&outputs, &m.outputs.embedding, "output")?;
        let logits_pos = m
            .outputs
            .logits
            .as_deref()
            .map(|l| find(&outputs, l, "output"))
            .transpose()?;
        // Int8 products are a rewrite among the fused ones; the unfused graph stays as it is.
        let precision = match options.fusion {
            Fusion::Tract => Precision::F32,
            Fusion::Fused => options.precision.unwrap_or(pkg.precision()),
        };
        let (model, fused) = load(&pkg.onnx.parse_path(), input_pos, options, precision)
            .map_err(|e| graph_err(format!("cannot load the graph: {e:#}")))?;
        if fused.int8_products + fused.f32_products > 0 {
            steady_heap();
        }
        let rt = Arc::new(ModelRuntime {
            model: Mutex::new(Some(model)),
            path: path.clone(),
            input_pos,
            embedding_pos,
            logits_pos,
            pad_id: pkg.vocab.pad_id as i64,
            cls_id: pkg.vocab.cls_id as i64,
            pad_value: m.pad_value,
            max_len: m.max_len,
            embedding_dim: m.embedding_dim,
            n_classes: pkg.labels.as_ref().map_or(0, Vec::len),
            options,
            precision,
            fused,
            plans: Mutex::new(HashMap::new()),
        });
        // Also checks the output widths against embedding_dim and labels.txt (run_state).
        rt.probe()
            .map_err(|e| graph_err(format!("probe inference failed: {e:#}")))?;
        // No batch has the probe's shape: its plan (and its packed weights) would be dead weight.
        rt.plans.lock().unwrap().clear();
        Ok(rt)
    }

    /// One `<cls>`-only row through a one-token plan: proves the model runs.
    fn probe(&self) -> anyhow::Result<Outputs> {
        let mut batch = ModelInput::new(1, 1);
        batch.gene_ids[0] = self.cls_id;
        batch.values[0] = self.pad_value;
        run_state(&mut self.plan(1, 1)?.spawn_state()?, self, &batch)
    }

    /// The optimized plan for `n` rows of length `s`, compiled on first use and shared by
    /// every worker.
    pub fn plan(&self, n: usize, s: usize) -> anyhow::Result<Runnable> {
        if let Some(p) = self.plans.lock().unwrap().get(&(n, s)) {
            return Ok(p.clone());
        }
        let mut model = self.model.lock().unwrap().clone().ok_or_else(|| {
            anyhow!("no plan for {n} × {s} tokens was built before the parsed graph was released")
        })?;
        // Concrete sizes, then tract's optimizer: it picks vectorised kernels only for sizes
        // it can prove (see the module comment). Our runtime is tract's CPU one, sharing
        // packed weights with the plans built before (`shared_weights.rs`).
        let runtime = tract::runtime_for_name(shared_weights::RUNTIME_NAME)?;
        let runnable = model
            .transform(SetSymbols::new().value("N", n as i64).value("S", s as i64))
            .and_then(|()| {
                let Options { kernels, simd, .. } = self.options;
                kernels.planning(simd, || runtime.prepare(model))
            })
            .with_context(|| format!("optimizing {} for {n} × {s} tokens", self.path.display()))?;
        self.plans.lock().unwrap().insert((n, s), runnable.clone());
        // Optimizing packed every weight again before the shared copies replaced them.
        release_free_memory();
        Ok(runnable)
    }

    /// The packed weights of the plans built so far (the probe's excepted), and how much of
    /// them each plan shares with the plans built before it.
    pub fn packed_weights(&self) -> anyhow::Result<PackedUsage> {
        let mut usage = PackedUsage::default();
        for plan in self.plans.lock().unwrap().values() {
            usage.bytes += count_of(plan.property(PACKED_BYTES_PROPERTY)?)?;
            usage.shared += count_of(plan.property(SHARED_BYTES_PROPERTY)?)?;
        }
        Ok(usage)
    }

    /// Drops the parsed graph once every plan the caller needs exists: the optimized plans
    /// hold the matmul weights packed (shared between them, `shared_weights.rs`), so the
    /// graph's unpacked ones (about half the model file) were only kept for plans not built
    /// yet. `plan` fails for a new
    /// shape afterwards.
    pub fn release_graph(&self) {
        self.model.lock().unwrap().take();
    }
}

/// How many ops of each kind the fusion made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fused {
    pub attention_layers: usize,
    pub layer_norms: usize,
    /// Functions of one token's input computed as tables (`fuse/token_tables.rs`): outputs
    /// of the table op, the tables' bytes, and the bytes of the graph's constants they
    /// replaced (the gene embedding).
    pub token_tables: usize,
    pub token_table_bytes: usize,
    pub token_table_replaced_bytes: usize,
    /// Products by constant weights made int8 (`fuse/linear.rs`), and their packed weights.
    pub int8_products: usize,
    pub int8_weight_bytes: usize,
    /// Attention layers whose weighted sum runs in integers (`fuse/attention_int8.rs`).
    pub int8_attention_layers: usize,
    /// f32 products by constant weights on our own kernel (`fuse/f32_kernel.rs`).
    pub f32_products: usize,
}

/// The parsed, decluttered graph with symbolic rows and length, fused and folded as asked.
fn load(
    path: &std::path::Path,
    [ids, vals]: [usize; 2],
    options: Options,
    precision: Precision,
) -> anyhow::Result<(Model, Fused)> {
    // Exported graphs carry value_info shapes traced at one length; ignore them so that
    // the batch and sequence dimensions are the symbols each plan sets.
    // From the file, which tract maps and decodes in place: from a buffer it would copy the
    // bytes first, a third copy of the weights at the load's peak.
    let mut model = onnx()?.load_with_options(path, OnnxOptions::new().ignore_value_info(true))?;
    model.set_input_fact(ids, "N,S,i64")?;
    model.set_input_fact(vals, "N,S,f32")?;
    let mut model = model.into_model()?;
    let Some(transform) = options.fusion.transform(options.simd) else {
        return Ok((model, Fused::default()));
    };
    model.transform(transform)?;
    if let Some(fold) = options.tables.transform() {
        model.transform(fold)?;
    }
    model.transform(ROWS_AS_SLICES)?;
    if let Some(int8) = precision.transform(options.simd) {
        model.transform(int8)?;
    } else if options.kernels == KernelChoice::Own {
        model.transform(OWN_F32_PRODUCTS)?;
    }
    let count = |name: &str| model.property(name).map_or(Ok(0), count_of);
    let fused = Fused {
        attention_layers: count(FUSED_ATTENTION_PROPERTY)?,
        layer_norms: count(FUSED_LAYER_NORM_PROPERTY)?,
        token_tables: count(TOKEN_TABLES_PROPERTY)?,
        token_table_bytes: count(TOKEN_TABLE_BYTES_PROPERTY)?,
        token_table_replaced_bytes: count(TOKEN_TABLE_REPLACED_PROPERTY)?,
        int8_products: count(INT8_PRODUCTS_PROPERTY)?,
        int8_weight_bytes: count(INT8_BYTES_PROPERTY)?,
        int8_attention_layers: count(INT8_ATTENTION_PROPERTY)?,
        f32_products: count(F32_PRODUCTS_PROPERTY)?,
    };
    Ok((model, fused))
}

/// Returns the free pages of every malloc heap to the system. glibc keeps freed memory in
/// per-thread heaps and, once a multi-megabyte buffer (a batch's bytes, its records, a plan's
/// packed weights before the shared copies replaced them) has been freed, serves later ones
/// from those heaps too, where they fragment: without this resident memory creeps up batch
/// after batch, plan after plan. Costs a millisecond or so (BENCHMARKS.md, serve peak RSS;
/// [`HeapTrim`]).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// When an inference worker returns its heaps' free pages: after a job, once at least
/// [`HeapTrim::INTERVAL`] and [`HeapTrim::SHARE`] times the last trim's cost have passed since
/// it, so that trimming (and faulting the pages in again) stays a small share of the worker's
/// time. Between batches is not often enough on a large model: the forward passes of one
/// batch of long cells allocate and free activations of so many sizes that the freed
/// fragments left resident push the peak past the memory target (BENCHMARKS.md, "f32: the
/// workers' heaps trimmed between jobs").
pub struct HeapTrim {
    last: std::time::Instant,
    cost: std::time::Duration,
}

impl HeapTrim {
    /// The least time between two trims.
    pub const INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);
    /// The least ratio of the time between trims to a trim's cost.
    pub const SHARE: u32 = 100;

    /// Counts from now: the first trim follows the first job to end [`HeapTrim::INTERVAL`] later.
    pub fn new() -> HeapTrim {
        HeapTrim {
            last: std::time::Instant::now(),
            cost: std::time::Duration::ZERO,
        }
    }

    /// Call after each job.
    pub fn after_job(&mut self) {
        let start = std::time::Instant::now();
        if self.due(start) {
            release_free_memory();
            self.last = std::time::Instant::now();
            self.cost = self.last - start;
        }
    }

    fn due(&self, now: std::time::Instant) -> bool {
        now.saturating_duration_since(self.last) >= Self::INTERVAL.max(self.cost * Self::SHARE)
    }
}

impl Default for HeapTrim {
    fn default() -> HeapTrim {
        HeapTrim::new()
    }
}

/// Fixes glibc's mmap and trim thresholds at the values its adaptive ones top out at
/// (32 MiB; trim above 64 MiB), once per process, unless `GLIBC_TUNABLES` sets either.
/// Left adaptive, the mmap threshold follows the largest buffer freed so far and the heap
/// is trimmed above twice that: the multi-megabyte outputs of our `Linear` ops (int8, and
/// f32 on our own kernel) were mapped, faulted in page by page and unmapped again on every
/// call (BENCHMARKS.md, "int8: the heap kept between calls", "Our own f32 products on AVX2").
/// Only plans with such ops ask for it: on tract's own products it gained nothing
/// measurable and held more memory, so they keep glibc's defaults. Between batches
/// [`release_free_memory`] still returns what the heap holds free.
fn steady_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let chosen = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| {
                t.contains("glibc.malloc.mmap_threshold")
                    || t.contains("glibc.malloc.trim_threshold")
            });
            if !chosen {
                // SAFETY: mallopt only changes allocator parameters; it is thread-safe.
                unsafe {
                    libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                    libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
                }
            }
        });
    }
}

/// A count our transforms and runtime record as a property (an i64 scalar).
fn count_of(property: Tensor) -> anyhow::Result<usize> {
    Ok(property.as_shape_and_slice::<i64>()?.1[0] as usize)
}

impl ModelInput {
    pub fn new(n: usize, s: usize) -> ModelInput {
        ModelInput {
            n,
            s,
            gene_ids: vec![0; n * s],
            values: vec![0.0; n * s],
        }
    }

    /// Fills row `row` with `ids`/`values` (at most `s` tokens), padding the rest.
    pub fn set_row(
        &mut self,
        row: usize,
        ids: &[u32],
        values: &[f32],
        pad_id: i64,
        pad_value: f32,
    ) {
        let r = row * self.s..(row + 1) * self.s;
        let (gid, val) = (&mut self.gene_ids[r.clone()], &mut self.values[r]);
        let k = ids.len().min(self.s);
        for (d, &t) in gid.iter_mut().zip(&ids[..k]) {
            *d = t as i64;
        }
        val[..k].copy_from_slice(&values[..k]);
        gid[k..].fill(pad_id);
        val[k..].fill(pad_value);
    }
}

/// A worker's handle on the model: one tract `State` per plan it has used, and the one core
/// it may use.
pub struct Worker {
    rt: Arc<ModelRuntime>,
    states: HashMap<(usize, usize), State>,
    /// tract's fused attention spreads heads over the current rayon pool (by default one
    /// thread per core, shared by every worker). Running each worker's inference inside its
    /// own one-thread pool keeps `--threads N` to N cores and workers from contending.
    pool: rayon::ThreadPool,
}

impl Worker {
    pub fn new(rt: Arc<ModelRuntime>) -> Worker {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|i| format!("tract-attn-{i}"))
            .build()
            .expect("building a one-thread pool");
        Worker {
            rt,
            states: HashMap::new(),
            pool,
        }
    }

    pub fn runtime(&self) -> &Arc<ModelRuntime> {
        &self.rt
    }

    pub fn run(&mut self, batch: &ModelInput) -> anyhow::Result<Outputs> {
        let state = match self.states.entry((batch.n, batch.s)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(self.rt.plan(batch.n, batch.s)?.spawn_state()?),
        };
        let rt = &self.rt;
        self.pool.install(|| run_state(state, rt, batch))
    }
}

fn run_state(state: &mut State, rt: &ModelRuntime, batch: &ModelInput) -> anyhow::Result<Outputs> {
    let shape = [batch.n, batch.s];
    let ids = Tensor::from_slice(&shape, &batch.gene_ids)?;
    let vals = Tensor::from_slice(&shape, &batch.values)?;
    let inputs = if rt.input_pos == [0, 1] {
        vec![ids, vals]
    } else {
        vec![vals, ids]
    };
    let outputs = state.run(inputs)?;
    let take = |pos: usize, width: usize, what: &str| -> anyhow::Result<Vec<f32>> {
        let t = outputs
            .get(pos)
            .ok_or_else(|| anyhow!("no output {pos} ({what})"))?;
        let (shape, data) = t.as_shape_and_slice::<f32>()?;
        if shape != [batch.n, width] {
            bail!(
                "{what} has shape {shape:?}, expected [{}, {width}]",
                batch.n
            );
        }
        Ok(data.to_vec())
    };
    let embedding = take(rt.embedding_pos, rt.embedding_dim, "embedding")?;
    let logits = rt
        .logits_pos
        .map(|p| take(p, rt.n_classes, "logits"))
        .transpose()?;
    Ok(Outputs { embedding, logits })
}

#[cfg(test)]
mod tests {
    use super::HeapTrim;
    use std::time::{Duration, Instant};

    #[test]
    fn heap_trim_waits_for_its_interval_and_its_cost() {
        let t0 = Instant::now();
        let mut trim = HeapTrim {
            last: t0,
            cost: Duration::ZERO,
        };
        assert!(!trim.due(t0));
        assert!(!trim.due(t0 + HeapTrim::INTERVAL - Duration::from_millis(1)));
        assert!(trim.due(t0 + HeapTrim::INTERVAL));
        // A trim that cost 10 ms waits 100 times that, longer than the interval.
        trim.cost = Duration::from_millis(10);
        assert!(!trim.due(t0 + Duration::from_millis(999)));
        assert!(trim.due(t0 + Duration::from_millis(1000)));
    }
}

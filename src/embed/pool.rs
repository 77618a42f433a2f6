//! Inference workers on dedicated threads, fed by a bounded crossbeam channel: a full channel
//! blocks the sender, so backpressure reaches whoever produces batches.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::batch::isolated::panic_message;
use crate::model::{HeapTrim, ModelInput, ModelRuntime, Outputs, Worker};

/// One batch to run, and where to send its outputs (tagged with `id`).
pub struct Job {
    pub id: usize,
    pub batch: ModelInput,
    pub reply: Sender<(usize, anyhow::Result<Outputs>)>,
}

/// `threads` workers, each with its own tract states over the shared plans.
pub struct InferencePool {
    jobs: Option<Sender<Job>>,
    handles: Vec<JoinHandle<()>>,
}

impl InferencePool {
    pub fn new(rt: Arc<ModelRuntime>, threads: usize) -> InferencePool {
        let threads = threads.max(1);
        let (tx, rx) = bounded::<Job>(threads * 2);
        let handles = (0..threads)
            .map(|i| {
                let rx: Receiver<Job> = rx.clone();
                let rt = rt.clone();
                std::thread::Builder::new()
                    .name(format!("infer-{i}"))
                    .spawn(move || {
                        let mut worker = Worker::new(rt.clone());
                        let mut trim = HeapTrim::new();
                        for job in rx {
                            // A panic inside the runtime fails this job only; the worker
                            // starts again with fresh states.
                            let out = catch_unwind(AssertUnwindSafe(|| worker.run(&job.batch)))
                                .unwrap_or_else(|panic| {
                                    worker = Worker::new(rt.clone());
                                    Err(anyhow::anyhow!(
                                        "the inference runtime panicked: {}",
                                        panic_message(&panic)
                                    ))
                                });
                            // The requester may have given up (error elsewhere): nothing to do.
                            let _ = job.reply.send((job.id, out));
                            trim.after_job();
                        }
                    })
                    .expect("spawning an inference thread")
            })
            .collect();
        InferencePool {
            jobs: Some(tx),
            handles,
        }
    }

    /// Queues a job; blocks while the queue is full.
    pub fn submit(&self, job: Job) {
        self.jobs
            .as_ref()
            .expect("pool is open")
            .send(job)
            .expect("inference workers alive");
    }
}

impl Drop for InferencePool {
    fn drop(&mut self) {
        self.jobs.take();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

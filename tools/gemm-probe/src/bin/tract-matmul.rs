//! `tract-matmul matmul.onnx`: tract's own plan for one MatMul (written by
//! `make_matmul_onnx.py`), best of 7 runs in GFLOP/s, one thread: the peer of `gemm-probe` on
//! the same shape. Built with `--features tract`.

use std::time::Instant;

use tract::prelude::*;

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: tract-matmul matmul.onnx"))?;
    let model = onnx()?.load(&path)?.into_model()?;
    // Concrete sizes from the file's own shapes: X is [M, K], Y is [M, N].
    let (input, output) = (model.input_fact(0)?, model.output_fact(0)?);
    let size = |d: Dim| -> anyhow::Result<usize> { Ok(usize::try_from(d.to_int64()?)?) };
    let (m, k, n) = (
        size(input.dim(0)?)?,
        size(input.dim(1)?)?,
        size(output.dim(1)?)?,
    );
    let plan = runtime_for_name("default")?.prepare(model)?;
    let x: Vec<f32> = (0..m * k)
        .map(|i| (i * 7 % 13) as f32 * 0.1 - 0.6)
        .collect();
    let x = Tensor::from_slice(&[m, k], &x)?;
    let mut best = f64::MAX;
    for _ in 0..7 {
        let input = x.clone();
        let t = Instant::now();
        let y = plan.run(vec![input])?;
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(y);
    }
    let gflops = 2.0 * (m * k * n) as f64 / best / 1e9;
    println!("tract M={m} K={k} N={n}: {gflops:.1} GFLOP/s");
    Ok(())
}

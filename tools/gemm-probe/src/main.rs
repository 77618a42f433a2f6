//! `gemm-probe M K N KC MC`: C = A·B (row-major f32) with a BLIS-style loop nest (B packed in
//! KC-row slabs of 16-column panels, A in MC×KC blocks of 6-row panels, a 6×16 AVX2+FMA
//! micro-kernel), best of 7 runs in GFLOP/s, packing included. tract runs the whole K per
//! tile; this measures what blocking K to fit the micro-panels in L1 is worth, before a
//! kernel of our own is written for the runtime. Needs M % 6 == 0 and N % 16 == 0.

use std::arch::x86_64::*;
use std::time::Instant;

const MR: usize = 6;
const NR: usize = 16;

/// C[6×16] += a-panel · b-panel over `k`; 12 accumulators, two B loads, one broadcast.
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(k: usize, mut a: *const f32, mut b: *const f32, c: *mut f32, ldc: usize) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for _ in 0..k {
        let b0 = _mm256_loadu_ps(b);
        let b1 = _mm256_loadu_ps(b.add(8));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm256_broadcast_ss(&*a.add(i));
            row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
        }
        a = a.add(MR);
        b = b.add(NR);
    }
    for (i, row) in acc.iter().enumerate() {
        let p = c.add(i * ldc);
        _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), row[0]));
        _mm256_storeu_ps(p.add(8), _mm256_add_ps(_mm256_loadu_ps(p.add(8)), row[1]));
    }
}

struct Blocking {
    kc: usize,
    mc: usize,
}

fn gemm(dims: (usize, usize, usize), a: &[f32], b: &[f32], c: &mut [f32], bl: &Blocking) {
    let (m, k, n) = dims;
    assert!(m.is_multiple_of(MR) && n.is_multiple_of(NR) && bl.mc.is_multiple_of(MR));
    let (mut pa, mut pb) = (Vec::new(), Vec::new());
    for pc in (0..k).step_by(bl.kc) {
        let kb = bl.kc.min(k - pc);
        pb.clear();
        for jr in (0..n).step_by(NR) {
            for p in pc..pc + kb {
                pb.extend_from_slice(&b[p * n + jr..p * n + jr + NR]);
            }
        }
        for ic in (0..m).step_by(bl.mc) {
            let mb = bl.mc.min(m - ic);
            pa.clear();
            for ir in (ic..ic + mb).step_by(MR) {
                for p in pc..pc + kb {
                    pa.extend((ir..ir + MR).map(|i| a[i * k + p]));
                }
            }
            for jr in (0..n).step_by(NR) {
                let bp = &pb[(jr / NR) * kb * NR..][..kb * NR];
                for ir in (0..mb).step_by(MR) {
                    let ap = &pa[(ir / MR) * kb * MR..][..kb * MR];
                    let out = &mut c[(ic + ir) * n + jr..][..(MR - 1) * n + NR];
                    // SAFETY: the panels hold kb steps; `out` spans the 6×16 tile at stride n.
                    unsafe { kernel(kb, ap.as_ptr(), bp.as_ptr(), out.as_mut_ptr(), n) };
                }
            }
        }
    }
}

fn main() {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        eprintln!("gemm-probe: needs AVX2 and FMA");
        std::process::exit(2);
    }
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("usage: gemm-probe M K N KC MC"))
        .collect();
    let [m, k, n, kc, mc] = args[..] else {
        panic!("usage: gemm-probe M K N KC MC");
    };
    let a: Vec<f32> = (0..m * k)
        .map(|i| (i * 7 % 13) as f32 * 0.1 - 0.6)
        .collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| (i * 5 % 11) as f32 * 0.1 - 0.5)
        .collect();
    let mut c = vec![0f32; m * n];
    let bl = Blocking { kc, mc };
    gemm((m, k, n), &a, &b, &mut c, &bl);
    for i in [0, m / 2, m - 1] {
        for j in 0..n {
            let want: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            let got = c[i * n + j];
            assert!(
                (want - got).abs() <= 1e-3 * want.abs().max(1.0),
                "C[{i},{j}] {got} != {want}"
            );
        }
    }
    let mut best = f64::MAX;
    for _ in 0..7 {
        c.fill(0.0);
        let t = Instant::now();
        gemm((m, k, n), &a, &b, &mut c, &bl);
        best = best.min(t.elapsed().as_secs_f64());
    }
    let gflops = 2.0 * (m * k * n) as f64 / best / 1e9;
    println!("M={m} K={k} N={n} KC={kc} MC={mc}: {gflops:.1} GFLOP/s");
}

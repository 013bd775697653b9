"""Microbenchmark of ``streamprune.kernels`` at LLaMA-2-70B shapes (a script, never imported).

    python benchmarks/bench_kernels.py --device cuda            # d 8192, f 28672, 32768 tokens
    python benchmarks/bench_kernels.py --device cpu --small     # d 1024, f 3584, 4096 tokens

Moment kernels are reported as achieved throughput and as a ratio to a measured ceiling on
the same device: for the matmul kernels one plain fp32 GEMM of the same shape on data that
is already fp32 (what blocked bf16→fp32 accumulation can at best reach); for ``energy`` the
bandwidth of ``x.clone()``. SVD solvers are compared on synthetic matrices of the shapes the
methods factorise, with a slowly decaying spectrum σᵢ = (1+i)^-½ (like LLM weights, the hard
case for randomized SVD): time, and accuracy relative to the full SVD — ``sv_err`` =
‖S − S_full‖/‖S_full‖ and ``excess`` = ‖A − A_r‖/‖A − A_r,full‖ − 1 (0 = optimal truncation).
The greedy OBS steps (cascade's FFN selection and allocation curve) are timed with their
downdates deferred (the kernel) and applied at once (``flush=1``), on the same f × f inverse.
Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from streamprune.kernels.moments import Moments, cross, energy, gram
from streamprune.kernels.pearson import linear_fit_pearson
from streamprune.kernels.ridge import ridge_lambda, ridge_solve
from streamprune.kernels.svd import truncated_svd, weighted_svd
from streamprune.kernels import obs  # FLUSH, and the eager loop as flush=1
from streamprune.kernels.obs import damped

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    p.add_argument("--small", action="store_true", help="1/8 shapes (d 1024, f 3584, 4096 tokens) for CPU")
    p.add_argument("--d", type=int, help="hidden size (default 8192; 1024 with --small)")
    p.add_argument("--f", type=int, help="FFN width (default 28672; 3584 with --small)")
    p.add_argument("--head-dim", type=int, default=128, help="attention head dim h")
    p.add_argument("--kv-heads", type=int, help="KV groups G (default 8; 2 with --small)")
    p.add_argument("--tokens", type=int, help="calibration tokens (default 32768; 4096 with --small)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="activation dtype")
    p.add_argument("--block-rows", type=int, default=4096, help="row block of the moment kernels")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per kernel (best reported)")
    p.add_argument("--skip-full-svd", action="store_true", help="skip solver='full' (slow on CPU at 70B)")
    p.add_argument("--svd-repeat", type=int, default=None, help="timed runs per SVD (default --repeat; a full "
                   "8192² SVD takes seconds, so a time-boxed GPU check uses 1)")
    p.add_argument("--obs-remove", type=int, default=None, help="greedy OBS steps timed (default f // 5: a 20 %% cut)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.d = a.d or (1024 if a.small else 8192)
    a.f = a.f or (3584 if a.small else 28672)
    a.kv_heads = a.kv_heads or (2 if a.small else 8)
    a.tokens = a.tokens or (4096 if a.small else 32768)
    a.svd_repeat = a.svd_repeat or a.repeat
    return a


def timeit(fn: Callable[[], object], device: torch.device, repeat: int, warmup: bool = True) -> tuple[float, object]:
    """Best wall seconds of ``fn`` over ``repeat`` runs after one warm-up (``warmup``: a kernel
    that runs for seconds and follows warmed-up ones needs none); returns (s, last result).

    The minimum, not the median: on a shared machine the noise is one-sided (other work only
    ever slows a run down), so the best run is the stable estimate of the kernel's cost.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out = fn() if warmup else None
    sync()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times), out


def spectrum_matrix(m: int, n: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """m×n fp32 matrix with random singular vectors and σᵢ = (1+i)^-½."""
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, device=device, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, k, device=device, generator=gen)).Q
    sigma = (1.0 + torch.arange(k, device=device, dtype=torch.float32)).rsqrt()
    return (U * sigma) @ V.T


def bench_moments(a: argparse.Namespace, device: torch.device, gen: torch.Generator) -> list[dict]:
    T, d, br = a.tokens, a.d, a.block_rows
    dt = DTYPES[a.dtype]
    rows = []
    # energy of the down_proj input (T, f): the FFN channel score of Olica / LoRAP
    z = torch.randn(T, a.f, device=device, generator=gen).to(dt)
    nbytes = z.numel() * z.element_size()
    t_clone, _ = timeit(lambda: z.clone(), device, a.repeat)
    copy_gbs = 2 * nbytes / t_clone / 1e9
    t, _ = timeit(lambda: energy(z, br), device, a.repeat)
    gbs = nbytes / t / 1e9
    rows.append(dict(kernel="energy", shape=f"{T}x{a.f} {a.dtype}", ms=t * 1e3, rate=f"{gbs:.1f} GB/s",
                     vs_ceiling=gbs / copy_gbs, ceiling=f"clone {copy_gbs:.1f} GB/s"))
    del z

    x = torch.randn(T, d, device=device, generator=gen).to(dt)  # (T, d) FFN input
    y = torch.randn(T, d, device=device, generator=gen).to(dt)  # (T, d) FFN output (Olica LC)

    xf = x.float()
    yf = y.float()
    t_mm, _ = timeit(lambda: xf.T @ xf, device, a.repeat)
    ceil = 2 * T * d * d / t_mm / 1e9
    t, _ = timeit(lambda: gram(x, br), device, a.repeat)
    gf = 2 * T * d * d / t / 1e9
    rows.append(dict(kernel="gram", shape=f"{T}x{d} {a.dtype}", ms=t * 1e3, rate=f"{gf:.0f} GFLOP/s",
                     vs_ceiling=gf / ceil, ceiling=f"fp32 mm {ceil:.0f} GFLOP/s"))
    t_mm2, _ = timeit(lambda: xf.T @ yf, device, a.repeat)
    ceil2 = 2 * T * d * d / t_mm2 / 1e9
    t, _ = timeit(lambda: cross(x, y, br), device, a.repeat)
    gf = 2 * T * d * d / t / 1e9
    rows.append(dict(kernel="cross", shape=f"{T}x{d}·{T}x{d}", ms=t * 1e3, rate=f"{gf:.0f} GFLOP/s",
                     vs_ceiling=gf / ceil2, ceiling=f"fp32 mm {ceil2:.0f} GFLOP/s"))
    del xf, yf

    def moments_update() -> Moments:
        m = Moments(d, d, device=device, block_rows=br)
        m.update(x, y)
        return m

    t, m = timeit(moments_update, device, a.repeat)
    gf = 4 * T * d * d / t / 1e9
    rows.append(dict(kernel="Moments.update(x,y)", shape=f"{T}x{d}+{T}x{d}", ms=t * 1e3,
                     rate=f"{gf:.0f} GFLOP/s", vs_ceiling=gf / ceil, ceiling="2 fp32 mm"))

    lam = ridge_lambda(m.xtx, 1.0, nsamples=T // 128, seqlen=128)
    t, (W, _) = timeit(lambda: ridge_solve(m.xtx, m.xty, lam), device, a.repeat)
    rows.append(dict(kernel="ridge_solve", shape=f"{d}x{d} | {d}x{d}", ms=t * 1e3,
                     rate=f"{(d**3 / 3 + 2 * d**3) / t / 1e9:.0f} GFLOP/s", vs_ceiling=None, ceiling=""))
    t, _ = timeit(lambda: linear_fit_pearson(m.n, m.sx, m.xtx, m.xty, m.sy, m.syy_diag, W), device, a.repeat)
    rows.append(dict(kernel="linear_fit_pearson", shape=f"W {d}x{d}", ms=t * 1e3,
                     rate=f"{2 * d**3 / t / 1e9:.0f} GFLOP/s", vs_ceiling=None, ceiling=""))
    return rows


def bench_svd(a: argparse.Namespace, device: torch.device, gen: torch.Generator) -> list[dict]:
    d, h, G = a.d, a.head_dim, a.kv_heads
    H = d // h
    olica_r = lambda m, n: int(0.8 * m * n / (m + n))  # noqa: E731  s_qk = 0.2
    cases = [
        ("q_proj AWSVD (Olica 20%)", d, d, olica_r(d, d)),
        ("k_proj AWSVD (Olica 20%)", G * h, d, olica_r(G * h, d)),
        ("LC bypass (0.03·d)", d, d, int(0.03 * d)),
        ("Fast-OND M_g", h, (H // G) * d, h),
    ]
    solvers = ["gram", "randomized"] if a.skip_full_svd else ["full", "gram", "randomized"]
    rows = []
    for name, m, n, r in cases:
        A = spectrum_matrix(m, n, device, gen)
        norm_a = torch.linalg.norm(A)
        base = None
        for solver in solvers:
            t, (U, S, Vh) = timeit(lambda: truncated_svd(A, r, solver=solver, seed=a.seed), device, a.svd_repeat)
            resid = float(torch.linalg.norm(A - (U * S) @ Vh) / norm_a)
            if base is None and solver == "full":
                base = (S, resid)
            row = dict(kernel=f"svd {solver}", case=name, shape=f"{m}x{n} r{r}", ms=t * 1e3, resid=resid)
            if base is not None:
                row["sv_err"] = float(torch.linalg.norm(S - base[0]) / torch.linalg.norm(base[0]))
                # at full rank both residuals are rounding noise: no truncation to compare
                row["excess"] = resid / base[1] - 1 if base[1] > 1e-4 else None
            rows.append(row)
        del A
    # AWSVD end to end (auto solver) at q_proj shape, bf16 weight
    w = spectrum_matrix(d, d, device, gen).to(DTYPES[a.dtype])
    s = torch.logspace(-1, 1, d, device=device)
    t, _ = timeit(lambda: weighted_svd(w, s, olica_r(d, d), solver="auto", seed=a.seed), device, a.svd_repeat)
    rows.append(dict(kernel="weighted_svd auto", case="q_proj (Olica 20%)", shape=f"{d}x{d} r{olica_r(d, d)}",
                     ms=t * 1e3))
    return rows


def bench_obs(a: argparse.Namespace, device: torch.device, gen: torch.Generator) -> list[dict]:
    """The greedy OBS steps on down_proj (f × f inverse, ``obs_remove`` one-column removals) in the
    method's arithmetic dtype: the kernel's deferred downdates against applying each at once
    (``flush=1``: the loop as it was before the downdates were deferred), timed once each (no
    warm-up: seconds each at 70B shapes), and whether both took the same columns."""
    from streamprune.methods.cascade.selection import OBS_DTYPE

    f, d, n = a.f, a.d, a.obs_remove or a.f // 5
    dt = OBS_DTYPE
    h = torch.randn(a.tokens, f, device=device, generator=gen)
    g = gram(h, a.block_rows)
    del h
    w = torch.randn(d, f, device=device, generator=gen)
    hd = damped(g, 0.01, dt)
    rows, alive = [], {}
    for name, flush in (("deferred", obs.FLUSH), ("eager", 1)):
        t, (alive[name], _, _) = timeit(lambda fl=flush: obs._greedy(w, hd, n, 1, dt, None, flush=fl), device, 1, warmup=False)
        rows.append(dict(kernel=f"obs greedy, {name}", shape=f"f {f}, d {d}, {n} steps {str(dt).removeprefix('torch.')}",
                         ms=t * 1e3, flush=flush))
    rows[0]["speedup"] = rows[1]["ms"] / rows[0]["ms"]
    rows[0]["same_choice"] = bool(torch.equal(alive["deferred"], alive["eager"]))
    return rows


def fmt(v: object, spec: str) -> str:
    return "" if v is None else format(v, spec)


def main() -> None:
    a = parse_args()
    device = torch.device(a.device)
    gen = torch.Generator(device=device).manual_seed(a.seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"streamprune kernels on {name}, torch {torch.__version__}; tokens {a.tokens}, d {a.d}, f {a.f}, "
          f"h {a.head_dim}, G {a.kv_heads}, {a.dtype} activations, block_rows {a.block_rows}, best of {a.repeat} (SVDs best of {a.svd_repeat})")
    mom = bench_moments(a, device, gen)
    print(f"\n{'kernel':22} {'shape':24} {'ms':>10} {'achieved':>16} {'vs ceiling':>10}  ceiling")
    for r in mom:
        print(f"{r['kernel']:22} {r['shape']:24} {r['ms']:10.1f} {r['rate']:>16} {fmt(r['vs_ceiling'], '.2f'):>10}  "
              f"{r['ceiling']}")
    svd = bench_svd(a, device, gen)
    print(f"\n{'case':26} {'shape':20} {'solver':18} {'ms':>10} {'resid':>8} {'sv_err':>9} {'excess':>9}")
    for r in svd:
        print(f"{r['case']:26} {r['shape']:20} {r['kernel']:18} {r['ms']:10.1f} {fmt(r.get('resid'), '.4f'):>8} "
              f"{fmt(r.get('sv_err'), '.1e'):>9} {fmt(r.get('excess'), '.1e'):>9}")
    ob = bench_obs(a, device, gen)
    print(f"\n{'kernel':22} {'shape':36} {'ms':>10}")
    for r in ob:
        extra = f"  {r['speedup']:.2f}x the eager loop, same choices: {r['same_choice']}" if "speedup" in r else ""
        print(f"{r['kernel']:22} {r['shape']:36} {r['ms']:10.1f}{extra}")
    print(json.dumps({"bench": "kernels", "device": name, "torch": torch.__version__,
                      "shapes": {"tokens": a.tokens, "d": a.d, "f": a.f, "h": a.head_dim, "G": a.kv_heads},
                      "dtype": a.dtype, "repeat": a.repeat, "svd_repeat": a.svd_repeat, "moments": mom, "svd": svd, "obs": ob}))


if __name__ == "__main__":
    main()

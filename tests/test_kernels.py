"""Triton kernels against the PyTorch reference: random shapes with ragged edges (sizes that are not
multiples of the block), fp32 and bf16, outputs poisoned with NaN; gradients of x, W and b through the
autograd Functions (both backward backends) against the reference's autograd; one elastic training step
through the Triton path against the same step through the reference.

The same tests (marked `gpu`) run in two ways. On CPU, under TRITON_INTERPRET=1: the interpreter must be
on before triton is first imported (its standard library is jit-decorated at import), so they run in a
child pytest started with TRITON_INTERPRET=1 (`test_kernels_under_the_interpreter`); no other test runs
under the interpreter. On a GPU, compiled: `pytest -m gpu tests/test_kernels.py` (bench/gpu_check.sh).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from flexcli.kernels import reference, use_triton  # noqa: E402

MODULE = "flexcli.kernels.triton_kernels"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
COMPILED = not INTERPRETING and torch.cuda.is_available()
DEV = "cuda" if COMPILED else "cpu"  # the interpreter runs kernels on CPU tensors


def kernel_check(f):
    """A kernel-vs-reference test: in the interpreter child on CPU, or compiled on a GPU (marker gpu)."""
    skip = pytest.mark.skipif(
        not (INTERPRETING or COMPILED), reason="runs in the interpreter child process or on a GPU"
    )
    return pytest.mark.gpu(skip(f))


def test_kernels_under_the_interpreter():
    if INTERPRETING:
        pytest.skip("this is the child process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", __file__],
                       env=env, capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stdout[-4000:]
    assert " passed" in p.stdout and "failed" not in p.stdout, p.stdout[-2000:]


@pytest.fixture(scope="module")
def tk():
    from flexcli.kernels import triton_kernels

    return triton_kernels


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SHAPES = [
    (1, 40, 48, 40, 24),
    (37, 70, 50, 45, 61),
    (19, 33, 96, 17, 33),
    (64, 48, 64, 64, 48),
]  # M, K, N, n, k


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@kernel_check
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_prefix_linear(tk, dtype, M, K, N, n, k, bias):
    g = torch.Generator().manual_seed(M * 7 + n)
    x = torch.randn(M, k, generator=g).to(DEV, dtype)
    w = torch.randn(N, K, generator=g).to(DEV, dtype)
    b = torch.randn(N, generator=g).to(DEV, dtype) if bias else None
    out = torch.full((M, n), float("nan"), dtype=dtype, device=DEV)
    got = tk.prefix_linear(x, w, b, n, k, out=out)
    want = reference.subset_linear(x.float(), w.float(), None if b is None else b.float(), n, k)
    assert not torch.isnan(got).any()
    assert _rel(got, want) <= TOL[dtype]


@kernel_check
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_linear_batched_all_widths(tk, dtype):
    x = torch.randn(2, 5, 48).to(DEV, dtype)
    w = torch.randn(80, 48).to(DEV, dtype)
    for n in (80, 61, 17, 1):
        got = tk.prefix_linear(x, w, None, n, 48)
        assert got.shape == (2, 5, n)
        assert _rel(got, reference.subset_linear(x.float(), w.float(), None, n, None)) <= TOL[dtype]


JIT = f"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import compute_cache_key, create_function_from_signature
from {MODULE} import _grouped_kernel, _prefix_kernel, grouped_args, prefix_args

def bind(kernel, args, meta, target=GPUTarget("cuda", 90, 32)):
    \"\"\"(type, value) per kernel parameter, as Triton's JIT binds a launch (ints equal to 1 become constexprs).\"\"\"
    return create_function_from_signature(kernel.signature, kernel.params, make_backend(target))(*args, **meta)[1]
"""


def _run_jit(code: str) -> list[list[str]]:
    """Run JIT + code in a fresh interpreter with the real (not interpreted) JIT; its output's words."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", JIT + code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return [line.split() for line in out.stdout.splitlines()]


def test_widths_are_never_specialised():
    """One compilation serves every width: Triton's own binder gives the same compile cache key for
    launches that differ only in row count and active widths (bound for a CUDA target, no GPU needed)."""
    rows = _run_jit("""
w, keys = torch.empty(80, 48), set()
for M, n, k in ((16, 80, 48), (5, 61, 48), (1, 17, 33), (33, 1, 7)):
    x, y = torch.empty(M, 48), torch.empty(M, 80)
    args, meta = prefix_args(x, w, None, None, None, y, n, k, False)
    keys.add(compute_cache_key({}, bind(_prefix_kernel, args, meta), meta))
print(len(keys))
""")  # fmt: skip
    assert rows == [["1"]]


COMPILE_CHECK = """
for cc in (80, 90):
    target = GPUTarget("cuda", cc, 32)
    for dt in (torch.float32, torch.bfloat16):
        x, w, y = torch.empty(16, 48, dtype=dt), torch.empty(80, 48, dtype=dt), torch.empty(16, 80, dtype=dt)
        table = torch.zeros(4, 4, dtype=torch.int32)
        launches = {
            "prefix": (_prefix_kernel, prefix_args(x, w, None, None, None, y, 61, 33, False)),
            "swiglu": (_prefix_kernel, prefix_args(x, w, w, w[0], w[0], y, 61, 48, True)),
            "grouped-in": (_grouped_kernel, grouped_args(x, w, w[0], y, table, 80, "in")),
            "grouped-out": (_grouped_kernel, grouped_args(x, w, None, y, table, 80, "out")),
        }
        for name, (kernel, (args, meta)) in launches.items():
            spec = bind(kernel, args, meta, target)
            sig = {p.name: t for p, (t, _) in zip(kernel.params, spec)}
            const = {(i,): v for i, (t, v) in enumerate(spec) if t == "constexpr"}
            asm = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const), target=target).asm
            print(cc, str(dt).split(".")[-1], name, len(asm["cubin"]) > 0, "tf32" in asm["ptx"], "mma" in asm["ptx"])
"""


def test_kernels_compile_for_gpu_targets():
    """Every kernel, as its launch binds it, compiles to a cubin for sm_80 and sm_90 with Triton's own
    compiler (no GPU needed: the interpreter would not see a compile error); fp32 operands never go
    through TF32 tensor-core instructions (torch's fp32 matmul does not either), bf16 ones do use MMA."""
    rows = _run_jit(COMPILE_CHECK)
    assert len(rows) == 2 * 2 * 4
    for cc, dt, name, cubin, tf32, mma in rows:
        assert cubin == "True", (cc, dt, name)
        assert tf32 == "False", (cc, dt, name)  # fp32 stays IEEE; bf16 never names tf32
        if dt == "bfloat16":
            assert mma == "True", (cc, dt, name)  # tensor cores for bf16


@pytest.mark.gpu
@pytest.mark.skipif(not COMPILED, reason="needs a GPU (compiled kernels)")
def test_one_compile_for_all_widths_on_gpu():
    from flexcli.kernels import triton_kernels as real

    x = torch.randn(5, 48, device="cuda")
    w = torch.randn(80, 48, device="cuda")
    for n in (80, 61, 17, 1):
        real.prefix_linear(x, w, None, n, 48)
    caches = real._prefix_kernel.device_caches
    assert sum(len(c[0]) for c in caches.values()) == 1  # one compiled variant for four widths


@kernel_check
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,m", [(13, 40, 27), (32, 64, 64), (7, 24, 5)])
def test_fused_swiglu(tk, dtype, M, K, m):
    g = torch.Generator().manual_seed(M + m)
    x = torch.randn(M, K, generator=g).to(DEV, dtype)
    wg, wu = torch.randn(70, K, generator=g).to(DEV, dtype), torch.randn(70, K, generator=g).to(DEV, dtype)
    out = torch.full((M, m), float("nan"), dtype=dtype, device=DEV)
    got = tk.swiglu_prefix(x, wg, wu, None, None, m, out=out)
    want = reference.swiglu_prefix(x.float(), wg.float(), wu.float(), None, None, m)
    assert not torch.isnan(got).any() and _rel(got, want) <= TOL[dtype] * 2


@kernel_check
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["out", "in"])
def test_grouped_ragged_widths(tk, dtype, mode):
    g = torch.Generator().manual_seed(1)
    starts, widths = [0, 5, 5, 30, 33], [64, 48, 40, 17, 8]  # one empty group, ragged sizes
    M = 41
    K = 64 if mode == "in" else 36
    x = torch.randn(M, K, generator=g).to(DEV, dtype)
    w = torch.randn(64 if mode == "out" else 29, 64 if mode == "in" else K, generator=g).to(DEV, dtype)
    b = torch.randn(w.shape[0], generator=g).to(DEV, dtype)
    out = torch.full((M, w.shape[0]), float("nan"), dtype=dtype, device=DEV) if mode == "in" else None
    got = tk.grouped_linear(x, w, b, starts, widths, mode, out=out)
    want = reference.grouped_linear(x.float(), w.float(), b.float(), starts, widths, mode)
    assert got.shape == want.shape and not torch.isnan(got).any()
    assert _rel(got, want) <= TOL[dtype]


def test_dispatch_switch(monkeypatch):
    """CPU tensors take the reference unless FLEX_KERNELS=triton forces the Triton path, which on CPU
    needs the interpreter; an unknown mode is refused."""
    x = torch.randn(3, 8)
    monkeypatch.delenv("FLEX_KERNELS", raising=False)
    assert not use_triton(x)
    monkeypatch.setenv("FLEX_KERNELS", "reference")
    assert not use_triton(x)
    monkeypatch.setenv("FLEX_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(x)
    monkeypatch.setenv("FLEX_KERNELS", "fast")
    with pytest.raises(ValueError, match="auto, reference or triton"):
        use_triton(x)


GRAD_SHAPES = [  # M, K, N, n, k: output prefix, input prefix, both, ragged both, full
    (9, 48, 40, 23, 48),
    (17, 50, 33, 33, 19),
    (13, 70, 45, 29, 37),
    (33, 37, 61, 1, 5),
    (5, 32, 32, 32, 32),
]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _grads(fn, *leaves):
    """Gradients of sum(fn(*leaves) * r) with a fixed random r, for copies of `leaves`."""
    xs = [None if t is None else _leaf(t) for t in leaves]
    y = fn(*xs)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.device, y.dtype)
    (y * r).sum().backward()
    return y, [None if t is None else t.grad for t in xs]


def _check_grads(got, want, tol):
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert g.shape == w.shape and _rel(g, w) <= tol


@kernel_check
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M,K,N,n,k", GRAD_SHAPES)
def test_prefix_linear_gradients(monkeypatch, backend, bias, M, K, N, n, k):
    from flexcli.kernels.autograd import PrefixLinear

    monkeypatch.setenv("FLEX_KERNELS_BWD", backend)
    g = torch.Generator().manual_seed(M + n + k)
    x, w = torch.randn(M, k, generator=g).to(DEV), torch.randn(N, K, generator=g).to(DEV)
    b = torch.randn(N, generator=g).to(DEV) if bias else None
    y, got = _grads(lambda x, w, b: PrefixLinear.apply(x, w, b, n, k), x, w, b)
    y_ref, want = _grads(lambda x, w, b: reference.subset_linear(x, w, b, n, k), x, w, b)
    assert _rel(y, y_ref) <= 1e-5
    _check_grads(got, want, 1e-5)
    gw = got[1]
    assert torch.count_nonzero(gw[n:]) == 0 and torch.count_nonzero(gw[:, k:]) == 0  # exactly zero outside
    assert torch.count_nonzero(gw[:n, :k]) == n * k
    if bias:
        assert torch.count_nonzero(got[2][n:]) == 0


@kernel_check
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("M,K,m,bias", [(13, 40, 27, False), (7, 24, 5, True), (16, 32, 70, True)])
def test_fused_swiglu_gradients(monkeypatch, backend, M, K, m, bias):
    from flexcli.kernels.autograd import SwiGLUPrefix

    monkeypatch.setenv("FLEX_KERNELS_BWD", backend)
    g = torch.Generator().manual_seed(M * m)
    x = torch.randn(M, K, generator=g).to(DEV)
    wg, wu = torch.randn(70, K, generator=g).to(DEV), torch.randn(70, K, generator=g).to(DEV)
    bg, bu = (
        (torch.randn(70, generator=g).to(DEV), torch.randn(70, generator=g).to(DEV)) if bias else (None, None)
    )
    _, got = _grads(lambda *a: SwiGLUPrefix.apply(*a, m), x, wg, wu, bg, bu)
    _, want = _grads(lambda *a: reference.swiglu_prefix(*a, m), x, wg, wu, bg, bu)
    _check_grads(got, want, 1e-5)
    for t in got[1:]:
        assert t is None or torch.count_nonzero(t[m:]) == 0


@kernel_check
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["out", "in"])
def test_grouped_ragged_gradients(monkeypatch, backend, mode):
    from flexcli.kernels.autograd import GroupedLinear

    monkeypatch.setenv("FLEX_KERNELS_BWD", backend)
    g = torch.Generator().manual_seed(2)
    starts, widths = [0, 5, 5, 30, 33], [48, 40, 33, 17, 8]  # one empty group, ragged sizes
    M, K = 41, (48 if mode == "in" else 36)
    N = 48 if mode == "out" else 29
    x = torch.randn(M, K, generator=g).to(DEV)
    if mode == "in":  # a group's inputs beyond its width are zero, as GroupedMLP's hidden rows are
        for s, e, wd in zip(starts, starts[1:] + [M], widths):
            x[s:e, wd:] = 0
    w, b = torch.randn(N, K, generator=g).to(DEV), torch.randn(N, generator=g).to(DEV)
    _, got = _grads(lambda *a: GroupedLinear.apply(*a, starts, widths, mode), x, w, b)
    _, want = _grads(lambda *a: reference.grouped_linear(*a, starts, widths, mode), x, w, b)
    _check_grads(got, want, 1e-5)
    if mode == "out":
        assert (
            torch.count_nonzero(got[1][max(widths) :]) == 0
            and torch.count_nonzero(got[2][max(widths) :]) == 0
        )
    else:
        assert torch.count_nonzero(got[1][:, max(widths) :]) == 0


def _graph(t: torch.Tensor) -> set[str]:
    """Names of the backward nodes that produced `t`."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        todo.extend(g for g, _ in f.next_functions)
    return names


def _tiny_elastic():
    from transformers import LlamaConfig, LlamaForCausalLM

    from flexcli.arch import Dims
    from flexcli.arch.family import by_family
    from flexcli.arch.spec import ElasticSpec
    from flexcli.elastic.runtime import ElasticModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(cfg).to(DEV)
    d = model.config.to_dict()
    spec = ElasticSpec.build("llama", Dims.from_config(d), [1.0, 0.5], [1.0, 0.5], 16, "group")
    return ElasticModel(model, by_family("llama"), spec)


@kernel_check
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_elastic_training_step_through_triton_equals_reference(monkeypatch, backend):
    """One SGD step of the elastic model at a sub-width: the same updated weights through the Triton
    path (every projection a prefix: GQA whole groups) as through the reference, and the sub-width's
    weights do move (their gradients are not dropped), while weights outside the prefix do not."""
    monkeypatch.setenv("FLEX_KERNELS_BWD", backend)
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(3)).to(DEV)
    cfg = [(40, 2), (80, 4)]  # layer 0 at half width and half the heads, layer 1 full
    after = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("FLEX_KERNELS", mode)
        el = _tiny_elastic()
        before = {n: p.detach().clone() for n, p in el.model.named_parameters()}
        el.set_config(cfg)
        opt = torch.optim.SGD(el.model.parameters(), lr=0.5)
        out = el(input_ids=ids, labels=ids)
        assert ("PrefixLinearBackward" in _graph(out.loss)) == (mode == "triton")
        out.loss.backward()
        opt.step()
        after[mode] = {n: p.detach().clone() for n, p in el.model.named_parameters()}
    for n, p in after["triton"].items():
        assert _rel(p - before[n], after["reference"][n] - before[n]) <= 1e-4, n
    up, down = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"
    moved = after["triton"][up] - before[up]
    assert torch.count_nonzero(moved[:40]) == 40 * 48 and torch.count_nonzero(moved[40:]) == 0
    assert torch.count_nonzero((after["triton"][down] - before[down])[:, 40:]) == 0


@kernel_check
def test_autocast_casts_the_active_prefix_and_keeps_fp32_gradients(monkeypatch):
    """Under bf16 autocast the Triton path computes in bf16 like F.linear does, and the fp32 master
    weight gets its gradient (zero outside the prefix) through the cast."""
    from flexcli.kernels import subset_linear

    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(12, 40, generator=g).to(DEV), torch.randn(56, 48, generator=g).to(DEV)
    results = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("FLEX_KERNELS", mode)
        xs, ws = _leaf(x), _leaf(w)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            y = subset_linear(xs, ws, None, 31, 40)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        results[mode] = (y, xs.grad, ws.grad)
    for got, want in zip(results["triton"], results["reference"]):
        assert got.dtype == want.dtype and _rel(got, want) <= 2e-2
    assert results["triton"][2].dtype == torch.float32 and torch.count_nonzero(results["triton"][2][31:]) == 0

"""Benchmark: flexcli at the sizes users bring (issue 21) -> docs/results/scale.{md,json}.

For a 1.1B-shaped (TinyLlama-1.1B config) and a 7B-shaped (Llama-2-7B config) Llama with random bf16
weights, written as the hub ships them (7B: two safetensors shards, 9.98 + 3.50 GB, and an index):

  convert   prune-only `flex convert` with 4 x 128 calibration tokens (layer by layer from the files)
  extract   `flex extract --uniform mlp=0.5,heads=0.5` of the result (streamed prefix slices)

and, on a 7B-shaped model with 2 decoder layers (Llama-2-7B layer shapes, vocab 32000), `flex profile`
(decode, 6 table entries, 2 rounds, 2 correction configurations) at this checkout and at BASELINE, the
last commit before issue 21, whose profiler built a randomly initialised full model per timed
configuration.

Every command runs in its own process, called through the library with a reporter that marks its stages;
a thread samples /proc/self/status every 50 ms. Reported per stage: wall time, peak RSS, and its
anonymous part (RssAnon: what the process itself holds; the rest is page cache of memory-mapped
safetensors files, which the kernel reclaims under pressure). ru_maxrss of the whole process comes from
wait4. Files live in $FLEX_CACHE/scale (default ~/.cache/flexcli/scale), each shape's removed once it is
measured unless --keep. Never run this beside tests or another benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from common import ROOT, proc_memory, random_llama

BASELINE = "09486d5"  # main before issue 21 (profiler: a random full model per configuration)
GB = 1e9

LLAMA2_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
)  # fmt: skip
TINYLLAMA_1B = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
)  # fmt: skip
TINY = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, max_position_embeddings=512,
)  # fmt: skip
SHAPES = {  # name: (config, shard bytes as the hub splits it); tiny: the script's own smoke test
    "tiny": (TINY, 2 * 10**6),
    "1.1B": (TINYLLAMA_1B, 5 * 10**9),
    "7B": (LLAMA2_7B, 10 * 10**9),
}


# ---------------------------------------------------------------------------------------------- child
class Sampler:
    """Samples this process's VmRSS / RssAnon / RssFile (bytes) every `dt` seconds in a thread."""

    def __init__(self, dt: float = 0.05):
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(dt,), daemon=True)

    def _sample(self) -> None:
        m = proc_memory()
        self.samples.append((time.perf_counter(), m["VmRSS"], m["RssAnon"], m["RssFile"]))

    def _run(self, dt: float) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(dt)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()


def _stage_reporter():
    from flexcli.progress import Reporter

    class Stages(Reporter):
        """Records (description, start, end) of every task the library reports."""

        def __init__(self):
            self.marks: list[tuple[str, float, float]] = []

        @contextmanager
        def task(self, description, total=None):
            t0 = time.perf_counter()
            print(f"  [{description}]", file=sys.stderr, flush=True)
            try:
                yield _Null()
            finally:
                self.marks.append((description, t0, time.perf_counter()))

    class _Null:
        def advance(self, n=1, **fields):
            pass

    return Stages()


def _stages(marks, samples, t0: float, t1: float) -> list[dict]:
    """Per stage (the library's tasks, plus what ran outside them): seconds, peak RSS and RssAnon."""
    out = []
    inside = 0.0
    for name, a, b in sorted(marks, key=lambda m: m[1]):
        if not any(a2 <= a and b <= b2 and (a2, b2) != (a, b) for _, a2, b2 in marks):
            inside += b - a  # a top-level task
        s = [x for x in samples if a <= x[0] <= b] or [min(samples, key=lambda x: abs(x[0] - a))]
        out.append(
            {
                "stage": name,
                "seconds": b - a,
                "peak_rss": max(x[1] for x in s),
                "peak_anon": max(x[2] for x in s),
            }
        )
    rest = [x for x in samples if not any(a <= x[0] <= b for _, a, b in marks)]
    if rest:
        out.insert(0, {"stage": "(outside tasks: imports, inspection, hashing, text)", "seconds": t1 - t0 - inside,
                       "peak_rss": max(x[1] for x in rest), "peak_anon": max(x[2] for x in rest)})  # fmt: skip
    return out


def child(job: dict) -> dict:
    """Run one job in this process; its result, stages and memory peaks."""
    import torch

    torch.manual_seed(0)
    rep = _stage_reporter()
    with Sampler() as smp:
        t0 = time.perf_counter()
        result = JOBS[job["kind"]](job, rep)
        t1 = time.perf_counter()
    import flexcli

    return {
        "flexcli": str(Path(flexcli.__file__).parent),  # which checkout's code ran (baseline or this one)
        "seconds": t1 - t0,
        "peak_rss": max(x[1] for x in smp.samples),
        "peak_anon": max(x[2] for x in smp.samples),
        "stages": _stages(rep.marks, smp.samples, t0, t1),
        "result": result,
    }


def job_generate(job: dict, rep) -> dict:
    """A random-weight Llama checkpoint of `config` in bf16 with a tokenizer, committed by a rename."""
    from flexcli.commands.pretrain import train_tokenizer

    out = Path(job["out"])
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with rep.task("writing random weights"):
        files = random_llama(tmp, job["config"], job["shard_bytes"])
    with rep.task("training a tokenizer"):
        train_tokenizer("stdlib", job["tokenizer_vocab"], max_chars=2_000_000).save_pretrained(tmp)
    tmp.rename(out)
    return {"files": {f: (out / f).stat().st_size for f in files}}


def job_convert(job: dict, rep) -> dict:
    from flexcli.commands.convert import ConvertOptions, convert

    o = ConvertOptions(output=Path(job["out"]), calib="stdlib", calib_samples=4, seq_len=128, device="cpu",
                       force=True, recipe=Path(job["recipe"]) if job.get("recipe") else None)  # fmt: skip
    r = convert(job["src"], o, rep)
    return {"output": r.output, "calibration_tokens": r.calibration_tokens, "seconds": r.seconds}


def job_extract(job: dict, rep) -> dict:
    from flexcli.commands.extract import ExtractOptions, extract
    from flexcli.plan.search import Request

    r = extract(
        Path(job["elastic"]),
        # the streamed slicer is what is measured, and checked bit-exact against the checkpoint's slices
        ExtractOptions(
            request=Request(uniform=(0.5, 0.5)), output=Path(job["out"]), force=True, compensate=False
        ),
        rep,
    )
    sm = r.models[0]
    return {
        "output": sm.output,
        "params": sm.params,
        "config": sm.config[:1],
        "verified_max_rel_err": sm.verified_max_rel_err,
    }


def job_profile(job: dict, rep) -> dict:
    from flexcli.commands.profile import ProfileOptions, profile

    o = ProfileOptions(phase="decode", seq_len=16, rounds=2, repeats=3, correct=2, warmup_s=0.05, min_warmup_calls=2,
                       accept_noisy=True)  # fmt: skip
    r = profile(Path(job["elastic"]), o, rep)
    return {"regime": r.regime, "entries": r.entries, "full_ms": r.full_ms}


JOBS = {"generate": job_generate, "convert": job_convert, "extract": job_extract, "profile": job_profile}


# --------------------------------------------------------------------------------------------- parent
def run_child(job: dict, env: dict | None = None) -> dict:
    """`job` in a fresh process: its report, with ru_maxrss from wait4."""
    print(f"== {job['kind']} {job.get('label', '')}", file=sys.stderr, flush=True)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        p = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(job), "--report", f.name],
                             env=env or os.environ.copy())  # fmt: skip
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise SystemExit(f"bench-scale: {job['kind']} failed with exit code {p.returncode}")
        rep = json.loads(Path(f.name).read_text())
    rep["ru_maxrss"] = usage.ru_maxrss * 1024
    return rep


def baseline_env(work: Path, rev: str) -> dict:
    """An environment whose `import flexcli` is commit `rev`'s code (src/flexcli, kernels, recipes laid
    out as the installed package)."""
    pkg = work / f"baseline-{rev}"
    if not (pkg / "flexcli").exists():
        shutil.rmtree(pkg, ignore_errors=True)
        raw = pkg / "raw"
        raw.mkdir(parents=True)
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/flexcli", "kernels", "recipes"],
                             check=True, capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(raw)], input=tar, check=True)
        (raw / "src" / "flexcli").rename(pkg / "flexcli")
        (raw / "kernels").rename(pkg / "flexcli" / "kernels")
        (raw / "recipes").rename(pkg / "flexcli" / "recipes")
        shutil.rmtree(raw)
    return {**os.environ, "PYTHONPATH": str(pkg)}


def check_slices(elastic: Path, sub: Path, layer: int) -> int:
    """Every tensor of `layer` in the sub-model equals the elastic checkpoint's prefix read through
    get_slice, bit for bit; returns the number checked."""
    import torch
    from safetensors import safe_open

    from flexcli.io.source import SourceModel

    ie, isub = SourceModel.open(elastic).weight_map, SourceModel.open(sub).weight_map  # name -> file
    names = [n for n in isub if n.startswith(f"model.layers.{layer}.")]
    for n in names:
        with safe_open(str(isub[n]), framework="pt") as a, safe_open(str(ie[n]), framework="pt") as b:
            t = a.get_tensor(n)
            sl = b.get_slice(n)
            want = sl[: t.shape[0]] if t.dim() == 1 else sl[: t.shape[0], : t.shape[1]]
            assert torch.equal(t, want), n
    return len(names)


def bf16_bytes(c: dict) -> int:
    """Size of a Llama checkpoint of config `c` in bf16 (untied embeddings)."""
    h, kv = c["hidden_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * c["intermediate_size"] + 2 * h
    return 2 * (2 * c["vocab_size"] * h + h + c["num_hidden_layers"] * layer)


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    ap.add_argument(
        "--work",
        type=Path,
        default=Path(os.environ.get("FLEX_CACHE", Path.home() / ".cache" / "flexcli")) / "scale",
    )
    ap.add_argument("--shapes", default="1.1B,7B", help="comma-separated: tiny, 1.1B, 7B")
    ap.add_argument("--profile-shape", default="7B", help="layer shapes of the 2-layer profile model")
    ap.add_argument("--baseline", default=BASELINE, help="commit to profile 'before' (none: skip)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    a = ap.parse_args()
    if a.child:
        Path(a.report).write_text(json.dumps(child(json.loads(a.child))))
        return
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    need = max(2.6 * bf16_bytes(SHAPES[s][0]) for s in a.shapes.split(","))  # source, elastic, half sub
    if shutil.disk_usage(work).free < need:
        raise SystemExit(
            f"bench-scale: needs ~{need / GB:.0f} GB free in {work}, have {shutil.disk_usage(work).free / GB:.0f} GB"
        )
    res: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                             "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
                 "baseline": a.baseline, "runs": []}  # fmt: skip
    git = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    res["commit"] = git.stdout.strip()

    vocab = 512 if "tiny" in (a.shapes, a.profile_shape) else 8192  # BPE vocabulary (the model's is 32000)

    def record(shape: str, command: str, rep: dict, **extra) -> None:
        res["runs"].append({"shape": shape, "command": command, **rep, **extra})

    for shape in a.shapes.split(","):
        cfg, shard = SHAPES[shape]
        src, el, sub = work / f"llama-{shape}", work / f"llama-{shape}-elastic", work / f"llama-{shape}-sub"
        if not (src / "config.json").exists():
            rep = run_child({"kind": "generate", "label": shape, "out": str(src), "config": cfg, "shard_bytes": shard,
                             "tokenizer_vocab": vocab})  # fmt: skip
            record(shape, "generate (random bf16 checkpoint)", rep, bytes=dir_bytes(src))
        rep = run_child({"kind": "convert", "label": shape, "src": str(src), "out": str(el)})
        record(
            shape,
            "flex convert (prune-only, 4 x 128 tokens)",
            rep,
            bytes=dir_bytes(el),
            source_bytes=dir_bytes(src),
        )
        rep = run_child({"kind": "extract", "label": shape, "elastic": str(el), "out": str(sub)})
        checked = check_slices(el, Path(rep["result"]["output"]), 0) + check_slices(
            el, Path(rep["result"]["output"]), cfg["num_hidden_layers"] - 1
        )
        record(shape, "flex extract --uniform mlp=0.5,heads=0.5", rep, bytes=dir_bytes(Path(rep["result"]["output"])),
               tensors_bit_exact_vs_get_slice=checked)  # fmt: skip
        shutil.rmtree(sub, ignore_errors=True)
        shutil.rmtree(Path(rep["result"]["output"]), ignore_errors=True)
        shutil.rmtree(el, ignore_errors=True)
        if not a.keep:
            shutil.rmtree(src, ignore_errors=True)
    if a.profile_shape != "none":
        cfg = {**SHAPES[a.profile_shape][0], "num_hidden_layers": 2}
        name = f"{a.profile_shape} x 2 layers"
        src, el = work / f"llama-{a.profile_shape}-2layers", work / f"llama-{a.profile_shape}-2layers-elastic"
        if not (src / "config.json").exists():
            run_child({"kind": "generate", "label": name, "out": str(src), "config": cfg, "shard_bytes": 10 * 10**9,
                       "tokenizer_vocab": vocab})  # fmt: skip
        recipe = work / "profile-widths.yaml"  # 3 MLP widths x 2 head counts: 6 table entries
        recipe.write_text("elastic:\n  mlp_ratios: [1.0, 0.75, 0.5]\n  head_ratios: [1.0, 0.5]\n")
        run_child({"kind": "convert", "label": name, "src": str(src), "out": str(el), "recipe": str(recipe)})
        runs = [("after (this commit)", None)]
        if a.baseline != "none":
            runs.append((f"before ({a.baseline})", baseline_env(work, a.baseline)))
        for label, env in runs:
            rep = run_child({"kind": "profile", "label": label, "elastic": str(el)}, env)
            record(name, f"flex profile, {label}", rep)
        if not a.keep:
            shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(el, ignore_errors=True)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(res, indent=2) + "\n")
    md = [
        "# flexcli at the sizes users bring, on this machine (bench/bench_scale.py, `make bench-scale`)",
        "",
        f"Commit {res['commit']}; {res['machine']['platform']}, {res['machine']['cpus']} CPUs, "
        f"{res['machine']['ram_bytes'] / GB:.1f} GB RAM. Random-weight Llama checkpoints in bf16 (1.1B: TinyLlama-1.1B "
        "config; 7B: Llama-2-7B config, two shards as the hub ships them). Each command runs in its own process. "
        "Peak RSS includes the page cache of memory-mapped safetensors files (reclaimable); RssAnon is what the "
        "process itself holds; ru_maxrss is the kernel's high-water mark for the whole process.",
        "",
        "| model | command | wall s | peak RSS GB | peak RssAnon GB | ru_maxrss GB | written GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        md.append(f"| {r['shape']} | {r['command']} | {r['seconds']:.1f} | {r['peak_rss'] / GB:.2f} | "
                  f"{r['peak_anon'] / GB:.2f} | {r['ru_maxrss'] / GB:.2f} | "
                  f"{r['bytes'] / GB:.2f} |" if "bytes" in r else
                  f"| {r['shape']} | {r['command']} | {r['seconds']:.1f} | {r['peak_rss'] / GB:.2f} | "
                  f"{r['peak_anon'] / GB:.2f} | {r['ru_maxrss'] / GB:.2f} | - |")  # fmt: skip
    md += ["", "Per stage (the library's progress tasks; what ran outside them is one row):", "",
           "| model | command | stage | s | peak RSS GB | peak RssAnon GB |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["runs"]:
        for s in r["stages"]:
            md.append(f"| {r['shape']} | {r['command']} | {s['stage']} | {s['seconds']:.1f} | {s['peak_rss'] / GB:.2f} | "
                      f"{s['peak_anon'] / GB:.2f} |")  # fmt: skip
    (out / "scale.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

"""Benchmark: out-of-core extraction (issue 6, performance.md E1/E2/E4).

1. A synthetic Llama-2-7B-shaped bf16 elastic checkpoint (random weights, 2 shards like the real one:
   ~9.98 GB + 3.5 GB) is generated here, tensor by tensor.
2. Side by side on the same disk: `cp -r` of it (+ sync) vs `flex extract --uniform mlp=0.5,heads=0.5`
   (half width, in a subprocess whose peak RssAnon is sampled every 20 ms). Page cache is dropped
   before each when the kernel allows it.
3. A 70B-shaped elastic checkpoint made of sparse files (valid headers, no data on disk) is planned
   with `flex extract --dry-run` and timed.
Writes docs/results/extract.{json,md}. Needs ~30 GB of free disk; removes what it wrote.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from common import ROOT, proc_memory, random_llama

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (
        256,
        768,
        2,
        8,
        8,
        4096,
    ),  # intermediate: half of it must be a multiple of 64 (MLP width choices)
    "1b": (2048, 5504, 16, 16, 16, 32000),
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "70b": (8192, 28672, 80, 64, 8, 32000),
}


def llama_tensors(size: str) -> list[tuple[str, list[int]]]:
    h, f, n, heads, kv, vocab = SHAPES[size]
    d = h // heads
    out = [("model.embed_tokens.weight", [vocab, h])]
    for i in range(n):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", [h]),
            (p + "mlp.down_proj.weight", [h, f]),
            (p + "mlp.gate_proj.weight", [f, h]),
            (p + "mlp.up_proj.weight", [f, h]),
            (p + "post_attention_layernorm.weight", [h]),
            (p + "self_attn.k_proj.weight", [kv * d, h]),
            (p + "self_attn.o_proj.weight", [h, heads * d]),
            (p + "self_attn.q_proj.weight", [heads * d, h]),
            (p + "self_attn.v_proj.weight", [kv * d, h]),
        ]
    return out + [("lm_head.weight", [vocab, h]), ("model.norm.weight", [h])]


def write_elastic(path: Path, size: str, sparse: bool) -> None:
    """An elastic checkpoint of `size` (bf16, identity order): real random data, or sparse files."""
    from transformers import LlamaConfig

    from flexcli.arch import Dims
    from flexcli.arch.spec import ElasticSpec
    from flexcli.io.layout import write_json
    from flexcli.io.safetensors import ShardPlan, StreamingWriter

    h, f, n, heads, kv, vocab = SHAPES[size]
    sizes = dict(hidden_size=h, intermediate_size=f, num_hidden_layers=n, num_attention_heads=heads,
                 num_key_value_heads=kv, vocab_size=vocab)  # fmt: skip
    if sparse:
        from flexcli.io.safetensors import _header_bytes

        path.mkdir(parents=True, exist_ok=True)
        cfg = LlamaConfig(**sizes, torch_dtype="bfloat16")
        cfg.architectures = ["LlamaForCausalLM"]
        cfg.save_pretrained(path)
        plan = ShardPlan.make([(name, "BF16", shape) for name, shape in llama_tensors(size)], 10 * 10**9)
        for fname, header, fsize in zip(plan.files, plan.headers, plan.sizes):
            hb = _header_bytes(header)
            with open(path / fname, "wb") as fh:
                fh.write(len(hb).to_bytes(8, "little") + hb)
                fh.truncate(fsize)
        StreamingWriter(path, plan).close()  # checks the sizes, writes the index
    else:
        random_llama(path, sizes, 10 * 10**9)
    spec = ElasticSpec.build(
        "llama",
        Dims(n, h, f, heads, kv, h // heads, vocab, False),
        [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25],
        [1.0, 0.75, 0.5, 0.25],
    )
    write_json(
        path / "flex_elastic.json",
        {
            "format": "flexcli.elastic/1",
            "spec": spec.to_dict(),
            "recipe": {},
            "source": {"model": f"synthetic {size}"},
        },
    )


def drop_caches() -> bool:
    subprocess.run(["sync"])
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def peak_rss_anon(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RssAnon bytes, exit code) of a subprocess, sampled every 20 ms."""
    peak = [0]
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def poll():
        while p.poll() is None:
            try:
                peak[0] = max(peak[0], proc_memory(p.pid)["RssAnon"])
            except OSError:
                pass
            time.sleep(0.02)

    th = threading.Thread(target=poll)
    th.start()
    p.wait()
    th.join()
    subprocess.run(["sync"])
    return time.time() - t0, peak[0], p.returncode


def extraction_bench(work: Path, size: str = "7b") -> dict:
    """A `size`-shaped bf16 elastic checkpoint extracted at half width, side by side with `cp -r`
    (wall time, peak RssAnon, bit-exactness), and a 70B-shaped `--dry-run` plan. Removes what it wrote."""
    work.mkdir(parents=True, exist_ok=True)
    for leftover in ("copy", "half", "llama70b-elastic"):
        shutil.rmtree(work / leftover, ignore_errors=True)
    need = 2.4 * 2 * sum(math.prod(shape) for _, shape in llama_tensors(size))
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"bench_extract: needs ~{need / 1e9:.0f} GB free disk, have {free / 1e9:.0f} GB")
    src = work / f"llama{size}-elastic"
    t = time.time()
    if (src / "flex_elastic.json").exists() and (src / "model.safetensors.index.json").exists():
        print(
            f"reusing {src}", file=sys.stderr
        )  # a complete earlier generation (index and manifest come last)
        from transformers import LlamaConfig

        c = LlamaConfig.from_pretrained(src)
        c.architectures = ["LlamaForCausalLM"]
        c.save_pretrained(src)
    else:
        shutil.rmtree(src, ignore_errors=True)
        write_elastic(src, size, sparse=False)
    gen_s = time.time() - t
    src_bytes = sum(f.stat().st_size for f in src.iterdir())
    cold = drop_caches()
    t = time.time()
    subprocess.run(["cp", "-r", str(src), str(work / "copy")], check=True)
    subprocess.run(["sync"])
    cp_s = time.time() - t
    shutil.rmtree(work / "copy")
    drop_caches()
    cmd = [
        sys.executable,
        "-m",
        "flexcli",
        "extract",
        str(src),
        "--uniform",
        "mlp=0.5,heads=0.5",
        "-o",
        str(work / "half"),
        "--no-verify",
        "--no-compensate",  # the plain slicer's I/O is what is measured (and checked bit-exact below)
        "--max-shard-size",
        "10GB",
    ]
    ex_s, rss, rc = peak_rss_anon(cmd)
    if rc != 0:
        sys.exit(f"extract failed with exit {rc}")
    out_bytes = sum(f.stat().st_size for f in (work / "half").iterdir())
    # E3: bit-exact against get_slice on a few tensors
    from safetensors import safe_open

    exact = True

    def weight_map(d: Path) -> dict[str, str]:
        f = d / "model.safetensors.index.json"
        if f.exists():
            return json.loads(f.read_text())["weight_map"]
        with safe_open(str(d / "model.safetensors"), "pt") as st:
            return {k: "model.safetensors" for k in st.keys()}

    idx, sidx = weight_map(work / "half"), weight_map(src)
    h, f, n, heads, _, _ = SHAPES[size]
    for name, rows, cols in (
        (f"model.layers.{n - 1}.mlp.gate_proj.weight", f // 2, None),
        (f"model.layers.{n // 2}.mlp.down_proj.weight", None, f // 2),
        ("model.layers.1.self_attn.q_proj.weight", h // 2, None),
    ):
        with (
            safe_open(str(src / sidx[name]), "pt") as a,
            safe_open(str(work / "half" / idx[name]), "pt") as b,
        ):
            want = a.get_slice(name)[:rows] if rows else a.get_slice(name)[:, :cols]
            exact &= torch.equal(want, b.get_tensor(name))
    shutil.rmtree(work / "half")
    shutil.rmtree(src)

    big = work / "llama70b-elastic"
    write_elastic(big, "70b", sparse=True)
    t = time.time()
    plan = subprocess.run(
        [
            sys.executable,
            "-m",
            "flexcli",
            "extract",
            str(big),
            "--uniform",
            "mlp=0.5,heads=0.5",
            "-o",
            str(work / "p"),
            "--dry-run",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    plan_wall = time.time() - t
    doc = json.loads(plan.stdout)
    from flexcli.commands.extract import ExtractOptions, extract
    from flexcli.plan.search import Request

    t = time.time()
    extract(big, ExtractOptions(request=Request(uniform=(0.5, 0.5)), output=work / "p", dry_run=True))
    plan_s = time.time() - t
    disk_used = sum(f.stat().st_blocks * 512 for f in big.iterdir())
    shutil.rmtree(big)

    res = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cold_cache": cold},
        "shape": size,
        "checkpoint": {
            "source_bytes": src_bytes,
            "generate_s": round(gen_s, 1),
            "cp_r_s": round(cp_s, 1),
            "extract_s": round(ex_s, 1),
            "extract_over_cp": round(ex_s / cp_s, 3),
            "peak_rss_anon_bytes": rss,
            "output_bytes": out_bytes,
            "bit_exact": exact,
        },
        "70b_dry_run": {
            "planned_bytes": doc["models"][0]["planned_bytes"],
            "files": doc["models"][0]["planned_files"],
            "plan_s_in_process": round(plan_s, 3),
            "cli_wall_s": round(plan_wall, 2),
            "source_disk_bytes": disk_used,
        },
    }
    res["targets"] = {
        "E1 peak RssAnon <= 1 GB": rss <= 1e9,
        "E2 wall <= 1.5x cp -r": ex_s <= 1.5 * cp_s,
        "E3 bit-exact vs get_slice": exact,
        "E4 70B plan < 1 s": plan_s < 1.0,
    }
    return res


def main() -> None:
    res = extraction_bench(ROOT / "bench-out" / "extract", "7b")
    rss, cold, exact = (
        res["checkpoint"]["peak_rss_anon_bytes"],
        res["machine"]["cold_cache"],
        res["checkpoint"]["bit_exact"],
    )
    src_bytes, out_bytes, plan_s = (
        res["checkpoint"]["source_bytes"],
        res["checkpoint"]["output_bytes"],
        res["70b_dry_run"]["plan_s_in_process"],
    )
    plan_wall = res["70b_dry_run"]["cli_wall_s"]
    out = ROOT / "docs" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "extract.json").write_text(json.dumps(res, indent=2) + "\n")
    r7 = res["checkpoint"]
    md = [
        "# Out-of-core extraction (bench/bench_extract.py)",
        "",
        f"Machine: {platform.platform()}, torch {torch.__version__}; page cache dropped before each run: {cold}.",
        "",
        f"Synthetic Llama-2-7B-shaped bf16 elastic checkpoint, {src_bytes / 1e9:.2f} GB in 2 shards, extracted at "
        "half width (`--uniform mlp=0.5,heads=0.5`):",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| `cp -r` + sync | {r7['cp_r_s']} s |",
        f"| `flex extract` (process wall time, incl. start-up and fsync) | {r7['extract_s']} s ({r7['extract_over_cp']}x cp) |",
        f"| peak RssAnon of the extract process | {rss / 1e6:.0f} MB |",
        f"| output | {out_bytes / 1e9:.2f} GB |",
        f"| bit-exact against get_slice (3 tensors) | {exact} |",
        f"| 70B-shaped plan (`--dry-run`, 80 layers, sparse source of {res['70b_dry_run']['planned_bytes'] / 1e9:.1f} GB output) | "
        f"{plan_s:.3f} s in process, {plan_wall:.2f} s CLI wall incl. start-up |",
        "",
        "| target | met |",
        "|---|---|",
    ] + [f"| {k} | {v} |" for k, v in res["targets"].items()]
    (out / "extract.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

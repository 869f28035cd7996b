"""Benchmark: llama.cpp as the serving runtime (make bench-llamacpp) -> docs/results/llamacpp.{md,json}.

For the toy model ("demo" in the results; bench/toy.py's toy/base-elastic) and SmolLM2-135M-Instruct (`make bench-real`'s
trained elastic checkpoint, in $FLEX_CACHE), each copied into a work directory first:

1. `flex profile --runtime llama.cpp --phase decode --validate 20`: the decode latency table measured in
   llama.cpp, validated end to end on 20 random per-layer configurations (target: >= 90% within +-10%).
   A table the profiler refuses is measured again (up to 3 times), then kept with its problems recorded.
2. `flex train-router --regime llama.cpp` (static router) for 3 budgets between the smallest and the full
   model of that table.
3. For each budget: the static router's sub-model and the best uniform sub-model whose table latency is
   at most the router's (equal llama.cpp latency), both `flex extract --format gguf` (f16) and measured
   there: decode tokens/s (extract times each file in llama.cpp in pairs with the full model; target:
   measured <= budget + 5%), and held-out perplexity computed by llama.cpp itself.
4. The full model exported the same way; for SmolLM2 also the original Q4_1 GGUF run unchanged (the
   anchor a user starts from), timed and scored the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, flex, private_copy, smollm2_cache  # noqa: E402

from flexcli.runtimes import llamacpp  # noqa: E402

FRACTIONS = (0.3, 0.55, 0.8)  # budgets between the smallest and the full model of the table
EVAL_WINDOWS, SEQ = 8, 256


def _sources(a) -> dict[str, tuple[Path, Path | None]]:
    """name -> (elastic checkpoint, original GGUF anchor or None); builds the missing ones."""
    demo = ROOT / "toy" / "base-elastic"
    if "demo" in a.models and not (demo / "flex_elastic.json").exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "toy.py")], cwd=ROOT, check=True)
    smol = smollm2_cache() / "bench" / "flextron"
    anchor = smollm2_cache() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if "smollm2" in a.models and not (smol / "flex_elastic.json").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "bench_real.py"), "--resume"], cwd=ROOT, check=True
        )
    return {"demo": (demo, None), "smollm2": (smol, anchor)}


def _workdir(src: Path, dst: Path, anchor: Path | None) -> Path:
    """A private copy (hard links) of the elastic checkpoint, so its tables and routers stay untouched; a
    checkpoint converted from a GGUF before flexcli kept the file's tokenizer block gets it here."""
    private_copy(src, dst)
    if anchor is not None and not (dst / "flex_gguf_tokenizer.gguf").exists():
        from gguf import GGUFReader

        from flexcli.io.gguf_export import save_tokenizer_block

        save_tokenizer_block(GGUFReader(anchor), dst)
    return dst


def _heldout(el: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from flexcli.train.data import STDLIB, load_sequences

    tok = AutoTokenizer.from_pretrained(el, local_files_only=True)
    return load_sequences(tok, STDLIB, EVAL_WINDOWS, SEQ, "heldout").tolist()


def _ppl(gguf: Path, seqs: list[list[int]], threads: int) -> float:
    """Held-out perplexity computed by llama.cpp (next-token log-likelihood of its own logits)."""
    import torch

    return llamacpp.perplexity(gguf, torch.tensor(seqs))


def _anchor_ms(gguf: Path, el: Path, threads: int, kv: int) -> tuple[float, float]:
    """(decode ms of a GGUF that is not an extract output, e.g. the original file, and of the full f16
    model at the same moments): medians of 3 paired timings, as profile and extract time."""
    from flexcli.latency.profile import ProfileOptions, open_session

    sess = open_session(el, ProfileOptions(runtime="llama.cpp", phase="decode", seq_len=kv, threads=threads))
    try:
        with sess.backend.open_file(gguf) as fn:
            pairs = [sess.paired(fn) for _ in range(3)]
    finally:
        sess.close()
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def _best_uniform(el: Path, table: dict, max_ms: float, seqs: list[list[int]]) -> dict | None:
    """The uniform configuration with the lowest held-out loss (the elastic model in PyTorch) among those
    whose table latency is at most `max_ms`: for each MLP width, the most heads that fit."""
    import torch

    from flexcli.elastic.evaluate import mean_loss
    from flexcli.elastic.runtime import load_elastic
    from flexcli.latency.table import LatencyTable

    t = LatencyTable.from_dict(table)
    model = load_elastic(el)
    x = torch.tensor(seqs)
    best = None
    for m in t.mlp[0]:
        fits = [h for h in t.heads[0] if t.predict([(m, h)] * len(t.mlp)) <= max_ms]
        if not fits:
            continue
        cfg = [(m, max(fits))] * len(t.mlp)
        with model.configured(cfg):
            loss = mean_loss(model.model, x)
        if best is None or loss < best[0]:
            best = (loss, cfg)
    return None if best is None else {"config": [{"mlp": m, "heads": h} for m, h in best[1]]}


def _extract(el: Path, out: Path, *how: str) -> dict:
    return flex(
        "extract",
        str(el),
        "-o",
        str(out),
        "--format",
        "gguf",
        "--regime",
        "llama.cpp",
        "--force",
        *how,
        cwd=out.parent,
    )["models"][0]


def run_model(name: str, src: Path, anchor: Path | None, work: Path, a) -> dict[str, Any]:
    el = _workdir(src, work / f"{name}-elastic", anchor)
    seqs = _heldout(el)
    res: dict[str, Any] = {"elastic": str(src)}
    for attempt in range(1, 4):
        try:
            extra = ["--accept-noisy"] if attempt == 3 else []
            prof = flex("profile", str(el), "--runtime", "llama.cpp", "--phase", "decode", "--kv-len", str(a.kv),
                        "--validate", "20", *extra, cwd=work)  # fmt: skip
            break
        except subprocess.CalledProcessError:
            print(f"{name}: profile attempt {attempt} refused (noisy); measuring again", file=sys.stderr)
    res["profile"] = {**prof, "attempts": attempt}
    data = json.loads((el / "flex_latency.json").read_text())
    table = data["regimes"][prof["regime"]]
    threads = table["header"]["threads"]
    full, small = prof["full_ms"], prof["smallest_ms"]
    budgets = [small + f * (full - small) for f in FRACTIONS]
    flex("train-router", str(el), "--regime", "llama.cpp", "--no-dynamic", "--sm-warmup", "128", "--budgets",
         ",".join(f"{b:.4f}ms" for b in budgets), cwd=work)  # fmt: skip

    def measured(m: dict, gguf: Path) -> dict:
        ms = m["measured_latency_ms"]
        return {
            "config": m["config"], "params": m["params"], "predicted_ms": m["predicted_latency_ms"],
            "measured_ms": ms, "tok_s": 1000 / ms, "reference_drift": m["reference_drift"],
            "at_table_speed_ms": m["measured_at_table_speed_ms"], "top1_agreement": m["top1_agreement"],
            "ppl": _ppl(gguf, seqs, threads),
        }  # fmt: skip

    f = work / f"{name}-full.gguf"
    res["full"] = measured(_extract(el, f, "--uniform", "mlp=1,heads=1"), f)
    res["budgets"] = []
    for b in budgets:
        g = work / f"{name}-static-{b:.3f}ms.gguf"
        st = measured(_extract(el, g, "--budget", f"{b:.4f}ms"), g)
        uni = _best_uniform(el, table, st["predicted_ms"], seqs)
        row: dict[str, Any] = {"budget_ms": b, "static": st}
        if uni is not None:
            (work / "uniform.json").write_text(json.dumps(uni["config"]))
            u = work / f"{name}-uniform-{b:.3f}ms.gguf"
            row["uniform"] = measured(_extract(el, u, "--config", str(work / "uniform.json")), u)
        row["within_budget"] = st["measured_ms"] <= 1.05 * b
        row["within_budget_at_table_speed"] = st["at_table_speed_ms"] <= 1.05 * b
        res["budgets"].append(row)
    if anchor is not None:
        ms, ref = _anchor_ms(anchor, el, threads, a.kv)
        res["anchor"] = {
            "file": anchor.name,
            "measured_ms": ms,
            "tok_s": 1000 / ms,
            "full_f16_ms_alongside": ref,
            "speed_vs_full_f16": ref / ms,
            "ppl": _ppl(anchor, seqs, threads),
        }
    return res


def report(results: dict, out: Path) -> None:
    lines = [
        "# llama.cpp as the serving runtime (bench/bench_llamacpp.py)",
        "",
        f"Run {results['created']} on {results['machine']} with {results['llama_cpp']}; decode after "
        f"{results['kv']} cached tokens, batch 1, f16 GGUF files written by `flex extract --format gguf`. "
        "Perplexity: llama.cpp's own logits on held-out stdlib code "
        f"({EVAL_WINDOWS} x {SEQ} tokens). Latencies are llama.cpp decode steps; each measured sub-model was timed "
        "in pairs with the full model, whose drift against the table is given.",
        "",
    ]
    for name, r in results["models"].items():
        p, v = r["profile"], r["profile"]["validation"]
        dn = v["drift_normalized"]
        lines += [
            f"## {name}",
            "",
            f"Table `{p['regime']}`: full {p['full_ms']:.3f} ms, smallest {p['smallest_ms']:.3f} ms, noise between "
            f"rounds {p['noise']:.1%}, scale {p['scale']:.3f}, attempts {p['attempts']}"
            + (f", accepted with problems: {'; '.join(p['problems'])}" if p["problems"] else "")
            + ".",
            f"Validation on {v['n']} random per-layer configurations: {v['within_10pct']:.0%} within ±10% "
            f"(drift-normalized {dn['within_10pct']:.0%}, p90 |err| {dn['p90_abs_err']:.1%}, mean {dn['mean_signed_err']:+.1%}; "
            f"reference drift {v['reference_drift']:.0%}) — target ≥ 90%: "
            f"{'met' if dn['within_10pct'] >= 0.9 else 'NOT met'} (drift-normalized), "
            f"{'met' if v['within_10pct'] >= 0.9 else 'NOT met'} (raw).",
            "",
            "| budget ms | model | params | table ms | measured ms | tok/s | ref drift | at table speed ms | ppl | ≤ budget+5% |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        f = r["full"]
        lines.append(
            f"| - | full (f16) | {f['params'] / 1e6:.1f}M | {f['predicted_ms']:.2f} | {f['measured_ms']:.2f} | "
            f"{f['tok_s']:.1f} | {f['reference_drift']:+.0%} | {f['at_table_speed_ms']:.2f} | {f['ppl']:.2f} | - |"
        )
        if "anchor" in r:
            x = r["anchor"]
            lines.append(
                f"| - | original {x['file']} | - | - | {x['measured_ms']:.2f} | {x['tok_s']:.1f} | - | "
                f"{x['speed_vs_full_f16']:.2f}x the full f16 timed alongside | {x['ppl']:.2f} | - |"
            )
        for row in r["budgets"]:
            for kind in ("static", "uniform"):
                if kind not in row:
                    continue
                m = row[kind]
                ok = "" if kind == "uniform" else (
                    f"{'yes' if row['within_budget'] else 'no'} (at table speed: {'yes' if row['within_budget_at_table_speed'] else 'no'})"
                )  # fmt: skip
                lines.append(
                    f"| {row['budget_ms']:.2f} | {kind} router | {m['params'] / 1e6:.1f}M | {m['predicted_ms']:.2f} | "
                    f"{m['measured_ms']:.2f} | {m['tok_s']:.1f} | {m['reference_drift']:+.0%} | "
                    f"{m['at_table_speed_ms']:.2f} | {m['ppl']:.2f} | {ok} |".replace(
                        "uniform router", "best uniform"
                    )
                )
        lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    (out / "llamacpp.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "llamacpp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    import torch

    from flexcli.device import device_name
    from flexcli.runtimes import llamacpp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "llamacpp")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--models", default="demo,smollm2")
    ap.add_argument("--kv", type=int, default=128, help="cached tokens before each timed decode step")
    a = ap.parse_args()
    a.models = a.models.split(",")
    llamacpp.require()
    a.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": device_name(torch.device("cpu")),
        "llama_cpp": llamacpp.version(),
        "kv": a.kv,
        "models": {},
    }
    for name, (src, anchor) in _sources(a).items():
        if name in a.models:
            results["models"][name] = run_model(name, src, anchor, a.work.resolve(), a)
    report(results, a.out)


if __name__ == "__main__":
    main()

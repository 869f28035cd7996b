"""Rendering for the `flex` command line: progress on stderr, results on stdout, errors as one line.

Results go to stdout (a table, a path, or with --json exactly one JSON document); progress, logs and
errors go to stderr. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input, 3 infeasible request.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer

from ..errors import EXIT_RUNTIME, FlexError
from ..progress import Reporter

STATE = {"verbosity": 0}


class RichReporter(Reporter):
    """Progress bars on a terminal (transient, on stderr); plain log lines otherwise."""

    def __init__(self, quiet: bool):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet
        self.bars = self.console.is_terminal and not quiet

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Any]:
        if not self.bars:
            if not self.quiet:
                self.console.print(f"[dim]·[/dim] {description} ...", highlight=False)
            yield _LogTask(self, description, total)
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=True,
        ) as prog:
            tid = prog.add_task(description, total=total, info="")
            yield _BarTask(prog, tid)
        self.console.print(f"[green]✓[/green] {description}", highlight=False)

    def info(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(msg, highlight=False)

    def warn(self, msg: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {msg}", highlight=False)


class _BarTask:
    def __init__(self, prog, tid):
        self.prog, self.tid = prog, tid

    def advance(self, n: float = 1, **fields: object) -> None:
        info = " ".join(f"{k}={v}" for k, v in fields.items())
        self.prog.update(self.tid, advance=n, info=info)


class _LogTask:
    """Without a terminal: a log line about every 10% of the work (and never with -q)."""

    def __init__(self, rep: RichReporter, desc: str, total: float | None):
        self.rep, self.desc, self.total, self.done, self.next = rep, desc, total, 0.0, 0.1

    def advance(self, n: float = 1, **fields: object) -> None:
        self.done += n
        if self.total and not self.rep.quiet and self.done / self.total >= self.next - 1e-9:
            self.next += 0.1
            info = " ".join(f"{k}={v}" for k, v in fields.items())
            self.rep.console.print(f"  {self.desc}: {self.done:.0f}/{self.total:.0f} {info}", highlight=False)


def flag_of(option: str, flags: dict[str, str] | None = None) -> str:
    """The command-line flag that sets an options field: --seq-len for seq_len, unless renamed."""
    return (flags or {}).get(option) or "--" + option.replace("_", "-")


def run(
    fn: Callable[[Reporter], Any],
    as_json: bool,
    render: Callable[[Any], None],
    flags: dict[str, str] | None = None,
) -> Any:
    """Call the library, render the result (returned), map errors to one line on stderr and an exit code;
    an error about an options field is prefixed with its flag (`flags` maps renamed ones)."""
    follower = os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 reports
    rep = RichReporter(quiet=STATE["verbosity"] < 0 or follower)
    debug = os.environ.get("FLEX_DEBUG") == "1" or STATE["verbosity"] > 0
    try:
        result = fn(rep)
    except FlexError as e:
        msg = e.render(lambda name, _value: flag_of(name, flags))
        msg = f"{flag_of(e.option, flags)}: {msg}" if e.option else msg
        _fail(msg, e.exit_code, as_json, debug)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", 130, as_json, debug)
    except OSError as e:  # disk full, file too large, permissions: the output was never committed
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        _fail(f"cannot write: {e.strerror or e}{where}; nothing was written", EXIT_RUNTIME, as_json, debug)
    except Exception as e:  # an unexpected failure: still one line unless debugging
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "I/O error" in msg:  # safetensors reports write failures in its own exception type
            _fail(f"cannot write: {msg}; nothing was written", EXIT_RUNTIME, as_json, debug)
        _fail(f"{type(e).__name__}: {msg} (set FLEX_DEBUG=1 for a traceback)", EXIT_RUNTIME, as_json, debug)
    if follower:
        return result
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result))
    else:
        render(result)
    return result


def _fail(msg: str, code: int, as_json: bool, debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exc()
    typer.echo(f"error: {msg}", err=True)
    if as_json and os.environ.get("RANK", "0") == "0":
        typer.echo(json.dumps({"error": msg, "exit_code": code}))
    raise typer.Exit(code)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200).print(t)


# -- one renderer per command: the human-readable form of its result ---------------------------------
def convert_result(r) -> None:
    typer.echo(r.output)
    if r.training:
        t = r.training
        before = {row.name: row for row in t.before}
        table(
            f"held-out perplexity: elastic training ({t.steps} steps, {t.tokens:,} tokens, {t.tokens_per_s:.0f} tok/s)",
            ["configuration", "mean mlp", "mean heads", "prune-only", "trained"],
            [
                [
                    row.name,
                    f"{sum(row.mlp) / len(row.mlp):.0f}",
                    f"{sum(row.heads) / len(row.heads):.1f}",
                    f"{before[row.name].ppl:.2f}",
                    f"{row.ppl:.2f}",
                ]
                for row in t.after
            ],
        )
    if r.widths:
        table(
            "held-out perplexity at uniform width",
            ["width", "mlp", "heads", "ppl"],
            [[f"{w.ratio:.0%}", w.mlp, w.heads, f"{w.ppl:.2f}"] for w in r.widths],
        )


def pretrain_result(r) -> None:
    typer.echo(r.output)
    typer.echo(
        f"{r.params / 1e6:.2f}M params, {r.train_tokens} tokens in {r.seconds:.0f}s "
        f"({r.tokens_per_s:.0f} tok/s); held-out ppl {r.heldout_ppl:.2f}",
        err=True,
    )


def profile_result(r) -> None:
    if hasattr(r, "tables"):  # one table per GGUF type
        for one in r.tables:
            profile_result(one)
        return
    typer.echo(f"{r.regime}")
    typer.echo(
        f"fixed part {r.fixed_ms:.3f} ms · full model {r.full_ms:.3f} ms · smallest {r.smallest_ms:.3f} ms "
        f"· noise between rounds {r.noise:.1%} (reference drift {r.reference_drift:.1%}) · scale {r.scale:.3f}"
    )
    mlps = sorted({e.mlp for e in r.table}, reverse=True)
    heads = sorted({e.heads for e in r.table}, reverse=True)
    ms = {(e.mlp, e.heads): e.layer_ms for e in r.table}
    table(
        "per-layer latency (ms) by MLP width (rows) and heads (columns)",
        ["mlp", *map(str, heads)],
        [[m, *[f"{ms[(m, h)]:.3f}" for h in heads]] for m in mlps],
    )
    if r.validation:
        v = r.validation
        table(
            f"validation: {v.n} random per-layer configurations, predicted vs measured",
            ["within ±10%", "within ±5%", "p90 |err|", "mean signed err", "max |err|"],
            [
                [
                    f"{v.within_10pct:.0%}",
                    f"{v.within_5pct:.0%}",
                    f"{v.p90_abs_err:.1%}",
                    f"{v.mean_signed_err:+.1%}",
                    f"{v.max_abs_err:.1%}",
                ]
            ],
        )
        dn = v.drift_normalized
        typer.echo(
            f"machine drift during validation {v.reference_drift:.1%} (full model re-timed before each); "
            f"drift-normalized: {dn.within_10pct:.0%} within ±10%, p90 |err| {dn.p90_abs_err:.1%}"
        )


def _mean(values: list[int]) -> float:
    return sum(values) / len(values)


def train_router_result(r) -> None:
    if hasattr(r, "runs"):  # one per regime
        for one in r.runs:
            train_router_result(one)
        return
    typer.echo(r.elastic)
    typer.echo(
        f"regime {r.regime} · full {r.full_ms:.3f} ms · smallest {r.smallest_ms:.3f} ms · "
        f"surrogate Spearman {r.sm_spearman:.3f}"
    )
    rows = []
    for b in r.budgets:
        rows.append(
            [
                b.budget,
                f"{b.budget_ms:.2f}",
                f"{b.lut_latency_ms:.2f}",
                f"{_mean([c['mlp'] for c in b.config]):.0f}",
                f"{_mean([c['heads'] for c in b.config]):.1f}",
                f"{b.ppl:.2f}",
                f"{b.uniform_ppl:.2f} @ {b.uniform_latency_ms:.2f}",
                "-" if b.dynamic_ppl is None else f"{b.dynamic_ppl:.2f} @ {b.dynamic_mean_latency_ms:.2f}",
                "-" if b.joint_ppl is None else f"{b.joint_ppl:.2f}",
            ]
        )
    table(
        "held-out ppl per budget: static router, uniform width at equal LUT latency, input-adaptive, after joint",
        [
            "budget",
            "ms",
            "LUT ms",
            "mean mlp",
            "mean heads",
            "static ppl",
            "uniform ppl @ ms",
            "adaptive ppl @ ms",
            "joint ppl",
        ],
        rows,
    )
    typer.echo("per-layer configurations: flex train-router --json (budgets[].config)", err=True)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def extract_result(r) -> None:
    for m in r.models:
        if m.planned_files is None:
            typer.echo(m.output)
        elif m.planned_bytes is None:  # a quantized file's size is the quantizer's choice
            typer.echo(f"{m.output} (dry run: {m.gguf_type}, size known after quantizing)")
        else:
            typer.echo(
                f"{m.output} (dry run: {m.planned_bytes / 1e9:.2f} GB in {max(1, len(m.planned_files))} files)"
            )
    rows = [
        [
            m.budget or "-",
            m.format
            + (" (remote code)" if m.needs_remote_code else "")
            + (f" ({m.gguf_arch}, {m.gguf_type})" if m.gguf_arch else ""),
            " ".join(f"{c['mlp']}/{c['heads']}" for c in m.config),
            f"{m.params / 1e6:.2f}M",
            _ms(m.predicted_latency_ms),
            _ms(m.measured_latency_ms),
            m.method,
        ]
        for m in r.models
    ]
    for m in r.models:
        if m.measured_latency_ms is not None:
            budget = f" (budget {m.budget_ms:.3f} ms)" if m.budget_ms else ""
            typer.echo(
                f"{m.output}: measured {m.measured_latency_ms:.3f} ms{budget} in {m.regime}; the full model timed "
                f"alongside ran {m.reference_drift:+.1%} vs the table, so {m.measured_at_table_speed_ms:.3f} ms "
                f"at the table's speed"
            )
        elif m.latency_note:
            typer.echo(f"{m.output}: latency not measured: {m.latency_note}")
        if m.bits_per_weight is not None:
            types = ", ".join(f"{n} {t}" for t, n in (m.stored_types or {}).items())
            fb = f"; {m.fallbacks} fell back" if m.fallbacks else ""
            im = (
                ""
                if m.imatrix is None
                else (", importance matrix" if m.imatrix else ", no importance matrix")
            )
            typer.echo(f"{m.output}: {m.bits_per_weight:.2f} bits per weight ({types}{fb}{im})")
        if m.compensation:
            c = m.compensation
            typer.echo(
                f"{m.output}: compensated: {c['tensors']} narrowed projections refit on {c['tokens']} tokens of "
                f"{c['calibration_data']} ({c['seconds']:.0f} s)"
            )
        elif m.compensation_note and m.compensation_note != "--no-compensate":
            typer.echo(f"{m.output}: not compensated: {m.compensation_note}")
        if m.verify_note:
            typer.echo(f"{m.output}: not verified: {m.verify_note}")
        elif m.ppl_ratio is not None:
            typer.echo(
                f"{m.output}: {m.verified_in}: against its {m.gguf_arch} 16-bit file (itself {m.f16_top1_agreement:.1%} "
                f"top-1 with the elastic model): top-1 agreement {m.top1_agreement:.1%}, held-out ppl "
                f"{m.ppl_quantized:.2f} vs {m.ppl_f16:.2f} (x{m.ppl_ratio:.3f})"
            )
        elif m.top1_agreement is not None:
            typer.echo(
                f"{m.output}: {m.verified_in}: top-1 agreement {m.top1_agreement:.1%}, max relative logit error {m.verified_max_rel_err:.1e}"
            )
    table(
        "extracted",
        ["budget", "format", "mlp/heads per layer", "params", "predicted ms", "measured ms", "chosen by"],
        rows,
    )
    for m in r.models:
        if m.candidates:
            table(
                f"--gguf-type auto for {m.budget}: every llama.cpp table's configuration, by held-out loss",
                [
                    "type",
                    "mlp/heads per layer",
                    "predicted ms",
                    "measured ms",
                    "at table speed",
                    "MiB",
                    "loss",
                    "",
                ],
                [
                    [
                        c["gguf_type"],
                        " ".join(f"{x['mlp']}/{x['heads']}" for x in c["config"]),
                        _ms(c["predicted_latency_ms"]),
                        _ms(c["measured_latency_ms"]),
                        _ms(c["measured_at_table_speed_ms"]),
                        f"{(c['file_bytes'] or 0) / 2**20:.1f}",
                        f"{c['heldout_loss']:.4f}",
                        "chosen" if c["chosen"] else "",
                    ]
                    for c in m.candidates
                ],
            )


def eval_result(r) -> None:
    table(
        f"held-out perplexity ({r.tokens:,} tokens of {r.data})",
        ["model", "params", "predicted ms", "ppl"],
        [[x.name, f"{x.params / 1e6:.2f}M", _ms(x.predicted_latency_ms), f"{x.ppl:.3f}"] for x in r.rows],
    )


def generate_result(r) -> None:
    """The text was streamed to stdout; close its line there and say what ran on stderr."""
    typer.echo("")
    how = r.method if r.budget is None else f"{r.method} at {r.budget}"
    heads = f"; heads fixed at prefill, MLP widths per token {r.mlp_width_share}" if r.mlp_width_share else ""
    pred = f" (predicted {r.predicted_ms:.2f})" if r.predicted_ms is not None and r.phase == "decode" else ""
    typer.echo(
        f"{r.tokens} tokens, {r.ms_per_token:.2f} ms/token{pred} (median decode step), prefill {r.prefill_ms:.1f} ms; "
        f"{how}{heads}",
        err=True,
    )


def validate_result(r) -> None:
    typer.echo(
        f"{r.path}: {r.kind} checkpoint, {r.tensors} tensors, "
        f"{'valid' if r.valid else f'{len(r.problems)} problem(s)'}"
    )
    for p in r.problems:
        extra = "" if p.expected is None and p.found is None else f" (expected {p.expected}, found {p.found})"
        typer.echo(f"  {p.file}{' ' + p.tensor if p.tensor else ''}: {p.message}{extra}")

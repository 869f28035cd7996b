"""What a runtime is to flexcli: the protocol every module in runtimes/ implements.

A runtime serves sub-models in one artefact format and times them in latency regimes. It does four
things, and nothing else in flexcli knows how:

1. **write** the artefact it serves for a configuration (a transformers directory, a GGUF file, ...),
   into a temporary path the caller commits, and verify it there against the elastic model;
2. **open** a timing backend in a regime: any configuration of an elastic checkpoint as a timed call
   (for `flex profile`), and a written artefact as the same kind of call (for `flex extract`'s check);
3. **name** the regime (latency.table.Regime: its `runtime` field is the runtime's name);
4. **reproduce** a stored table's regime on this machine, or say that it cannot.

Adding a runtime (vLLM, ONNX Runtime) is one module here implementing `Runtime` and `Backend`, and
one line in runtimes/__init__.py.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..arch.spec import Config, ElasticSpec
from ..io.source import SourceModel
from ..progress import Reporter

Fn = Callable[[], Any]  # one timed call


@dataclass(kw_only=True)
class ArtifactOptions:
    """How to write an artefact (the format-specific part of `flex extract`'s options)."""

    fmt: str = "auto"  # the --format asked for
    gguf_type: str = "f16"  # gguf: WEIGHTS[/EMBED] (runtimes.quant)
    imatrix: bool = True  # gguf, quantized types: weigh rounding by the sub-model's importance matrix
    imatrix_tokens: int = 8192
    max_shard_bytes: int = 5 * 10**9


@dataclass
class WriteJob:
    """One sub-model to write: the checkpoint, its configuration and where it came from."""

    elastic: Path
    src: SourceModel
    spec: ElasticSpec
    cfg: Config
    label: str  # names the model inside the artefact
    provenance: dict[str, Any]  # recorded in the artefact (source, config, method, budget, ...)
    options: ArtifactOptions
    # HF weight name -> a sliced tensor written instead of the plain slice (elastic.compensate's refit
    # output projections); the artefact is verified against the elastic model with these written in
    overrides: dict[str, Any] = field(default_factory=dict)

    def reference(self):
        """The elastic model at this job's configuration, as the artefact must compute it (the loaded
        ElasticModel, its weights overridden in place)."""
        from ..elastic import compensate
        from ..elastic.runtime import load_elastic

        el = load_elastic(self.elastic)
        if self.overrides:
            compensate.apply(el.model, el.arch, el.spec, self.cfg, self.overrides)
        el.set_config(self.cfg)
        return el


@dataclass
class Written:
    """What `write` produced: the format written, the parameters in it, and the runtime's report fields
    (merged into the `flex extract` result, e.g. gguf_type, bits_per_weight, verified_in)."""

    kind: str
    params: int
    fields: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Backend(Protocol):
    """A timing session in one regime (one per `flex profile` run or `flex extract` check)."""

    name: str  # the runtime's name
    regime: Any  # latency.table.Regime
    header: dict[str, Any]  # runtime facts kept in the table's header (versions, threads, types)
    sync: Callable[[], None]  # wait for queued work (a GPU stream); a no-op on CPU runtimes

    def open(self, cfg: Config) -> AbstractContextManager[Fn]:
        """The elastic checkpoint at `cfg` (a prefix of the layers when shorter) as a timed call."""
        ...

    def open_artifact(self, path: Path) -> AbstractContextManager[Fn]:
        """A written artefact (what `Runtime.write` produced) as a timed call in this regime."""
        ...

    def fixed_items(self) -> dict[str, Callable[[], AbstractContextManager[Fn]]]:
        """Extra timed items the fixed part (embeddings, final norm, LM head) is computed from."""
        ...

    def fixed_ms(self, med: dict[Any, float]) -> float:
        """The fixed part's ms from the medians of the table's items and `fixed_items`."""
        ...

    def forget(self, cfg: Config) -> None:
        """Drop whatever was cached for a configuration timed once (disk and memory stay bounded)."""
        ...

    def close(self) -> None: ...


class Runtime(Protocol):
    name: str  # as in `flex profile --runtime` and in a regime's key
    formats: tuple[str, ...]  # the `flex extract --format` values it writes
    suffix: str  # "" when an artefact is a directory, else the file suffix

    def missing(self) -> str | None:
        """Why this runtime cannot run here (a missing optional dependency), or None."""
        ...

    def check(
        self, o: ArtifactOptions, src: SourceModel, spec: ElasticSpec, elastic: Path, writing: bool
    ) -> None:
        """Refuse bad format options before anything is written (a one-line UsageError); `writing`:
        False for a dry run, which needs nothing but the headers."""
        ...

    def plan(self, job: WriteJob) -> Written:
        """What `write` would produce, from the headers alone (`flex extract --dry-run`): fields include
        planned_bytes and planned_files."""
        ...

    def write(self, job: WriteJob, tmp: Path, verify: bool, rep: Reporter) -> Written:
        """Write the artefact into `tmp` (committed by the caller) and, with `verify`, check it against
        the elastic model; a failed check raises and nothing is committed."""
        ...

    def backend(self, path: Path, o: Any) -> Backend:
        """A timing session of ELASTIC `path` in the regime latency.profile.ProfileOptions `o` describes."""
        ...

    def options_for(self, table: Any) -> Any:
        """ProfileOptions that reproduce `table`'s regime on this machine, or None when it cannot."""
        ...

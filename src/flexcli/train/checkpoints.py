"""Training checkpoints for `flex convert --resume`, in a hidden sibling of the output.

    .OUT.flex-train/
        perms.safetensors        importance scores and permutations (so a resume never re-ranks)
        step-0000100/            one checkpoint, written to a temporary name and renamed when complete
            meta.json            step, recipe hash, source hashes
            model.safetensors    weights (single process)   | dcp/  torch.distributed.checkpoint (torchrun)
            loop.pt              optimizer state, generator state, loss history (weights_only-loadable)

Only the newest `keep` checkpoints are kept. A resume checks that recipe and source match.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..io.atomic import commit
from .loop import LoopState


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.flex-train"


@dataclass
class Checkpoints:
    root: Path
    recipe: str  # recipe hash
    source: dict[str, str]  # source file hashes

    def list(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(
            p
            for p in self.root.glob("step-*")
            if p.is_dir() and not p.name.endswith(".tmp") and (p / "meta.json").is_file()
        )

    def latest(self) -> Path | None:
        steps = self.list()
        return steps[-1] if steps else None

    def check(self, ckpt: Path) -> dict[str, Any]:
        """Refuse a checkpoint made under another recipe or from another model."""
        meta = json.loads((ckpt / "meta.json").read_text())
        if meta.get("source") != self.source:
            raise UsageError(
                f"checkpoint {ckpt} was made from another model; remove {self.root} or pass {{flag:force=True}} "
                "to start over"
            )
        if meta.get("recipe") != self.recipe:
            raise UsageError(
                f"checkpoint {ckpt} was made under a different recipe; resume with the same recipe and "
                "options, or pass {flag:force=True} to start over"
            )
        return meta

    def save(
        self,
        step: int,
        model_state: dict[str, torch.Tensor] | None,
        loop: LoopState,
        keep: int,
        dcp_state: dict | None = None,
        write: bool = True,
    ) -> Path:
        """Write step-N atomically (io.atomic.commit), then drop all but the newest `keep`."""
        from safetensors.torch import save_file

        final = self.root / f"step-{step:07d}"
        tmp = self.root / f"step-{step:07d}.tmp"
        if dcp_state is not None:  # every rank writes its shards
            import torch.distributed.checkpoint as dcp

            dcp.save(dcp_state, checkpoint_id=str(tmp / "dcp"))
        if not write:
            return final
        tmp.mkdir(parents=True, exist_ok=True)
        if model_state is not None:
            unique, seen = {}, set()
            for k, v in model_state.items():  # tied weights (embeddings = LM head) are stored once
                if v.data_ptr() not in seen:
                    seen.add(v.data_ptr())
                    unique[k] = v.detach().contiguous().cpu()
            save_file(unique, str(tmp / "model.safetensors"))
        torch.save(
            {"optimizer": loop.optimizer, "generator": loop.generator, "losses": loop.losses}, tmp / "loop.pt"
        )
        (tmp / "meta.json").write_text(
            json.dumps({"step": step, "recipe": self.recipe, "source": self.source})
        )
        commit(tmp, final)  # the shared tmp name (not per-pid) lets every rank write its DCP shards into it
        for old in self.list()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, ckpt: Path) -> tuple[dict[str, torch.Tensor] | None, LoopState]:
        from safetensors.torch import load_file

        meta = self.check(ckpt)
        loop = torch.load(ckpt / "loop.pt", map_location="cpu", weights_only=True)
        state = load_file(ckpt / "model.safetensors") if (ckpt / "model.safetensors").exists() else None
        return state, LoopState(meta["step"], loop["optimizer"], loop["generator"], loop["losses"])

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

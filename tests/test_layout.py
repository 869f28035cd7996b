"""The package keeps its shape: typer and rich only in cli/, command modules independent of each other,
every flexcli file name in io/layout.py, and a family descriptor that explains every tensor."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import flexcli

PKG = Path(flexcli.__file__).parent


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    mod = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    pkg = mod.rsplit(".", 1)[0] if path.name != "__init__.py" else mod
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


def _modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def test_typer_and_rich_only_in_cli():
    offenders = [str(p.relative_to(PKG)) for p in _modules() if p.parent.name != "cli"
                 and any(n.split(".")[0] in ("typer", "rich") for n in _imports(p))]  # fmt: skip
    assert offenders == []


def test_command_modules_do_not_import_each_other():
    commands = {p.stem for p in (PKG / "commands").glob("*.py") if p.stem != "__init__"}
    for p in (PKG / "commands").glob("*.py"):
        others = {f"flexcli.commands.{c}" for c in commands - {p.stem}}
        assert not (_imports(p) & others), (p.name, _imports(p) & others)


def test_flex_file_names_live_in_layout():
    pattern = re.compile(
        r"""["'](flex_[a-z_]+\.(json|safetensors)|flex-project\.json|modeling_flexcli\.py)["']"""
    )
    offenders = [f"{p.relative_to(PKG)}: {m.group(1)}" for p in _modules() if p.name != "layout.py"
                 for m in pattern.finditer(p.read_text())]  # fmt: skip
    assert offenders == []


def test_descriptors_explain_every_tensor_of_each_family():
    """expected_shapes from the descriptor == the state dict of transformers' own model, for every family
    and config flag that adds tensors (biases, tied head)."""
    import transformers

    from flexcli.arch import Dims, all_architectures

    cases = {"llama": [{}, {"attention_bias": True, "mlp_bias": True}, {"tie_word_embeddings": True}],
             "mistral": [{}], "qwen2": [{}, {"tie_word_embeddings": True}]}  # fmt: skip
    for arch in all_architectures():
        for flags in cases[arch.family]:
            cfg = getattr(transformers, arch.architectures[0].replace("ForCausalLM", "Config"))(
                vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, **flags)  # fmt: skip
            model = getattr(transformers, arch.architectures[0])(cfg)
            want = {k: list(v.shape) for k, v in model.state_dict().items()}
            if cfg.tie_word_embeddings:
                want.pop("lm_head.weight")  # saved once (save_pretrained drops the tied copy)
            config = cfg.to_dict()
            config["architectures"] = list(arch.architectures)
            assert arch.expected_shapes(config, Dims.from_config(config)) == want, (arch.family, flags)


RANK = {
    "arch": 1,
    "io": 2,
    "elastic": 3,
    "train": 4,
    "latency": 4,
    "runtimes": 4,  # a runtime times in latency's regimes; profiling opens a runtime's backend
    "router": 5,
    "plan": 6,
    "commands": 7,
    "cli": 8,
}


def _rank(module: str) -> int:
    """The room of flexcli.<room>.x; top-level modules (errors, progress, device, recipe, kernels) are 0."""
    parts = module.split(".")
    return RANK.get(parts[1], 0) if len(parts) > 1 and parts[0] == "flexcli" else 0


def test_rooms_import_only_rooms_below_them():
    """The layering of docs/architecture.md: arch < io < elastic < train, latency, runtimes < router < plan <
    commands < cli."""
    offenders = []
    for p in _modules():
        rel = p.relative_to(PKG)
        if (
            len(rel.parts) == 1
        ):  # flexcli/__init__ (registration hook) and the demo script sit outside the rooms
            continue
        own = RANK[rel.parts[0]]
        for name in _imports(p):
            if name.startswith("flexcli.") and _rank(name) > own:
                offenders.append(f"{rel} imports {name}")
    assert offenders == []

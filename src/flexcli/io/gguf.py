"""GGUF sources: a llama.cpp model file read tensor by tensor in the Hugging Face layout.

Nothing here parses GGUF. The `gguf` package's reader memory-maps the file and dequantizes one tensor
at a time; transformers' GGUF integration builds the config and the tokenizer from the metadata, and
its tensor processor undoes llama.cpp's rotary row order of Q and K. The tensor names come from the
`gguf` package's HF -> GGUF name map, applied to the family descriptor's tensor list, so a GGUF source
is checked against the same expected shapes as a Hugging Face directory before any heavy work.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arch.dims import Dims
from ..arch.family import Architecture, all_architectures
from ..errors import FlexError, RuntimeFailure, UsageError
from .safetensors import TORCH_TO_ST, TensorSpec

SUFFIX = ".gguf"
GGUF_ARCHS = ("llama", "qwen2")  # llama.cpp architectures flexcli converts (Mistral files say llama)
DTYPES = ("bfloat16", "float16", "float32")


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the only .gguf file of a directory that is not a
    Hugging Face directory (no config.json). None when `path` is not a GGUF source."""
    if path.is_file():
        return path if path.suffix.lower() == SUFFIX else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() == SUFFIX)
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise UsageError(f"{path}: holds {len(found)} GGUF files ({names}); pass the one to convert")
    return found[0] if found else None


@cache
def _dequantizable(qtype: int) -> bool:
    """Whether the `gguf` package can dequantize this tensor type (probed on one zero block)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    t = GGMLQuantizationType(qtype)
    if t in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return True
    try:
        quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[t][1]), np.uint8), t)
    except (NotImplementedError, KeyError, ValueError):
        return False
    return True


def _bad(path: Path, message: str) -> UsageError:
    return UsageError(f"{path}: {message}")


@dataclass
class GGUFSource:
    """A validated GGUF file of a supported family, seen as a uniform Hugging Face checkpoint."""

    path: Path  # the .gguf file
    config: dict[str, Any]  # config.json of the equivalent Hugging Face model
    arch: Architecture
    dims: Dims
    dtype: str  # dtype the dequantized tensors are stored in
    names: dict[str, str]  # Hugging Face name -> GGUF name, in the file's tensor order
    gguf_arch: str
    _reader: Any = field(repr=False, default=None)
    _tokenizer: Any = field(repr=False, default=None)

    @classmethod
    def open(cls, path: str | Path, dtype: str = "bfloat16") -> GGUFSource:
        """Read the metadata and tensor table and check them against the family descriptor: names,
        shapes, and tensor types the `gguf` package can dequantize. Bad input is a one-line UsageError."""
        p = Path(path)
        if dtype not in DTYPES:
            raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", option="dtype")
        try:
            from gguf import GGUFReader
        except ImportError:
            raise UsageError("reading GGUF files needs the gguf package: pip install gguf") from None
        try:
            reader = GGUFReader(p)
        except (ValueError, OSError, struct.error, IndexError, KeyError, UnicodeDecodeError) as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise _bad(p, f"not a readable GGUF file ({reason})") from None
        field_ = reader.fields.get("general.architecture")
        gguf_arch = str(field_.contents()) if field_ is not None else "(none)"
        if gguf_arch not in GGUF_ARCHS:
            raise _bad(
                p,
                f"GGUF architecture {gguf_arch!r} is not supported; flexcli converts {', '.join(GGUF_ARCHS)}",
            )
        arch, config = _hf_config(p, dtype)
        try:
            dims = Dims.from_config(config)
        except FlexError as e:
            raise _bad(p, str(e).replace("config.json", "metadata")) from None
        names = _tensor_names(p, reader, gguf_arch, arch, config, dims)
        return cls(p, config, arch, dims, dtype, names, gguf_arch, reader)

    # -- the source interface (see io.source.Source) ------------------------------------------------

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (Hugging Face name, tensor) one at a time: dequantized, Q/K rows in the HF order."""
        from gguf import dequantize
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        processor = TENSOR_PROCESSORS.get(self.gguf_arch, TensorProcessor)(config=self.config)
        by_name = {t.name: t for t in self._reader.tensors}
        dtype = getattr(torch, self.dtype)
        for hf_name, gguf_name in self.names.items():
            t = by_name[gguf_name]
            try:
                w = dequantize(t.data, t.tensor_type)  # (rows, cols): numpy order, ggml's reversed
            except (ValueError, NotImplementedError) as e:
                raise RuntimeFailure(f"{self.path}: cannot dequantize {gguf_name}: {e}") from None
            w = processor.process(weights=w, name=gguf_name).weights
            yield hf_name, torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)

    def tensor_specs(self) -> list[TensorSpec]:
        st = TORCH_TO_ST[getattr(torch, self.dtype)]
        shapes = self.arch.expected_shapes(self.config, self.dims)
        return [(n, st, shapes[n]) for n in self.names]

    def file_hashes(self) -> dict[str, str]:
        from .source import sha256_file

        return {self.path.name: sha256_file(self.path)}

    def tokenizer(self):
        """The tokenizer transformers builds from the GGUF metadata (a stock fast tokenizer)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    self.path.parent, gguf_file=self.path.name, local_files_only=True, trust_remote_code=False
                )
            except (OSError, ValueError, KeyError, NotImplementedError) as e:
                raise _bad(self.path, f"cannot build its tokenizer: {str(e).splitlines()[0]}") from None
        return self._tokenizer

    def load_model(self, device: torch.device, dtype: str):
        """The family's transformers class, filled tensor by tensor (no random initialisation)."""
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        cfg = AutoConfig.for_model(**self.config)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
        with torch.no_grad():
            for name, t in self.iter_tensors():
                model.get_parameter(name).copy_(t)
        model.tie_weights()
        return model.to(device)

    def write_metadata(self, dst: Path) -> None:
        """config.json, generation_config.json and the tokenizer files of the equivalent HF directory;
        and the file's own tokenizer block, which a GGUF export embeds verbatim (transformers' rebuilt
        tokenizer is close, not always exact: SmolLM2's digit splitting is lost, for one)."""
        from transformers import AutoConfig, GenerationConfig

        from .gguf_export import save_tokenizer_block

        cfg = AutoConfig.for_model(**self.config)
        cfg.save_pretrained(dst)
        GenerationConfig.from_model_config(cfg).save_pretrained(dst)
        self.tokenizer().save_pretrained(dst)
        save_tokenizer_block(self._reader, dst)


def _hf_config(path: Path, dtype: str) -> tuple[Architecture, dict[str, Any]]:
    """The family and config.json of the equivalent Hugging Face model, from transformers' GGUF metadata
    mapping (which also tells a Mistral file, architecture `llama`, by its name)."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        parsed.pop("_model_name_or_path", None)
        model_type = parsed.pop("model_type")
        cfg = AutoConfig.for_model(model_type, **parsed)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise _bad(path, f"unusable GGUF metadata ({str(e).splitlines()[0]})") from None
    arch = next((a for a in all_architectures() if a.family == model_type), None)
    if arch is None:
        raise _bad(path, f"model type {model_type!r} has no flexcli family")
    cfg.architectures = [arch.architectures[0]]
    cfg.dtype = dtype
    return arch, cfg.to_dict()


def _tensor_names(
    path: Path, reader: Any, gguf_arch: str, arch: Architecture, config: dict[str, Any], dims: Dims
) -> dict[str, str]:
    """Hugging Face name -> GGUF name for every tensor the descriptor expects, in file order, after
    checking each one's presence, shape and type."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == gguf_arch)
    name_map = get_tensor_name_map(arch_id, dims.num_layers)
    want = arch.expected_shapes(config, dims)
    to_hf = {}
    for hf_name in want:
        stem, _, suffix = hf_name.rpartition(".")
        gguf_stem = name_map.get_name(stem)
        if gguf_stem is None:
            raise _bad(path, f"no GGUF name for {hf_name} in the gguf package's {gguf_arch} map")
        to_hf[f"{gguf_stem}.{suffix}"] = hf_name
    names = {}
    for t in reader.tensors:
        hf_name = to_hf.get(t.name)
        if hf_name is None:
            continue  # e.g. rope_freqs: derived from the config, not a weight
        shape = [int(x) for x in reversed(t.shape.tolist())]  # ggml lists the fastest dimension first
        if shape != want[hf_name]:
            raise _bad(path, f"tensor {t.name} has shape {shape}, the metadata implies {want[hf_name]}")
        if not _dequantizable(int(t.tensor_type)):
            raise _bad(
                path,
                f"tensor {t.name} has type {t.tensor_type.name}, which the gguf package cannot dequantize",
            )
        names[hf_name] = t.name
    missing = [g for g, h in to_hf.items() if h not in names]
    if missing:
        raise _bad(path, f"missing tensor {missing[0]} ({len(missing)} missing in all)")
    return names

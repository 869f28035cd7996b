"""llama.cpp as a runtime, through its Python bindings (llama-cpp-python, an optional dependency).

Everything flexcli runs in llama.cpp goes through here: logits of given token ids (to verify an exported
GGUF against the sub-model it came from) and timed calls in a latency regime (to build and check latency
tables in the runtime a user serves with). A call is one `llama_decode`: prefill is SEQ tokens from an
empty cache; decode is one token after KV_LEN cached tokens, with the cache cut back after every step so
it never grows (as latency.timing does for PyTorch).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RuntimeFailure, UsageError

INSTALL_HINT = "make install-llamacpp (or pip install 'flexcli[llamacpp]')"


def missing() -> str | None:
    """Why llama.cpp cannot be used here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return f"llama-cpp-python is not installed; {INSTALL_HINT}"
    except OSError as e:  # the shared library failed to load
        return f"llama-cpp-python is installed but its library does not load ({e})"
    return None


def require() -> None:
    if (why := missing()) is not None:
        raise UsageError(why)


def version() -> str:
    import llama_cpp

    return f"llama.cpp via llama-cpp-python {llama_cpp.__version__}"


def default_threads() -> int:
    """llama.cpp's own default: the physical cores, approximated by the CPUs this process may use."""
    return max(1, len(os.sched_getaffinity(0)))


class Model:
    """One GGUF loaded in llama.cpp with a context of `n_ctx` tokens. `logits` (verification) keeps every
    position's logits, the KV cache in f32 rather than llama.cpp's default f16 and attention off the
    flash path (which rounds through f16), so a comparison measures the file, not the runtime's precision
    choices; timing runs as a server does (f16 cache, flash attention)."""

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None, logits: bool = False):
        require()
        from llama_cpp import GGML_TYPE_F32, Llama

        n = threads or default_threads()
        try:
            with _quiet():
                self.llm = Llama(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_batch=n_ctx,
                    n_ubatch=n_ctx,
                    n_threads=n,
                    n_threads_batch=n,
                    logits_all=logits,
                    # timing: flash attention, as llama-server's default (auto) runs the CPU backend;
                    # verification: the plain attention path, which computes in f32
                    flash_attn=not logits,
                    verbose=False,
                    **({"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if logits else {}),
                )
        except (ValueError, RuntimeError) as e:
            raise RuntimeFailure(f"llama.cpp cannot load {path}: {e}") from None
        self.threads = n

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) float32 logits of one sequence, from an empty cache."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def step_fn(self, phase: str, ids: list[int], ctx: list[int]) -> Callable[[], Any]:
        """The timed call: prefill `ids` from an empty cache, or decode `ids` after the cached `ctx`."""
        llm = self.llm
        if phase == "prefill":

            def prefill():
                llm.n_tokens = 0  # eval() drops cache positions from n_tokens on
                llm.eval(ids)

            return prefill
        llm.reset()
        llm.eval(ctx)
        kv = len(ctx)

        def decode():
            llm.n_tokens = kv
            llm.eval(ids)

        return decode

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def _quiet():
    """llama.cpp logs the whole model on load to fd 2; keep it out of the user's stderr unless it fails."""
    import contextlib
    import io
    import tempfile

    saved = os.dup(2)
    with tempfile.TemporaryFile() as log, contextlib.redirect_stderr(io.StringIO()):
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            tail = log.read()[-2000:].decode(errors="replace")
            if tail:
                os.write(2, tail.encode())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)

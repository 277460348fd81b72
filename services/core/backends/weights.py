"""How the local engine holds a model's weights: GGUF files re-encoded for batched decoding.

On x86 CPUs, llama.cpp multiplies Q4_1 and Q5_1 weights one vector dot product per weight
row per sequence: decoding 8 sequences together costs about 6x one sequence, so batching
across jobs buys little (measured on SmolLM2-135M Q4_1: 1.6x the tokens/s at 8 sequences,
2 threads). Q8_0 weights go through batched matrix kernels instead (2.2 to 2.4x at 8, 3x
and more at 16) and are no slower for a single sequence. Re-encoding Q4_1 as Q8_0 is
close to lossless: every Q4_1 value lands within ~1/16 of a Q4_1 step of its Q8_0 code
(SmolLM2-135M: 0.006 nats of KL per token against the packaged file, the same order as
the 0.004 of a full f32 decode). Greedy outputs stay independent of batching.

`prepare_weights` makes that copy once per model file and caches it on disk; processes
that race write their own temporary file and rename it into place.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
from pathlib import Path
from typing import Literal

import llama_cpp

logger = logging.getLogger(__name__)

WeightsMode = Literal["auto", "q8_0", "as-is"]

# llama_ftype values whose CPU matmuls do not batch: their activations are q8_1, which
# neither llamafile's tinyBLAS nor ggml's repacked kernels take.
_SLOW_WHEN_BATCHED = {llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1, llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1}
# Already batch-friendly and at least as precise as Q8_0: never re-encoded.
_KEEP = {
    llama_cpp.LLAMA_FTYPE_ALL_F32,
    llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
    llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tandem" / "models"


def prepare_weights(path: Path, mode: WeightsMode, cache_dir: Path | None = None) -> Path:
    """The GGUF file the local engine should load for `path`.

    `auto`: a Q8_0 copy of Q4_1 and Q5_1 files, anything else as it is; `q8_0`: a Q8_0
    copy of anything not already Q8_0 or 16/32-bit; `as-is`: `path` itself. When the copy
    cannot be made (a read-only cache, a full disk), the file is used as it is, with a
    warning: slower batches, same service."""
    if mode == "as-is":
        return path
    file_type = gguf_file_type(path)
    if file_type is None or file_type in _KEEP:
        return path
    if mode == "auto" and file_type not in _SLOW_WHEN_BATCHED:
        return path
    target = _cache_path(path, cache_dir or default_cache_dir())
    if target.is_file():
        return target
    try:
        _requantize(path, target)
    except OSError as exc:
        logger.warning("using %s as it is: could not write its Q8_0 copy (%s)", path, exc)
        return path
    logger.info("re-encoded %s as Q8_0 for batched decoding: %s", path.name, target)
    return target


def gguf_file_type(path: Path) -> int | None:
    """The llama_ftype recorded in a GGUF file (`general.file_type`), None if unreadable."""
    from services.core.backends.local import _install_log_sink

    _install_log_sink()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        return None  # the loader proper reports what is wrong with the file
    try:
        buf = ctypes.create_string_buffer(32)
        n = llama_cpp.llama_model_meta_val_str(model, b"general.file_type", buf, len(buf))
        return int(buf.value) if n > 0 and buf.value.isdigit() else None
    finally:
        llama_cpp.llama_model_free(model)


def _cache_path(path: Path, cache_dir: Path) -> Path:
    stat = path.resolve().stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{llama_cpp.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / f"{path.stem}.{digest}.q8_0.gguf"


def _requantize(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = min(os.cpu_count() or 1, 4)
    try:
        rc = llama_cpp.llama_model_quantize(
            str(source).encode(), str(partial).encode(), ctypes.byref(params)
        )
        if rc != 0 or not partial.is_file():
            raise OSError(f"llama_model_quantize returned {rc}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)

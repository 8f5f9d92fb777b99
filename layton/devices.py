"""Device and dtype choice for model-holding actors."""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(preference: str = "auto") -> torch.device:
    """`auto` uses CUDA when this process can see a GPU (Ray sets CUDA_VISIBLE_DEVICES per actor)."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but this process sees no GPU")
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The configured dtype; half precision on CPU is slow and poorly supported, so CPU runs float32."""
    return _DTYPES[name] if device.type == "cuda" else torch.float32


_MALLOC_KEEP = 1 << 30  # bytes: blocks up to 1 GiB come from (and go back to) the heap
_MALLOC_SET: bool | None = None  # keep_freed_cpu_memory: not tried yet


def keep_freed_cpu_memory() -> bool:
    """Let glibc's malloc reuse large freed blocks instead of unmapping them (CPU decoding).

    By default a block over glibc's mmap threshold (at most 32 MB) is an mmap of its own: freed, it
    goes back to the OS, and the next activation of that size is page-faulted in and zeroed again.
    A VAE decode allocates such activations layer after layer: the tiny zoo's VAE takes 385k page
    faults per 1024² image (38% of its CPU time) and 9k per 256² batch of 2 (20%). With the mmap and
    trim thresholds at 1 GiB the heap keeps and reuses them (the process keeps its peak heap rather
    than returning it). Process-wide, once; a no-op where the C library is not glibc. Returns
    whether the thresholds are set."""
    global _MALLOC_SET
    if _MALLOC_SET is None:
        import ctypes
        import platform

        _MALLOC_SET = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
                m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
                _MALLOC_SET = bool(libc.mallopt(m_mmap_threshold, _MALLOC_KEEP)) and bool(libc.mallopt(m_trim_threshold, _MALLOC_KEEP))
            except (OSError, AttributeError):
                pass
    return _MALLOC_SET

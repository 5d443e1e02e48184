"""The `attention` axis: the attention backends diffusers dispatches to (`set_attention_backend`), what each
needs of the machine and its libraries (checked before any cell starts), and which backend a denoiser runs."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from typing import Any

from packaging.version import Version

from bench.environment import Machine
from bench.errors import MethodUnavailable
from bench.methods.base import needs_cuda

NATIVE = "native"  # torch's scaled_dot_product_attention, choosing its kernel itself: what a pipeline runs by default


@dataclass(frozen=True)
class Requirement:
    """A package a backend needs, at a minimum version (diffusers' own requirement; None: any version)."""

    distribution: str
    minimum: str | None
    note: str = ""

    def problem(self) -> str | None:
        """Why the installed package does not do; None when it does."""
        try:
            installed = importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is not None and (self.minimum is None or Version(installed) >= Version(self.minimum)):
            return None
        have = f"{installed} is installed" if installed else "it is not installed"
        wanted = self.distribution + (f">={self.minimum}" if self.minimum else "")
        return f"needs `{wanted}` ({have}){self.note}"


@dataclass(frozen=True)
class Backend:
    """What one attention backend needs: a package, a CUDA GPU (of a compute capability), bf16/fp16 inputs,
    kernels downloaded from the Hugging Face Hub."""

    package: Requirement | None = None
    cuda: bool = False
    min_capability: tuple[int, int] | None = None
    half_precision: bool = False
    hub: bool = False


FLASH_ATTN = Requirement("flash-attn", "2.6.3")
FLASH_ATTN_3 = Requirement("flash-attn-3", None, "; FlashAttention 3 is built from source")
SAGE = Requirement(
    "sageattention", "2.1.1", "; the package index has only 1.0.6: SageAttention 2 is built from source with CUDA"
)
KERNELS = Requirement("kernels", "0.12", "; it downloads the kernel from the Hugging Face Hub")
XFORMERS = Requirement("xformers", "0.0.29")

# Every name of diffusers' AttentionBackendName (diffusers/models/attention_dispatch.py, 0.42), with the
# constraints diffusers registers it with (tests/test_attention.py checks the names against diffusers').
BACKENDS: dict[str, Backend] = {
    "flash": Backend(FLASH_ATTN, cuda=True, half_precision=True),
    "flash_hub": Backend(KERNELS, cuda=True, half_precision=True, hub=True),
    "flash_varlen": Backend(FLASH_ATTN, cuda=True, half_precision=True),
    "flash_varlen_hub": Backend(KERNELS, cuda=True, half_precision=True, hub=True),
    "flash_4_hub": Backend(Requirement("kernels", "0.12.3", KERNELS.note), cuda=True, half_precision=True, hub=True),
    "_flash_3": Backend(FLASH_ATTN_3, cuda=True, min_capability=(9, 0), half_precision=True),
    "_flash_varlen_3": Backend(FLASH_ATTN_3, cuda=True, min_capability=(9, 0), half_precision=True),
    "_flash_3_hub": Backend(KERNELS, cuda=True, min_capability=(9, 0), half_precision=True, hub=True),
    "_flash_3_varlen_hub": Backend(KERNELS, cuda=True, min_capability=(9, 0), half_precision=True, hub=True),
    "aiter_fa2_hub": Backend(KERNELS, cuda=True, half_precision=True, hub=True),
    "flex": Backend(),  # runs uncompiled too (PyTorch's slow reference path); compiled it is a fused kernel
    NATIVE: Backend(),
    "_native_cudnn": Backend(cuda=True, min_capability=(8, 0), half_precision=True),
    "_native_efficient": Backend(cuda=True),
    "_native_flash": Backend(half_precision=True),  # torch has a CPU flash kernel too
    "_native_math": Backend(),
    "_native_npu": Backend(Requirement("torch-npu", None)),
    "_native_xla": Backend(Requirement("torch-xla", "2.2")),
    "sage": Backend(SAGE, cuda=True, half_precision=True),
    "sage_hub": Backend(KERNELS, cuda=True, half_precision=True, hub=True),
    "sage_blackwell_hub": Backend(KERNELS, cuda=True, min_capability=(10, 0), half_precision=True, hub=True),
    "sage_varlen": Backend(SAGE, cuda=True, half_precision=True),
    "_sage_qk_int8_pv_fp8_cuda": Backend(SAGE, cuda=True, min_capability=(9, 0)),
    "_sage_qk_int8_pv_fp8_cuda_sm90": Backend(SAGE, cuda=True, min_capability=(9, 0)),
    "_sage_qk_int8_pv_fp16_cuda": Backend(SAGE, cuda=True, min_capability=(8, 0)),
    "_sage_qk_int8_pv_fp16_triton": Backend(SAGE, cuda=True, min_capability=(8, 0)),
    "xformers": Backend(XFORMERS),
}
ATTENTION_BACKENDS = tuple(BACKENDS)


def check_attention(name: str, dtype: str, machine: Machine) -> None:
    """Raise MethodUnavailable (`unsupported`: the libraries or the cell's dtype cannot; `skipped`: this machine
    cannot) unless the attention backend `name` can run a cell of `dtype` here."""
    backend = BACKENDS[name]
    what = f"attention = {name!r}"
    if backend.package is not None and (problem := backend.package.problem()):
        raise MethodUnavailable("unsupported", f"{what} {problem}")
    # Cells run with HF_HUB_OFFLINE=1 unless the user's environment sets it (bench.launch.cell_environment).
    if backend.hub and os.environ.get("HF_HUB_OFFLINE", "1").lower() in ("1", "true", "yes", "on"):
        raise MethodUnavailable(
            "unsupported",
            f"{what} downloads its kernel from the Hub, and cells run offline (HF_HUB_OFFLINE=1; set"
            " HF_HUB_OFFLINE=0 where the Hub is reachable)",
        )
    if backend.half_precision and dtype not in ("bf16", "fp16"):
        raise MethodUnavailable("unsupported", f"{what} takes bf16 or fp16 inputs; the cell's dtype is {dtype}")
    if backend.cuda or backend.min_capability:
        needs_cuda(machine, what, backend.min_capability)


def set_attention(model: Any, name: str) -> str:
    """Dispatch the denoiser's attention to backend `name` (`native` leaves it as loaded); return the backends
    its attention modules run, comma-separated: what `attention_backend` records."""
    if name != NATIVE:
        model.set_attention_backend(name)
    return attention_backends(model)


def attention_backends(model: Any) -> str:
    """The backends `model`'s attention modules dispatch to: each processor's own, or diffusers' active one
    where it has none; `native` for a processor that calls torch's attention itself."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from diffusers.models.attention_processor import Attention

    active = _AttentionBackendRegistry.get_active_backend()[0]
    names = set()
    for module in model.modules():
        if isinstance(module, Attention | AttentionModuleMixin) and module.processor is not None:
            chosen = getattr(module.processor, "_attention_backend", NATIVE) or active
            names.add(str(getattr(chosen, "value", chosen)))
    return ",".join(sorted(names)) or NATIVE

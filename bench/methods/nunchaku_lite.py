"""Nunchaku Lite (SVDQuant W4A4 and AWQ W4A16) checkpoints through diffusers' `NunchakuLiteQuantizationConfig`.

diffusers only loads these pre-quantized (made with diffuse-compressor): `file` is the quantized transformer's
folder (its `config.json` holds the compact `quantization_config`), or a pipeline folder with a `transformer/`
subfolder. At load, diffusers fetches the kernels (`rootonchair/nunchaku-lite-kernels`) from the Hub with the
`kernels` package, which runs that code only with `DIFFUSERS_TRUST_REMOTE_KERNELS=true`. diffusers refuses Hopper
GPUs, NVFP4 checkpoints below Blackwell and INT4 ones below Turing; the capability rules say so before any load.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, ClassVar

from bench.methods.base import Component, Method, MethodOptions, MethodUnavailable, needs_cuda

KERNEL_REPO = "rootonchair/nunchaku-lite-kernels"
TRUST_ENV = "DIFFUSERS_TRUST_REMOTE_KERNELS"
MIN_CAPABILITY = {"nvfp4": (10, 0), "int4": (7, 5)}  # diffusers' NunchakuLiteQuantizer.validate_environment


class NunchakuLiteOptions(MethodOptions):
    file: str | None = None  # a Nunchaku Lite transformer folder (or a pipeline folder holding one)


class NunchakuLite(Method):
    name: ClassVar[str] = "nunchaku_lite"
    family: ClassVar[str] = "nunchaku"
    Options: ClassVar[type[MethodOptions]] = NunchakuLiteOptions
    only_components: ClassVar[tuple[str, ...] | None] = ("transformer",)
    options: NunchakuLiteOptions

    def check(self, cell, machine) -> None:
        needs_cuda(machine, "nunchaku_lite")
        if machine.cuda_capability and machine.cuda_capability[0] == 9:
            raise MethodUnavailable("skipped", "diffusers does not load Nunchaku Lite checkpoints on Hopper GPUs")
        if self.options.file is None:
            raise MethodUnavailable(
                "unsupported",
                "nunchaku_lite needs a pre-quantized checkpoint (`file`): diffusers cannot quantize to it, and "
                f"its kernels come from the Hub ({KERNEL_REPO}), which this machine cannot reach",
            )
        for precision in checkpoint_precisions(self.checkpoint_folder()) & MIN_CAPABILITY.keys():
            needs_cuda(machine, f"nunchaku_lite {precision}", min_capability=MIN_CAPABILITY[precision])
        if importlib.util.find_spec("kernels") is None:
            raise MethodUnavailable(
                "unsupported", f"nunchaku_lite needs the `kernels` package, which fetches {KERNEL_REPO} from the Hub"
            )
        if os.environ.get(TRUST_ENV, "").lower() not in ("1", "true", "yes"):
            raise MethodUnavailable(
                "unsupported", f"nunchaku_lite runs remote kernel code ({KERNEL_REPO}) only with {TRUST_ENV}=true"
            )

    def checkpoint_folder(self) -> Path:
        """The folder whose `config.json` carries the checkpoint's `quantization_config`."""
        folder = Path(self.options.file)
        return folder / "transformer" if (folder / "transformer" / "config.json").is_file() else folder

    def load_component(self, component: Component, cell) -> Any:
        # the checkpoint's config.json carries the quantization config, as diffusers' guide loads it
        return component.model_class().from_pretrained(self.checkpoint_folder(), dtype=cell.torch_dtype)


def checkpoint_precisions(folder: Path) -> set[str]:
    """The precisions (`int4`, `nvfp4`) a Nunchaku Lite checkpoint's compact config names; empty if unreadable."""
    try:
        config = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return set()
    sections = (config.get(op) for op in ("svdq_w4a4", "awq_w4a16"))
    return {section["precision"] for section in sections if isinstance(section, dict) and section.get("precision")}

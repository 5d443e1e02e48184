"""Intel AutoRound: quantbench quantizes the pipeline's transformer offline with the `auto-round` library, saves
the checkpoint once (cached by everything that produced it), and times loading it through diffusers'
`AutoRoundQuantizer` (which only loads pre-quantized checkpoints).

`iters = 0` rounds to nearest into AutoRound's packed format; `iters > 0` tunes the rounding (signed gradient
descent) on activations the pipeline produces for `calibration_prompts`, written to a local caption file, so nothing
is downloaded. Both take AutoRound's regular flow: its model-free route (auto-round 0.16.1) also quantizes
`proj_out` and `norm_out.linear`, which its checkpoint config leaves out of `block_name_to_quantize`, so diffusers'
load leaves them meta. AutoRound reads and writes the weights as `model.safetensors`: it reads them through a
linked view of the pipeline folder, and the checkpoint is renamed to diffusers' `diffusion_pytorch_model.safetensors`.
Each row's `method_notes` count the quantized linear classes, which name the kernel backend AutoRound chose.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal

from bench.cache import build_once, cache_dir, content_digest
from bench.methods.base import Component, Method, MethodOptions, MethodUnavailable, method_notes

WRITER_VERSION = "3"  # bump when the produced checkpoints change
DEFAULT_CALIBRATION = (
    "a red apple on a wooden table",
    "a street sign that says OPEN",
    "a photograph of a mountain lake at sunrise",
    "a portrait of an old fisherman, studio lighting",
)


class AutoRoundOptions(MethodOptions):
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = 128  # -1: per output channel
    sym: bool = True
    iters: int = 0  # 0: round-to-nearest (model-free); > 0: AutoRound's tuning on calibration activations
    calibration_prompts: list[str] = list(DEFAULT_CALIBRATION)


class AutoRound(Method):
    name: ClassVar[str] = "auto_round"
    family: ClassVar[str] = "auto_round"
    Options: ClassVar[type[MethodOptions]] = AutoRoundOptions
    only_components: ClassVar[tuple[str, ...] | None] = ("transformer",)
    options: AutoRoundOptions

    def check(self, cell, machine) -> None:
        for package, module in (("auto-round", "auto_round"), ("datasets", "datasets")):
            if importlib.util.find_spec(module) is None:
                raise MethodUnavailable("unsupported", f"auto_round needs the `{package}` package")

    def prepare_component(self, component: Component, cell) -> Component:
        import auto_round

        sources = sorted((component.folder / component.name).glob("*.safetensors"))
        options = self.options.model_dump()
        key = hashlib.sha256(
            json.dumps(
                [WRITER_VERSION, auto_round.__version__, options, [content_digest(path) for path in sources]],
                sort_keys=True,
            ).encode()
        ).hexdigest()[:16]
        target = cache_dir("auto_round") / f"{component.name}-w{self.options.bits}-{key}"
        saved = build_once(
            target,
            lambda folder: self.write_checkpoint(component, folder),
            lambda: estimated_checkpoint_bytes(component, self.options.bits),
        )
        return dataclasses.replace(component, folder=saved)

    def write_checkpoint(self, component: Component, folder: Path) -> None:
        """Quantize `component` with AutoRound into `folder/<component name>/`, under diffusers' weight names."""
        import torch
        from auto_round import AutoRound as Quantizer

        staging = pipeline_view(component, folder / "pipeline")
        captions = folder / "captions.tsv"
        rows = [f"{index}\t{' '.join(prompt.split())}" for index, prompt in enumerate(self.options.calibration_prompts)]
        captions.write_text("\n".join(["id\tcaption", *rows]) + "\n")
        output = folder / "quantized"
        Quantizer(
            str(staging),
            scheme=f"W{self.options.bits}A16",
            bits=self.options.bits,
            group_size=self.options.group_size,
            sym=self.options.sym,
            iters=self.options.iters,
            nsamples=len(self.options.calibration_prompts),
            dataset=str(captions),
            device_map="cuda" if torch.cuda.is_available() else "cpu",
            disable_opt_rtn=True,
            disable_model_free=True,
            enable_torch_compile=False,
        ).quantize_and_save(str(output), format="auto_round")
        produced = output / component.name
        for name in ("model.safetensors", "model.safetensors.index.json"):
            if (produced / name).exists():
                (produced / name).rename(produced / name.replace("model", "diffusion_pytorch_model", 1))
        produced.rename(folder / component.name)
        for leftover in (output, staging):  # the other components, copied unchanged; the view's links
            shutil.rmtree(leftover)  # rmtree unlinks links, never what they point to
        captions.unlink()

    def load_component(self, component: Component, cell) -> Any:
        return component.load(cell)  # the checkpoint's config.json carries its AutoRound quantization config

    def after_load(self, pipe: Any, cell) -> dict[str, Any]:
        from collections import Counter

        linears = Counter(type(module).__name__ for module in pipe.transformer.modules() if hasattr(module, "qweight"))
        return method_notes(
            auto_round_linears=dict(sorted(linears.items())),
            iters=self.options.iters,
            auto_round_version=importlib.metadata.version("auto-round"),
        )


def pipeline_view(component: Component, view: Path) -> Path:
    """The pipeline folder as links, with the component's weights also under the names AutoRound reads.

    AutoRound's regular flow loads the whole pipeline (its calibration runs it, iters = 0 included) and then
    rereads each block's weights from `<component>/model.safetensors` (or its index), where diffusers names them
    `diffusion_pytorch_model.safetensors`.
    """
    view.mkdir()
    for entry in component.folder.iterdir():
        if entry.name != component.name:
            (view / entry.name).symlink_to(entry.resolve())
    weights = view / component.name
    weights.mkdir()
    for entry in (component.folder / component.name).iterdir():
        (weights / entry.name).symlink_to(entry.resolve())
        if entry.name.startswith("diffusion_pytorch_model.safetensors"):
            (weights / entry.name.replace("diffusion_pytorch_model", "model", 1)).symlink_to(entry.resolve())
    return view


def estimated_checkpoint_bytes(component: Component, bits: int) -> int:
    """The disk AutoRound's save needs: the pipeline's other components copied as they are (removed after), and
    the component's bf16 weights at `bits` a weight, +10 % for scales and the layers it keeps whole."""
    weights = {path: path.stat().st_size for path in component.folder.glob("*/*.safetensors")}  # components only
    own = sum(size for path, size in weights.items() if path.parent.name == component.name)
    return sum(weights.values()) - own + int(own * bits / 16 * 1.1)

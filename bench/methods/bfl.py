"""Black Forest Labs' `fp8r` and `nvfp4` checkpoints through `from_single_file` + `BFLQuantizationConfig`.

The checkpoint is the user's (`file`) or written by quantbench from the pipeline's own transformer with
diffusers' own quantizers of the scheme (`diffusers.quantizers.bfl.utils.quantize_fp8r` / `quantize_nvfp4`),
under diffusers' key names (loaded without key conversion), as safetensors cached by everything that produced
it. `fp8r`: every linear weight in float8_e4m3fn with fp32 per-row scales. `nvfp4`: every linear weight whose
input width is a multiple of 16 as packed E2M1 with E4M3 block scales and an fp32 global scale; its activation
scale (`input_scale`) is not calibrated (1.0), and only the fused Blackwell path reads it.

Which path ran is observed, not assumed: after loading, each quantized linear runs one row through its own
`forward` while torch's function calls are recorded; a forward that calls `F.linear` dequantized its weight, one
that does not ran the fused kernel (`torch._scaled_mm` for fp8r, FlashInfer's `mm_fp4` for nvfp4). The counts
go to the row's `method_notes`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from bench.cache import build_once, cache_dir, content_digest
from bench.methods.base import Component, Method, MethodOptions, method_notes

WRITER_VERSION = "1"  # bump when the written checkpoints change
NVFP4_BLOCK = 16  # E2M1 values per E4M3 block scale
BYTES_PER_WEIGHT = {"fp8r": 1.0, "nvfp4": 0.5 + 1 / NVFP4_BLOCK}


class BflOptions(MethodOptions):
    quant_type: Literal["fp8r", "nvfp4"] | None = None
    file: str | None = None  # your own BFL checkpoint (.safetensors) instead of one quantbench writes

    @model_validator(mode="after")
    def _file_or_type(self) -> BflOptions:
        if (self.file is None) == (self.quant_type is None):
            raise ValueError("give exactly one of quant_type (quantbench writes the checkpoint) or file (yours)")
        return self


class Bfl(Method):
    name: ClassVar[str] = "bfl"
    family: ClassVar[str] = "bfl"
    Options: ClassVar[type[MethodOptions]] = BflOptions
    only_components: ClassVar[tuple[str, ...] | None] = ("transformer",)
    options: BflOptions

    def prepare_component(self, component: Component, cell) -> Component:
        if self.options.file:
            return Component(**{**component.__dict__, "single_file": Path(self.options.file)})
        import diffusers

        quant_type = self.options.quant_type
        sources = sorted((component.folder / component.name).glob("*.safetensors"))
        key = hashlib.sha256(
            json.dumps(
                [WRITER_VERSION, quant_type, diffusers.__version__, [content_digest(path) for path in sources]]
            ).encode()
        ).hexdigest()[:16]
        target = cache_dir("bfl") / f"{component.name}-{quant_type}-{key}"
        build_once(
            target,
            lambda folder: write_bfl_checkpoint(component, folder / "model.safetensors", quant_type),
            lambda: int(sum(path.stat().st_size for path in sources) / 2 * BYTES_PER_WEIGHT[quant_type] * 1.1),
        )
        return Component(**{**component.__dict__, "single_file": target / "model.safetensors"})

    def load_component(self, component: Component, cell) -> Any:
        from diffusers import BFLQuantizationConfig

        return component.model_class().from_single_file(
            str(component.single_file),
            config=str(component.folder),
            subfolder=component.name,
            quantization_config=BFLQuantizationConfig(compute_dtype=cell.torch_dtype),
            dtype=cell.torch_dtype,
        )

    def after_load(self, pipe: Any, cell) -> dict[str, Any]:
        return method_notes(bfl_paths=observed_paths(pipe.transformer))


def linear_weight_names(component: Component) -> set[str]:
    """The state-dict keys of the component's `nn.Linear` weights (the model built on the meta device)."""
    import torch
    from accelerate import init_empty_weights

    model_class = component.model_class()
    with init_empty_weights():
        model = model_class.from_config(model_class.load_config(component.folder, subfolder=component.name))
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def write_bfl_checkpoint(component: Component, target: Path, quant_type: str) -> None:
    """Write the component's safetensors weights as one `quant_type` BFL checkpoint at `target`."""
    import torch
    from diffusers.quantizers.bfl.utils import quantize_fp8r, quantize_nvfp4
    from safetensors import safe_open
    from safetensors.torch import save_file

    linears = linear_weight_names(component)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # FLUX.1-dev's 12 B weights quantize in seconds there
    tensors: dict[str, torch.Tensor] = {}
    for source in sorted((component.folder / component.name).glob("*.safetensors")):
        with safe_open(str(source), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor = handle.get_tensor(name)
                prefix = name.removesuffix(".weight")
                if name not in linears or (quant_type == "nvfp4" and tensor.shape[1] % NVFP4_BLOCK):
                    tensors[name] = tensor
                elif quant_type == "fp8r":
                    weight, row_scales = quantize_fp8r(tensor.to(device))
                    tensors[name], tensors[f"{prefix}.weight_scale"] = weight.cpu(), row_scales.cpu()
                else:
                    weight, block_scales, global_scale = quantize_nvfp4(tensor.to(device))
                    tensors[name], tensors[f"{prefix}.weight_scale"] = weight.cpu(), block_scales.cpu()
                    tensors[f"{prefix}.weight_scale_2"] = global_scale.reshape(()).cpu()
                    tensors[f"{prefix}.input_scale"] = torch.ones((), dtype=torch.float32)
    metadata = {"quantbench.quant_type": quant_type, "quantbench.input_scale": "uncalibrated (1.0)"}
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(target), metadata=metadata)


def observed_paths(model: Any) -> dict[str, int]:
    """How many BFL linears of `model` ran fused and how many dequantized, by running each on one row of zeros."""
    import torch
    from diffusers.quantizers.bfl.utils import BFLFP8RLinear, BFLNVFP4Linear

    class Calls(torch.overrides.TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.linear = False

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.linear |= func is torch.nn.functional.linear
            return func(*args, **(kwargs or {}))

    counts: dict[str, int] = {}
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, BFLFP8RLinear | BFLNVFP4Linear):
                continue
            scheme = "fp8r" if isinstance(module, BFLFP8RLinear) else "nvfp4"
            row = torch.zeros(1, module.in_features, dtype=module.compute_dtype, device=module.weight.device)
            with Calls() as calls:
                module(row)
            path = f"{scheme} {'dequantize' if calls.linear else 'fused'}"
            counts[path] = counts.get(path, 0) + 1
    return dict(sorted(counts.items()))

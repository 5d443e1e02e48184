"""Where the pipeline lives (the placement axis); how its denoiser is compiled is bench.compilation."""

from __future__ import annotations

from typing import Any

NEEDS_CUDA = ("device_map", "model_cpu_offload", "sequential_cpu_offload", "group_offload")


def place(pipe: Any, placement: str, device: str) -> None:
    """Put `pipe` on `device` the way the placement axis says."""
    if placement == "device":
        pipe.to(device)
    elif placement == "model_cpu_offload":
        pipe.enable_model_cpu_offload()
    elif placement == "sequential_cpu_offload":
        pipe.enable_sequential_cpu_offload()
    elif placement == "group_offload":  # the denoiser streams its layers from CPU memory; the rest sits on the GPU
        model = denoiser(pipe)
        for component in pipe.components.values():
            if component is not model and hasattr(component, "to") and hasattr(component, "parameters"):
                component.to(device)
        model.enable_group_offload(
            onload_device=device, offload_device="cpu", offload_type="leaf_level", use_stream=True
        )
    elif placement != "device_map":  # device_map placement happens at load time
        raise ValueError(f"unknown placement {placement!r}")


def load_kwargs(placement: str) -> dict[str, Any]:
    """Extra `from_pretrained` arguments a placement needs."""
    return {"device_map": "balanced"} if placement == "device_map" else {}


def denoiser(pipe: Any) -> Any:
    """The pipeline's denoising network: the transformer, or the UNet of older pipelines."""
    return getattr(pipe, "transformer", None) or pipe.unet

"""How a cell's denoiser is compiled (the compile, fullgraph, regional, dynamic and inductor axes): torch.compile and
the Inductor presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.placement import denoiser

# Inductor settings a compiled cell compiles with (the `inductor` axis): "default" leaves them as loading left
# them (torchao's quantize configs apply torchao's recommended settings themselves, as users get); "stock"
# restores them to how the cell process started, undoing what libraries changed; "torchao" is torchao's
# recommended_inductor_config_setter() (coordinate-descent tuning, int8 mm fused with its scale); "diffusers"
# the flags of diffusers' guide to faster text-to-image inference; "no-pattern-matcher" is "default" with
# Inductor's pattern matcher off, which stops its rewrite of torchao int8wo's linears into
# aten._weight_int8pack_mm (and every other pattern rewrite: a diagnostic, not a recipe);
# "stock-no-pattern-matcher" is "stock" with it off (the rewrite's cost without torchao's coordinate-descent
# tuning, which on its own can outlast a compile limit at FLUX size); "capture-dynamic-output-shapes" is
# "default" with Dynamo's `capture_dynamic_output_shape_ops` on, so ops whose output size depends on the data
# (bitsandbytes int8's outlier columns at a threshold > 0) are traced instead of breaking the graph at every
# linear (a Dynamo setting: rows record it as `dynamo.capture_dynamic_output_shape_ops`).
INDUCTOR_PRESETS = (
    "default",
    "stock",
    "torchao",
    "diffusers",
    "no-pattern-matcher",
    "stock-no-pattern-matcher",
    "capture-dynamic-output-shapes",
)
DYNAMO_PRESET_SETTINGS = {"capture-dynamic-output-shapes": {"capture_dynamic_output_shape_ops": True}}
DIFFUSERS_INDUCTOR_FLAGS = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "epilogue_fusion": False,
    "coordinate_descent_check_all_directions": True,
}


@dataclass(frozen=True)
class CompiledDenoiser:
    """How a cell's denoiser was compiled: the Inductor settings it compiled with that differ from the
    process start (what libraries and the preset changed; a preset's Dynamo settings as `dynamo.<name>`), and
    how many modules went to `torch.compile`
    (1 for the whole denoiser, one per repeated block for regional compilation)."""

    inductor_changes: dict[str, Any]
    modules: int


def inductor_settings() -> dict[str, Any]:
    """A copy of Inductor's settings as they are now."""
    import torch._inductor.config as inductor

    return inductor.get_config_copy()


def inductor_changes(since: dict[str, Any]) -> dict[str, Any]:
    """The Inductor settings that differ now from the copy `since`."""
    return {key: value for key, value in inductor_settings().items() if since.get(key) != value}


def restore_inductor_settings(copy: dict[str, Any]) -> None:
    """Put back the Inductor settings of `copy` that were changed since."""
    import torch._inductor.config as inductor

    for key in inductor_changes(copy):
        setattr(inductor, key, copy[key])


def compile_denoiser(
    pipe: Any,
    mode: str,
    fullgraph: bool,
    inductor: str | None,
    regional: bool,
    at_start: dict[str, Any],
    dynamic: bool | None = None,
) -> CompiledDenoiser | None:
    """`torch.compile` the denoiser in place (compilation itself happens at the first call), with Inductor
    set up as the `inductor` preset says (`at_start`: the settings when the process started);
    `regional` compiles only its repeated blocks, as diffusers' `compile_repeated_blocks()` does; `dynamic` is
    `torch.compile(dynamic=...)` (None: torch's default, static until a shape changes). None when `mode` is off.
    """
    if mode == "off":
        return None
    import torch._dynamo.config as dynamo

    _apply_inductor_preset(inductor or "default", at_start)
    changes = inductor_changes(at_start)
    for name, value in DYNAMO_PRESET_SETTINGS.get(inductor or "default", {}).items():
        setattr(dynamo, name, value)  # each cell is a fresh process: nothing to restore
        changes[f"dynamo.{name}"] = getattr(dynamo, name)
    model = denoiser(pipe)
    if not regional:
        model.compile(mode=mode, fullgraph=fullgraph, dynamic=dynamic)
        return CompiledDenoiser(changes, 1)
    model.compile_repeated_blocks(mode=mode, fullgraph=fullgraph, dynamic=dynamic)
    blocks = set(model._repeated_blocks)
    return CompiledDenoiser(changes, sum(type(module).__name__ in blocks for module in model.modules()))


def _apply_inductor_preset(name: str, at_start: dict[str, Any]) -> None:
    import torch._inductor.config as inductor

    if name not in INDUCTOR_PRESETS:
        raise ValueError(f"unknown inductor preset {name!r}")
    if name in ("stock", "stock-no-pattern-matcher"):
        restore_inductor_settings(at_start)
    elif name == "torchao":
        from torchao.quantization.utils import recommended_inductor_config_setter

        recommended_inductor_config_setter()
    elif name == "diffusers":
        for flag, value in DIFFUSERS_INDUCTOR_FLAGS.items():
            setattr(inductor, flag, value)
    if name in ("no-pattern-matcher", "stock-no-pattern-matcher"):
        inductor.pattern_matcher = False

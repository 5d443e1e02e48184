"""The serialization round trip (`serialize = true`): save a quantized component with `save_pretrained`,
load it back, and record the time, the size on disk, and whether the reload was refused.

torchao components are saved as pickles (`safe_serialization=False`, as the diffusers guide says) and
reloaded with `torch.load(weights_only=True)`. Types that this refuses are recorded as refused; the guide's
workaround (`torch.load(weights_only=False)` + `init_empty_weights` + `load_state_dict(assign=True)`) runs only
when the matrix sets `[run] trust_pickled_checkpoints = true`, on the checkpoint quantbench itself just wrote,
and the row says it ran.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.errors import first_line, root_cause
from bench.methods.base import Component


def round_trip(
    model: Any, component: Component, cell: Any, safe_serialization: bool, trust_pickles: bool
) -> tuple[Any, dict[str, Any]]:
    """The reloaded component (or the original where reloading failed) and the measurements.

    The checkpoint is written to a temporary folder, removed afterwards (a FLUX transformer is 12-24 GB);
    Linux keeps any memory-mapped file readable after it is unlinked.
    """
    folder = Path(tempfile.mkdtemp(prefix=f"quantbench-{component.name}-"))
    try:
        return _save_and_reload(model, component, cell, folder, safe_serialization, trust_pickles)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _save_and_reload(
    model: Any, component: Component, cell: Any, folder: Path, safe_serialization: bool, trust_pickles: bool
) -> tuple[Any, dict[str, Any]]:
    start = time.perf_counter()
    try:
        model.save_pretrained(folder, safe_serialization=safe_serialization)
    except Exception as error:  # some quantizers cannot be saved (GGUF): say so, keep the cell going
        return model, {"serialization_status": f"not saved: {type(error).__name__}: {first_line(error)}"}
    measured = {
        "serialize_save_s": time.perf_counter() - start,
        "checkpoint_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
    }
    start = time.perf_counter()
    try:
        reloaded = component.model_class().from_pretrained(folder, dtype=cell.torch_dtype)
        status = "ok"
    except Exception as error:
        root = root_cause(error)
        if type(root).__name__ != "UnpicklingError":
            return model, {
                **measured,
                "serialization_status": f"reload failed: {type(root).__name__}: {first_line(root)}",
            }
        if not trust_pickles:
            return model, {
                **measured,
                "serialization_status": f"reload refused by torch.load(weights_only=True): {first_line(root)}",
            }
        reloaded = trusted_reload(component, folder, cell)
        status = "ok: reloaded with torch.load(weights_only=False) because [run] trust_pickled_checkpoints = true"
    measured["serialize_reload_s"] = time.perf_counter() - start
    return reloaded, {**measured, "serialization_status": status}


def trusted_reload(component: Component, folder: Path, cell: Any) -> Any:
    """The diffusers guide's workaround for pickled checkpoints that weights_only loading refuses."""
    import torch
    from accelerate import init_empty_weights

    if component.is_transformers_model:
        raise NotImplementedError("the trusted reload is implemented for diffusers models only")
    cls = component.model_class()
    with init_empty_weights():
        model = cls.from_config(cls.load_config(folder))
    state = torch.load(folder / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=False)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()

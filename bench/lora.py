"""LoRA adapters on quantized models (the `lora` axis): the adapter files a matrix names or quantbench builds for
the model's own shapes (synthetic, cached), and how a cell loads, fuses and hot-swaps them through diffusers.

Modes: `none` (no adapter), `unfused` (`load_lora_weights`), `fused` (`fuse_lora`, then the adapter unloaded),
`hotswap` (`enable_lora_hotswap(target_rank=...)` before loading and compiling; a second adapter swapped in with
`load_lora_weights(..., hotswap=True)` after the warm-up, before the timed runs). A library's refusal while
loading, fusing or swapping is an `unsupported` row with its reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.cache import build_once, cache_dir, content_digest
from bench.errors import MethodUnavailable, first_line
from bench.measure import safetensors_tensors

MODES = ("none", "unfused", "fused", "hotswap")
ADAPTER_NAME = "quantbench"  # the adapter's name in the pipeline; a hot-swapped adapter takes the same
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as most FLUX LoRAs
SYNTHETIC_VERSION = "1"  # bump when the synthetic builder's output changes, so cached adapters rebuild
ADAPTER_FILE = "adapter.safetensors"
PEFT_PREFIX = "base_model.model."  # keys of a PEFT `save_pretrained` adapter; diffusers' own start `transformer.`


@dataclass(frozen=True)
class KnownRefusal:
    """A method and LoRA modes the libraries were seen to refuse, with each set of versions that refused: a cell
    meeting one of them is `unsupported` before it starts; with other versions it runs and finds out."""

    method: str
    modes: tuple[str, ...]
    seen_with: tuple[dict[str, str], ...]  # each: package -> version, as installed where the refusal was seen
    reason: str


KNOWN_REFUSALS = (
    KnownRefusal(
        "gguf",
        ("fused",),
        ({"diffusers": "0.42.1", "peft": "0.21.2"}, {"diffusers": "0.42.1", "peft": "0.21.0"}),  # CPU; H200 (lora-h200)
        "peft's merge adds the LoRA update to the weight's data, which for GGUF holds the packed quantized blocks"
        " (RuntimeError: The size of tensor a (68) must match the size of tensor b (64), Q8_0 on the tiny pipeline)",
    ),
    KnownRefusal(
        "quanto",
        ("unfused", "fused", "hotswap"),
        ({"diffusers": "0.42.1", "peft": "0.21.2", "optimum-quanto": "0.2.7"},),
        "FluxLoraLoaderMixin._maybe_expand_lora_state_dict looks each adapted layer's weight up in the"
        " transformer's state dict, where quanto stores it under other keys (KeyError: '<layer>.weight')",
    ),
)


def check_lora(cell: Any) -> None:
    """Raise `unsupported` for a LoRA mode the installed libraries were seen to refuse for the cell's method."""
    if cell.lora == "none":
        return
    from bench.environment import library_versions

    for refusal in KNOWN_REFUSALS:
        if cell.method != refusal.method or cell.lora not in refusal.modes:
            continue
        for seen_with in refusal.seen_with:
            if library_versions(*seen_with) == seen_with:
                versions = ", ".join(f"{name} {version}" for name, version in seen_with.items())
                reason = f"LoRA {cell.lora} on {cell.method} ({versions}): {refusal.reason}"
                raise MethodUnavailable("unsupported", reason)


class AdapterFileError(ValueError):
    """A LoRA file quantbench will not load (not safetensors, unreadable, no LoRA weights in it)."""


@dataclass(frozen=True)
class Adapter:
    """One adapter file as cells load it: `identity` is its content key (cell ids and reference keys hold it)."""

    path: str
    identity: str
    rank: int
    peft_format: bool = False  # keys under `base_model.model.`: renamed to diffusers' `transformer.` on load

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CellAdapters:
    """What a cell's subprocess is told (`CellSpec.lora`): its mode, the adapter loaded before compiling, the one
    swapped in after the warm-up (hotswap), and the rank the model is prepared for."""

    mode: str
    adapter: dict[str, Any]
    swap_adapter: dict[str, Any] | None = None
    target_rank: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MatrixAdapters:
    """The adapter files of a matrix's LoRA cells by rank: the one loaded first, and the one `hotswap` cells swap
    in after their warm-up."""

    first: dict[int, Adapter]
    second: dict[int, Adapter]

    def for_cell(self, mode: str, rank: int | None) -> CellAdapters | None:
        """What a cell with this `lora` mode and rank is told; None without an adapter."""
        if mode == "none" or rank is None:
            return None
        first = self.first[rank]
        swap = self.second[rank] if mode == "hotswap" else None
        target_rank = max(first.rank, swap.rank) if swap else first.rank
        return CellAdapters(mode, first.to_json(), swap.to_json() if swap else None, target_rank)

    def timed(self, mode: str, rank: int | None) -> Adapter | None:
        """The adapter a cell's timed runs use (its drift reference is the bf16 pipeline with it, unfused)."""
        if mode == "none" or rank is None:
            return None
        return self.second[rank] if mode == "hotswap" else self.first[rank]


def matrix_adapters(settings: Any, matrix_folder: Path, model_folder: Path, cells: list[Any]) -> MatrixAdapters:
    """The adapters the LoRA `cells` need: the `[lora]` table's files (`settings`, relative to `matrix_folder`), or
    synthetic ones built (once, cached) for the model in `model_folder`."""
    wanted = {(cell.lora_rank, cell.lora == "hotswap") for cell in cells if cell.lora != "none"}
    first: dict[int, Adapter] = {}
    second: dict[int, Adapter] = {}
    for rank, hotswap in sorted(wanted):
        if settings.synthetic:
            made = settings.synthetic
            first[rank] = synthetic_adapter(model_folder, rank, made.targets, made.seed)
            if hotswap:
                second[rank] = synthetic_adapter(model_folder, rank, made.targets, made.hotswap_seed)
        else:
            first[rank] = file_adapter((matrix_folder / settings.path).expanduser().resolve())
            if hotswap:
                second[rank] = file_adapter((matrix_folder / settings.hotswap_path).expanduser().resolve())
    return MatrixAdapters(first, second)


# --- adapter files (the driver) --------------------------------------------------------------------------------


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file (names to dtype and shape), read without loading any tensor."""
    if path.suffix != ".safetensors":
        raise AdapterFileError("only .safetensors LoRA files are loaded (pickled .bin, .pt, .ckpt are refused)")
    try:
        return safetensors_tensors(path)
    except FileNotFoundError:
        raise AdapterFileError("no such file") from None
    except (OSError, ValueError, struct.error) as error:
        raise AdapterFileError(
            f"not a readable safetensors file ({first_line(error) or type(error).__name__})"
        ) from None


def file_adapter(path: Path) -> Adapter:
    """A LoRA file given in the matrix: its rank (the largest `lora_A` rows) and its content's sha256 as identity
    (the same file copied or checked out elsewhere keeps its cell ids and reference key)."""
    header = safetensors_header(path)
    ranks = [spec["shape"][0] for name, spec in header.items() if ".lora_A." in name or ".lora_down." in name]
    if not ranks:
        raise AdapterFileError("no LoRA weights in it (no `lora_A` / `lora_down` tensors)")
    digest = content_digest(path)[:16]
    peft_format = all(name.startswith(PEFT_PREFIX) for name in header)
    return Adapter(str(path), f"file-{digest}", max(ranks), peft_format)


def linear_shapes(component_folder: Path, targets: list[str]) -> dict[str, tuple[int, int]]:
    """The (out, in) shapes of a component's linear layers whose names end with one of `targets` (PEFT's
    `target_modules` rule), read from its safetensors headers."""
    shapes = {}
    for file in sorted(component_folder.glob("*.safetensors")):
        for name, spec in safetensors_header(file).items():
            module, _, kind = name.rpartition(".")
            if kind == "weight" and len(spec["shape"]) == 2 and _targeted(module, targets):
                shapes[module] = tuple(spec["shape"])
    return shapes


def _targeted(module: str, targets: list[str]) -> bool:
    return any(module == target or module.endswith(f".{target}") for target in targets)


def synthetic_adapter(model_folder: Path, rank: int, targets: list[str], seed: int) -> Adapter:
    """A LoRA of `rank` on the transformer's `targets`, random from `seed`, in diffusers' format: built once,
    cached by everything that produced it (the layer shapes, rank, targets, seed, builder version)."""
    shapes = linear_shapes(model_folder / "transformer", targets)
    if not shapes:
        raise AdapterFileError(f"no linear layer of the transformer matches the targets {targets}")
    key = json.dumps([SYNTHETIC_VERSION, sorted(shapes.items()), rank, seed], sort_keys=True)
    identity = "synthetic-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = build_once(cache_dir("lora") / identity, lambda scratch: _write_synthetic(scratch, shapes, rank, seed))
    return Adapter(str(folder / ADAPTER_FILE), identity, rank)


def _write_synthetic(folder: Path, shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> None:
    """Random `lora_A` (rank x in) and `lora_B` (out x rank) in bf16, scaled so each layer's update has about the
    size of its input's share: a visible change of the images, not a broken model."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in sorted(shapes.items()):
        down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        up = torch.randn(out_features, rank, generator=generator) / rank**0.5
        tensors[f"transformer.{module}.lora_A.weight"] = down.to(torch.bfloat16).contiguous()
        tensors[f"transformer.{module}.lora_B.weight"] = up.to(torch.bfloat16).contiguous()
    save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})


# --- in the cell -----------------------------------------------------------------------------------------------


def attach_adapter(pipe: Any, lora: CellAdapters, clock: Any, measurements: Any) -> None:
    """Before compiling: prepare for hot-swapping (hotswap), load the adapter, fuse it and unload the LoRA layers
    (fused). Sets `lora_load_s` and `lora_fuse_s`; a library's refusal raises `unsupported` with its reason."""
    from bench.trackers.latency import track_latency

    with refusals_as_unsupported(lora.mode, "loading"):
        if lora.mode == "hotswap":
            pipe.enable_lora_hotswap(target_rank=lora.target_rank)
        with track_latency(clock) as loading:
            pipe.load_lora_weights(_source(lora.adapter), adapter_name=ADAPTER_NAME)
        measurements.lora_load_s = loading.s
    if lora.mode == "fused":
        with refusals_as_unsupported(lora.mode, "fusing"), track_latency(clock) as fusing:
            pipe.fuse_lora(adapter_names=[ADAPTER_NAME])
            pipe.unload_lora_weights()
        measurements.lora_fuse_s = fusing.s


def swap_adapter(pipe: Any, lora: CellAdapters, clock: Any, measurements: Any) -> None:
    """After the warm-up of a hotswap cell: the second adapter replaces the first in place (`hotswap=True`, same
    adapter name), so a compiled model need not recompile. Sets `lora_swap_s`."""
    from bench.trackers.latency import track_latency

    with refusals_as_unsupported(lora.mode, "hot-swapping"), track_latency(clock) as swapping:
        pipe.load_lora_weights(_source(lora.swap_adapter), adapter_name=ADAPTER_NAME, hotswap=True)
    measurements.lora_swap_s = swapping.s


def _source(adapter: dict[str, Any]) -> Any:
    """What `load_lora_weights` is given: the file, or for a PEFT-format file its tensors under diffusers' names."""
    if not adapter["peft_format"]:
        return adapter["path"]
    from safetensors.torch import load_file

    return {f"transformer.{k.removeprefix(PEFT_PREFIX)}": v for k, v in load_file(adapter["path"]).items()}


@contextlib.contextmanager
def refusals_as_unsupported(mode: str, doing: str) -> Iterator[None]:
    """What the libraries raise while loading, fusing or swapping an adapter, as an `unsupported` row with the
    library's reason (out-of-memory stays an error of its own)."""
    try:
        yield
    except MethodUnavailable:
        raise
    except Exception as error:
        if type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower():
            raise
        reason = f"LoRA {mode}: {doing} the adapter failed: {type(error).__name__}: {first_line(error)}"
        raise MethodUnavailable("unsupported", reason + _raised_in(error)) from error


def _raised_in(error: BaseException) -> str:
    """` (raised in <package>/<module>.py, <function>)`: the library frame the error came from."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    where = frames[-1]
    parts = Path(where.filename).parts
    start = max((i + 1 for i, part in enumerate(parts) if part in ("site-packages", "dist-packages")), default=0)
    return f" (raised in {'/'.join(parts[start:]) if start else Path(where.filename).name}, {where.name})"

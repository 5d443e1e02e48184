"""GGUF: the transformer from a `.gguf` file through `from_single_file` + `GGUFQuantizationConfig`.

The file is the user's (`file`: a local path or URL) or produced by quantbench from the pipeline's own
transformer checkpoint with the `gguf` package, cached by the content hash of that checkpoint. Tensors
are written under diffusers' key names, so diffusers loads them without key conversion.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from bench.cache import build_once, cache_dir, content_digest
from bench.environment import library_versions
from bench.methods.base import Component, Method, MethodOptions, MethodUnavailable, QuantizedOptions

WRITER_VERSION = "2"  # bump when the produced files change
GGUF_TYPES = ("F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Byte offsets of the float16 scale fields (d, and m/dmin where present) inside each block, as ggml lays them out.
SCALE_OFFSETS = {
    "Q8_0": (0,), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_0": (0,), "Q4_1": (0, 2),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}  # fmt: skip
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


class GgufOptions(QuantizedOptions):
    quant_type: Literal[GGUF_TYPES] | None = None  # type: ignore[valid-type]
    file: str | None = None
    synthetic_blocks: bool = False  # random valid blocks instead of quantized values: synthetic weights only

    @model_validator(mode="after")
    def _file_or_type(self) -> GgufOptions:
        if (self.file is None) == (self.quant_type is None):
            raise ValueError("give exactly one of quant_type (quantbench writes the file) or file (your .gguf)")
        if self.synthetic_blocks and self.quant_type not in SCALE_OFFSETS:
            raise ValueError(f"synthetic_blocks needs a block-quantized type: {', '.join(SCALE_OFFSETS)}")
        return self


class Gguf(Method):
    name: ClassVar[str] = "gguf"
    family: ClassVar[str] = "gguf"
    Options: ClassVar[type[MethodOptions]] = GgufOptions
    only_components: ClassVar[tuple[str, ...] | None] = ("transformer",)
    options: GgufOptions

    def check(self, cell, machine) -> None:
        quant_type = self.options.quant_type
        if quant_type in K_QUANTS and not self.options.synthetic_blocks:
            raise MethodUnavailable(
                "unsupported",
                f"the gguf package cannot quantize to {quant_type} (K-quants); give a {quant_type} file, "
                "or set synthetic_blocks = true for synthetic weights",
            )

    def prepare_component(self, component: Component, cell) -> Component:
        if self.options.file:
            return Component(**{**component.__dict__, "single_file": Path(self.options.file)})
        source = sorted((component.folder / component.name).glob("*.safetensors"))
        key = hashlib.sha256(
            json.dumps(
                [
                    WRITER_VERSION,
                    library_versions("gguf", "numpy", "safetensors"),
                    self.options.quant_type,
                    self.options.synthetic_blocks,
                    [content_digest(p) for p in source],
                ]
            ).encode()
        ).hexdigest()[:16]
        target = cache_dir("gguf") / f"{component.name}-{self.options.quant_type}-{key}"
        build_once(
            target,
            lambda folder: write_gguf(source, folder / "model.gguf", self.options),
            lambda: estimated_gguf_bytes(source, self.options.quant_type),
        )
        return Component(**{**component.__dict__, "single_file": target / "model.gguf"})

    def load_component(self, component: Component, cell) -> Any:
        from diffusers import GGUFQuantizationConfig

        return component.model_class().from_single_file(
            str(component.single_file),
            config=str(component.folder),
            subfolder=component.name,
            quantization_config=GGUFQuantizationConfig(compute_dtype=cell.torch_dtype),
            dtype=cell.torch_dtype,
        )


def estimated_gguf_bytes(sources: list[Path], quant_type: str) -> int:
    """About the size of the GGUF file of bf16/fp16 checkpoint `sources` at `quant_type`, with a margin."""
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant_type]]
    checkpoint = sum(path.stat().st_size for path in sources)
    return int(checkpoint / 2 * type_size / block_size * 1.1) + 256 * 1024**2


def write_gguf(sources: list[Path], target: Path, options: GgufOptions) -> None:
    """Write the safetensors `sources` as one GGUF file of `options.quant_type`.

    Only 2-D `.weight` matrices (linear layers) are quantized; everything else (biases, norms, convolutions,
    positional-embedding buffers) and matrices whose last dimension is not a multiple of the type's block
    size stay F32, as llama.cpp's converters do.
    """
    import gguf
    import numpy as np
    from safetensors import safe_open

    qtype = gguf.GGMLQuantizationType[options.quant_type]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    writer = gguf.GGUFWriter(str(target), arch="quantbench")
    writer.add_string("quantbench.source", "produced by quantbench from a diffusers checkpoint")
    writer.add_bool("quantbench.synthetic_blocks", options.synthetic_blocks)
    rng = np.random.default_rng(0)
    for source in sources:
        with safe_open(str(source), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                shape = tuple(handle.get_slice(name).get_shape())
                if not name.endswith(".weight") or len(shape) != 2 or shape[-1] % block_size:
                    writer.add_tensor(name, handle.get_tensor(name).float().numpy())
                elif options.synthetic_blocks:  # the values are never read: shapes and types are what count
                    writer.add_tensor(name, _random_blocks(shape, options.quant_type, rng), raw_dtype=qtype)
                else:
                    writer.add_tensor(
                        name, gguf.quants.quantize(handle.get_tensor(name).float().numpy(), qtype), raw_dtype=qtype
                    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _random_blocks(shape: tuple[int, ...], quant_type: str, rng: Any) -> Any:
    """Valid blocks of random bytes with small positive scales (memory and dequantization cost depend on the
    type, not the values). Only for synthetic weights."""
    import gguf
    import numpy as np

    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant_type]]
    blocks = rng.integers(0, 256, size=(*shape[:-1], shape[-1] // block_size, type_size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(1e-4).tobytes(), dtype=np.uint8)
    for offset in SCALE_OFFSETS[quant_type]:
        blocks[..., offset : offset + 2] = scale
    return blocks.reshape(*shape[:-1], -1)

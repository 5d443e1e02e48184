"""Capability detection: whether a cell can run on this machine with the installed libraries, before it starts."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from bench.attention import check_attention
from bench.cells import Cell
from bench.environment import Machine
from bench.lora import check_lora
from bench.methods import method_class
from bench.methods.base import MethodUnavailable, needs_cuda
from bench.placement import NEEDS_CUDA


@dataclass(frozen=True)
class Verdict:
    """`run`, or `skipped` / `unsupported` with the reason."""

    status: str
    reason: str | None = None


def check_cell(cell: Cell, machine: Machine) -> Verdict:
    """What will happen to `cell` here; costs no subprocess."""
    cls = method_class(cell.method)
    try:
        if cell.placement in NEEDS_CUDA:
            needs_cuda(machine, f"placement {cell.placement}")
        if cell.lora != "none" and importlib.util.find_spec("peft") is None:
            raise MethodUnavailable("unsupported", f"lora = '{cell.lora}' needs the `peft` package (load_lora_weights)")
        check_lora(cell)
        if cell.inductor == "torchao" and importlib.util.find_spec("torchao") is None:
            raise MethodUnavailable("unsupported", "inductor = 'torchao' needs the `torchao` package")
        cls(cls.Options.model_validate(cell.options)).check(cell, machine)
        check_attention(cell.attention, cell.dtype, machine)
    except MethodUnavailable as unavailable:
        return Verdict(unavailable.status, unavailable.reason)
    return Verdict("run")

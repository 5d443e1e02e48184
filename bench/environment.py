"""Facts about this machine and its libraries: what capability checks read and what every row records."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.errors import UserError

# the distributions whose versions every row records, each as `<name with _ for ->_version`
LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "torchao", "gguf", "peft",
             "optimum-quanto", "sdnq", "nvidia-modelopt", "auto-round", "kernels", "triton")  # fmt: skip
LOCK_ENV = "QUANTBENCH_LOCK"  # the lock file (e.g. locks/gpu.txt) this environment was installed from, if any


@dataclass(frozen=True)
class Machine:
    """The accelerator this process sees."""

    cuda_available: bool
    cuda_capability: tuple[int, int] | None = None
    gpu_name: str | None = None
    gpu_count: int = 0


# Run in a child process: querying a GPU initialises CUDA, and a CUDA context left in the driver (or in a Ray
# actor) would sit on the first GPU for the whole run, beside every cell placed there (`gpu_other_processes`).
MACHINE_PROBE = """
import json, torch
cuda = torch.cuda.is_available()
print(json.dumps(cuda and [torch.cuda.get_device_capability(0), torch.cuda.get_device_name(0), torch.cuda.device_count()]))
"""


def detect_machine() -> Machine:
    """What torch sees, from a child process: whether CUDA is usable, and the first GPU's name and compute
    capability (asked once per process and CUDA_VISIBLE_DEVICES)."""
    return _machine_seen_with(os.environ.get("CUDA_VISIBLE_DEVICES"))


@functools.cache
def _machine_seen_with(visible_devices: str | None) -> Machine:
    done = subprocess.run([sys.executable, "-c", MACHINE_PROBE], capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise UserError(f"cannot tell which GPU torch sees: {reason}")
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    if not seen:
        return Machine(cuda_available=False)
    capability, name, count = seen
    return Machine(cuda_available=True, cuda_capability=tuple(capability), gpu_name=name, gpu_count=count)


@dataclass(frozen=True)
class Environment:
    """Versions and host facts recorded with every row."""

    python_version: str
    torch_version: str | None
    diffusers_version: str | None
    transformers_version: str | None
    accelerate_version: str | None
    bitsandbytes_version: str | None
    torchao_version: str | None
    gguf_version: str | None
    peft_version: str | None  # diffusers' LoRA loading
    optimum_quanto_version: str | None
    sdnq_version: str | None
    nvidia_modelopt_version: str | None
    auto_round_version: str | None
    kernels_version: str | None  # Hub kernels (Nunchaku Lite, `*_hub` attention)
    triton_version: str | None  # Inductor's kernels
    cpu: str
    host: str
    harness_commit: str | None
    lock_sha256: str | None = None  # of the lock file named by QUANTBENCH_LOCK

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def collect_environment() -> Environment:
    """Library versions (from package metadata, without importing them), CPU, host and harness commit."""
    versions = {version_field(name): _version(name) for name in LIBRARIES}
    return Environment(
        python_version=platform.python_version(),
        cpu=cpu_name(),
        host=socket.gethostname(),
        harness_commit=harness_commit(),
        lock_sha256=lock_sha256(),
        **versions,
    )


MODEL_LIBRARIES = ("torch", "diffusers", "transformers")  # what builds, loads and runs every pipeline
FAMILY_LIBRARY = {"bitsandbytes": "bitsandbytes", "torchao": "torchao", "gguf": "gguf", "quanto": "optimum-quanto",
                  "sdnq": "sdnq", "modelopt": "nvidia-modelopt", "auto_round": "auto-round", "nunchaku": "kernels"}  # fmt: skip


def version_field(distribution: str) -> str:
    """The row column of a distribution's version: "optimum-quanto" -> "optimum_quanto_version"."""
    return distribution.replace("-", "_") + "_version"


def library_versions(*names: str) -> dict[str, str | None]:
    """The installed versions of `names` (package metadata, no import): what a cache entry is keyed by."""
    return {name: _version(name) for name in names}


def other_versions(row: dict[str, object], current: dict[str, object]) -> dict[str, tuple[object, object]]:
    """The libraries whose version in a result `row` differs from `current` (an Environment's fields): the
    pipeline's (torch, diffusers, transformers), the row's method family's and, with an adapter, peft's, as
    {field: (row's, current)}."""
    family = FAMILY_LIBRARY.get(str(row.get("method_family")))
    lora = isinstance(row.get("lora"), str) and row["lora"] != "none"  # None or NaN in rows from before the axis
    libraries = (*MODEL_LIBRARIES, *([family] if family else []), *(["peft"] if lora else []))
    fields = [version_field(name) for name in libraries]
    return {
        field: (row.get(field), current.get(field))
        for field in fields
        if _known(row.get(field)) is not None and _known(row.get(field)) != _known(current.get(field))
    }


def lock_sha256() -> str | None:
    """The SHA-256 of the lock file this environment was installed from, as QUANTBENCH_LOCK names it (the nox
    GPU sessions set it); None without one. A lock named but unreadable is a setup error, said at once."""
    path = os.environ.get(LOCK_ENV)
    if not path:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as error:
        from bench.errors import UserError

        raise UserError(f"{LOCK_ENV}={path}: cannot read the lock file: {error.strerror or error}") from None


def differing_versions(old: dict[str, object], new: dict[str, object]) -> dict[str, tuple[object, object]]:
    """The environment fields (library versions, Python, lock hash) whose values differ between two runs'
    environments (e.g. one row of each), as {field: (old, new)}: what a maintainer asks first about a
    regression. A field missing from one side counts as None there."""
    fields = [*(version_field(name) for name in ("python", *LIBRARIES)), "lock_sha256"]
    return {
        field: (old.get(field), new.get(field)) for field in fields if _known(old.get(field)) != _known(new.get(field))
    }


def _known(value: object) -> object:
    """A value as compared: missing (None, or NaN from a table) is None."""
    return None if value is None or value != value else value


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU model name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def harness_commit() -> str | None:
    """The git commit of the quantbench checkout, with `-dirty` when it has uncommitted changes.

    A copy without its git folder (e.g. shipped to a GPU host) can say it in QUANTBENCH_HARNESS_COMMIT.
    """
    if os.environ.get("QUANTBENCH_HARNESS_COMMIT"):
        return os.environ["QUANTBENCH_HARNESS_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")

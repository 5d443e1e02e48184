"""The one front door for every task: `nox -s tests`, `nox -s smoke`, `nox -s lint`, `nox -s gpu`,
`nox -s gpu-tests`, `nox -s kernels`, `nox -s scaling`."""

import json
import os
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.error_on_missing_interpreters = False  # tests run on each listed Python that is installed
nox.options.reuse_existing_virtualenvs = True

PYTHONS = ["3.11", "3.12"]
# A plain `torch` requirement would pull the newest CUDA build (~5 GB). On the project's CPU machines a
# local 2.13 CPU wheel satisfies this; elsewhere it resolves to the normal (CUDA) build. Override with
# QUANTBENCH_TORCH, e.g. QUANTBENCH_TORCH="torch==2.11.*".
TORCH = os.environ.get("QUANTBENCH_TORCH", "torch==2.13.*")


def install(session: nox.Session, extras: str = "") -> None:
    """torch and quantbench; `--no-compile`: Python compiles only the modules a run imports, not every file of
    torch, transformers and Ray at install time (minutes of a CI run on 2 cores), and keeps that bytecode."""
    session.install("--no-compile", TORCH)
    session.install("--no-compile", "-e", f".{extras}")
    keep_bytecode(session)


def keep_bytecode(session: nox.Session) -> None:
    """Container images often set PYTHONDONTWRITEBYTECODE (this project's CPU machines do): every `quantbench`
    process would then compile torch, diffusers and transformers from source again (a `plan` of the smoke matrix
    took 25 s instead of 12 s). An empty value unsets it for the session's commands."""
    session.env["PYTHONDONTWRITEBYTECODE"] = ""


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite (pytest exits non-zero, also when no test ran), on two pytest-xdist workers: a cell's process
    spends most of its time in single-threaded imports and compiles, so two tests at once use both cores of a
    2-core runner. A module runs on one worker (`loadfile`), so its module-scoped runs happen once; the heaviest
    modules start first, in tests/conftest.py's order (`--no-loadscope-reorder`: not by their number of tests)."""
    install(session, "[test]")
    session.install("--no-compile", "pytest-xdist>=3.5")  # the CPU suite's own runner: not in the GPU lock
    session.run("pytest", "-n", "2", "--dist", "loadfile", "--no-loadscope-reorder", *session.posargs)


@nox.session
def smoke(session: nox.Session) -> None:
    """The main job on the built-in tiny model: `quantbench run matrices/smoke.toml`."""
    install(session)
    session.run("quantbench", "run", "matrices/smoke.toml", *session.posargs)
    session.run("quantbench", "report", "results/smoke", "-o", "reports/out/smoke.html")


GPU_LOCK = "locks/gpu.txt"  # the CUDA environment, pinned with hashes (its header says how to regenerate it)


def install_locked(session: nox.Session) -> None:
    """The GPU sessions' environment: exactly the lock (hashes checked), then quantbench without dependencies;
    rows record the lock's SHA-256 (QUANTBENCH_LOCK)."""
    session.install("--require-hashes", "-r", GPU_LOCK)
    session.install("--no-deps", "-e", ".")
    session.env["QUANTBENCH_LOCK"] = GPU_LOCK
    keep_bytecode(session)


@nox.session(python="3.12")
def gpu(session: nox.Session) -> None:
    """On a CUDA machine: the nightly matrix (compiled cells included; `-- --quick`: eager only), its report, and
    a comparison with results/reference/<this GPU>/nightly that fails on a regression (bench/nightly.py). Other
    arguments go to `quantbench run`, e.g. `--executor local-gpus` or `--max-time 25m`."""
    install_locked(session)
    session.run("python", "-m", "bench.nightly", *session.posargs)


@nox.session(name="gpu-tests", python="3.12")
def gpu_tests(session: nox.Session) -> None:
    """On a CUDA machine: the tests marked `gpu` (tests/gpu: loading, placements, memory, LPIPS, real OOM)."""
    install_locked(session)
    session.run("pytest", "-m", "gpu", "tests/gpu", *session.posargs)


# one committed `nox -s kernels` run per GPU model
KERNELS_REFERENCES = [Path("results/reference/kernels/h100.json"), Path("results/reference/kernels/h200.json")]


@nox.session
def kernels(session: nox.Session) -> None:
    """Layer microbenchmarks (tests/kernels): FLUX.1-dev shapes on a GPU, shapes / 16 on a CPU. Writes
    reports/out/kernels.json and compares it with the committed run from the same GPU model, where there is one."""
    install(session, "[test]")
    output = Path("reports/out/kernels.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    session.run("pytest", "tests/kernels", "-m", "kernels", f"--benchmark-json={output}", *session.posargs)
    device = _kernel_device(output)
    same = [path for path in KERNELS_REFERENCES if path.exists() and _kernel_device(path) == device]
    if same:
        session.log(f"compared with {same[0]} ({device})")
        session.run("pytest-benchmark", "compare", str(same[0]), str(output), "--group-by=group")
    else:
        session.log(f"not compared: no committed kernels run for {device} (KERNELS_REFERENCES in noxfile.py)")


def _kernel_device(path: Path) -> str:
    return json.loads(path.read_text())["machine_info"]["quantbench_peaks"]["device_name"]


@nox.session
def scaling(session: nox.Session) -> None:
    """Executor throughput: cells per hour on 1 and N Ray CPU workers (`-- --workers N`, default 2)."""
    install(session, "[test]")
    session.run("python", "benchmarks/executor_scaling.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation: regenerate the generated pages, then `mkdocs build --strict` (a broken link fails).
    `-- --check`: fail when a generated page is stale instead of rewriting it."""
    install(session, "[docs]")
    session.run("python", "-m", "bench.docs_pages", *(["--check"] if "--check" in session.posargs else []))
    session.run("mkdocs", "build", "--strict")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check; the import contracts of pyproject.toml (`lint-imports`)."""
    session.install("ruff", "import-linter")
    session.run("ruff", "check", "bench", "tests", "benchmarks", "reports", "noxfile.py")
    session.run("ruff", "format", "--check", "bench", "tests", "benchmarks", "reports", "noxfile.py")
    session.run("lint-imports", env={"PYTHONPATH": str(Path(__file__).parent)})

"""The one front door for every task: `nox -s tests`, `nox -s smoke`, `nox -s lint`, `nox -s gpu`."""

import os

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
    session.install(TORCH)
    session.install("-e", f".{extras}")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite (pytest exits non-zero, also when no test ran)."""
    install(session, "[test]")
    session.run("pytest", *session.posargs)


@nox.session
def smoke(session: nox.Session) -> None:
    """The main job on the built-in tiny model: `quantbench run matrices/smoke.toml`."""
    install(session)
    session.run("quantbench", "run", "matrices/smoke.toml", *session.posargs)
    session.run("quantbench", "report", "results/smoke", "-o", "reports/out/smoke.html")


@nox.session
def gpu(session: nox.Session) -> None:
    """On a CUDA machine: the reference matrix (`-- --quick`: eager cells only), its report, and a comparison
    with the committed H100 reference that fails on a regression."""
    install(session)
    quick = ["--select", "compile=off"] if "--quick" in session.posargs else []
    session.run("quantbench", "run", "matrices/flux-dev-h100.toml", "--results", "results/nightly", *quick)
    session.run("quantbench", "report", "results/nightly", "-o", "reports/out/nightly.html")
    session.run(
        "quantbench",
        "compare",
        "results/reference/flux-dev-h100",
        "results/nightly",
        "-o",
        "reports/out/nightly-compare.csv",
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff")
    session.run("ruff", "check", "bench", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "bench", "tests", "noxfile.py")

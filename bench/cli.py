"""The `quantbench` command line: plan, run, report, compare."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bench.errors import UserError

if TYPE_CHECKING:
    from bench.store import ResultsFolder

DEFAULT_RESULTS_ROOT = Path("results")
SELECT_HELP = "only cells whose axis or method option KEY equals VALUE (repeatable; e.g. compile=off)"
# Loggers whose warnings in this process are only import-time notices (torchao's optional kernels not built for
# this platform, torch deprecating what torchao registers): the driver imports torchao to check cells, never to
# run one. A cell's process keeps them, in its log.
IMPORT_NOTICES = ("torchao", "torch.utils._pytree")
SUFFIX_FORMATS = {".html": "html", ".htm": "html", ".md": "md"}  # report -o suffix -> --format


class _LibraryNamedFormatter(logging.Formatter):
    """quantbench's own log records as `quantbench: ...`, other libraries' under their logger's name
    (`torchao.kernel.intmm: ...`), so a library's warning does not read as quantbench's."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging.Formatter's name)
        own = record.name == "bench" or record.name.startswith("bench.")
        return f"{'quantbench' if own else record.name}: {record.getMessage()}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as for every other bad input
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="quantbench", description="Benchmark quantization methods on diffusion pipelines.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{plan,run,report,compare}", parser_class=_Parser)

    plan = verbs.add_parser("plan", help="list the cells a matrix expands into, and which will run here")
    plan.add_argument("matrix", type=Path, help="matrix file (TOML)")
    plan.add_argument("--select", action="append", default=[], metavar="KEY=VALUE", help=SELECT_HELP)
    plan.add_argument(
        "--results",
        type=Path,
        help="also show each cell's status in this results folder (default: results/<matrix name>/)",
    )

    run = verbs.add_parser("run", help="run a matrix; finished cells are skipped unless --force")
    run.add_argument("matrix", type=Path, help="matrix file (TOML)")
    run.add_argument("--results", type=Path, help="results folder (default: results/<matrix name>/)")
    run.add_argument("--force", action="store_true", help="rerun cells that already have completed rows")
    run.add_argument("--select", action="append", default=[], metavar="KEY=VALUE", help=SELECT_HELP)
    run.add_argument(
        "--executor",
        default="local",
        help="where cells run: local (default; one after another), local-gpus (one per visible GPU at a time), "
        "ray (tasks on a Ray cluster)",
    )
    run.add_argument("--address", help="with --executor ray: the cluster, 'auto' (default) or ray://HOST:PORT")
    run.add_argument(
        "--gpus", type=_device_list, help="with --executor local-gpus: device ids, e.g. 0,1 (default: all visible)"
    )
    run.add_argument(
        "--max-time",
        type=_duration,
        metavar="DURATION",
        help="start no cell after this long and stop the cells still running then (exit code 3; a rerun resumes): "
        "seconds, or with a unit, e.g. 540, 25m, 1.5h",
    )
    run.add_argument(
        "--times-from",
        type=Path,
        metavar="DIR",
        help="with several GPUs, also order cells longest first by the cell times recorded in this results folder "
        "(e.g. a reference run of the same matrix; --results' own times win)",
    )

    report = verbs.add_parser("report", help="write a self-contained HTML (or Markdown) report of a results folder")
    report.add_argument("results", type=Path, help="results folder or Parquet file")
    report.add_argument("-o", "--output", type=Path, required=True, help="HTML (or Markdown) file to write")
    report.add_argument(
        "--format",
        choices=("html", "md"),
        help="html or md: GitHub-flavoured Markdown, PNG plots beside it (default: md for an -o ending in .md, "
        "otherwise html; a format the -o suffix contradicts is an error)",
    )
    report.add_argument(
        "--budgets", type=_budgets, default=(80, 48, 24, 16, 12), metavar="GB,GB,...",
        help="GPU memory budgets of the what-to-pick table, in GB (default: 80,48,24,16,12)",
    )  # fmt: skip
    report.add_argument(
        "--kernels", type=Path, help="also show the layer benchmarks of this `nox -s kernels` JSON, with a roofline"
    )

    compare = verbs.add_parser("compare", help="per-cell deltas between two runs; exit 1 on a regression")
    compare.add_argument("old", type=Path, help="results folder or Parquet file of the reference run")
    compare.add_argument("new", type=Path, help="results folder or Parquet file of the new run")
    compare.add_argument("-o", "--output", type=Path, help="also write the table as CSV here")
    return parser


def _device_list(text: str) -> list[str]:
    devices = [entry.strip() for entry in text.split(",") if entry.strip()]
    if not devices:
        raise argparse.ArgumentTypeError("expected device ids such as 0,1")
    repeated = sorted({device for device in devices if devices.count(device) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"each device once, got {', '.join(repeated)} more than once in {text!r}")
    return devices


def _budgets(text: str) -> tuple[int, ...]:
    try:
        budgets = tuple(int(entry) for entry in text.split(",") if entry.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole GB such as 80,24,12, got {text!r}") from None
    if not budgets or min(budgets) <= 0:
        raise argparse.ArgumentTypeError(f"expected GB above 0 such as 80,24,12, got {text!r}")
    return tuple(sorted(set(budgets), reverse=True))


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        seconds = float(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or a duration such as 25m or 1.5h, got {text!r}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return seconds


def _report_format(output: Path, asked: str | None) -> str:
    """--format, or the one the -o suffix names (html without either); a contradiction is a UserError."""
    implied = SUFFIX_FORMATS.get(output.suffix.lower())
    if asked and implied and asked != implied:
        raise UserError(
            f"-o {output}: a {output.suffix} file, but --format {asked}; name it *.{asked} or drop --format"
        )
    return asked or implied or "html"


def _check_path(path: Path, option: str, folder: bool) -> None:
    """`path`, a folder (`folder`) or a file to write, must be one or creatable as one: no folder where the file
    goes and no file where a folder goes, before any work."""
    if not folder and path.is_dir():
        raise UserError(f"{option} {path}: is a folder; {option} takes the file to write")
    for above in (path, *path.parents) if folder else path.parents:
        if above.exists():
            if not above.is_dir():
                raise UserError(f"{option} {path}: {'it' if above == path else above} is a file, not a folder")
            return


def _warn_of_other_matrices(folder: ResultsFolder, name: str) -> None:
    """Say when the results folder holds rows of matrices other than `name` (a cell id two matrices share is one
    measurement, so such a row counts as done for both)."""
    others = {matrix: cells for matrix, cells in folder.cells_by_matrix().items() if matrix != name}
    if others:
        count = len(set().union(*others.values()))
        logging.getLogger("bench").warning(
            f"{folder.root} also holds rows of matrix {', '.join(map(repr, sorted(others)))} ({count} cell"
            f"{'s' * (count != 1)}); they show in its report, and a cell this matrix shares with it counts as done"
        )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (e.g. `timeout`) stops a run like Ctrl-C: the running cell is killed, rows kept


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    handler = logging.StreamHandler()
    handler.setFormatter(_LibraryNamedFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    for name in IMPORT_NOTICES:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return _dispatch(args)
    except UserError as error:
        print(f"quantbench: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("quantbench: interrupted; finished cells are saved, rerun to resume", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from bench import console

    if args.verb in ("plan", "run"):
        from bench.matrix import load_matrix

        matrix = load_matrix(args.matrix, args.select)
        results_dir = args.results or DEFAULT_RESULTS_ROOT / matrix.name
        _check_path(results_dir, "--results", folder=True)
        from bench.store import ResultsFolder

        _warn_of_other_matrices(ResultsFolder(results_dir), matrix.name)
        if args.verb == "plan":
            from bench.runner import plan

            try:
                ready = plan(matrix)
            except UserError:  # a model or device this machine lacks: the cells are still worth seeing
                console.print_cells(matrix, results_dir)
                raise
            console.print_plan(ready, results_dir)
            return 0
        if args.times_from is not None and not args.times_from.is_dir():  # said before an executor (Ray) starts
            raise UserError(f"--times-from {args.times_from}: no such results folder")
        from bench.executors import make_executor

        executor = make_executor(args.executor, args.address, args.gpus)
        return console.run_with_progress(matrix, results_dir, args.force, executor, args.max_time, args.times_from)
    if args.output:
        _check_path(args.output, "-o", folder=False)
    if args.verb == "report":
        from bench.report import write_report

        report_format = _report_format(args.output, args.format)
        path = write_report(args.results, args.output, args.kernels, report_format, args.budgets)
        print(f"report written to {path}")
        return 0
    from bench.compare import compare_runs

    return compare_runs(args.old, args.new, args.output)

"""The ``gradwatch`` command (also ``python -m gradwatch``).

Exit codes (documented in docs/report.md):

- 0: the report was made (and the ``--fail-on`` gate, if any, passed);
- 1: the ``--fail-on`` gate failed: the last verdict of some module is in the list;
- 2: usage error: unknown option, a LOGDIR that does not exist, a bad ``--fail-on`` list;
- 3: no gradwatch data below the given directories (the message names what was searched);
- 4: an output file (``--html``) could not be written.

Kept light on purpose: nothing here imports torch or Lightning, so the command starts fast
on a machine without the training stack.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gradwatch._base.vocabulary import PROBLEM_VERDICTS

__all__ = ["EXIT_GATE", "EXIT_NO_DATA", "EXIT_OK", "EXIT_OUTPUT", "EXIT_USAGE", "main"]

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_NO_DATA, EXIT_OUTPUT = 0, 1, 2, 3, 4
_ALIASES = {"non-finite": "nonfinite", "nan": "nonfinite"}

_EPILOG = """\
exit codes: 0 ok; 1 --fail-on gate failed; 2 usage error; 3 no gradwatch data found;
4 an output file could not be written.

examples:
  gradwatch report lightning_logs/
  gradwatch report runs/orthogonal runs/default --compare
  gradwatch report lightning_logs/ --html report.html
  gradwatch report lightning_logs/ --fail-on vanishing,exploding,nonfinite
"""


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="gradwatch: gradients through time of recurrent networks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = sub.add_parser(
        "report",
        help="summarise, compare and gate runs from the event files gradwatch wrote",
        description=(
            "Read the TensorBoard event files that gradwatch wrote (GradWatch with a "
            "TensorBoard logger, or Monitor with PanelWriter) below each LOGDIR and report, "
            "per run and recurrent module: the verdict timeline, gain and horizon at the "
            "first and last capture, the dominant cause, clipping and skipped steps, and "
            "where the first non-finite value appeared."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="directory or event file")
    report.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page")
    report.add_argument(
        "--compare", action="store_true", help="runs side by side per module, best marked"
    )
    report.add_argument(
        "--fail-on",
        metavar="VERDICTS",
        default="",
        help="exit 1 when the last verdict of any module is one of these "
        "(comma-separated: vanishing,exploding,nonfinite)",
    )
    report.add_argument("--json", action="store_true", help="print JSON instead of the table")
    report.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour the verdicts (auto: only on a terminal, and not when NO_COLOR is set)",
    )
    return parser, report


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("gradwatch")
    except Exception:
        return "unknown"


def _fail_on(text: str, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    wanted = []
    for item in filter(None, (t.strip().lower() for t in text.split(","))):
        item = _ALIASES.get(item, item)
        if item not in PROBLEM_VERDICTS:
            parser.error(
                f"--fail-on: unknown verdict {item!r}; choose from {', '.join(PROBLEM_VERDICTS)}"
            )
        wanted.append(item)
    return tuple(dict.fromkeys(wanted))


def _use_color(choice: str) -> bool:
    if choice != "auto":
        return choice == "always"
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return sys.stdout.isatty()


def _warn(message: str) -> None:
    print(f"gradwatch report: warning: {message}", file=sys.stderr)


def report_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gradwatch._report.events import read_runs
    from gradwatch._report.model import gate_failures, summarise

    fail_on = _fail_on(args.fail_on, parser)
    for logdir in args.logdirs:
        if not Path(logdir).exists():
            parser.error(f"LOGDIR {logdir!r} does not exist")
    runs, warnings, searched = [], [], []
    for logdir in args.logdirs:
        found, orphan, count = read_runs(Path(logdir), logdir)
        runs.extend(r for r in found if not r.empty)
        warnings.extend(orphan)
        warnings.extend(w for r in found for w in r.warnings)
        searched.append(f"{logdir} ({count} event file{'' if count == 1 else 's'})")
    for w in warnings:
        _warn(w)
    if not runs:
        print(
            "gradwatch report: no gradwatch data found; searched "
            + ", ".join(searched)
            + " for TensorBoard event files with 'gradwatch/' tags (written by GradWatch with "
            "a TensorBoard logger, or by Monitor with PanelWriter)",
            file=sys.stderr,
        )
        return EXIT_NO_DATA
    summaries = [summarise(r) for r in runs]
    failures = gate_failures(summaries, fail_on)
    if args.json:
        from gradwatch._report.jsonout import report_json

        print(
            report_json(
                summaries,
                warnings=warnings,
                fail_on=fail_on,
                failures=failures,
                compare=args.compare,
            )
        )
    else:
        from gradwatch._report.table import compare_text, report_text

        color = _use_color(args.color)
        text = compare_text if args.compare else report_text
        print(text(summaries, color=color))
    if args.html:
        from gradwatch._report.html import report_html

        try:
            Path(args.html).write_text(report_html(summaries, warnings=warnings), "utf-8")
        except OSError as err:
            print(f"gradwatch report: cannot write {args.html}: {err.strerror}", file=sys.stderr)
            return EXIT_OUTPUT
        print(f"gradwatch report: wrote {args.html}", file=sys.stderr)
    for line in failures:
        print(line, file=sys.stderr)
    return EXIT_GATE if failures else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradwatch`` console script (which exits with the returned code)
    and of ``python -m gradwatch``."""
    parser, report_parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "report":
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return report_main(args, report_parser)
    except BrokenPipeError:  # `gradwatch report ... | head`
        return EXIT_OK

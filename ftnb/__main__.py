"""Command line: python -m ftnb {run,list,check,env} ...

Usage:
    python -m ftnb run notebooks/00_quickstart.ipynb --preset smoke -p max_steps 20
    python -m ftnb list                 # notebooks, their presets and parameters
    python -m ftnb check notebooks/*.ipynb
    python -m ftnb env
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


def _run(args) -> int:
    from ftnb.runner import NotebookFailed, ParameterError, run_notebook

    overrides = {key: yaml.safe_load(value) for key, value in args.param}
    try:
        result = run_notebook(args.notebook, args.preset, overrides, args.output_dir,
                              cell_timeout=args.cell_timeout)
    except ParameterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NotebookFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"executed notebook: {result.output_notebook}")
    print(f"metrics:           {result.run_dir / 'metrics.json'}")
    return 0


def _list(args) -> int:
    from ftnb.runner import NOTEBOOKS_DIR, notebook_parameters, presets_for

    for nb in sorted(NOTEBOOKS_DIR.glob("*.ipynb")):
        print(f"{nb.name}  presets: {', '.join(presets_for(nb)) or '-'}")
        for name, info in notebook_parameters(nb).items():
            print(f"    {name} = {info['default']}")
    return 0


def _check(args) -> int:
    from ftnb.conventions import check_notebook

    bad = 0
    for nb in args.notebooks:
        problems = check_notebook(nb)
        bad += bool(problems)
        for p in problems:
            print(f"{nb}: {p}")
    print(f"{len(args.notebooks) - bad} notebooks ok, {bad} with problems")
    return 1 if bad else 0


def _env(args) -> int:
    from ftnb.env import report

    report()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftnb", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute a notebook with papermill")
    run.add_argument("notebook", type=Path)
    run.add_argument("--preset", help="smoke, cpu, t4 or gpu (see notebooks/presets.yaml)")
    run.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                     help="override one parameter; VALUE is read as YAML (3, 1e-4, true, [a, b])")
    run.add_argument("--output-dir", type=Path, help="default runs/<notebook>/<timestamp>-<preset>")
    run.add_argument("--cell-timeout", type=int, help="seconds per cell")
    run.set_defaults(func=_run)
    sub.add_parser("list", help="notebooks, presets and parameters").set_defaults(func=_list)
    check = sub.add_parser("check", help="check notebook conventions")
    check.add_argument("notebooks", nargs="+", type=Path)
    check.set_defaults(func=_check)
    sub.add_parser("env", help="print the environment report").set_defaults(func=_env)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

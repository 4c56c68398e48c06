"""Command line: python -m ftnb {run,sweep,list,check,env,serve} ...

Usage:
    python -m ftnb run 00_quickstart --preset smoke -p max_steps 20 -p learning_rate 1e-3
    python -m ftnb run 01 --resume runs/01_ticket_classification/20261202-070000-cpu   # after a disconnect
    python -m ftnb list                 # notebooks, their presets and parameters
    python -m ftnb check notebooks/*.ipynb
    python -m ftnb env
    python -m ftnb serve runs/x/adapter legal=runs/y/adapter --port 8000   # OpenAI-compatible HTTP server
    python -m ftnb sweep 01 --preset sweep --grid learning_rate=1e-4,1e-3 --grid lora_r=4,16 --seeds 3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _run(args) -> int:
    from ftnb.runner import NotebookFailed, RunInterrupted, UsageError, run_notebook

    # Values stay strings here: the runner reads each against the type of the parameter's default.
    overrides = dict(args.param)
    try:
        result = run_notebook(args.notebook, args.preset, overrides, args.output_dir,
                              cell_timeout=args.cell_timeout, force=args.force, resume=args.resume)
    except (UsageError, NotebookFailed, RunInterrupted) as e:  # a line to act on, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"executed notebook: {result.output_notebook}")
    print(f"metrics:           {result.run_dir / 'metrics.json'}")
    print(f"run record:        {result.run_dir / 'run.json'}")
    return 0


def _sweep(args) -> int:
    from ftnb.runner import UsageError
    from ftnb.sweep import parse_grid_option, read_grid_file, run_sweep

    try:
        grid = read_grid_file(args.grid_file) if args.grid_file else {}
        grid.update(parse_grid_option(option) for option in args.grid)
        table = run_sweep(args.notebook, args.preset, grid, args.seeds, dict(args.param), args.sweep_dir,
                          args.jobs, args.cell_timeout)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0 if (table["status"] == "ok").all() else 1


def _list(args) -> int:
    from ftnb.runner import NOTEBOOKS_DIR, presets_for, typed_parameters

    for nb in sorted(NOTEBOOKS_DIR.glob("*.ipynb")):
        print(f"{nb.stem}  presets: {', '.join(presets_for(nb)) or '-'}")
        for p in typed_parameters(nb).values():
            print(f"    {p.name} = {p.default!r}  ({p.describe_kind()})")
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


def _serve(args) -> int:
    from ftnb.serve import serve

    try:
        serve(args.models, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
              max_new_tokens_limit=args.max_new_tokens_limit, batch_wait_ms=args.batch_wait_ms)
    except (FileNotFoundError, ValueError) as e:  # a folder that is not a saved model, a clash of names
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _add_param_option(parser: argparse.ArgumentParser, help: str) -> None:
    """-p KEY VALUE, repeatable: parameter overrides, read later against each parameter's type."""
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help=help)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftnb", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="execute a notebook with papermill",
        epilog="exit codes: 0 ok, 1 a cell raised, 2 bad input (nothing ran), 3 the kernel died (often out of "
               "memory), 4 a cell timed out, 130 Ctrl-C, 143 SIGTERM; run.json in the run folder says the same")
    run.add_argument("notebook", help="a path, or a notebook's name in notebooks/ (00_quickstart, or just 00)")
    run.add_argument("--preset", help="smoke, cpu, t4 or gpu (see notebooks/presets.yaml)")
    _add_param_option(run, "override one parameter; VALUE must fit the type of the parameter's default: "
                           "3, 1e-4, true, some/model-id, [a, b]")
    run.add_argument("--output-dir", type=Path,
                     help="the run folder (default: a new runs/<notebook>/<timestamp>-<preset>); it must be "
                          "new or empty")
    run.add_argument("--force", action="store_true",
                     help="reuse a non-empty --output-dir: its earlier metrics.json, run.json, progress.json "
                          "and executed notebook are deleted first; other files stay and may be overwritten")
    run.add_argument("--cell-timeout", type=int, help="seconds per cell")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue a run that stopped: run the notebook again in RUN_DIR with the parameters its "
                          "run.json recorded and resume=True (the notebook continues from its last checkpoint); "
                          "the earlier executed notebook is kept")
    run.set_defaults(func=_run)
    sweep = sub.add_parser(
        "sweep", help="run a notebook once per combination of a parameter grid (see ftnb.sweep)",
        epilog="re-running the same command runs only the combinations without a successful run; "
               "exit code 0 when every run succeeded, 1 when one failed, 2 for bad input")
    sweep.add_argument("notebook", help="a path, or a notebook's name in notebooks/")
    sweep.add_argument("--preset", help="the preset every run starts from")
    sweep.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                       help="a parameter and its values (repeat for more parameters): every combination runs")
    sweep.add_argument("--grid-file", type=Path, help="a YAML file {parameter: [values]}; --grid adds to it")
    sweep.add_argument("--seeds", type=int, default=0, help="run each combination with seed 0..N-1")
    _add_param_option(sweep, "a value every run gets on top of the preset")
    sweep.add_argument("--sweep-dir", type=Path,
                       help="the sweep folder (default: runs/sweeps/<notebook>-<preset>); results.csv is written there")
    sweep.add_argument("--jobs", type=int, default=1, help="runs at a time, each on its share of the cores")
    sweep.add_argument("--cell-timeout", type=int, help="seconds per cell")
    sweep.set_defaults(func=_sweep)
    sub.add_parser("list", help="notebooks, presets and parameters").set_defaults(func=_list)
    check = sub.add_parser("check", help="check notebook conventions")
    check.add_argument("notebooks", nargs="+", type=Path)
    check.set_defaults(func=_check)
    sub.add_parser("env", help="print the environment report").set_defaults(func=_env)
    serve = sub.add_parser("serve", help="serve saved models over an OpenAI-compatible HTTP API (see ftnb.serve)")
    serve.add_argument("models", nargs="+", metavar="FOLDER_OR_NAME=FOLDER",
                       help="folders saved by ftnb; NAME=FOLDER serves it as NAME (default: the folder's name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch-size", type=int, default=16, help="requests generated together at most")
    serve.add_argument("--batch-wait-ms", type=float, default=20.0,
                       help="how long a request waits for others to batch with (a CPU step takes far longer)")
    serve.add_argument("--max-new-tokens-limit", type=int, default=512, help="the largest max_tokens accepted")
    serve.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""``structure-sweep``: run, validate, report and inspect alignment sweeps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.config import SpecError


def _validate(args) -> int:
    from orchestrator.planning import count_trials
    from orchestrator.spec import load_spec

    spec = load_spec(args.spec)
    layers = _known_layer_counts(spec)
    try:
        count = count_trials(spec, layers)
        print(f"{args.spec}: OK, {count} trials in {len(spec.search)} grid(s)"
              + (f" ({layers[0]} image x {layers[1]} text layers)" if layers else ""))
    except ValueError:
        print(f"{args.spec}: OK; the trial count depends on the encoders' layer counts "
              "(known once features are extracted)")
    return 0


def _known_layer_counts(spec) -> tuple[int, int] | None:
    """Layer counts that are known without loading a model (synthetic encoders)."""
    counts = []
    for enc in (spec.encoders.image, spec.encoders.text):
        if not enc.name.startswith("synthetic:"):
            return None
        counts.append(int(enc.options.get("layers", 6)))
    return tuple(counts)


def _run(args) -> int:
    from dashboards.report import write_report
    from orchestrator.spec import load_spec
    from orchestrator.sweep import run_sweep

    overrides = {"output_dir": args.out} if args.out else {}
    spec = load_spec(args.spec, overrides)
    print(f"sweep {spec.name!r} -> {spec.run_dir}")
    outcome = run_sweep(spec, address=args.address, dashboard=args.dashboard,
                        num_cpus=args.num_cpus)
    print(f"trials: {outcome.finished} finished, {outcome.failed} failed, "
          f"{outcome.skipped} skipped (already in the store); features: "
          f"{outcome.features_computed} computed, {outcome.features_cached} from cache")
    if outcome.finished == 0 and outcome.features_computed == 0:
        print("nothing to do: every trial was already finished and no encoder ran")
    report = write_report(outcome.run_dir)
    print(f"report: {report}")
    return 1 if outcome.failed else 0


def _report(args) -> int:
    from dashboards.report import write_report

    print(f"report: {write_report(Path(args.run_dir), args.output)}")
    return 0


def _status(args) -> int:
    from orchestrator.status import run_status

    print(run_status(Path(args.run_dir)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structure-sweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a sweep spec to a finished report")
    run.add_argument("spec")
    run.add_argument("--address", help="Ray cluster to join (default: start a local one on 127.0.0.1)")
    run.add_argument("--out", help="run directory (default: the spec's output_dir or runs/<name>)")
    run.add_argument("--dashboard", action="store_true", help="start the Ray dashboard on 127.0.0.1")
    run.add_argument("--num-cpus", type=int, help="CPUs of a local cluster (default: all)")
    run.set_defaults(func=_run)
    validate = sub.add_parser("validate", help="check a spec and print its trial count")
    validate.add_argument("spec")
    validate.set_defaults(func=_validate)
    report = sub.add_parser("report", help="write the HTML report of a run directory")
    report.add_argument("run_dir")
    report.add_argument("-o", "--output", help="HTML file (default: RUN_DIR/report.html)")
    report.set_defaults(func=_report)
    status = sub.add_parser("status", help="trials done/failed/pending and the best so far")
    status.add_argument("run_dir")
    status.set_defaults(func=_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as err:
        print(f"error: invalid spec: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

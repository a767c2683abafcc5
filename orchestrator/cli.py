"""``structure-sweep``: run, validate, report and inspect alignment sweeps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.config import SpecError


def _validate(args) -> int:
    """Every check that needs no Ray (the spec's own, then the world's: layer
    counts, dataset sizes and paths, model names), then what the run plans."""
    from orchestrator.spec import load_spec
    from orchestrator.trial_counts import count_plan
    from orchestrator.validate_report import report_lines
    from orchestrator.validation import check_world

    spec = load_spec(args.spec)
    world = check_world(spec)
    print("\n".join(report_lines(spec, world, count_plan(spec, world.num_layers))))
    return 0


def _run(args) -> int:
    from orchestrator.spec import load_spec

    overrides = {"output_dir": args.out} if args.out else {}
    return _sweep(load_spec(args.spec, overrides), args)


def _resume(args) -> int:
    from orchestrator.spec import load_run_spec

    return _sweep(load_run_spec(args.run_dir), args)


def _sweep(spec, args) -> int:
    from dashboards.report import write_report
    from orchestrator.cluster import LOOPBACK
    from orchestrator.driver import run_sweep
    from orchestrator.progress import make_display

    print(f"sweep {spec.name!r} -> {spec.run_dir}", flush=True)
    # a live panel on a terminal, rate-limited summary lines in a log (CI, ray job)
    display = make_display(args.progress, title=f"sweep {spec.name}",
                           interval=args.progress_interval)
    with display:
        outcome = run_sweep(spec, address=args.address, dashboard=args.dashboard,
                            num_cpus=args.num_cpus, metrics_port=args.metrics_port,
                            bind=args.bind or LOOPBACK, log=display.log,
                            on_progress=display.changed)
    print(f"trials: {outcome.finished} finished"
          + (f" ({outcome.stopped} stopped early)" if outcome.stopped else "")
          + f", {outcome.failed} failed, "
          f"{outcome.skipped} skipped (already in the store); features: "
          f"{outcome.features_computed} computed, {outcome.features_cached} from cache")
    if outcome.finished == 0 and outcome.failed == 0 and outcome.features_computed == 0:
        print("nothing to do: every trial was already finished and no encoder ran")
    if not args.no_report:
        print(f"report: {write_report(outcome.run_dir)}")
    return 1 if outcome.failed else 0


def _compact(args) -> int:
    from orchestrator.results import ResultsStore

    store = ResultsStore(Path(args.run_dir))
    for table in ("trials", "layer_similarity"):
        before = len(store.files(table))
        store.compact(table)
        print(f"{table}: {before} -> {len(store.files(table))} part file(s)")
    return 0


def _report(args) -> int:
    from dashboards.report import watch, write_report

    if args.watch:  # rewrite the page while the sweep runs; stops when it finishes
        print(f"report: {watch(Path(args.run_dir), args.output, args.interval)}")
    else:
        print(f"report: {write_report(Path(args.run_dir), args.output)}")
    return 0


def _status(args) -> int:
    from orchestrator.status import run_status, watch_status

    if not args.watch:
        print(run_status(Path(args.run_dir)))
        return 0
    try:  # until no planned trial is pending; Ctrl-C leaves the last view on screen
        watch_status(Path(args.run_dir), interval=args.interval)
    except KeyboardInterrupt:
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structure-sweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a sweep spec to a finished report")
    run.add_argument("spec")
    run.add_argument("--out", help="run directory (default: the spec's output_dir or runs/<name>)")
    _cluster_options(run)
    run.set_defaults(func=_run)
    resume = sub.add_parser("resume", help="run what is missing in a run directory "
                                           "(its spec.json; finished trials are skipped)")
    resume.add_argument("run_dir")
    _cluster_options(resume)
    resume.set_defaults(func=_resume)
    validate = sub.add_parser("validate", help="check a spec and print its trial count")
    validate.add_argument("spec")
    validate.set_defaults(func=_validate)
    report = sub.add_parser("report", help="write the HTML report of a run directory")
    report.add_argument("run_dir")
    report.add_argument("-o", "--output", help="HTML file (default: RUN_DIR/report.html)")
    report.add_argument("--watch", action="store_true",
                        help="regenerate the report periodically until the sweep finishes")
    report.add_argument("--interval", type=float, default=30.0,
                        help="seconds between regenerations with --watch (default: 30)")
    report.set_defaults(func=_report)
    status = sub.add_parser("status", help="trials done/failed/pending and the best so far")
    status.add_argument("run_dir")
    status.add_argument("--watch", action="store_true",
                        help="refresh until no planned trial is pending (or Ctrl-C); "
                             "reads the store only, with or without a running driver")
    status.add_argument("--interval", type=float, default=5.0,
                        help="seconds between refreshes with --watch (default: 5)")
    status.set_defaults(func=_status)
    compact = sub.add_parser("compact", help="merge a run's result part files (safe to interrupt)")
    compact.add_argument("run_dir")
    compact.set_defaults(func=_compact)
    return parser


def _cluster_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster to join, e.g. auto or ray://head:10001 "
                                          "(default: start a local one on 127.0.0.1)")
    parser.add_argument("--dashboard", action="store_true",
                        help="start the Ray dashboard on 127.0.0.1 and print its URL")
    parser.add_argument("--metrics-port", type=int,
                        help="port of a local cluster's Prometheus endpoint (/metrics)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local cluster (default: all)")
    parser.add_argument("--bind", type=_bind_address, default=None, metavar="ADDRESS",
                        help="where a local cluster listens (default: 127.0.0.1, this machine "
                             "only); 0.0.0.0: every interface, so other machines can join "
                             "(Ray's servers then listen on every interface for any address "
                             "but 127.0.0.1)")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    parser.add_argument("--progress", choices=("auto", "live", "plain"), default="auto",
                        help="live: a progress panel redrawn in place; plain: a summary line "
                             "(done, rate, ETA, best) every --progress-interval s; "
                             "auto: live on a terminal, else plain")
    parser.add_argument("--progress-interval", type=float, default=10.0, metavar="S",
                        help="seconds between plain summary lines (default: 10)")


def _bind_address(value: str) -> str:
    import ipaddress

    if value == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an IP address (e.g. 127.0.0.1, 0.0.0.0)") from None


def _check_options(parser: argparse.ArgumentParser, args) -> None:
    """Options that contradict each other, rejected before any work starts."""
    if getattr(args, "bind", None) and getattr(args, "address", None):
        parser.error("--bind applies to the local cluster this tool starts; a cluster given "
                     "with --address listens where it was started (ray start --node-ip-address)")


def _cause_message(err: BaseException) -> str:
    """The message of what went wrong inside a Ray task/actor, without Ray's wrapping:
    the original exception (``err.cause``, followed through nested task errors),
    else the last line of Ray's text (its traceback ends with the cause)."""
    from ray.exceptions import RayError

    for _ in range(10):
        cause = getattr(err, "cause", None)
        if not isinstance(cause, BaseException) or cause is err:
            break
        err = cause
    if not isinstance(err, RayError):
        return str(err) or type(err).__name__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _user_errors() -> tuple[type, ...]:
    """Errors with a message meant for the user (printed without a traceback)."""
    from orchestrator.actors import EncoderActorDied
    from orchestrator.cluster import BindError
    from orchestrator.datasets import DatasetError
    from orchestrator.durable import DiskFull
    from orchestrator.encoders import EncoderWeightsMissing
    from orchestrator.driver import RunDirBusy
    from orchestrator.results import DamagedPartFile

    return (EncoderWeightsMissing, DatasetError, RunDirBusy, BindError, EncoderActorDied,
            DiskFull, DamagedPartFile, FileNotFoundError, ValueError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_options(parser, args)
    try:
        return args.func(args)
    except SpecError as err:
        print(f"error: invalid spec: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 -- re-raised below unless it is a user error
        from ray.exceptions import RayActorError, RayTaskError

        if isinstance(err, (RayTaskError, RayActorError)):  # raised inside an actor/task
            print(f"error: {_cause_message(err)}", file=sys.stderr)
            return 2
        if isinstance(err, _user_errors()):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

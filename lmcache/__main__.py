"""Command line: ``python -m lmcache bench`` (benchmark and self-check), ``python -m lmcache replay``
(eviction policies on a request trace), ``python -m lmcache serve`` (one shared cache for every process of a
machine) and ``python -m lmcache info``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _shape(text: str) -> tuple[int, int, int, int, int]:
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if len(dims) != 5:
        raise argparse.ArgumentTypeError(f"a chunk shape takes 5 ints L,2,tokens,H,D, got {text!r}")
    return dims  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (1 when the self-check fails)."""
    from lmcache import bench
    from lmcache.errors import ConfigError
    from lmcache.shared import serve

    parser = argparse.ArgumentParser(prog="python -m lmcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, installed backends and accelerators")
    info.add_argument("--json", action="store_true", help="print JSON")
    run = commands.add_parser("bench", help="self-check, then benchmark every installed backend")
    run.add_argument("--shape", type=_shape, default=bench.DEFAULT_SHAPE, help="chunk shape L,2,tokens,H,D")
    run.add_argument("--dtype", default="bfloat16", help="element type (default bfloat16)")
    run.add_argument("--pool-gib", type=float, default=2.0, help="pool size in GiB (default 2)")
    run.add_argument(
        "--backend",
        action="append",
        choices=["numpy", "torch", "jax"],
        help="benchmark this backend (repeatable; default: every installed one)",
    )
    run.add_argument("--repeat", type=int, default=7, help="interleaved trials; the best counts")
    run.add_argument("--ops", type=int, default=50_000, help="operations per timing trial")
    run.add_argument("--big-pool-gib", type=float, default=16.0, help="size of the construction test")
    run.add_argument(
        "--disk-dir", help="where the disk tier's section writes (default: a temporary directory)"
    )
    run.add_argument("--quick", action="store_true", help="fewer operations and trials (a smoke run)")
    run.add_argument(
        "--trace",
        default=None,
        help="Mooncake trace for the shared cache's hit rate (default: the project's)",
    )
    run.add_argument(
        "--section",
        action="append",
        choices=list(bench.SECTIONS),
        help="run only this section (repeatable; default: all); the self-check always runs",
    )
    run.add_argument("--json", action="store_true", help="print JSON instead of the summary")
    run.add_argument("--full", action="store_true", help="print the full table, not only the summary")
    run.add_argument(
        "--out",
        default="lmcache-bench",
        help="directory for the full table, JSON and plot (default ./lmcache-bench)",
    )
    run.add_argument(
        "--loaded",
        action="store_true",
        help="also rerun the headline sections beside busy processes and report both",
    )
    run.add_argument("--load-procs", type=int, default=1, help="busy processes for --loaded (default 1)")
    from lmcache import replay

    replay.add_arguments(
        commands.add_parser("replay", help="token hit rate of eviction policies on a request trace")
    )
    serve.add_parser(commands, _shape)
    args = parser.parse_args(argv)
    if args.command == "replay":
        try:
            return replay.run(args)
        except ConfigError as exc:
            parser.exit(2, f"python -m lmcache replay: {exc}\n")

    if args.command == "serve":
        return serve.run(args)
    if args.command == "info":
        environment = bench.environment()
        if args.json:
            import json

            print(json.dumps(environment, indent=2))
        else:
            for key, value in environment.items():
                print(f"{key}: {value}")
        return 0

    opts = bench.Options(
        shape=args.shape,
        dtype=args.dtype,
        pool_gib=args.pool_gib,
        backends=args.backend or (),
        repeat=2 if args.quick else args.repeat,
        ops=2_000 if args.quick else args.ops,
        big_pool_gib=1.0 if args.quick else args.big_pool_gib,
        loaded=args.loaded,
        load_procs=args.load_procs,
        disk_dir=args.disk_dir,
        trace=args.trace,
        sections=args.section or (),
    )
    results, failures = bench.run(opts)
    paths = bench.write_report(results, failures, args.out)
    if args.json:
        print(bench.to_json(results, failures))
    else:
        for key, value in bench.environment().items():
            print(f"- {key}: {value}")
        print()
        print(bench.format_table(results) if args.full else bench.summary(results))
        print()
        print("self-check: " + ("PASS" if not failures else "FAIL"))
        for failure in failures:
            print(f"  - {failure}")
        print()
        print(f"full table: {paths['table']}")
        print(f"JSON: {paths['json']}")
        print(f"plot: {paths.get('plot', 'not drawn (pip install matplotlib)')}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

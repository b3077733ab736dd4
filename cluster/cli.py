"""The ``tpserve`` command.

    tpserve plan MODEL --tp N          how each weight matrix is split over N ranks, and what moves
    tpserve convert [MODEL]            turn the default model's GGUF into a checkpoint directory (once)

Errors a user can fix (a bad config, a missing model) print one line and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys

from cluster.model_store import DEFAULT_MODEL


class UsageError(Exception):
    """A problem the user can fix; printed as one line."""


def _plan(args) -> None:
    from cluster.model_store import resolve_model
    from sharding.arch import ModelConfig
    from sharding.loader import Checkpoint
    from sharding.plan import ShardingPlan
    from sharding.report import format_plan

    path = resolve_model(args.model)
    cfg = ModelConfig.from_dir(path)
    plan = ShardingPlan.build(cfg, args.tp, Checkpoint(path).names)
    print(format_plan(plan, args.dtype))


def _convert(args) -> None:
    from cluster.model_store import resolve_model

    print(resolve_model(args.model))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpserve", description="Tensor-parallel LLM inference cluster")
    sub = p.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="show how a model's weights split over N ranks")
    plan.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="alias or checkpoint directory")
    plan.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    plan.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    plan.set_defaults(run=_plan)

    convert = sub.add_parser("convert", help="convert the default model from its GGUF (cached)")
    convert.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    convert.set_defaults(run=_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"tpserve {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

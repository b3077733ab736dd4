"""The ``tpserve`` command.

    tpserve serve CONFIG               start the replicas and serve gRPC until SIGINT / SIGTERM
    tpserve generate PROMPT            stream a completion from a running server to the terminal
    tpserve generate --chat --json "Hi"   the prompt as a user turn; one JSON object as the result
    tpserve health                     SERVING / NOT_SERVING and each replica (exit 0 only if SERVING)
    tpserve plan MODEL --tp N          how each weight matrix is split over N ranks, and what moves
    tpserve convert [MODEL]            turn the default model's GGUF into a checkpoint directory (once)

`generate` and `health` reach a server with TLS and bearer tokens through --tls-ca (or --tls for
the system's roots), --tls-cert/--tls-key (mutual TLS) and --token-file; without --token-file the
token comes from $TPSERVE_TOKEN when set. A token is never an argument: argv is visible to every
user of the machine.

Errors a user can fix (a bad config, a missing model, a rejected request) print one line and exit
2; a bad config prints exactly the config error's one line. A server that cannot be reached or
fails a call exits 1. No traceback in either case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cluster.model_store import DEFAULT_MODEL

TOKEN_ENV = "TPSERVE_TOKEN"  # the token for generate and health when --token-file is not given


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


def _serve(args) -> None:
    import logging

    from cluster.config import load_config
    from cluster.server import run

    cfg = load_config(args.config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run(cfg, grace_s=args.grace)


def _generate(args) -> None:
    if args.chat:
        turns = [("system", args.system)] if args.system else []
        inputs = {"messages": turns + [("user", args.prompt)]}
    else:
        inputs = {"prompt": args.prompt}
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, seed=args.seed, stop=args.stop or None,
                    ignore_eos=args.ignore_eos or None)
    with _client(args) as client:
        if args.json:
            print(json.dumps(client.generate(**inputs, **sampling).to_dict(), ensure_ascii=False))
            return
        for delta in client.stream(**inputs, **sampling):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")


def _health(args) -> int:
    with _client(args) as client:
        status = client.health()
        print(status)
        for r in client.model_info().replicas:
            print(_replica_line(r))
    return 0 if status == "SERVING" else 1


def _client(args):
    from cluster.client import Client, TLSOptions, read_token_file

    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        tls = TLSOptions(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key)
    if args.token_file:
        token = read_token_file(args.token_file)
    else:
        token = os.environ.get(TOKEN_ENV, "").strip() or None
    return Client(args.address, timeout=args.timeout, tls=tls, token=token)


def _replica_line(r) -> str:
    nodes = sorted({p.node_id[:8] for p in r.ranks})
    where = f"{len(r.ranks)} ranks on node{'s' if len(nodes) > 1 else ''} {', '.join(nodes)}"
    if not r.healthy:
        return f"replica {r.replica_id}: UNHEALTHY ({where}): {r.message}"
    return (f"replica {r.replica_id}: healthy ({where}); running {r.running_requests}, "
            f"waiting {r.waiting_requests}, KV blocks {r.kv_blocks_used}/{r.kv_blocks_total}")


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

    serve = sub.add_parser("serve", help="serve a deployment config over gRPC")
    serve.add_argument("config", help="deployment YAML, e.g. configs/default.yaml")
    serve.add_argument("--grace", type=float, default=5.0,
                       help="seconds requests in flight get to finish at shutdown (default 5)")
    serve.set_defaults(run=_serve)

    gen = sub.add_parser("generate", help="generate from a running server (streams by default)")
    gen.add_argument("prompt")
    _address_flags(gen, timeout=None)
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user chat turn")
    gen.add_argument("--system", help="with --chat: a system turn before it")
    gen.add_argument("--max-tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object (text, token_ids, finish_reason, usage) at the end")
    gen.set_defaults(run=_generate)

    health = sub.add_parser("health", help="the server's health and each replica's state")
    _address_flags(health, timeout=5.0)
    health.set_defaults(run=_health)
    return p


def _address_flags(p: argparse.ArgumentParser, timeout: float | None) -> None:
    p.add_argument("--address", default="127.0.0.1:50051", help="server host:port (default %(default)s)")
    p.add_argument("--timeout", type=float, default=timeout, help="deadline in seconds")
    p.add_argument("--tls", action="store_true", help="connect over TLS, verifying the server "
                   "against the system's CA certificates (implied by the --tls-* options)")
    p.add_argument("--tls-ca", metavar="PEM", help="CA certificate(s) that signed the server's")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate, for mutual TLS")
    p.add_argument("--tls-key", metavar="PEM", help="the client certificate's private key")
    p.add_argument("--token-file", metavar="FILE", help=f"file holding the bearer token "
                   f"(default: ${TOKEN_ENV} when set)")


def main(argv: list[str] | None = None) -> int:
    from cluster.client import TPServeError
    from cluster.config import ConfigError

    args = parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except ConfigError as err:
        print(err, file=sys.stderr)  # already one line naming the file and the field
        return 2
    except TPServeError as err:
        print(f"tpserve {args.command}: error: {err}", file=sys.stderr)
        return 2 if err.code.name in _USER_ERROR_CODES else 1
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"tpserve {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # DeploymentError, ServeError: the cluster or the port
        print(f"tpserve {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


_USER_ERROR_CODES = {"INVALID_ARGUMENT", "UNIMPLEMENTED"}  # the request itself needs changing


if __name__ == "__main__":
    sys.exit(main())

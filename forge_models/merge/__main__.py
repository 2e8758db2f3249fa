"""Run a mergekit-format recipe from the shell (the library entry point the `forge merge` command can wrap).

    .venv/bin/python -m forge_models.merge --config recipe.yaml --out out/merged [--seed 0] [--shard-gb 5]
                                           [--chunk-mib 4] [--overwrite]

Prints one JSON line: method, tensors, layers, bytes read and written, seconds, files.
"""

from __future__ import annotations

import argparse
import json
import sys

from forge_models.merge.chunked import DEFAULT_CHUNK_BYTES
from forge_models.merge.streaming import DEFAULT_SHARD_BYTES, merge_models
from forge_models.runtime import ForgeError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m forge_models.merge", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="recipe YAML (mergekit format)")
    ap.add_argument("--out", required=True, help="output folder (must be empty or absent unless --overwrite)")
    ap.add_argument("--seed", type=int, default=0, help="seed of DARE / DELLA masks (per tensor, order-independent)")
    ap.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1e9,
                    help="largest shard in GB (memory use does not depend on it)")
    ap.add_argument("--chunk-mib", type=float, default=DEFAULT_CHUNK_BYTES / 2**20,
                    help="merge tensors in row chunks of this many MiB per input (sets peak memory)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing model folder at --out")
    args = ap.parse_args(argv)
    try:
        result = merge_models(args.config, args.out, seed=args.seed, max_shard_bytes=int(args.shard_gb * 1e9),
                              chunk_bytes=int(args.chunk_mib * 2**20), overwrite=args.overwrite)
    except ForgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"method": result.method, "tensors": result.num_tensors, "layers": result.num_layers,
                      "input_bytes": result.input_bytes, "bytes_read": result.bytes_read, "bytes_written": result.bytes_written,
                      "seconds": round(result.seconds, 3), "files": list(result.files)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

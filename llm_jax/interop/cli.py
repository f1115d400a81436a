"""`llm-jax convert`: its arguments and its body.

Only argparse at import time, so the `llm-jax` parser can add the subcommand without
importing JAX or the hf extra; `main_convert` imports what it needs when it runs.
"""

from __future__ import annotations

import argparse

DTYPES = ("float32", "bfloat16")


def add_convert_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `llm-jax convert --from-hf HF_DIR --out RUN_DIR` / `--to-hf RUN_DIR --out HF_DIR`."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="HF_DIR",
                        help="import a Hugging Face checkpoint directory (config.json + safetensors + tokenizer)")
    source.add_argument("--to-hf", metavar="RUN_DIR", help="export an llm_jax run directory's checkpoint")
    p.add_argument("--out", required=True,
                   help="the run directory to write (--from-hf) or the Hugging Face directory (--to-hf)")
    p.add_argument("--step", type=int, default=None, help="--to-hf: checkpoint step (default: the newest)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="parameter dtype (default: as stored)")
    p.add_argument("--unscanned", action="store_true",
                   help="--from-hf: model.scan_layers=false (parameters layers_0 ... layers_{L-1})")
    p.add_argument("--fsdp", type=int, default=1, help="--from-hf: split the weights over this many devices")
    p.add_argument("--tensor", type=int, default=1, help="--from-hf: tensor-parallel devices for the weights")
    p.add_argument("--max-shard-bytes", type=int, default=5 * 10**9,
                   help="--to-hf: largest safetensors file before the weights are split into shards")


def main_convert(args: argparse.Namespace) -> int:
    """Run one conversion; errors are InteropError (a ValueError) or FileNotFoundError."""
    from llm_jax.interop.convert import convert_from_hf, convert_to_hf
    from llm_jax.interop.hf_config import InteropError, read_hf_config

    if args.from_hf is not None:
        if args.step is not None:
            raise InteropError("--step applies to --to-hf only (an import is written as step 0)")
        out = convert_from_hf(args.from_hf, args.out, mesh=_mesh(args.fsdp, args.tensor),
                              scan_layers=not args.unscanned, param_dtype=args.dtype)
        model_type = read_hf_config(args.from_hf)["model_type"]
        print(f"wrote llm_jax run directory {out} (step 0) from {args.from_hf} (model_type {model_type})")
    else:
        if (args.fsdp, args.tensor, args.unscanned) != (1, 1, False):
            raise InteropError("--fsdp, --tensor and --unscanned apply to --from-hf only")
        out = convert_to_hf(args.to_hf, args.out, step=args.step, dtype=args.dtype,
                            max_shard_bytes=args.max_shard_bytes)
        print(f"wrote Hugging Face checkpoint {out} from {args.to_hf}")
    return 0


def _mesh(fsdp: int, tensor: int):
    """None (one device) unless the weights are to be split; the rest of the devices replicate."""
    if fsdp == tensor == 1:
        return None
    from llm_jax.config import MeshConfig
    from llm_jax.parallel import make_mesh

    return make_mesh(MeshConfig(data=-1, fsdp=fsdp, tensor=tensor))

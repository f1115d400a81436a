"""The `llm-jax prepare` command line: argparse only at import (nothing heavy is loaded)."""

from __future__ import annotations

import sys


def add_prepare_args(p) -> None:
    """The `llm-jax prepare` arguments (argparse only; nothing heavy is imported)."""
    p.add_argument("--input", required=True, help="a directory (one document per file), a .jsonl file, a text "
                                                  "file (one document), or a tfds dataset name with --format tfds")
    p.add_argument("--out", required=True, help="output directory: report.json and the tfds dataset")
    p.add_argument("--chain", default="web", help="a JSON chain file or a preset (web, code); default web")
    p.add_argument("--format", default="auto", choices=("auto", "directory", "text", "jsonl", "tfds"))
    p.add_argument("--text-field", default="text", help="JSONL / tfds text field (default text)")
    p.add_argument("--extensions", default=None, help="comma-separated, e.g. .txt,.md (directories; default all files)")
    p.add_argument("--tfds-data-dir", default=None, help="where the --format tfds dataset is prepared")
    p.add_argument("--tfds-split", default="train")
    p.add_argument("--name", default="curated", help="name of the output dataset (data.tfds_name)")
    p.add_argument("--validation-fraction", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=1, help="worker processes for the per-document steps")
    p.add_argument("--runner", default="local", choices=("local", "beam"),
                   help="local processes, or an Apache Beam pipeline (the beam extra)")
    p.add_argument("--beam-arg", action="append", default=[], metavar="ARG",
                   help="Beam pipeline option, e.g. --beam-arg=--runner=DirectRunner (repeat)")


def main_prepare(args) -> int:
    from llm_jax.data.curation.prepare import REPORT_FILE, prepare

    extensions = [e.strip() for e in args.extensions.split(",")] if args.extensions else None
    result = prepare(args.input, args.out, args.chain, name=args.name, input_format=args.format,
                     text_field=args.text_field, extensions=extensions, tfds_data_dir=args.tfds_data_dir,
                     tfds_split=args.tfds_split, validation_fraction=args.validation_fraction,
                     workers=args.workers, runner=args.runner, beam_args=args.beam_arg)
    print(result.report.table())
    print(f"\nreport: {result.data_dir / REPORT_FILE}\ntrain on it: {result.train_command()}", file=sys.stderr)
    return 0

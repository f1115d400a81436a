"""The `llm-jax` command.

    llm-jax prepare  --input RAW --out DIR [--chain FILE|web|code]   curate a corpus (filters, dedup, scrubbing)
    llm-jax expand-vocab --checkpoint RUN_DIR --token TEXT ... --out RUN_DIR   add tokens, grow embeddings
    llm-jax train    [--experiment NAME] [key=value ...]   train (the main job; resumes a run)
    llm-jax generate --checkpoint RUN_DIR --prompt TEXT      complete a prompt, streaming
    llm-jax evaluate --checkpoint RUN_DIR [--quantize ...]   validation perplexity (and after quantization)
    llm-jax serve    --checkpoint RUN_DIR [--port 8000]      OpenAI-compatible HTTP server
    llm-jax convert  --from-hf HF_DIR --out RUN_DIR | --to-hf RUN_DIR --out HF_DIR
    llm-jax finetune --base RUN_DIR --data F.jsonl --out RUN_DIR [key=value ...]   SFT, full or PEFT
    llm-jax align    --checkpoint RUN_DIR --objective reward|dpo|ppo --data F.jsonl --out RUN_DIR
    llm-jax forward  [--experiment NAME] [key=value ...]   one forward pass of a model
    llm-jax params   [--experiment NAME] [key=value ...]   parameter shapes, axes, counts
    llm-jax plan     [--experiment NAME] [--device-memory 16GiB] [--compile] [--propose] [key=value ...]
                                                            per-device memory of a training step
    llm-jax config   [--experiment NAME] [key=value ...]   the resolved config as JSON
    llm-jax experiments                                     list the experiment files

Every subcommand that takes an experiment also takes dotted overrides, e.g.
`llm-jax forward model.n_layers=4 model.position=alibi`.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

from typing import get_args

from llm_jax.config import ConfigError, PeftMethod, to_json

DEFAULT_EXPERIMENT = "debug"
MAIN_EXPERIMENT = "python_stdlib"  # what `llm-jax train` trains when given no experiment


def _add_experiment_args(p: argparse.ArgumentParser, default: str = DEFAULT_EXPERIMENT) -> None:
    p.add_argument("--experiment", default=default, help=f"experiment name or path to a .py file (default {default})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _load(args):
    from llm_jax import experiment

    return experiment.load(args.experiment, args.overrides)


def cmd_train(args) -> int:
    """Train an experiment in its run directory (resuming from its newest checkpoint)."""
    from llm_jax.parallel.distributed import initialize_from_env
    from llm_jax.parallel.overlap import set_overlap_flags
    from llm_jax.training.loop import TrainingDiverged, train

    cfg = _load(args)
    # Before JAX starts its backend, which reads them once: see llm_jax/parallel/overlap.py.
    set_overlap_flags(collective_matmul=cfg.mesh.tensor != 1)
    initialize_from_env()  # a no-op unless SLURM, a TPU pod or LLM_JAX_COORDINATOR says otherwise
    try:
        train(cfg)
    except TrainingDiverged as e:
        print(f"llm-jax: training stopped: {e}", file=sys.stderr)
        return 3
    return 0


def cmd_generate(args) -> int:
    """Complete prompts with a trained model, streaming the text of a single prompt."""
    from llm_jax.config import override
    from llm_jax.data.tokenizers import load_tokenizer
    from llm_jax.inference import generate
    from llm_jax.inference.quantize import quantize_params
    from llm_jax.training.checkpoint import load_trained_model

    cfg, params, step = load_trained_model(args.checkpoint, step=args.step)
    decode = override(cfg, [f"decode.{a}" if not a.startswith("decode.") else a for a in args.overrides]).decode
    tokenizer = load_tokenizer(pathlib.Path(args.checkpoint) / "tokenizer")
    if args.quantize:
        params = quantize_params(params, cfg.model, bits=8 if args.quantize == "int8" else 4)
    prompts = args.prompt
    if args.chat:  # wrap each prompt as a user turn in the run's chat template (sft.template)
        from llm_jax.finetune.data import get_template

        prompts = [get_template(cfg.sft.template).prompt([{"role": "user", "content": p}]) for p in prompts]
    room = cfg.model.max_seq_len - max(len(tokenizer.encode(p)) for p in prompts)
    if room < 1:
        raise ValueError(f"a prompt fills the model's whole context (model.max_seq_len={cfg.model.max_seq_len})")
    max_new = min(decode.max_new_tokens, room)
    streamed = []

    def show(new_tokens):  # print the newly decoded text of the one prompt
        before = tokenizer.decode(streamed)
        streamed.extend(new_tokens[0])
        print(tokenizer.decode(streamed)[len(before):], end="", flush=True)

    single = len(prompts) == 1
    if single:
        print(prompts[0], end="", flush=True)
    out = generate(params, cfg.model, prompts, max_new_tokens=max_new, sampling=decode.sampling(), tokenizer=tokenizer,
                   stop_tokens=[tokenizer.eos_id], seed=decode.seed, on_tokens=show if single else None,
                   int8_cache=args.int8_cache)
    if single:
        print()
    else:
        for prompt, text in zip(prompts, out.texts):
            print(f"{prompt}{text}\n{'-' * 40}")
    print(f"[{args.checkpoint} step {step}; finished: {', '.join(out.finish_reasons)}]", file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    """Validation perplexity of a trained checkpoint, and its change under weight quantization."""
    from llm_jax.data.pipeline import open_corpus
    from llm_jax.data.tokenizers import load_tokenizer
    from llm_jax.evaluation import quantization_report, validation_batches
    from llm_jax.training.checkpoint import load_trained_model

    cfg, params, step = load_trained_model(args.checkpoint, step=args.step)
    tokenizer = load_tokenizer(pathlib.Path(args.checkpoint) / "tokenizer")
    corpus = open_corpus(cfg.data)
    batches, n_bytes = validation_batches(corpus.validation, tokenizer, seq_len=cfg.data.seq_len,
                                          batch_size=args.batch_size, n_batches=args.batches,
                                          vocab_size=cfg.model.vocab_size)
    if not batches:
        raise ValueError(f"the validation split of {corpus.name} is too short for one batch")
    schemes = [(int(q[3]), args.group_size if q == "int4" else None) for q in args.quantize]
    rows = quantization_report(params, cfg.model, batches, n_bytes, schemes)
    tokens = sum(int(b["loss_mask"].sum()) for b in batches)
    print(f"{args.checkpoint} step {step}: {len(batches)} validation batches, {tokens:,} scored tokens")
    print(f"{'weights':28s} {'MB':>8s} {'loss':>8s} {'perplexity':>11s} {'bits/byte':>10s} {'change':>8s}")
    for r in rows:
        print(f"{r['weights']:28s} {r['bytes'] / 1e6:8.2f} {r['loss']:8.4f} {r['perplexity']:11.3f} "
              f"{r['bits_per_byte']:10.4f} {r['perplexity_change']:+8.2%}")
    return 0


def cmd_serve(args) -> int:
    """Serve a run directory over an OpenAI-compatible HTTP API (continuous batching, paged KV cache)."""
    from llm_jax.inference.server import serve_main

    return serve_main(args)


def cmd_convert(args) -> int:
    """Import a Hugging Face checkpoint as a run directory, or export one (safetensors)."""
    from llm_jax.interop import main_convert

    return main_convert(args)


def cmd_finetune(args) -> int:
    """Supervised fine-tuning of a run directory on JSONL conversations, fully or with PEFT."""
    from llm_jax.finetune.sft import finetune, finetune_config

    flags = {"sft.train_path": args.data, "sft.validation_path": args.validation, "train.run_dir": args.out,
             "model.peft.method": args.method, "sft.template": args.template}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    finetune(finetune_config(args.base, overrides))
    return 0


def cmd_align(args) -> int:
    """Align a trained model: a reward model, DPO or PPO (llm_jax/finetune/align_cli.py)."""
    from llm_jax.finetune.align_cli import main_align

    return main_align(args)


def cmd_prepare(args) -> int:
    """Curate raw text into a tfds corpus for training (llm_jax/data/curation)."""
    from llm_jax.data.curation.cli import main_prepare

    try:
        return main_prepare(args)
    except (FileExistsError, NotADirectoryError) as e:
        print(f"llm-jax: error: {e}", file=sys.stderr)
        return 2


def cmd_expand_vocab(args) -> int:
    """Add domain tokens to a run's sentencepiece tokenizer and grow its embeddings to match."""
    from llm_jax.training.vocab_expansion import main_expand_vocab

    try:
        return main_expand_vocab(args)
    except FileExistsError as e:
        print(f"llm-jax: error: {e}", file=sys.stderr)
        return 2


def cmd_forward(args) -> int:
    """Initialise the experiment's model and run one forward pass on random tokens."""
    import jax
    import jax.numpy as jnp
    import optax

    from llm_jax.models import Transformer, count_params, init_params

    cfg = _load(args)
    model_cfg = cfg.model
    batch, length = args.batch, min(args.length or cfg.data.seq_len, model_cfg.max_seq_len)
    tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, model_cfg.vocab_size)
    params = init_params(model_cfg, jax.random.key(cfg.train.seed))

    forward = jax.jit(lambda p, t: Transformer(model_cfg).apply({"params": p}, t)[0])
    start = time.perf_counter()
    logits = forward(params, tokens).block_until_ready()
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    forward(params, tokens).block_until_ready()
    run = time.perf_counter() - start

    loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
    print(f"experiment     {cfg.name}")
    print(f"devices        {jax.device_count()} x {jax.devices()[0].platform}")
    print(f"parameters     {count_params(model_cfg):,}")
    print(f"tokens         {tuple(tokens.shape)} -> logits {tuple(logits.shape)} {logits.dtype}")
    print(f"loss           {float(loss):.4f} (uniform guess: ln V = {math.log(model_cfg.vocab_size):.4f})")
    print(f"time           {compile_and_run:.2f}s compile + run, {run * 1e3:.1f} ms run")
    return 0 if bool(jnp.isfinite(loss)) else 1


def cmd_params(args) -> int:
    """Print every parameter's shape and logical axes, without allocating any of them."""
    import flax.linen as nn
    import jax

    from llm_jax.models import param_shapes

    cfg = _load(args)
    shapes = param_shapes(cfg.model)
    axes = nn.get_partition_spec(shapes)
    total = 0
    for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(nn.unbox(shapes)), jax.tree.leaves(axes)):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        total += leaf.size
        print(f"{name:48s} {str(tuple(leaf.shape)):28s} {str(tuple(spec)):48s} {leaf.size:>16,}")
    print(f"{'total':48s} {'':28s} {'':48s} {total:>16,}")
    return 0


def cmd_plan(args) -> int:
    """Per-device memory of a training step: estimated, compiled ahead of time, and settings that fit."""
    import os

    if args.compile and args.devices and "jax" not in sys.modules:
        # Simulated CPU devices for an ahead-of-time compile (only the host platform reads this).
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} " \
                                  f"--xla_force_host_platform_device_count={args.devices}".strip()
    import jax

    from llm_jax.parallel import aot, planner

    cfg = _load(args)
    device_bytes = planner.parse_bytes(args.device_memory) if args.device_memory else planner.local_device_memory()
    compiled = None
    if args.compile or args.topology:
        devices = aot.topology_devices(args.topology) if args.topology else aot.local_devices(args.devices)
        try:
            compiled = aot.CompiledMemory.of(aot.compile_train_step(cfg, devices))
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            print(f"{cfg.name}: does NOT fit: the compiler ran out of device memory:\n{e}")
            return 1
        n_devices = len(devices)
    else:
        n_devices = args.devices or jax.device_count()
    report, fits = planner.plan_report(cfg, n_devices, device_bytes, compiled)
    print(report)
    if args.propose or not fits:
        if not device_bytes:
            raise ValueError("--propose needs --device-memory (this backend does not report its memory size)")
        proposals = planner.propose(cfg, n_devices, device_bytes)
        print(f"\nsettings that fit {planner.format_bytes(device_bytes)} per device (estimated), cheapest first:"
              if proposals else "\nno mesh, remat policy or microbatch count fits; add devices or shrink the model")
        for p in proposals:
            print(f"  {planner.format_bytes(p.estimate.device_total):>11s}  {' '.join(p.overrides())}")
    return 0 if fits else 1


def cmd_config(args) -> int:
    print(to_json(_load(args)))
    return 0


def cmd_experiments(args) -> int:
    from llm_jax import experiment

    for name, path in sorted(experiment.available().items()):
        doc = (experiment.load_module(name).__doc__ or "").strip().splitlines()
        print(f"{name:20s} {doc[0] if doc else ''}  [{path}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-jax", description="Train and serve LLMs with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    from llm_jax.data.curation.cli import add_prepare_args  # argparse only

    p = sub.add_parser("prepare", help="curate raw text (quality, dedup, decontamination, privacy, toxicity) "
                                       "into a corpus that train reads")
    add_prepare_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("expand-vocab", help="add tokens to a run's sentencepiece model; grow its embeddings")
    p.add_argument("--checkpoint", required=True, help="a run directory with a sentencepiece tokenizer/")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--token", action="append", default=[], help="a token to add (repeat)")
    p.add_argument("--tokens-file", default=None, help="a file of tokens to add, one per line")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.set_defaults(func=cmd_expand_vocab)

    p = sub.add_parser("train", help="train an experiment (the main job); resumes from the run directory")
    _add_experiment_args(p, default=MAIN_EXPERIMENT)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="complete prompts with a trained checkpoint, streaming")
    p.add_argument("--checkpoint", required=True, help="a run directory (train.run_dir of a training run)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None, help="weight-only quantization")
    p.add_argument("--int8-cache", action="store_true", help="int8 key/value cache")
    p.add_argument("--chat", action="store_true", help="send each prompt as a user turn in the run's chat template")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="decoding settings, e.g. temperature=0.8 top_p=0.95 max_new_tokens=100 seed=1")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="validation perplexity of a checkpoint, float and quantized")
    p.add_argument("--checkpoint", required=True, help="a run directory (train.run_dir of a training run)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--quantize", nargs="*", choices=("int8", "int4"), default=["int8", "int4"],
                   help="weight-only quantizations to compare with the float weights")
    p.add_argument("--group-size", type=int, default=128, help="int4 scale group size along the contraction axis")
    p.add_argument("--batches", type=int, default=20, help="validation batches to score")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    p.add_argument("--checkpoint", required=True, help="a run directory (trained or converted)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients ask for (default: the run dir's name)")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file (default: the checkpoint's, "
                   "else 'role: content' lines)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None, help="weight-only quantization")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoding at once")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV-cache pool size in pages (default: max-batch full-length sequences)")
    p.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens per row per step (chunked prefill)")
    p.add_argument("--paged-attention", choices=("auto", "gather", "pallas"), default="auto",
                   help="how decode steps read the KV pages: an XLA gather, JAX's Pallas GPU kernel, or auto "
                   "(the kernel on a GPU when the model allows it)")
    p.add_argument("--max-concurrent", type=int, default=64, help="requests in flight before answering 429")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context - 1")
    p.add_argument("--max-tokens", type=int, default=None, help="the largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("forward", help="one forward pass of an experiment's model")
    _add_experiment_args(p)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=None, help="tokens per row (default: data.seq_len)")
    p.set_defaults(func=cmd_forward)

    p = sub.add_parser("params", help="parameter shapes, logical axes and counts")
    _add_experiment_args(p)
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("plan", help="per-device memory of a training step; what fits a device memory")
    _add_experiment_args(p)
    p.add_argument("--device-memory", default=None, help="memory per device, e.g. 16GiB or 80GB "
                   "(default: what the local device reports, if it does)")
    p.add_argument("--devices", type=int, default=None, help="devices to plan for (default: the local ones)")
    p.add_argument("--compile", action="store_true", help="also compile the step ahead of time on that many "
                   "devices (simulated CPU devices here) and compare with the compiler's memory analysis")
    p.add_argument("--topology", default=None, help="compile for a TPU topology, e.g. v5e:4x4 (needs libtpu)")
    p.add_argument("--propose", action="store_true", help="list mesh / remat / microbatch settings that fit")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("config", help="print the resolved config as JSON")
    _add_experiment_args(p)
    p.set_defaults(func=cmd_config)

    from llm_jax.interop.cli import add_convert_args  # argparse only: no JAX, no hf extra

    p = sub.add_parser("convert", help="Hugging Face checkpoints <-> llm_jax run directories (safetensors)")
    add_convert_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("finetune", help="supervised fine-tuning (full, LoRA, QLoRA, prefix/prompt tuning, adapters)")
    p.add_argument("--base", required=True, help="the run directory to start from (an llm_jax run or a converted "
                                                 "Hugging Face checkpoint)")
    p.add_argument("--data", default=None, help="training JSONL: instruction/input/output or messages per line")
    p.add_argument("--validation", default=None, help="validation JSONL (default: the tail of --data)")
    p.add_argument("--out", default=None, help="run directory of the tuned model (default runs/finetune)")
    p.add_argument("--method", default=None, choices=get_args(PeftMethod), help="model.peft.method (default none: "
                                                                                "full fine-tuning)")
    p.add_argument("--template", default=None, help="chat template: default, chatml or alpaca")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. model.peft.lora_rank=16 train.steps=500 optim.lr=1e-4")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("align", help="reward model, DPO or PPO from a run directory (preference JSONL)")
    p.add_argument("--checkpoint", required=True, help="the starting run directory (policy / reward model trunk)")
    p.add_argument("--objective", required=True, choices=("reward", "dpo", "ppo"))
    p.add_argument("--data", required=True, help="JSONL: prompt, chosen, rejected per line (ppo: prompt)")
    p.add_argument("--out", required=True, help="new run directory for the aligned model")
    p.add_argument("--reward-model", default=None, help="ppo: a run directory written by --objective reward")
    p.add_argument("--reward-fn", default=None,
                   help="ppo: module:function or file.py:function (prompt, response) -> float")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="the objective's config, e.g. steps=200 beta=0.1 optim.lr=1e-6 "
                        "(llm_jax/finetune/align_config.py); model.peft.* to tune through PEFT, e.g. "
                        "model.peft.method=lora")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("experiments", help="list available experiments")
    p.set_defaults(func=cmd_experiments)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"llm-jax: config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ImportError) as e:
        print(f"llm-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

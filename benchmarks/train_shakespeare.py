"""nanoGPT's CPU "baby GPT" on tiny-Shakespeare: llm_jax's train step vs. plain PyTorch eager.

The recipe is nanoGPT's `train_shakespeare_char` with its README's CPU settings: a
character-level model (vocabulary = the sorted characters of the text), 4 layers, 4 heads,
d_model 128, context 64, batch 12, no dropout, no biases, exact-erf GELU MLP of 4 * d_model,
LayerNorm, learned positions, tied embeddings; AdamW (lr 1e-3, betas 0.9/0.99, weight decay
0.1 on matrices only), global-norm clipping at 1.0, 100 warmup steps and cosine decay to
1e-4 at step 2000. nanoGPT reports a validation loss of 1.88 for it on a CPU.

Both sides see the same batches (windows drawn nanoGPT-style by one seeded numpy RNG) and
are scored on the same validation batches. Each runs in its own subprocess, one after the
other, so neither's thread pool competes with the other. The PyTorch side copies llm_jax's
choices where nanoGPT differs slightly: optax's warmup (lr = 0 on the first update), the
position-embedding init (std 0.01), and the loss on the last checkpoint rather than the best.

    python benchmarks/train_shakespeare.py [--data FILE] [--steps 2000] [--only jax|torch] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_VAL_LOSS = 1.88  # nanoGPT README, shakespeare_char on a CPU, same recipe

LAYERS, HEADS, D_MODEL, CONTEXT, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP = 1e-3, 1e-4, 100
B1, B2, EPS, WEIGHT_DECAY, GRAD_CLIP = 0.9, 0.99, 1e-8, 0.1, 1.0
INIT_STD = 0.02
EVAL_BATCHES = 50  # fixed validation windows, 50 x 12 x 64 = 38,400 tokens
# nanoGPT's own estimate (its README's CPU run passes --eval_iters=20): the mean over 20
# random validation batches. NANOGPT_ESTIMATES of them, drawn afresh, show its spread.
NANOGPT_EVAL_ITERS, NANOGPT_ESTIMATES = 20, 50
STEADY_FROM = 20  # steps before this one hold compilation / warm-up; timed separately
LOG_EVERY = 500
PEAK_SIZE, PEAK_REPEATS = 2048, 5  # the f32 matmul that measures each framework's peak


# ------------------------------------------------------------------------------ shared


def load_batches(path: pathlib.Path, steps: int, seed: int) -> dict:
    """Character ids, and every training / validation batch, drawn once from seeded RNGs."""
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], dtype=np.int32)
    split = int(0.9 * len(ids))

    def windows(data: np.ndarray, n_batches: int, rng: np.random.Generator):
        # nanoGPT's get_batch: random starts, targets shifted by one.
        starts = rng.integers(0, len(data) - CONTEXT, size=(n_batches, BATCH))
        idx = starts[..., None] + np.arange(CONTEXT)
        return data[idx], data[idx + 1]

    # Separate generators: the validation set does not depend on --steps.
    train_x, train_y = windows(ids[:split], steps, np.random.default_rng(seed))
    val_x, val_y = windows(ids[split:], EVAL_BATCHES, np.random.default_rng(seed + 1))
    est_x, est_y = windows(ids[split:], NANOGPT_EVAL_ITERS * NANOGPT_ESTIMATES, np.random.default_rng(seed + 2))
    return dict(vocab=len(chars), train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y, est_x=est_x, est_y=est_y)


def learning_rate(count: int, total_steps: int) -> float:
    """optax's linear warmup + cosine decay at update `count` (0-based), as llm_jax builds it."""
    if count < WARMUP:
        return LR * count / WARMUP
    progress = min(count - WARMUP, total_steps - WARMUP) / (total_steps - WARMUP)
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress))


def flops_per_token(n_params: int) -> float:
    """nanoGPT's estimate: 6N for the weight matmuls plus 12 * L * T * D for attention.

    N excludes the position embedding (a lookup) and counts the tied token embedding once,
    because it is the output projection's matmul.
    """
    return 6.0 * n_params + 12.0 * LAYERS * CONTEXT * D_MODEL


def timed_training(step, fetch_loss, steps: int, label: str) -> dict:
    """Run `step(i)` for every step, syncing (`fetch_loss`) only at the warm-up mark and log points."""
    start = time.perf_counter()
    warm_s, losses = None, {}
    for i in range(steps):
        out = step(i)
        done = i + 1
        if done == STEADY_FROM or done % LOG_EVERY == 0 or done == steps:
            loss = fetch_loss(out)  # the only host syncs in the loop
            if done == STEADY_FROM:
                warm_s = time.perf_counter() - start
            if done % LOG_EVERY == 0 or done == steps:
                losses[done] = loss
                print(f"  [{label}] step {done:>5}/{steps}  train loss {loss:.4f}  "
                      f"{time.perf_counter() - start:7.1f} s", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - start
    load = os.getloadavg()[0]  # this run's own threads give about os.cpu_count()
    steady_step_s = (train_s - warm_s) / (steps - STEADY_FROM)
    tokens = BATCH * CONTEXT
    return dict(train_s=train_s, tokens_per_s=steps * tokens / train_s, steady_tokens_per_s=tokens / steady_step_s,
                compile_s=warm_s - STEADY_FROM * steady_step_s, train_losses=losses, load_average=load)


def time_matmul(matmul, a, sync) -> float:
    """FLOP/s of `matmul(a)` for a square f32 `a`, best of 3 rounds: the peak MFU is measured against."""
    sync(matmul(a))
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(PEAK_REPEATS):
            out = matmul(a)
        sync(out)
        best = min(best, time.perf_counter() - start)
    return 2 * PEAK_SIZE**3 * PEAK_REPEATS / best


# ------------------------------------------------------------------------- ours: llm_jax


def run_jax(data: dict, steps: int, seed: int) -> dict:
    start = time.perf_counter()
    import jax
    import jax.numpy as jnp

    from llm_jax.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig
    from llm_jax.training import eval_step, init_train_state, learning_rate_schedule, train_step

    # experiments/shakespeare_char.py, with the vocabulary cut to the text's characters.
    cfg = ExperimentConfig(
        name="shakespeare_char_benchmark",
        model=ModelConfig(vocab_size=data["vocab"], d_model=D_MODEL, n_layers=LAYERS, n_heads=HEADS,
                          d_ff=4 * D_MODEL, max_seq_len=CONTEXT, position="learned", norm="layernorm",
                          activation="gelu_exact", tie_embeddings=True, use_bias=False, dropout=0.0,
                          init_std=INIT_STD, dtype="float32", scan_layers=False),
        optim=OptimConfig(name="adamw", lr=LR, schedule="cosine", warmup_steps=WARMUP, min_lr_ratio=MIN_LR / LR,
                          b1=B1, b2=B2, eps=EPS, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP),
        data=DataConfig(source="text", split="tail", validation_fraction=0.1, tokenizer="char", seq_len=CONTEXT),
        train=TrainConfig(steps=steps, batch_size=BATCH, seed=seed),
    )
    # The PyTorch side reproduces this schedule by hand; check that it does.
    schedule = learning_rate_schedule(cfg.optim, steps)
    for count in (0, 1, WARMUP - 1, WARMUP, (WARMUP + steps) // 2, steps - 1, steps):
        assert math.isclose(float(schedule(count)), learning_rate(count, steps), rel_tol=1e-5, abs_tol=1e-9), count

    state = init_train_state(cfg.model, cfg.optim, steps, jax.random.key(seed))
    params = dict(state.params)
    params.pop("position_embed")
    n_params = sum(x.size for x in jax.tree.leaves(params))

    def step(i):
        nonlocal state
        batch = {"inputs": jax.device_put(data["train_x"][i]), "targets": jax.device_put(data["train_y"][i])}
        state, metrics = train_step(state, batch, model_cfg=cfg.model, microbatches=1)
        return metrics

    jax.block_until_ready(state)
    timing = timed_training(step, lambda metrics: float(metrics["loss"]), steps, "jax")

    def mean_loss(xs, ys) -> float:
        loss_sum = tokens = 0.0
        for x, y in zip(xs, ys):
            sums = eval_step(state.params, {"inputs": x, "targets": y}, model_cfg=cfg.model)
            loss_sum, tokens = loss_sum + float(sums["loss_sum"]), tokens + float(sums["tokens"])
        return loss_sum / tokens

    val_loss = mean_loss(data["val_x"], data["val_y"])
    wall_s = time.perf_counter() - start
    n = NANOGPT_EVAL_ITERS
    estimates = [mean_loss(data["est_x"][i : i + n], data["est_y"][i : i + n]) for i in range(0, len(data["est_x"]), n)]

    a = jax.random.normal(jax.random.key(0), (PEAK_SIZE, PEAK_SIZE), jnp.float32)
    peak = time_matmul(jax.jit(lambda m: m @ m), a, jax.block_until_ready)
    return dict(impl="ours (llm_jax)", framework=f"jax {jax.__version__}", val_loss=val_loss,
                nanogpt_estimates=estimates,
                n_params=int(n_params), wall_s=wall_s, peak_flops=peak, skipped_steps=int(state.skipped), **timing)


# ------------------------------------------------------------------ reference: PyTorch eager


def torch_gpt(vocab: int):
    """The same model in plain PyTorch (nanoGPT's layout, llm_jax's initialisation)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_norm = nn.LayerNorm(D_MODEL, bias=False)
            self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL, bias=False)
            self.out = nn.Linear(D_MODEL, D_MODEL, bias=False)
            self.mlp_norm = nn.LayerNorm(D_MODEL, bias=False)
            self.mlp_in = nn.Linear(D_MODEL, 4 * D_MODEL, bias=False)
            self.mlp_out = nn.Linear(4 * D_MODEL, D_MODEL, bias=False)

        def forward(self, x_BTD):
            B, T, D = x_BTD.shape
            qkv = self.qkv(self.attention_norm(x_BTD)).view(B, T, 3, HEADS, D // HEADS)
            q_BNTH, k_BNTH, v_BNTH = qkv.permute(2, 0, 3, 1, 4)
            y_BNTH = F.scaled_dot_product_attention(q_BNTH, k_BNTH, v_BNTH, is_causal=True)
            x_BTD = x_BTD + self.out(y_BNTH.transpose(1, 2).reshape(B, T, D))
            return x_BTD + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x_BTD))))  # exact-erf GELU

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, D_MODEL)
            self.position_embed = nn.Embedding(CONTEXT, D_MODEL)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.final_norm = nn.LayerNorm(D_MODEL, bias=False)
            residual_std = INIT_STD / math.sqrt(2 * LAYERS)  # GPT-2's scaled residual init
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    std = residual_std if name.split(".")[-2] in ("out", "mlp_out") else INIT_STD
                    nn.init.normal_(p, std=std / 2 if name.startswith("position_embed") else std)

        def forward(self, tokens_BT):
            x_BTD = self.embed(tokens_BT) + self.position_embed(torch.arange(tokens_BT.shape[1]))
            for block in self.blocks:
                x_BTD = block(x_BTD)
            return F.linear(self.final_norm(x_BTD), self.embed.weight)  # tied output projection

    return GPT()


def run_torch(data: dict, steps: int, seed: int) -> dict:
    start = time.perf_counter()
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(seed)
    model = torch_gpt(data["vocab"])
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("position_embed"))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    # fused=True: PyTorch's fastest CPU AdamW kernel, so the reference is not held back by it.
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LR, betas=(B1, B2), eps=EPS, fused=True)
    train_x, train_y = torch.from_numpy(data["train_x"]).long(), torch.from_numpy(data["train_y"]).long()
    vocab = data["vocab"]

    def step(i):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(i, steps)
        logits = model(train_x[i])
        loss = F.cross_entropy(logits.view(-1, vocab), train_y[i].view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # optax scales by clip / norm when norm > clip; torch divides by norm + 1e-6 (immaterial).
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP, foreach=True)
        optimizer.step()
        return loss.detach()

    model.train()
    timing = timed_training(step, lambda loss: float(loss), steps, "torch")

    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(torch.from_numpy(x).long()).view(-1, vocab), torch.from_numpy(y).long().view(-1))
                  for x, y in zip(data["val_x"], data["val_y"])]
    val_loss = float(torch.stack(losses).mean())  # equal-sized batches: the mean over all tokens
    wall_s = time.perf_counter() - start

    a = torch.randn(PEAK_SIZE, PEAK_SIZE, dtype=torch.float32)
    peak = time_matmul(lambda m: m @ m, a, lambda out: None)  # CPU torch ops are synchronous
    return dict(impl="reference (PyTorch eager)", framework=f"torch {torch.__version__}", val_loss=val_loss,
                n_params=int(n_params), wall_s=wall_s, peak_flops=peak, skipped_steps=0, **timing)


# ------------------------------------------------------------------------------ reporting


def report(results: list[dict]) -> dict:
    """Print the table and ratios; return the ratios."""
    header = (f"{'implementation':<26} {'val loss':>8} {'tok/s':>8} {'tok/s':>8} {'compile':>8} {'train':>7} "
              f"{'wall':>7} {'peak':>8} {'MFU':>6}\n{'':<26} {'':>8} {'(all)':>8} {'(steady)':>8} {'s':>8} "
              f"{'s':>7} {'s':>7} {'GFLOP/s':>8} {'':>6}")
    print("\n" + header + "\n" + "-" * 96)
    for r in results:
        r["mfu"] = r["steady_tokens_per_s"] * flops_per_token(r["n_params"]) / r["peak_flops"]
        print(f"{r['impl']:<26} {r['val_loss']:>8.4f} {r['tokens_per_s']:>8,.0f} {r['steady_tokens_per_s']:>8,.0f} "
              f"{r['compile_s']:>8.2f} {r['train_s']:>7.1f} {r['wall_s']:>7.1f} {r['peak_flops'] / 1e9:>8.1f} "
              f"{r['mfu']:>6.1%}")
    print(f"\n{results[0]['n_params']:,} parameters (nanoGPT's count); {flops_per_token(results[0]['n_params']):,.0f} "
          f"FLOPs per token (6N + 12LTD). MFU uses steady tokens/s and each framework's own matmul peak.")
    print("tok/s (all) and 'train' include compilation and the first steps; 'wall' adds the framework's import, "
          "model init and evaluation.")
    busy = [r["impl"] for r in results if r["load_average"] > os.cpu_count() + 1]
    if busy:
        print(f"WARNING: other processes shared the {os.cpu_count()} cores during {', '.join(busy)} "
              f"(1-minute load average {max(r['load_average'] for r in results):.1f}); its timings are unreliable")
    ratios = {}
    by_name = {r["impl"].split()[0]: r for r in results}
    if {"ours", "reference"} <= by_name.keys():
        ours, ref = by_name["ours"], by_name["reference"]
        ratios = {"tokens_per_s_incl_compile": ours["tokens_per_s"] / ref["tokens_per_s"],
                  "tokens_per_s_steady": ours["steady_tokens_per_s"] / ref["steady_tokens_per_s"],
                  "wall_s": ours["wall_s"] / ref["wall_s"]}
        print(f"\nours / reference: tokens/s incl. compile {ratios['tokens_per_s_incl_compile']:.2f}x, "
              f"steady {ratios['tokens_per_s_steady']:.2f}x; wall time {ratios['wall_s']:.2f}x")
    for r in results:
        ratios[f"val_loss_minus_goal/{r['impl'].split()[0]}"] = r["val_loss"] - NANOGPT_VAL_LOSS
        print(f"{r['impl']}: validation loss {r['val_loss']:.4f} vs nanoGPT's {NANOGPT_VAL_LOSS} "
              f"({r['val_loss'] - NANOGPT_VAL_LOSS:+.4f})")
        if "nanogpt_estimates" in r:
            est = np.array(r["nanogpt_estimates"])
            print(f"  the same model scored as nanoGPT scores ({NANOGPT_EVAL_ITERS} random validation batches), "
                  f"{len(est)} times: mean {est.mean():.4f}, std {est.std(ddof=1):.4f}, range {est.min():.4f}-"
                  f"{est.max():.4f}; {int((est <= NANOGPT_VAL_LOSS).sum())} of {len(est)} at or below "
                  f"{NANOGPT_VAL_LOSS}")
    return ratios


def run_worker(impl: str, args) -> None:
    """One implementation in this process; its result goes to --json."""
    data = load_batches(args.data, args.steps, args.seed)
    result = (run_jax if impl == "jax" else run_torch)(data, args.steps, args.seed)
    pathlib.Path(args.json).write_text(json.dumps(result))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA if DEFAULT_DATA.exists() else None,
                   help=f"tiny-Shakespeare text (default: {DEFAULT_DATA} if present)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--only", choices=("jax", "torch"), help="run one implementation only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.data is None:
        p.error(f"no tiny-Shakespeare text: pass --data FILE ({DEFAULT_DATA} does not exist)")
    if not args.data.is_file():
        p.error(f"--data {args.data}: no such file")
    if args.steps <= max(WARMUP, 2 * STEADY_FROM):
        p.error(f"--steps must exceed the {WARMUP} warmup steps, got {args.steps}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for impl in [args.only] if args.only else ["jax", "torch"]:
            out = pathlib.Path(tmp) / f"{impl}.json"
            print(f"running {impl} ({args.steps} steps) ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, __file__, "--worker", impl, "--json", str(out), "--data", str(args.data),
                            "--steps", str(args.steps), "--seed", str(args.seed)], check=True)
            results.append(json.loads(out.read_text()))
    ratios = report(results)
    if args.json:
        recipe = dict(layers=LAYERS, heads=HEADS, d_model=D_MODEL, context=CONTEXT, batch=BATCH, steps=args.steps,
                      lr=LR, min_lr=MIN_LR, warmup=WARMUP, betas=[B1, B2], weight_decay=WEIGHT_DECAY,
                      grad_clip=GRAD_CLIP, eval_batches=EVAL_BATCHES, seed=args.seed)
        machine = dict(cpus=os.cpu_count(), platform=platform.platform(), python=platform.python_version())
        payload = dict(recipe=recipe, machine=machine, nanogpt_val_loss=NANOGPT_VAL_LOSS, results=results,
                       ratios=ratios)
        pathlib.Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()

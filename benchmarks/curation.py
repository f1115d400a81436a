"""Data curation: throughput of the whole chain on the stdlib, and near-duplicate accuracy.

1. Throughput: every filter of `llm_jax.data.curation` (quality rules for code, the
   hashed n-gram classifier, a toxicity word list, decontamination against an eval set,
   privacy scrubbing, exact and near dedup) over the Python standard library's .py files
   (what `llm-jax train` trains on), with 1 and N worker processes: documents/s and MB/s
   of input. The classifier, word list and eval set are made from the corpus itself.
2. Near-duplicate detection on a generated set with known duplicates: random-word base
   documents and edited copies whose Jaccard similarity to their base spreads across the
   threshold. The reference is the exact Jaccard similarity of the word 5-gram shingle
   sets of every pair, computed in the same run; MinHash LSH (candidates from shared LSH
   buckets, confirmed when the exact shingle Jaccard, the default, or the MinHash estimate
   reaches the threshold) is scored against it by precision and recall over pairs.
   Goal: >= 0.95 each at Jaccard 0.8.

    python benchmarks/curation.py [--workers 2] [--docs 0 (all)] [--pairs 300]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import random
import tempfile
import time

from llm_jax.data import corpora
from llm_jax.data.curation import Chain, parse_chain
from llm_jax.data.curation import dedup
from llm_jax.data.curation.config import PRESETS
from llm_jax.data.curation.documents import read_files


def stdlib_documents(limit: int):
    files = corpora.stdlib_sources()
    return files[:limit] if limit else files


def full_chain(tmp: pathlib.Path, files) -> dict:
    """The code preset plus every filter that needs user files, with those files made here."""
    rng = random.Random(0)
    sample = rng.sample(corpora.stdlib_sources(), 200)  # whatever --docs is
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sample]
    good = [t[:2000] for t in texts[:100]]
    bad = ["".join(rng.sample(t[:2000], len(t[:2000]))) for t in texts[100:]]  # character soup
    (tmp / "good.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in good))
    (tmp / "bad.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in bad))
    (tmp / "words.txt").write_text("idiot\nstupid\nmoron\n")
    # An "evaluation set": 20 passages of the corpus, so decontamination has work to do.
    (tmp / "eval.jsonl").write_text("".join(json.dumps({"text": t[500:1500]}) + "\n" for t in texts[:20]))
    code = PRESETS["code"]["steps"]
    return {"steps": [code[0],
                      {"filter": "classifier", "good": str(tmp / "good.jsonl"), "bad": str(tmp / "bad.jsonl"),
                       "threshold": 0.1},
                      {"filter": "toxicity", "word_list": str(tmp / "words.txt")},
                      {"filter": "decontamination", "eval_path": str(tmp / "eval.jsonl")},
                      *code[1:]]}


def throughput(files, workers_list) -> list[dict]:
    root = corpora.stdlib_root()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = full_chain(pathlib.Path(tmp), files)
        for workers in workers_list:
            chain = Chain(parse_chain(spec))
            start = time.perf_counter()
            kept = sum(1 for _ in chain.run(read_files(files, root=root, max_bytes=64 << 20), workers=workers))
            seconds = time.perf_counter() - start
            report = chain.report
            report.check()
            rows.append({"workers": workers, "docs": report.input_docs, "MB": report.input_bytes / 1e6,
                         "seconds": seconds, "kept": kept, "reasons": report.to_dict()["removed_by_reason"]})
    return rows


def near_dup_set(n_pairs: int, n_singles: int, seed: int = 0):
    """(texts, pairs) where pairs are (base, copy) indices; copies edit 0-6% of the words."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20_000)]
    texts, pairs = [], []
    for _ in range(n_pairs):
        words = [rng.choice(vocab) for _ in range(rng.randint(150, 400))]
        rate = rng.uniform(0.0, 0.06)
        copy = [rng.choice(vocab) if rng.random() < rate else w for w in words]
        texts += [" ".join(words), " ".join(copy)]
        pairs.append((len(texts) - 2, len(texts) - 1))
    texts += [" ".join(rng.choice(vocab) for _ in range(rng.randint(150, 400))) for _ in range(n_singles)]
    return texts, pairs


def near_dup_accuracy(texts, threshold: float, num_perm: int, verify: str) -> dict:
    cfg = dedup.NearDedupConfig(threshold=threshold, num_perm=num_perm, verify=verify)
    start = time.perf_counter()
    shingle_sets = [dedup.shingles(t, cfg.shingle_words) for t in texts]
    truth = {(i, j) for i, j in itertools.combinations(range(len(texts)), 2)
             if dedup.jaccard(shingle_sets[i], shingle_sets[j]) >= threshold}
    exact_seconds = time.perf_counter() - start

    start = time.perf_counter()
    signatures = [dedup.minhash_signature(t, cfg) for t in texts]
    bands, rows = dedup.lsh_bands(cfg)
    buckets: dict[bytes, list[int]] = {}
    for i, s in enumerate(signatures):
        for key in dedup.band_keys(s.minhash, bands, rows):
            buckets.setdefault(key, []).append(i)
    candidates = {pair for members in buckets.values() for pair in itertools.combinations(members, 2)}
    found = {(i, j) for i, j in candidates if dedup.similarity(signatures[i], signatures[j]) >= threshold}
    lsh_seconds = time.perf_counter() - start
    true_positives = len(found & truth)
    return {"num_perm": num_perm, "verify": verify, "bands": f"{bands}x{rows}", "candidate recall":
            len(candidates & truth) / max(1, len(truth)), "true pairs": len(truth), "found": len(found),
            "candidates": len(candidates), "precision": true_positives / max(1, len(found)),
            "recall": true_positives / max(1, len(truth)), "exact s": exact_seconds, "lsh s": lsh_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--docs", type=int, default=0, help="first N stdlib files (0: all)")
    parser.add_argument("--pairs", type=int, default=300, help="duplicate pairs in the generated set")
    parser.add_argument("--threshold", type=float, default=0.8)
    args = parser.parse_args()

    files = stdlib_documents(args.docs)
    rows = throughput(files, sorted({1, args.workers}))
    print(f"Chain throughput on the stdlib ({len(files)} files; {os.cpu_count()} cores, shared)")
    print(f"{'workers':>8s} {'docs':>7s} {'MB':>7s} {'s':>7s} {'docs/s':>8s} {'MB/s':>6s} {'kept':>6s}")
    for r in rows:
        print(f"{r['workers']:8d} {r['docs']:7d} {r['MB']:7.1f} {r['seconds']:7.1f} {r['docs'] / r['seconds']:8.0f} "
              f"{r['MB'] / r['seconds']:6.2f} {r['kept']:6d}")
    print(f"removed: {rows[0]['reasons']}")

    texts, pairs = near_dup_set(args.pairs, args.pairs)
    print(f"\nNear duplicates at Jaccard {args.threshold}: {len(texts)} documents, {len(pairs)} edited copies, "
          f"{len(texts) * (len(texts) - 1) // 2:,} pairs scored exactly")
    print(f"{'num_perm':>8s} {'verify':>8s} {'bands':>6s} {'true':>6s} {'found':>6s} {'cands':>7s} "
          f"{'cand rec':>8s} {'precision':>9s} {'recall':>7s} {'exact s':>8s} {'lsh s':>6s}")
    for num_perm, verify in ((128, "exact"), (128, "estimate"), (256, "estimate")):
        r = near_dup_accuracy(texts, args.threshold, num_perm, verify)
        print(f"{r['num_perm']:8d} {r['verify']:>8s} {r['bands']:>6s} {r['true pairs']:6d} {r['found']:6d} "
              f"{r['candidates']:7d} {r['candidate recall']:8.3f} {r['precision']:9.3f} {r['recall']:7.3f} "
              f"{r['exact s']:8.1f} {r['lsh s']:6.1f}")
    print("exact s: exact Jaccard of every pair (the reference); lsh s: signatures, buckets, verification")
    print("goal: precision >= 0.95 and recall >= 0.95")


if __name__ == "__main__":
    main()

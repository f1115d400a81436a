"""Data curation: raw text -> a corpus worth training on, with a record of everything removed.

    documents.py        readers (directory, JSONL, text file, tfds) -> Document; bad input flagged
    quality.py          heuristic rules (Gopher / C4 style), every threshold configurable
    classifier.py       hashed n-gram logistic regression trained from good / bad examples
    dedup.py            exact (normalised hash) and near (MinHash LSH, datasketch) duplicates
    decontamination.py  long n-grams shared with an evaluation set
    privacy.py          e-mails, phones, IPs, Luhn-checked cards, keys and passwords -> placeholders
    toxicity.py         user word lists, whole word, with a density threshold
    config.py           the chain config (JSON), presets, validation
    chain.py            steps, the per-document trace, the local (multi-process) runner
    report.py           per step and per reason counts, examples, the balance check
    beam.py             the same chain as an Apache Beam pipeline (the beam extra)
    prepare.py          `llm-jax prepare`: read, curate, write a tfds corpus and report.json

Nothing here imports JAX: curation runs on machines without accelerators.
"""

from llm_jax.data.curation.chain import Chain
from llm_jax.data.curation.config import FILTERS, PRESETS, ChainConfig, ChainConfigError, load_chain, parse_chain
from llm_jax.data.curation.documents import Document, read_input
from llm_jax.data.curation.report import Report

__all__ = ["Chain", "ChainConfig", "ChainConfigError", "Document", "FILTERS", "PRESETS", "Report", "load_chain",
           "parse_chain", "read_input"]

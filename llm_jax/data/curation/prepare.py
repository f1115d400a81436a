"""`llm-jax prepare`: raw text -> chain -> a cleaned tfds corpus the training pipeline reads.

    OUT/report.json                      the report (totals, per step, per reason, examples)
    OUT/<name>/curated/1.0.0/            tfds array_record dataset, train + validation (hash split)

Train on it with `llm-jax train data.source=tfds data.tfds_name=<name> data.data_dir=OUT`.
The report is written even when no document survives (then `prepare` raises after it),
so a run that removes everything still says why.

The filters stream, but the kept documents are held in memory while tfds writes them (as
`corpora.prepare_text_corpus` does); a corpus beyond one machine goes through the Beam
transform (`llm_jax.data.curation.beam.CurateDocuments`) and a Beam sink instead.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Sequence

from llm_jax.data.curation.chain import Chain
from llm_jax.data.curation.config import ChainConfig, load_chain
from llm_jax.data.curation.documents import read_input
from llm_jax.data.curation.report import Report

REPORT_FILE = "report.json"
CHAIN_FILE = "chain.json"


@dataclasses.dataclass(frozen=True)
class Prepared:
    report: Report
    data_dir: pathlib.Path  # data.data_dir for training
    name: str  # data.tfds_name for training

    def train_command(self) -> str:
        return f"llm-jax train data.source=tfds data.tfds_name={self.name} data.data_dir={self.data_dir}"


def prepare(input_path: str, out_dir: str | pathlib.Path, chain: ChainConfig | str = "web", *, name: str = "curated",
            input_format: str = "auto", text_field: str = "text", extensions: Sequence[str] | None = None,
            tfds_data_dir: str | None = None, tfds_split: str = "train", validation_fraction: float = 0.05,
            workers: int = 1, runner: str = "local", beam_args: Sequence[str] = ()) -> Prepared:
    """Curate `input_path` into `out_dir` (see the module docstring); `runner` is "local" or "beam"."""
    from llm_jax.data.corpora import CorpusStats, check_documents_corpus, write_documents_corpus

    # Everything the run would otherwise trip over at its end is refused before it starts.
    check_documents_corpus(name, validation_fraction)
    run_beam = _beam_runner() if runner == "beam" else None
    if runner not in ("local", "beam"):
        raise ValueError(f"runner must be 'local' or 'beam', got {runner!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    config = chain if isinstance(chain, ChainConfig) else load_chain(chain)
    out_dir = pathlib.Path(out_dir).expanduser().absolute()
    if (out_dir / name).exists():
        raise FileExistsError(f"{out_dir / name} already exists: prepare into a new --out or delete it")
    built = Chain(config)  # reads word lists, example files, eval sets: fails here, before any document
    documents = read_input(input_path, input_format, text_field=text_field, extensions=extensions,
                           data_dir=tfds_data_dir, split=tfds_split, invalid_utf8=config.input.invalid_utf8)
    if run_beam is not None:
        texts, report = run_beam(built, documents, beam_args)
    else:
        texts = [d.text for d in built.run(documents, workers=workers)]
        report = built.report
    report.check()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_FILE).write_text(report.to_json(), encoding="utf-8")
    (out_dir / CHAIN_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    if len(texts) < 2:
        raise ValueError(f"only {len(texts)} of {report.input_docs} documents survived the chain (a corpus needs "
                         f"2: train and validation); see {out_dir / REPORT_FILE}")
    stats = CorpusStats(files=report.input_docs, documents=len(texts), bytes=report.kept_bytes, undecodable_files=0)
    write_documents_corpus(texts, out_dir, name, validation_fraction=validation_fraction, stats=stats)
    return Prepared(report=report, data_dir=out_dir, name=name)


def _beam_runner():
    try:
        from llm_jax.data.curation.beam import run_beam
    except ModuleNotFoundError as e:
        raise ImportError(f"--runner beam needs the beam extra ({e}): pip install -e '.[beam]', in an "
                          "environment of its own (see the README's data curation section)") from None
    return run_beam

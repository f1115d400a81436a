"""The chain as an Apache Beam pipeline (the `beam` extra), for corpora beyond one machine.

`CurateDocuments(chain)` turns a PCollection of `Document`s into the kept documents and
a one-element PCollection holding the `Report`. It runs the same code as the local runner:
`Chain.trace` (every filter and transform, and the dedup signatures) in a `beam.Map`, and
`Chain.record` inside a combiner that merges per-worker reports. Only the dedup indexes
change shape, because no single worker sees every document:

    exact_dedup   documents grouped by their hash; all but the smallest ordinal are removed
    near_dedup    documents grouped by LSH band key; one is removed when a document with a
                  smaller ordinal in one of its buckets has Jaccard >= threshold

Dedup steps run one after another, each seeing only the documents still alive at it, as
in the local runner. Two cases differ from the local runner, whose indexes hold only the
documents that end up kept. Here a document that a later filter removes can still make
its copy a duplicate (both go). And for near dedup, in a chain A ~ B ~ C where A and C are
not similar, the local runner keeps A and C (C is compared with the kept documents only),
while Beam also removes C (C is compared with every earlier document, B included).

Written against the DirectRunner here; the same pipeline takes `--runner=DataflowRunner`
(or Spark / Flink) options, with a Beam source (e.g. `beam.io.ReadFromText` of JSONL,
parsed into Documents with distinct ordinals) in place of `beam.Create`.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time
from typing import Iterable, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from llm_jax.data.curation import dedup
from llm_jax.data.curation.chain import Chain, Outcome, Trace
from llm_jax.data.curation.documents import Document
from llm_jax.data.curation.quality import Removal
from llm_jax.data.curation.report import Report


class _ReportFn(beam.CombineFn):
    """Reports filled where the documents are and merged: the totals of the local runner."""

    def __init__(self, chain: Chain):
        self.chain = chain

    def create_accumulator(self) -> Report:
        return self.chain.new_report()

    def add_input(self, report: Report, element: tuple[Trace, Outcome]) -> Report:
        self.chain.record(report, *element)
        return report

    def merge_accumulators(self, reports: Iterable[Report]) -> Report:
        reports = list(reports)
        for other in reports[1:]:
            reports[0].merge(other)
        return reports[0]

    def extract_output(self, report: Report) -> Report:
        return report


def _alive_at(k: int):
    """Documents that reach step k: not removed earlier by a filter or an earlier dedup step."""
    def alive(element: tuple[Trace, Outcome | None]) -> bool:
        trace, outcome = element
        return outcome is None and (trace.stop is None or trace.stop > k)
    return alive


def _exact_duplicates(group: tuple[str, Iterable[tuple[int, str]]]):
    members = sorted(group[1])
    first_id = members[0][1]
    for ordinal, _ in members[1:]:
        yield ordinal, first_id


def _near_duplicates(threshold: float):
    def duplicates(group: tuple[bytes, Iterable[tuple[int, str, object]]]):
        members = sorted(group[1], key=lambda m: m[0])
        for i, (ordinal, _, signature) in enumerate(members):
            best = max(((dedup.similarity(signature, s), -o, doc_id) for o, doc_id, s in members[:i]),
                       default=None)
            if best is not None and best[0] >= threshold:
                yield ordinal, (best[0], best[1], best[2])
    return duplicates


def _apply_marks(rule: str, k: int):
    def apply(joined):
        _, (states, marks) = joined
        (trace, outcome), = states
        if outcome is None and marks:
            first = max(marks)[-1]  # the most similar earlier document (exact: the only one)
            outcome = Outcome(k, Removal(rule, f"duplicate of {first}"))
        return trace, outcome
    return apply


class CurateDocuments(beam.PTransform):
    """PCollection[Document] -> (kept PCollection[Document], PCollection[Report] of one element)."""

    def __init__(self, chain: Chain):
        super().__init__()
        self.chain = chain

    def expand(self, documents):
        chain = self.chain
        states = (documents | "Trace" >> beam.Map(chain.trace)
                  | "Undecided" >> beam.Map(lambda t: (t, None)))
        for k, step in enumerate(chain.steps):
            if step.kind == "dedup":
                states = self._dedup(states, k, step)
        # Documents no dedup step removed end where their trace stopped (or are kept).
        final = states | "Decide" >> beam.Map(
            lambda s: (s[0], s[1] if s[1] is not None else Outcome(s[0].stop, s[0].removal)))
        report = final | "Report" >> beam.CombineGlobally(_ReportFn(chain))
        kept = (final | "Kept" >> beam.Filter(lambda s: s[1].stop is None)
                | "AsDocument" >> beam.Map(lambda s: Document(s[0].doc_id, s[0].text, s[0].ordinal, s[0].sizes[-1])))
        return kept, report

    def _dedup(self, states, k: int, step):
        alive = states | f"Alive{k}" >> beam.Filter(_alive_at(k))
        if step.filter == "exact_dedup":
            marks = (alive | f"Hash{k}" >> beam.Map(lambda s: (s[0].signatures[k], (s[0].ordinal, s[0].doc_id)))
                     | f"GroupHash{k}" >> beam.GroupByKey()
                     | f"Exact{k}" >> beam.FlatMap(_exact_duplicates)
                     | f"ExactMark{k}" >> beam.Map(lambda m: (m[0], (1.0, 0, m[1]))))
        else:
            cfg = step.cfg
            bands, rows = dedup.lsh_bands(cfg)
            marks = (alive | f"Bands{k}" >> beam.FlatMap(
                        lambda s: [(key, (s[0].ordinal, s[0].doc_id, s[0].signatures[k]))
                                   for key in dedup.band_keys(s[0].signatures[k].minhash, bands, rows)])
                     | f"GroupBand{k}" >> beam.GroupByKey()
                     | f"Near{k}" >> beam.FlatMap(_near_duplicates(cfg.threshold)))
        keyed = states | f"ByOrdinal{k}" >> beam.Map(lambda s: (s[0].ordinal, s))
        return ({"states": keyed, "marks": marks} | f"Join{k}" >> beam.CoGroupByKey()
                | f"Mark{k}" >> beam.Map(lambda j: _apply_marks(step.rule, k)((j[0], (j[1]["states"], j[1]["marks"])))))


def run_beam(chain: Chain, documents: Iterable[Document], beam_args: Sequence[str] = ()
             ) -> tuple[list[str], Report]:
    """Curate `documents` in a Beam pipeline (DirectRunner unless `beam_args` say otherwise).

    The kept documents come back in input order, as with the local runner.
    """
    args = list(beam_args) or ["--runner=DirectRunner"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        with beam.Pipeline(options=PipelineOptions(args)) as p:
            kept, report = p | "Read" >> beam.Create(list(documents)) | "Curate" >> CurateDocuments(chain)
            (kept | "KeptJson" >> beam.Map(lambda d: json.dumps({"ordinal": d.ordinal, "text": d.text}))
             | "WriteKept" >> beam.io.WriteToText(str(out / "kept"), file_name_suffix=".jsonl"))
            (report | "ReportJson" >> beam.Map(lambda r: json.dumps(r.to_dict()))
             | "WriteReport" >> beam.io.WriteToText(str(out / "report"), file_name_suffix=".json"))
        rows = [json.loads(line) for path in sorted(out.glob("kept*.jsonl")) for line in path.open(encoding="utf-8")]
        report_dict = json.loads(next(out.glob("report*.json")).read_text(encoding="utf-8"))
    rows.sort(key=lambda r: r["ordinal"])
    report = Report.from_dict(report_dict)
    report.workers = 0  # a Beam runner's, not ours
    report.seconds = time.perf_counter() - start
    return [r["text"] for r in rows], report

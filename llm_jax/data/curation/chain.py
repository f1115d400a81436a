"""The chain: steps built from a ChainConfig, run over a stream of documents.

A step is one of three kinds:

    filter      text -> Removal | None                 (quality, classifier, toxicity, decontamination)
    transform   text -> (text, counts per kind)        (privacy)
    dedup       text -> signature; index.find / insert (exact_dedup, near_dedup)

Filters and transforms are pure, and a dedup step's signature is too, so one document's
whole pass (`Chain.trace`) runs anywhere: in this process, in worker processes, or in a
Beam worker. Only the dedup indexes are shared state; `Chain.run` feeds them the traces in
input order (`resolve`), so the result is the same with one worker or many. A document's
fate is the first removal in chain order, whichever kind of step made it.

Files a step needs (word lists, example files, the evaluation set) are read when the
chain is built, so a missing one fails before the first document. An exception inside a
step on one document is not allowed to end a long run: the document is removed with the
reason `<step>:error` and the exception in the report.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import multiprocessing
import time
from typing import Any, Callable, Iterable, Iterator

from llm_jax.data.curation import classifier, decontamination, dedup, privacy, quality, toxicity
from llm_jax.data.curation.config import ChainConfig, InputConfig, StepConfig
from llm_jax.data.curation.documents import Document
from llm_jax.data.curation.quality import Removal
from llm_jax.data.curation.report import EXCERPT_CHARS, Report


# Characters past an excerpt that are scrubbed with it: a 4096-bit RSA private key block
# in PEM is ~3,300.
_SCRUB_WINDOW = 4096


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


# ------------------------------------------------------------------------------- steps


class InputCheck:
    """Step 0: what the reader flagged, empty documents, and documents too long to filter."""

    id = filter = "input"
    kind = "filter"

    def __init__(self, cfg: InputConfig):
        self.cfg = cfg

    def check_document(self, doc: Document) -> Removal | None:
        if doc.problem is not None:
            return Removal(doc.problem, doc.problem_detail)
        if len(doc.text) > self.cfg.max_document_chars:
            return Removal("too_long", f"{len(doc.text):,} chars > max_document_chars {self.cfg.max_document_chars:,}")
        if len("".join(doc.text.split())) < self.cfg.min_document_chars:
            return Removal("empty", f"fewer than {self.cfg.min_document_chars} non-space characters")
        return None


class Filter:
    kind = "filter"

    def __init__(self, step: StepConfig, check: Callable[[str], Removal | None]):
        self.id, self.filter, self.check = step.id, step.filter, check


class Transform:
    kind = "transform"

    def __init__(self, step: StepConfig, apply: Callable[[str], tuple[str, dict[str, int]]]):
        self.id, self.filter, self.apply = step.id, step.filter, apply


class Dedup:
    kind = "dedup"

    def __init__(self, step: StepConfig, signature: Callable[[str], Any], new_index: Callable[[], Any], rule: str):
        self.id, self.filter, self.cfg, self.signature, self.new_index, self.rule = (
            step.id, step.filter, step.settings, signature, new_index, rule)


# Steps are module-level classes and partials of module-level functions (no lambdas or
# closures), so that a chain pickles for worker processes.
class _Classify:
    def __init__(self, cfg: classifier.ClassifierConfig):
        from llm_jax.data.curation.documents import read_examples

        self.threshold = cfg.threshold
        if cfg.model is not None:
            self.model = classifier.HashedNgramClassifier.load(cfg.model)
        else:
            good = read_examples(cfg.good, "classifier good-example file", cfg.text_field)
            bad = read_examples(cfg.bad, "classifier bad-example file", cfg.text_field)
            self.model = classifier.train_classifier(good, bad, n_features=cfg.n_features,
                                                     word_ngrams=cfg.word_ngrams, l2=cfg.l2)

    def __call__(self, text):
        score = self.model.score(text)
        return None if score >= self.threshold else Removal("below_threshold",
                                                            f"P(good)={score:.3f} < {self.threshold:g}")


class _Toxicity:
    def __init__(self, cfg: toxicity.ToxicityConfig):
        self.cfg = cfg
        self.pattern = toxicity.term_pattern(toxicity.read_word_list(cfg.word_list))

    def __call__(self, text):
        found = toxicity.toxic_matches(text, self.pattern, self.cfg)
        if found is None:
            return None
        matches, density = found
        return Removal("word_list", f"{matches} matches, density {density:.4f} > {self.cfg.max_density:g}")


class _Decontaminate:
    def __init__(self, cfg: decontamination.DecontaminationConfig):
        from llm_jax.data.curation.documents import read_examples

        self.cfg = cfg
        texts = read_examples(cfg.eval_path, "decontamination eval_path", cfg.text_field)
        self.grams = decontamination.eval_ngrams(texts, cfg.ngram, cfg.min_words)
        self.short = frozenset(len(g.split()) for g in self.grams if len(g.split()) < cfg.ngram)

    def __call__(self, text):
        found = decontamination.contamination(text, self.grams, self.cfg.ngram, self.cfg.min_matches, self.short)
        if found is None:
            return None
        matches, gram = found
        return Removal("eval_overlap", f"{matches} eval n-gram(s), e.g. {gram[:60]!r}")


def build_step(step: StepConfig):
    cfg = step.settings
    if step.filter == "quality":
        return Filter(step, functools.partial(quality.check_quality, cfg=cfg))
    if step.filter == "classifier":
        return Filter(step, _Classify(cfg))
    if step.filter == "toxicity":
        return Filter(step, _Toxicity(cfg))
    if step.filter == "decontamination":
        return Filter(step, _Decontaminate(cfg))
    if step.filter == "privacy":
        return Transform(step, functools.partial(privacy.scrub, cfg=cfg))
    if step.filter == "exact_dedup":
        return Dedup(step, functools.partial(dedup.exact_signature, cfg=cfg), dedup.ExactIndex, "duplicate")
    if step.filter == "near_dedup":
        return Dedup(step, functools.partial(dedup.minhash_signature, cfg=cfg), functools.partial(dedup.NearIndex, cfg),
                     "near_duplicate")
    raise ValueError(f"no step for filter {step.filter!r}")  # config.FILTERS and this list disagree


# ------------------------------------------------------------------------------- traces


@dataclasses.dataclass
class Trace:
    """One document's pass through the pure part of the chain."""

    doc_id: str
    ordinal: int
    text: str  # after the last step reached
    sizes: list  # UTF-8 bytes entering each step reached (step 0: the raw input bytes)
    counts: dict  # step index -> what a transform replaced
    stop: int | None = None  # the filter step that removed it
    removal: Removal | None = None
    signatures: dict = dataclasses.field(default_factory=dict)  # dedup step index -> signature
    excerpts: dict = dataclasses.field(default_factory=dict)  # step index -> text entering it


@dataclasses.dataclass(frozen=True)
class Outcome:
    """Where a document ended: removed at `stop` by `removal`, or kept (stop None)."""

    stop: int | None
    removal: Removal | None


class Chain:
    """Build with `Chain(config)`; `run(documents)` yields the kept ones and fills `report`."""

    def __init__(self, config: ChainConfig):
        self.config = config
        self.steps = [InputCheck(config.input)] + [build_step(s) for s in config.steps]
        self.report = self.new_report()

    def new_report(self) -> Report:
        return Report.empty([(s.id, s.filter, s.kind) for s in self.steps])

    def trace(self, doc: Document) -> Trace:
        """The pure pass: every filter and transform, and every dedup signature, up to the first removal."""
        trace = Trace(doc.id, doc.ordinal, doc.text, [doc.size_bytes], {})
        removal = self.steps[0].check_document(doc)
        if removal is not None:
            return self._stopped(trace, 0, removal, doc.text)
        text, size = doc.text, _utf8_len(doc.text)
        for i, step in enumerate(self.steps[1:], start=1):
            trace.sizes.append(size)
            try:
                if step.kind == "dedup":
                    trace.signatures[i] = step.signature(text)
                    trace.excerpts[i] = self._excerpt(text, i)
                elif step.kind == "transform":
                    new_text, counts = step.apply(text)
                    if counts:
                        trace.counts[i] = counts
                        text, size = new_text, _utf8_len(new_text)
                else:
                    removal = step.check(text)
            except Exception as e:  # noqa: BLE001 - one bad document must not end the run
                removal = Removal("error", f"{type(e).__name__}: {e}"[:300])
            if removal is not None:
                return self._stopped(trace, i, removal, text)
        trace.text = text
        trace.sizes.append(size)  # what leaves the last step
        return trace

    def _stopped(self, trace: Trace, i: int, removal: Removal, text: str) -> Trace:
        trace.stop, trace.removal, trace.text = i, removal, ""
        trace.excerpts[i] = self._excerpt(text, i)
        return trace

    def _excerpt(self, text: str, i: int) -> str:
        """The start of `text` entering step i, for the report's examples, as the transforms
        from step i on would leave it: report.json must not show the e-mails and keys that
        a privacy step later in the chain keeps out of the corpus. A window well past the
        excerpt is scrubbed (an address or a key block cut by the excerpt's end would not
        match), not the whole text (it may be one enormous line); if a transform fails on
        it, the excerpt is withheld."""
        transforms = [step for step in self.steps[i:] if step.kind == "transform"]
        if not transforms:
            return text[:EXCERPT_CHARS]
        text = text[:EXCERPT_CHARS + _SCRUB_WINDOW]
        try:
            for step in transforms:
                text = step.apply(text)[0]
        except Exception:  # noqa: BLE001 - the document's own removal already says what went wrong
            return ""
        return text[:EXCERPT_CHARS]

    def new_indexes(self) -> dict[int, Any]:
        return {i: s.new_index() for i, s in enumerate(self.steps) if s.kind == "dedup"}

    def resolve(self, trace: Trace, indexes: dict[int, Any]) -> Outcome:
        """Decide the document's fate against the dedup indexes (fed in input order).

        Only documents that end up in the corpus enter the indexes: a document that a later
        step removes cannot make its near-copy a duplicate of something that is not there.
        """
        limit = len(self.steps) if trace.stop is None else trace.stop
        dedup_steps = [i for i in sorted(trace.signatures) if i < limit]
        for i in dedup_steps:
            first = indexes[i].find(trace.signatures[i])
            if first is not None:
                return Outcome(i, Removal(self.steps[i].rule, f"duplicate of {first}"))
        if trace.stop is None:
            for i in dedup_steps:
                indexes[i].insert(trace.ordinal, trace.doc_id, trace.signatures[i])
        return Outcome(trace.stop, trace.removal)

    def record(self, report: Report, trace: Trace, outcome: Outcome) -> None:
        kept = outcome.stop is None
        report.add(trace.sizes, trace.counts, outcome.stop, *(("", "") if kept else outcome.removal),
                   doc_id=trace.doc_id, excerpt=trace.excerpts.get(outcome.stop, ""),
                   kept_bytes=trace.sizes[-1] if kept else 0)

    def run(self, documents: Iterable[Document], *, workers: int = 1, batch_size: int = 64) -> Iterator[Document]:
        """The kept documents (cleaned text), in input order; `self.report` counts everything."""
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        self.report = report = self.new_report()
        report.workers = workers
        indexes = self.new_indexes()
        start = time.perf_counter()
        try:
            for trace in _traces(self, documents, workers, batch_size):
                outcome = self.resolve(trace, indexes)
                self.record(report, trace, outcome)
                if outcome.stop is None:
                    yield Document(trace.doc_id, trace.text, trace.ordinal, trace.sizes[-1])
        finally:
            report.seconds = time.perf_counter() - start


# ------------------------------------------------------------------- worker processes

_WORKER_CHAIN: Chain | None = None


def _init_worker(chain: Chain) -> None:
    global _WORKER_CHAIN
    _WORKER_CHAIN = chain


def _trace_batch(docs: list[Document]) -> list[Trace]:
    return [_WORKER_CHAIN.trace(d) for d in docs]


def _batches(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _traces(chain: Chain, documents: Iterable[Document], workers: int, batch_size: int) -> Iterator[Trace]:
    """Traces in input order; with workers > 1, computed in a process pool.

    At most 2 batches per worker are in flight, so memory stays bounded however long the
    input is (Pool.imap would read the whole input ahead).
    """
    if workers == 1:
        yield from map(chain.trace, documents)
        return
    # spawn, not fork: the parent may hold threads (tfds, JAX) that fork would copy
    # mid-state. A worker that dies makes the pool raise (BrokenProcessPool), not hang.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                initargs=(chain,)) as pool:
        pending: collections.deque = collections.deque()
        for batch in _batches(documents, batch_size):
            pending.append(pool.submit(_trace_batch, batch))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()

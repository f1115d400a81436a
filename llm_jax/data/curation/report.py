"""The curation report: for every step, documents and bytes in, kept and removed by reason.

Every input document is either kept or removed by exactly one (step, rule), the first
that removed it, so `input documents == kept + sum of removals` always holds; `check()`
verifies it and `to_dict()` records it under "totals". Byte counts add up the same way
except for what transforms changed, which each transform step shows as bytes in vs out.
Reports merge (`merge`), so parallel workers or a Beam combiner can each fill one.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

MAX_EXAMPLES = 3
EXCERPT_CHARS = 160


@dataclasses.dataclass
class ReasonStats:
    docs: int = 0
    bytes: int = 0
    examples: list = dataclasses.field(default_factory=list)  # [{"id", "detail", "text"}]


@dataclasses.dataclass
class StepStats:
    id: str
    filter: str
    kind: str  # "filter", "transform" or "dedup"
    docs_in: int = 0
    bytes_in: int = 0
    docs_out: int = 0
    bytes_out: int = 0
    removed: dict = dataclasses.field(default_factory=dict)  # rule -> ReasonStats
    counts: dict = dataclasses.field(default_factory=dict)  # what a transform replaced, by kind


@dataclasses.dataclass
class Report:
    steps: list  # StepStats, the input checks first
    kept_docs: int = 0
    kept_bytes: int = 0
    seconds: float = 0.0
    workers: int = 1

    @classmethod
    def empty(cls, steps: list[tuple[str, str, str]]) -> "Report":
        """A report for steps given as (id, filter, kind)."""
        return cls(steps=[StepStats(*s) for s in steps])

    @property
    def input_docs(self) -> int:
        return self.steps[0].docs_in

    @property
    def input_bytes(self) -> int:
        return self.steps[0].bytes_in

    @property
    def removed_docs(self) -> int:
        return sum(r.docs for s in self.steps for r in s.removed.values())

    def add(self, sizes: list[int], counts: dict[int, dict[str, int]], stop: int | None, rule: str = "",
            detail: str = "", doc_id: str = "", excerpt: str = "", kept_bytes: int = 0) -> None:
        """Record one document: `sizes[i]` bytes entered step i; removed at `stop` (None: kept)."""
        last = len(self.steps) - 1 if stop is None else stop
        for i in range(last + 1):
            step = self.steps[i]
            step.docs_in += 1
            step.bytes_in += sizes[i]
            for kind, n in counts.get(i, {}).items():
                step.counts[kind] = step.counts.get(kind, 0) + n
            if i < last or stop is None:
                step.docs_out += 1
                step.bytes_out += sizes[i + 1] if i + 1 < len(sizes) else kept_bytes
        if stop is None:
            self.kept_docs += 1
            self.kept_bytes += kept_bytes
            return
        reason = self.steps[stop].removed.setdefault(rule, ReasonStats())
        reason.docs += 1
        reason.bytes += sizes[stop]
        if len(reason.examples) < MAX_EXAMPLES:
            reason.examples.append({"id": doc_id, "detail": detail, "text": excerpt[:EXCERPT_CHARS]})

    def merge(self, other: "Report") -> "Report":
        """Add `other`'s counts into this report (same steps)."""
        if [s.id for s in self.steps] != [s.id for s in other.steps]:
            raise ValueError("cannot merge reports of different chains")
        for mine, theirs in zip(self.steps, other.steps):
            for name in ("docs_in", "bytes_in", "docs_out", "bytes_out"):
                setattr(mine, name, getattr(mine, name) + getattr(theirs, name))
            for kind, n in theirs.counts.items():
                mine.counts[kind] = mine.counts.get(kind, 0) + n
            for rule, r in theirs.removed.items():
                m = mine.removed.setdefault(rule, ReasonStats())
                m.docs += r.docs
                m.bytes += r.bytes
                m.examples = (m.examples + r.examples)[:MAX_EXAMPLES]
        self.kept_docs += other.kept_docs
        self.kept_bytes += other.kept_bytes
        return self

    def check(self) -> None:
        """Every input document kept or removed exactly once; each step passes on what it keeps."""
        if self.input_docs != self.kept_docs + self.removed_docs:
            raise RuntimeError(f"report does not add up: {self.input_docs} input documents, {self.kept_docs} kept, "
                               f"{self.removed_docs} removed")
        for before, after in zip(self.steps, self.steps[1:]):
            if before.docs_out != after.docs_in:
                raise RuntimeError(f"step {before.id} passed on {before.docs_out} documents but {after.id} "
                                   f"received {after.docs_in}")

    def reasons(self) -> list[tuple[str, ReasonStats]]:
        """("step:rule", stats) for every removal reason, in chain order."""
        return [(f"{s.id}:{rule}", r) for s in self.steps for rule, r in sorted(s.removed.items())]

    def to_dict(self) -> dict[str, Any]:
        return {
            "totals": {"input_docs": self.input_docs, "input_bytes": self.input_bytes,
                       "kept_docs": self.kept_docs, "kept_bytes": self.kept_bytes,
                       "removed_docs": self.removed_docs,
                       "balanced": self.input_docs == self.kept_docs + self.removed_docs},
            "seconds": round(self.seconds, 3),
            "workers": self.workers,
            "steps": [dataclasses.asdict(s) for s in self.steps],
            "removed_by_reason": {name: r.docs for name, r in self.reasons()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        """The inverse of `to_dict` (how a Beam pipeline's report comes back)."""
        steps = []
        for s in d["steps"]:
            removed = {rule: ReasonStats(**r) for rule, r in s["removed"].items()}
            steps.append(StepStats(**{**s, "removed": removed}))
        totals = d["totals"]
        return cls(steps=steps, kept_docs=totals["kept_docs"], kept_bytes=totals["kept_bytes"],
                   seconds=d.get("seconds", 0.0), workers=d.get("workers", 1))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def table(self) -> str:
        """The report as a plain-text table for the terminal."""
        n = max(1, self.input_docs)
        lines = [f"{'step':18s} {'reason':24s} {'docs':>9s} {'% in':>6s} {'MB':>9s}  example",
                 "-" * 96]
        for s in self.steps:
            for rule, r in sorted(s.removed.items()):
                example = r.examples[0] if r.examples else {"id": "", "detail": ""}
                note = f"{example['id']}: {example['detail']}"[:60]
                lines.append(f"{s.id:18s} {rule:24s} {r.docs:9,d} {100 * r.docs / n:5.1f}% {r.bytes / 1e6:9.3f}"
                             f"  {note}")
            if s.counts:
                counts = ", ".join(f"{k} {v:,}" for k, v in sorted(s.counts.items()))
                lines.append(f"{s.id:18s} {'(replaced)':24s} {'':>9s} {'':>6s} {'':>9s}  {counts}"[:160])
        lines.append("-" * 96)
        lines.append(f"{'input':18s} {'':24s} {self.input_docs:9,d} {'':>6s} {self.input_bytes / 1e6:9.3f}")
        lines.append(f"{'removed':18s} {'':24s} {self.removed_docs:9,d} {100 * self.removed_docs / n:5.1f}%")
        lines.append(f"{'kept':18s} {'':24s} {self.kept_docs:9,d} {100 * self.kept_docs / n:5.1f}%"
                     f" {self.kept_bytes / 1e6:9.3f}")
        rate = self.input_docs / self.seconds if self.seconds else float("nan")
        where = f"{self.workers} worker process(es)" if self.workers else "a Beam runner"
        lines.append(f"{self.seconds:.1f} s on {where}, {rate:,.0f} docs/s")
        return "\n".join(lines)

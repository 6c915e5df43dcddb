"""The summary of a scoring run: counts, rejection and OOD shares, accuracy estimates.

With a calibrated model the mean confidence of the accepted predictions estimates their
accuracy without labels; :class:`Summary` reports that estimate and, when labels are
given, the true accuracy after Hungarian matching beside it. :class:`Tally` keeps what
the summary needs of every row (in compact arrays, so memory stays small however many
inputs a run scores); ``Tally.summary`` fills a Summary from it.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cdc_serve.client import Prediction


@dataclass
class Summary:
    """Counts and accuracy estimates of a scoring run (``format()`` prints them)."""

    n: int = 0
    n_errors: int = 0
    n_rejected: int = 0
    n_ood: int = 0
    n_resumed: int = 0
    reject_below: float = 0.8
    ood_score_name: str = ""
    estimated_accuracy_accepted: float | None = None
    estimated_accuracy_all: float | None = None
    true_accuracy_accepted: float | None = None
    true_accuracy_rejected: float | None = None
    true_accuracy_all: float | None = None
    output: str | None = None
    model: str = ""
    seconds: float = 0.0
    first_error: str | None = None  # the first error row's message
    notes: list[str] = field(default_factory=list)

    @property
    def n_scored(self) -> int:
        return self.n - self.n_errors

    @property
    def n_accepted(self) -> int:
        return self.n_scored - self.n_rejected

    @property
    def share_rejected(self) -> float | None:
        return self.n_rejected / self.n_scored if self.n_scored else None

    @property
    def share_ood(self) -> float | None:
        return self.n_ood / self.n_scored if self.n_scored else None

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items()}
        data.update(
            n_scored=self.n_scored,
            n_accepted=self.n_accepted,
            share_rejected=self.share_rejected,
            share_ood=self.share_ood,
        )
        return data

    def format(self) -> str:
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.1f} %"

        def acc(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        rate = f", {self.n / self.seconds:.0f} inputs/s" if self.seconds > 0 and self.n else ""
        lines = [
            f"scored {self.n} inputs with {self.model} in {self.seconds:.1f} s{rate}"
            + (f" ({self.n_resumed} from the earlier run)" if self.n_resumed else ""),
            f"  errors (unreadable inputs, refused requests): {self.n_errors}"
            + (f"; first: {self.first_error}" if self.first_error else ""),
            f"  rejected (confidence < {self.reject_below:g}): {self.n_rejected} ({pct(self.share_rejected)})",
            f"  flagged OOD ({self.ood_score_name}): {self.n_ood} ({pct(self.share_ood)})",
            "",
            f"  {'':10}{'count':>9}{'est. accuracy':>16}{'true accuracy':>16}",
        ]
        show_true = self.true_accuracy_all is not None
        rows = [
            (
                "accepted",
                self.n_accepted,
                self.estimated_accuracy_accepted,
                self.true_accuracy_accepted,
            ),
            ("rejected", self.n_rejected, None, self.true_accuracy_rejected),
            ("all", self.n_scored, self.estimated_accuracy_all, self.true_accuracy_all),
        ]
        for name, count, est, true in rows:
            lines.append(f"  {name:10}{count:>9}{acc(est):>16}{acc(true) if show_true else '':>16}")
        lines.append(
            "  (est. accuracy = mean calibrated confidence; true accuracy after Hungarian matching)"
        )
        if self.output:
            lines.append(f"output: {self.output}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class Tally:
    """Per-row results in input order (compact arrays), for the summary."""

    def __init__(self) -> None:
        self.cluster = array("q")  # -1 for error rows
        self.confidence = array("f")
        self.rejected = array("b")
        self.ood = array("b")
        self.first_error: str | None = None

    def add(self, p: Prediction) -> None:
        ok = p.error is None and p.cluster_id is not None
        if p.error and self.first_error is None:
            self.first_error = p.error
        self.cluster.append(p.cluster_id if ok else -1)  # type: ignore[arg-type]
        self.confidence.append(p.confidence if ok else float("nan"))  # type: ignore[arg-type]
        self.rejected.append(bool(p.rejected) if ok else False)
        self.ood.append(bool(p.ood) if ok else False)

    def summary(self, summary: Summary, labels: np.ndarray | None) -> Summary:
        cluster = np.asarray(self.cluster, dtype=np.int64)
        conf = np.asarray(self.confidence, dtype=np.float64)
        rejected = np.asarray(self.rejected, dtype=bool)
        valid = cluster >= 0
        accepted = valid & ~rejected
        summary.n = len(cluster)
        summary.n_errors = int((~valid).sum())
        summary.first_error = self.first_error
        summary.n_rejected = int(rejected.sum())
        summary.n_ood = int(np.asarray(self.ood, dtype=bool).sum())
        if accepted.any():
            summary.estimated_accuracy_accepted = float(conf[accepted].mean())
        if valid.any():
            summary.estimated_accuracy_all = float(conf[valid].mean())
        if labels is not None:
            if len(labels) != len(cluster):
                summary.notes.append(
                    f"labels ignored: {len(labels)} labels for {len(cluster)} inputs"
                )
            elif valid.any():
                from cdc_serve.metrics import hungarian_match

                mapping = hungarian_match(labels[valid], cluster[valid])
                matched = np.full(len(cluster), -2, dtype=np.int64)
                matched[valid] = mapping[cluster[valid]]
                correct = matched == labels
                summary.true_accuracy_all = float(correct[valid].mean())
                if accepted.any():
                    summary.true_accuracy_accepted = float(correct[accepted].mean())
                if (valid & rejected).any():
                    summary.true_accuracy_rejected = float(correct[valid & rejected].mean())
        return summary

"""``index.html`` of ``cdc-serve report``: one static page, no script, no network.

:func:`render` turns a :class:`cdc_serve.report.Report` into the page: a headline, the
summary table (and the reliability diagram when labels were given), a table of the
clusters linking to their sections, then one section per cluster with its facts and
its contact sheet. Images are linked by relative file names, so the folder can be
moved or zipped as it is. Every piece of text that comes from the data (file names,
sources, error messages) goes through :func:`html.escape`.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cdc_serve.report import ClusterSummary, Report

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #222; background: #f6f7f9; margin: 0; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 6px; }
h2 { font-size: 20px; margin: 34px 0 10px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
p.lead { font-size: 17px; color: #333; margin: 4px 0 18px; }
code { font-size: 0.92em; background: #f0f1f4; padding: 1px 4px; border-radius: 3px; }
.summary { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
table { border-collapse: collapse; }
table.facts th { text-align: left; font-weight: 600; padding: 4px 18px 4px 0; vertical-align: top; }
table.facts td { padding: 4px 0; }
table.clusters { width: 100%; }
table.clusters th, table.clusters td { padding: 5px 10px; text-align: right; }
table.clusters th { border-bottom: 2px solid #ccc; font-weight: 600; }
table.clusters tr:nth-child(even) td { background: #f7f8fa; }
table.clusters td:first-child, table.clusters th:first-child { text-align: left; }
.meter { display: inline-block; width: 70px; height: 9px; background: #e4e7ec; margin-left: 8px;
         border-radius: 2px; vertical-align: middle; }
.meter span { display: block; height: 100%; background: #1f5fbf; border-radius: 2px; }
.muted { color: #666; }
.cluster .body { display: flex; flex-wrap: wrap; gap: 22px; align-items: flex-start; }
.cluster table.facts { min-width: 230px; }
.cluster img { border: 1px solid #ddd; }
details { margin: 6px 0; } details li { font-family: monospace; font-size: 13px; }
figure { margin: 0; } figcaption { font-size: 13px; color: #555; }
.legend span.box { display: inline-block; width: 14px; height: 5px; margin: 0 4px 2px 10px; }
a { color: #1f5fbf; }
"""


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _meter(value: float) -> str:
    width = max(0.0, min(100.0, 100 * value))
    return f'<span class="meter"><span style="width: {width:.0f}%"></span></span>'


def _facts(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)
    return f'<table class="facts">{cells}</table>'


def _examples(title: str, messages: list[str], total: int) -> str:
    if not messages:
        return ""
    items = "".join(f"<li>{escape(m)}</li>" for m in messages)
    more = f"<li>... and {total - len(messages)} more</li>" if total > len(messages) else ""
    return f"<details><summary>{escape(title)}</summary><ul>{items}{more}</ul></details>"


def _headline(report: Report) -> str:
    est = report.mean_confidence
    text = (
        f"{report.n_scored:,} images in {len(report.clusters)} clusters. Their mean calibrated "
        f"confidence, <b>{est:.3f}</b>, estimates the share of images in the right cluster "
        f"without any label; {_pct(report.n_accepted, report.n_scored)} are accepted "
        f"(rejected: {escape(report.rejection)})."
    )
    if report.accuracy is not None:
        text += f" With the labels: accuracy <b>{report.accuracy:.3f}</b>, ECE {report.ece:.3f}."
    return f'<p class="lead">{text}</p>'


def _summary_rows(report: Report) -> list[tuple[str, str]]:
    empty = report.empty_clusters
    rows = [
        ("Predictions", f"<code>{escape(str(report.predictions))}</code>"),
        ("Rows", f"{report.n_rows:,}"),
        ("Errors", f"{report.n_errors:,} (inputs predict could not read)"),
        ("Clusters", f"{report.num_clusters} ({len(report.clusters)} with images)"),
        ("Empty clusters", ", ".join(map(str, empty)) if empty else "none"),
        ("Mean confidence", f"{report.mean_confidence:.3f} (the label-free accuracy estimate)"),
        ("Accepted", f"{report.n_accepted:,} ({_pct(report.n_accepted, report.n_scored)})"),
        ("Rejected", f"{report.n_scored - report.n_accepted:,} ({escape(report.rejection)})"),
        ("Flagged OOD", f"{report.n_ood:,}" if report.has_ood else "no <code>ood</code> column"),
    ]
    if report.accuracy is not None:
        rows += [
            ("Accuracy", f"{report.accuracy:.3f} of {report.n_labelled:,} labelled "
                         "(Hungarian matching)"),
            ("Accuracy, accepted", _num(report.accuracy_accepted)),
            ("ECE", f"{report.ece:.3f} (15 bins)"),
            ("Labels", escape(str(report.labels_from))),
        ]  # fmt: skip
    rows.append(("Unreadable sources", f"{report.n_unreadable:,} (tiles left grey)"))
    return rows


def _summary(report: Report) -> str:
    parts = [_facts(_summary_rows(report))]
    if report.reliability:
        parts.append(
            f'<figure><img src="{escape(report.reliability)}" width="400" height="400" '
            'alt="Reliability diagram: accuracy against confidence"><figcaption>Reliability '
            "diagram: accuracy per confidence bin against the diagonal.</figcaption></figure>"
        )
    details = _examples("Error rows", report.error_examples, report.n_errors)
    details += _examples("Unreadable sources", report.unreadable_examples, report.n_unreadable)
    notes = "".join(f'<p class="muted">Note: {escape(n)}</p>' for n in report.notes)
    return f'<div class="summary">{"".join(parts)}</div>{details}{notes}'


def _cluster_table(report: Report) -> str:
    labelled = report.accuracy is not None
    head = ["Cluster", "Images", "Share", "Mean confidence", "Accepted", "Rejected", "OOD"]
    head += ["Accuracy", "Matched class"] if labelled else []
    lines = ["<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for c in report.clusters:
        cells = [
            f'<a href="#cluster-{c.cluster_id}">{c.cluster_id}</a>',
            f"{c.size:,}",
            _pct(c.size, report.n_scored),
            f"{c.mean_confidence:.3f}{_meter(c.mean_confidence)}",
            _pct(c.n_accepted, c.size),
            f"{c.n_rejected:,}",
            f"{c.n_ood:,}" if report.has_ood else "-",
        ]
        if labelled:
            matched = "-" if c.matched_class is None else str(c.matched_class)
            cells += [_num(c.accuracy), matched]
        lines.append("<tr>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    return f'<table class="clusters">{"".join(lines)}</table>'


def _cluster_section(report: Report, c: ClusterSummary, size: tuple[int, int]) -> str:
    rows = [
        ("Images", f"{c.size:,} ({_pct(c.size, report.n_scored)})"),
        ("Mean confidence", f"{c.mean_confidence:.3f}"),
        ("Accepted", f"{c.n_accepted:,} ({_pct(c.n_accepted, c.size)})"),
        ("Rejected", f"{c.n_rejected:,}"),
        ("Flagged OOD", f"{c.n_ood:,}" if report.has_ood else "-"),
    ]
    if c.accuracy is not None:
        matched = "unmatched" if c.matched_class is None else f"matched to class {c.matched_class}"
        rows.append(("Accuracy", f"{c.accuracy:.3f} ({matched})"))
    image = (
        f'<img src="{escape(c.sheet)}" width="{size[0]}" height="{size[1]}" '
        f'alt="Contact sheet of cluster {c.cluster_id}">'
    )
    return (
        f'<section class="cluster" id="cluster-{c.cluster_id}"><h2>Cluster {c.cluster_id}</h2>'
        f'<div class="body">{_facts(rows)}{image}</div>'
        '<p class="muted"><a href="#top">back to the top</a></p></section>'
    )


def _legend(report: Report) -> str:
    text = "Each thumbnail's caption is its calibrated confidence."
    if report.accuracy is not None:
        text += (
            ' The bar under it: <span class="box" style="background:#2a9d4b"></span>right'
            '<span class="box" style="background:#d1495b"></span>wrong, after matching clusters '
            "to classes."
        )
    return f'<p class="muted legend">{text}</p>'


def render(report: Report) -> str:
    """The whole page as a string (UTF-8 HTML5)."""
    size = report.sheet_size
    title = f"Clusters of {report.predictions.name}"
    sections = "".join(_cluster_section(report, c, size) for c in report.clusters)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n"
        f'<body><main id="top"><h1>{escape(title)}</h1>{_headline(report)}'
        f"{_summary(report)}<h2>Clusters</h2>{_cluster_table(report)}{_legend(report)}"
        f"{sections}"
        '<p class="muted">Written by <code>cdc-serve report</code>.</p></main></body></html>\n'
    )

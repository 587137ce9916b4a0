"""Benchmark building blocks: question sets, answer records, ``summary.json``, ``report.md``, plots.

The ``leapdecode bench`` command runs the methods; these modules load the questions and turn the
per-question records into numbers, tables and PNGs. Plots import matplotlib only when called.
"""

from leapdecode.bench.questions import (
    DEFAULT_SUITE,
    Question,
    categories_of,
    load_questions,
    resolve_questions_path,
)
from leapdecode.bench.report import format_table, write_report
from leapdecode.bench.summary import (
    AnswerRecord,
    build_summary,
    compare_to_reference,
    machine_description,
    read_answers,
    write_answers,
    write_summary,
)


def write_plots(out_dir, summary, records):
    """Write the three PNG plots into ``out_dir`` (see ``leapdecode.bench.plots``)."""
    from leapdecode.bench.plots import write_plots as _write_plots

    return _write_plots(out_dir, summary, records)


__all__ = [
    "DEFAULT_SUITE",
    "AnswerRecord",
    "Question",
    "build_summary",
    "categories_of",
    "compare_to_reference",
    "format_table",
    "load_questions",
    "machine_description",
    "read_answers",
    "resolve_questions_path",
    "write_answers",
    "write_plots",
    "write_report",
    "write_summary",
]

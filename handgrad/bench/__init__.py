"""Benchmarks of the hand-written backward passes against XLA's autodiff: what ``handgrad
bench`` runs.

- :mod:`handgrad.bench.workloads`: the catalogue (families of workloads, per-workload targets);
  a new family is a function registered with :func:`family`.
- :mod:`handgrad.bench.harness`: compiling, checking agreement, timing in paired rounds,
  residual and compiled memory.
- :mod:`handgrad.bench.report`: the targets summary, ``bench.md`` and the console tables.

    from handgrad import bench
    work, memory = bench.plan(quick=True)
    records, memory_records = bench.run(work, memory, settings, settings)
"""

from handgrad.bench.harness import Settings as Settings
from handgrad.bench.harness import Variant as Variant
from handgrad.bench.harness import check_agreement as check_agreement
from handgrad.bench.harness import environment as environment
from handgrad.bench.harness import measure as measure
from handgrad.bench.harness import run as run
from handgrad.bench.report import print_report as print_report
from handgrad.bench.report import render_markdown as render_markdown
from handgrad.bench.report import summarize_targets as summarize_targets
from handgrad.bench.workloads import SECTIONS as SECTIONS
from handgrad.bench.workloads import MemoryWorkload as MemoryWorkload
from handgrad.bench.workloads import Target as Target
from handgrad.bench.workloads import Workload as Workload
from handgrad.bench.workloads import family as family
from handgrad.bench.workloads import memory_workload as memory_workload
from handgrad.bench.workloads import plan as plan
from handgrad.bench.workloads import vjp_workload as vjp_workload

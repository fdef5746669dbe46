"""The reproduction study of HetLoRA's claims (hetlora.study): ``--preset cpu`` (≤ 90 min on 2 cores) or ``gpu``.

    python benchmarks/reproduce.py --preset cpu            # runs what is missing, then rebuilds the report
    python benchmarks/reproduce.py --preset gpu --budget-minutes 8
    python benchmarks/reproduce.py --preset cpu --report-only

Results: benchmarks/results/<preset>/{study.json, study.md, plots/, runs/<label>-s<seed>/, tuning/}.
Finished runs are skipped, so a study continues across sittings and machines.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hetlora.study import PRESETS, Study, write_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--work", default="runs/study", help="run directories (checkpoints, adapters); not committed")
    p.add_argument("--budget-minutes", type=float, default=None, help="start no new run after this long")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    started = time.perf_counter()
    study = Study(args.preset, Path(args.results), Path(args.work),
                  budget_seconds=args.budget_minutes * 60 if args.budget_minutes else None,
                  log=lambda m: print(m, flush=True))
    if not args.report_only:
        study.run_all()
    path = write_report(study, wall_seconds=time.perf_counter() - started)
    print(f"report: {path} ({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()

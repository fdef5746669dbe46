"""The reproduction study, the same as ``hetlora study`` of HetLoRA's claims (hetlora.study): ``--preset cpu`` (≤ 90 min on 2 cores) or ``gpu``.

    python benchmarks/reproduce.py --preset cpu            # runs what is missing, then rebuilds the report
    python benchmarks/reproduce.py --preset gpu --budget-minutes 8
    python benchmarks/reproduce.py --preset cpu --report-only

Results: benchmarks/results/<preset>/{study.json, study.md, plots/, runs/<label>-s<seed>/, tuning/}.
Finished runs are skipped, so a study continues across sittings and machines.
"""

import sys

from hetlora.cli import app

if __name__ == "__main__":
    app(["study", *sys.argv[1:]], prog_name="reproduce.py")

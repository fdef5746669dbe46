"""The reproduction study, the same as ``hetlora study`` of HetLoRA's claims (hetlora.study.runs): ``--preset cpu`` (≤ 90 min on 2 cores) or ``gpu``.

    python benchmarks/reproduce.py --preset cpu            # runs what is missing, then rebuilds the report
    python benchmarks/reproduce.py --preset gpu --budget-minutes 8
    python benchmarks/reproduce.py --preset cpu --report-only
    python benchmarks/reproduce.py --smoke --json F       # the smoke preset's report in a temporary directory (tests)

Results: benchmarks/results/<preset>/{study.json, study.md, plots/, runs/<label>-s<seed>/, tuning/}.
Finished runs are skipped, so a study continues across sittings and machines.
"""

import sys
from pathlib import Path

from hetlora.cli import app


def smoke(json_out: Path | None) -> None:
    """The command this script wraps answers (its help) and the presets it offers are listed: seconds. The study
    itself is tested on its smoke preset in tests/study/; a full run is what this script is for."""
    import json

    from hetlora.study.runs import PRESETS

    app(["study", "--help"], prog_name="reproduce.py", standalone_mode=False)
    presets = {name: {"seeds": list(p.seeds), "labels": list(p.labels), "results_dir": p.results_dir or name}
               for name, p in PRESETS.items()}
    print(json.dumps(presets, indent=1)[:400])
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"presets": presets}, indent=1))


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--smoke" in args:
        smoke(Path(args[args.index("--json") + 1]) if "--json" in args else None)
    else:
        app(["study", *args], prog_name="reproduce.py")

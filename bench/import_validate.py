"""Import and validation throughput on N synthetic preference pairs (default 100,000).

    python bench/import_validate.py --rows 100000

Times the importer's streaming conversion (tasks.importers.convert) and the Great Expectations
validation (tasks.validate.validate_files) separately, with peak RSS. Goals: import over 20,000
rows/s, validation of 100,000 pairs under 10 s, on 2 cores. Prints a table, or one JSON object
with --json; writes bench/results/import_validate.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks import scenario  # noqa: E402
from tasks.config import ValidateConfig  # noqa: E402
from tasks.importers import convert  # noqa: E402
from tasks.records import PreferenceRecord  # noqa: E402
from tasks.validate import validate_files  # noqa: E402


def synthetic(path: Path, n: int) -> None:
    rng = random.Random(0)
    professions = list(scenario.FEEDBACK_PROFESSIONS)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            prompt = f"{scenario.prompt_for(rng.choice(professions))} ({i})"
            s, p = rng.choice(scenario.CONTINUATIONS)
            f.write(PreferenceRecord(prompt=prompt, chosen=f" they {p} .", rejected=f" he {s} .", source="simulated",
                                     annotator="bench", round=1, created_at="2026-11-01T00:00:00+00:00").to_json() + "\n")


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.rows < 1:
        raise SystemExit("--rows must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic(tmp / "in.jsonl", a.rows)
        t0 = time.perf_counter()
        summary = convert(tmp / "in.jsonl", "jsonl", {}, 1, tmp / "kept.jsonl", tmp / "bad.jsonl")
        t_import = time.perf_counter() - t0
        rss_import = peak_rss_gib()
        t0 = time.perf_counter()
        result = validate_files([tmp / "kept.jsonl"], ValidateConfig(min_rows=1), tmp / "gx")
        t_validate = time.perf_counter() - t0
    out = {"rows": a.rows, "device": f"cpu ({os.cpu_count()} cores)",
           "import": {"seconds": round(t_import, 2), "rows_per_s": round(a.rows / t_import), "kept": summary.kept,
                      "peak_rss_gib_after": rss_import},
           "validate": {"seconds": round(t_validate, 2), "rows_per_s": round(a.rows / t_validate),
                        "accepted": len(result.accepted), "peak_rss_gib_after": peak_rss_gib()}}
    folder = Path(__file__).parent / "results"
    folder.mkdir(exist_ok=True)
    (folder / "import_validate.json").write_text(json.dumps(out, indent=2))
    if a.json:
        print(json.dumps(out))
        return
    print(f"{'step':<10}{'rows':>9}{'seconds':>9}{'rows/s':>9}{'peak RSS GiB':>14}  device")
    for step in ("import", "validate"):
        r = out[step]
        print(f"{step:<10}{a.rows:>9}{r['seconds']:>9}{r['rows_per_s']:>9}{r['peak_rss_gib_after']:>14}  {out['device']}")


if __name__ == "__main__":
    main()

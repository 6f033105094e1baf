"""Import and validation throughput on N synthetic preference pairs (default 100,000).

    python bench/import_validate.py --rows 100000
    python bench/import_validate.py --rows 100000 --format label-studio   # one JSON array of tasks

Times the import (the format told as `rlhf import` tells it, tasks.importers.detect_format, then
the conversion, tasks.importers.convert) and the Great Expectations validation
(tasks.validate.validate_files) separately, with peak RSS. `--format jsonl` writes our records
as JSON lines (streamed); `label-studio` a pairwise export, one JSON array read whole. Goals:
import over 20,000 rows/s, validation of 100,000 pairs under 10 s, on 2 cores. Prints a table,
or one JSON object with --json; writes import_validate.json to --out (default bench/results).
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
from tasks.importers import convert, detect_format  # noqa: E402
from tasks.records import PreferenceRecord  # noqa: E402
from tasks.validate import validate_files  # noqa: E402


def synthetic(path: Path, n: int, fmt: str = "jsonl") -> None:
    rng = random.Random(0)
    professions = list(scenario.FEEDBACK_PROFESSIONS)
    with open(path, "w", encoding="utf-8") as f:
        if fmt == "label-studio":
            f.write("[")
        for i in range(n):
            prompt = f"{scenario.prompt_for(rng.choice(professions))} ({i})"
            s, p = rng.choice(scenario.CONTINUATIONS)
            chosen, rejected = f" they {p} .", f" he {s} ."
            if fmt == "label-studio":  # the neutral answer left or right, picked as such
                left = rng.random() < 0.5
                f.write(("," if i else "") + json.dumps({
                    "id": i, "data": {"prompt": prompt, "answer1": chosen if left else rejected,
                                      "answer2": rejected if left else chosen},
                    "annotations": [{"completed_by": 1, "created_at": "2026-11-01T00:00:00Z", "result": [
                        {"type": "pairwise", "value": {"selected": "left" if left else "right"}}]}]}))
                continue
            f.write(PreferenceRecord(prompt=prompt, chosen=chosen, rejected=rejected, source="simulated",
                                     annotator="bench", round=1, created_at="2026-11-01T00:00:00+00:00").to_json() + "\n")
        if fmt == "label-studio":
            f.write("]")


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--format", choices=("jsonl", "label-studio"), default="jsonl",
                   help="the file imported: our records as JSON lines, or a Label Studio export (default jsonl)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="folder for import_validate.json (default bench/results)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.rows < 1:
        p.error(f"--rows must be at least 1, got {a.rows}")
    if a.out.exists() and not a.out.is_dir():
        p.error(f"--out {a.out} is a file, not a folder")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / ("in.json" if a.format == "label-studio" else "in.jsonl")
        synthetic(source, a.rows, a.format)
        t0 = time.perf_counter()
        summary = convert(source, detect_format(source), {}, 1, tmp / "kept.jsonl", tmp / "bad.jsonl")
        t_import = time.perf_counter() - t0
        rss_import = peak_rss_gib()
        t0 = time.perf_counter()
        result = validate_files([tmp / "kept.jsonl"], ValidateConfig(min_rows=1), tmp / "gx")
        t_validate = time.perf_counter() - t0
    out = {"rows": a.rows, "format": a.format, "device": f"cpu ({os.cpu_count()} cores)",
           "import": {"seconds": round(t_import, 2), "rows_per_s": round(a.rows / t_import), "kept": summary.kept,
                      "peak_rss_gib_after": rss_import},
           "validate": {"seconds": round(t_validate, 2), "rows_per_s": round(a.rows / t_validate),
                        "accepted": len(result.accepted), "peak_rss_gib_after": peak_rss_gib()}}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "import_validate.json").write_text(json.dumps(out, indent=2))
    if a.json:
        print(json.dumps(out))
        return
    print(f"{'step':<10}{'format':<14}{'rows':>9}{'seconds':>9}{'rows/s':>9}{'peak RSS GiB':>14}  device")
    for step in ("import", "validate"):
        r = out[step]
        print(f"{step:<10}{a.format:<14}{a.rows:>9}{r['seconds']:>9}{r['rows_per_s']:>9}{r['peak_rss_gib_after']:>14}"
              f"  {out['device']}")


if __name__ == "__main__":
    main()

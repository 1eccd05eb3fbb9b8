"""Benchmark of the `prepare` stage: images/s with 1 and 2 worker processes on the default
shapes world (params.yaml), and peak memory. Writes benchmarks/results/prepare.json.

Each measurement runs in a fresh Python process (so peak RSS is its own); the world is
generated once into a temporary directory and not counted.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jetformer.config import load_config  # noqa: E402


def one_run(workers: int, raw: str, out: str) -> dict:
    from jetformer.data.prepare import prepare
    cfg = load_config(REPO / "params.yaml", overrides=(
        f"data.synthetic.out_dir={raw}", f"data.prepared_dir={out}", f"data.workers={workers}"))
    t0 = time.perf_counter()
    report = prepare(cfg)
    seconds = time.perf_counter() - t0
    files = sum(s["files"] for s in report["splits"].values())
    kb = 1024  # ru_maxrss is in KiB on Linux
    return {"workers": workers, "files": files, "seconds": round(seconds, 2),
            "images_per_s": round(files / seconds, 1),
            "peak_rss_mb_main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb, 1),
            "peak_rss_mb_worker": round(
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kb, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--one", nargs=3, metavar=("WORKERS", "RAW", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/prepare.json"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(int(args.one[0]), args.one[1], args.one[2])))
        return
    from jetformer.data.synthetic import generate_world
    cfg = load_config(REPO / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        generate_world(cfg.data.synthetic, out_dir=Path(tmp) / "raw")
        gen_s = time.perf_counter() - t0
        n = cfg.data.synthetic.num_train + cfg.data.synthetic.num_val
        runs = []
        for workers in (1, 2):
            res = subprocess.run([sys.executable, __file__, "--one", str(workers),
                                  str(Path(tmp) / "raw"),
                                  str(Path(tmp) / f"prepared{workers}")],
                                 check=True, capture_output=True, text=True, cwd=REPO)
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    result = {"benchmark": "prepare", "resolution": cfg.data.resolution, "images": n,
              "generate_seconds": round(gen_s, 2), "generate_images_per_s": round(n / gen_s, 1),
              "runs": runs, "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_out, out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

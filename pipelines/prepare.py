"""DVC stage `prepare`: (generate the shapes world, then) read the configured source, write
`data.prepared_dir` and the `metrics/prepare.json` metric."""
import argparse
import json
import os
import sys
from pathlib import Path

from jetformer.config import ConfigError, load_config
from jetformer.data.prepare import PrepareError, prepare, prepare_metrics


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics", default="metrics/prepare.json")
    args = ap.parse_args()
    try:
        cfg = load_config(args.params)
        report = prepare(cfg, on_shard_done=lambda o: print(
            f"  shard {o['file']}: {o['written']} images, {len(o['skipped'])} skipped", flush=True))
    except (ConfigError, PrepareError) as e:
        print(f"prepare failed: {e}", file=sys.stderr)
        return 1
    metrics = prepare_metrics(report)
    out = Path(args.metrics)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    for split, s in report["splits"].items():
        print(f"{split}: {s['written']} written, {s['skipped']} skipped, {s['converted']} converted")
        for x in s["skipped_files"]:
            print(f"  skipped {x['file']}: {x['reason']}")
    print(f"{metrics['images_per_s']:.0f} images/s; {cfg.data.prepared_dir} ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DVC stage `train`: train JetFormer with Ray Train on `params.yaml` and write the checkpoint
(`train.out_dir`), `metrics/train.json`, `plots/train.csv`, `plots/train_samples/` and the MLflow
run. An interrupted run resumes from its last checkpoint when started again."""
import argparse
import sys

from jetformer.config import ConfigError, load_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset", action="append", default=[], help="overlay name or YAML path")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.params, args.preset, args.set)   # invalid params stop here
        from jetformer.train.launch import run_training          # (before Ray is imported)
        from jetformer.train.loop import NonFiniteLossError
        try:
            run_training(cfg)
        except NonFiniteLossError as e:
            print(f"train failed: {e}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, SystemExit):   # Ctrl-C: never report success to DVC
            return 130
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"train failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

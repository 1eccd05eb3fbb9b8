"""`python -m jetformer <command>`: info, sample, caption, answer, nll, manipulate, complete,
ablate, sweep, compare.

Argument parsing only; each command lives in the module that owns it (imported lazily so
`info` does not start Ray or MLflow).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from jetformer.config import ConfigError

# command -> (module, function, help)
COMMANDS = {
    "info": ("jetformer.models.summary", "cli_info", "parameter counts of a preset (meta device)"),
    "sample": ("jetformer.eval.commands", "cli_sample", "sample images for a prompt or class"),
    "caption": ("jetformer.eval.commands", "cli_caption", "caption images"),
    "answer": ("jetformer.eval.commands", "cli_answer", "answer a question about an image"),
    "nll": ("jetformer.inspect.commands", "cli_nll", "bits/dim of images (--map: per patch)"),
    "manipulate": ("jetformer.inspect.commands", "cli_manipulate",
                   "re-decode an image's manipulated latents (paper App. D)"),
    "complete": ("jetformer.inspect.commands", "cli_complete",
                 "complete images from their first patch rows"),
    "ablate": ("jetformer.ablate", "cli_ablate", "run the Table 2 ablations at a preset"),
    "sweep": ("jetformer.tune", "cli_sweep", "Ray Tune sweep from a sweep-space file"),
    "compare": ("jetformer.compare", "cli_compare", "compare MLflow runs of an experiment"),
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="base parameter file")
    p.add_argument("--preset", action="append", default=[],
                   help="overlay name or YAML path (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jetformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help=COMMANDS["info"][2])
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("sample", help=COMMANDS["sample"][2])
    p.add_argument("--checkpoint", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
    g.add_argument("--label", action="append", type=int, default=[],
                   help="class index (repeatable)")
    p.add_argument("--num", type=int, default=8, help="samples per prompt/label")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale (default: eval.cfg_scale)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")

    p = sub.add_parser("caption", help=COMMANDS["caption"][2])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+")

    p = sub.add_parser("answer", help=COMMANDS["answer"][2])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("image")
    p.add_argument("question")

    p = sub.add_parser("nll", help=COMMANDS["nll"][2])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("--map", default=None, metavar="OUT.png",
                   help="also draw bits/dim per patch (gmm, factored, log-det parts)")

    p = sub.add_parser("manipulate", help=COMMANDS["manipulate"][2])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("--out", default="manipulate.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.3, 1.0],
                   help="noise scales of manipulation (d)")

    p = sub.add_parser("complete", help=COMMANDS["complete"][2])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("--keep-rows", type=int, required=True, help="patch rows kept (K)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, help="text condition (text models)")
    g.add_argument("--label", type=int, default=None, help="class condition (class models)")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale (default: eval.cfg_scale with a condition, else 0)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--num", type=int, default=4, help="completions per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="complete.png")

    p = sub.add_parser("ablate", help=COMMANDS["ablate"][2])
    _add_config_args(p)
    p.add_argument("--only", action="append", default=[], help="run only these ablations")
    p.add_argument("--seeds", type=int, default=2, help="seeds per row (seed = train.seed = k)")
    p.add_argument("--fresh", action="store_true", help="rerun rows already measured")
    p.add_argument("--report", action="store_true",
                   help="only write the tables from the rows measured so far (run nothing)")
    p.add_argument("--out-dir", default="experiments/results")

    p = sub.add_parser("sweep", help=COMMANDS["sweep"][2])
    p.add_argument("space", help="sweep-space YAML, e.g. experiments/sweeps/noise.yaml")
    _add_config_args(p)
    p.add_argument("--fresh", action="store_true", help="do not restore an interrupted sweep")

    p = sub.add_parser("compare", help=COMMANDS["compare"][2])
    p.add_argument("--experiment", required=True)
    p.add_argument("--tracking-uri", default="")
    p.add_argument("--parent-run", default="", help="only children of this run (a sweep)")
    p.add_argument("--sigma-plots", action="store_true",
                   help="also FID and bits/dim vs sigma0 with spread, and Figure 3 (a noise "
                        "sweep's --parent-run)")
    p.add_argument("--dvc-exp", default="", help="only the runs of this `dvc exp run` experiment")
    p.add_argument("--sweep", default="", help="only the trials of this Ray Tune sweep")
    p.add_argument("--ablation-table", default="", help="only the rows of this ablation table")
    p.add_argument("--role", default="", help="only runs of this role (train, eval, trial, ...)")
    p.add_argument("--out-dir", default="experiments/results")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, func, _ = COMMANDS[args.command]
    try:
        return int(getattr(importlib.import_module(module), func)(args) or 0)
    except (ConfigError, OSError, ValueError) as e:   # bad input: one line, exit status 1
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1

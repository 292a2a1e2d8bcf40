"""python -m grace_lightning.export <run dir | export dir | .ckpt> [out] [--adapter-only]
[--push-to-hub REPO_ID] [--private] [--license ID]

- a ``.ckpt`` (GraceModule or ContrastiveModule, from train.py): rebuild the module from its
  hyperparameters, load the weights, write the export (default ``<run>/export`` for
  ``last.ckpt``, ``<run>/export-<name>`` for others); LoRA is merged unless ``--adapter-only``;
- a run dir: refresh its ``export/`` (sentence-transformers files, model card with the run's
  eval scores and rationales), or export its last checkpoint if it has no export;
- an export dir: refresh it in place (or copy to ``out`` first).

Bad input ends with one line naming the path and what to do (exit status 2).
"""

from __future__ import annotations

import argparse
import logging
import sys

from grace_lightning.eval.rundir import RunDirError
from grace_lightning.export import ExportError, export_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m grace_lightning.export", description=__doc__)
    p.add_argument("path", help="run dir, export dir or .ckpt")
    p.add_argument("out", nargs="?", default=None, help="output dir (default: see above)")
    p.add_argument("--adapter-only", action="store_true", help="LoRA runs: adapter weights only")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload (Hub only)")
    p.add_argument("--license", default=None, help="model card licence (default: the base's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export_run(args.path, args.out, adapter_only=args.adapter_only)
        if args.push_to_hub:  # rewrites the card for the repo id, then uploads
            from grace_lightning.export.hub import push_to_hub

            push_to_hub(out, args.push_to_hub, license=args.license)
        elif args.license:
            from grace_lightning.export.card import write_model_card

            run = out.parent if out.name == "export" else None
            write_model_card(out, run_dir=run, license=args.license)
    except (ExportError, RunDirError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

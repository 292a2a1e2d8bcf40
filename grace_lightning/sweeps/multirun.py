"""Run a W&B sweep file's grid as one Hydra multirun, with no W&B server.

    python -m grace_lightning.sweeps.multirun sweeps/lambda_grid.yaml [overrides...] [--dry-run]

The command is ``python train.py -m <the sweep's fixed overrides> <key=v1,v2,... per parameter>
<your overrides>``. Your overrides replace the sweep's overrides with the same key, so
``backbone=smollm2 trainer=cpu`` runs a paper grid on the embedded default. W&B logging stays
offline (``logger.wandb.offline=false`` is dropped unless ``--online``); ``wandb sync`` uploads
it later. Run dirs: ``outputs/train/multiruns/<date>/<n>`` (or ``hydra.sweep.dir=...``).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from grace_lightning.sweeps.spec import load_sweep, multirun_overrides, override_key

REPO_ROOT = Path(__file__).resolve().parents[2]
ONLINE_ONLY = ("logger.wandb.offline=false",)


def multirun_command(sweep_path: str | Path, extra: list[str], online: bool = False) -> list[str]:
    """argv of the ``train.py -m`` run equivalent to the sweep (fixed + swept + extra)."""
    sweep = load_sweep(sweep_path)
    overrides = multirun_overrides(sweep, extra)
    if not online:
        overrides = [o for o in overrides if o not in ONLINE_ONLY]
    return [sys.executable, str(REPO_ROOT / sweep["program"]), "-m", *overrides]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="a W&B sweep YAML (sweeps/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (replace the sweep's)")
    parser.add_argument("--online", action="store_true", help="keep W&B logging online")
    parser.add_argument("--dry-run", action="store_true", help="print the command only")
    args = parser.parse_args(argv)
    swept = set(load_sweep(args.sweep)["parameters"])
    for o in args.overrides:
        if override_key(o) in swept:
            print(f"note: {o} replaces the sweep's values for {override_key(o)}", file=sys.stderr)
    cmd = multirun_command(args.sweep, args.overrides, online=args.online)
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(cmd, cwd=REPO_ROOT)


if __name__ == "__main__":
    raise SystemExit(main())

"""Exports from Lightning checkpoints and run dirs: :func:`export_checkpoint` (any ``.ckpt``),
:func:`export_run` (a run dir), :func:`refresh_export`. Builds the training module a checkpoint
holds, so it sits above :mod:`grace_lightning.module` (which only needs
:mod:`grace_lightning.export.policy`)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from grace_lightning.eval.rundir import RunDirError
from grace_lightning.export.policy import _OPTIONS, export_meta, write_sentence_transformers_files

log = logging.getLogger(__name__)


class ExportError(RunDirError):
    """Bad input to the exporter: the message names the path and what to do."""


# ----------------------------------------------------------------------------- from checkpoints
def load_module_from_checkpoint(ckpt: str | Path):
    """The GraceModule / ContrastiveModule a Lightning ``.ckpt`` holds (backbone built from its
    hyperparameters, then the checkpoint's weights). Clear errors for anything else."""
    import torch

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise ExportError(f"{ckpt}: no such checkpoint file")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise ExportError(
            f"{ckpt}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}); "
            f"a half-written file? Use another checkpoint of the run (checkpoints/*.ckpt)."
        ) from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ExportError(
            f"{ckpt}: not a Lightning checkpoint (no state_dict); export a .ckpt written by "
            f"train.py (checkpoints/last.ckpt or checkpoints/step_*.ckpt)."
        )
    hp = dict(state.get("hyper_parameters") or {})
    cls = _module_class(hp)
    if cls is None:
        raise ExportError(
            f"{ckpt}: a checkpoint of another model class (hyperparameters: "
            f"{sorted(hp)[:8]}); only GraceModule and ContrastiveModule checkpoints from "
            f"train.py can be exported."
        )
    del state
    try:
        return cls.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    except OSError as e:  # backbone weights from the Hub while offline, typically
        backbone = (hp.get("backbone") or {}).get("pretrained") or (hp.get("backbone") or {})
        raise ExportError(
            f"{ckpt}: could not build its backbone {backbone!r} ({e}). A Hub backbone must be in "
            f"the local Hugging Face cache (or reachable) to rebuild the module."
        ) from e


def _module_class(hp: dict[str, Any]):
    if "backbone" not in hp or "prompt" not in hp:
        return None
    if "objective" in hp:
        from grace_lightning.contrastive import ContrastiveModule

        return ContrastiveModule
    if {"rollout", "reward", "algo"} <= set(hp):
        from grace_lightning.module import GraceModule

        return GraceModule
    return None


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path | None = None,
    *,
    adapter_only: bool = False,
    push_to_hub: str | None = None,
    run_dir: str | Path | None = None,
) -> Path:
    """Export a ``.ckpt``: default ``<run>/export`` for ``<run>/checkpoints/last.ckpt``, else
    ``<run>/export-<checkpoint name>``."""
    ckpt = Path(ckpt)
    module = load_module_from_checkpoint(ckpt)
    if run_dir is None and ckpt.parent.name == "checkpoints":
        run_dir = ckpt.parent.parent
    if out is None:
        base = Path(run_dir) if run_dir else ckpt.parent
        out = base / ("export" if ckpt.stem == "last" else f"export-{ckpt.stem}")
    if adapter_only and not module.peft_cfg:
        raise ExportError(
            f"{ckpt}: --adapter-only needs a LoRA run (peft=lora); this checkpoint trained all "
            f"weights. Drop --adapter-only."
        )
    out = Path(out)
    extra = {"checkpoint": str(ckpt.resolve()), "training": _training_summary(module)}
    token = _OPTIONS.set({"merge": not adapter_only, "run_dir": run_dir, "extra_meta": extra})
    try:
        module.export(out)  # the module's own meta; save_policy below picks up _OPTIONS
    finally:
        _OPTIONS.reset(token)
    log.info("exported %s to %s", ckpt, out)
    if push_to_hub:
        from grace_lightning.export.hub import push_to_hub as push

        push(out, push_to_hub)
    return out


def _training_summary(module) -> dict[str, Any]:
    hp = dict(module.hparams)
    keys = ("backbone", "prompt", "rollout", "reward", "algo", "optim", "objective", "tau", "peft")
    return _jsonable({k: hp[k] for k in keys if k in hp})


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


# ----------------------------------------------------------------------------- from run dirs
def find_checkpoint(run_dir: Path) -> Path | None:
    """``checkpoints/last.ckpt``, else the newest ``checkpoints/*.ckpt``."""
    ckdir = run_dir / "checkpoints"
    if (ckdir / "last.ckpt").is_file():
        return ckdir / "last.ckpt"
    found = sorted(ckdir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if ckdir.is_dir() else []
    return found[-1] if found else None


def refresh_export(export: str | Path, run_dir: str | Path | None = None) -> Path:
    """Add the sentence-transformers files and (re)write the model card of an existing export
    (e.g. after ``eval.py`` wrote ``<run>/eval/scores.json``, or an export from before them)."""
    from grace_lightning.eval.rundir import check_export_dir
    from grace_lightning.export.card import write_model_card

    export = Path(export)
    grace = check_export_dir(export)
    meta = export_meta(grace)
    if meta != grace:
        (export / "grace_config.json").write_text(json.dumps(meta, indent=2))
    write_sentence_transformers_files(export, meta)
    write_model_card(
        export, run_dir=run_dir or (export.parent if export.name == "export" else None)
    )
    return export


def export_run(
    path: str | Path,
    out: str | Path | None = None,
    *,
    adapter_only: bool = False,
    push_to_hub: str | None = None,
) -> Path:
    """``path``: a ``.ckpt``, a run dir (its export refreshed, else its last checkpoint exported),
    or an export dir (refreshed). With ``out`` the result is written/copied there."""
    from grace_lightning.eval.rundir import RunDirError

    path = Path(path)
    if not path.exists():
        hub = str(path).count("/") == 1 and not str(path).startswith((".", "/", "~"))
        hint = (
            " It looks like a Hub id: Hub models need no export; load them with "
            "GraceEncoder.from_pretrained or SentenceTransformer(..., trust_remote_code=True)."
            if hub
            else " Give a train.py run dir, its export/, or a checkpoints/*.ckpt."
        )
        raise ExportError(f"{path}: no such run dir, export dir or checkpoint.{hint}")
    if path.is_file():
        if path.suffix != ".ckpt":
            raise ExportError(f"{path}: not a .ckpt file; give a run dir or a checkpoint")
        return export_checkpoint(path, out, adapter_only=adapter_only, push_to_hub=push_to_hub)
    is_export = (path / "config.json").exists() or (path / "adapter_config.json").exists()
    export = path if is_export else path / "export"
    run_dir = path.parent if is_export and path.name == "export" else (None if is_export else path)
    if export.is_dir() and not adapter_only:
        try:
            if out is not None and Path(out).resolve() != export.resolve():
                shutil.copytree(export, out, dirs_exist_ok=True)
                export = Path(out)
            done = refresh_export(export, run_dir=run_dir)
        except RunDirError as e:
            ckpt = find_checkpoint(path) if run_dir else None
            hint = (
                f" or export its checkpoint: python -m grace_lightning.export {ckpt}"
                if ckpt
                else ""
            )
            raise ExportError(f"{e}. Re-run the export{hint}.") from None
    else:
        ckpt = find_checkpoint(path)
        if ckpt is None:
            raise ExportError(
                f"{path}: neither an export (no config.json) nor a run dir with export/ or "
                f"checkpoints/*.ckpt. Give a run dir of train.py, its export/, or a .ckpt."
            )
        done = export_checkpoint(ckpt, out, adapter_only=adapter_only, run_dir=path)
    if push_to_hub:
        from grace_lightning.export.hub import push_to_hub as push

        push(done, push_to_hub)
    return done

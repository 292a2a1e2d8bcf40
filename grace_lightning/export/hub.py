"""Upload an export to the Hugging Face Hub (Hub-only: needs network and a write token).

Everything before the upload (export, model card, file checks) runs offline; tests replace
``HfApi.upload_folder`` to check what would be sent.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# files an upload leaves out: the merged export's PEFT adapter copy is kept (small, useful)
IGNORE = ["*.tmp", "*.lock", "__pycache__/*"]


def push_to_hub(
    export: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    license: str | None = None,
) -> str:
    """Check the export, rewrite its card for ``repo_id``, create the repo, upload the folder.

    Returns the commit URL. Offline (``HF_HUB_OFFLINE=1``) fails with one line saying so.
    """
    from huggingface_hub import HfApi

    from grace_lightning.eval.encoder import hub_offline
    from grace_lightning.eval.rundir import check_export_dir
    from grace_lightning.export.card import write_model_card

    export = Path(export)
    check_export_dir(export)
    adapter = export / "adapter_config.json"
    if adapter.exists() and not (export / "config.json").exists():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path") or ""
        if Path(base).exists():
            raise RuntimeError(
                f"{export}: an adapter-only export whose base model is a local directory "
                f"({base}); Hub users could not load it. Push a merged export (no --adapter-only)."
            )
    if not (export / "modules.json").exists():
        from grace_lightning.export.policy import write_sentence_transformers_files

        write_sentence_transformers_files(export)
    run_dir = export.parent if export.name == "export" else None
    write_model_card(export, run_dir=run_dir, repo_id=repo_id, license=license)
    if hub_offline():
        raise RuntimeError(
            f"push_to_hub={repo_id}: HF_HUB_OFFLINE is set, so {export} was prepared (card "
            f"written) but not uploaded. Unset HF_HUB_OFFLINE and log in (`hf auth login`)."
        )
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(export),
        repo_type="model",
        commit_message=commit_message or "Upload GRACE model (grace_lightning export)",
        ignore_patterns=IGNORE,
    )
    url = str(getattr(info, "commit_url", info))
    log.info("uploaded %s to https://huggingface.co/%s (%s)", export, repo_id, url)
    return url

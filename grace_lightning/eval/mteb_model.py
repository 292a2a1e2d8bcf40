"""`GraceEncoder` as an MTEB v2 model (``mteb.evaluate`` accepts it).

mteb 2.x calls ``encode(DataLoader[batch dicts], *, task_metadata, hf_split, hf_subset,
prompt_type)``. An object without a ``mteb_model_meta`` attribute is silently replaced by an empty
``ModelMeta`` and re-loaded (``mteb/evaluate.py::_sanitize_model``), so we subclass mteb's
``AbsEncoder`` and set a real ``ModelMeta``: its name/revision place results in the result cache,
``similarity_fn_name="cosine"`` is GRACE's similarity (notes §3.3), and ``experiment_kwargs``
(mode + generation settings) keep Base and rationale results of one model apart.

Per-task prompts: ``model_prompts`` (default: the encoder's ``prompts``) maps MTEB's keys to
SYSTEM prompts, looked up in mteb's order: ``"<TaskName>-query"``, ``"<TaskName>"``,
``"<TaskType>-document"``, ``"<TaskType>"``, ``"query"`` / ``"document"``. Without a match the
encoder's own system prompt is used (upstream ``eval_mteb.py``: one prompt for everything).
``prompt_log`` records which system prompt each ``encode`` call used.

:func:`grace_model_meta` gives a ``ModelMeta`` whose ``loader`` builds this wrapper from a run
dir, an export dir or a Hub id, so ``mteb.evaluate(grace_model_meta(path), tasks)`` loads the
model only when a task needs it (and ``meta.load_model()`` works as for mteb's own models).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from grace_lightning.eval.encoder import GraceEncoder


# ModelMeta fields every GRACE model shares (model_meta and grace_model_meta)
_META_COMMON: dict[str, Any] = dict(
    release_date=None,
    languages=["eng-Latn"],
    memory_usage_mb=None,
    license=None,
    open_weights=True,
    public_training_code="https://github.com/GasolSun36/GRACE",
    public_training_data=None,
    framework=["PyTorch", "Transformers"],
    reference="https://arxiv.org/abs/2510.04506",
    similarity_fn_name="cosine",
    training_datasets=None,
)


def model_meta(encoder: GraceEncoder, name: str | None = None) -> ModelMeta:
    """Metadata of an encoder: ``grace-lightning/<name>`` at revision ``<fingerprint[:12]>``."""
    name = name or encoder.name
    if "/" not in name:
        name = f"grace-lightning/{name}"
    experiment: dict[str, Any] = {"mode": encoder.mode}
    if encoder.mode == "rationale":
        g = encoder.generation
        experiment.update(
            temperature=g.temperature, max_new_tokens=g.max_new_tokens, top_p=g.top_p, seed=g.seed
        )
        if g.top_k:
            experiment["top_k"] = g.top_k
    elif encoder.mode == "echo":  # the copy is cut to the rationale budget
        experiment.update(max_new_tokens=encoder.generation.max_new_tokens)
    n_params = sum(p.numel() for p in encoder.model.parameters())
    return ModelMeta(
        loader=None,
        name=name,
        revision=encoder.fingerprint[:12],
        n_parameters=n_params,
        max_tokens=float(encoder.max_prompt_tokens),
        embed_dim=int(encoder.model.config.hidden_size),
        use_instructions=False,
        experiment_kwargs=experiment,
        **_META_COMMON,
    )


class GraceMTEBModel(AbsEncoder):
    """Wrap a :class:`GraceEncoder` for ``mteb.evaluate``."""

    def __init__(
        self,
        encoder: GraceEncoder,
        name: str | None = None,
        show_progress_bar=True,
        model_prompts: dict[str, str] | None = None,
    ):
        self.model = encoder
        self.mteb_model_meta = model_meta(encoder, name)
        self.show_progress_bar = show_progress_bar
        prompts = encoder.prompts if model_prompts is None else model_prompts
        self.model_prompts = {k: v for k, v in prompts.items() if v} or None
        self.prompt_log: list[dict[str, Any]] = []  # one entry per encode call

    def encode(
        self,
        inputs: DataLoader,
        *,
        task_metadata,
        hf_split: str,
        hf_subset: str,
        prompt_type=None,
        **kwargs: Any,
    ):
        texts = [text for batch in inputs for text in batch["text"]]
        key = self.get_prompt_name(task_metadata, prompt_type)
        system_prompt = self.model_prompts[key] if key else None
        used = self.model.resolve_system_prompt(None, system_prompt)
        self.prompt_log.append(
            {
                "task": task_metadata.name,
                "prompt_type": getattr(prompt_type, "value", prompt_type),
                "prompt_key": key,
                "system_prompt": used,
                "n_texts": len(texts),
            }
        )
        return self.model.encode(
            texts,
            prompt=system_prompt,
            batch_size=int(kwargs.get("batch_size") or 16),
            show_progress_bar=kwargs.get("show_progress_bar", self.show_progress_bar),
            convert_to_numpy=True,
        )


# ----------------------------------------------------------------------------- ModelMeta + loader
def grace_loader(
    model_name: str,
    revision: str | None = None,
    *,
    model_path: str | None = None,
    device: str | None = None,
    mode: str = "rationale",
    model_prompts: dict[str, str] | None = None,
    cache: str | None = None,
    show_progress_bar: bool = True,
    **generation: Any,
) -> GraceMTEBModel:
    """mteb ``ModelMeta.loader``: build the wrapper from ``model_path`` (or ``model_name``).

    ``generation`` takes :class:`GenerationSettings` fields (mteb passes ``experiment_kwargs``
    here too); other keys are an error naming the known ones.
    """
    from grace_lightning.eval.encoder import GenerationSettings, GraceEncoder

    known = set(GenerationSettings.__dataclass_fields__)
    if unknown := set(generation) - known:
        raise TypeError(
            f"grace_loader: unknown arguments {sorted(unknown)}; known: {sorted(known)}"
        )
    kwargs: dict[str, Any] = {"mode": mode, "device": device}
    if generation:
        kwargs["generation"] = GenerationSettings(**generation)
    if cache:
        kwargs["cache"] = Path(cache)
    encoder = GraceEncoder.from_pretrained(model_path or model_name, **kwargs)
    return GraceMTEBModel(
        encoder, name=model_name, show_progress_bar=show_progress_bar, model_prompts=model_prompts
    )


def grace_model_meta(
    path_or_id: str | Path,
    *,
    mode: str = "rationale",
    name: str | None = None,
    model_prompts: dict[str, str] | None = None,
    **loader_kwargs: Any,
) -> ModelMeta:
    """A ``ModelMeta`` for a run dir / export dir / Hub id whose ``loader`` builds the model.

    Reads only small files (``config.json``, ``grace_config.json``) here; the weights load when
    mteb calls the loader. ``revision``: a hash of the weight files' names, sizes and times for a
    local export (results of a retrained model do not mix), else the Hub id's default.
    """
    from grace_lightning.eval.rundir import find_export_dir

    spec = str(path_or_id)
    local = Path(spec).expanduser()
    config: dict[str, Any] = {}
    revision = None
    if local.exists():
        export = find_export_dir(local)
        if (export / "config.json").is_file():
            config = json.loads((export / "config.json").read_text(encoding="utf-8"))
        run = export.resolve().parent if export.name == "export" else export.resolve()
        name = name or f"grace-lightning/{run.name}"
        revision = _stamp(export)
        spec = str(export.resolve())
    else:
        name = name or spec
    experiment: dict[str, Any] = {"mode": mode}
    experiment.update({k: v for k, v in loader_kwargs.items() if k in _GENERATION_KEYS})
    return ModelMeta(
        loader=grace_loader,
        loader_kwargs={
            "model_path": spec,
            "model_prompts": model_prompts,
            **{k: v for k, v in loader_kwargs.items() if k not in _GENERATION_KEYS},
        },
        name=name if "/" in name else f"grace-lightning/{name}",
        revision=revision,
        n_parameters=None,
        max_tokens=None,
        embed_dim=config.get("hidden_size"),
        use_instructions=bool(model_prompts),
        experiment_kwargs=experiment,
        **_META_COMMON,
    )


_GENERATION_KEYS = ("temperature", "max_new_tokens", "top_p", "top_k", "seed", "ignore_eos")


def _stamp(export: Path) -> str:
    import hashlib

    files = sorted(p for p in export.iterdir() if p.suffix in (".safetensors", ".json", ".bin"))
    stamp = json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    return hashlib.sha256(stamp.encode()).hexdigest()[:12]

"""`GraceEncoder` as an MTEB v2 model (``mteb.evaluate`` accepts it).

mteb 2.x calls ``encode(DataLoader[batch dicts], *, task_metadata, hf_split, hf_subset,
prompt_type)``. An object without a ``mteb_model_meta`` attribute is silently replaced by an empty
``ModelMeta`` and re-loaded (``mteb/evaluate.py::_sanitize_model``), so we subclass mteb's
``AbsEncoder`` and set a real ``ModelMeta``: its name/revision place results in the result cache,
``similarity_fn_name="cosine"`` is GRACE's similarity (notes §3.3), and ``experiment_kwargs``
(mode + generation settings) keep Base and rationale results of one model apart.

Queries and documents go through the same encoder (upstream ``eval_mteb.py`` does the same);
``prompt_type`` only selects ``GraceEncoder.prompts[query|document]`` if one is set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from grace_lightning.eval.encoder import GraceEncoder


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
    n_params = sum(p.numel() for p in encoder.model.parameters())
    return ModelMeta(
        loader=None,
        name=name,
        revision=encoder.fingerprint[:12],
        release_date=None,
        languages=["eng-Latn"],
        n_parameters=n_params,
        memory_usage_mb=None,
        max_tokens=float(encoder.max_prompt_tokens),
        embed_dim=int(encoder.model.config.hidden_size),
        license=None,
        open_weights=True,
        public_training_code="https://github.com/GasolSun36/GRACE",
        public_training_data=None,
        framework=["PyTorch", "Transformers"],
        reference="https://arxiv.org/abs/2510.04506",
        similarity_fn_name="cosine",
        use_instructions=False,
        training_datasets=None,
        experiment_kwargs=experiment,
    )


class GraceMTEBModel(AbsEncoder):
    """Wrap a :class:`GraceEncoder` for ``mteb.evaluate``."""

    def __init__(self, encoder: GraceEncoder, name: str | None = None, show_progress_bar=True):
        self.model = encoder
        self.mteb_model_meta = model_meta(encoder, name)
        self.show_progress_bar = show_progress_bar

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
        return self.model.encode(
            texts,
            batch_size=int(kwargs.get("batch_size") or 16),
            show_progress_bar=kwargs.get("show_progress_bar", self.show_progress_bar),
            prompt_type=getattr(prompt_type, "value", prompt_type),
            convert_to_numpy=True,
        )

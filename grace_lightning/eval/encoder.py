"""`GraceEncoder`: a GRACE policy used as a text encoder, shaped like sentence-transformers.

GRACE (arXiv 2510.04506) embeds a text as the mean of the policy's last-layer hidden states over
the chat-templated text and a generated rationale, system prompt excluded (notes §3.3). Two modes:

- ``base``: no rationale, the mean over the prompt after the system prompt (the paper's Base row);
- ``rationale``: sample a rationale, then pool over text + rationale ("w/ reasoning" on a base
  model, GRACE on a trained one). Upstream eval: temperature 1.0, top-p 1.0, up to 2048 new tokens,
  prompts cut to 1024 tokens, no L2 normalisation (notes §4);
- ``echo``: the text itself as the "rationale" (echo embeddings, Springer et al. 2024, arXiv
  2402.15449): prompt + a copy of the text's tokens, pooled exactly as a rationale (prompt after the
  system prompt + response). The copy obeys the rationale budget: cut to
  ``generation.max_new_tokens`` tokens, ended by EOS when it fits (as a sampled rationale that
  stops), without when it was cut (as one that hit the limit). Deterministic, no sampling, no
  cache: the baseline that tells reasoning from copying.

Rationales come from the training sampler (:class:`~grace_lightning.rollout.engine.HFRolloutEngine`,
embeddings pooled in the sampling pass, unnormalised like upstream's eval) with one seed per text
(``text_seed(seed, text)``), so a text's rationale does not depend on its batch; they are stored in
a :class:`~grace_lightning.eval.cache.RationaleCache`.

    enc = GraceEncoder.from_backbone(BackboneConfig(), mode="rationale", max_new_tokens=256)
    vecs, why = enc.encode(["A man is playing a guitar."], return_rationales=True)

The ``encode`` signature follows ``SentenceTransformer.encode`` (``prompt_name`` / ``prompt``,
batch_size, show_progress_bar, normalize_embeddings, convert_to_numpy / convert_to_tensor,
``device``; a single string gives a 1-D vector), with ``encode_query`` / ``encode_document``.
As in sentence-transformers, ``prompts`` maps prompt names to prompts and ``default_prompt_name``
picks one when none is given, but here a prompt is the SYSTEM prompt of the chat template (GRACE
pools after it), not a text prefix: ``prompts={"query": "...", "document": "..."}``. Without one,
the encoder's ``system_prompt`` is used (query and document alike, as upstream). ``prompt_type``
is the old name of ``prompt_name`` (deprecated).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from grace_lightning.eval.cache import (
    CachedRationale,
    RationaleCache,
    dir_fingerprint,
    rationale_key,
    state_dict_fingerprint,
)
from grace_lightning.eval.rundir import RunDirError, check_export_dir, find_export_dir
from grace_lightning.models.backbone import BackboneConfig, eos_token_ids, load_backbone
from grace_lightning.prompts import DEFAULT_SYSTEM_PROMPT, ChatPrompter
from grace_lightning.rollout.engine import HFRolloutEngine, text_seed

log = logging.getLogger(__name__)

MODES = ("base", "rationale", "echo")


@dataclass
class GenerationSettings:
    """How rationales are sampled (paper/upstream eval: T=1.0, top_p=1.0, 2048 new tokens)."""

    temperature: float = 1.0  # <= 0: greedy
    max_new_tokens: int = 2048
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int = 0  # per-text seeds derive from it (rollout.engine.text_seed)
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks; vLLM's ignore_eos)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class HubUnavailableError(RuntimeError):
    """A Hub id was asked for but the Hub cannot be reached."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


class GraceEncoder:
    """Encode texts with a GRACE policy (see module docstring)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        mode: str = "rationale",
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        prompts: dict[str, str | None] | None = None,
        default_prompt_name: str | None = None,
        max_prompt_tokens: int = 1024,
        generation: GenerationSettings | dict | None = None,
        cache: RationaleCache | str | Path | None = None,
        name: str = "grace",
        source_dir: str | Path | None = None,
        fingerprint: str | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {MODES}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mode = mode
        self.system_prompt = system_prompt
        self.prompts = {k: v for k, v in dict(prompts or {}).items()}  # name -> system prompt
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ValueError(
                f"default_prompt_name={default_prompt_name!r} is not in prompts "
                f"({sorted(self.prompts)}); add it to prompts or drop default_prompt_name"
            )
        self.default_prompt_name = default_prompt_name
        self.max_prompt_tokens = max_prompt_tokens
        if isinstance(generation, dict):
            generation = GenerationSettings(**generation)
        self.generation = generation or GenerationSettings()
        self.cache = RationaleCache(cache) if isinstance(cache, str | Path) else cache
        self.name = name
        self.source_dir = Path(source_dir) if source_dir else None
        self._fingerprint = fingerprint
        self._prompters: dict[str | None, ChatPrompter] = {}
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.stats = {"generated": 0, "cached": 0, "generate_calls": 0}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_backbone(
        cls,
        backbone: BackboneConfig | dict,
        device: str | None = None,
        dtype: str | None = None,
        **kwargs: Any,
    ) -> GraceEncoder:
        """A backbone config (``conf/backbone/*.yaml``): the embedded default, tiny, a Hub id."""
        cfg = backbone if isinstance(backbone, BackboneConfig) else BackboneConfig(**dict(backbone))
        if dtype:
            cfg.dtype = dtype
        if cfg.source == "hub" and cfg.pretrained and not Path(cfg.pretrained).exists():
            _check_hub(cfg.pretrained)
        try:
            model, tokenizer = load_backbone(cfg, device=device or default_device())
        except OSError as e:
            if cfg.source == "hub" and not Path(str(cfg.pretrained)).exists():
                raise HubUnavailableError(_hub_message(cfg.pretrained, e)) from e
            raise
        source_dir = None
        if cfg.source == "gguf":
            from grace_lightning.models.backbone import convert_gguf

            source_dir = convert_gguf(cfg)
        elif cfg.source == "hub" and Path(str(cfg.pretrained)).is_dir():
            source_dir = Path(cfg.pretrained)
        kwargs.setdefault("name", cfg.name)
        return cls(model, tokenizer, source_dir=source_dir, **kwargs)

    @classmethod
    def from_run_dir(
        cls, path: str | Path, device: str | None = None, dtype: str | None = None, **kwargs: Any
    ) -> GraceEncoder:
        """A training run dir (``<run>/export/``) or an export dir itself.

        The export (``ExportPolicy``) is a ``save_pretrained`` model + tokenizer and a
        ``grace_config.json`` with the system prompt used in training. Files are checked first,
        so a missing or half-written file gives an error naming it.
        """
        export = find_export_dir(path)
        grace_cfg = check_export_dir(export)
        cfg = BackboneConfig(
            name=str(grace_cfg.get("backbone") or Path(path).resolve().name),
            source="hub",
            pretrained=str(export),
            dtype=dtype or _saved_dtype(export),
        )
        try:
            model, tokenizer = load_backbone(cfg, device=device or default_device())
        except Exception as e:  # transformers' errors name internals, not the file at fault
            raise RunDirError(f"{export}: could not load the exported model: {e}") from e
        kwargs.setdefault("system_prompt", grace_cfg.get("system_prompt", DEFAULT_SYSTEM_PROMPT))
        kwargs.setdefault("max_prompt_tokens", int(grace_cfg.get("max_prompt_tokens", 1024)))
        if grace_cfg.get("prompts"):
            kwargs.setdefault("prompts", grace_cfg["prompts"])
        if grace_cfg.get("embedding_mode") in MODES:
            kwargs.setdefault("mode", grace_cfg["embedding_mode"])
        if isinstance(grace_cfg.get("generation"), dict):  # what the export's own module uses
            known = set(GenerationSettings.__dataclass_fields__)
            gen = {k: v for k, v in grace_cfg["generation"].items() if k in known}
            kwargs.setdefault("generation", GenerationSettings(**gen))
        run = export.resolve().parent if export.name == "export" else export.resolve()
        kwargs.setdefault("name", run.name)
        return cls(model, tokenizer, source_dir=export, **kwargs)

    @classmethod
    def from_pretrained(cls, hub_id_or_dir: str | Path, **kwargs: Any) -> GraceEncoder:
        """A local directory (run / export / plain HF model dir) or a Hugging Face Hub id.

        A Hub repo with a ``grace_config.json`` (a pushed export) is loaded like an export (its
        system prompt, prompts, mode and generation settings); any other id as a plain backbone.
        """
        if Path(hub_id_or_dir).exists():
            return cls.from_run_dir(hub_id_or_dir, **kwargs)
        hub_id = str(hub_id_or_dir)
        _check_hub(hub_id)
        if (snapshot := _grace_snapshot(hub_id, kwargs.get("revision"))) is not None:
            kwargs.pop("revision", None)
            kwargs.setdefault("name", hub_id.rstrip("/").split("/")[-1])
            return cls.from_run_dir(snapshot, **kwargs)
        name = hub_id.rstrip("/").split("/")[-1]
        backbone = BackboneConfig(name=name, source="hub", pretrained=hub_id)
        if "dtype" not in kwargs or kwargs["dtype"] is None:
            kwargs["dtype"] = "bfloat16" if torch.cuda.is_available() else "float32"
        return cls.from_backbone(backbone, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def fingerprint(self) -> str:
        """sha256 of the weights (memoised per model dir in the cache; else of the state dict)."""
        if self._fingerprint is None:
            if self.source_dir is not None:
                self._fingerprint = dir_fingerprint(self.source_dir, self.cache)
            else:
                self._fingerprint = state_dict_fingerprint(self.model)
        return self._fingerprint

    def get_sentence_embedding_dimension(self) -> int:
        return int(self.model.config.hidden_size)

    def resolve_system_prompt(self, prompt_name: str | None = None, prompt: str | None = None):
        """The system prompt of a call: ``prompt``, else ``prompts[prompt_name]``, else
        ``prompts[default_prompt_name]``, else ``system_prompt`` (a ``None`` entry falls back)."""
        if prompt is not None:
            return prompt or self.system_prompt
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is not None and name not in self.prompts:
            if prompt_name is not None and prompt_name not in ("query", "document"):
                raise ValueError(
                    f"prompt_name={prompt_name!r} is not in prompts ({sorted(self.prompts)})"
                )
            name = None  # query/document without their own prompt: the default, as upstream
        return (self.prompts.get(name) if name is not None else None) or self.system_prompt

    def prompter(self, prompt_name: str | None = None, prompt: str | None = None) -> ChatPrompter:
        system_prompt = self.resolve_system_prompt(prompt_name, prompt)
        if system_prompt not in self._prompters:
            self._prompters[system_prompt] = ChatPrompter(
                self.tokenizer,
                system_prompt=system_prompt,
                max_prompt_tokens=self.max_prompt_tokens,
            )
        return self._prompters[system_prompt]

    def settings(self) -> dict[str, Any]:
        """Everything besides model, prompt and text that changes a cached rationale."""
        return {
            **asdict(self.generation),
            "max_prompt_tokens": self.max_prompt_tokens,
            "dtype": str(self.dtype),
            "pooling": "mean(prompt[system_len:] + response incl. EOS), unnormalised",
            "sampler": "HFRolloutEngine inverse-CDF, seeds=text_seed(seed, text)",
        }

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        sentences: str | list[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 16,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool = False,
        device: str | torch.device | None = None,
        return_rationales: bool = False,
        mode: str | None = None,
        prompt_type: str | None = None,
    ):
        """Embed ``sentences``: (N, D) (1-D for a single string), float32.

        ``prompt_name`` / ``prompt``: the system prompt (see the module docstring). ``device``
        moves the model there first. ``return_rationales=True`` returns
        ``(embeddings, rationales)``; rationales are ``None`` in base mode. ``mode`` overrides the
        encoder's mode for this call. ``prompt_type``: deprecated alias of ``prompt_name``.
        """
        if prompt_type is not None:
            warnings.warn(
                "GraceEncoder.encode(prompt_type=...) is deprecated: use prompt_name=",
                DeprecationWarning,
                stacklevel=2,
            )
            prompt_name = prompt_name if prompt_name is not None else prompt_type
        if isinstance(prompt_name, int):  # old positional call encode(texts, batch_size)
            prompt_name, batch_size = None, prompt_name
        if device is not None and torch.device(device) != self.device:
            self.model.to(device)
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {MODES}")
        if show_progress_bar is None:
            show_progress_bar = log.getEffectiveLevel() <= logging.INFO
        prompter = self.prompter(prompt_name, prompt)
        if not texts:
            emb, rationales = torch.empty(0, self.model.config.hidden_size), []
        elif mode == "base":
            emb = self._encode_base(texts, prompter, batch_size, show_progress_bar)
            rationales: list[str | None] = [None] * len(texts)
        elif mode == "echo":
            emb, rationales = self._encode_echo(texts, prompter, batch_size, show_progress_bar)
        else:
            emb, rationales = self._encode_rationale(texts, prompter, batch_size, show_progress_bar)
        return encode_output(
            emb,
            rationales,
            single=single,
            normalize_embeddings=normalize_embeddings,
            convert_to_numpy=convert_to_numpy,
            convert_to_tensor=convert_to_tensor,
            return_rationales=return_rationales,
        )

    def encode_query(self, sentences, prompt_name: str | None = None, **kwargs: Any):
        """``encode`` with the ``"query"`` system prompt (if ``prompts`` has one)."""
        if prompt_name is None and kwargs.get("prompt") is None and "query" in self.prompts:
            prompt_name = "query"
        return self.encode(sentences, prompt_name, **kwargs)

    def encode_document(self, sentences, prompt_name: str | None = None, **kwargs: Any):
        """``encode`` with the ``"document"`` (or ``"passage"`` / ``"corpus"``) system prompt."""
        if prompt_name is None and kwargs.get("prompt") is None:
            prompt_name = next(
                (n for n in ("document", "passage", "corpus") if n in self.prompts), None
            )
        return self.encode(sentences, prompt_name, **kwargs)

    def rationales(self, texts: list[str], batch_size: int = 16, **kwargs: Any) -> list[str]:
        """Just the rationales (generated or cached)."""
        kwargs.update(batch_size=batch_size, return_rationales=True, mode="rationale")
        return self.encode(texts, **kwargs)[1]

    def similarity(self, a, b) -> torch.Tensor:
        """Cosine similarity matrix (the paper's and upstream's similarity)."""
        a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
        return (
            F.normalize(a.reshape(-1, a.shape[-1]), dim=-1)
            @ F.normalize(b.reshape(-1, b.shape[-1]), dim=-1).T
        )

    # ------------------------------------------------------------------ internals
    def _pool(self, seqs: list[list[int]], system_len: int) -> torch.Tensor:
        from grace_lightning.embedding import encode_prompts

        return encode_prompts(
            self.model, seqs, system_len, self.tokenizer.pad_token_id, batch_size=len(seqs)
        ).float()

    def _pool_sequences(
        self, unique: list[str], seqs: list[list[int]], system_len: int, batch_size, show, mode
    ) -> dict[str, torch.Tensor]:
        """Each text's sequence pooled after the system prompt, longest first in batches."""
        order = sorted(range(len(unique)), key=lambda i: -len(seqs[i]))  # by length
        vecs: dict[str, torch.Tensor] = {}
        with tqdm(
            total=len(unique), desc=f"Encoding ({mode})", unit="text", disable=not show
        ) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                pooled = self._pool([seqs[i] for i in idx], system_len)
                vecs.update((unique[i], v) for i, v in zip(idx, pooled))
                bar.update(len(idx))
        return vecs

    def _encode_base(self, texts, prompter, batch_size, show) -> torch.Tensor:
        unique = list(dict.fromkeys(texts))  # duplicates are encoded once
        prompt_ids = prompter.encode(unique)
        vecs = self._pool_sequences(
            unique, prompt_ids, prompter.system_len, batch_size, show, "base"
        )
        return torch.stack([vecs[t] for t in texts])

    def echo_ids(self, prompt_ids: list[int], prompter: ChatPrompter) -> list[int]:
        """The echo "rationale" of one prompt: the text's tokens as they stand in the prompt
        (cut as the prompt cuts them), at most ``generation.max_new_tokens``, + EOS if it fits."""
        body = prompt_ids[prompter.system_len : len(prompt_ids) - prompter.tail_len]
        budget = int(self.generation.max_new_tokens)
        copy = list(body[:budget])
        if len(copy) < budget:  # a rationale that stopped: its EOS is pooled too
            copy.append(self.eos_ids[0])
        return copy

    def _encode_echo(self, texts, prompter, batch_size, show):
        unique = list(dict.fromkeys(texts))
        prompt_ids = prompter.encode(unique)
        seqs = [p + self.echo_ids(p, prompter) for p in prompt_ids]  # prompt + copy
        vecs = self._pool_sequences(unique, seqs, prompter.system_len, batch_size, show, "echo")
        copies = {
            t: self.tokenizer.decode(s[len(p) :], skip_special_tokens=True)
            for t, p, s in zip(unique, prompt_ids, seqs)
        }
        return torch.stack([vecs[t] for t in texts]), [copies[t] for t in texts]

    def _encode_rationale(self, texts, prompter, batch_size, show):
        settings = self.settings()
        sp = prompter.system_prompt
        keys = [rationale_key(self.fingerprint, sp, t, settings) for t in texts]
        unique = dict(zip(keys, texts))  # key -> text (duplicates generate once)
        found = self.cache.get_many(unique) if self.cache is not None else {}
        todo = [k for k in unique if k not in found or found[k].embedding is None]
        self.stats["cached"] += len(unique) - len(todo)

        if todo:
            prompt_ids = dict(zip(todo, prompter.encode([unique[k] for k in todo])))
            todo.sort(key=lambda k: -len(prompt_ids[k]))  # longest first: OOM shows up early
            with tqdm(
                total=len(todo), desc="Generating rationales", unit="text", disable=not show
            ) as bar:
                for start in range(0, len(todo), batch_size):
                    chunk = todo[start : start + batch_size]
                    new = self._generate(chunk, prompt_ids, unique, prompter.system_len)
                    found.update(new)
                    if self.cache is not None:
                        self.cache.put_many({k: (unique[k], new[k]) for k in chunk})
                    bar.update(len(chunk))
        emb = torch.stack([torch.from_numpy(np.array(found[k].embedding)) for k in keys])
        return emb.float(), [found[k].rationale for k in keys]

    def _generate(self, keys, prompt_ids, texts, system_len) -> dict[str, CachedRationale]:
        g = self.generation
        engine = HFRolloutEngine(
            self.model,
            self.tokenizer,
            max_new_tokens=g.max_new_tokens,
            top_p=g.top_p,
            top_k=g.top_k,
            eos_token_ids=self.eos_ids,
            ignore_eos=g.ignore_eos,
        )
        out = engine.generate(
            [prompt_ids[k] for k in keys],
            num_samples=1,
            temperature=g.temperature,
            system_len=system_len,
            seeds=[text_seed(g.seed, texts[k]) for k in keys],
        )
        self.stats["generate_calls"] += 1
        self.stats["generated"] += len(keys)
        ids = [row[mask.bool()].tolist() for row, mask in zip(out.response_ids, out.response_mask)]
        pooled = out.pooled.float().cpu().numpy()
        return {
            k: CachedRationale(
                rationale=self.tokenizer.decode(r, skip_special_tokens=True),
                response_ids=r,
                finished=bool(fin),
                embedding=vec,
            )
            for k, r, fin, vec in zip(keys, ids, out.finished.tolist(), pooled)
        }


def encode_output(
    emb: torch.Tensor,
    rationales: list,
    *,
    single: bool,
    normalize_embeddings: bool,
    convert_to_numpy: bool,
    convert_to_tensor: bool,
    return_rationales: bool,
):
    """``encode``'s return value from (N, D) embeddings and N rationales, as sentence-transformers:
    normalised on request, 1-D for a single string, numpy unless a tensor is asked for."""
    if normalize_embeddings:
        emb = F.normalize(emb, dim=-1)
    if single:
        emb, rationales = emb[0], rationales[0]
    out = emb if convert_to_tensor or not convert_to_numpy else emb.numpy()
    return (out, rationales) if return_rationales else out


def _saved_dtype(export: Path) -> str:
    """The dtype the export was saved in (bf16 exports stay bf16 on GPU; CPU computes in fp32)."""
    import json

    if not torch.cuda.is_available():
        return "float32"
    if not (export / "config.json").exists():  # adapter-only export: the base decides
        return "bfloat16"
    cfg = json.loads((export / "config.json").read_text())
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")


def _hub_message(hub_id: str, err: Exception | None = None) -> str:
    why = f" ({type(err).__name__}: {err})" if err else ""
    return (
        f"model {hub_id!r} is a Hugging Face Hub id (not a local path or directory), and the Hub "
        f"cannot be reached{why}. Offline, use model=smollm2 (the embedded default), model=tiny, "
        f"or a local run/export dir."
    )


def _grace_snapshot(hub_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot of a Hub repo that is a GRACE export, else None."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(hub_id, "grace_config.json", revision=revision)
    except EntryNotFoundError:
        return None
    except Exception as e:
        if hub_offline():  # _check_hub found the repo in the cache, without grace_config.json
            return None  # offline, no such repo, gated: say which and what to do
        if type(e).__name__ in ("RepositoryNotFoundError", "GatedRepoError"):
            raise HubUnavailableError(f"model {hub_id!r}: {type(e).__name__}: {e}") from e
        raise HubUnavailableError(_hub_message(hub_id, e)) from e
    patterns = ["*.json", "*.safetensors", "*.py", "*.jinja", "*.txt", "*.model", "*.md"]
    return Path(snapshot_download(hub_id, revision=revision, allow_patterns=patterns))


def _check_hub(hub_id: str) -> None:
    if hub_offline():
        try:  # offline mode still serves ids already in the local HF cache
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
                return
        except Exception:
            pass
        raise HubUnavailableError(_hub_message(hub_id, None) + " (HF_HUB_OFFLINE is set)")

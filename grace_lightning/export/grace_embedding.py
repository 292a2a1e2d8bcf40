"""GRACE (arXiv 2510.04506) as a sentence-transformers module: ``GraceEmbedding``.

This file is SELF-CONTAINED (torch + transformers; sentence-transformers when it is there): an
export copies it next to its weights and names it in ``modules.json``, so

    model = SentenceTransformer("<export dir or Hub id>", trust_remote_code=True)
    vecs = model.encode(["A man is playing a guitar."])                 # (N, D) float32
    why = model.encode(["A man is playing a guitar."], output_value="rationale")  # list[str]
    q = model.encode_query(["who plays?"])   # the "query" system prompt, if the export has one

gives the vectors ``grace_lightning.GraceEncoder`` gives, without grace_lightning installed.

How a text is embedded (GRACE §3.3; upstream ``eval_mteb.py``):

1. chat template: system prompt (the ``prompt`` sentence-transformers passes, e.g. from
   ``prompts["query"]``; else the export's own) + the text as the user turn + the assistant header;
   the text alone is cut to fit ``max_prompt_tokens``, so the template stays intact;
2. ``mode="base"``: mean of the last-layer hidden states over the prompt after the system prompt;
   ``mode="rationale"``: sample a rationale (inverse-CDF sampling, one uniform per token from a
   per-text seed: a text's rationale does not depend on its batch), and pool over the prompt after
   the system prompt + the rationale (EOS included), no L2 normalisation.

Sampling matches ``grace_lightning.rollout.engine.HFRolloutEngine`` step for step (same seeds,
same filtering, same pooling), so the vectors agree with ``GraceEncoder`` (tests/test_st.py).
``model.encode(..., mode="base")`` switches mode per call; ``model[0].max_new_tokens = 256`` etc.
change generation settings.

Speed (as ``GraceEncoder``; ``bench/encode.py`` measures both side by side):

- shared prefix (``share_prefix=True``, the default): the system prompt + chat header every text
  of a batch starts with (~40 tokens, most of a short sentence's prompt) is run once per batch,
  batch 1, and its KV reused by every row; pooling starts after it, so the vectors do not change
  (full-attention models; sliding-window / hybrid ones run the whole prompt per row);
- ``precision="bf16"``: matmuls under ``torch.autocast(<device>, bfloat16)`` over the weights as
  loaded (pooling and sampling arithmetic stay fp32); ``"fp32"`` (default) runs as loaded.
  ``model_kwargs={"dtype": "bfloat16"}`` loads bf16 weights instead (GPU).

Both are ``model_kwargs`` at load (``SentenceTransformer(path, trust_remote_code=True,
model_kwargs={"precision": "bf16"})``), keys of ``grace_config.json`` or attributes
(``model[0].precision = "bf16"``). ``encode(..., precision=...)`` is sentence-transformers' own
(output quantisation), not this.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from typing import Any

import torch

try:  # sentence-transformers >= 6
    from sentence_transformers.base.modules import InputModule as _Base
except ImportError:  # pragma: no cover - other versions / no sentence-transformers
    try:
        from sentence_transformers.models import InputModule as _Base  # 4.x / 5.x
    except ImportError:
        _Base = torch.nn.Module

CONFIG_NAME = "grace_config.json"
MODES = ("base", "rationale")
PRECISIONS = ("fp32", "bf16")  # bf16: autocast over the weights as loaded
GENERATION_DEFAULTS = {  # paper/upstream eval: T=1.0, top_p=1.0, up to 2048 new tokens
    "temperature": 1.0,
    "max_new_tokens": 2048,
    "top_p": 1.0,
    "top_k": 0,
    "seed": 0,
    "ignore_eos": False,
}
_SENTINEL = "\u2063GRACE_TEXT\u2063"


# ----------------------------------------------------------------------------- seeds and sampling
def text_seed(seed: int, text: str) -> int:
    """Per-text seed (same as grace_lightning.rollout.engine.text_seed)."""
    digest = hashlib.sha256(f"{int(seed)}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_seed(seed: int, sample: int) -> int:
    """Seed of sample ``sample`` of a prompt seeded ``seed`` (grace_lightning's row_seed)."""
    digest = hashlib.sha256(f"{int(seed)}:{int(sample)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k / nucleus filtering; filtered entries become -inf. logits: (N, V)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """First token whose cumulative probability exceeds u. probs: (A, V), u: (A,) -> (A,)."""
    cdf = probs.double().cumsum(-1)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return tok.clamp(max=probs.size(-1) - 1)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and mask, padded on the left."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, length - len(s) :] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the attention mask under left padding. (B, L)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def pooling_mask(mask: torch.Tensor, system_len: int) -> torch.Tensor:
    """Valid prompt positions after the first ``system_len`` (the system prompt). (B, L) bool."""
    return mask.bool() & (mask.cumsum(-1) > system_len)


def _cache_kwarg(decoder) -> str:
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def full_attention_only(model) -> bool:
    """True when every layer is plain full attention (a prefix KV can be reused as is)."""
    types = getattr(model.config, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return False
    return not getattr(model.config, "use_sliding_window", False)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {PRECISIONS}")
    return precision


def _cache_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values), (B, H, L, d) each, of a DynamicCache (4.x and 5.x layouts)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # pragma: no cover - transformers 4.x


def suffix_rows(ids: torch.Tensor, mask: torch.Tensor, start: int, pad_id: int):
    """Left-padded (B, L) rows without their first ``start`` real tokens.

    Returns ids (B, T) and mask (B, T) of the rest, left-padded, the attention mask over
    [prefix | rest] (B, start + T) and position ids (B, T) continuing from ``start``.
    """
    rest = [row[m.bool()][start:].tolist() for row, m in zip(ids, mask)]
    s_ids, s_mask = left_pad(rest, pad_id)
    s_ids, s_mask = s_ids.to(ids.device), s_mask.to(ids.device)
    full = torch.cat([s_mask.new_ones((len(rest), start)), s_mask], dim=-1)
    return s_ids, s_mask, full, positions_from_mask(s_mask) + start


# ----------------------------------------------------------------------------- the module
class GraceEmbedding(_Base):
    """A GRACE policy as a sentence-transformers input module (see the file docstring)."""

    config_file_name = CONFIG_NAME
    # model.encode(texts, mode="base"); not "precision": SentenceTransformer.encode has its own
    # (quantisation of the output), so ours is set at load, in grace_config.json or as an attribute
    forward_kwargs = {"mode"}
    save_in_root = True

    def __init__(
        self,
        model,
        tokenizer,
        system_prompt: str | None = None,
        max_prompt_tokens: int = 1024,
        mode: str = "rationale",
        generation: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        precision: str = "fp32",
        share_prefix: bool = True,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {MODES}")
        self.precision = check_precision(precision)
        self.share_prefix = bool(share_prefix)  # run the system prompt once per batch
        self.model = model.eval()
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.system_prompt = system_prompt
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.max_seq_length = self.max_prompt_tokens
        self.mode = mode
        gen = {**GENERATION_DEFAULTS, **(generation or {})}
        self.temperature = float(gen["temperature"])
        self.max_new_tokens = int(gen["max_new_tokens"])
        self.top_p = float(gen["top_p"])
        self.top_k = int(gen["top_k"])
        self.seed = int(gen["seed"])
        self.ignore_eos = bool(gen["ignore_eos"])
        self.config = dict(config or {})
        self._frames: dict[str | None, tuple[list[int], list[int]]] = {}

    # ------------------------------------------------------------------ sentence-transformers API
    @property
    def modalities(self) -> list[str]:
        return ["text"]

    def get_sentence_embedding_dimension(self) -> int:
        return int(self.model.config.hidden_size)

    get_embedding_dimension = get_sentence_embedding_dimension

    @property
    def generation(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in GENERATION_DEFAULTS}

    def _frame(self, system_prompt: str | None) -> tuple[list[int], list[int]]:
        """(head ids, tail ids) of the chat template around the user text."""
        if system_prompt not in self._frames:
            messages = [{"role": "user", "content": _SENTINEL}]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
            rendered = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            if rendered.count(_SENTINEL) != 1:
                raise ValueError("chat template must contain the user text exactly once")
            head, tail = rendered.split(_SENTINEL)
            ids = [self.tokenizer(s, add_special_tokens=False)["input_ids"] for s in (head, tail)]
            if self.max_prompt_tokens - len(ids[0]) - len(ids[1]) < 1:
                raise ValueError(
                    f"max_prompt_tokens={self.max_prompt_tokens} leaves no room for text"
                )
            self._frames[system_prompt] = (ids[0], ids[1])
        return self._frames[system_prompt]

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, Any]:
        """Texts -> chat-templated ids. ``prompt`` is the SYSTEM prompt (None/"": the export's)."""
        texts = [t if isinstance(t, str) else str(t[0]) for t in inputs]
        head, tail = self._frame(prompt or self.system_prompt)
        budget = self.max_prompt_tokens - len(head) - len(tail)
        body = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids, mask = left_pad([head + b[:budget] + tail for b in body], self.tokenizer.pad_token_id)
        return {
            "input_ids": ids,  # (B, L) left-padded
            "attention_mask": mask,  # (B, L)
            "system_len": torch.full((len(texts),), len(head), dtype=torch.long),  # (B,)
            "text_seeds": [text_seed(self.seed, t) for t in texts],
        }

    def tokenize(self, texts, **kwargs) -> dict[str, Any]:  # sentence-transformers < 6
        return self.preprocess(texts, **kwargs)

    def forward(self, features: dict[str, Any], mode: str | None = None, **kwargs):
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {MODES}")
        system_len = int(features["system_len"][0])
        with self._autocast(check_precision(self.precision)):
            if mode == "base":
                features["sentence_embedding"] = self._base(features, system_len)
                features["rationale"] = [None] * features["input_ids"].shape[0]
            else:
                emb, rationales = self._rationale(features, system_len)
                features["sentence_embedding"] = emb
                features["rationale"] = rationales
        return features

    def _autocast(self, precision: str):
        if precision == "bf16":
            device = next(self.model.parameters()).device
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ embedding
    def _prefix_len(self, mask: torch.Tensor, system_len: int) -> int:
        """Tokens every row starts with that are run once (<= system_len, >= 1 token left)."""
        if not self.share_prefix or not full_attention_only(self.model):
            return 0
        return max(0, min(system_len, int(mask.sum(-1).min()) - 1))

    @torch.no_grad()
    def _prefill(self, features, system_len: int, cache=None):
        """The decoder over the prompts: with a shared prefix, the prefix once (batch 1) and
        every row's rest after its KV. Returns the last hidden states (B, T, D), the pooling mask
        (B, T), the attention mask over everything run so far (B, L) and each row's length (B,)."""
        ids, mask = features["input_ids"], features["attention_mask"]  # (B, L) left-padded
        decoder = self.model.get_decoder()
        key = _cache_kwarg(decoder)
        start = self._prefix_len(mask, system_len)
        if not start:
            extra = {key: cache, "use_cache": True} if cache is not None else {}
            hidden = decoder(
                input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), **extra
            ).last_hidden_state  # (B, L, D)
            return hidden, pooling_mask(mask, system_len), mask, mask.sum(-1)
        from transformers import DynamicCache

        head = ids[0][mask[0].bool()][:start][None]  # (1, S): the same in every row
        once = DynamicCache(config=self.model.config)
        decoder(
            input_ids=head,
            attention_mask=torch.ones_like(head),
            position_ids=torch.arange(start, device=ids.device)[None],
            use_cache=True,
            **{key: once},
        )
        cache = DynamicCache(config=self.model.config) if cache is None else cache
        for layer, (k, v) in enumerate(_cache_kv(once)):  # (1, H, S, d) -> (B, H, S, d)
            cache.update(k.expand(len(ids), -1, -1, -1), v.expand(len(ids), -1, -1, -1), layer)
        s_ids, s_mask, full, pos = suffix_rows(ids, mask, start, self.tokenizer.pad_token_id)
        hidden = decoder(
            input_ids=s_ids, attention_mask=full, position_ids=pos, use_cache=True, **{key: cache}
        ).last_hidden_state  # (B, T, D)
        return hidden, pooling_mask(s_mask, system_len - start), full, mask.sum(-1)

    @torch.no_grad()
    def _base(self, features, system_len: int) -> torch.Tensor:
        hidden, pool, _, _ = self._prefill(features, system_len)  # (B, T, D), (B, T)
        total = torch.where(pool[..., None], hidden.float(), 0.0).sum(1)
        return total / pool.sum(-1, keepdim=True).clamp(min=1)  # (B, D) float32

    def _eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(ids))

    @torch.no_grad()
    def _rationale(self, features, system_len: int) -> tuple[torch.Tensor, list[str]]:
        """One sampled rationale per text; embeddings pooled during sampling (no extra pass)."""
        from transformers import DynamicCache

        model = self.model
        decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
        cache_key = _cache_kwarg(decoder)
        p_ids = features["input_ids"]  # (N, Lp) left-padded
        device, n_rows, steps = p_ids.device, p_ids.shape[0], self.max_new_tokens
        pad_id = self.tokenizer.pad_token_id

        cache = DynamicCache(config=model.config)
        # last hidden (N, T, D), pooling mask (N, T), attention so far (N, L), positions (N,)
        last, pool, attn, next_pos = self._prefill(features, system_len, cache)
        hidden = last.float()  # (N, T, D)
        emb_sum = torch.where(pool[..., None], hidden, 0.0).sum(1)  # (N, D)
        emb_count = pool.sum(-1).float()  # (N,)
        logits = lm_head(last[:, -1]).float()  # (N, V)

        active = torch.arange(n_rows, device=device)
        resp = torch.full((n_rows, steps), pad_id, dtype=torch.long, device=device)
        resp_mask = torch.zeros((n_rows, steps), dtype=torch.long, device=device)
        eos = torch.tensor(self._eos_ids(), device=device)
        uniforms = torch.stack(  # (N, steps): each text's own stream
            [
                torch.rand(steps, generator=torch.Generator().manual_seed(row_seed(s, 0)))
                for s in features["text_seeds"]
            ]
        ).to(device, torch.float64)
        temp = torch.full((n_rows, 1), self.temperature, device=device)

        for t in range(steps):
            tmp = temp[active]
            greedy = tmp <= 0
            scaled = logits / torch.where(greedy, 1.0, tmp)
            probs = filter_logits(scaled, self.top_k, self.top_p).softmax(-1)
            tok = sample_inverse_cdf(probs, uniforms[active, t])
            tok = torch.where(greedy.squeeze(-1), scaled.argmax(-1), tok)  # (A,)
            resp[active, t] = tok
            resp_mask[active, t] = 1
            ended = torch.isin(tok, eos) & (not self.ignore_eos)

            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)
            out = decoder(
                input_ids=tok[:, None],
                attention_mask=attn,
                position_ids=next_pos[:, None],
                use_cache=True,
                **{cache_key: cache},
            )
            h = out.last_hidden_state[:, -1]  # (A, D)
            emb_sum[active] += h.float()
            emb_count[active] += 1
            next_pos = next_pos + 1
            keep = ~ended
            if not keep.any() or t == steps - 1:
                break
            if ended.any():  # finished rows leave the batch
                idx = keep.nonzero().squeeze(-1)
                cache.batch_select_indices(idx)
                active, attn, h, next_pos = active[idx], attn[idx], h[idx], next_pos[idx]
            logits = lm_head(h).float()

        rationales = [
            self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
            for row, m in zip(resp, resp_mask)
        ]
        return emb_sum / emb_count.clamp(min=1)[:, None], rationales  # (N, D) float32

    # ------------------------------------------------------------------ load / save
    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> GraceEmbedding:
        """An export dir or Hub id. ``model_kwargs`` go to ``from_pretrained`` (e.g. ``dtype``),
        except GRACE's own: ``mode``, ``system_prompt``, ``precision``, ``share_prefix`` and the
        generation settings."""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import cached_file

        hub = dict(
            token=token,
            cache_dir=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        path = os.path.join(model_name_or_path, subfolder) if subfolder else model_name_or_path
        cfg_file = cached_file(
            path, CONFIG_NAME, _raise_exceptions_for_missing_entries=False, **hub
        )
        cfg = {}
        if cfg_file:
            with open(cfg_file, encoding="utf-8") as f:
                cfg = json.load(f)
        mk = dict(model_kwargs or {})
        names = ("mode", "system_prompt", "precision", "share_prefix", *GENERATION_DEFAULTS)
        own = {k: mk.pop(k) for k in names if k in mk}
        mk.setdefault("dtype", "float32" if not torch.cuda.is_available() else "auto")
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, **hub, **mk
        )
        tokenizer = AutoTokenizer.from_pretrained(path, **hub)
        generation = {**dict(cfg.get("generation") or {})}
        generation.update({k: own[k] for k in GENERATION_DEFAULTS if k in own})
        return cls(
            model,
            tokenizer,
            system_prompt=own.get("system_prompt", cfg.get("system_prompt")),
            max_prompt_tokens=int(cfg.get("max_prompt_tokens") or 1024),
            mode=own.get("mode") or cfg.get("embedding_mode") or "rationale",
            generation=generation,
            config=cfg,
            precision=own.get("precision") or cfg.get("precision") or "fp32",
            share_prefix=bool(own.get("share_prefix", cfg.get("share_prefix", True))),
        )

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.model.save_pretrained(output_path, safe_serialization=safe_serialization)
        self.tokenizer.save_pretrained(output_path)
        cfg = {
            **self.config,
            "system_prompt": self.system_prompt,
            "max_prompt_tokens": self.max_prompt_tokens,
            "embedding_mode": self.mode,
            "generation": self.generation,
            "precision": self.precision,
            "share_prefix": self.share_prefix,
        }
        with open(os.path.join(output_path, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        src = os.path.abspath(__file__)
        dst = os.path.join(output_path, os.path.basename(src))
        if os.path.abspath(dst) != src:
            with open(src, encoding="utf-8") as f_in, open(dst, "w", encoding="utf-8") as f_out:
                f_out.write(f_in.read())

    def __repr__(self) -> str:
        return (
            f"GraceEmbedding(mode={self.mode!r}, dim={self.get_sentence_embedding_dimension()}, "
            f"max_prompt_tokens={self.max_prompt_tokens}, precision={self.precision!r}, "
            f"share_prefix={self.share_prefix}, generation={self.generation})"
        )

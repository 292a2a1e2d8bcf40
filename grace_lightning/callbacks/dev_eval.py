"""Model selection on dev data: score the policy on a small STS dev suite during training.

Every ``every_n_rollout_batches`` rollout batches (one ``on_train_batch_end`` = one rollout
batch, as `utils.checkpointing.RolloutCheckpoint` counts), the current policy embeds the dev
pairs in the mode the run will be evaluated in and the callback logs, via ``pl_module.log``:

- ``val/<task>``: Spearman x100 between the cosine of the two sentences' embeddings and the gold
  score (MTEB's STS main score, ``cosine_spearman``), e.g. ``val/stsb_dev``, ``val/sick_trial``;
- ``val/dev_avg``: their mean.

Those land in ``trainer.callback_metrics`` within the same hook, before any checkpoint callback
runs (Lightning moves checkpoint callbacks last), so ``ModelCheckpoint(monitor="val/dev_avg",
mode="max")`` (or `RolloutCheckpoint`) ranks checkpoints by them. Keep the cadence equal to the
checkpoint cadence: a checkpoint taken between two dev evaluations is ranked by the older score.

Dev data only: STS-B dev and the SICK trial set (``../shared/data``), seeded subsets of
``max_samples`` pairs. A task file whose name says ``test`` is refused: never select on test.

``at_start``: the untrained policy is scored before the first update (``step 0``: what training
has to beat); ``at_end``: the final policy is scored when training ends unless the last rollout
batch was just scored. Those two are written to the loggers and ``trainer.callback_metrics``
directly (Lightning forbids ``self.log`` in ``on_train_start``/``on_train_end``).
``export_best_dir``: each new best dev score exports the policy there (``ExportPolicy``'s
export, FSDP-safe), so that directory is always the best dev checkpoint.
``base_reference``: a rationale run also scores the untrained model without a rationale at start
(the paper's "Base" row; the run's own start score is its "w/ reasoning" row), so that
``summary()`` - printed by ``train.py`` when training ends - shows the trained policy next to both.

Modes: ``base`` (no rationale: mean over the prompt after the system prompt,
`embedding.encode_prompts`), ``rationale`` (one sampled rationale per text from the training
sampler, ``generation`` settings, one seed per text: `rollout.engine.text_seed`), ``auto``: the
module's ``embedding_mode`` (base for the contrastive baselines), else rationale (GRACE).
Every rank scores the whole suite (FSDP needs every rank in each forward); results agree.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_DEV_TASKS",
    "DevEvaluation",
    "DevTask",
    "embed_texts",
    "load_dev_pairs",
    "score_pairs",
    "spearman_x100",
]


@dataclass(frozen=True)
class DevTask:
    """One STS dev task: a JSON-lines file with two sentences and a gold score per line."""

    name: str  # logged as val/<name>
    path: str  # absolute, or relative to the data root
    sentence1: str = "sentence1"
    sentence2: str = "sentence2"
    score: str = "score"
    max_samples: int | None = 200  # seeded subset of pairs; None = all


DEFAULT_DEV_TASKS = (
    DevTask("stsb_dev", "stsb/dev.jsonl"),  # 1,500 pairs, scores 0-5
    DevTask("sick_trial", "sick/trial.jsonl", "sentence_A", "sentence_B", "relatedness_score"),
)


def _plain(x: Any) -> Any:
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig | ListConfig) else x


def load_dev_pairs(
    task: DevTask, data_root: str | Path | None = None, seed: int = 42
) -> tuple[list[str], list[str], list[float]]:
    """(sentences1, sentences2, gold scores) of a seeded ``task.max_samples`` subset."""
    from grace_lightning.eval.local_tasks import (
        LocalDataError,
        _subsample,
        default_data_root,
        read_jsonl,
    )

    path = Path(task.path)
    if not path.is_absolute():
        path = Path(data_root or default_data_root()) / path
    if "test" in path.name.lower():
        raise ValueError(
            f"dev task {task.name}: {path} looks like a test split; model selection must never "
            f"see test data. Use a dev/trial/train file (STS-B dev.jsonl, SICK trial.jsonl)"
        )
    if not path.is_file():
        raise LocalDataError(
            f"dev task {task.name}: file not found: {path} (set callbacks.dev_eval.data_root or "
            f"$GRACE_DATA_ROOT)"
        )
    rows = read_jsonl(path)
    keep = _subsample(len(rows), task.max_samples, seed)
    return (
        [rows[i][task.sentence1] for i in keep],
        [rows[i][task.sentence2] for i in keep],
        [float(rows[i][task.score]) for i in keep],
    )


@torch.no_grad()
def embed_texts(
    model,
    tokenizer,
    prompter,
    texts: list[str],
    mode: str,
    generation: dict | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """(N, D) float32 CPU embeddings of ``texts`` (duplicates encoded once), eval mode.

    base: `embedding.encode_prompts`; rationale: one rationale per text from `HFRolloutEngine`
    at ``generation`` (temperature, max_new_tokens, top_p, top_k, seed), pooled in the sampling
    pass. The model's train/eval mode is restored afterwards.
    """
    from grace_lightning.embedding import encode_prompts
    from grace_lightning.rollout.engine import HFRolloutEngine, text_seed

    if mode not in ("base", "rationale"):
        raise ValueError(f"mode={mode!r}: use base or rationale")
    unique = list(dict.fromkeys(texts))
    ids = prompter.encode(unique)
    was = model.training
    model.eval()
    try:
        if mode == "base":
            vecs = encode_prompts(
                model, ids, prompter.system_len, tokenizer.pad_token_id, batch_size=batch_size
            ).float()
        else:
            g = dict(generation or {})
            engine = HFRolloutEngine(
                model,
                tokenizer,
                max_new_tokens=int(g.get("max_new_tokens", 64)),
                top_p=float(g.get("top_p", 1.0)),
                top_k=int(g.get("top_k", 0)),
            )
            seed = int(g.get("seed", 0))
            parts = []
            for start in range(0, len(unique), batch_size):
                chunk = unique[start : start + batch_size]
                out = engine.generate(
                    ids[start : start + batch_size],
                    num_samples=1,
                    temperature=float(g.get("temperature", 1.0)),
                    system_len=prompter.system_len,
                    seeds=[text_seed(seed, t) for t in chunk],
                )
                parts.append(out.pooled.float().cpu())
            vecs = torch.cat(parts)
    finally:
        model.train(was)
    index = {t: i for i, t in enumerate(unique)}
    return vecs.cpu()[[index[t] for t in texts]]


def spearman_x100(pred: list[float] | torch.Tensor, gold: list[float]) -> float:
    """Spearman rank correlation x100 (ties get average ranks, as scipy)."""
    from scipy.stats import spearmanr

    pred = pred.tolist() if torch.is_tensor(pred) else list(pred)
    rho = spearmanr(pred, gold).statistic
    return float(rho) * 100.0 if not math.isnan(rho) else float("nan")


def score_pairs(a: torch.Tensor, b: torch.Tensor, gold: list[float]) -> float:
    """Spearman x100 of cos(a_i, b_i) against the gold scores (MTEB ``cosine_spearman``)."""
    return spearman_x100(F.cosine_similarity(a.float(), b.float(), dim=-1), gold)


class DevEvaluation(L.Callback):
    """Score the policy on the dev suite every N rollout batches (see the module docstring).

    Args:
        tasks: a list of `DevTask` fields (dicts); None = STS-B dev + SICK trial.
        data_root: where relative task paths live; None = ``$GRACE_DATA_ROOT`` else
            ``<repo>/../shared/data``.
        every_n_rollout_batches: cadence; 0 / None = only at start / end.
        mode: ``auto`` | ``base`` | ``rationale``.
        max_samples: overrides every task's ``max_samples`` when set.
        batch_size: texts per forward / generation batch.
        generation: rationale sampling (temperature, max_new_tokens, top_p, top_k, seed).
        at_start, at_end: also score before the first update / when training ends.
        export_best_dir: export the policy here at every new best ``val/dev_avg`` (None: off).
        seed: the subsample seed (fixed over the run: every evaluation sees the same pairs).
        base_reference: rationale runs also score the untrained model in base mode at start.
    """

    def __init__(
        self,
        tasks: list[dict] | None = None,
        data_root: str | None = None,
        every_n_rollout_batches: int | None = 10,
        mode: str = "auto",
        max_samples: int | None = None,
        batch_size: int = 16,
        generation: dict | None = None,
        at_start: bool = True,
        at_end: bool = True,
        export_best_dir: str | None = None,
        seed: int = 42,
        base_reference: bool = True,
    ):
        if mode not in ("auto", "base", "rationale"):
            raise ValueError(f"callbacks.dev_eval.mode={mode!r}: use auto, base or rationale")
        n = every_n_rollout_batches
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(
                f"callbacks.dev_eval.every_n_rollout_batches={n!r}: a whole number >= 0 "
                f"(0 or null: only at start/end)"
            )
        tasks = _plain(tasks)
        specs = [DevTask(**t) for t in tasks] if tasks else list(DEFAULT_DEV_TASKS)
        if max_samples is not None:
            specs = [DevTask(**{**t.__dict__, "max_samples": int(max_samples)}) for t in specs]
        names = [t.name for t in specs]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"callbacks.dev_eval.tasks: need distinct task names, got {names}")
        self.tasks = specs
        self.data_root = data_root
        self.every = int(n or 0)
        self.mode = mode
        self.batch_size = int(batch_size)
        self.generation = dict(_plain(generation) or {})
        self.at_start, self.at_end = bool(at_start), bool(at_end)
        self.export_best_dir = Path(export_best_dir) if export_best_dir else None
        self.seed = int(seed)
        self.base_reference = bool(base_reference)
        self.start_base: dict[str, float] | None = None  # untrained model, base mode
        self.start_scores: dict[str, float] | None = None  # untrained model, run mode
        self.mode_at_start: str | None = None
        self.rollout_batches = 0
        self.last_scored = -1  # rollout batch count at the last evaluation
        self.best = -math.inf
        self.best_at = -1  # rollout batch of the best dev_avg
        self.history: list[dict[str, float]] = []  # one row per evaluation (this process)
        self._data: list[tuple[str, list[str], list[str], list[float]]] | None = None

    # ------------------------------------------------------------------ scoring
    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if self._data is None:  # fail at startup when a file is missing
            self._data = [
                (t.name, *load_dev_pairs(t, self.data_root, self.seed)) for t in self.tasks
            ]

    def resolved_mode(self, pl_module) -> str:
        return (
            getattr(pl_module, "embedding_mode", "rationale") if self.mode == "auto" else self.mode
        )

    def evaluate(self, pl_module, mode: str | None = None) -> dict[str, float]:
        """``{"val/<task>": score, ..., "val/dev_avg": mean}`` for the current policy, in the
        run's mode (``mode=None``) or the one given."""
        if self._data is None:
            self._data = [
                (t.name, *load_dev_pairs(t, self.data_root, self.seed)) for t in self.tasks
            ]
        mode = mode or self.resolved_mode(pl_module)
        out: dict[str, float] = {}
        for name, s1, s2, gold in self._data:
            emb = embed_texts(
                pl_module.policy,
                pl_module.tokenizer,
                pl_module.prompter,
                s1 + s2,
                mode,
                self.generation,
                self.batch_size,
            )
            out[f"val/{name}"] = score_pairs(emb[: len(s1)], emb[len(s1) :], gold)
        out["val/dev_avg"] = sum(out.values()) / len(out)
        return out

    def _after_scoring(self, trainer: L.Trainer, pl_module, scores: dict[str, float]) -> None:
        self.last_scored = self.rollout_batches
        self.history.append({"rollout_batch": float(self.rollout_batches), **scores})
        log.info(
            "dev (%s) after %d rollout batches: %s",
            self.resolved_mode(pl_module),
            self.rollout_batches,
            ", ".join(f"{k} {v:.2f}" for k, v in scores.items()),
        )
        avg = scores["val/dev_avg"]
        if math.isfinite(avg) and avg > self.best:
            self.best, self.best_at = avg, self.rollout_batches
            if self.export_best_dir is not None:
                from grace_lightning.callbacks.export import ExportPolicy

                ExportPolicy(str(self.export_best_dir)).on_train_end(trainer, pl_module)

    def card_scores(self, trainer: L.Trainer) -> dict[str, Any] | None:
        """The last scores (the final policy's when it scores at the end) as the export's model card
        reads them (callbacks/export.py), or None before the first scoring."""
        if not self.history:
            return None
        last = self.history[-1]
        pairs = {name: len(s1) for name, s1, _, _ in self._data or []}
        start = self.start_scores or {}
        return {
            "mode": self.resolved_mode(trainer.lightning_module),
            "rollout_batch": int(last["rollout_batch"]),
            "metric": "cosine_spearman x100",
            "tasks": [
                {
                    "task": t.name,
                    "path": str(t.path),
                    "pairs": pairs.get(t.name),
                    "score": float(last[f"val/{t.name}"]),
                }
                for t in self.tasks
                if f"val/{t.name}" in last
            ],
            "dev_avg": float(last["val/dev_avg"]) if "val/dev_avg" in last else None,
            "start": {k.removeprefix("val/"): float(v) for k, v in start.items()},
        }

    def _publish_directly(self, trainer: L.Trainer, scores: dict[str, float]) -> None:
        """Hooks where ``self.log`` is not allowed: callback_metrics + every logger."""
        for name, value in scores.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(scores, step=trainer.global_step)
            logger.save()

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.at_start and self.rollout_batches == 0 and not trainer.fast_dev_run:
            scores = self.evaluate(pl_module)
            self._publish_directly(trainer, scores)
            self._after_scoring(trainer, pl_module, scores)
            self.start_scores, self.mode_at_start = scores, self.resolved_mode(pl_module)
            if self.base_reference and self.mode_at_start == "rationale":
                self.start_base = self.evaluate(pl_module, mode="base")
                log.info(
                    "dev (base, untrained): %s",
                    ", ".join(f"{k} {v:.2f}" for k, v in self.start_base.items()),
                )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rollout_batches += 1
        if not self.every or self.rollout_batches % self.every or trainer.fast_dev_run:
            return
        scores = self.evaluate(pl_module)
        for name, value in scores.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
        self._after_scoring(trainer, pl_module, scores)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.at_end and self.last_scored != self.rollout_batches and not trainer.fast_dev_run:
            scores = self.evaluate(pl_module)
            self._publish_directly(trainer, scores)
            self._after_scoring(trainer, pl_module, scores)

    # ------------------------------------------------------------------ report
    def summary(self) -> str | None:
        """The dev scores of the untrained model and of the final policy, one line each, or None
        when the run did not score both (e.g. a resumed run whose start was scored before)."""
        start = self.start_scores
        if start is None or not self.history or self.history[-1]["rollout_batch"] == 0:
            return None
        end = self.history[-1]
        sizes = ", ".join(f"{name} {len(s1)} pairs" for name, s1, _, _ in self._data or [])
        cols = [f"val/{t.name}" for t in self.tasks] + ["val/dev_avg"]
        rows = []
        if self.start_base is not None:
            rows.append(("base model, no rationale", self.start_base))
        label = {"rationale": "w/ reasoning", "base": "no rationale"}.get(
            self.mode_at_start or "", "untrained"
        )
        rows.append((f"base model, {label}", start))
        rows.append((f"trained, {int(end['rollout_batch'])} rollout batches", end))
        head = " ".join(f"{c.removeprefix('val/'):>12}" for c in cols)
        lines = [
            f"Dev score (Spearman x100 of cosine; {sizes}; never a test split):",
            f"{'':34}{head}",
        ]
        for name, sc in rows:
            lines.append(f"{name:34}" + " ".join(f"{sc.get(c, float('nan')):12.2f}" for c in cols))
        gain = end["val/dev_avg"] - start["val/dev_avg"]
        lines.append(f"{'':34}dev_avg {gain:+.2f} over the untrained model ({label})")
        if self.export_best_dir is not None and self.best_at > 0:
            lines.append(
                f"{'':34}best dev_avg {self.best:.2f} after {self.best_at} rollout batches: "
                f"{self.export_best_dir}"
            )
        return "\n".join(lines)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "rollout_batches": self.rollout_batches,
            "last_scored": self.last_scored,
            "best": self.best,
            "best_at": self.best_at,
            "start_scores": self.start_scores,
            "start_base": self.start_base,
            "mode_at_start": self.mode_at_start,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rollout_batches = int(state_dict.get("rollout_batches", 0))
        self.last_scored = int(state_dict.get("last_scored", -1))
        self.best = float(state_dict.get("best", -math.inf))
        self.best_at = int(state_dict.get("best_at", -1))
        self.start_scores = state_dict.get("start_scores")
        self.start_base = state_dict.get("start_base")
        self.mode_at_start = state_dict.get("mode_at_start")

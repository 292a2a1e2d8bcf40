"""The algorithm's two extension points, as Hydra ``_target_``s (docs/extending.md).

- ``algo.advantage``: the advantage estimator, ``{_target_: <module>.<function>, <arg>: <value>}``.
  Called each rollout batch as ``fn(rewards, **inputs)``: ``rewards`` (B, K) float32 over the
  global batch (B groups x K rollouts; NaN = a rollout left out, see ``reward.truncation=mask``),
  ``inputs`` the entries of `ADVANTAGE_INPUTS` its signature names (all of them with
  ``**kwargs``). Returns (B, K) advantages, checked for shape and finiteness.
- ``reward.terms``: named reward terms, ``{<name>: {_target_: ..., weight: w, <arg>: <value>}}``
  (TRL's ``reward_funcs`` + ``reward_weights``). Each is called as ``fn(**inputs)`` with the
  entries of `TERM_INPUTS` its signature names and returns a (B, K) per-rollout value, logged as
  ``rewards/<name>/mean|std|group_std``; the reward is ``sum_n w_n * term_n / reward.tau``
  (``rewards/total``).

The built-ins (``grace_lightning.rl.advantages``, ``grace_lightning.rl.rewards``) are registered
the same way, in conf/algo/*.yaml and conf/reward/*.yaml. Keys of a node other than ``_target_``
(and ``weight``, ``_partial_``, the estimator's declarations) are bound to the function as keyword
arguments; ``_partial_: false`` instead builds an object from them and calls that object.

Everything that can be checked without a model is checked by `check_extensions` at config time
(``grace_lightning.config.validate``): a ``_target_`` that does not import, an argument the
function does not take, one it needs that nobody gives, a weight that is not a number.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from grace_lightning.errors import ConfigError

log = logging.getLogger(__name__)

# What an estimator can ask for by naming it in its signature (besides the rewards, positional).
ADVANTAGE_INPUTS = {
    "token_counts": "(B, K) float32: the response tokens of each rollout that enter the loss "
    "(length x its truncation loss weight; REINFORCE++ whitens over tokens)",
    "baseline": "(B,) float32: the reward of one greedy rollout per prompt, scored by the same "
    "reward terms (estimators that declare needs_greedy_baseline, e.g. ReMax; else None)",
    "scale": "str: algo.scale_rewards (none | group | batch; TRL's scale_rewards)",
    "step": "int: the optimiser step the rollout batch starts at (trainer.global_step)",
}
# What a reward term can ask for. Tensors cover the GLOBAL batch (every rank's groups).
TERM_INPUTS = {
    "rollouts": "(B, K, D) float32: L2-normalised embeddings of the K rollouts of each group "
    "(text + header + rationale, mean-pooled)",
    "anchor": "(B, D) float32 unit vectors: the query (reward=sup) or the self-anchor, a "
    "low-temperature rollout of the same text (reward=unsup)",
    "negatives": "(B, M, D) float32 unit vectors: the hard negatives, all-zero rows = padding "
    "(reward=sup); None (reward=unsup)",
    "lengths": "(B, K) float32: response tokens of each rollout (EOS included)",
    "truncated": "(B, K) bool: the rollout hit rollout.max_new_tokens without EOS",
    "texts": "list of B str: the policy prompts' texts (sup: the positive document; unsup: the "
    "sentence)",
    "completions": "list of B lists of K str: the rationales, decoded (special tokens skipped)",
    "max_new_tokens": "int: rollout.max_new_tokens",
    "tau": "float: reward.tau",
    "mode": "str: reward.mode (sup | unsup)",
    "step": "int: the optimiser step the rollout batch starts at (trainer.global_step)",
}
# Hydra's own keys and the keys this module reads: never passed to the function.
_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
_ESTIMATOR_KEYS = {"needs_greedy_baseline", "min_generations"}
_TERM_KEYS = {"weight"}
TOTAL = "total"  # the weighted sum's name in the terms dict and the metrics (rewards/total/...)
_BUILTIN_REWARDS = "grace_lightning.rl.rewards."
INFONCE_TERM = _BUILTIN_REWARDS + "infonce_term"


@dataclass(frozen=True)
class Plugged:
    """A resolved ``_target_`` node: ``fn`` is called with ``inputs`` (names) by keyword."""

    key: str  # the config key, e.g. "algo.advantage" or "reward.terms.length"
    target: str  # the node's _target_
    fn: Callable
    inputs: frozenset[str]

    def kwargs(self, available: Mapping[str, Any]) -> dict[str, Any]:
        return {name: available[name] for name in self.inputs if name in available}


@dataclass(frozen=True)
class AdvantageEstimator(Plugged):
    needs_greedy_baseline: bool = False
    min_generations: int = 1

    def __call__(self, rewards, **available):
        """rewards (B, K) -> (B, K) float32 advantages; ``available``: `ADVANTAGE_INPUTS`."""
        from grace_lightning.rl.precision import autocast_off, f32

        with autocast_off():
            out = self.fn(f32(rewards), **self.kwargs(available))
        return check_advantages(out, rewards, f"{self.key} ({self.target})")


@dataclass(frozen=True)
class RewardTerm(Plugged):
    name: str = ""
    weight: float = 1.0


# ---------------------------------------------------------------------------- resolving
def locate(target: str, key: str) -> Any:
    """The object at dotted path ``target``; a ConfigError naming ``key`` if it does not import."""
    import hydra.utils

    try:
        return hydra.utils.get_object(target)
    except Exception as err:  # ImportError, AttributeError, or the module's own import error
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{key}._target_={target}: cannot import it ({cause}). Name a function as "
            f"<module>.<function>, with the module importable by Python: an installed package, "
            f"or a file on PYTHONPATH (e.g. PYTHONPATH=. python train.py "
            f"{key}._target_=my_module.my_function); see docs/extending.md"
        ) from None


def _plain(node: Any) -> Any:
    """DictConfig/ListConfig -> plain containers (interpolations resolved); others unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _build(node: Mapping, key: str, own_keys: set[str]) -> tuple[Callable, Any, str, set[str]]:
    """(callable, the located object, target, names bound from the config) of a node."""
    target = node.get("_target_")
    if not isinstance(target, str) or not target.strip():
        raise ConfigError(
            f"{key}: no _target_ (got {dict(node)!r}); set {key}._target_=<module>.<function> "
            f"(docs/extending.md)"
        )
    obj = locate(target, key)
    params = {k: v for k, v in node.items() if k not in _HYDRA_KEYS | own_keys}
    if node.get("_partial_", True) is False:  # build an object from the config, call the object
        import hydra.utils

        try:
            fn = hydra.utils.instantiate({"_target_": target, "_convert_": "all", **params})
        except Exception as err:
            raise ConfigError(f"{key}: building {target}(...) failed: {err}") from None
        if not callable(fn):
            raise ConfigError(f"{key}: {target}(...) built a {type(fn).__name__}, not a callable")
        return fn, fn, target, set()
    if not callable(obj):
        raise ConfigError(
            f"{key}._target_={target}: a {type(obj).__name__}, not a function; name a function "
            f"(or a class with `_partial_: false` whose instances are called)"
        )
    sig = _signature(obj, key, target)
    if not _takes_var_keyword(sig):
        for name in params:
            p = sig.parameters.get(name)
            if p is None or p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL):
                takes = ", ".join(sig.parameters) or "nothing"
                raise ConfigError(
                    f"{key}.{name}: {target} takes no argument {name!r} (it takes: {takes}); "
                    f"remove the key (~{key}.{name}) or fix its name"
                )
    fn = (
        functools.partial(obj, **{k: _value(v, f"{key}.{k}") for k, v in params.items()})
        if params
        else obj
    )
    return fn, obj, target, set(params)


def _value(value: Any, key: str) -> Any:
    """A bound argument: a ``{_target_: ...}`` node is built by Hydra (e.g. a module or a
    schedule passed to the function); anything else is passed as written."""
    if isinstance(value, Mapping) and "_target_" in value:
        import hydra.utils

        try:
            return hydra.utils.instantiate(dict(value), _convert_="all")
        except Exception as err:
            raise ConfigError(f"{key}: building {value['_target_']}(...) failed: {err}") from None
    return value


def _signature(fn: Callable, key: str, target: str) -> inspect.Signature:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: cannot read the signature of {target}: {err}") from None


def _takes_var_keyword(sig: inspect.Signature) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _inputs(
    fn: Callable, offered: Mapping[str, str], bound: set[str], key: str, target: str, first: bool
) -> frozenset[str]:
    """The names of ``offered`` that ``fn`` receives; ConfigError if it needs anything else.

    ``first``: the first positional parameter takes the rewards (estimators)."""
    sig = _signature(fn, key, target)
    params = list(sig.parameters.values())
    if first:
        if not params or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.VAR_POSITIONAL,
        ):
            raise ConfigError(
                f"{key}._target_={target}: an estimator takes the (B, K) rewards as its first "
                f"positional argument, e.g. def my_estimator(rewards, **inputs)"
            )
        if params[0].kind is not inspect.Parameter.VAR_POSITIONAL:
            params = params[1:]
    for p in params:
        empty = p.default is inspect.Parameter.empty
        if p.kind is p.POSITIONAL_ONLY and empty:
            raise ConfigError(
                f"{key}: {target}'s argument {p.name!r} is positional-only; inputs are passed by "
                f"keyword, so make it a normal argument"
            )
        keyword = p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        if empty and keyword and p.name not in offered and p.name not in bound:
            raise ConfigError(
                f"{key}: {target} needs {p.name!r}, which is no input ({', '.join(offered)}) "
                f"and not set in the config: add {key}.{p.name}=<value>, or give it a default"
            )
    if _takes_var_keyword(sig):
        return frozenset(n for n in offered if n not in bound)
    named = {
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in bound
    }
    return frozenset(named & set(offered))


def resolve_advantage(node: Any) -> AdvantageEstimator:
    """``algo.advantage`` -> the estimator. ``node``: ``{_target_: ..., <arg>: <value>}``; a
    dotted string is taken as the ``_target_`` itself, a bare built-in name (grpo, rloo,
    reinforce_pp, remax) as its registered ``_target_``."""
    from grace_lightning.rl.advantages import SHORT_NAMES

    key = "algo.advantage"
    node = _plain(node)
    if node is None:
        node = "grpo"
    if isinstance(node, str):
        if "." in node:
            node = {"_target_": node}
        elif node in SHORT_NAMES:
            log.debug("algo.advantage=%s is the built-in {_target_: %s}", node, SHORT_NAMES[node])
            node = {"_target_": SHORT_NAMES[node]}
        else:
            raise ConfigError(
                f"algo.advantage={node!r}: no built-in estimator has that name (short names: "
                f"{', '.join(SHORT_NAMES)}; or pick one with algo=<name>, conf/algo/). Your own: "
                f"algo.advantage._target_=<module>.<function> (docs/extending.md)"
            )
    if not isinstance(node, Mapping):
        raise ConfigError(
            f"algo.advantage={node!r}: expected {{_target_: <module>.<function>, ...}} or a "
            f"built-in short name"
        )
    fn, obj, target, bound = _build(node, key, _ESTIMATOR_KEYS)
    needs = node.get("needs_greedy_baseline", getattr(obj, "needs_greedy_baseline", False))
    min_k = node.get("min_generations", getattr(obj, "min_generations", 1))
    if not isinstance(needs, bool):
        raise ConfigError(f"{key}.needs_greedy_baseline={needs!r}: expected true or false")
    if isinstance(min_k, bool) or not isinstance(min_k, int) or min_k < 1:
        raise ConfigError(f"{key}.min_generations={min_k!r}: expected an integer >= 1")
    inputs = _inputs(fn, ADVANTAGE_INPUTS, bound, key, target, first=True)
    sig = _signature(fn, key, target)
    base = sig.parameters.get("baseline")
    if not needs and base is not None and base.default is inspect.Parameter.empty:
        raise ConfigError(
            f"{key}: {target} needs `baseline` (a greedy rollout's reward, ReMax) but does not "
            f"declare it: decorate it with @grace_lightning.rl.advantages.estimator("
            f"needs_greedy_baseline=True), or set {key}.needs_greedy_baseline=true"
        )
    return AdvantageEstimator(
        key=key,
        target=target,
        fn=fn,
        inputs=inputs,
        needs_greedy_baseline=needs,
        min_generations=min_k,
    )


def term_configs(reward: Any) -> dict[str, Mapping]:
    """``reward.terms`` as the run uses them: null entries dropped (``reward.terms.hard=null``
    turns a term off), ``reward.objective=infonce`` applied (the built-in GRACE terms give way to
    the InfoNCE term, weight tau so that the total is its log-probability; terms of your own stay),
    and the paper's terms for configs without ``terms`` (older checkpoints, dicts built in
    Python). ``reward``: a DictConfig or dict; absent keys take the schema's defaults."""
    from grace_lightning.rl.rewards import paper_terms
    from grace_lightning.schema import RewardConfig, typed

    reward = typed(RewardConfig, reward)
    terms = _plain(reward.terms)
    if terms is None:
        terms = paper_terms(reward)
    if not isinstance(terms, Mapping):
        raise ConfigError(
            f"reward.terms={terms!r}: expected a mapping of named terms, "
            f"{{<name>: {{_target_: <module>.<function>, weight: <number>}}}}"
        )
    terms = {str(n): t for n, t in terms.items() if t is not None}
    objective = reward.objective
    if objective == "infonce":
        own = {n: t for n, t in terms.items() if not _is_builtin_term(t)}
        terms = {"infonce": {"_target_": INFONCE_TERM, "weight": reward.tau}, **own}
    elif objective != "grace":
        raise ConfigError(
            f"reward.objective={objective!r}: use grace (the terms in reward.terms) or infonce "
            f"(the per-rollout InfoNCE reward instead of the GRACE terms)"
        )
    if not terms:
        raise ConfigError(
            "reward.terms: no term left (all null); keep at least one, e.g. the paper's "
            "(reward=sup or reward=unsup)"
        )
    return terms


def _is_builtin_term(node: Any) -> bool:
    target = node.get("_target_", "") if isinstance(node, Mapping) else ""
    return isinstance(target, str) and target.startswith(_BUILTIN_REWARDS)


def resolve_terms(reward: Any) -> list[RewardTerm]:
    """``reward`` (its ``terms``, ``objective``, ``tau``) -> the reward terms, in config order."""
    out = []
    for name, node in term_configs(reward).items():
        key = f"reward.terms.{name}"
        if name == TOTAL or "/" in name:
            raise ConfigError(
                f"{key}: the name {name!r} is taken (rewards/total is the weighted sum) or has a "
                f"'/' (metric names are rewards/<name>/mean); rename the term"
            )
        if not isinstance(node, Mapping):
            raise ConfigError(
                f"{key}={node!r}: expected {{_target_: <module>.<function>, weight: <number>}} "
                f"(or null to turn it off)"
            )
        weight = node.get("weight", 1.0)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
        ):
            raise ConfigError(f"{key}.weight={weight!r}: expected a finite number")
        fn, _, target, bound = _build(node, key, _TERM_KEYS)
        inputs = _inputs(fn, TERM_INPUTS, bound, key, target, first=False)
        out.append(
            RewardTerm(
                key=key, target=target, fn=fn, inputs=inputs, name=name, weight=float(weight)
            )
        )
    return out


def needed_inputs(terms: list[RewardTerm]) -> frozenset[str]:
    """Every input some term asks for (what the module has to build)."""
    return frozenset().union(*(t.inputs for t in terms))


def check_extensions(cfg) -> None:
    """Config time (before any model loads): the estimator and the reward terms resolve, take
    what they are given, and the estimator's ``min_generations`` holds."""
    algo, reward = cfg.get("algo"), cfg.get("reward")
    if algo is not None:
        estimator = resolve_advantage(algo.get("advantage"))
        k = _plain(cfg.get("rollout") or {}).get("num_generations")
        if isinstance(k, int) and k < estimator.min_generations:
            raise ConfigError(
                f"rollout.num_generations={k}: algo.advantage ({estimator.target}) needs "
                f"K >= {estimator.min_generations} rollouts per prompt (upstream 8); set "
                f"rollout.num_generations>={estimator.min_generations} or an estimator without "
                f"groups (algo=reinforce_pp)"
            )
    if reward is not None:
        resolve_terms(reward)


# ---------------------------------------------------------------------------- calling
def score_terms(terms: list[RewardTerm], inputs: Mapping[str, Any], tau: float) -> dict:
    """Every term's (B, K) float32 value, and ``total`` = sum_n w_n term_n / tau."""
    from grace_lightning.rl.precision import autocast_off, f32
    from grace_lightning.rl.rewards import weighted_total

    shape, device = tuple(inputs["rollouts"].shape[:2]), inputs["rollouts"].device
    values = {}
    with autocast_off():
        for term in terms:
            out = _check_shape(term.fn(**term.kwargs(inputs)), shape, f"{term.key} ({term.target})")
            values[term.name] = f32(out).to(device)  # a term may build its tensor on the CPU
        values[TOTAL] = weighted_total(values, {t.name: t.weight for t in terms}, tau)
    return values


def _check_shape(out: Any, shape: tuple[int, ...], what: str):
    import torch

    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what} returned a {type(out).__name__}; expected a {shape} tensor")
    if tuple(out.shape) != shape:
        raise ValueError(
            f"{what} returned shape {tuple(out.shape)}; expected (B, K) = {shape}: one value "
            f"per rollout, B groups x K rollouts"
        )
    if not (out.is_floating_point() or out.dtype == torch.bool):
        out = out.float()
    return out


def check_advantages(out: Any, rewards, what: str):
    """An estimator's output: a (B, K) tensor like ``rewards``, float32, finite wherever the
    rewards hold no +-inf (NaN rewards mark left-out rollouts: their advantage must be finite,
    the built-ins give 0)."""
    import torch

    from grace_lightning.rl.precision import f32

    out = f32(_check_shape(out, tuple(rewards.shape), what))
    if not bool(torch.isfinite(out).all()) and not bool(torch.isinf(rewards).any()):
        bad = int((~torch.isfinite(out)).sum())
        raise ValueError(
            f"{what} returned {bad} non-finite advantage(s) of {out.numel()} for rewards without "
            f"inf. NaN rewards mark rollouts left out of the loss (reward.truncation=mask): give "
            f"them advantage 0 (torch.nanmean / nan_to_num, as grace_lightning.rl.advantages does)"
        )
    return out

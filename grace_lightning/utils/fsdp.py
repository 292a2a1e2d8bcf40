"""FSDP that shards: one FSDP unit per decoder layer, found from the backbone at wrap time.

``conf/trainer/fsdp*.yaml`` build :func:`fsdp_strategy`. Without an auto-wrap policy, FSDP makes
the whole LightningModule one unit: every parameter is gathered for the whole step and nothing
is sharded in practice. Here the policy is the backbone's ``_no_split_modules``
(``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...; :func:`grace_lightning.models.backbone.decoder_layer_classes`),
resolved from the model when Lightning wraps it, so one config fits every backbone; the same
classes can get activation checkpointing (``activation_checkpointing: true``).

GRACE's update runs inside ``training_step``, which Lightning calls INSIDE the FSDP root's
forward, and it calls ``backward`` and ``optimizer.step`` several times there. FSDP (torch
2.13, FSDP1) refuses a backward through the root's own parameters while the root is in its
forward ("Expects BACKWARD_PRE or BACKWARD_POST state but got HandleTrainingState.FORWARD"),
its end-of-backward bookkeeping is queued only by the root's pre-backward hook (which never
fires), and its ``clip_grad_norm_`` asserts the root is idle. So :class:`GraceFSDPStrategy`:

- gives the root unit no parameter: everything outside the decoder layers (embeddings, tied or
  separate LM head, final norm: ~15 % of Qwen2.5-1.5B) is kept whole on every rank
  (``ignored_states``) and its gradients are averaged over the ranks after every backward
  (:meth:`GraceFSDPStrategy.post_backward`), as DDP does; the layers are sharded;
- runs FSDP's end-of-backward bookkeeping after every backward (``post_backward``);
- accumulates micro-batch gradients sharded (no ``no_sync``: :meth:`block_backward_sync`);
- clips over all shards (sharded squares summed over ranks + replicated counted once) with
  :meth:`GraceFSDPStrategy.clip_grad_norm_`, also reachable as ``strategy.model.clip_grad_norm_``;
- moves the replicated parts and every buffer outside the layers to the root device before
  wrapping (:func:`move_outside_layers`): FSDP moves only what it manages to ``device_id`` and
  Lightning's ``model_to_device`` does nothing under FSDP, so they stayed on the CPU;
- reduces gradients and keeps buffers in fp32 under ``bf16-mixed``
  (:attr:`GraceFSDPStrategy.mixed_precision_config`; Lightning builds bf16 for all three);
- marks the FSDP root right after wrapping: layer units run before the root's first forward
  (the dev evaluation at train start) would otherwise each mark themselves root.

Rollouts under sharding: each decode step's forward all-gathers every layer, so the rollout
engine keeps the ranks in lockstep (``rollout.engine.rank_sync``: a rank whose rows ended runs
one-token forwards while any rank decodes). ``activation_checkpointing`` needs
``algo.share_prompt=false`` (``config.check_fsdp_activation_checkpointing``). docs/fsdp.md.

``tests/test_fsdp.py`` checks that GRACE under ``trainer=fsdp_cpu`` ends with the weights of
``trainer=ddp_cpu``. It also runs on CPU (gloo): Lightning refuses ``FSDPStrategy`` with
``accelerator=cpu`` by an exact type check and passes ``device_id=None``, which torch's FSDP
rejects without an accelerator ("FSDP needs a non-CPU accelerator device"); with
``device_id=cpu`` torch 2.13 FSDP runs on gloo. Full state dicts on CPU are gathered without
``offload_to_cpu`` (offloading a CPU tensor to the CPU frees the gathered storage under itself:
a segfault). The export (``callbacks/export.py``) gathers the full state dict on every rank and
rank 0 writes an unsharded copy. GPU check: ``bench/gpu_check_fsdp.sh``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy

log = logging.getLogger(__name__)

WRAP_CHOICES = ("decoder_layer", "none")


class GraceFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` + per-decoder-layer wrapping + CPU (gloo) support.

    Args:
        auto_wrap: ``decoder_layer`` (one unit per ``_no_split_modules`` class of the backbone)
            or ``none`` (the whole module is one unit; Lightning's default).
        activation_checkpointing: recompute each decoder layer's activations in backward
            (FSDP's checkpoint wrapper on the same classes).
        **kwargs: ``FSDPStrategy`` arguments (``sharding_strategy``, ``cpu_offload``,
            ``state_dict_type``, ...).
    """

    strategy_name = "grace_fsdp"

    def __init__(
        self, auto_wrap: str = "decoder_layer", activation_checkpointing: bool = False, **kwargs
    ) -> None:
        if auto_wrap not in WRAP_CHOICES:
            raise ValueError(f"trainer.strategy.auto_wrap={auto_wrap!r}: use one of {WRAP_CHOICES}")
        for key in ("auto_wrap_policy", "activation_checkpointing_policy"):
            if kwargs.get(key) is not None:
                raise ValueError(
                    f"trainer.strategy.{key}: set by the backbone here; use auto_wrap / "
                    f"activation_checkpointing"
                )
        super().__init__(**kwargs)
        self.auto_wrap = auto_wrap
        self.activation_checkpointing = bool(activation_checkpointing)
        self.layer_classes: set[type[torch.nn.Module]] = set()
        self.replicated: list[torch.nn.Parameter] = []  # parameters outside the layer units

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from grace_lightning.models.backbone import decoder_layer_classes

        if self.auto_wrap == "decoder_layer" or self.activation_checkpointing:
            self.layer_classes = decoder_layer_classes(model)
            log.info("FSDP: one unit per %s", sorted(c.__name__ for c in self.layer_classes))
        if self.auto_wrap == "decoder_layer":
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(self.layer_classes)
            # the root unit must own no parameter (see the class doc): the few outside the
            # layers (embeddings, final norm, LM head) stay whole on every rank
            self.replicated = _params_outside(model, self.layer_classes)
            self.kwargs["ignored_states"] = self.replicated
            # FSDP moves only what it manages (device_id) and Lightning moves nothing under FSDP
            # (model_to_device is a no-op): the ignored parts would stay on the CPU
            move_outside_layers(model, self.layer_classes, self.root_device)
        if self.activation_checkpointing:
            self._activation_checkpointing_kwargs = {
                "auto_wrap_policy": ModuleWrapPolicy(self.layer_classes)
            }
        already = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
        if self.root_device.type != "cpu" or already:
            wrapped = super()._setup_model(model)
        else:  # CPU: FSDPStrategy._setup_model with device_id=cpu (see module doc)
            from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing

            wrapped = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
            _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        if self.replicated:
            # FSDP's root clip_grad_norm_ refuses to run inside the root forward (where GRACE's
            # update runs): callers of `strategy.model.clip_grad_norm_` get ours instead
            wrapped.clip_grad_norm_ = self.clip_grad_norm_
        if isinstance(wrapped, FullyShardedDataParallel):
            # FSDP marks its root at the first forward. A layer unit run before that (the dev
            # evaluation at train start, callbacks/dev_eval.py) would mark itself root, and the
            # real root's first forward or state dict then asserts ("Non-root FSDP instance's
            # `_is_root` should not have been set yet"): mark the root now
            from torch.distributed.fsdp._runtime_utils import _lazy_init

            _lazy_init(wrapped, wrapped)
        return wrapped

    @property
    def mixed_precision_config(self):
        """Lightning's config for the precision, with gradients reduced and buffers kept in fp32.

        Lightning builds ``MixedPrecision(param_dtype=bf16, reduce_dtype=bf16,
        buffer_dtype=bf16)`` from ``precision=bf16-mixed``: the reduce-scatter would sum the
        ranks' gradients in bf16 (8 bits of mantissa) and RoPE's ``inv_freq`` buffer would be
        cast to bf16. verl's default is ``param_dtype=bf16, reduce_dtype=fp32,
        buffer_dtype=fp32``; so is this. With low-precision parameters each layer unit also
        casts its inputs to them (``cast_forward_inputs``): the embeddings outside the units
        are fp32, and a forward outside Lightning's autocast (the dev evaluation at train
        start) would otherwise multiply fp32 activations by bf16 weights (an error); the
        residual stream between layers is then bf16, as in verl, where the embeddings are
        sharded in bf16 too. An explicit ``mixed_precision=`` argument is used as given.
        """
        config = super().mixed_precision_config
        if config is None or self.mixed_precision:
            return config
        from dataclasses import replace

        low = config.param_dtype not in (None, torch.float32)
        return replace(
            config,
            reduce_dtype=torch.float32,
            buffer_dtype=torch.float32,
            cast_forward_inputs=low or config.cast_forward_inputs,
        )

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float | None, norm_type: float = 2.0) -> torch.Tensor:
        """Global 2-norm of all gradients (sharded layer shards summed over ranks, replicated
        parameters counted once), and clip them in place to ``max_norm`` (None/0: no clip).
        Usable inside ``training_step``. Returns the norm before clipping (fp32)."""
        if float(norm_type) != 2.0:
            raise ValueError("GraceFSDPStrategy.clip_grad_norm_: only the 2-norm")
        import torch.distributed as dist

        replicated = {id(p) for p in self.replicated}
        params = [p for p in self.lightning_module.parameters() if p.grad is not None]
        zero = torch.zeros((), dtype=torch.float32, device=self.root_device)
        sharded = [p.grad for p in params if id(p) not in replicated]
        whole = [p.grad for p in params if id(p) in replicated]
        sq_sharded = sum((g.float().pow(2).sum() for g in sharded), zero)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sq_sharded)
        sq_whole = sum((g.float().pow(2).sum() for g in whole), zero)
        total = (sq_sharded + sq_whole).sqrt()
        if max_norm:
            coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
            for p in params:
                p.grad.mul_(coef.to(p.grad.dtype))
        return total

    @contextlib.contextmanager
    def _cpu_safe_full_state_dicts(self) -> Iterator[None]:
        """On CPU, Lightning's full-state-dict context without ``offload_to_cpu``."""
        if self.root_device.type != "cpu":
            yield
            return
        import lightning.pytorch.strategies.fsdp as lightning_fsdp

        original = lightning_fsdp._get_full_state_dict_context

        def no_offload(module, world_size, rank0_only=True):
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp.api import FullOptimStateDictConfig

            return FSDP.state_dict_type(
                module=module,
                state_dict_type=StateDictType.FULL_STATE_DICT,
                state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                optim_state_dict_config=FullOptimStateDictConfig(
                    offload_to_cpu=False, rank0_only=rank0_only
                ),
            )

        lightning_fsdp._get_full_state_dict_context = no_offload
        try:
            yield
        finally:
            lightning_fsdp._get_full_state_dict_context = original

    @contextlib.contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        """No ``no_sync`` for gradient accumulation over micro-batches: FSDP's ``no_sync``
        keeps UNSHARDED gradients (the memory sharding saves) and refuses to run inside the
        root's forward. Each micro-batch's backward reduce-scatters into the sharded
        gradient, which accumulates (one collective per micro-batch, as verl)."""
        yield

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        """Average the gradients of the replicated (non-layer) parameters over the ranks after
        every backward, as DDP would (FSDP reduce-scatters only the sharded layers). Averaging
        an accumulated gradient again is exact: the part already averaged is equal on every
        rank."""
        super().post_backward(closure_loss)
        if self.replicated:
            # the end-of-backward bookkeeping FSDP queues from the root's pre-backward hook,
            # which never fires while the backward runs inside the root's forward
            from torch.distributed.fsdp._runtime_utils import _post_backward_final_callback

            _post_backward_final_callback(self.model, self.model)
        grads = [p.grad for p in self.replicated if p.grad is not None]
        if not grads or self.world_size == 1:
            return
        import torch.distributed as dist

        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        with self._cpu_safe_full_state_dicts():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer) -> dict[str, torch.Tensor]:
        with self._cpu_safe_full_state_dicts():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # Lightning passes weights_only= (2.5+): forward whatever the installed version sends
        with self._cpu_safe_full_state_dicts():
            return super().load_checkpoint(checkpoint_path, *args, **kwargs)


def _params_outside(
    model: torch.nn.Module, classes: set[type[torch.nn.Module]]
) -> list[torch.nn.Parameter]:
    inside = {
        id(p) for m in model.modules() if isinstance(m, tuple(classes)) for p in m.parameters()
    }
    seen: set[int] = set()
    out = []
    for p in model.parameters():  # tied weights once
        if id(p) not in inside and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@torch.no_grad()
def move_outside_layers(
    model: torch.nn.Module, classes: set[type[torch.nn.Module]], device: torch.device
) -> None:
    """Every parameter and buffer outside the ``classes`` modules to ``device``, in place.

    Each ``Parameter`` keeps its identity (``torch.utils.swap_tensors``, what ``Module.to`` does
    under ``torch.__future__.set_swap_module_params_on_conversion``, for any pair of devices), so
    tied weights stay tied and ``GraceFSDPStrategy.replicated`` still lists the model's
    parameters. Inside the layer units FSDP moves its own parameters and buffers (``device_id``).
    """
    stack = [model]
    while stack:
        module = stack.pop()
        for param in module.parameters(recurse=False):
            if param.device != device:  # a tied weight is moved once
                moved = torch.nn.Parameter(param.to(device), requires_grad=param.requires_grad)
                moved.__dict__.update(param.__dict__)  # attributes set on the parameter
                torch.utils.swap_tensors(param, moved)
        for name, buf in module.named_buffers(recurse=False):
            if buf.device != device:
                module._buffers[name] = buf.to(device)
        stack.extend(c for c in module.children() if not isinstance(c, tuple(classes)))


def fsdp_strategy(**kwargs: Any) -> GraceFSDPStrategy:
    """Hydra factory for ``trainer.strategy`` (conf/trainer/fsdp*.yaml)."""
    return GraceFSDPStrategy(**kwargs)


def full_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """The LightningModule's full (unsharded) state dict under a sharded strategy, else None.

    COLLECTIVE under FSDP: every rank must call it; rank 0 gets the tensors, other ranks an
    empty dict (``rank0_only``). Keys are the LightningModule's (``policy.model.layers.0...``).
    """
    strategy = trainer.strategy
    if not isinstance(strategy, FSDPStrategy):
        return None
    saved = strategy._state_dict_type
    strategy._state_dict_type = "full"  # a sharded checkpoint setting must not shard the export
    try:
        return strategy.lightning_module_state_dict()
    finally:
        strategy._state_dict_type = saved


_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def submodule_state_dict(full: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``{"policy.model.x": t}`` -> ``{"model.x": t}`` for ``prefix="policy"`` (wrapper names
    removed)."""
    out = {}
    for key, value in full.items():
        for part in _WRAPPER_PARTS:
            key = key.replace(part, "")
        if key.startswith(prefix + "."):
            out[key[len(prefix) + 1 :]] = value
    return out


def unsharded_policy_copy(pl_module, policy_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unwrapped) copy of ``pl_module.policy`` holding ``policy_state``: same
    architecture and config, LoRA adapters re-attached when ``pl_module.peft_cfg`` is set."""
    from transformers import AutoModelForCausalLM

    policy = pl_module.policy
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    dtype = next((v.dtype for v in policy_state.values() if v.is_floating_point()), torch.float32)
    fresh = AutoModelForCausalLM.from_config(base.config, dtype=dtype)
    fresh.generation_config = base.generation_config
    if getattr(pl_module, "peft_cfg", None):
        from grace_lightning.models.lora import wrap_lora

        fresh = wrap_lora(fresh, pl_module.peft_cfg)
    missing, unexpected = fresh.load_state_dict(policy_state, strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if not any(k.endswith(t) for t in tied)]
    missing = [k for k in missing if not k.endswith("lm_head.weight")] if _tied(base) else missing
    if missing or unexpected:
        raise RuntimeError(
            f"gathered FSDP state dict does not fit the policy: missing={missing[:5]} "
            f"unexpected={unexpected[:5]}"
        )
    return fresh.eval()


def _tied(model) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


@contextlib.contextmanager
def policy_swapped(pl_module, policy: torch.nn.Module) -> Iterator[None]:
    """Temporarily make ``pl_module.policy`` another module (the export reads it)."""
    original = pl_module.policy
    pl_module.policy = policy
    try:
        yield
    finally:
        pl_module.policy = original

"""Every config option on its own, typed config errors, and ``logger=none`` training.

Each option of each config group (the README lists them) must compose and validate on its own;
the CPU trainers, loggers and callback sets must also build. A wrong-typed value fails in
``config.validate`` -- before any model or data loads -- with a message naming the key.
"""

from __future__ import annotations

import os
import subprocess
import sys

import hydra
import pytest

from grace_lightning.config import ConfigError, validate

from .conftest import ROOT
from .test_train import make_cfg

CONF = ROOT / "conf"
# groups in conf/train.yaml's defaults list ("group=option"); others are added ("+group=option")
IN_DEFAULTS = {
    "backbone",
    "reward",
    "data",
    "rollout",
    "algo",
    "optim",
    "peft",
    "method",
    "trainer",
    "logger",
    "callbacks",
    "dev",
    "eval",
    "experiment",
    "hparams_search",
    "debug",
}
GROUPS = sorted(
    p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "paths", "local")
)
OPTIONS = [(g, y.stem) for g in GROUPS for y in sorted((CONF / g).glob("*.yaml"))]


def override(group: str, option: str) -> str:
    return f"{group}={option}" if group in IN_DEFAULTS else f"+{group}={option}"


def test_every_group_of_the_readme_has_options():
    assert IN_DEFAULTS - {"hparams_search", "debug"} <= set(GROUPS)
    assert len(OPTIONS) >= 40


@pytest.mark.parametrize("group, option", OPTIONS, ids=lambda x: str(x))
def test_every_option_composes_and_validates_on_its_own(group, option, tmp_path):
    cfg = make_cfg([override(group, option)], tmp_path)
    if group == "trainer" and cfg.trainer.devices > 2:
        # batch sizes are global: the CPU defaults' 2 prompts a mini-batch cannot split over the
        # 4 GPUs of trainer=ddp|fsdp (config.check_global_batch refuses it, naming the key)
        with pytest.raises(ConfigError, match="algo.prompts_per_minibatch=2 is global"):
            validate(cfg)
        overrides = ["data.prompts_per_step=8", "algo.prompts_per_minibatch=4"]
        cfg = make_cfg([override(group, option), *overrides], tmp_path)
    validate(cfg)
    if group == "trainer":
        t = cfg.trainer
        if t.accelerator == "cpu":  # CPU trainers are built for real (no process is launched)
            from grace_lightning.train import build_trainer

            built = build_trainer(cfg, [], [])
            assert built.num_devices == t.devices
        else:  # GPU-only: the strategy object at least
            assert t.accelerator == "gpu"
            if "strategy" in t and not isinstance(t.strategy, str):
                hydra.utils.instantiate(t.strategy)
    if group == "logger":
        from grace_lightning.train import instantiate_group

        loggers = instantiate_group(cfg.get("logger"))
        assert len(loggers) == {"none": 0, "csv": 1, "wandb": 1, "many": 2}[option]
    if group == "callbacks":
        from grace_lightning.train import instantiate_group

        callbacks = instantiate_group(cfg.get("callbacks"))
        assert (len(callbacks) > 0) == (option == "default")


@pytest.mark.parametrize(
    "override_, message",
    [
        ("trainer.max_steps=abc", "trainer.max_steps: expected an integer, got 'abc'"),
        ("prompt.max_prompt_tokens=1.5", "prompt.max_prompt_tokens: expected an integer, got 1.5"),
        ("optim.betas=[0.9]", "optim.betas: expected two numbers like [0.9, 0.999], got [0.9]"),
        ("allow_cpu=maybe", "allow_cpu: expected true or false, got 'maybe'"),
        (
            "callbacks.model_checkpoint.every_n_rollout_batches=x",
            "callbacks.model_checkpoint.every_n_rollout_batches: expected an integer",
        ),
    ],
)
def test_wrong_types_name_the_key(override_, message, tmp_path):
    cfg = make_cfg([override_], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override_, message",
    [
        ("optim.lr=abc", "Value 'abc' of type 'str' could not be converted to Float"),
        ("optim.lr=true", "Value 'True' of type 'bool' could not be converted to Float"),
        ("rollout.max_new_tokens=ten", "'ten' of type 'str' could not be converted to Integer"),
        ("optim.grad_clip=off", "'off' of type 'str' could not be converted to Float"),
        ("rollout.vllm.sleep=maybe", "Value 'maybe' is not a valid bool"),
        ("rollout.topk=3", "Key 'topk' not in 'RolloutConfig'"),
        ("algo.epsilon_low=abc", "Value 'abc' of type 'str' could not be converted to Float"),
        ("algo.prompts_per_minibatch=1.5", "'1.5' of type 'float' could not be converted to Int"),
        ("algo.dual_clip=off", "'off' of type 'str' could not be converted to Float"),
        ("algo.share_prompt=maybe", "Value 'maybe' is not a valid bool"),
        ("algo.epsilonlow=0.2", "Key 'epsilonlow' not in 'AlgoConfig'"),
        ("reward.tau=x", "Value 'x' of type 'str' could not be converted to Float"),
        ("reward.tau=[0.1]", "of type 'list' could not be converted to Float"),
        ("reward.overlong_buffer=1.5", "'1.5' of type 'float' could not be converted to Integer"),
        ("reward.lambdahard=0.5", "Key 'lambdahard' not in 'RewardConfig'"),
    ],
)
def test_typed_groups_refuse_wrong_types_and_unknown_keys_when_composed(
    override_, message, tmp_path
):
    """optim, rollout, algo and reward have a typed schema (grace_lightning/schema.py): Hydra
    refuses a wrong type or a misspelt key while composing, naming the key, before train()
    runs."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        make_cfg([override_], tmp_path)
    text = f"{err.value} {err.value.__cause__}"
    assert message in text and f"full_key: {override_.split('=')[0]}" in text


def test_prompt_node_is_typed_by_its_schema(tmp_path):
    """``prompt`` is a node of conf/train.yaml, not a Hydra group: validate applies its schema
    (PromptConfig), so a misspelt key fails before any model loads, naming it; the schema's
    default is the one conf/train.yaml writes, and the modules read the prompt through it."""
    from omegaconf import OmegaConf

    from grace_lightning.schema import PromptConfig

    cfg = make_cfg(["+prompt.system_promt=Summarise."], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "prompt.system_promt: Key 'system_promt' not in 'PromptConfig'" in str(err.value)
    written = OmegaConf.load(CONF / "train.yaml").prompt
    assert written.max_prompt_tokens == PromptConfig().max_prompt_tokens
    assert set(written) == set(OmegaConf.structured(PromptConfig))
    validate(make_cfg(["prompt.system_prompt=null"], tmp_path))  # None: no system turn


def _option(group: str, option: str) -> tuple[list, dict]:
    """(defaults list, the keys it sets) of conf/<group>/<option>.yaml as written."""
    from omegaconf import OmegaConf

    yaml = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    return yaml.pop("defaults", []), yaml


def _typed_options() -> list[tuple[str, str]]:
    from grace_lightning.schema import SCHEMAS

    return [(g, o) for g, o in OPTIONS if g in SCHEMAS]


def test_schema_defaults_are_the_documented_yaml_values():
    """The dataclasses' defaults (what a module built from Python gets) equal the values that
    the group's default option (conf/train.yaml's defaults list) documents; a field that option
    does not set is documented by another option of the group (reward.cross_group: unsup)."""
    from omegaconf import DictConfig, OmegaConf

    from grace_lightning.rl.targets import term_configs
    from grace_lightning.schema import SCHEMAS, typed

    assert set(SCHEMAS) == {"optim", "rollout", "algo", "reward"}
    chosen = {
        k: v
        for entry in OmegaConf.load(CONF / "train.yaml").defaults
        if isinstance(entry, DictConfig)
        for k, v in entry.items()
    }
    for group, cls in SCHEMAS.items():
        path = f"{group}/{chosen[group]}.yaml"
        defaults, yaml = _option(group, chosen[group])
        assert defaults == ["schema", "_self_"], path
        schema = OmegaConf.to_container(OmegaConf.structured(cls))
        if group == "reward":
            # terms: None = the paper's terms for reward.mode, which are what the YAML lists
            # (the mapping cannot be a dict default: Hydra would merge sup's terms into unsup's)
            assert schema.pop("terms") is None
            resolved = OmegaConf.create({"reward": yaml})
            want = OmegaConf.to_container(resolved.reward.terms, resolve=True)
            assert term_configs(typed(cls, None)) == want, path
            yaml.pop("terms")
        assert {k: schema[k] for k in yaml} == yaml, path
        others = set().union(*(_option(g, o)[1] for g, o in OPTIONS if g == group))
        assert set(schema) - set(yaml) <= others, f"{path}: undocumented schema fields"


@pytest.mark.parametrize("group, option", _typed_options(), ids=lambda x: str(x))
def test_every_option_of_a_typed_group_sets_schema_fields_only(group, option):
    """Each option file of a typed group starts from the schema (``defaults: [schema, ...,
    _self_]``; algo=dapo etc. extend grpo after it), and every key it sets is a schema field:
    a key the schema lacks would fail to compose."""
    from omegaconf import OmegaConf

    from grace_lightning.schema import SCHEMAS

    defaults, yaml = _option(group, option)
    assert defaults[0] == "schema" and defaults[-1] == "_self_", defaults
    fields = set(OmegaConf.structured(SCHEMAS[group]))
    assert set(yaml) <= fields, f"not in {SCHEMAS[group].__name__}: {set(yaml) - fields}"


def test_optim_lr_abc_fails_before_any_model_or_data_loads(tmp_path, monkeypatch):
    import grace_lightning.train as train_mod

    def tripwire(*args, **kwargs):
        raise AssertionError("loaded something before validating the config")

    monkeypatch.setattr(train_mod, "load_tokenizer", tripwire)
    monkeypatch.setattr(hydra.utils, "instantiate", tripwire)
    with pytest.raises(ConfigError, match="trainer.max_steps: expected an integer, got 'abc'"):
        train_mod.train(make_cfg(["backbone=tiny", "trainer.max_steps=abc"], tmp_path))


def test_cli_optim_lr_abc_says_what_to_change(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "optim.lr=abc", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "could not be converted to Float" in proc.stderr and "full_key: optim.lr" in proc.stderr
    assert "TypeError" not in proc.stderr


def test_logger_none_trains_without_the_lr_monitor(tmp_path):
    """`python train.py backbone=tiny logger=none trainer.max_steps=1` (Lightning refuses a
    LearningRateMonitor without a logger: train.py drops it)."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from grace_lightning.train import train

    cfg = make_cfg(
        [
            "backbone=tiny",
            "logger=none",
            "trainer.max_steps=1",
            "trainer.enable_progress_bar=false",
        ],
        tmp_path,
    )
    assert "learning_rate_monitor" in cfg.callbacks
    _, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.global_step >= 1 and not trainer.loggers  # one rollout batch
    assert not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks)
    assert (tmp_path / "export" / "config.json").exists()
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()  # saved when training ended


@pytest.mark.parametrize(
    "env_mode, configured, offline",
    [(None, None, True), ("online", None, False), ("offline", None, True), ("online", True, True)],
)
def test_wandb_mode_from_the_environment_wins_over_the_default(
    env_mode, configured, offline, monkeypatch, tmp_path
):
    from grace_lightning.train import instantiate_group

    if env_mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    overrides = ["logger=wandb"]
    if configured is not None:
        overrides.append(f"logger.wandb.offline={str(configured).lower()}")
    cfg = make_cfg(overrides, tmp_path)
    assert cfg.logger.wandb.offline == configured
    (logger,) = instantiate_group(cfg.logger)
    assert logger._offline is offline
    assert os.environ.get("WANDB_MODE") == env_mode  # nothing set yet (no run started)


def test_push_to_hub_fails_at_startup_when_offline_or_malformed(tmp_path, monkeypatch):
    """The upload runs when training ends: an offline machine or a bad repo id fail at config
    time, with the command that uploads later."""
    cfg = make_cfg(["callbacks.export.push_to_hub=me/grace-tiny"], tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set.*--push-to-hub me/grace-tiny"):
        validate(cfg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    validate(cfg)  # online: fine
    bad = make_cfg(["callbacks.export.push_to_hub=grace-tiny"], tmp_path)
    with pytest.raises(ConfigError, match="expected a Hub repo id <owner>/<name>"):
        validate(bad)

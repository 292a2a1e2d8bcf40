"""W&B sweep files (``sweeps/*.yaml``) read without W&B: grid points, agent command lines, and the
equivalent Hydra multirun.

A sweep's ``command`` is ``[${env}, ${interpreter}, ${program}, <fixed overrides>...,
${args_no_hyphens}]``. For every run, ``wandb agent`` replaces ``${args_no_hyphens}`` with the
run's parameters as ``key=value`` (Hydra override syntax), and the other macros with
``/usr/bin/env``, ``python`` and the program. :func:`agent_overrides` rebuilds those overrides,
so the tests can compose each run's config exactly as the agent would launch it.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import yaml

MACROS = {"${env}", "${interpreter}", "${program}"}
ARGS = "${args_no_hyphens}"


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Parse a sweep YAML and check the keys this repo relies on."""
    sweep = yaml.safe_load(Path(path).read_text())
    for key in ("program", "method", "metric", "parameters", "command"):
        if key not in sweep:
            raise ValueError(f"{path}: sweep has no `{key}`")
    if ARGS not in sweep["command"]:
        raise ValueError(f"{path}: `command` must pass {ARGS} (Hydra overrides)")
    return sweep


def parameter_values(spec: dict[str, Any]) -> list[Any]:
    """The values a grid takes for one parameter (``values: [...]`` or ``value: x``)."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    raise ValueError(f"grid sweeps need `values` or `value` for every parameter, got {spec}")


def grid_points(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run of a grid sweep: the cartesian product of the parameters, in W&B's order."""
    if sweep["method"] != "grid":
        raise ValueError(f"only grid sweeps expand to a fixed list of runs, not {sweep['method']}")
    names = list(sweep["parameters"])
    values = [parameter_values(sweep["parameters"][n]) for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def format_value(value: Any) -> str:
    """A parameter value as the agent writes it into ``key=value``: Python's ``str`` (wandb
    ``sdk/launch/sweeps/utils.py::create_sweep_command_args``: ``f"{param}={value}"``)."""
    return str(value)


def fixed_overrides(sweep: dict[str, Any]) -> list[str]:
    """The literal items of ``command``: overrides every run of the sweep gets."""
    return [c for c in sweep["command"] if c not in MACROS and c != ARGS]


def agent_overrides(sweep: dict[str, Any], point: dict[str, Any]) -> list[str]:
    """The Hydra overrides ``wandb agent`` passes for one run, in command order."""
    out: list[str] = []
    for item in sweep["command"]:
        if item == ARGS:
            out += [f"{k}={format_value(v)}" for k, v in point.items()]
        elif item not in MACROS:
            out.append(item)
    return out


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(base: list[str], extra: list[str]) -> list[str]:
    """``base`` with every override whose key is in ``extra`` replaced by ``extra``'s.

    Overriding a key also drops ``base`` overrides below it: ``logger=csv`` removes
    ``logger.wandb.offline=false``, which would no longer exist.
    """
    keys = {override_key(o) for o in extra}

    def replaced(o: str) -> bool:
        k = override_key(o)
        return any(k == e or k.startswith(e + ".") for e in keys)

    return [o for o in base if not replaced(o)] + list(extra)


def multirun_overrides(sweep: dict[str, Any], extra: list[str] | None = None) -> list[str]:
    """The same grid as one Hydra multirun: fixed overrides + ``key=v1,v2,...`` per parameter.

    ``extra`` overrides replace fixed ones with the same key (e.g. ``logger=csv`` for the sweep's
    ``logger=wandb``) or add new ones.
    """
    swept = [
        f"{name}={','.join(format_value(v) for v in parameter_values(spec))}"
        for name, spec in sweep["parameters"].items()
    ]
    return merge_overrides(fixed_overrides(sweep) + swept, list(extra or []))

"""What a user sees first: ``python train.py``'s output up to the first progress line holds no
warning, an export prints no progress bar, and the bar's ETA follows the time budget."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.trainer.states import RunningStage

from grace_lightning.callbacks.progress import (
    TimeBudgetProgressBar,
    batches_in_budget,
    batches_in_steps,
)

from .conftest import DATA_ROOT, ROOT
from .test_train import TINY

# what a warning looks like on the screen: Python's "<file>:<line>: <Category>Warning: ..." (shown
# for every category under -W default), Lightning's own format (no category: "<file>:<line>:
# `x` is deprecated ..."), transformers' logger warnings, and Lightning's tips
NOISE = re.compile(r"warn|deprecat|💡|tip:", re.IGNORECASE)
FIRST_PROGRESS = re.compile(r"^\s*Epoch 0\b", re.MULTILINE)  # the training bar's first draw


@pytest.fixture(scope="module")
def first_screen(tmp_path_factory) -> tuple[str, object]:
    out_dir = tmp_path_factory.mktemp("first_screen")
    overrides = [o for o in TINY if not o.startswith("trainer.enable_progress_bar")]
    overrides = [
        o if not o.startswith("data.root=") else f"data.root={DATA_ROOT}" for o in overrides
    ]
    cmd = [
        sys.executable,
        "-W",
        "default",  # every Python warning is shown (once per place), as a careful user runs it
        "train.py",
        *overrides,
        "trainer=cpu_bf16",  # the quickstart's trainer (bf16-mixed: Lightning's summary warns)
        "trainer.enable_progress_bar=true",
        "+trainer.max_time=00:00:30:00",  # a Timer, as the quickstart's 9-minute budget has
        "algo.beta=0.04",  # a frozen KL reference in eval mode (Lightning's eval-mode warning)
        f"paths.output_dir={out_dir}",
        f"hydra.run.dir={out_dir}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}  # stdout/stderr in order
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout, out_dir


def test_no_warning_before_the_first_progress_line(first_screen):
    text, _ = first_screen
    first = FIRST_PROGRESS.search(text)
    assert first, text[-3000:]
    noisy = [line for line in text[: first.start()].splitlines() if NOISE.search(line)]
    assert not noisy, "\n".join(noisy)


def test_export_prints_no_progress_bar(first_screen):
    text, out_dir = first_screen
    assert (out_dir / "export" / "model.safetensors").is_file()
    assert "Writing model shards" not in text
    assert "💡" not in text  # no Lightning tip anywhere in the run either


def test_bar_is_the_time_budget_bar(first_screen):
    """The run's bar is ours (its total can follow max_time): Lightning's TQDM bar format."""
    text, _ = first_screen
    assert re.search(r"Epoch 0: +\d+%\|", text), text[-2000:]


def test_bar_total_follows_max_steps(first_screen):
    """TINY: max_steps=2 and 2 optimiser steps a rollout batch (2 prompts, 1 a mini-batch): the
    bar counts to the 1 rollout batch the run takes, not to the epoch's ~30."""
    text, _ = first_screen
    counts = re.findall(r"Epoch 0: +\d+%\|[^|]*\| *(\d+)/(\d+) ", text)
    assert counts, text[-2000:]
    assert counts[-1] == ("1", "1"), counts


def test_batches_in_steps():
    assert (
        batches_in_steps(4000, 4, 0, 731) == 731
    )  # the paper: 1,000 batches, the epoch ends first
    assert batches_in_steps(8, 4, 0, 731) == 2
    assert batches_in_steps(9, 4, 3, 731) == 6  # a partial batch still runs; 3 already done
    assert batches_in_steps(5, 1, 0, None) == 5  # contrastive: a step a batch; unknown length
    assert batches_in_steps(0, 4, 2, 731) == 2  # the cap is reached


def test_batches_in_budget():
    # 10 batches in 30 s (3 s each), 30 s left: 10 more fit -> 20, below the epoch's 731
    assert batches_in_budget(10, 30.0, 30.0, 731) == 20
    assert batches_in_budget(10, 30.0, 3000.0, 731) == 731  # the epoch ends first: its own count
    assert batches_in_budget(10, 30.0, -5.0, 731) == 10  # over budget: this batch is the last
    assert batches_in_budget(10, 30.0, 30.0, None) == 20  # an iterable of unknown length
    assert batches_in_budget(0, 0.0, 30.0, 731) == 731  # nothing measured yet


def test_bar_total_and_eta_follow_the_timer():
    """A 9-minute budget, 1 minute in after 10 of 731 batches: the bar counts to the 90 batches
    that fit and its ETA (tqdm: (total - n) / rate) is the budget's 8 minutes, not 1:41:38."""
    timer = Timer(duration="00:00:09:00")
    now = time.monotonic()
    timer._start_time[RunningStage.TRAINING] = now - 60.0
    bar = TimeBudgetProgressBar()
    bar._train_progress_bar = SimpleNamespace(total=731)
    bar._epoch_total, bar._epoch_start = 731, now - 60.0
    bar.follow_budget(SimpleNamespace(callbacks=[timer]), done=10)
    assert bar.budget_total == bar.train_progress_bar.total
    assert 89 <= bar.train_progress_bar.total <= 91  # 10 + 480 s / 6 s a batch
    eta = (bar.train_progress_bar.total - 10) * 6.0
    assert abs(eta - timer.time_remaining()) <= 6.0

    no_budget = TimeBudgetProgressBar()
    no_budget._train_progress_bar = SimpleNamespace(total=731)
    no_budget._epoch_total, no_budget._epoch_start = 731, now - 60.0
    no_budget.follow_budget(SimpleNamespace(callbacks=[]), done=10)  # no max_time: untouched
    assert no_budget.train_progress_bar.total == 731 and no_budget.budget_total is None

"""bench/paper_scale.py's memory model: shapes, fitting and prediction (no heavy runs)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import paper_scale as ps

# parameter counts of the released checkpoints (model cards / safetensors index totals)
PUBLISHED = {
    "qwen": 1_543_714_304,  # Qwen2.5-1.5B
    "qwen3b": 3_085_938_688,  # Qwen2.5-3B
    "llama": 3_212_749_824,  # Llama-3.2-3B
    "qwen3": 4_022_468_096,  # Qwen3-4B
}

LAY = ps.LayerSaved(
    full_per_token=120_000.0, full_weights=9.4e7, lora_per_token=159_000.0, lora_weights=8.8e7
)


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_shapes_count_the_published_parameters(key):
    assert ps.SHAPES[key].params() == PUBLISHED[key]


def test_shape_counts_match_a_built_model():
    model = ps.build_model(ps.TINY)
    assert sum(p.numel() for p in model.parameters()) == ps.TINY.params()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    lora = ps.TINY.lora_params(16)
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    wrapped = get_peft_model(model, LoraConfig(r=16, target_modules=targets))
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == lora


def test_kv_cache_of_the_issue():
    # issue 10: 64 x 8 + 128 anchor rows at 1024 + 2048 tokens ~ 56 GB of bf16 KV (Qwen2.5-1.5B)
    kv = ps.SHAPES["qwen"].kv_bytes_per_token() * 640 * 3072
    assert kv == 28 * 2 * 2 * 128 * 2 * 640 * 3072
    assert 56e9 < kv < 57e9


def _synthetic_results(truth: ps.Coeffs, points):
    lays = {p.shape: LAY for p in points}
    out = []
    for p in points:
        pred = ps.predict_measured(p, truth, LAY)
        out.append({"point": ps.asdict(p), "peaks": pred, "skipped_knobs": []})
    return out, lays


def test_fit_recovers_known_coefficients_and_predicts_held_out_points():
    truth = ps.Coeffs(
        kappa_full=1.3,
        kappa_lora=1.2,
        grad_extra=4.5,
        lm=14.0,
        lm_bwd=25.0,
        sample=45.0,
        prefill=0.7,
        update_const=0.05 * ps.GIB,
        rollout_const=0.02 * ps.GIB,
    )
    grid = ps.default_grid()
    fit_points = [p for p in grid if p.label.startswith("fit:")]
    held = [p for p in grid if not p.label.startswith("fit:")]
    results, lays = _synthetic_results(truth, fit_points)
    held_results, _ = _synthetic_results(truth, held)
    lays.update({p.shape: LAY for p in held})
    got = ps.fit_coeffs(results, lays, ps.Coeffs())
    # exact data: every fitted quantity is recovered within 2% (the weak prior pulls a little)
    for name in ("kappa_full", "kappa_lora", "grad_extra", "lm", "sample"):
        assert getattr(got, name) == pytest.approx(getattr(truth, name), rel=0.02), name
    for row in ps.fit_report(held_results, got, lays):
        for phase in ("rollout", "update"):
            meas, pred = row[phase]
            assert pred == pytest.approx(meas, rel=0.02), (row["label"], phase)


def test_fit_reduces_the_error_of_a_wrong_prior():
    truth = replace(ps.Coeffs(), kappa_full=1.5, lm=10.0)
    points = [p for p in ps.default_grid() if p.label.startswith("fit:")]
    results, lays = _synthetic_results(truth, points)

    def cost(c):
        return sum(
            (row[ph][1] - row[ph][0]) ** 2
            for row in ps.fit_report(results, c, lays)
            for ph in ("rollout", "update")
        )

    prior = ps.Coeffs()
    assert cost(ps.fit_coeffs(results, lays, prior)) < 1e-4 * cost(prior)


def test_bounded_least_squares_respects_bounds():
    # min (x0 - 3)^2 + (x1 + 1)^2 with 0 <= x <= 2: the answer is the corner (2, 0)
    x = ps.bounded_least_squares(
        lambda x: np.array([x[0] - 3.0, x[1] + 1.0]),
        np.array([1.0, 1.0]),
        np.zeros(2),
        np.full(2, 2.0),
    )
    assert x == pytest.approx([2.0, 0.0])


def test_peak_grows_with_micro_batch_and_rollout_budget_and_largest_fitting_is_the_edge():
    s, recipe, c = ps.SHAPES["qwen"], ps.Recipe(), ps.Coeffs()
    st = ps.Setting(gc=True)
    upd = [
        ps.predict_peak(s, st, recipe, c, LAY, micro_rows=m)["phases"]["update"] for m in (1, 8, 64)
    ]
    rol = [
        ps.predict_peak(s, st, recipe, c, LAY, rollout_rows=r)["phases"]["rollout"]
        for r in (10, 100, 640)
    ]
    assert upd[0] < upd[1] < upd[2] and rol[0] < rol[1] < rol[2]
    cap = 70 * ps.GIB

    def f(m):
        return ps.predict_peak(s, st, recipe, c, LAY, micro_rows=m)["phases"]["update"]

    m = ps.largest_fitting(f, 128, cap)
    assert 1 <= m < 128 and f(m) <= cap < f(m + 1)
    assert ps.largest_fitting(lambda x: 2 * cap, 10, cap) == 0


def test_update_memory_follows_the_micro_batch_not_the_mini_batch():
    s, c, st = ps.SHAPES["qwen"], ps.Coeffs(), ps.Setting(gc=True)
    small = ps.predict_peak(s, st, ps.Recipe(minibatch=16), c, LAY, micro_rows=4)
    big = ps.predict_peak(s, st, ps.Recipe(minibatch=64), c, LAY, micro_rows=4)
    assert small["phases"]["update"] == big["phases"]["update"]


def test_fsdp_shards_weights_grads_and_adam():
    s = ps.SHAPES["qwen3"]
    one = ps.static_parts(s, s.layers, ps.Setting())
    four = ps.static_parts(s, s.layers, ps.Setting(devices=4))
    assert four["weights"] == one["weights"] / 4 and four["adam"] == one["adam"] / 4
    step1, step4 = (
        ps.step_parts(s, s.layers, ps.Setting()),
        ps.step_parts(s, s.layers, ps.Setting(devices=4)),
    )
    assert step4["grads"] == step1["grads"] / 4
    # full fine-tuning of Qwen3-4B: 4 (w) + 8 (AdamW) + 4 (grads) + 4 (foreach temp) B/param
    # = 80 GB before any activation: it cannot fit one 80 GB GPU
    assert sum(one.values()) + sum(step1.values()) > 74 * ps.GIB


def test_lora_trains_only_adapters():
    s = ps.SHAPES["qwen"]
    full = ps.static_parts(s, s.layers, ps.Setting())
    lora = ps.static_parts(s, s.layers, ps.Setting(lora=True))
    assert lora["weights"] == full["weights"]  # fp32 base kept (master_weights_fp32)
    assert lora["adam"] == 8 * s.lora_params(16) < full["adam"] / 50


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_phase_peaks_nest_and_exclude():
    peaks = ps.PhasePeaks()
    size = 256 * 2**20

    def grab(nbytes):
        x = torch.ones(nbytes // 4)  # touched pages (mmap-sized: freed to the OS at once)
        del x

    peaks.enter("outer")
    peaks.enter("step", exclude=True)
    grab(2 * size)
    peaks.exit()
    peaks.enter("counted")
    grab(size)
    peaks.exit()
    peaks.exit()
    assert peaks.peak["step"] >= 1.9 * size and peaks.peak["counted"] >= 0.9 * size
    # the excluded phase's 2x never reaches "outer"; the counted phase's 1x does
    assert 0.9 * size <= peaks.peak["outer"] < 1.5 * size


def test_layer_saved_bytes_counts_bf16_weight_casts_and_grows_with_tokens():
    # autocast without its weight cache (Lightning): every projection's bf16 cast (2 B/weight)
    # is saved for the input gradient; activations add a positive amount per token
    saved = ps.layer_saved_bytes(ps.TINY, lora=False)
    assert saved["weights"] == pytest.approx(2 * ps.TINY.layer_linear_params(), rel=0.05)
    assert saved["per_token"] > 10 * ps.TINY.hidden


# ----------------------------------------------------------- grace_lightning/scale.py (shared)
def test_the_model_counts_the_planners_padded_rectangle():
    """One accounting: scale.MicroShape's tokens are rl/update.py's padded_tokens (what
    algo.max_tokens_per_micro_batch bounds) for any micro-batch of a mixed-length batch."""
    from grace_lightning import scale
    from grace_lightning.rl.update import padded_tokens, row_costs

    g = torch.Generator().manual_seed(0)
    prompts, k = 5, 4
    prompt_mask = (torch.rand(prompts, 40, generator=g) < 0.7).long()  # (P, Lp)
    row_to_prompt = torch.arange(prompts).repeat_interleave(k)  # (N,)
    lengths = torch.randint(1, 30, (prompts * k,), generator=g)
    response_mask = (torch.arange(30)[None] < lengths[:, None]).long()  # (N, R)
    costs = row_costs(prompt_mask, row_to_prompt, response_mask)
    for _ in range(20):
        rows = torch.randperm(prompts * k, generator=g)[: int(torch.randint(1, 12, (1,)))]
        rows = rows.tolist()
        m = scale.MicroShape(
            rows=len(rows),
            prompts=len(set(row_to_prompt[rows].tolist())),
            prompt_len=int(prompt_mask[row_to_prompt[rows]].sum(-1).max()),
            response_len=int(lengths[rows].max()),
        )
        for shared in (True, False):
            assert m.tokens(shared) == padded_tokens(rows, costs, shared)
            st = scale.Setting(share_prompt=shared)
            assert scale.micro_tokens(m, st)[0] == padded_tokens(rows, costs, shared)


def test_bench_uses_the_package_model():
    from grace_lightning import scale

    assert ps.predict_peak is scale.predict_peak and ps.SHAPES is scale.SHAPES
    assert ps.DEFAULT_COEFFS is scale.DEFAULT_COEFFS


def _paper_cfg(*overrides):
    from tests.test_train import make_cfg

    return make_cfg(["backbone=qwen", *overrides], preset="paper_sup")


def test_predict_config_peak_reads_the_composed_recipe():
    from grace_lightning import scale

    cfg = _paper_cfg()
    recipe, st, micro, roll = scale.config_recipe(cfg, world=1)
    assert recipe == scale.Recipe(
        prompts=int(cfg.data.prompts_per_step),
        k=int(cfg.rollout.num_generations),
        anchors=2,
        prompt_len=int(cfg.prompt.max_prompt_tokens),
        response_len=int(cfg.rollout.max_new_tokens),
        minibatch=int(cfg.algo.prompts_per_minibatch),
    )
    assert st.gc == bool(cfg.model.gradient_checkpointing) and not st.lora
    # the token budget gives the rows whose padded rectangle fits it (GC: full sequences)
    budget = int(cfg.algo.max_tokens_per_micro_batch)
    seq = recipe.prompt_len + recipe.response_len
    assert micro == budget // seq
    assert roll == cfg.rollout.max_rows_per_batch
    want = scale.predict_peak(scale.SHAPES["qwen"], st, recipe, micro_rows=micro, rollout_rows=roll)
    assert scale.predict_config_peak(cfg, 1) == want["peak"]
    # LoRA and FSDP over 4 GPUs lower it; DDP over 4 keeps the weights and AdamW whole (and
    # the micro-batch and rollout sub-batch budgets bind as on one GPU: the same peak)
    lora = scale.predict_config_peak(_paper_cfg("peft=lora"), 1)
    fsdp = scale.predict_config_peak(_paper_cfg("trainer=fsdp", "trainer.devices=4"), 4)
    ddp = scale.predict_config_peak(_paper_cfg("trainer=ddp", "trainer.devices=4"), 4)
    assert lora < want["peak"] and fsdp < ddp <= want["peak"]
    assert scale.predict_config_peak(_paper_cfg("trainer.precision=32"), 1) is None


def test_fits_qwen3_full_fine_tuning_only_with_help():
    from grace_lightning import scale

    h100 = 80e9
    assert not scale.fits("qwen3", scale.Recipe(), scale.Setting(gc=True), h100, micro_rows=1)
    lora = scale.Setting(gc=True, lora=True)
    assert scale.fits("qwen3", scale.Recipe(), lora, h100, micro_rows=8, rollout_rows=64)
    est = scale.estimate("qwen", scale.Recipe(), scale.Setting(gc=True))
    assert est["peak"] == max(est["rollout"], est["update"], est["optim_step"])


def test_unknown_shape_scales_the_measured_layer():
    from grace_lightning import scale

    q = scale.SHAPES["qwen"]
    assert scale.layer_saved_for(q) is scale.LAYER_SAVED_DEFAULT["qwen"]
    wider = replace(q, name="wider", hidden=2 * q.hidden)
    lay = scale.layer_saved_for(wider)
    assert lay.full_per_token > scale.LAYER_SAVED_DEFAULT["qwen"].full_per_token


def test_term_gradient_norms_cost_a_gradient_copy_per_term_on_the_first_steps():
    """algo.log_term_grad_norms_steps > 0 with the joint loss on copies each loss term's gradient
    (fp32, every trainable parameter) for its norm on the first steps: the startup check counts
    them. With the policy gradient alone (the paper recipe) nothing extra runs, nor is counted."""
    from grace_lightning import scale

    t = scale.SHAPES["qwen"].params()
    for joint in ("algo.contrastive_weight=0.0", "algo.contrastive_weight=0.5"):
        off = scale.predict_config_peak(_paper_cfg("algo.log_term_grad_norms_steps=0", joint), 1)
        on = scale.predict_config_peak(_paper_cfg("algo.log_term_grad_norms_steps=8", joint), 1)
        want = 0 if joint.endswith("0.0") else 4 * t * 3  # pg + joint copies + one in flight
        assert on - off == pytest.approx(want, rel=1e-6), joint


def test_a_contrastive_baseline_is_predicted_by_its_own_step():
    """paper_infonce / paper_simcse run no rollouts: the startup check predicts one forward +
    backward of the decoder over every text of the device's batch (no LM head), not GRACE's
    rollout batch. InfoNCE: query, positive and hard negative per triplet; SimCSE: two views."""
    from grace_lightning import scale
    from tests.test_train import make_cfg

    s = scale.SHAPES["qwen3"]
    for method, per_item in (("infonce", 3), ("simcse", 2)):
        cfg = make_cfg(["backbone=qwen3", f"method={method}"], preset=f"paper_{method}")
        st, texts, text_len = scale.config_contrastive(cfg, 1)
        assert texts == 64 * per_item and st.gc and not st.lora
        assert text_len == int(cfg.model.max_text_tokens) + scale.TEMPLATE_TOKENS
        out = scale.predict_contrastive_peak(s, st, texts, text_len)
        assert scale.predict_config_peak(cfg, 1) == out["peak"]
        assert "lm_head" not in out["update"] and "rollout" not in out["phases"]
        # by hand: fp32 weights + AdamW, and checkpointed layer inputs (fp32 residual per layer)
        # + one layer's saved activations over texts x text_len tokens
        assert out["static"] == {"weights": 4 * s.params(), "adam": 8 * s.params()}
        assert out["update"]["embed_grad"] == 4 * s.embed_params()  # no LM-head cast gradient
        tokens = texts * text_len
        a = scale.layer_saved_for(s).full_per_token
        kappa = scale.DEFAULT_COEFFS.kappa_full
        act = kappa * (s.layers * 4 * s.hidden * tokens + a * tokens)
        if method == "infonce":  # 192 texts of 608 tokens: the forward's end is the peak
            assert out["update"]["activations"] == pytest.approx(act)
        else:  # 128 sentences of 128 tokens: the backward's end (fp32 gradients) is larger
            assert out["update"]["grads"] == 4 * s.params()
        # FSDP over 4 GPUs: a quarter of the batch and of the weights on each
        fsdp = make_cfg(
            ["backbone=qwen3", f"method={method}", "trainer=fsdp", "trainer.devices=4"],
            preset=f"paper_{method}",
        )
        assert scale.config_contrastive(fsdp, 4)[1] == texts // 4
        assert scale.predict_config_peak(fsdp, 4) < out["peak"] / 2
    # the GRACE run of the same backbone is predicted by the rollout-batch model, as before
    grace = make_cfg(["backbone=qwen3"], preset="paper_sup")
    assert scale.config_contrastive(grace, 1) is None


def test_the_contrastive_table_of_docs_scale_is_the_bench_s():
    """docs/scale.md's contrastive table is what `python bench/contrastive_memory.py` prints."""
    from bench import contrastive_memory

    doc = (
        (Path(__file__).resolve().parents[1] / "docs" / "scale.md")
        .read_text()
        .split("## The contrastive baselines")[1]
    )
    lines = doc.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| backbone |"))
    shown = {
        ln.split("|")[1].strip(): [float(c.split()[0]) for c in ln.split("|")[2:-1]]
        for ln in lines[start + 2 : start + 6]
    }
    table = contrastive_memory.table()
    assert shown == {b: [round(v, 1) for v in cols.values()] for b, cols in table.items()}

"""fastgradstats.integrations.lightning against the real Lightning (tiny models, CPU).

Each symptom that issue 13 found with the README recipe of before has a test here; the old
recipe is kept (OldRecipe) to show that the checks catch it. CI installs the `lightning`
extra and sets FASTGRADSTATS_REQUIRE_EXTRAS=1, so these tests fail there instead of skipping.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

if os.environ.get("FASTGRADSTATS_REQUIRE_EXTRAS"):
    import lightning.pytorch as pl
else:
    pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import Logger

from fastgradstats import GradMonitor
from fastgradstats.integrations import total_key
from fastgradstats.integrations.lightning import GradMonitorCallback

N_SAMPLES, BATCH = 64, 2  # 32 batches per epoch, as in the issue


class MemoryLogger(Logger):
    """Keeps every (step, metrics) row that Lightning writes."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step) -> None:
        self.rows.append((step, dict(metrics)))


class Regressor(pl.LightningModule):
    """Two Linear layers on a fixed random regression; optional NaN loss / stop at a step."""

    def __init__(self, nan_at=None, stop_at=None, fused=False, lr=0.05):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.nan_at, self.stop_at, self.fused, self.lr = nan_at, stop_at, fused, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.nan_at is not None and self.trainer.global_step == self.nan_at:
            loss = loss * float("nan")
        if self.stop_at is not None and self.trainer.global_step == self.stop_at:
            self.trainer.should_stop = True
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        if self.fused:
            return torch.optim.Adam(self.parameters(), lr=self.lr, fused=True)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N_SAMPLES, 4, generator=gen) * 3
    y = torch.randn(N_SAMPLES, 1, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def fit(callbacks, module=None, epochs=1, **trainer_kwargs):
    logger = MemoryLogger()
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    module = module or Regressor()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|logging interval|LeafSpec).*")
        trainer.fit(module, loader())
    return trainer, module, logger


class OldRecipe(pl.Callback):
    """The README recipe of before this module existed (kept to show the failures)."""

    def __init__(self, **kw):
        self.kw, self.monitor = kw, None

    def on_fit_start(self, trainer, pl_module):
        self.monitor = GradMonitor(pl_module, **self.kw)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.monitor.step()
        if trainer.global_step % trainer.log_every_n_steps == 0:
            pl_module.log_dict(self.monitor.to_dict())


def grad_rows(logger, key):
    return {step: row[key] for step, row in logger.rows if key in row}


def recorded_totals(monitor):
    history = monitor.history()
    return dict(zip(history.steps.tolist(), history.total_norm.tolist()))


def test_import_fastgradstats_imports_no_framework():
    code = (
        "import sys, fastgradstats, fastgradstats.integrations; "
        "print([m for m in ('lightning', 'pytorch_lightning', 'transformers') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("make", [GradMonitorCallback, OldRecipe])
def test_each_written_row_holds_its_own_steps_values(make):
    callback = make()
    _, _, logger = fit([callback], log_every_n_steps=10)
    key = total_key(callback.monitor)
    logged = grad_rows(logger, key)
    truth = recorded_totals(callback.monitor)
    assert len(truth) == 32
    if make is OldRecipe:  # symptom: the row for step 9 holds step 0's values
        assert logged[9] == truth[0] and logged[9] != truth[9]
        return
    # Lightning writes on (step + 1) % 10 == 0: steps 9, 19, 29, each with its own values.
    assert sorted(logged) == [9, 19, 29]
    assert all(logged[step] == truth[step] for step in logged)
    loss_steps = [step for step, row in logger.rows if "loss" in row]
    assert sorted(logged) == loss_steps  # same rows as the user's own metrics


@pytest.mark.parametrize("make", [GradMonitorCallback, OldRecipe])
def test_default_interval_longer_than_an_epoch_still_logs(make):
    callback = make()
    _, _, logger = fit([callback], epochs=2)  # log_every_n_steps=50, 32 batches per epoch
    logged = grad_rows(logger, total_key(callback.monitor))
    if make is OldRecipe:  # symptom: no grad key ever reaches the logger
        assert logged == {}
        return
    assert logged == {49: recorded_totals(callback.monitor)[49]}


def test_a_stopping_step_is_logged_like_lightning_logs_it():
    callback = GradMonitorCallback()
    _, _, logger = fit([callback], module=Regressor(stop_at=4), log_every_n_steps=10)
    logged = grad_rows(logger, total_key(callback.monitor))
    assert logged == {4: recorded_totals(callback.monitor)[4]}
    assert [step for step, row in logger.rows if "loss" in row] == [4]


def test_gradient_accumulation_logs_per_optimizer_step():
    callback = GradMonitorCallback()
    _, _, logger = fit([callback], log_every_n_steps=4, accumulate_grad_batches=2)
    truth = recorded_totals(callback.monitor)
    assert len(truth) == 16  # one record per optimizer step
    logged = grad_rows(logger, total_key(callback.monitor))
    assert sorted(logged) == [3, 7, 11, 15]
    assert all(logged[step] == truth[step] for step in logged)


def count_torch_clips(monkeypatch):
    calls = []
    original = torch.nn.utils.clip_grad_norm_

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting)
    return calls


@pytest.mark.slow_on_triton  # the interpreter makes it slow; CI runs it
def test_takes_max_norm_from_the_trainer_and_clips_once(monkeypatch, backend):
    max_norm = 0.5
    reference_module = Regressor()
    fit([], module=reference_module, gradient_clip_val=max_norm)  # Lightning clips alone

    calls = count_torch_clips(monkeypatch)
    callback = GradMonitorCallback()
    trainer, module, _ = fit([callback], gradient_clip_val=max_norm)
    assert calls == []  # Lightning's own clipping was switched off for the run...
    assert trainer.gradient_clip_val == max_norm  # ...and is back after it
    monitor = callback.monitor
    assert monitor.max_norm == max_norm
    history = monitor.history()
    # The recorded norms are before clipping (they exceed max_norm), coefficients torch's.
    assert history.total_norm.max() > 2 * max_norm
    expected = torch.tensor(max_norm / (history.total_norm + 1e-6)).clamp(max=1.0)
    torch.testing.assert_close(torch.tensor(history.clip_coef), expected, rtol=1e-5, atol=0)
    for mine, theirs in zip(module.parameters(), reference_module.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_another_norm_type_leaves_lightnings_2_norm_clipping(monkeypatch):
    reference_module = Regressor()
    fit([], module=reference_module, gradient_clip_val=0.5, max_steps=6)
    calls = count_torch_clips(monkeypatch)
    callback = GradMonitorCallback(norm_type=1.0)
    _, module, _ = fit([callback], gradient_clip_val=0.5, max_steps=6)
    assert len(calls) == 6 and callback.monitor.max_norm is None
    assert callback.monitor.history().total_norm.min() > 0.5  # recorded before clipping
    for mine, theirs in zip(module.parameters(), reference_module.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_explicit_max_norm_warns_when_the_trainer_clips_too():
    callback = GradMonitorCallback(max_norm=2.0)
    with pytest.warns(UserWarning, match="both clip"):
        trainer, _, _ = fit([callback], gradient_clip_val=0.5, max_steps=3)
    assert callback.monitor.max_norm == 2.0 and trainer.gradient_clip_val == 0.5


def test_value_clipping_stays_lightnings():
    callback = GradMonitorCallback()
    seen = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append((trainer.gradient_clip_val, str(trainer.gradient_clip_algorithm)))

    fit([callback, Spy()], gradient_clip_val=0.01, gradient_clip_algorithm="value", max_steps=3)
    assert callback.monitor.max_norm is None
    assert seen and all(val == 0.01 and "value" in algo.lower() for val, algo in seen)


def test_passes_the_optimizer_through_for_skipping():
    callback = GradMonitorCallback(skip_nonfinite=True)
    trainer, module, _ = fit([callback], module=Regressor(nan_at=3, fused=True), max_steps=6)
    optimizer = trainer.optimizers[0]
    assert callback.monitor.optimizer is optimizer
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # The fused Adam got found_inf and skipped its step counter on the NaN step.
    steps = {float(state["step"]) for state in optimizer.state.values()}
    assert steps == {5.0}
    history = callback.monitor.history()
    assert history.skipped.tolist() == [False, False, False, True, False, False]


def test_old_recipe_without_the_optimizer_does_not_skip_a_fused_step():
    callback = OldRecipe(skip_nonfinite=True)
    trainer, _, _ = fit([callback], module=Regressor(nan_at=3, fused=True), max_steps=6)
    steps = {float(state["step"]) for state in trainer.optimizers[0].state.values()}
    assert steps == {6.0}  # zeroed grads, but the step counter (and bias correction) moved


def test_monitor_kwargs_pass_through_and_bad_ones_fail_early():
    callback = GradMonitorCallback(norm_type=1.0, every=2)
    fit([callback], max_steps=4)
    assert callback.monitor.norm_type == 1.0 and len(callback.monitor.history()) == 2
    assert callback.monitor.capacity == 1000
    callback = GradMonitorCallback()
    fit([callback], max_steps=2, log_every_n_steps=1500)
    assert callback.monitor.capacity == 1501  # holds every step between two writes
    with pytest.raises(ValueError, match="max_norm"):
        GradMonitorCallback(max_norm="auto")
    with pytest.raises(TypeError, match="optimizer"):
        GradMonitorCallback(optimizer=None)


# ----------------------------------------------------------------- readable logs (issue 20)


def test_progress_bar_shows_the_total_and_loggers_get_every_layer():
    callback = GradMonitorCallback()
    trainer, module, logger = fit([callback], log_every_n_steps=4)
    key = total_key(callback.monitor)
    bar = trainer.progress_bar_metrics
    assert key in bar and not [k for k in bar if k.startswith("grad_norm/")]
    names = [n for n, _ in module.named_parameters()]
    last = logger.rows[-1][1]
    assert {f"grad_norm/{n}" for n in names} <= set(last) and key in last
    # the progress bar value is the recorded total of that step
    assert bar[key] == pytest.approx(last[key])


def test_log_shaping_options_reach_the_loggers():
    callback = GradMonitorCallback(log="blocks", group_by=2, prog_bar=False)
    trainer, _, logger = fit([callback], log_every_n_steps=4)
    assert total_key(callback.monitor) not in trainer.progress_bar_metrics
    rows = [row for _, row in logger.rows if total_key(callback.monitor) in row]
    norms = {k for k in rows[-1] if k.startswith("grad_norm/")}
    assert norms == {"grad_norm/net.0", "grad_norm/net.2"}  # weight and bias together
    history = callback.monitor.history()
    cols = [j for j, n in enumerate(history.names) if n.startswith("net.2.")]
    ref = float(torch.linalg.vector_norm(torch.tensor(history.norms[-1, cols])))
    assert rows[-1]["grad_norm/net.2"] == pytest.approx(ref, rel=1e-5)
    totals = GradMonitorCallback(log="totals")
    _, _, logger = fit([totals], log_every_n_steps=4)
    assert not [k for _, row in logger.rows for k in row if "/" in k and "grad_stats" not in k]


def test_bad_log_options_fail_at_construction():
    with pytest.raises(ValueError, match="log must be one of"):
        GradMonitorCallback(log="everything")
    with pytest.raises(ValueError, match="top_k must be"):
        GradMonitorCallback(top_k=0)


# -- issue 19: hand-off with a framework that clips too, 16-mixed, adaptive clippers --------


def assert_clean(opt):
    """Nothing of the hand-off left on the optimizer after training."""
    from fastgradstats import handoff

    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    assert not handoff.pending(opt)


@pytest.mark.slow_on_triton
def test_monitor_and_lightning_both_clip_in_turn_with_a_fused_optimizer(backend):
    """The monitor clips at 0.2, then Lightning at 0.5: in turn that is the 0.2 clip alone
    (a fused optimizer must not multiply the two, nor drop the monitor's)."""
    reference = Regressor(fused=True)
    fit([], module=reference, gradient_clip_val=0.2, max_steps=6)
    callback = GradMonitorCallback(max_norm=0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, module, _ = fit(
            [callback], module=Regressor(fused=True), gradient_clip_val=0.5, max_steps=6
        )
    assert not [w for w in caught if "never applied" in str(w.message)]
    assert callback.monitor.history().total_norm.min() > 0.5  # both clips were active
    assert_clean(trainer.optimizers[0])
    for mine, theirs in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def _fp16_plugin():
    from lightning.pytorch.plugins import MixedPrecision

    # On the CPU Lightning turns precision="16-mixed" into bf16; the plugin keeps fp16 AMP.
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024))


def _torch_amp_reference(max_norm, steps):
    """Plain torch: autocast fp16, GradScaler, unscale_, torch's clip, fused Adam."""
    module = Regressor(fused=True)
    opt = module.configure_optimizers()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024)
    totals = []
    for _, (x, y) in zip(range(steps), loader()):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(module.net(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        totals.append(float(torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)))
        scaler.step(opt)
        scaler.update()
    return module, totals


@pytest.mark.slow_on_triton
def test_16_mixed_with_a_fused_optimizer_records_and_clips_unscaled_grads(backend):
    reference, want_totals = _torch_amp_reference(0.5, steps=6)
    callback = GradMonitorCallback()
    trainer, module, _ = fit(
        [callback],
        module=Regressor(fused=True),
        gradient_clip_val=0.5,
        max_steps=6,
        plugins=[_fp16_plugin()],
    )
    got = callback.monitor.history().total_norm.tolist()
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want_totals), rtol=1e-5, atol=0)
    assert_clean(trainer.optimizers[0])
    for mine, theirs in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


class _TorchZClip(pl.Callback):
    """Reference: the same ZClip rule applied with plain torch ops in the same hook."""

    def __init__(self, clipper):
        self.clipper = clipper

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads).float()
        coef, _ = self.clipper.compute_coef(total)
        torch._foreach_mul_(grads, coef)


@pytest.mark.slow_on_triton
@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused_adam"])
def test_adaptive_clipper_as_max_norm(backend, fused):
    import fastgradstats as fgs

    def zclip():
        return fgs.ZClip(warmup_steps=2, z_thresh=0.5)

    reference = Regressor(fused=fused)
    fit([_TorchZClip(zclip())], module=reference, max_steps=6)
    callback = GradMonitorCallback(max_norm=zclip())
    trainer, module, _ = fit([callback], module=Regressor(fused=fused), max_steps=6)
    assert callback.monitor.clipper is callback.max_norm
    assert min(callback.monitor.history().clip_coef) < 1.0  # the clipper did clip
    assert_clean(trainer.optimizers[0])
    for mine, theirs in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_bad_max_norm_is_refused_at_construction_naming_the_callback():
    with pytest.raises(TypeError, match=r"GradMonitorCallback\(max_norm=\.\.\.\).*object"):
        GradMonitorCallback(max_norm=object())
    with pytest.raises(ValueError, match=r"GradMonitorCallback\(max_norm=\.\.\.\)"):
        GradMonitorCallback(max_norm="auto")

"""fastgradstats.integrations.huggingface against the real transformers Trainer (CPU, tiny).

Each symptom that issue 13 found with the README recipe of before has a test; the old
recipe is kept (OldRecipe) where it shows the failure. CI installs the `hf` extra and sets
FASTGRADSTATS_REQUIRE_EXTRAS=1, so these tests fail there instead of skipping.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

if os.environ.get("FASTGRADSTATS_REQUIRE_EXTRAS"):
    import transformers
else:
    transformers = pytest.importorskip("transformers")

from transformers import Trainer, TrainerCallback, TrainingArguments

from fastgradstats import GradMonitor
from fastgradstats.integrations import huggingface as fgs_hf
from fastgradstats.integrations import total_key
from fastgradstats.integrations.huggingface import GradMonitorCallback, attach


class Regressor(nn.Module):
    """Two Linear layers; the Trainer calls it with the dataset's keys; NaN loss on demand."""

    def __init__(self, nan_at_call=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.nan_at_call, self.calls = nan_at_call, 0

    def forward(self, x, labels=None):
        out = self.net(x)
        loss = nn.functional.mse_loss(out.float(), labels)
        if self.training:
            if self.calls == self.nan_at_call:
                loss = loss * float("nan")
            self.calls += 1
        return {"loss": loss, "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=64):
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=gen) * 3
        self.y = torch.randn(n, 1, generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def make_trainer(tmp_path, model=None, callbacks=None, optimizers=(None, None), **kw):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        report_to="none",
        logging_steps=2,
        save_strategy="no",
        disable_tqdm=True,
        max_grad_norm=0.0,
    )
    defaults.update(kw)
    args = TrainingArguments(**defaults)
    return Trainer(
        model=model or Regressor(),
        args=args,
        train_dataset=Rows(),
        callbacks=callbacks,
        optimizers=optimizers,
    )


def train(trainer):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(GradMonitorCallback|max_grad_norm).*")
        trainer.train()
    return trainer


class OldRecipe(TrainerCallback):
    """The README recipe of before, plus the on_log merge a user would add."""

    def __init__(self, **kw):
        self.kw, self.monitor = kw, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.monitor = GradMonitor(model, **self.kw)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.monitor.step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            logs.update(self.monitor.to_dict())


def logged(trainer, key):
    return {row["step"]: row[key] for row in trainer.state.log_history if key in row}


def test_import_fastgradstats_imports_no_framework():
    code = (
        "import sys, fastgradstats, fastgradstats.integrations; "
        "print([m for m in ('transformers', 'accelerate', 'lightning') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_clear_error_below_transformers_4_45(monkeypatch):
    # the module object the callback reads (transformers' lazy module has several faces)
    monkeypatch.setattr(fgs_hf.transformers, "__version__", "4.44.2")
    with pytest.raises(RuntimeError, match=r"transformers >= 4\.45.*4\.44\.2"):
        GradMonitorCallback()
    with pytest.raises(RuntimeError, match="on_pre_optimizer_step"):
        attach(SimpleNamespace())
    monkeypatch.setattr(fgs_hf.transformers, "__version__", "4.45.0")
    GradMonitorCallback()


def test_logs_every_logging_step_with_that_steps_values(tmp_path):
    trainer = make_trainer(tmp_path)
    callback = attach(trainer)
    train(trainer)
    history = callback.monitor.history()
    # A log row at global step s follows the optimizer step s - 1 (0-based monitor steps).
    truth = {int(step) + 1: total for step, total in zip(history.steps, history.total_norm)}
    # The Trainer's grad_norm is the monitor's total norm (no second pass computed it), so
    # it is logged once, as grad_norm (issue 20).
    rows = logged(trainer, "grad_norm")
    assert sorted(rows) == [2, 4, 6]
    assert all(rows[s] == pytest.approx(truth[s], rel=1e-6) for s in rows)
    per_layer = logged(trainer, "grad_norm/net.0.weight")
    assert sorted(per_layer) == [2, 4, 6]


def count_accelerator_norms(trainer):
    calls = []
    original = trainer.accelerator.clip_grad_norm_

    def counting(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs.get("max_norm"))
        return original(*args, **kwargs)

    trainer.accelerator.clip_grad_norm_ = counting
    return calls


def test_attach_avoids_the_trainers_extra_norm_pass(tmp_path):
    before = make_trainer(tmp_path, callbacks=[GradMonitorCallback(max_norm=1.0)])
    calls_before = count_accelerator_norms(before)
    train(before)
    assert calls_before == [float("inf")] * 6  # symptom: HF 5.x reads every gradient again

    trainer = make_trainer(tmp_path)
    callback = attach(trainer, max_norm=1.0)
    calls = count_accelerator_norms(trainer)
    train(trainer)
    assert calls == []
    assert callback.monitor.num_steps == 6
    for mine, theirs in zip(trainer.model.parameters(), before.model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_plain_callback_with_max_grad_norm_warns_and_sees_clipped_norms(tmp_path):
    callback = GradMonitorCallback()
    trainer = make_trainer(tmp_path, callbacks=[callback], max_grad_norm=0.5)
    with pytest.warns(UserWarning, match="records clipped norms"):
        trainer.train()
    # The symptom the warning is about: flat at max_norm.
    assert callback.monitor.history().total_norm.max() <= 0.5 * (1 + 1e-5)


def test_attach_takes_max_grad_norm_and_records_norms_before_clipping(tmp_path, backend):
    reference = train(make_trainer(tmp_path, max_grad_norm=0.5))  # HF clips alone

    trainer = make_trainer(tmp_path, max_grad_norm=0.5)
    callback = attach(trainer)
    calls = count_accelerator_norms(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # attached: nothing to warn about
        trainer.train()
    assert calls == []  # the monitor clipped, in its pass
    monitor = callback.monitor
    assert monitor.max_norm == 0.5
    history = monitor.history()
    assert history.total_norm.min() > 0.5  # before clipping, not flat at max_norm
    assert (history.clip_coef < 1).all()
    # HF logs the norm before clipping too: the same numbers as its own run.
    assert logged(trainer, "grad_norm") == pytest.approx(logged(reference, "grad_norm"), rel=1e-5)
    for mine, theirs in zip(trainer.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_attach_with_another_norm_type_keeps_the_trainers_2_norm(tmp_path, max_grad_norm):
    reference = train(make_trainer(tmp_path, max_grad_norm=max_grad_norm))
    trainer = make_trainer(tmp_path, max_grad_norm=max_grad_norm)
    callback = attach(trainer, norm_type=1.0)
    train(trainer)
    assert callback.monitor.norm_type == 1.0 and callback.monitor.max_norm is None
    history = callback.monitor.history()
    assert (history.total_norm > 0.5).all()  # 1-norms before any clipping
    # grad_norm is still the 2-norm, and the clipping still the Trainer's (by the 2-norm).
    assert logged(trainer, "grad_norm") == pytest.approx(logged(reference, "grad_norm"), rel=1e-5)
    for mine, theirs in zip(trainer.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_attach_with_both_limits_clips_once_at_the_smaller(tmp_path):
    trainer = make_trainer(tmp_path, max_grad_norm=2.0)
    callback = attach(trainer, max_norm=0.5)
    with pytest.warns(UserWarning, match="both clip"):
        trainer.train()
    assert callback.monitor.max_norm == 0.5


def tensorboard_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for path in folder.rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(path))
        events.Reload()
        tags |= set(events.Tags()["scalars"])
    return tags


def tiny_gpt2():
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=8):
        self.ids = torch.randint(0, 32, (n, length), generator=torch.Generator().manual_seed(2))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("how", ["attach", "callbacks", "old recipe"])
def test_values_reach_the_report_to_loggers(tmp_path, how):
    pytest.importorskip("tensorboard")
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        max_steps=4,
        per_device_train_batch_size=4,
        report_to="tensorboard",
        logging_steps=2,
        save_strategy="no",
        disable_tqdm=True,
    )
    callbacks = {"callbacks": [GradMonitorCallback()], "old recipe": [OldRecipe()]}.get(how)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(), callbacks=callbacks)
    callback = attach(trainer) if how == "attach" else callbacks[0]
    if how == "callbacks":
        with pytest.warns(UserWarning, match="attach"):
            trainer.train()
    else:
        train(trainer)
    key = total_key(callback.monitor)
    if how == "attach":  # the same number as the Trainer's grad_norm: logged once (issue 20)
        key = "grad_norm/transformer.h.0.attn.c_attn.weight"
    if how != "old recipe":
        assert sorted(logged(trainer, key)) == [2, 4]  # trainer.state.log_history has them
    names = [f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)]
    tags = tensorboard_tags(tmp_path / "out")
    assert "train/loss" in tags
    if how == "attach":
        assert f"train/{key}" in tags
        assert all(any(t.startswith("train/") and n in t for t in tags) for n in names)
    else:  # symptom: user callbacks run after TensorBoardCallback
        assert f"train/{key}" not in tags


def fp16_trainer(tmp_path, **kw):
    """fp16 with a real torch GradScaler on the CPU (accelerate only makes one for GPUs)."""
    trainer = make_trainer(tmp_path, fp16=True, max_steps=4, logging_steps=1, **kw)
    assert trainer.accelerator.mixed_precision == "fp16"
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer.accelerator.native_amp = True
    return trainer


@pytest.mark.parametrize("how", ["attach", "callbacks", "callbacks, 4.45-4.57 step"])
def test_fp16_grads_are_unscaled_before_measuring(tmp_path, how):
    reference = train(fp16_trainer(tmp_path))  # HF's own grad_norm, from unscaled grads
    expected = logged(reference, "grad_norm")

    if how == "attach":
        trainer = fp16_trainer(tmp_path)
        callback = attach(trainer)
    else:
        callback = GradMonitorCallback()
        trainer = fp16_trainer(tmp_path, callbacks=[callback])
    if how.endswith("step"):
        # transformers 4.45-4.57 with max_grad_norm=0 computed no norm before the hook, so
        # nothing had unscaled the gradients there (the symptom in issue 13).
        trainer._get_grad_norm = lambda model, grad_norm=None: grad_norm
    train(trainer)
    totals = callback.monitor.history().total_norm
    assert totals.tolist() == pytest.approx([expected[s] for s in sorted(expected)], rel=1e-5)
    assert trainer.accelerator.scaler.get_scale() == 1024.0  # no overflow, no double unscale
    for mine, theirs in zip(trainer.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_fp16_unscale_helper_unscales_once():
    param = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    wrapper = SimpleNamespace(optimizer=optimizer, scaler=scaler)  # accelerate's shape
    scaler.scale(param.sum()).backward()
    assert param.grad.tolist() == [8.0] * 3
    assert fgs_hf.unscale_grads(wrapper) is True
    assert fgs_hf.unscale_grads(wrapper) is True  # a second call in the step is a no-op
    assert param.grad.tolist() == [1.0] * 3
    assert fgs_hf.unscale_grads(SimpleNamespace(optimizer=optimizer)) is False


def test_fp16_without_a_grad_scaler_on_cuda_is_refused():
    callback = GradMonitorCallback()
    args = SimpleNamespace(
        fp16=True, device=torch.device("cuda"), max_grad_norm=0.0, report_to=["none"]
    )
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="loss-scaled"):
        callback.on_train_begin(args, SimpleNamespace(), None, model=model, optimizer=optimizer)


def test_passes_the_optimizer_through_for_skipping(tmp_path):
    model = Regressor(nan_at_call=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    trainer = make_trainer(tmp_path, model=model, optimizers=(optimizer, None))
    callback = attach(trainer, skip_nonfinite=True)
    train(trainer)
    assert callback.monitor.optimizer is optimizer  # accelerate's wrapper removed
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert {float(s["step"]) for s in optimizer.state.values()} == {5.0}  # one step skipped
    assert callback.monitor.history().skipped.tolist() == [False, False, True, False, False, False]


def test_attach_rejects_mixed_arguments_and_keeps_one_copy(tmp_path):
    trainer = make_trainer(tmp_path)
    callback = GradMonitorCallback()
    with pytest.raises(TypeError, match="either"):
        attach(trainer, callback, max_norm=1.0)
    assert attach(trainer, callback) is callback
    attach(trainer, callback)
    callbacks = trainer.callback_handler.callbacks
    assert callbacks[0] is callback and callbacks.count(callback) == 1
    with pytest.raises(TypeError, match="GradMonitorCallback"):
        attach(trainer, OldRecipe())


def test_monitor_kwargs_pass_through_and_history_covers_the_logging_interval(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, logging_steps=1500)
    callback = attach(trainer, norm_type=1.0)
    train(trainer)
    assert callback.monitor.norm_type == 1.0
    assert callback.monitor.capacity == 1501  # holds every step between two logs
    with pytest.raises(ValueError, match="max_norm"):
        GradMonitorCallback(max_norm="auto")
    with pytest.raises(TypeError, match="model"):
        GradMonitorCallback(model=None)


# ----------------------------------------------------------------- readable logs (issue 20)


def printed_rows(text):
    return [line for line in text.splitlines() if "'loss'" in line]


def test_console_shows_totals_and_the_history_every_layer(tmp_path, capsys):
    trainer = make_trainer(tmp_path)  # disable_tqdm=True: the PrinterCallback prints rows
    callback = attach(trainer)
    train(trainer)
    rows = printed_rows(capsys.readouterr().out)
    assert len(rows) == 3
    assert all("grad_norm/" not in row and "grad_max_abs/" not in row for row in rows)
    assert all("'grad_nonfinite'" in row and "'grad_norm'" in row for row in rows)
    names = [n for n, _ in callback.monitor._model.named_parameters()]
    last = [row for row in trainer.state.log_history if "loss" in row][-1]
    assert {f"grad_norm/{n}" for n in names} <= set(last)  # the loggers get every layer
    everything = make_trainer(tmp_path)
    attach(everything, console="all")
    train(everything)
    assert all("grad_norm/net.0.weight" in row for row in printed_rows(capsys.readouterr().out))
    with pytest.raises(ValueError, match="console"):
        GradMonitorCallback(console="layers")


def test_grad_norm_is_logged_once(tmp_path):
    trainer = make_trainer(tmp_path)
    callback = attach(trainer)
    train(trainer)
    history = callback.monitor.history()
    truth = {int(step) + 1: total for step, total in zip(history.steps, history.total_norm)}
    assert logged(trainer, total_key(callback.monitor)) == {}  # no duplicate of grad_norm
    norms = logged(trainer, "grad_norm")
    assert sorted(norms) == [2, 4, 6]
    assert all(norms[s] == pytest.approx(truth[s], rel=1e-6) for s in norms)
    # another norm type: a different number, so both are logged
    other = make_trainer(tmp_path)
    attach(other, norm_type=1.0)
    train(other)
    assert sorted(logged(other, "grad_norm_1_total")) == [2, 4, 6]
    assert sorted(logged(other, "grad_norm")) == [2, 4, 6]


def test_log_shaping_options_reach_the_log_history(tmp_path):
    trainer = make_trainer(tmp_path)
    callback = attach(trainer, group_by=2, include="net")
    train(trainer)
    last = [row for row in trainer.state.log_history if "loss" in row][-1]
    assert {k for k in last if k.startswith("grad_norm/")} == {
        "grad_norm/net.0",
        "grad_norm/net.2",
    }
    history = callback.monitor.history()
    cols = [j for j, n in enumerate(history.names) if n.startswith("net.0.")]
    ref = float(torch.linalg.vector_norm(torch.tensor(history.norms[-1, cols])))
    assert last["grad_norm/net.0"] == pytest.approx(ref, rel=1e-5)


def test_bad_log_options_fail_at_construction():
    with pytest.raises(ValueError, match="group_by must be"):
        GradMonitorCallback(group_by=0)
    with pytest.raises(TypeError, match="include must be"):
        GradMonitorCallback(include=3)


# -- issue 19: a second clip after the monitor's (in turn), adaptive clippers ---------------


def assert_clean(opt):
    """Nothing of the hand-off left on the optimizer after training."""
    from fastgradstats import handoff

    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    assert not handoff.pending(opt)


class TorchClips(TrainerCallback):
    """Reference (with max_grad_norm=0): a first clip by ``first(grads) -> coef``, then the
    Trainer's 2-norm clip at ``then``, with plain torch ops, in turn."""

    def __init__(self, first, then):
        self.first, self.then, self.norms = first, then, []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)))
        torch._foreach_mul_(grads, self.first(grads))
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.then)


def _fused(model):
    return torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)


def _run_reference(tmp_path, first, then):
    model = Regressor()
    ref_cb = TorchClips(first, then)
    trainer = make_trainer(
        tmp_path / "ref", model=model, optimizers=(_fused(model), None), callbacks=[ref_cb]
    )
    train(trainer)
    return trainer, ref_cb


@pytest.mark.slow_on_triton
def test_attach_another_norm_type_and_max_grad_norm_clip_in_turn(tmp_path, backend):
    """The monitor clips the 1-norm at 0.3 (then the 2-norm is <= 0.3), then the Trainer
    the 2-norm at 0.5: in turn the second clip does nothing. A fused optimizer must not
    multiply the two (nor drop the monitor's)."""

    def one_norm_clip(grads):
        total = torch.nn.utils.get_total_norm(grads, norm_type=1.0)
        return torch.clamp(0.3 / (total + 1e-6), max=1.0)

    reference, ref_cb = _run_reference(tmp_path, one_norm_clip, 0.5)
    assert min(ref_cb.norms) > 0.5  # the Trainer's clip alone would have clipped
    model = Regressor()
    optimizer = _fused(model)
    trainer = make_trainer(tmp_path, model=model, optimizers=(optimizer, None), max_grad_norm=0.5)
    attach(trainer, max_norm=0.3, norm_type=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(trainer)
    assert not [w for w in caught if "never applied" in str(w.message)]
    assert_clean(optimizer)
    for mine, theirs in zip(model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.slow_on_triton
@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused_adamw"])
def test_attach_with_an_adaptive_clipper_then_max_grad_norm(tmp_path, backend, fused):
    import fastgradstats as fgs

    clipper_ref = fgs.AutoClip(percentile=10.0)

    def autoclip(grads):
        coef, _ = clipper_ref.compute_coef(torch.nn.utils.get_total_norm(grads).float())
        return coef

    reference, _ = _run_reference(tmp_path, autoclip, 1.0)
    model = Regressor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=fused)
    trainer = make_trainer(tmp_path, model=model, optimizers=(optimizer, None), max_grad_norm=1.0)
    callback = attach(trainer, max_norm=fgs.AutoClip(percentile=10.0))
    with pytest.warns(UserWarning, match="clipper first, then max_grad_norm"):
        trainer.train()
    monitor = callback.monitor
    assert monitor.clipper is callback.max_norm and monitor.max_norm is None
    assert min(monitor.history().clip_coef) < 1.0  # the clipper did clip
    assert_clean(optimizer)
    for mine, theirs in zip(model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_bad_max_norm_is_refused_at_construction_naming_the_callback(tmp_path):
    with pytest.raises(TypeError, match=r"GradMonitorCallback\(max_norm=\.\.\.\).*object"):
        GradMonitorCallback(max_norm=object())
    with pytest.raises(TypeError, match=r"GradMonitorCallback\(max_norm=\.\.\.\)"):
        attach(make_trainer(tmp_path), max_norm=[1.0])

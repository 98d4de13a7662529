"""The shared training loop: the LR schedule (torch's SequentialLR) and the run folder."""

from __future__ import annotations

import math

import pytest
import torch

from smear.nn.loop import RunFolder, _load_scheduler, warmup_cosine


def _closed_form(step: int, warmup: int, total: int, floor: float = 0.01) -> float:
    if step < warmup:
        return floor + (1 - floor) * step / max(1, warmup)
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def _optimizer(lr: float = 0.002) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize("warmup, total", [(5, 60), (0, 20), (3, 3)])
def test_schedule_is_linear_warmup_then_cosine_to_the_floor(warmup, total):
    opt = _optimizer()
    sched = warmup_cosine(opt, warmup, total)
    for step in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.002 * _closed_form(step, warmup, total), rel=1e-9)
        opt.step()
        sched.step()


def test_a_checkpoint_of_the_earlier_lambda_schedule_resumes_at_its_step():
    old_opt = _optimizer()
    old = torch.optim.lr_scheduler.LambdaLR(old_opt, lambda s: _closed_form(s, 5, 60))
    for _ in range(20):
        old_opt.step()
        old.step()
    opt = _optimizer()
    sched = warmup_cosine(opt, 5, 60)
    _load_scheduler(sched, old.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(old_opt.param_groups[0]["lr"], rel=1e-9)


def test_run_folder_refuses_a_used_folder_without_resume(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    with pytest.raises(Exception, match="not empty"):
        RunFolder.start(tmp_path / "run", {"a": 1}, resume=False, log_fields=("epoch",))
    run = RunFolder.start(tmp_path / "run", {"a": 1}, resume=True, log_fields=("epoch",))
    assert (run.path / "config.yaml").read_text() == "a: 1\n"
    run.end_epoch({"epoch": 1}, torch.nn.Linear(1, 1), _optimizer(), warmup_cosine(_optimizer(), 1, 2),
                  type("A", (), {"state": lambda self: torch.zeros(1)})(), epoch=1)
    assert (run.path / "log.csv").read_text().splitlines() == ["epoch", "1"] and run.checkpoint.is_file()

import torch

from pristine.checkpoint import atomic_save
from pristine.mini.pretrain import StageSettings, read_log, run_stage


class _Stop(Exception):
    pass


def _train(workdir, steps, stop_at=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    data = torch.randn(64, 4)
    target = data.sum(1, keepdim=True)

    def loss_fn(step, g):
        if stop_at is not None and step == stop_at:
            raise _Stop  # a killed run
        idx = torch.randint(0, 64, (8,), generator=g)
        noise = torch.randn(8, 1, generator=g) * 0.01
        return torch.nn.functional.mse_loss(model(data[idx]), target[idx] + noise), {}

    settings = StageSettings(steps=steps, batch_size=8, lr=5e-2, warmup=2, checkpoint_every=7)
    try:
        run_stage("toy", workdir, model, list(model.parameters()), settings, loss_fn)
    except _Stop:
        pass
    return model


def test_resumed_stage_ends_with_the_same_weights(tmp_path):
    straight = _train(tmp_path / "a", 40)
    _train(tmp_path / "b", 40, stop_at=17)  # dies after the checkpoint at step 14
    resumed = _train(tmp_path / "b", 40)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    log = read_log(tmp_path / "b", "toy")
    assert [r["step"] for r in log] == list(range(1, 41))
    first, last = [r["loss"] for r in log[:8]], [r["loss"] for r in log[-8:]]
    assert sum(last) < 0.5 * sum(first)


def test_atomic_save_leaves_no_partial_file(tmp_path):
    atomic_save({"x": torch.ones(3)}, tmp_path / "w.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]

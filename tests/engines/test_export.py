"""`ddpm export RUN --onnx`: the graph computes the network's function, at any batch size,
with its class input when the network has one; bad input is one line and exit status 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.cli import main
from ddpm.sampling.generate import load_model
from helpers import tiny_run

onnx = pytest.importorskip("onnx")


def _run(tmp: Path, image_dir: Path, num_classes: int = 0) -> Path:
    """A tiny run trained 2 steps (helpers.tiny_run)."""
    return tiny_run(tmp, image_dir, num_classes, max_steps=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Path:
    return _run(tmp_path_factory.mktemp("export"), image_dir)


def _onnx_out(path: Path, **inputs: np.ndarray) -> np.ndarray:
    from ddpm.export import run_onnx
    return run_onnx(path.read_bytes(), inputs)[0]


def test_export_matches_the_network_at_any_batch(run: Path, capsys: pytest.CaptureFixture) -> None:
    out = run.parent / "net.onnx"
    assert main(["export", str(run), "--onnx", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "max |onnx - torch|" in line and "tolerance 1e-04" in line and line.count("\n") == 0
    err = float(line.split("max |onnx - torch| = ")[1].split()[0])
    assert 0 <= err <= 1e-4
    model = onnx.load(out)
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["ddpm_config"])["model"]["dim"] == 8 and meta["ddpm_step"] == "2"
    assert [i.name for i in model.graph.input] == ["x_t", "t"]

    net = load_model(run).net.float()
    gen = torch.Generator().manual_seed(1)
    for batch in (7, 1):  # neither is the batch it was traced at
        x, t = torch.randn(batch, 1, 8, 8, generator=gen), torch.randint(0, 20, (batch,), generator=gen)
        with torch.no_grad():
            want = net(x, t).numpy()
        got = _onnx_out(out, x_t=x.numpy(), t=t.float().numpy())
        assert got.shape == (batch, 1, 8, 8)
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert np.abs(want).max() > 0.05  # a real output, not zeros matching zeros


def test_default_path_and_reference_evaluator(run: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    """Without ONNX Runtime the check runs on ONNX's own reference evaluator; the file lands in RUN."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    assert main(["export", str(run / "checkpoints" / "step-00000002"), "--onnx"]) == 0
    assert "onnx-reference" in capsys.readouterr().out
    assert (run / "model.onnx").is_file()


def test_conditional_network_exports_its_class_input(tmp_path: Path, image_dir: Path) -> None:
    from ddpm.export import export_onnx

    run = _run(tmp_path, image_dir, num_classes=3)
    res = export_onnx(run, tmp_path / "c.onnx")
    assert res.inputs == ("x_t", "t", "cond") and res.max_abs_err <= 1e-4
    net = load_model(run).net.float()
    with torch.no_grad():  # make the classes matter more than the tiny initial table does
        net.class_emb.weight.mul_(50)
    res = export_onnx(run, tmp_path / "c.onnx")  # the run on disk is unchanged: re-export it
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([3.0, 3.0, 11.0, 11.0])
    outs = []
    for c in (0, 3):  # a class and the null class
        cond = torch.full((4,), c, dtype=torch.long)
        with torch.no_grad():
            want = load_model(run).net(x, t, cond).numpy()
        got = _onnx_out(res.path, x_t=x.numpy(), t=t.numpy(), cond=cond.numpy())
        np.testing.assert_allclose(got, want, atol=1e-4)
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 1e-6  # the class input reaches the output


def test_a_graph_that_does_not_match_is_not_written(run: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    import ddpm.export as ex

    out = run.parent / "kept.onnx"
    out.write_bytes(b"an earlier export")
    real = ex.run_onnx
    monkeypatch.setattr(ex, "run_onnx", lambda data, inputs: (real(data, inputs)[0] + 1e-2, "broken"))
    assert main(["export", str(run), "--onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the exported graph differs from PyTorch by 1.00e-02") and err.count("\n") == 1
    assert out.read_bytes() == b"an earlier export"


def test_bad_input_is_one_line(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("x")
    cases = [
        (["export", str(tmp_path), "--onnx"], "holds no checkpoints"),
        (["export", str(tmp_path / "missing"), "--onnx"], "no run or checkpoint"),
        (["export", str(run)], "choose a format: --onnx"),
        (["export", str(run), "--onnx", "--out", str(tmp_path)], "it is a folder"),
        (["export", str(run), "--onnx", "--out", str(tmp_path / "notes.txt" / "m.onnx")], "is a file, not a folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert (tmp_path / "notes.txt").read_text() == "x"
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", str(run), "--onnx"]) == 2
    assert capsys.readouterr().err == "error: ONNX export needs the onnx package: pip install 'ddpm[export]'\n"

"""diffusers models in and out, on tiny UNet2DModels the tests build and save (random weights):
a pipeline folder read as a run (its network equals diffusers' own to 1e-5, its betas are the
scheduler's, DDIM at eta 0 and the learned_range step agree with diffusers' schedulers), every
command on such a folder, the diffusers-unet network trained and exported back (export
--diffusers: DDPMPipeline.from_pretrained loads it), and the one-line refusals."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers", reason="the diffusers tests need ddpm[diffusers]")

from ddpm.checkpoint import load_checkpoint  # noqa: E402
from ddpm.cli import main  # noqa: E402
from ddpm.core.diffusion import p_log_variance, q_posterior  # noqa: E402
from ddpm.samplers import SamplerOptions  # noqa: E402
from ddpm.samplers.base import t_batch  # noqa: E402
from ddpm.samplers.ddim import sample as ddim_sample  # noqa: E402
from ddpm.sampling.generate import load_model  # noqa: E402

NET_TOL = 1e-5  # max |ddpm - diffusers| of the network's output (both float32, the same weights)
DDIM_TOL = 1e-4  # max |ddpm - diffusers| of the final image of 10 DDIM steps at eta 0 (values in about [-3, 3])
STEP_TOL = 1e-4  # one ancestral step with learned_range variances, the same noise (diffusers computes in float32)
TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
# the smallest diffusers-unet network of the command (the flags of its config)
TINY_FLAGS = ["--block-out-channels", "8,16", "--norm-num-groups", "4", "--attention-head-dim", "4",
              "--down-block-types", "DownBlock2D,AttnDownBlock2D", "--up-block-types", "AttnUpBlock2D,UpBlock2D"]


def make_pipeline(folder: Path, *, channels: int = 1, size: int = 8, classes: int = 0, learned: bool = False,
                  T: int = 50, ddim: bool = False, seed: int = 0, **scheduler: object) -> Path:
    """A tiny DDPMPipeline (DDIMPipeline) folder with random weights; ``classes`` > 0: that many
    classes and the null label (num_class_embeds = classes + 1)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels * (1 + learned),
                                 num_class_embeds=classes + 1 if classes else None, **TINY)
    with torch.no_grad():  # a random network whose output is not near 0 everywhere
        unet.conv_out.weight.normal_(0, 0.3)
    kw = {"num_train_timesteps": T, "variance_type": "learned_range" if learned else "fixed_small", **scheduler}
    if ddim:
        kw.pop("variance_type")
        pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**kw))
    else:
        pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**kw))
    pipe.save_pretrained(str(folder))
    return folder


def one_error_line(capsys: pytest.CaptureFixture, message: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def npz(folder: Path) -> np.ndarray:
    return np.load(folder / "samples.npz")["images"]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("diffusers")
    return {"grey": make_pipeline(tmp / "grey"), "rgb-cond": make_pipeline(tmp / "rgb-cond", channels=3, classes=3),
            "tmp": tmp}


# ---------------------------------------------------------------- in: the pipeline as a run

@pytest.mark.parametrize("kind", ["grey", "rgb-cond"])
def test_the_network_through_ddpm_is_diffusers_own(folders, kind) -> None:
    folder = folders[kind]
    model = load_model(folder)
    unet = diffusers.UNet2DModel.from_pretrained(str(folder / "unet")).eval()
    c, m = unet.config.in_channels, unet.config.num_class_embeds
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, c, 8, 8, generator=g), torch.tensor([0, 17, 49])
    labels = torch.tensor([0, 2, 3]) if m else None
    with torch.no_grad():
        ours = model.net(x, t, labels) if m else model.net(x, t)
        theirs = unet(x, t, class_labels=labels).sample
        assert (ours - theirs).abs().max() <= NET_TOL
        if m:  # no label: the null one, the last embedding (M - 1)
            null = unet(x, t, class_labels=torch.full((3,), m - 1)).sample
            assert (model.net(x, t) - null).abs().max() <= NET_TOL
    cfg = model.config
    assert cfg.model.arch == "diffusers-unet" and cfg.model.num_classes == (m - 1 if m else 0)
    assert cfg.data.source == "unknown (a diffusers pipeline)" and cfg.diffusion.process == "vp"


@pytest.mark.parametrize("scheduler", [{"beta_schedule": "linear", "beta_start": 2e-4, "beta_end": 0.03},
                                       {"beta_schedule": "scaled_linear"}, {"beta_schedule": "squaredcos_cap_v2"},
                                       {"trained_betas": list(np.linspace(1e-3, 0.2, 50))},
                                       {"prediction_type": "v_prediction"}, {"prediction_type": "sample"}])
def test_the_schedulers_betas_and_prediction_become_the_run(folders, scheduler) -> None:
    folder = folders["tmp"] / f"s{abs(hash(json.dumps(scheduler))) % 10**8}"
    make_pipeline(folder, **scheduler)
    cfg = load_checkpoint(folder).config
    ref = diffusers.DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    assert torch.equal(torch.tensor(cfg.diffusion.betas, dtype=torch.float64), ref.betas.double())
    assert cfg.diffusion.timesteps == 50
    ab = load_model(folder).schedule.alpha_bar
    assert (ab - ref.alphas_cumprod.double()).abs().max() <= 1e-6  # float64 here, float32 there
    want = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[scheduler.get("prediction_type", "epsilon")]
    assert cfg.diffusion.objective == want


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_at_eta_0_ends_at_diffusers_image(folders, prediction) -> None:
    """ddpm's ddim on --spacing trailing visits exactly the DDIMScheduler's timestep_spacing
    "trailing" (T a multiple of the steps); both without clipping, from the same noise."""
    folder = make_pipeline(folders["tmp"] / f"ddim-{prediction}", ddim=True, T=100, prediction_type=prediction,
                           timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    model = load_model(folder)
    plan = model.plan("ddim", 10, "trailing")
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = ddim_sample(model.denoiser(clip="none"), x_T, plan.timesteps, options=SamplerOptions(0.0, None))
    pipe = diffusers.DDIMPipeline.from_pretrained(str(folder))
    pipe.scheduler.set_timesteps(10)
    assert sorted(pipe.scheduler.timesteps.tolist()) == plan.timesteps
    x = x_T.clone()
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(pipe.unet(x, t).sample, t, x, eta=0.0).prev_sample
    assert (ours - x).abs().max() <= DDIM_TOL, float((ours - x).abs().max())


def test_learned_range_variances_are_the_ddpm_schedulers_step(folders) -> None:
    folder = make_pipeline(folders["tmp"] / "learned", learned=True, clip_sample=False)
    model = load_model(folder)
    assert model.config.model.learn_sigma
    pipe = diffusers.DDPMPipeline.from_pretrained(str(folder))
    den, sched = model.denoiser(clip="none"), model.schedule
    for t in (1, 20, 49):
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            out = pipe.unet(x, t).sample
            theirs = pipe.scheduler.step(out, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
            pred, tt = den(x, t_batch(t, x)), t_batch(t, x)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        logvar = p_log_variance(sched, tt, 4, variance="learned", var_frac=pred.var_frac)
        ours = q_posterior(sched, pred.x0, x, tt).mean + torch.exp(0.5 * logvar) * z
        assert (ours - theirs).abs().max() <= STEP_TOL, (t, float((ours - theirs).abs().max()))


# ---------------------------------------------------------------- in: every command on a pipeline folder

def test_sample_inpaint_edit_on_a_pipeline_folder(folders, capsys) -> None:
    folder, tmp = folders["rgb-cond"], folders["tmp"]
    before = files_of(folder)
    assert main(["sample", str(folder), "--n", "3", "--sampler", "ddim", "--steps", "4", "--class", "2",
                 "--guidance", "1"]) == 0
    assert npz(folder / "samples").shape == (3, 3, 8, 8)  # the default: DIR/samples
    image = tmp / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(image)
    mask = np.full((8, 8), 255, np.uint8)
    mask[:, 4:] = 0
    Image.fromarray(mask).save(tmp / "mask.png")
    assert main(["inpaint", str(folder), "--image", str(image), "--mask", str(tmp / "mask.png"), "--n", "2",
                 "--sampler", "ddim", "--steps", "4", "--out", str(tmp / "inpaint")]) == 0
    assert (npz(tmp / "inpaint")[:, :, :, :4] == np.asarray(Image.open(image)).transpose(2, 0, 1)[:, :, :4]).all()
    assert main(["edit", str(folder), "--image", str(image), "--strength", "0.5", "--n", "2", "--sampler", "ddim",
                 "--steps", "4", "--out", str(tmp / "edit")]) == 0
    assert npz(tmp / "edit").shape == (2, 3, 8, 8)
    after = files_of(folder)
    assert {k: v for k, v in after.items() if not k.startswith("samples/")} == before  # the pipeline's own, untouched


def test_eval_of_a_pipeline_folder(folders, capsys) -> None:
    tmp = folders["tmp"]
    capsys.readouterr()
    assert main(["eval", str(folders["rgb-cond"]), "--n", "2", "--out", str(tmp / "no-eval")]) == 2
    one_error_line(capsys, "images of unknown (a diffusers pipeline): the shipped FD-FMNIST features measure only")
    assert not (tmp / "no-eval").exists()
    grey = make_pipeline(tmp / "grey28", size=28)  # 1x28x28 grey: measured with the FD-FMNIST features
    ref = tmp / "ref.npz"
    np.savez(ref, images=np.random.default_rng(0).integers(0, 255, (16, 1, 28, 28), dtype=np.uint8))
    assert main(["eval", str(grey), "--n", "8", "--sampler", "ddim", "--steps", "2", "--reference", str(ref),
                 "--no-progress"]) == 0
    reports = list((grey / "samples").glob("eval-*.json"))  # the default: DIR/samples
    assert len(reports) == 1 and json.loads(reports[0].read_text())["n_samples"] == 8
    assert load_checkpoint(grey).config.data.source == "fashion-mnist"


def test_distill_a_pipeline_teacher(folders) -> None:
    tmp = folders["tmp"]
    data = tmp / "distill-data"
    for k in range(3):  # the teacher's three classes, one folder each
        (data / f"c{k}").mkdir(parents=True)
        for i in range(4):
            arr = np.random.default_rng(10 * k + i).integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(arr).save(data / f"c{k}" / f"{i}.png")
    student = tmp / "student"
    assert main(["distill", str(folders["rgb-cond"]), "--out", str(student), "--dataset", str(data),
                 "--teacher-steps", "4", "--student-steps", "2", "--steps-per-round", "2", "--batch-size", "4",
                 "--no-progress", "--device", "cpu"]) == 0
    assert json.loads((student / "config.json").read_text())["model"]["arch"] == "diffusers-unet"
    assert main(["sample", str(student), "--n", "2", "--class", "1", "--out", str(tmp / "student-s")]) == 0
    assert npz(tmp / "student-s").shape == (2, 3, 8, 8)


def test_the_web_page_lists_and_samples_a_pipeline_folder(folders) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    from ddpm.ui.app import create_app
    from ddpm.ui.runs import RunIndex

    runs = folders["tmp"] / "ui-runs"
    make_pipeline(runs / "pipe", channels=3)
    client = TestClient(create_app(RunIndex([], runs)), base_url="http://127.0.0.1:8000",
                        headers={"X-DDPM-Token": ""})
    info = client.get("/api/runs").json()["runs"]
    assert [r["name"] for r in info] == ["pipe"] and info[0]["channels"] == 3 and info[0]["T"] == 50
    r = client.post("/api/sample", json={"run": "pipe", "sampler": "ddim", "steps": 3, "n": 2})
    assert r.status_code == 201, r.text
    with client.stream("GET", f"/api/jobs/{r.json()['id']}/events") as ev:
        last = [json.loads(line[6:]) for line in ev.iter_lines() if line.startswith("data: ")][-1]
    assert last["type"] == "done", last


# ---------------------------------------------------------------- out: the diffusers-unet network, exported

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("diffusers-run")
    data = tmp / "data"
    for k in range(2):
        (data / f"c{k}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.random.default_rng(10 * k + i).integers(0, 255, (8, 8), dtype=np.uint8)).save(
                data / f"c{k}" / f"{i}.png")
    run = tmp / "run"
    assert main(["train", "--preset", "diffusers-unet-cond", *TINY_FLAGS, "--num-classes", "2", "--dataset", str(data), "--image-size",
                 "8", "--batch-size", "4", "--max-steps", "4", "--minutes", "none", "--checkpoint-every", "2",
                 "--precision", "fp32", "--out", str(run), "--no-progress", "--no-tensorboard", "--device",
                 "cpu"]) == 0
    return run, tmp


def test_training_resumes_exactly(trained) -> None:
    run, tmp = trained
    half = tmp / "half"
    args = ["train", "--config", str(run / "config.json"), "--no-progress", "--no-tensorboard", "--device", "cpu"]
    assert main([*args, "--max-steps", "2", "--out", str(half)]) == 0
    assert main(["train", "--out", str(half), "--resume", "--max-steps", "4", "--no-progress",
                 "--no-tensorboard", "--device", "cpu"]) == 0
    a, b = load_checkpoint(run), load_checkpoint(half)
    assert a.step == b.step == 4 and a.ema is not None
    assert all(torch.equal(a.model[k], b.model[k]) and torch.equal(a.ema[k], b.ema[k]) for k in a.model)


def test_export_round_trip(trained, capsys) -> None:
    run, tmp = trained
    out = tmp / "exported"
    assert main(["export", str(run), "--diffusers", str(out)]) == 0
    assert "max |diffusers - ddpm|" in capsys.readouterr().out
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
    model = load_model(run)
    x, t, labels = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 40]), \
        torch.tensor([0, 2])  # 2: the null label
    with torch.no_grad():
        assert (pipe.unet(x, t, class_labels=labels).sample - model.net(x, t, labels)).abs().max() <= NET_TOL
    s = pipe.scheduler
    assert torch.allclose(s.alphas_cumprod.double(), model.schedule.alpha_bar.double(), atol=1e-6)
    assert s.config.prediction_type == "v_prediction" and pipe.unet.config.num_class_embeds == 3
    # DDPMPipeline's loop passes no class labels: a conditional UNet samples in a loop of one's own
    s.set_timesteps(2)
    x_t = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for step in s.timesteps:
            x_t = s.step(pipe.unet(x_t, step, class_labels=torch.tensor([1])).sample, step, x_t).prev_sample
    assert torch.isfinite(x_t).all()
    back = load_model(out)  # and it comes back in as a pipeline folder
    with torch.no_grad():
        assert (back.net(x, t, labels) - model.net(x, t, labels)).abs().max() <= NET_TOL
    capsys.readouterr()
    assert main(["export", str(run), "--diffusers", str(out)]) == 2  # an existing, non-empty folder
    one_error_line(capsys, "already exists and is not an empty folder")
    assert not list(tmp.glob(".exported.tmp*"))


# ---------------------------------------------------------------- refusals: one line, exit 2, nothing written

@pytest.mark.parametrize("key,value,message", [
    ("clip_sample_range", 2.0, "scheduler_config.json: clip_sample_range 2.0 is not supported"),
    ("thresholding", True, "scheduler_config.json: thresholding True is not supported"),
    ("variance_type", "learned", "scheduler_config.json: variance_type 'learned' is not supported"),
    ("rescale_betas_zero_snr", True, "rescale_betas_zero_snr True is not supported"),
    ("_class_name", "EulerDiscreteScheduler", "_class_name 'EulerDiscreteScheduler' is not supported"),
    ("unet:time_embedding_type", "fourier", "unet/config.json: time_embedding_type 'fourier' is not supported"),
])
def test_what_does_not_map_is_one_line(folders, capsys, key, value, message) -> None:
    folder = folders["tmp"] / f"bad-{key.replace(':', '-')}"
    make_pipeline(folder)
    part, key = ("unet/config.json", key[5:]) if key.startswith("unet:") else ("scheduler/scheduler_config.json", key)
    d = json.loads((folder / part).read_text())
    (folder / part).write_text(json.dumps({**d, key: value}))
    before = files_of(folder)
    capsys.readouterr()
    assert main(["sample", str(folder), "--n", "1", "--steps", "2"]) == 2
    one_error_line(capsys, message)
    assert files_of(folder) == before


def test_export_refuses_what_diffusers_has_not(tmp_path, capsys) -> None:
    from helpers import make_images, tiny_config, write_config

    data = make_images((tmp_path / "data").mkdir() or tmp_path / "data", n=8, size=8)
    cfg = write_config(tmp_path / "cfg.json", tiny_config(data, max_steps=1))
    plain = tmp_path / "plain"  # an unconditional diffusers-unet run: DDPMPipeline's own loop samples it
    assert main(["train", "--config", str(cfg), "--arch", "diffusers-unet", *TINY_FLAGS, "--out", str(plain),
                 "--no-progress", "--no-tensorboard", "--device", "cpu"]) == 0
    assert main(["export", str(plain), "--diffusers", str(tmp_path / "plain-out")]) == 0
    images = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "plain-out"))(
        batch_size=1, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 8, 8, 1) and np.isfinite(images).all()
    for name, flags, message in [
            ("unet", [], "export --diffusers: the unet network (U-Net) is not a diffusers model"),
            ("edm", ["--arch", "diffusers-unet", *TINY_FLAGS, "--process", "edm", "--objective", "edm",
                     "--t-sampling", "lognormal", "--loss", "l2"],
             "export --diffusers: diffusers has no DDPMScheduler for the edm process")]:
        run = tmp_path / name
        assert main(["train", "--config", str(cfg), *flags, "--out", str(run), "--no-progress",
                     "--no-tensorboard", "--device", "cpu"]) == 0
        capsys.readouterr()
        assert main(["export", str(run), "--diffusers", str(tmp_path / f"out-{name}")]) == 2
        one_error_line(capsys, message)
        assert not (tmp_path / f"out-{name}").exists() and not list(tmp_path.glob(f".out-{name}*"))


def test_without_diffusers_installed_it_is_one_line(folders, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    capsys.readouterr()
    assert main(["sample", str(folders["grey"]), "--n", "1", "--out", str(tmp_path / "s")]) == 2
    one_error_line(capsys, "needs the diffusers package: pip install 'ddpm[diffusers]'")
    assert main(["train", "--preset", "diffusers-unet", "--out", str(tmp_path / "run"), "--max-steps", "1",
                 "--no-progress"]) == 2
    one_error_line(capsys, "the diffusers-unet network needs the diffusers package: pip install 'ddpm[diffusers]'")
    assert not (tmp_path / "s").exists() and not (tmp_path / "run").exists()

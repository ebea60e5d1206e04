"""ONNX Runtime (fp32, and static int8 QDQ) and OpenVINO against eager PyTorch as the engine of sampling.

    PYTHONPATH=src python bench/engines.py --threads 1 --error-run runs/ref-fast

The seed's network (``preset("seed").model``, random weights: speed does not depend on them)
exported with :func:`ddpm.export.to_onnx`. Contenders, called in turns in one process:
  eager_cl     our ancestral sampler (DDPM Algorithm 2) on the eager network, channels-last fp32
               (what `ddpm sample` runs today)
  ort_fp32     the same sampler with the network run by an ONNX Runtime session (CPU provider,
               all graph optimisations, intra-op threads = torch's)
  ort_int8     the same with the graph quantised statically, QDQ, per-channel int8 weights and
               uint8 activations, calibrated (min-max) on the network's own inputs:
               x_t = q_sample(Fashion-MNIST images, t) at t uniform over the T steps
  eager_cl_bf16 (``--bf16``) eager_cl under bf16 autocast (``--precision bf16``), meant for CPUs with
               native bfloat16
  ov_fp32      (``--openvino``; ``pip install openvino``) the sampler with the network compiled by
               OpenVINO's CPU plugin from the same ONNX graph, inference precision f32
  ov_bf16      (``--openvino --bf16``, for CPUs with native bfloat16) the same at inference precision
               bf16, OpenVINO's own default on such CPUs
  ov_int8      (``--openvino-int8``; ``pip install nncf``) the graph quantised to int8 by NNCF's
               post-training quantisation, calibrated on the same inputs as ort_int8
  compiled     (``--compile``) eager_cl's sampler on ``torch.compile(net)`` (Inductor, with
               ``freezing``: weights folded and convolutions pre-packed for oneDNN, as for inference)
  reference    the seed's own loop (p_sample, then .cpu().numpy()), from seed_reference.py
  conv_gemm    a 2048^3 fp32 GEMM as a 1x1 convolution (oneDNN): the machine's GEMM rate
Each sampler contender runs ``--iters`` of the 200 iterations at 64 images. Reported: images/s
scaled to 200 steps, ratios (median of per-round ratios), the fraction of the GEMM rate
(forward FLOPs x iterations / time, over the same round's GEMM rate), and int8's relative RMS error
against fp32 on held-out network inputs (``--error-run RUN``: also on a trained network), and
the same error for each OpenVINO and bf16 contender against eager fp32. ``--malloc command`` first makes glibc keep freed blocks, as the `ddpm` command does (for every
contender, the seed's loop included). Writes RESULTS/engines.json (``--out NAME``: NAME.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import RESULTS, interleave, load_reference, median, ratio, write_record
from throughput import machine, matmul, our_sampler, reference_sampler
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ddpm import preset
from ddpm.runtime.env import keep_freed_memory, process_settings
from ddpm.core.diffusion import q_sample
from ddpm.data import load_fashion_mnist
from ddpm.data.readers import to_model_range
from ddpm.export import to_onnx
from ddpm.nn import build_network
from ddpm.sampling import make_schedule

N = 64


class OrtNet(nn.Module):
    """An ONNX Runtime session behind the network's call signature (x_t, t) -> out."""

    def __init__(self, session):
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feed = {"x_t": x.contiguous().numpy(), "t": t.float().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])


class OvNet(nn.Module):
    """An OpenVINO compiled model behind the network's call signature (x_t, t) -> out."""

    def __init__(self, compiled):
        super().__init__()
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.request.infer([x.contiguous().numpy(), t.float().numpy()])
        return torch.from_numpy(out[self.compiled.output(0)].copy())


def openvino_nets(onnx: bytes, threads: int, bf16: bool, feeds: list[dict[str, np.ndarray]] | None,
                  ) -> dict[str, OvNet]:
    """The ONNX graph compiled by OpenVINO for the CPU at f32, where asked at bf16, and where
    ``feeds`` are given int8: NNCF's post-training quantisation (OpenVINO's own), calibrated on
    those inputs, run at f32 for what is left in floating point."""
    try:
        import openvino as ov
    except ImportError:
        sys.exit("--openvino needs the openvino package: pip install openvino")
    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.onnx"
        path.write_bytes(onnx)
        model = core.read_model(str(path))
    models = [("ov_fp32", model, "f32"), *([("ov_bf16", model, "bf16")] if bf16 else [])]
    if feeds is not None:
        try:
            import nncf
        except ImportError:
            sys.exit("--openvino-int8 needs the nncf package: pip install nncf")
        data = nncf.Dataset([[f["x_t"], f["t"]] for f in feeds])
        models.append(("ov_int8", nncf.quantize(model, data, subset_size=len(feeds)), "f32"))  # every batch
    return {name: OvNet(core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": prec, "PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_NUM_THREADS": threads}))
            for name, m, prec in models}


def output_error(net: nn.Module, other: nn.Module, feeds: list[dict[str, np.ndarray]]) -> dict:
    """Relative RMS error of ``other``'s output against ``net``'s on held-out inputs."""
    num = den = 0.0
    with torch.inference_mode():
        for f in feeds:
            x, t = torch.from_numpy(f["x_t"]), torch.from_numpy(f["t"]).long()
            a, b = net(x, t).float(), other(x, t).float()
            num, den = num + float(((a - b) ** 2).sum()), den + float((a ** 2).sum())
    return {"relative_rms_error": (num / den) ** 0.5, "inputs": sum(len(f["t"]) for f in feeds)}


class Bf16Net(nn.Module):
    """The network under bf16 autocast, returning fp32 (as `--precision bf16` runs it)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x, t).float()


def session(data: bytes):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def calibration_inputs(cfg, batches: int, batch: int) -> list[dict[str, np.ndarray]]:
    """The network's own inputs: Fashion-MNIST images noised to x_t at t uniform over T."""
    sched = make_schedule(cfg)
    gen = torch.Generator().manual_seed(1)
    images = load_fashion_mnist()
    feeds = []
    for _ in range(batches):
        x0 = to_model_range(images[torch.randint(0, len(images), (batch,), generator=gen)])
        t = torch.randint(0, sched.T, (batch,), generator=gen)
        x_t = q_sample(sched, x0, t, torch.randn(x0.shape, generator=gen))
        feeds.append({"x_t": x_t.numpy(), "t": t.float().numpy()})
    return feeds


def quantize_int8(fp32: bytes, feeds: list[dict[str, np.ndarray]]) -> bytes:
    """Static QDQ quantisation, per-channel int8 weights, uint8 activations, min-max calibrated."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)  # it fails on dynamic Reshape
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return dst.read_bytes()


def int8_error(fp32, int8, feeds: list[dict[str, np.ndarray]]) -> dict:
    """Relative RMS error of int8's output against fp32's on held-out network inputs."""
    return output_error(OrtNet(fp32), OrtNet(int8), feeds)


def trained_network(run: str) -> tuple:
    """A trained run's network (contiguous, eval), its config, step and inputs: random weights
    say little about an engine's error."""
    from ddpm.sampling import load_model
    lm = load_model(run)
    return lm.net.to(memory_format=torch.contiguous_format).eval(), lm, calibration_inputs(lm.config, 10, 16)


def trained_int8_error(run: str) -> dict:
    """int8 against fp32 on a trained run's network."""
    net, lm, feeds = trained_network(run)
    fp32 = to_onnx(net, lm.config)
    out = int8_error(session(fp32), session(quantize_int8(fp32, feeds[:8])), feeds[8:])
    return {"run": run, "step": lm.step, **out}


def trained_extra_errors(run: str, bf16: bool, openvino: bool, openvino_int8: bool) -> dict:
    """Each bf16 / OpenVINO contender's output error against eager fp32 on a trained run's network."""
    net, lm, feeds = trained_network(run)
    extra: dict[str, nn.Module] = {"eager_cl_bf16": Bf16Net(net)} if bf16 else {}
    if openvino:
        extra |= openvino_nets(to_onnx(net, lm.config), torch.get_num_threads(), bf16,
                               feeds[:8] if openvino_int8 else None)
    return {"run": run, "step": lm.step, **{k: output_error(net, m, feeds[8:]) for k, m in extra.items()}}


def forward_flops(net: nn.Module) -> int:
    x = torch.randn(N, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        net(x, torch.randint(0, 200, (N,)))
    return fc.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2, help="timed sampler iterations of the 200")
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads (default torch's)")
    ap.add_argument("--error-run", help="also int8's (and each bf16 / OpenVINO contender's) error on this trained "
                    "run's network")
    ap.add_argument("--malloc", choices=["glibc", "command"], default="glibc",
                    help="command: glibc keeps freed blocks, as the ddpm command sets it (every contender)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile(net) (Inductor, freezing)")
    ap.add_argument("--no-ort", action="store_true", help="leave ONNX Runtime out (fp32 and int8)")
    ap.add_argument("--openvino", action="store_true", help="also OpenVINO (f32; and bf16 with --bf16)")
    ap.add_argument("--openvino-int8", action="store_true", help="also OpenVINO int8 (NNCF post-training quantisation)")
    ap.add_argument("--bf16", action="store_true", help="also eager bf16 autocast (and OpenVINO bf16)")
    ap.add_argument("--out", default="engines", help="name of the JSON in RESULTS/")
    a = ap.parse_args()
    if a.malloc == "command" and not keep_freed_memory():
        sys.exit("glibc's mallopt is not available here")
    cpu = torch.device("cpu")
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    net = build_network(preset("seed").model).eval()
    fp32 = to_onnx(net, preset("seed"))
    net_cl = net.to(memory_format=torch.channels_last)
    feeds = calibration_inputs(preset("seed"), 10, 16)
    sessions = {} if a.no_ort else {"ort_fp32": session(fp32)}
    if not a.no_int8 and not a.no_ort:
        sessions["ort_int8"] = session(quantize_int8(fp32, feeds[:8]))
    trained = trained_int8_error(a.error_run) if a.error_run and not a.no_int8 else None  # fails early
    ref = load_reference()
    torch.manual_seed(0)
    ref_model = ref.make_model().eval()
    _, conv, gemm_flops, _ = matmul(cpu)
    compiled = {}
    if a.compile:
        import torch._inductor.config as inductor
        inductor.freezing = True
        t_c = time.perf_counter()
        cnet = torch.compile(net_cl)
        with torch.inference_mode():  # compile outside the timed rounds
            cnet(torch.randn(N, 1, 28, 28).contiguous(memory_format=torch.channels_last), torch.randint(0, 200, (N,)))
        compiled = {"compiled": our_sampler(cnet, a.iters, True, cpu)}
        compile_seconds = time.perf_counter() - t_c
    extra: dict[str, nn.Module] = {}
    if a.bf16:
        extra["eager_cl_bf16"] = Bf16Net(net_cl)
    if a.openvino:
        extra |= openvino_nets(fp32, torch.get_num_threads(), a.bf16, feeds[:8] if a.openvino_int8 else None)
    runs = {"eager_cl": our_sampler(net_cl, a.iters, True, cpu), **compiled,
            **{k: our_sampler(OrtNet(s), a.iters, False, cpu) for k, s in sessions.items()},
            **{k: our_sampler(m, a.iters, k == "eager_cl_bf16", cpu) for k, m in extra.items()},
            "reference": reference_sampler(ref, ref_model, a.iters, cpu), "conv_gemm": conv}
    times = interleave(runs, rounds=a.rounds)
    flops = forward_flops(net_cl) * a.iters
    res: dict = {"machine": machine(cpu), "command": " ".join(["python", "bench/engines.py", *sys.argv[1:]]),
                 "n": N, "steps": 200, "timed_iterations": a.iters, "rounds": a.rounds,
                 "forward_gflop": flops / a.iters / 1e9, **process_settings(),
                 "gemm_gflop_per_s": gemm_flops / median(times["conv_gemm"]) / 1e9}
    for k in runs:
        if k == "conv_gemm":
            continue
        res[f"{k}_img_per_s"] = N / (median(times[k]) / a.iters * 200)
        res[f"{k}_over_reference"] = ratio(times, k, "reference")
        res[f"{k}_over_eager_cl"] = ratio(times, k, "eager_cl")
        if k != "reference":
            res[f"{k}_fraction_of_gemm"] = statistics.median(
                (flops / t) / (gemm_flops / g) for t, g in zip(times[k], times["conv_gemm"]))
    if a.compile:
        res["compile_seconds"] = compile_seconds
    for k, m in extra.items():
        res[f"{k}_error_vs_eager_fp32"] = output_error(net, m, feeds[8:])
    if a.error_run and extra:
        res["errors_vs_eager_fp32_trained"] = trained_extra_errors(a.error_run, a.bf16, a.openvino, a.openvino_int8)
    if "ort_int8" in sessions:
        res["int8_vs_fp32"] = int8_error(sessions["ort_fp32"], sessions["ort_int8"], feeds[8:])
        if a.error_run:
            res["int8_vs_fp32_trained"] = trained
    res["seconds"] = {k: [round(x, 4) for x in v] for k, v in times.items()}
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["wall_seconds"] = time.perf_counter() - t0
    write_record(RESULTS / f"{a.out}.json", res)
    print(json.dumps({k: v for k, v in res.items() if k != "seconds"}, indent=2))


if __name__ == "__main__":
    main()

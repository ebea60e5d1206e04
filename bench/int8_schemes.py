"""NNCF int8 schemes for OpenVINO, side by side: speed of one forward and output error.

    ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI python bench/int8_schemes.py --run RUN --name int8_schemes_vnni

For two networks, the seed's (``preset("seed").model``, random weights, batch 64, calibrated on
noised Fashion-MNIST images as in ``bench/engines.py``) and a trained run's (batch 250, calibrated
as ``ddpm.engines`` does, on its own sampling's inputs): OpenVINO f32 and NNCF's int8 under its
default scheme, MIXED (asymmetric activations), TRANSFORMER (SmoothQuant; attention's products
kept apart) and both, each timed as the best of 3 means of 5 inferences, in turns, and (the
trained network) its relative RMS output error against eager fp32 on held-out noised images.
Writes RESULTS/NAME.json.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from engines import OvNet, calibration_inputs, output_error
from harness import RESULTS, cpu_info, write_record

from ddpm import engines as E
from ddpm import preset
from ddpm.config import SampleConfig
from ddpm.export import to_onnx
from ddpm.nn import build_network
from ddpm.sampling.generate import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a trained unconditional run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", required=True)
    a = ap.parse_args()
    import nncf
    import openvino as ov
    torch.set_num_threads(a.threads)
    core = ov.Core()
    lm = load_model(a.run, device="cpu")
    net = lm.net.float().to(memory_format=torch.contiguous_format).eval()
    held = calibration_inputs(lm.config, 30, 16)[8:]
    own = E.calibration_inputs(lm, SampleConfig(sampler="ddpm", steps=100, n=1000, clip="clip"))
    seed_net = build_network(preset("seed").model).eval()
    seed_cal = [[f["x_t"], f["t"]] for f in calibration_inputs(preset("seed"), 8, 16)]
    schemes = {"f32": None, "default": {}, "mixed": {"preset": nncf.QuantizationPreset.MIXED},
               "transformer": {"model_type": nncf.ModelType.TRANSFORMER},
               "transformer_mixed": {"model_type": nncf.ModelType.TRANSFORMER, "preset": nncf.QuantizationPreset.MIXED}}
    rows = []
    for tag, n, cfg, cal, batch in [("seed", seed_net, preset("seed"), seed_cal, 64),
                                    ("trained", net, lm.config, own, 250)]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "net.onnx"
            path.write_bytes(to_onnx(n, cfg))
            graph = core.read_model(str(path))
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, 1, 28, 28), dtype=np.float32)
        t = rng.integers(0, cfg.diffusion.timesteps, batch).astype(np.float32)
        compiled = {}
        for name, kw in schemes.items():
            with contextlib.redirect_stdout(io.StringIO()):
                g = graph if kw is None else nncf.quantize(graph, nncf.Dataset(cal), subset_size=len(cal), **kw)
            compiled[name] = core.compile_model(g, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT":
                                                           "LATENCY", "INFERENCE_NUM_THREADS": a.threads})
        best = {k: float("inf") for k in compiled}
        for _ in range(3):  # in turns
            for name, c in compiled.items():
                r = c.create_infer_request()
                r.infer([x, t])
                t0 = time.perf_counter()
                for _ in range(5):
                    r.infer([x, t])
                best[name] = min(best[name], (time.perf_counter() - t0) / 5)
        for name, c in compiled.items():
            row = {"network": tag, "batch": batch, "scheme": name, "seconds_per_forward": round(best[name], 5),
                   "speedup_over_ov_f32": round(best["f32"] / best[name], 3)}
            if tag == "trained":
                row["relative_rms_error"] = round(output_error(net, OvNet(c), held)["relative_rms_error"], 5)
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = RESULTS / f"{a.name}.json"
    write_record(out, {"command": "python bench/int8_schemes.py " + " ".join(sys.argv[1:]), "run": a.run,
                               "train_step": lm.step, "machine": {"threads": a.threads, **cpu_info()},
                               "onednn_max_cpu_isa": __import__("os").environ.get("ONEDNN_MAX_CPU_ISA"),
                               "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

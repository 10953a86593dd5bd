"""The four ways bench/merged_inference.py scores images with one trained run, each a function
from host uint8 NHWC pixels (what `--mode predict` ships) to host P(fake), so every row
is timed over the same work: host batch in, probabilities back on the host.

  decomposed  what `--mode predict` runs: `scoring.make_predict_fn` on the run's decomposed
              detector (W_s x + x U diag(s) V^T per projection), restored from the workdir
  merged      the same predict function on the detector after `decompose.merge`, the dense
              weights `--mode export` writes (W = W_s + U diag(s) V^T), still in JAX
  torch       the export folder read by `transformers.CLIPVisionModel` + the head from
              head.safetensors, normalised from detector.json's mean/std, eager PyTorch
  onnx        that same torch module through `torch.onnx.export`, run by ONNX Runtime

JAX, torch and onnxruntime are imported inside the builders: the bench runs each framework
in its own process (DESIGN.md §3: in one process their CPU thread pools disturb each other)
and pins threads before the first import; the test (tests/test_merged_inference.py) builds
all four in one process, where only correctness counts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]
ONNX_FILE = "detector.onnx"


def run_config(workdir: Path) -> Any:
    """The run's config, read back from WORKDIR/config.json onto config_base's schema.

    JSON turned the tuple fields into lists; each value is cast back to its default's type,
    so the config is the one training used (a field the schema lacks is refused, as on the
    command line)."""
    import ml_collections as mlc

    from fmsd_jax import atomic, config_base
    from fmsd_jax.run import workdir_files

    saved = atomic.read_json(Path(workdir) / workdir_files.CONFIG_JSON)
    cfg = config_base.base_config()

    def fill(node: mlc.ConfigDict, values: dict, where: str) -> None:
        for key, value in values.items():
            if key not in node:
                raise KeyError(f"{where}{key} of {workdir}'s config is not in config_base")
            if isinstance(node[key], mlc.ConfigDict):
                fill(node[key], value, f"{where}{key}.")
            elif isinstance(node[key], tuple) or isinstance(value, list):
                node[key] = tuple(value)
            else:
                node[key] = value

    fill(cfg, saved, "")
    config_base.apply_regime(cfg)
    cfg.lock()
    return cfg


def jax_paths(workdir: Path) -> dict[str, Predict]:
    """{'decomposed': predict's own path, 'merged': the same after decompose.merge}, on a
    one-device CPU mesh, restored from the workdir's best (else latest) checkpoint."""
    import jax
    from flax import nnx

    from fmsd_jax import parallel
    from fmsd_jax.evaluators import scoring
    from fmsd_jax.method import decompose as decomp
    from fmsd_jax.model.detector import HeadParam
    from fmsd_jax.run import factory, rebuild

    cfg = run_config(workdir)
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    run = rebuild.open_run(cfg, Path(workdir), mesh, estimate=False)
    trainable = rebuild.restore_trainable(cfg, Path(workdir), run, "benchmarking")

    def on_host(fn: Callable, first: Any, second: Any) -> Predict:
        def predict(images: np.ndarray) -> np.ndarray:
            batch = parallel.global_batch(mesh, {"image": images}, ("image",))
            return np.asarray(fn(first, second, batch["image"]))
        return predict

    paths = {"decomposed": on_host(scoring.make_predict_fn(run.graphdef, mesh), trainable,
                                   run.frozen)}
    detector = nnx.merge(run.graphdef, jax.device_get(trainable), jax.device_get(run.frozen))
    if factory.uses_decomposition(cfg):
        decomp.merge(detector)
    graphdef, head, rest = nnx.split(detector, HeadParam, ...)
    head, rest = parallel.shard_tree(mesh, head), parallel.shard_tree(mesh, rest)
    paths["merged"] = on_host(scoring.make_predict_fn(graphdef, mesh), head, rest)
    return paths


def torch_module(export_dir: Path, attn: str = "sdpa") -> Any:
    """The exported detector as a torch.nn.Module: uint8 NHWC pixels -> P(fake), in eval mode.

    Normalisation (x/255 - mean)/std is done inside, as x*scale + offset with the same
    constants our detector uses, so both sides start from the same uint8 bytes."""
    import torch
    import transformers
    from safetensors.torch import load_file

    from fmsd_jax.run import workdir_files

    meta = json.loads((Path(export_dir) / workdir_files.DETECTOR_JSON).read_text())
    if meta.get("feature") != "pooler_output":
        raise ValueError(f"{export_dir}: the head reads {meta.get('feature')!r}, not the "
                         "pooler_output this module feeds it")

    class ExportedDetector(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = transformers.CLIPVisionModel.from_pretrained(
                str(export_dir), attn_implementation=attn, dtype=torch.float32)
            self.head = torch.nn.Linear(self.tower.config.hidden_size, meta["num_classes"])
            self.head.load_state_dict(load_file(str(Path(export_dir) / meta["head"])))
            mean, std = meta["mean"], meta["std"]
            scale = [1.0 / (255.0 * s) for s in std]
            offset = [-m / s for m, s in zip(mean, std, strict=True)]
            self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
            self.register_buffer("offset", torch.tensor(offset, dtype=torch.float32))
            self.fake_class = int(meta["fake_class"])

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images.to(torch.float32) * self.scale + self.offset  # NHWC, per channel
            x = x.permute(0, 3, 1, 2)
            pooled = self.tower(pixel_values=x).pooler_output
            return torch.softmax(self.head(pooled), dim=-1)[:, self.fake_class]

    return ExportedDetector().eval()


def torch_path(module: Any) -> Predict:
    import torch

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(images)).numpy()
    return predict


def export_onnx(module: Any, out_dir: Path, image_size: int) -> Path:
    """OUT_DIR/detector.onnx: `module` traced by torch.onnx.export (the torch.export-based
    exporter, torch's default), with the batch dimension left dynamic so one file serves
    every batch size the bench times."""
    import torch

    from fmsd_jax import atomic

    path = Path(out_dir) / ONNX_FILE
    example = torch.zeros((2, image_size, image_size, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=1024)
    # One file (no external data: ViT-L/14's 1.2 GB fits protobuf's 2 GB), renamed into place.
    with atomic.replacing(path) as tmp, torch.inference_mode():
        torch.onnx.export(module, (example,), str(tmp), dynamo=True, input_names=["images"],
                          output_names=["p_fake"], dynamic_shapes={"images": {0: batch}},
                          external_data=False)
    return path


def onnx_path(onnx_file: Path, threads: int) -> Predict:
    """An ONNX Runtime CPU session on `onnx_file`: `threads` intra-op threads, one inter-op,
    all graph optimisations (its defaults otherwise)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])

    def predict(images: np.ndarray) -> np.ndarray:
        return session.run(None, {"images": images})[0]
    return predict


# ---------------------------------------------------------------------------------------------
# One framework per process: the bench's workers


def serve(kind: str, spec: dict[str, Any], conn: Any) -> None:
    """A worker process's loop: build `kind`'s rows ('jax': decomposed + merged, 'torch',
    'onnx'), answer ('ready', rows, versions), then serve requests until ('stop',):
      ('call', row, images)          -> (seconds, P(fake)) of one call
      ('time', row, images, seconds) -> [seconds of each call], calls run until `seconds`
                                        have passed (at least one call)
    An exception is sent back as ('error', traceback) so the bench fails with the cause."""
    import time
    import traceback

    try:
        paths, versions = _build(kind, spec)
        conn.send(("ready", list(paths), versions))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            if msg[0] == "call":
                _, row, images = msg
                t0 = time.perf_counter()
                probs = paths[row](images)
                conn.send(("ok", (time.perf_counter() - t0, probs)))
            elif msg[0] == "time":
                _, row, images, seconds = msg
                fn, times = paths[row], []
                start = time.perf_counter()
                while not times or time.perf_counter() - start < seconds:
                    t0 = time.perf_counter()
                    fn(images)
                    times.append(time.perf_counter() - t0)
                conn.send(("ok", times))
            else:
                raise ValueError(f"unknown request {msg[0]!r}")
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _build(kind: str, spec: dict[str, Any]) -> tuple[dict[str, Predict], dict[str, str]]:
    if kind == "jax":
        import jax

        return jax_paths(Path(spec["workdir"])), {"jax": jax.__version__}
    if kind == "torch":
        import torch
        import transformers

        torch.set_num_threads(spec["threads"])
        module = torch_module(Path(spec["export_dir"]), spec["hf_attn"])
        if spec.get("onnx_dir"):  # written here, timed by the 'onnx' worker
            export_onnx(module, Path(spec["onnx_dir"]), spec["image_size"])
        return ({"torch": torch_path(module)},
                {"torch": torch.__version__, "transformers": transformers.__version__})
    if kind == "onnx":
        import onnxruntime as ort

        return ({"onnx": onnx_path(Path(spec["onnx_dir"]) / ONNX_FILE, spec["threads"])},
                {"onnxruntime": ort.__version__})
    raise ValueError(f"unknown worker kind {kind!r}")

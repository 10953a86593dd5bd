"""Session-wide setup (jax starts as the CLI starts it, with a persistent compilation cache
the CLI subprocesses share), fixtures (a tiny CLIP checkpoint in Hugging Face's format and a
tiny synthetic benchmark in DeepfakeBench's layout, both made by the tests: nothing is
downloaded) and the helpers several test modules use.

The helpers live here, not in a test module, so that no test module imports another: a test
module imports them with `from conftest import ...` (pytest puts tests/ on sys.path), and a
script a test runs in a fresh process does the same after `sys.path.insert(0, tests)`.
Importing this module starts no jax backend and imports neither matplotlib nor cv2.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.text import Text

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Session setup


def pytest_configure(config: pytest.Config) -> None:
    """Tests start jax as the CLI does: without libtpu's runtime where no TPU chip is (its
    warnings would fill every failure's captured output; `--mode plan`'s compiles still load
    libtpu as a compiler). Then the persistent compilation cache (`use_compilation_cache`)."""
    from fmsd_jax import platforms

    platforms.skip_absent_tpu()
    use_compilation_cache(compilation_cache_dir(config))


# jax reads these when it is imported (a CLI subprocess) and as `jax.config` options here. Min
# compile time 0 and min entry size 0 (-1 would forbid any override): the tiny CPU programs of
# the suite compile in milliseconds and would otherwise never be written.
CACHE_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def compilation_cache_dir(config: pytest.Config) -> Path:
    """A cache folder of this session only (under the pytest cache, named by the pid; removed
    at the session's end), so a session never reads programs that another session, another
    checkout or another jax wrote. Folders of killed sessions are removed at the next start."""
    cache = getattr(config, "cache", None)  # absent under -p no:cacheprovider
    if cache is not None:
        base = cache.mkdir("jax_compilation_cache")
    else:  # -p no:cacheprovider
        import tempfile

        base = Path(tempfile.gettempdir()) / "fmsd_jax_test_compilation_cache"
    for old in base.glob("session-*"):
        pid = old.name.removeprefix("session-")
        if not (pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid))):
            shutil.rmtree(old, ignore_errors=True)
    return base / f"session-{os.getpid()}"


def pytest_unconfigure(config: pytest.Config) -> None:
    path = os.environ.get(CACHE_ENV[0])
    if path and Path(path).name == f"session-{os.getpid()}":
        shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def use_compilation_cache(path: Path) -> None:
    """jax's persistent compilation cache in `path`, for this process and (through the
    environment, which subprocesses inherit) every CLI and script process a test starts.

    A cache hit still counts as a compile for `counting_compiles`: jax reports the
    backend-compile event around its cache lookup too (pxla._cached_compilation wraps
    compiler.compile_or_get_cached), so a test that counts compiles counts the programs a
    call had to obtain, whether compiled or read back (tests/test_train.py checks this)."""
    import jax

    path.mkdir(parents=True, exist_ok=True)
    values = (str(path), "0", "0")
    for name, value in zip(CACHE_ENV, values, strict=True):
        os.environ[name] = value
    jax.config.update("jax_compilation_cache_dir", values[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@contextlib.contextmanager
def compilation_cache_off() -> Iterator[None]:
    """The persistent cache off inside the block, in-process and for subprocesses started
    meanwhile (jax decides once per process whether it uses the cache: reset_cache makes it
    decide again)."""
    import jax
    from jax._src import compilation_cache

    saved = {name: os.environ.pop(name, None) for name in CACHE_ENV}
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})
        jax.config.update("jax_enable_compilation_cache", True)
        compilation_cache.reset_cache()


@pytest.fixture
def without_compilation_cache() -> Iterator[None]:
    """For a test of run-to-run reproducibility: it must compile its programs again, as a
    user's second run does without a cache, or a cache hit would hide a nondeterministic
    compile."""
    with compilation_cache_off():
        yield


# ---------------------------------------------------------------------------------------------
# Fixtures


def write_tiny_clip(out: Path, seed: int = 7) -> Path:
    """A random tiny CLIP vision tower (width 32, 2 layers, patch 8, 32 px) written to `out` as
    HF `model.safetensors` + `config.json`; another `seed` gives other weights, same shapes."""
    from flax import nnx

    from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig
    from fmsd_jax.model.weights.export_hf import save_hf_clip_vision

    cfg = ViTConfig(width=32, layers=2, heads=2, patch_size=8, mlp_dim=64, proj_dim=None,
                    image_size=32)
    save_hf_clip_vision(CLIPVisionTower(cfg, rngs=nnx.Rngs(seed)), out)
    return out / "model.safetensors"


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory) -> Path:
    """The suite's tiny CLIP (`write_tiny_clip`, seed 7)."""
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory) -> Path:
    """The synthetic cross-forgery benchmark at its `tiny` size."""
    from fmsd_jax.data.synthetic import write_benchmark

    out = tmp_path_factory.mktemp("synthetic")
    write_benchmark(out, size="tiny", seed=0)
    return out


# ---------------------------------------------------------------------------------------------
# Counting XLA compiles: jax reports each backend compile (a persistent-cache hit included, see
# use_compilation_cache) as a monitoring event, so a test can say how many compiles a call made
# (compiled once = the second call makes none).

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_COMPILES: list[str] = []  # every XLA backend compile of this test process, in order
_listening = False


def _listen_for_compiles() -> None:
    global _listening
    if not _listening:
        import jax

        jax.monitoring.register_event_duration_secs_listener(
            lambda event, _secs, **_: _COMPILES.append(event) if event == COMPILE_EVENT
            else None)
        _listening = True


def counting_compiles(fn: Callable, calls: list[int]) -> Callable:
    """`fn`, appending to `calls` how many compiles each of its calls made."""
    _listen_for_compiles()

    def counted(*args, **kwargs):
        before = len(_COMPILES)
        try:
            return fn(*args, **kwargs)
        finally:
            calls.append(len(_COMPILES) - before)
    return counted


# ---------------------------------------------------------------------------------------------
# Run configs for the tiny checkpoint and benchmark, and reading what a run saved


def load_config(name: str, arg: str = "runlocal"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def overrides(ckpt: Path, bench: Path) -> dict[str, str]:
    """The command-line overrides of a tiny run: `--config.KEY=VALUE` for each item."""
    return {"model.init_from": str(ckpt), "data.dataset_root": str(bench),
            "data.dataset_json_folder": str(bench / "dataset_json"),
            "data.train_dataset": "('SynBlend',)",
            "data.test_dataset": "('SynBlend','SynUpsample')",
            "train.total_steps": "6"}


def make_cfg(ckpt: Path, bench: Path, name: str = "clip_b16", **extra: str):
    """configs/NAME.py:runlocal with `overrides` and `extra` ({'a.b': 'value'}: strings, as on
    the command line; a tuple field takes a Python literal), the regime applied, locked."""
    from fmsd_jax import config_base

    cfg = load_config(name)
    for key, value in {**overrides(ckpt, bench), **extra}.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        current = node[leaf]
        node[leaf] = (ast.literal_eval(value) if isinstance(current, tuple)
                      else type(current)(value) if current is not None else value)
    config_base.apply_regime(cfg)
    cfg.lock()
    return cfg


def assert_json_close(got, want, atol: float, where: str = "") -> None:
    """Two JSON documents (results.json, decision.json) equal in structure, their numbers
    within `atol` (null where the other is null)."""
    import numpy as np

    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_json_close(got[k], want[k], atol, f"{where}/{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_json_close(g, w, atol, f"{where}[{i}]")
    elif isinstance(want, float | int) and not isinstance(want, bool):
        np.testing.assert_allclose(got, want, atol=atol, err_msg=where)
    else:
        assert got == want, where


def flat_arrays(tree) -> dict:
    """{'[a][b]': array} with nnx's `.value` accessors dropped, so states and dicts compare."""
    import jax
    import numpy as np

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k).removesuffix(".value").removesuffix("['value']"): np.asarray(v)
            for k, v in flat}


def trainable_at(workdir: Path, step: int | None = None) -> dict:
    """The trained leaves of a checkpoint as a flat {path: numpy array}."""
    import jax
    import orbax.checkpoint as ocp

    root = Path(workdir).absolute() / "checkpoints"
    step = step if step is not None else max(int(p.name) for p in root.iterdir()
                                             if p.name.isdigit())
    path = root / str(step) / "state"
    # Restore onto this process's first device, whatever mesh wrote the checkpoint.
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            tree)
    state = ocp.StandardCheckpointer().restore(path, abstract)
    return flat_arrays(state["trainable"])


# ---------------------------------------------------------------------------------------------
# The method layer's settings and the production train step on a small detector


def optim_settings(**changes: Any):
    """config_base's `optim` defaults as an OptimConfig, with `changes`: a test states only what
    it varies, and the rest is what a run uses."""
    import dataclasses

    from fmsd_jax import config_base
    from fmsd_jax.run import factory

    return dataclasses.replace(factory.optim_section(config_base.base_config()), **changes)


def objective_settings(**changes: Any):
    """config_base's objective defaults (`method.lambda_*`, `spectral_form`) with `changes`."""
    import dataclasses

    from fmsd_jax import config_base
    from fmsd_jax.run import factory

    return dataclasses.replace(factory.objective_section(config_base.base_config()), **changes)


def production_step(det, *, regime: str, spec, batch: dict, **kwargs: Any):
    """`train_step.make_train_step` on `det`, on a one-device mesh, as bench/_common.ProductionStep
    builds it for the benches (one construction for both); kwargs go to ProductionStep."""
    import jax

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench._common import ProductionStep

    n, size = batch["image"].shape[:2]
    return ProductionStep(det, regime=regime, spec=spec, batch=n, image_size=size,
                          devices=jax.devices()[:1], **kwargs)


# ---------------------------------------------------------------------------------------------
# The planner's tiny config, and the real train step on a data x fsdp mesh (tests/test_plan.py
# runs it in-process and in a 64-device subprocess)


def tiny_cfg(**over: Any):
    """config_base's defaults at the planner tests' tiny size (bfloat16, variant 'tiny',
    32 px, batch 8) with `over` ({'a.b': value}, values typed)."""
    from fmsd_jax import config_base

    c = config_base.base_config()
    c.model.variant = "tiny"
    c.model.image_size = 32
    c.data.image_size = 32
    c.model.dtype = "bfloat16"
    c.method.mask.top_k = 2
    c.train.batch_size = 8
    c.eval.batch_size = 8
    for k, v in over.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def train_losses(ckpt: str, *, data: int, fsdp: int) -> dict:
    """Three steps of the tiny model's real train step on a data x fsdp mesh, fixed batches.

    Every weight is eligible for fsdp (FSDP_MIN_SIZE 0), so the frozen kernels are really
    split 8 ways on the 8 x 8 mesh; returns the per-step losses and how many leaves were split.
    """
    import jax
    import numpy as np

    from fmsd_jax import parallel
    from fmsd_jax.run import rebuild, train_step

    cfg = tiny_cfg(**{"model.dtype": "float32", "model.variant": "auto",
                      "model.init_from": ckpt, "method.mask.enabled": False,
                      "train.batch_size": 64, "mesh.data": data, "mesh.fsdp": fsdp})
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[: data * fsdp])
    min_size, parallel.FSDP_MIN_SIZE = parallel.FSDP_MIN_SIZE, 0
    try:
        run = rebuild.open_run(cfg, Path("/nonexistent-workdir"), mesh, estimate=False)
        parts = train_step.assemble_step(cfg, run, steps=3)
        split = sum("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(run.frozen))
        rng = np.random.default_rng(0)
        state, sums, losses = parts["state"], parts["metric_sums"], []
        for _ in range(3):
            host = {"image": rng.integers(0, 256, (64, 32, 32, 3), np.uint8),
                    "label": rng.integers(0, 2, (64,), np.int32)}
            batch = parallel.global_batch(mesh, host, ("image", "label"))
            before = float(sums["loss"])
            state, sums = parts["step_fn"](state, run.frozen, batch, sums)
            losses.append(float(sums["loss"]) - before)
    finally:
        parallel.FSDP_MIN_SIZE = min_size
    return {"losses": losses, "split_leaves": split, "mesh": dict(mesh.shape)}


# ---------------------------------------------------------------------------------------------
# The command line


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m fmsd_jax.main ARGS` in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "fmsd_jax.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line of a refused command (exit 2, no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# File names that are not valid UTF-8

LATIN1 = b'\xe9'  # 'é' in Latin-1: a lone byte UTF-8 cannot decode


def byte_path(parent, name: bytes) -> str:
    """PARENT/NAME as Python names it (surrogate-escaped str); skips the test where the
    filesystem will not hold a name that is not valid UTF-8."""
    path = os.fsdecode(os.path.join(os.fsencode(parent), name))
    probe = os.fsdecode(os.path.join(os.fsencode(parent), b'.probe' + LATIN1))
    try:
        with open(probe, 'wb'):
            pass
        os.remove(probe)
    except OSError as e:
        pytest.skip(f'this filesystem refuses names that are not UTF-8 ({e})')
    return path


def write_avi(path: str, n: int = 6, size=(48, 32)) -> None:
    """An MJPG video whose frame i has green level 30 * i, so frames are told apart."""
    import cv2
    import numpy as np

    os.makedirs(os.path.dirname(path), exist_ok=True)
    # bytes: OpenCV segfaults on the surrogate-escaped str of a name that is not UTF-8
    writer = cv2.VideoWriter(os.fsencode(path), cv2.VideoWriter_fourcc(*'MJPG'), 10, size)
    assert writer.isOpened()
    for i in range(n):
        frame = np.zeros((size[1], size[0], 3), np.uint8)
        frame[..., 1] = 30 * i
        writer.write(frame)
    writer.release()


# ---------------------------------------------------------------------------------------------
# What a reader of a saved chart sees, measured on the matplotlib objects instead of by eye:
# text too small to read, tick labels running into each other.

MIN_FONT_PT = 7.0  # the smallest text a chart may hold at its saved size


def draw(fig: Figure):
    """Lay the figure out as `plots.save_figure` does (Agg at 120 dpi) and return the renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.set_dpi(120)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def visible_texts(fig: Figure) -> list[Text]:
    """Every non-empty, visible text of the figure: titles, labels, tick labels, legends,
    cell numbers."""
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def too_small(fig: Figure, min_pt: float = MIN_FONT_PT) -> list[tuple[str, float]]:
    return [(t.get_text(), t.get_fontsize()) for t in visible_texts(fig)
            if t.get_fontsize() < min_pt]


def overlapping_tick_labels(fig: Figure) -> list[tuple[str, str, str]]:
    """(axis, label, label) for each pair of drawn tick labels of one axis whose boxes overlap,
    over every axes of the figure (colorbars included). Only ticks inside the view limits are
    drawn, so only those count."""
    renderer = draw(fig)
    bad = []
    for ax in fig.axes:
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            lo, hi = sorted(axis.get_view_interval())
            ticks = [*axis.get_major_ticks(), *axis.get_minor_ticks()]
            labels = [t.label1 for t in ticks
                      if t.label1.get_visible() and t.label1.get_text()
                      and lo - 1e-12 * abs(lo) <= t.get_loc() <= hi + 1e-12 * abs(hi)]
            boxes = [lb.get_window_extent(renderer) for lb in labels]
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    if boxes[i].overlaps(boxes[j]):
                        bad.append((f"{ax.get_title()[:30]!r}.{name}", labels[i].get_text(),
                                    labels[j].get_text()))
    return bad


# ---------------------------------------------------------------------------------------------
# A detector whose fakes carry their artifact in a known box (tests/test_saliency.py and
# bench/saliency_methods.py measure patch maps on it)

SIZE, PATCH, GRID = 32, 8, 4  # the tiny CLIP geometry: a 4 x 4 patch grid
BOX = 2  # patches per side of the artifact's box: 4 of 16 patches, 25 % of the image


def box_images(n: int, rng) -> tuple:
    """(uint8 images (n, 32, 32, 3), labels, boxes (n, GRID, GRID) bool): smooth random
    images (bilinear 4 x 4 colour fields plus noise of sd 6); every odd one is a fake with a
    +-25 checkerboard added in a BOX x BOX-patch box at a random patch-aligned place."""
    import cv2
    import numpy as np

    checker = (np.indices((BOX * PATCH,) * 2).sum(0) % 2 * 2 - 1)[..., None]
    low = rng.uniform(40, 215, (n, 4, 4, 3))
    images = np.stack([cv2.resize(x, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR) for x in low])
    images = images + rng.normal(0, 6, images.shape)
    labels = np.arange(n) % 2
    boxes = np.zeros((n, GRID, GRID), bool)
    for i in np.flatnonzero(labels):
        by, bx = rng.integers(0, GRID - BOX + 1, 2)
        images[i, by * PATCH:(by + BOX) * PATCH, bx * PATCH:(bx + BOX) * PATCH] += 25 * checker
        boxes[i, by:by + BOX, bx:bx + BOX] = True
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels.astype(np.int32), boxes


def train_box_detector(steps: int = 30) -> tuple:
    """(graphdef, trainable, frozen, one-device mesh, initial trainable): a tiny detector
    (random tower of the tiny CLIP geometry, every Param trained) fitted by Adam on batches of
    32 `box_images` (seed 0) for `steps` steps; it separates the held-out images perfectly."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from fmsd_jax import config_base, parallel
    from fmsd_jax.model.detector import Detector
    from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig

    cfg = ViTConfig(width=32, layers=2, heads=2, patch_size=PATCH, mlp_dim=64, proj_dim=None,
                    image_size=SIZE)
    det = Detector(CLIPVisionTower(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1),
                   pixel_mean=(0.48, 0.46, 0.41), pixel_std=(0.27, 0.26, 0.28))
    graphdef, trainable, frozen = nnx.split(det, nnx.Param, ...)
    opt = optax.adam(1e-3)

    @jax.jit
    def step(trainable, opt_state, images, labels):
        def loss(t):
            logits = nnx.merge(graphdef, t, frozen)(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = jax.grad(loss)(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    initial = jax.tree.map(lambda x: x.copy(), trainable)
    rng, opt_state = np.random.default_rng(0), opt.init(trainable)
    for _ in range(steps):
        images, labels, _ = box_images(32, rng)
        trainable, opt_state = step(trainable, opt_state, images, labels)
    mesh = parallel.make_mesh(config_base.base_config().mesh, jax.devices()[:1])
    return graphdef, trainable, frozen, mesh, initial


# ---------------------------------------------------------------------------------------------
# Faces: the real photographs that ship with scikit-image and matplotlib, and videos made from
# them (tests/test_faces.py, tests/test_preprocess.py)


def face_photos() -> dict:
    """The bundled photographs dlib finds a face in, as RGB uint8: scikit-image's astronaut
    (Eileen Collins) and matplotlib's grace_hopper, and their mirror images (two more faces
    for the raw trees: a mirrored face is another set of pixels to the detector)."""
    import matplotlib.cbook
    import numpy as np
    import skimage.data
    from PIL import Image

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
        hopper = np.asarray(im.convert("RGB"))
    photos = {"astronaut": skimage.data.astronaut(), "grace_hopper": hopper}
    photos.update({f"{k}_mirrored": np.ascontiguousarray(v[:, ::-1]) for k, v in
                   list(photos.items())})
    return photos


def lfw_faces(interpolation: str = "INTER_LINEAR") -> tuple[list, list]:
    """scikit-image's lfw_subset (100 faces, then 100 non-faces, 25 px grey) upscaled to
    100 px RGB, as the issue measured the detectors on it."""
    import cv2
    import numpy as np
    import skimage.data

    def rgb(x):
        g = cv2.resize((x * 255).round().astype(np.uint8), (100, 100),
                       interpolation=getattr(cv2, interpolation))
        return np.repeat(g[..., None], 3, axis=-1)

    lfw = skimage.data.lfw_subset()
    return [rgb(x) for x in lfw[:100]], [rgb(x) for x in lfw[100:]]


def paste_face(target, source, cropper):
    """`target` with `source`'s face pasted on: the source warped by the similarity that puts
    its five key points on the target's, blended inside a feathered hull of the target's
    68 landmarks (a face swap's seam, so 'fake' means something)."""
    import cv2
    import numpy as np

    from fmsd_jax.data import faces

    t, s = cropper.crop(target), cropper.crop(source)
    m = faces.similarity(cropper.key_points(s.landmarks), cropper.key_points(t.landmarks))
    warped = cv2.warpAffine(source, m, (target.shape[1], target.shape[0]))
    mask = np.zeros(target.shape[:2], np.float32)
    cv2.fillConvexPoly(mask, cv2.convexHull(t.landmarks.astype(np.int32)), 1.0)
    mask = cv2.GaussianBlur(mask, (0, 0), 3)[..., None]
    return (warped * mask + target * (1 - mask)).round().astype(np.uint8)


def write_face_video(path, still, centre: tuple[float, float], n: int = 8,
                     size: tuple[int, int] = (200, 200), zoom: float = 0.7,
                     pan: tuple[float, float] = (3.0, 1.0), turn: float = 1.0,
                     fourcc: str = "mp4v") -> list:
    """A video of `n` frames of `still` seen through a `size` window centred on the still's
    point `centre` (a face), zoomed by `zoom`, that pans by `pan` px and turns by `turn`
    degrees a frame; returns the RGB frames written (before the codec)."""
    import cv2
    import numpy as np

    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    writer = cv2.VideoWriter(os.fspath(path), cv2.VideoWriter_fourcc(*fourcc), 10, size)
    assert writer.isOpened()
    frames = []
    for i in range(n):
        m = cv2.getRotationMatrix2D(tuple(map(float, centre)), turn * i, zoom)
        m[:, 2] += np.array(size) / 2 - np.array(centre) + np.array(pan) * i
        frame = cv2.warpAffine(still, m, size, borderMode=cv2.BORDER_REFLECT)
        frames.append(frame)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return frames


# ---------------------------------------------------------------------------------------------
# The detection service (tests/test_serve.py, tests/test_serve_page.py)


@pytest.fixture(scope="session")
def served_run(tmp_path_factory, tiny_clip_checkpoint, tiny_benchmark) -> Path:
    """A tiny trained FMSD run for the service tests to serve: 4 steps, validated at step 4,
    so `best/4` holds the checkpoint the service restores, and evaluated after training, so
    decision.json holds its temperature and operating points (about 20 s on two cores)."""
    from fmsd_jax.modes import train

    workdir = tmp_path_factory.mktemp("served")
    cfg = make_cfg(tiny_clip_checkpoint, tiny_benchmark,
                   **{"train.total_steps": "4", "diagnostics.bootstrap": "10"})
    train.train(cfg, workdir)
    return workdir


def serve_cfg(ckpt: Path, bench: Path, **extra: str):
    """`make_cfg` for serving the tiny run: three compiled batch sizes, 6 frames per video, and
    a frame without a face scored as its centre square (the tiny frames hold none)."""
    return make_cfg(ckpt, bench, **{"serve.batch_sizes": "(1, 4, 8)",
                                    "predict.video_frames": "6", "data.face.if_none": "centre",
                                    **extra})

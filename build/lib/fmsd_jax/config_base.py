"""The full config schema with documented defaults, shared by every file in `configs/`.

Every field a run may read exists here, so `--config.a.b=value` on an unknown field is an error
that names it (ml_collections refuses new keys on a locked ConfigDict). Each uncertain choice of
the reconstructed method is a field whose default carries a one-line reason (DESIGN.md §1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import ml_collections as mlc

from fmsd_jax.data.config import get_data_config
from fmsd_jax.errors import BadInput


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.seed = 1024  # Effort / DeepfakeBench seed

    c.model = mlc.ConfigDict()
    c.model.variant = "B/16"  # declared geometry; 'auto' takes whatever init_from holds
    c.model.init_from = ""  # pretrained CLIP file: HF model.safetensors, OpenAI .pt, open_clip
    c.model.image_size = 224
    c.model.dtype = "float32"  # compute dtype; 'bfloat16' on accelerators (params stay fp32)
    c.model.attention_impl = mlc.FieldReference(None, field_type=str)  # None: backend picks
    c.model.remat = "dots"  # dots | none | full: what each block keeps for the backward
    c.model.num_classes = 2

    c.method = mlc.ConfigDict()
    c.method.regime = "fmsd"  # fmsd | effort | full | linear_probe
    c.method.targets = ("q", "k", "v", "out")  # Effort's candidate layers; add fc1/fc2 for MLPs
    c.method.num_subspaces = 4  # K artifact subspaces (FMSD's multi-artifact assumption)
    c.method.rank = 1  # d per subspace: K*d trainable directions per layer, Effort used 1
    # Demo evidence (configs/demo.py docstring; FMSD at lr 2e-2, 200 steps, 128 validation
    # videos): each λ > 0 (0.01 and 0.1, both forms) held the artifact bases back: best
    # SynBlend val AUC .670 at λ=0 against ≤ .648, backbone contribution +.21 against ≤ +.09,
    # merged weights moved 20 % (median) against ≤ 5 %.
    c.method.lambda_orth = 0.0  # keeps artifact bases orthogonal; 0 reproduces Effort's code
    c.method.lambda_spec = 0.0  # keeps the pretrained spectrum; 0 allowed
    # 'squared' (‖Ŵ‖²−‖W₀‖²)²: zero value and gradient at init, unlike Effort's |·|
    # ('frobenius'), which pulls s by ∓2s from step 0 (sign set by fp32 rounding).
    c.method.spectral_form = "squared"  # or 'frobenius' (Effort), 'per_subspace'
    c.method.mask = mlc.ConfigDict()
    c.method.mask.enabled = True  # forgery-aware layer masking (v3 of the paper)
    c.method.mask.num_batches = 16  # T mini-batches for the gradient moments
    # The moments are taken with a head fitted on the frozen backbone first (a random head's
    # gradients describe the random head): Adam steps of a linear probe on the frozen features
    # (layer_mask.json's head.loss_first/loss_last show whether it levelled off). 0: random head.
    # The warmed head is used for the mask only; training starts from the fresh head.
    c.method.mask.warmup_steps = 100
    c.method.mask.warmup_lr = 1e-3
    c.method.mask.stability_seeds = 3  # --mode mask: repeat with this many head/data seeds
    c.method.mask.score = "bias_variance"  # bias/(variance+eps) per layer, or 'gsnr'
    c.method.mask.select = "top_k"  # or 'threshold' (min-max normalised, Auto-SNR style)
    c.method.mask.top_k = 24  # half of ViT-B/16's 48 attention projections
    c.method.mask.threshold = 0.5
    c.method.mask.eps = 1e-12

    c.optim = mlc.ConfigDict()
    c.optim.name = "adam"  # torch-style Adam + L2 weight decay, as Effort; or 'adamw'
    c.optim.lr = 2e-4  # Effort
    c.optim.head_lr = 2e-4
    c.optim.weight_decay = 5e-4  # Effort
    c.optim.head_weight_decay = 5e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.schedule = "constant"  # Effort uses no scheduler; 'cosine' adds warm-up + cosine
    c.optim.warmup_steps = 0
    c.optim.grad_clip = 0.0  # global-norm clipping; 0 disables

    c.data = get_data_config()

    c.train = mlc.ConfigDict()
    c.train.batch_size = 32  # global batch, Effort
    c.train.num_epochs = 10
    c.train.total_steps = 0  # 0: num_epochs over the training set
    c.train.log_every = 50  # metrics are fetched from the device only this often
    c.train.checkpoint_every = 500
    c.train.eval_every = 0  # validation every N steps; 0: once per epoch
    c.train.max_to_keep = 2
    c.train.eval_after_training = True
    # Fault injection for the resume tests: the process sends itself this signal right after
    # finishing step `fault_after_step` (0: never); only process `fault_process` (-1: each).
    c.train.fault_after_step = 0
    c.train.fault_signal = "SIGKILL"
    c.train.fault_process = -1

    c.eval = mlc.ConfigDict()
    c.eval.batch_size = 64
    c.eval.splits_from_train = "val"  # checkpoint selection split (never a test set)
    c.eval.select_metric = "frame_auc"
    # A video's P(fake) from its frames' (evaluators/metrics.py AGGREGATIONS): 'mean' is
    # DeepfakeBench's; 'mean_logit', 'max' and 'topk' (mean of the video_topk highest) are
    # options. results.json reports video AUC under every one; this one is what predict prints
    # and what the video-level operating points are chosen under.
    c.eval.video_aggregation = "mean"
    c.eval.video_topk = 4

    c.mesh = mlc.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by the other axes
    c.mesh.fsdp = 1  # >1 shards large frozen weights over this axis
    c.multihost = False  # jax.distributed.initialize() (auto-detects SLURM / TPU pods)
    c.distributed = mlc.ConfigDict()  # explicit cluster, e.g. several processes on localhost
    c.distributed.coordinator_address = ""  # 'host:port'; empty: auto-detect
    c.distributed.num_processes = 0
    c.distributed.process_id = -1

    # Adaptation diagnostics at the end of every run (fmsd_jax/evaluators/adaptation.py).
    c.diagnostics = mlc.ConfigDict()
    c.diagnostics.bootstrap = 1000  # paired resamples of validation videos for Δ AUC's 95 % CI
    c.diagnostics.spectra = 4  # SVDs of the most-moved adapted layers only (cheap on ViT-L)

    c.export = mlc.ConfigDict()
    c.export.out_dir = ""  # default: WORKDIR/export

    # --mode robustness: every test set clean and under each perturbation level
    # (fmsd_jax/modes/robustness.py; perturbations in fmsd_jax/data/perturbations.py).
    c.robustness = mlc.ConfigDict()
    c.robustness.protocol = "deeperforensics"  # 7 types x 5 levels (LipForensics); or 'gend'
    c.robustness.types = ()  # type keys, e.g. ('CS', 'VC'); empty: all of the protocol's
    c.robustness.levels = ()  # 1-based levels; empty: all (a subset makes a quick pass)
    c.robustness.datasets = ()  # empty: data.test_dataset
    c.robustness.seed = 0  # block positions and noise; the same seed gives identical pixels

    c.predict = mlc.ConfigDict()
    c.predict.batch_size = 32
    c.predict.video_frames = 32  # frames sampled evenly per video file
    # Label 'fake' when the calibrated P(fake) >= the threshold of this operating point, chosen
    # on validation by --mode evaluate (WORKDIR/decision.json): 'eer', 'fpr@0.01', 'fpr@0.05',
    # or a threshold given as a number, e.g. '0.5' (evaluators/decision.py).
    c.predict.operating_point = "eer"
    # True: also each subspace's share of the fake logit and a patch heatmap per frame.
    c.predict.explain = False
    # Integrated-gradient steps per patch map (evaluators/saliency.py: why 32; each costs a
    # forward and a backward pass).
    c.predict.explain_steps = 32
    c.predict.per_image = False  # True: each image of a folder is its own input, not a frame

    # --mode serve: the run behind an HTTP API and a page (fmsd_jax/serve/, README "Serving").
    c.serve = mlc.ConfigDict()
    c.serve.host = "127.0.0.1"  # loopback only; any other address needs token_file
    c.serve.port = 8000  # 0: a free port, printed at start
    c.serve.token_file = ""  # a file holding the bearer token every API request must carry
    # Compiled at start, before readiness; a batch pads to the smallest that holds it.
    c.serve.batch_sizes = (1, 8, 32)
    c.serve.batch_wait_ms = 2.0  # how long a batch waits for frames of concurrent requests
    c.serve.queue_frames = 256  # frames of admitted requests; past it: 503 + Retry-After
    c.serve.max_pending = 64  # requests read, decoded, scored or waiting to be; past it: 503
    c.serve.max_connections = 1024  # uvicorn's limit_concurrency (its own 503, past it)
    c.serve.timeout_s = 30.0  # a request still unanswered after this is cancelled: 504
    c.serve.workers = 2  # decoding / face-cropping threads, off the event loop
    c.serve.max_bytes = 64 * 2**20  # upload size cap, checked before the body is read whole
    c.serve.max_image_pixels = 50_000_000  # from the image header, before decoding
    c.serve.max_video_pixels = 3840 * 2160  # per frame (4K UHD), from the video header
    c.serve.max_video_frames = 108_000  # an hour at 30 fps, claimed or counted
    # 'detect': an uploaded image's largest face is cropped as video frames are (analysts
    # upload photos, not DeepfakeBench crops); 'whole': taken whole as a face crop, as
    # --mode predict takes an image.
    c.serve.image_faces = "detect"
    # explain=true answers: subspace Δlogits and an integrated-gradients heatmap of the frame
    # shown (config.predict.explain_steps steps); True compiles their programs at start.
    c.serve.explain = True
    # Verdict 'uncertain' while |P(fake) - threshold| < this: a score that close to the
    # operating point is one a small crop or compression change can flip.
    c.serve.uncertain_band = 0.1
    return c


def apply_regime(c: mlc.ConfigDict) -> mlc.ConfigDict:
    """Make a baseline regime's method fields consistent (Effort: K=1, d=1, no masking)."""
    if c.method.regime == "effort":
        c.method.num_subspaces = 1
        c.method.rank = 1
        c.method.mask.enabled = False
        c.method.lambda_orth = 0.0
        c.method.lambda_spec = 0.0
    elif c.method.regime in ("full", "linear_probe"):
        c.method.mask.enabled = False
        c.method.lambda_orth = 0.0
        c.method.lambda_spec = 0.0
    return c


def runlocal(c: mlc.ConfigDict) -> mlc.ConfigDict:
    """Shrink any config to a CPU smoke run: geometry from init_from, tiny images, few steps."""
    c.model.variant = "auto"
    c.model.image_size = 32
    c.data.image_size = 32
    c.data.frame_num.train = 2
    c.data.frame_num.test = 2
    c.data.workers = 0
    c.method.mask.num_batches = 2
    c.method.mask.warmup_steps = 2
    c.method.mask.top_k = 2
    c.train.batch_size = 4
    c.train.total_steps = 4
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.eval_every = 4
    c.eval.batch_size = 8
    return c


def parse_arg(arg: str | None, *, choices: Mapping[str, Sequence[str]] | None = None,
              **defaults) -> mlc.ConfigDict:
    """big_vision-style `path.py:key=value,flag` argument parsing; `choices` lists the values
    an argument may take, so a typo fails here, before any work."""
    out = mlc.ConfigDict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        if key not in out:
            raise BadInput(f"unknown config argument {key!r}; known: {sorted(out)}")
        default = out[key]
        if not value:
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(value)
        allowed = (choices or {}).get(key)
        if allowed is not None and out[key] not in allowed:
            raise BadInput(f"config argument {key}={value!r} is not one of {tuple(allowed)}")
    return out


FFPP_TEST = ("Celeb-DF-v1", "Celeb-DF-v2", "DeepFakeDetection", "DFDC", "DFDCP")


def paper_protocol(arg: str | None, *, variant: str, regime: str, **extra_args) -> tuple:
    """The DeepfakeBench protocol (FF++ c23 → CDF-v1/v2, DFD, DFDC, DFDCP) for one regime.

    Returns (config, parsed args); the caller edits the config, then calls `finish`.
    """
    args = parse_arg(arg, runlocal=False, bf16=False, **extra_args)
    c = base_config()
    c.model.variant = variant
    c.method.regime = regime
    apply_regime(c)
    c.data.train_dataset = ("FaceForensics++",)
    c.data.test_dataset = FFPP_TEST
    return c, args


def finish(c: mlc.ConfigDict, args: mlc.ConfigDict) -> mlc.ConfigDict:
    """Apply the common `:bf16` and `:runlocal` variants last, so they win."""
    if args.bf16:
        c.model.dtype = "bfloat16"
    if args.runlocal:
        runlocal(c)
    return c

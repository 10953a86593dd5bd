r"""The offline demo: FMSD and three baselines on the synthetic cross-forgery benchmark.

  python -m fmsd_jax.main --config configs/demo.py --workdir runs/demo

From a set-up machine, with no download and no GPU, this (a) writes the synthetic benchmark
(size `small`, 64 px) to runs/demo/data, (b) pretrains a small CLIP-shaped ViT by SimCLR on the
benchmark's real *training* photographs and writes it as a Hugging Face CLIP
`model.safetensors` (runs/demo/pretrained), (c) loads it with `load_clip_vision` like any CLIP
checkpoint, (d) estimates the layer mask, decomposes and trains FMSD on SynBlend, (e) evaluates
on all four families, (f) trains Effort (K=1, d=1, no mask), full fine-tuning and a linear probe
the same way (runs/demo/<method>), and (g) writes runs/demo/report.md. Every stage is skipped
when its output exists, so a rerun finishes in seconds.

Variants: `:quick` (tiny data and model, a few steps; the tests run it; < 2 min);
`:method=X` (X in fmsd, effort, full, linear_probe) runs one row into --workdir, using data and
backbone from the workdir's parent when it holds a prepared demo (or from
`--config.demo.root`; else the row prepares its own inside --workdir), e.g.
  python -m fmsd_jax.main --config configs/demo.py:method=effort --workdir runs/demo/effort
With `:method=X`, `--mode evaluate|export|predict` work on that row as on any run.
`:sweep` runs the learning-rate sweep below instead of the demo.

How the hyper-parameters were chosen (honesty rule: no held-out family is ever used). Fixed by
reasoning: Adam, wd 5e-4, batch 32 (Effort), one head lr (1e-3) for every method so that the
head is not what differs, FMSD's K=4, d=1 on half of the candidate layers (the paper config's
"half"), 200 steps to fit the time budget, checkpoints selected on SynBlend's validation split.
Measured: the backbone learning rates, by the sweep below, and the regulariser defaults of
config_base.py (λ_orth, λ_spec, spectral_form), by the λ/form table below; both on SynBlend
*validation* only. The paper configs keep Effort's recipe (lr 2e-4 for ~18k steps). Earlier
change, kept: the SimCLR pretraining used blur augmentation (p=0.5) until a first full run
showed every row's SynBlend *validation* AUC at ~0.52, so blur was removed (CLIP itself trains
with crops only); held-out scores played no part in it.

Learning rates: one procedure for every method that trains a backbone, one grid, scored on
SynBlend validation only (the sweep's runs have no test set configured: none is loaded):

  python -m fmsd_jax.main --config configs/demo.py:sweep --workdir runs/demo

trains FMSD, Effort and full fine-tuning at backbone lr 2e-4, 2e-3 and 2e-2 (head lr 1e-3)
into runs/demo/sweep/ (reusing the demo's data and backbone) and prints the table below: best
validation frame AUC @ the step it was reached at (Δ: the backbone's contribution, validation
frame AUC minus that of the pretrained backbone with the same head). The chosen lr is the one
with the highest validation frame AUC (the first grid value on a tie).

  Measured 04:20-04:44 UTC at commit 8b64d08 (1-min load average 5-8 on 2 CPUs: another
  developer's compiles ran beside it; the AUCs do not depend on load), one `:sweep` run:

  method (head lr 1e-3)  lr 2e-4               lr 2e-3                 lr 2e-2                chosen
  FMSD                   .547 @175 (Δ +.002)   .656 @175 (Δ +.134)     **.670 @75 (Δ +.212)** 2e-2
  Effort                 .545 @175 (Δ -.000)   **.661 @175 (Δ +.141)** .657 @50 (Δ +.221)     2e-3
  Full fine-tuning       **.653 @50 (Δ +.223)** .642 @125 (Δ +.203)    .591 @200 (Δ +.153)    2e-4

  Δ is measured on SynBlend's validation split, 128 videos (64 real, 64 fake) at 4 frames; its
  95 % interval (paired bootstrap over videos) excludes 0 at every lr from 2e-3 up, e.g. FMSD
  2e-2 [+.08, +.34], Effort 2e-3 [+.04, +.24]. At 2e-4 FMSD and Effort move their merged weights
  0.4 % and 0.1 % (median over adapted layers) and the backbone adds nothing (Δ ≤ .002): Effort's
  lr needs Effort's ~18k steps. The chosen points move them 20 % (FMSD, 2e-2), 4 % (Effort) and
  2 % (full fine-tuning; 100 % at 2e-2). Before this split was enlarged (8 videos at 8 frames)
  the same sweep chose 2e-3 for FMSD, and every Δ interval contained 0 (±0.45 wide).

λ/form evidence (FMSD at its chosen lr 2e-2, λ_orth = λ_spec = λ; one run each; the same sweep
command with `--config.demo.root=runs/demo "--config.demo.sweep.methods=('fmsd',)"
"--config.demo.sweep.lrs=(0.02,)" --config.method.lambda_orth=λ --config.method.lambda_spec=λ
--config.method.spectral_form=F` and its own --workdir; measured 04:45-04:55 UTC, same commit
and load): best SynBlend validation frame AUC, backbone contribution, and how far the 8 adapted
layers' merged weights moved (‖W − W₀‖/‖W₀‖, median / max, from each run's diagnostics.json):

  λ     form       best val AUC  contribution [95 %]  moved median / max
  0     —          .670 @75      +.212 [+.08, +.34]   .205 / .313
  0.01  frobenius  .645 @175     +.087 [+.02, +.15]   .021 / .142
  0.01  squared    .648 @175     +.082 [+.01, +.14]   .051 / .131
  0.1   frobenius  .544 @175     +.002 [-.00, +.00]   .016 / .021
  0.1   squared    .549 @175     +.009 [+.00, +.02]   .027 / .042

  Chosen (config_base.py): λ_orth = λ_spec = 0, because every λ > 0 cost validation AUC at
  200 steps (.02 at λ = 0.01, .12 at 0.1) and cut the backbone's contribution to less than
  half (to nothing at 0.1), holding the median weight movement to a quarter or less of λ = 0's;
  spectral_form = 'squared' for whoever turns it on (zero value and gradient at init; at
  λ = 0.01 and 0.1 it let the weights move about twice as far as Effort's |·| for the same AUC).
  The same ordering held in an earlier measurement on the 8-video validation split at lr 2e-3.

Time, from scratch at commit 88e209e on this repository's 2-CPU machine while other jobs
shared it (1-min load average 2.7 at the start, 5.5 at the end): 6 min 21 s (data 26 s, SimCLR
pretraining 221 s, FMSD 58 s including its validation calibration and subspace ablation, Effort
25 s, full fine-tuning 25 s, linear probe 12 s, robustness 12 s; 270 CPU-seconds). An earlier
version took 8 min 7 s on the idle machine and 10 min 4 s on a shared one: times vary with load
far more than between commits. `demo_timing.json` records every stage's wall and CPU seconds
and its load average. `:quick`: 45 s at the same load.

Result with these defaults at that commit (frame / video test AUC, 16 videos = 128 frames per
family; the last column is the backbone contribution on SynBlend validation, 128 videos, with
its 95 % interval; verdict, computed: FMSD beats 0 of 3 baselines held out). The report's
decision section (thresholds chosen on SynBlend validation, ECE before/after the validation
temperature) and FMSD's subspace table are quoted in README's "What you will see":

  method          SynBlend(train) SynUpsample SynAutoencode SynSplice  held-out   contrib.
  FMSD            .719/.688       .607/.594   .185/.172     .557/.500  .450/.422  +.22 [+.09, +.34]
  Effort K=1,d=1  .692/.672       .570/.578   .202/.172     .572/.547  .448/.432  +.14 [+.04, +.24]
  Full FT         .654/.672       .541/.594   .230/.219     .598/.578  .456/.464  +.22 [+.09, +.36]
  Linear probe    .637/.672       .635/.641   .172/.156     .567/.578  .458/.458  frozen

  Before issue 11 (lr 2e-4 everywhere, λ = 0.1 frobenius, random-head mask, 8 validation
  videos): FMSD, Effort and the linear probe all .643 / .656 on SynBlend and .460 / .458 held
  out (three linear probes), full fine-tuning (lr 2e-5) .675 / .703 and .465 / .458.

What it shows: every method that adapts its backbone now does so measurably (contribution
+.14 to +.22, no interval near 0) and fits the training family beyond the probe's frozen
features (SynBlend test .654-.719 against .637; FMSD highest). Held out, the four rows lie
within .448-.458 frame AUC, closer than 16 test videos per family can separate: FMSD neither
wins nor loses clearly (+.002 frame and -.010 video against Effort; .006 and .042 behind full
fine-tuning; .008 and .036 behind the probe). What the
adapted backbones learn about blending does not carry over to the unseen artifacts here, with
or without FMSD's mask and multiple subspaces. Every method scores below chance on
SynAutoencode (the report explains what that means).

Robustness (report.md's last section, `demo.robustness`): every row under DeeperForensics-1.0's
seven perturbations at levels 1 and 5 on the held-out SynUpsample (fmsd_jax/modes/robustness.py),
0.10-0.15 s an evaluation (60 in all) after a first one of 0.6-0.8 s that compiles, per row, at
commit 88e209e (load 5.2 on 2 CPUs); each row's robustness.md says so for its own run.
"""

import ml_collections as mlc

from fmsd_jax import config_base
from fmsd_jax.data.config import SYNTHETIC_DATASETS
from fmsd_jax.demo import METHODS


def get_config(arg: str | None = None):
    args = config_base.parse_arg(arg, choices={"method": ("all", *METHODS)}, method="all",
                                 quick=False, sweep=False)
    c = config_base.base_config()
    c.model.variant = "auto"  # geometry comes from the pretrained file
    c.model.image_size = 64
    c.data.image_size = 64
    c.data.train_dataset = ("SynBlend",)  # the 'blend' family only; the rest are held out
    c.data.test_dataset = SYNTHETIC_DATASETS
    c.data.frame_num.train = 8  # every frame of the small benchmark's 8-frame videos
    c.data.frame_num.test = 8
    # 128 validation videos at 4 frames: the backbone contribution's bootstrap resamples
    # videos, and frames of one video are near-copies, so videos buy precision, frames time.
    c.data.frame_num.val = 4
    c.data.workers = 0  # two cores: worker processes only add start-up time

    c.method.regime = "fmsd"
    # T = 32: at T = 8 six of the eight selected cells scored at the noise floor 1/(T-1) and
    # the ranking changed with the head seed (Spearman .45 over 3 seeds); at 32 every selected
    # cell scores above twice the floor and rho is .68 (--mode mask, docstring above).
    c.method.mask.num_batches = 32
    c.method.mask.top_k = 8  # half of the 16 attention projections of the 4-layer tower

    c.train.batch_size = 32  # Effort
    c.train.total_steps = 200  # ~33 epochs of SynBlend's 192 training frames
    c.train.log_every = 50
    c.train.checkpoint_every = 100
    c.train.eval_every = 25  # validation on SynBlend val picks the checkpoint
    c.eval.batch_size = 64

    c.demo = d = mlc.ConfigDict()
    d.method = args.method  # 'all' or one row
    d.variant = "quick" if args.quick else ""  # echoed into the reproduce commands
    d.root = ""  # data/ and pretrained/ location; '' = workdir ('all') or its parent (a row)
    d.methods = ("fmsd", "effort", "full", "linear_probe")
    d.data_size = "small"
    d.data_seed = 0
    # Robustness table of every row (fmsd_jax/robustness.demo_section) on one held-out family,
    # DeeperForensics levels 1 and 5 of 5 (mildest, harshest) for the time budget; family '' = none.
    d.robustness = mlc.ConfigDict(dict(family="SynUpsample", levels=(1, 5)))
    d.pretrain = mlc.ConfigDict(dict(
        width=64, layers=4, heads=4, patch_size=8, mlp_dim=256, image_size=64,
        steps=300, batch_size=64, lr=1e-3, weight_decay=0.05, warmup_steps=30,
        temperature=0.2, proj_hidden=256, proj_dim=64, log_every=50, seed=0,
        # CLIP-like invariances (crop, flip, colour), no blur: see fmsd_jax/demo/pretrain.py.
        crop_scale=(0.2, 0.9), jitter=0.4, gray_prob=0.2, blur_prob=0.0))
    # The learning-rate sweep (`:sweep`): one grid of backbone lrs, the same for every method
    # that trains a backbone, each point scored on SynBlend's validation split only.
    d.sweep = mlc.ConfigDict(dict(
        enabled=bool(args.sweep), methods=("fmsd", "effort", "full"),
        lrs=(2e-4, 2e-3, 2e-2)))
    d.optim = mlc.ConfigDict({
        "fmsd": {"lr": 2e-2, "head_lr": 1e-3},
        "effort": {"lr": 2e-3, "head_lr": 1e-3},
        "full": {"lr": 2e-4, "head_lr": 1e-3},
        "linear_probe": {"lr": 2e-4, "head_lr": 1e-3},  # lr unused: nothing else trains
    })

    if args.quick:
        # Seconds, not minutes: tiny data, a 2-layer tower, a handful of steps. Numbers from
        # this variant show that the pipeline runs, not how well the method works.
        c.model.image_size = c.data.image_size = 32
        c.data.frame_num.train = c.data.frame_num.test = c.data.frame_num.val = 3
        c.method.mask.num_batches = 2
        c.method.mask.warmup_steps = 4  # the head warm-up before the mask: a token
        c.method.mask.top_k = 4
        c.train.batch_size = 8
        c.train.total_steps = 4
        c.train.log_every = 2
        c.train.checkpoint_every = 4
        c.train.eval_every = 4
        c.eval.batch_size = 16
        d.data_size = "tiny"
        d.sweep.lrs = (2e-4, 2e-2)
        d.robustness.levels = (5,)
        d.pretrain.update(dict(width=32, layers=2, heads=2, mlp_dim=64, image_size=32,
                               steps=6, batch_size=16, warmup_steps=2, proj_hidden=32,
                               proj_dim=16, log_every=3))
    return c  # each row's regime is applied by fmsd_jax.demo.rows.method_config

"""The data half of every experiment config.

Field names follow DeepfakeBench's YAML (`dataset_root`, `dataset_json_folder`,
`train_dataset`, `test_dataset`, `compression`, `frame_num`, `label_dict`) so that a
DeepfakeBench user's settings carry over one for one.  Sequences are tuples because
ml_collections can override a tuple from the command line
(`--config.data.test_dataset="('Celeb-DF-v2','DFDC')"`) but not a list.
"""

from __future__ import annotations

import ml_collections

# CLIP's preprocessing constants: the backbone was trained with them, so any other
# normalisation shifts every activation away from what the pretrained weights expect.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# DeepfakeBench's `label_dict` (training/config/*.yaml) so its JSONs load unchanged.
DEEPFAKEBENCH_LABEL_DICT: dict[str, int] = {
    'FF-real': 0, 'FF-DF': 1, 'FF-F2F': 1, 'FF-FS': 1, 'FF-NT': 1, 'FF-FH': 1,
    'FF-SH': 1,
    'DFD_real': 0, 'DFD_fake': 1,
    'CelebDFv1_real': 0, 'CelebDFv1_fake': 1,
    'CelebDFv2_real': 0, 'CelebDFv2_fake': 1,
    'DFDCP_Real': 0, 'DFDCP_FakeA': 1, 'DFDCP_FakeB': 1,
    'DFDC_Real': 0, 'DFDC_Fake': 1,
    'DF_real': 0, 'DF_fake': 1,
    'UADFV_Real': 0, 'UADFV_Fake': 1,
    'FaceShifter_real': 0, 'FaceShifter_fake': 1,
    'roop_Real': 0, 'roop_Fake': 1,
}

# The synthetic cross-forgery benchmark (fmsd_jax.data.synthetic): one dataset per
# artifact family, each with a real and a fake label group.
SYNTHETIC_DATASETS = ('SynBlend', 'SynUpsample', 'SynAutoencode', 'SynSplice')
SYNTHETIC_LABEL_DICT: dict[str, int] = {
    f'{name}_{group}': int(group == 'fake')
    for name in SYNTHETIC_DATASETS for group in ('real', 'fake')
}


def get_data_config() -> ml_collections.ConfigDict:
    """Defaults reproduce Effort/DeepfakeBench training on FF++ c23."""
    c = ml_collections.ConfigDict()
    # Where records come from: 'deepfakebench' (JSON + frames), 'folder' (real/ fake/
    # image folders), 'video' (video files, faces cropped on the fly) or 'tfds'
    # (ArrayRecord files written by fmsd_jax.data.tfds_builder).
    c.source = 'deepfakebench'
    # Relative frame paths in the JSON (and folder/video datasets) resolve against this;
    # DeepfakeBench's JSONs hold paths relative to its `datasets/` directory.
    c.dataset_root = ''
    c.dataset_json_folder = ''
    c.train_dataset = ('FaceForensics++',)
    c.test_dataset = ('Celeb-DF-v1', 'Celeb-DF-v2', 'DFDCP', 'DFDC', 'DeepFakeDetection')
    # Only the FF family (FF++, DFD, FaceShifter) has a compression level in the JSON.
    c.compression = 'c23'
    # Effort: 8 and 8. The 'val' split reads `test` unless a config adds a `val` key (the
    # demo does: more validation videos at fewer frames each narrow its bootstrap interval).
    c.frame_num = ml_collections.ConfigDict({'train': 8, 'test': 8})
    c.label_dict = ml_collections.ConfigDict({**DEEPFAKEBENCH_LABEL_DICT,
                                              **SYNTHETIC_LABEL_DICT})
    c.image_size = 224  # CLIP ViT-B/16 and L/14 resolution
    # CLIP normalisation; the pipeline ships uint8 and the detector applies these on the device.
    c.mean = CLIP_MEAN
    c.std = CLIP_STD
    # grain worker processes; 0 = load in the main process; -1 = auto (pipeline.resolve_workers:
    # none when JAX computes on the CPU, else one per two free cores: at 224 px one core
    # decodes and augments 250-290 img/s, a sixth of what one H200 trains FMSD at).
    c.workers = -1
    c.read_threads = 2  # threads per process; cv2 decode releases the GIL
    c.prefetch = 8  # elements buffered per reading process (ReadOptions.prefetch_buffer_size)
    c.worker_buffer = 2  # batches buffered per worker process
    # A few corrupt PNGs must not kill a ten-hour run, but a wrong dataset_root
    # (everything unreadable) must fail fast with a clear message.
    c.max_unreadable_fraction = 0.01
    c.max_consecutive_unreadable = 64  # retries before declaring a region of data dead
    c.check_files = True  # stat every sampled frame at start-up and name the missing ones
    c.seed = 1024  # Effort's seed

    # DeepfakeBench's training augmentation with Effort's probabilities (effort.yaml).
    a = ml_collections.ConfigDict()
    a.enabled = True
    a.flip_prob = 0.5
    a.rotate_prob = 0.5
    a.rotate_limit = (-10.0, 10.0)
    a.blur_prob = 0.5
    a.blur_limit = (3, 7)
    a.brightness_prob = 0.5  # one of brightness/contrast, FancyPCA, HSV, as in DFB
    a.brightness_limit = (-0.1, 0.1)
    a.contrast_limit = (-0.1, 0.1)
    a.quality_prob = 0.5
    a.quality_lower = 40
    a.quality_upper = 100
    c.augment = a

    # 'folder' and 'video' sources: <dataset_root>/<Dataset>/[<split>/]<class>/...
    f = ml_collections.ConfigDict()
    # Subfolder name -> label for names not in label_dict.
    f.labels = ml_collections.ConfigDict({'real': 0, 'fake': 1, 'original': 0,
                                          'manipulated': 1})
    # Without <split>/ subfolders, videos are split by a hash of their id (stable
    # across machines and runs) into train/val/test with these fractions.
    f.split_fractions = (0.8, 0.1, 0.1)
    f.image_extensions = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
    f.video_extensions = ('.mp4', '.avi', '.mov', '.mkv', '.webm')
    c.folder = f

    v = ml_collections.ConfigDict()
    v.face_margin = 1.3  # DeepfakeBench's crop scale around the detected face
    v.detect_faces = True  # OpenCV's bundled Haar cascade; off = centre square crop
    v.min_face_fraction = 0.1  # ignore detections smaller than this share of the short side
    c.video = v

    t = ml_collections.ConfigDict()
    t.data_dir = ''  # where tfds_builder wrote its ArrayRecord files
    t.version = '1.0.0'
    c.tfds = t
    return c

"""Data sources and grain pipelines (DESIGN.md §2: knows nothing of models).

config.get_data_config     the config.data fields (DeepfakeBench names)
pipeline.make_train_loader / make_eval_loader   grain pipelines
deepfakebench, folder, video, tfds_builder      sources (sources.record_dataset picks one)
synthetic.write_benchmark  the offline cross-forgery benchmark in DeepfakeBench layout
forgeries, transforms      artifact families; reading, augmentation, normalisation
"""

"""What every mode shares, and the only code that reads or writes a workdir: the names of
its files (`workdir_files`), the detector a config names (`factory`), the run rebuilt from
config and workdir (`rebuild`), the layer mask estimated for it (`layer_selection`), the
compiled train step (`train_step`), orbax checkpoints (`checkpoints`), run.json
(`manifest`), the checks before work is spent (`preflight`), progress lines and TensorBoard
(`progress`) and the one-run-per-workdir lock (`workdir_lock`)."""

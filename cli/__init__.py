"""``sd3_train_network.py``'s command line over this pack: the models loaded in-process with the
host's own loaders, the nodes' dataset and trainer code, one or several processes.

- :mod:`.arguments`: the arguments under their sd-scripts names (the training options derived
  from ``TrainConfig``), refused and unknown names.
- :mod:`.config_file`: ``--config_file`` (sd-scripts' arguments in TOML) read and written.
- :mod:`.translate`: arguments -> TrainConfig, dataset node inputs, save and sample options.
- :mod:`.models`: checks of the model files before loading, and loading them with the host.
- :mod:`.workflow`: ``--write_workflow``, the editor workflow of a command line.
- :mod:`.run`: the training run (steps, epochs, saves, samples, states).
- :mod:`.main`: the entry point ``scripts/sd3_train_network.py`` calls.
"""

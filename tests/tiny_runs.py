"""Training a tiny preset through the real loop, for fixtures that need a trained workdir."""


def train_tiny(config_module, data_dir, first_stage_workdir, tmp_path_factory, name, configure=None, **train):
    """Trains ``config_module``'s "tiny" preset on the session's data and first stage; ``configure(config)`` may
    change it further, ``train`` overrides ``config.train`` fields. Returns the workdir."""
    from ldm_jax.training.loop import train_and_evaluate

    config = config_module.get_config("tiny")
    config.data.data_dir = data_dir
    config.first_stage.workdir = first_stage_workdir
    if configure is not None:
        configure(config)
    config.train.update(train)
    workdir = str(tmp_path_factory.mktemp(name))
    train_and_evaluate(config, workdir)
    return workdir

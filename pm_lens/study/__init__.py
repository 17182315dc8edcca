"""``pm-lens run``: the study on your own reward model from one config (see docs/run.md).

:mod:`~pm_lens.study.config` reads and checks the config (nothing heavy imported),
:mod:`~pm_lens.study.pairs` reads and selects the pairs, :mod:`~pm_lens.study.run` runs the shards
and writes the outputs, :mod:`~pm_lens.study.merge` merges the shard files.
"""

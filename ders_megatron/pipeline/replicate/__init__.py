"""The replication study (``tools/replicate.py``): does DeRS deliver what the paper claims?

Modules, in the order they are used: :mod:`.plan` (settings, variants, profiles),
:mod:`.data` (text, tokenizers, token files), :mod:`.trainer` (in-process megatron-core
training and scoring), :mod:`.runs` (one upcycle-train-score run, compression sweeps,
redundancy), :mod:`.stats` (intervals, bootstrap, verdicts), :mod:`.report` (tables,
plots, docs/replication.md), :mod:`.main` (the steps and the command line).
"""

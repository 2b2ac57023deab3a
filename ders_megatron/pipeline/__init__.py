"""The main job's pipeline (``./main.sh``, :mod:`ders_megatron.pipeline.main_job`).

==================  ==========================================================
``config``          :class:`PipelineConfig` (every flag of the main job), the variants
``launch``          the processes it starts: tools, torchrun, their logs
``text``            the KJV corpus (Debian) and the held-out split
``runner``          steps skipped when done (outputs complete + same fingerprint)
``steps``           the step list and the workdir layout
``train``           one torchrun fine-tuning run and its summary
``evaluate``        held-out loss, probe logits, transformers checks
``hf_check``        the plain-transformers side (a script, imports no ders-megatron)
``report``          the final table
==================  ==========================================================
"""

"""The training loop and what it stands on: the loop (``trainer``), learning-rate schedules (``schedule``),
resume / init-from (``resume``), checkpoints (``checkpoint``, ``safe_load``, ``safe_dcp``), the run folder and its
lock (``runfolder``), signals (``signals``), torchrun (``distributed``), the logged rows (``metrics_log``) and the
unreadable files' bookkeeping (``unreadable``). The commands (``d2v2.engine.run``, ``finetune``, ``probe``,
``export``), the data and the interop sit beside it and build on it.
"""

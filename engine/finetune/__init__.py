"""Fine-tuning: a pretrained encoder with a task head, trained and scored on labelled data.

``tasks`` names the tasks; ``metrics`` scores predictions as each task reports them (accuracy, top-k,
F1, Matthews correlation, Pearson / Spearman, by GLUE task); ``labelled_text`` reads sentence and
sentence-pair tasks (the GLUE folders as distributed, or a CSV / JSONL of ``text[,text_pair],label``);
``labelled_audio`` reads a manifest with its label file, or a folder per class; ``labelled_images`` an
ImageFolder with ``train/`` and ``val/``; ``speech`` transcribed speech (a manifest with ``.ltr`` /
``.wrd``) for CTC speech recognition, ``decoding`` turns its logits into words and scores them (WER,
CER), ``transcribe`` runs a fine-tuned recogniser on audio files.
"""

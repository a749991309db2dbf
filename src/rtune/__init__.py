"""rtune: Response Tuning (RT) and instruction tuning (IT) of pre-trained base language models.

Data flow, one module per stage:
    sources   -> records      (rtune.sources: datasets and files -> {"id", "instruction", "response", "source"})
    records   -> sequences    (rtune.render: chat format + method -> input_ids and labels, mask built while rendering)
    sequences -> batches      (rtune.batching)
    batches   -> run folder   (rtune.train, rtune.checkpoint)
    run       -> generations  (rtune.generate, rtune.chat)
"""

__version__ = "0.1.0"

"""rtune: Response Tuning (RT) and instruction tuning (IT) of pre-trained base language models.

The package follows the data flow, one subpackage per stage:

    rtune.data        sources -> records       datasets and files -> {"id", "instruction", "response", "source"}
    rtune.render      records -> sequences     chat template + method -> input_ids and labels (mask built while rendering)
    rtune.models      model specs -> models    hub ids, folders, .gguf files, built-in offline models
    rtune.train       sequences -> run folder  config, batch plan, loss, adapters, checkpoints, the recipe
    rtune.run_folder  the run folder           its layout, reading and writing it, loading a run or merged folder
    rtune.infer       run -> generations       generation, likelihood scoring, chat, merge
    rtune.eval        generations -> judgments benchmarks, metrics, judges
    rtune.report      judgments -> report      tables and plots
"""

__version__ = "0.1.0"

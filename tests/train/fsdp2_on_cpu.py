"""`rtune ...` with accelerate forced into FSDP2 mode on CPU processes (gloo), for tests.

accelerate turns FSDP on only when it finds GPUs; torch's FSDP2 (fully_shard) itself runs on CPUs.
This sets the FSDP2 plugin on accelerate's state right after it is built, so rtune's training loop
runs unchanged with its model really sharded (checked after prepare), on a machine without a GPU:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train/fsdp2_on_cpu.py train ...
"""

import sys

import accelerate
from accelerate import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor


class CpuFsdp2Accelerator(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The same settings as configs/accelerate/fsdp2.yaml.
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
            cpu_ram_efficient_loading=False, state_dict_type="FULL_STATE_DICT",
        )
        self.state.distributed_type = DistributedType.FSDP

    def prepare(self, *args, **kwargs):
        prepared = super().prepare(*args, **kwargs)
        model = prepared[0]
        assert all(isinstance(p, DTensor) for p in model.parameters()), "the model was not sharded"
        return prepared


accelerate.Accelerator = CpuFsdp2Accelerator

from rtune.cli import main  # noqa: E402  (after the patch: rtune.train imports Accelerator when it runs)

sys.exit(main(sys.argv[1:]))

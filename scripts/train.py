"""Train XrayGPT's projection (stage 1, stage 2) from a YAML config.

    python scripts/train.py --cfg configs/demo/stage1.yaml [key=value ...]
    torchrun --nproc_per_node 4 scripts/train.py --cfg configs/stage1.yaml
    accelerate launch --config_file configs/accelerate/ddp_4gpu.yaml scripts/train.py --cfg configs/stage1.yaml
"""

from __future__ import annotations

from xraygpt.cli import run_main
from xraygpt.train.config import TrainConfig
from xraygpt.train.trainer import train


def main(argv: list[str] | None = None) -> dict:
    return run_main(TrainConfig, train, __doc__, argv)


if __name__ == "__main__":
    main()

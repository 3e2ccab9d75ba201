"""Track 2 of the NanoGPT speedrun: the GPT-2 medium class model, target validation loss 2.92.

    torchrun --standalone --nproc_per_node=8 train_gpt_medium.py     # 8xH100, the record settings
    ./train.sh --medium                                              # the same through the wrapper
    python train_gpt_medium.py --help                                # every flag, with this track's defaults

Only what differs from track 1 lives here: model size, batch, schedule and learning rates. The model, the
optimisers, the data loader, checkpoints, logs and the command line are train_gpt.py's, and every run's log
carries the source of both files.
"""

import sys
from pathlib import Path

import train_gpt

TRACK2_TARGET = train_gpt.TRACK2_TARGET

MEDIUM = dict(
    num_layers=16, model_dim=1024, num_heads=8, head_dim=128,  # GPT-2 medium class
    train_seq_len=64 * 1024, seqs_per_step=8,  # 64K tokens per GPU per step on 8 GPUs: 524,288 per step
    num_iterations=5960, cooldown_frac=0.7,
    muon_lr=0.025, adam_lr=0.3, head_lr=1 / 320, scalar_lr=0.015,
    target_val_loss=TRACK2_TARGET,
)

PRESETS = {"medium": MEDIUM}


def source() -> str:
    """This file, then the trainer it builds on: a track-2 log reproduces from the log alone."""
    here = Path(__file__).read_text(encoding="utf-8")
    base = Path(train_gpt.__file__).read_text(encoding="utf-8")
    return f"{here}\n{'=' * 100}\n# train_gpt.py\n{base}"


def main(argv=None) -> int:
    return train_gpt.main(argv, presets=PRESETS, default_preset="medium", prog="train_gpt_medium.py",
                          source=source())


if __name__ == "__main__":
    train_gpt._reexec_with_cpu_malloc_settings()
    sys.exit(main())
